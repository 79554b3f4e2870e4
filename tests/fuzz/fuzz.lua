-- Seeded random-program fuzzer for lunet.mem. Each seed generates a program: a list of steps,
-- each a tree of operations (allocations kept or dropped, scopes plain, with an arena, with a
-- budget, mem.fail_after, nested coroutines resumed, yielded, abandoned, closed and wrapped,
-- objects whose finalizers allocate, open scopes and resume coroutines, mem.trace, checkpoints,
-- GC steps and mode changes), and runs it directly: the tree is interpreted, no source is made.
-- All randomness is drawn while generating, from a PRNG of its own.
--
-- After every step, at top level: no scope is active in the main thread; live_bytes ==
-- collectgarbage("count") * 1024; every kept object is intact (fields, checksums, upvalues, a
-- generator's next value) and a kept table is still in the arena it was made in; no ended arena
-- with no live block is listed; mem.stats()'s arena totals equal the sums over mem.arenas(); the
-- running arenas are those of the arena scopes still open (a model of the scopes says which).
-- Every 20 steps everything is dropped and settled: then mem.settle() must have collected a
-- dropped table, and (5.3, 5.4) no arena is pinned. Inside the program: mem.current() against
-- the model (which follows resumes, yields and the scopes coroutines inherit), exact counts,
-- budgets (on_exit and scope:stats() samples), arena scopes not credited with frees of blocks
-- they did not make, a new table placed in the expected arena, scope results, coroutine errors
-- (only memory errors under a budget, or a yield across pcall/fail_after, are expected).
--
-- Pure Lua, for LuaJIT and Lua 5.1 to 5.5. From the repository root:
--
--   lua5.4 tests/fuzz/fuzz.lua --seed 17              runs seed 17 (finds .luarocks/<interp>)
--   lua5.4 tests/fuzz/fuzz.lua --seed 1 --count 50    seeds 1..50 in one process
--   lua5.4 tests/fuzz/fuzz.lua --seed 17 --print      prints the program, runs nothing
--   lua5.4 tests/fuzz/fuzz.lua --seed 17 --minimize   shrinks a failing seed to what it needs
--
-- Options: --steps N (steps per seed, default 60), --only 3,7 (run only these steps), --skip
-- 12,40 (skip these operations, by the number printed before each), --verbose (print each step
-- as it runs), --machine (the line protocol of scripts/fuzz.sh: "begin S", "ok S", "FAIL ...",
-- "done"). The first failure ends the run (exit status 1): the module may be in a bad state.
-- A failure replays with the same command line: other arguments, output or seeds run before it
-- change what is allocated before it, and with that when the collector runs. On LuaJIT the
-- compiler picks hot code by address, so a replay may differ now and then (`luajit -joff`
-- replays exactly). scripts/fuzz.sh runs it for N seeds on every interpreter.

-- Arguments ------------------------------------------------------------------------------------

local USAGE = "usage: fuzz.lua [--seed S] [--count K] [--steps N] [--only 1,2] [--skip 5,9] " ..
  "[--print] [--verbose] [--machine] [--minimize]"

local opts = { seed = 1, count = 1, steps = 60, only = nil, skip = {}, print = false,
  verbose = false, machine = false, minimize = false }

local function number_list(s)
  local out = {}
  for n in s:gmatch("%d+") do out[#out + 1] = tonumber(n) end
  return out
end

do
  local i = 1
  while arg and arg[i] do
    local a = arg[i]
    local function value()
      i = i + 1
      if arg[i] == nil then error("fuzz.lua: " .. a .. " needs a value\n" .. USAGE, 0) end
      return arg[i]
    end
    if a == "--seed" then opts.seed = math.floor(assert(tonumber(value()), "--seed: a number"))
    elseif a == "--count" then opts.count = math.floor(assert(tonumber(value()), "--count: a number"))
    elseif a == "--steps" then opts.steps = math.floor(assert(tonumber(value()), "--steps: a number"))
    elseif a == "--only" then
      opts.only = {}
      for _, n in ipairs(number_list(value())) do opts.only[n] = true end
    elseif a == "--skip" then
      for _, n in ipairs(number_list(value())) do opts.skip[n] = true end
    elseif a == "--print" then opts.print = true
    elseif a == "--verbose" then opts.verbose = true
    elseif a == "--machine" then opts.machine = true
    elseif a == "--minimize" then opts.minimize = true
    elseif a == "--help" or a == "-h" then print(USAGE) os.exit(0)
    else error("fuzz.lua: unknown argument " .. a .. "\n" .. USAGE, 0) end
    i = i + 1
  end
end

-- The module: as installed (LUA_PATH/LUA_CPATH), else from the repository's own tree that
-- scripts/rock.sh fills (.luarocks/<interpreter>), found from this script's path.
local SCRIPT = (arg and arg[0]) or "tests/fuzz/fuzz.lua"
local INTERP_NAME = rawget(_G, "jit") and "luajit" or ("lua" .. _VERSION:match("%d+%.%d+"))
local found, mem = pcall(require, "lunet.mem")
if not found then
  local root = (SCRIPT:match("^(.*)/[^/]*$") or ".") .. "/../.."
  local ver = _VERSION:match("%d+%.%d+")
  local tree = root .. "/.luarocks/" .. INTERP_NAME
  package.path = tree .. "/share/lua/" .. ver .. "/?.lua;" .. package.path
  package.cpath = tree .. "/lib/lua/" .. ver .. "/?.so;" .. package.cpath
  mem = require "lunet.mem"
end

-- The model says which scopes have an arena of their own (and so where each new table goes,
-- and which frees an arena scope is credited with): placement that gives up on routes whose
-- arenas are pinned (src/arena/routes.rs, spec/19) would run some arena scopes without one.
mem.adaptive_arenas(false)

local VERSION = mem.lua -- "luajit", "lua51", ..., "lua55"
local IS_JIT = rawget(_G, "jit") ~= nil
-- LuaJIT 2.1 betas: no allocation is refused where it happens (their out-of-memory paths crash);
-- a budget admits it and the scope fails at the next instruction the interpreter runs in it,
-- or when it closes inside a finalizer (README, "Budgets on LuaJIT"). Its kept bytes can then
-- be over the limit between the two: the sampled budget checks do not apply there.
local OOM_DEFERRED = IS_JIT and tostring(rawget(jit, "version")):match("%-beta") ~= nil
local LUA51 = VERSION == "lua51" -- no yield across pcall or mem.scope
local HAS_CLOSE = coroutine.close ~= nil
local HAS_GEN_MODE = VERSION == "lua54" or VERSION == "lua55"
-- 5.2+ tells an object from another block (type tags): an arena is pinned only by objects. On 5.1
-- and LuaJIT a long-lived table's part that grew in a request can pin one (README, Limits).
local EXACT_PINNING = VERSION == "lua52" or VERSION == "lua53" or VERSION == "lua54" or VERSION == "lua55"
local newproxy = rawget(_G, "newproxy")
local unpack = rawget(table, "unpack") or rawget(_G, "unpack")

local co_create, co_status, co_yield, co_running = coroutine.create, coroutine.status,
  coroutine.yield, coroutine.running
local floor, format, concat = math.floor, string.format, table.concat

-- A deterministic random stream of its own (math.random's state is not touched): the "minimal
-- standard" LCG, x * 48271 mod 2^31 - 1, exact in 5.1's doubles and 5.3+'s integers alike.
local function new_rng(seed)
  local M = 2147483647
  local x = (seed * 7919 + 12345) % (M - 1) + 1
  local function nxt()
    x = (x * 48271) % M
    return x
  end
  for _ = 1, 12 do nxt() end
  local r = {}
  function r.raw() return nxt() end
  function r.range(a, b) return a + nxt() % (b - a + 1) end
  function r.chance(pct) return nxt() % 100 < pct end
  function r.pick(list) return list[nxt() % #list + 1] end
  -- `weights`: { {name, weight}, ... }
  function r.choose(weights)
    local total = 0
    for i = 1, #weights do total = total + weights[i][2] end
    local k = nxt() % total + 1
    for i = 1, #weights do
      k = k - weights[i][2]
      if k <= 0 then return weights[i][1] end
    end
  end
  return r
end

-- Program generation ---------------------------------------------------------------------------
-- All randomness is drawn here: running a program draws none, so skipping an operation
-- (--skip) or a step (--only) changes nothing else.

local MAX_DEPTH = 4
local RELEASE_EVERY = 20 -- a release step (drop everything, settle, check arenas) every N steps

local uid -- numbers the operations of a program, in generation order

local function new_node(t)
  uid = uid + 1
  t.uid = uid
  return t
end

-- g: where the generated code will run (static context).
--   depth, in_co (a coroutine body), in_fin (a finalizer), fin_depth, guarded (a budget or
--   fail_after is open around it in the same body), nonyield (a yield here would cross pcall
--   on 5.1, or fail_after's C call).
local function sub(g, changes)
  local out = {}
  for k, v in pairs(g) do out[k] = v end
  for k, v in pairs(changes) do out[k] = v end
  return out
end

local gen_block

local function gen_limit(r)
  local kind = r.choose { { "tiny", 4 }, { "small", 3 }, { "medium", 3 }, { "large", 2 } }
  if kind == "tiny" then return r.range(0, 512) end
  if kind == "small" then return r.range(513, 8192) end
  if kind == "medium" then return r.range(8193, 131072) end
  return r.range(131073, 4194304)
end

local function bools(r, n, pct)
  local out = {}
  for i = 1, n do out[i] = r.chance(pct) end
  return out
end

local function raws(r, n)
  local out = {}
  for i = 1, n do out[i] = r.raw() end
  return out
end

local ALLOC_KINDS = { { "table", 8 }, { "string", 6 }, { "closure", 4 }, { "userdata", 3 },
  { "big", 1 }, { "bigstring", 1 } }

local function gen_op(r, g)
  local can_nest = g.depth < MAX_DEPTH
  local op = r.choose {
    -- (no drop in a finalizer: it could run in the middle of a walk over the kept objects)
    { "alloc", 12 }, { "churn", 4 }, { "drop", g.in_fin and 0 or (g.depth == 0 and 8 or 2) },
    { "scope", can_nest and 16 or 0 },
    { "fail_after", can_nest and 4 or 0 },
    { "co", (can_nest and not g.in_fin) and 11 or 0 },
    { "resume", 8 },
    { "close", (HAS_CLOSE and not g.in_fin) and 3 or 0 },
    { "yield", g.in_co and (g.nonyield and 1 or 14) or 0 },
    { "exhaust", g.guarded and 6 or 0 },
    { "check", 6 },
    { "finz", g.fin_depth < 2 and 5 or 0 },
    { "gen", 2 },
    { "trace", g.in_fin and 0 or 4 },
    { "gc", g.in_fin and 0 or 5 },
    { "checkpoint", g.in_fin and 0 or 2 },
    { "delta", 2 },
    { "settle", g.in_fin and 0 or 1 },
    { "arenas", 2 },
  }
  local n = new_node { op = op }
  if op == "alloc" then
    n.kind = r.choose(ALLOC_KINDS)
    n.n = (n.kind == "big" or n.kind == "bigstring") and 1 or r.range(1, 6)
    n.size = r.range(0, 48)
    n.len = r.chance(25) and r.range(400, 700) or r.range(1, 120)
    n.keeps = bools(r, n.n, r.pick { 0, 30, 70, 100 })
  elseif op == "churn" then
    n.n = r.range(10, 400)
  elseif op == "drop" then
    n.picks = raws(r, r.range(1, 10))
  elseif op == "scope" then
    n.form = r.choose { { "name", 3 }, { "opts", 7 }, { "fn", 1 } }
    n.shared_fn = r.chance(50)
    if n.form == "opts" then
      n.named = r.chance(85)
      n.arena = false
      if r.chance(55) then
        n.arena = r.chance(20) and r.pick { 1, 4096, 65536, 1048576 } or true
      end
      n.limit = r.chance(40) and gen_limit(r) or false
      n.on_exit = n.limit ~= false or n.arena ~= false or r.chance(30)
    end
    local guarded = g.guarded or (n.form == "opts" and n.limit ~= false)
    n.body = gen_block(r, sub(g, { depth = g.depth + 1, guarded = guarded,
      nonyield = g.nonyield or LUA51 }))
  elseif op == "fail_after" then
    n.n = r.chance(30) and r.range(0, 10) or r.range(11, 400)
    n.body = gen_block(r, sub(g, { depth = g.depth + 1, guarded = true, nonyield = true }))
  elseif op == "co" then
    n.wrap = r.chance(30)
    n.resumes = r.range(0, 4)
    n.fate = r.choose { { "pool", 9 }, { "abandon", 4 }, { "finish", 4 },
      { "close", HAS_CLOSE and 3 or 0 } }
    n.body = gen_block(r, sub(g, { depth = g.depth + 1, in_co = true, guarded = false,
      nonyield = false }))
  elseif op == "resume" then
    n.pick = r.raw()
    n.times = r.range(1, 3)
  elseif op == "close" then
    n.pick = r.raw()
  elseif op == "exhaust" then
    n.kind = r.pick { "tables", "strings", "grow" }
  elseif op == "check" then
    n.pick = r.raw()
  elseif op == "finz" then
    n.n = r.range(1, 4)
    n.keeps = bools(r, n.n, r.pick { 0, 30, 70 })
    n.resurrect = r.chance(25)
    n.fin = gen_block(r, sub(g, { depth = math.max(g.depth, MAX_DEPTH - 2), in_fin = true,
      fin_depth = g.fin_depth + 1, in_co = false, guarded = false, nonyield = true }))
  elseif op == "gen" then
    n.keep = r.chance(80)
  elseif op == "trace" then
    n.what = r.choose { { "start", 3 }, { "sampled", 2 }, { "stop", 4 }, { "snapshot", 4 } }
    n.depth = r.chance(50) and r.range(1, 16) or false
    n.sample = r.pick { 1, 64, 512, 4096, 65536 }
  elseif op == "gc" then
    n.what = r.choose { { "step", 4 }, { "collect", 3 }, { "count", 1 },
      { "generational", HAS_GEN_MODE and 2 or 0 }, { "incremental", HAS_GEN_MODE and 2 or 0 } }
    n.k = r.pick { 0, 1, 4, 32 }
  elseif op == "checkpoint" then
    n.collect = r.chance(50)
    n.neutral = r.chance(15)
  elseif op == "delta" then
    n.pick = r.raw()
  end
  return n
end

function gen_block(r, g)
  local out = {}
  local count = r.range(1, g.depth <= 1 and 5 or 3)
  for i = 1, count do out[i] = gen_op(r, g) end
  return out
end

local TOP = { depth = 0, in_co = false, in_fin = false, fin_depth = 0, guarded = false,
  nonyield = false }

-- A program: GC settings, then the steps (one operation each, most of them trees), with a
-- release step every RELEASE_EVERY steps and at the end.
local function generate(seed, steps)
  local r = new_rng(seed)
  uid = 0
  local prog = { seed = seed, steps = {} }
  prog.gc_mode = HAS_GEN_MODE and r.pick { "incremental", "generational" } or "incremental"
  prog.pause = r.pick { 50, 100, 200 }
  prog.stepmul = r.pick { 100, 200, 400 }
  for i = 1, steps do
    if i % RELEASE_EVERY == 0 or i == steps then
      prog.steps[i] = new_node { op = "release" }
    else
      prog.steps[i] = gen_op(r, TOP)
    end
  end
  return prog
end

-- One line per operation tree: "uid:op{options}[body]".
local describe_block
local function describe(n)
  local op, s = n.op, nil -- luacheck: ignore 311
  if op == "alloc" then
    local kept = 0
    for i = 1, #n.keeps do if n.keeps[i] then kept = kept + 1 end end
    s = format("alloc(%s x%d keep %d", n.kind, n.n, kept)
    if n.kind == "table" then s = s .. format(" size %d", n.size) end
    if n.kind == "string" then s = s .. format(" len %d", n.len) end
    s = s .. ")"
  elseif op == "churn" then s = format("churn(%d)", n.n)
  elseif op == "drop" then s = format("drop(%d)", #n.picks)
  elseif op == "scope" then
    local parts = { n.form }
    if n.form == "opts" then
      if not n.named then parts[#parts + 1] = "anonymous" end
      if n.arena == true then parts[#parts + 1] = "arena"
      elseif n.arena then parts[#parts + 1] = "arena=" .. n.arena end
      if n.limit then parts[#parts + 1] = "limit=" .. n.limit end
      if n.on_exit then parts[#parts + 1] = "on_exit" end
    end
    if n.shared_fn then parts[#parts + 1] = "shared fn" end
    s = "scope{" .. concat(parts, ",") .. "}"
  elseif op == "fail_after" then s = format("fail_after(%d)", n.n)
  elseif op == "co" then
    s = format("co{%s,resumes=%d,%s}", n.wrap and "wrap" or "create", n.resumes, n.fate)
  elseif op == "resume" then s = format("resume(x%d)", n.times)
  elseif op == "exhaust" then s = "exhaust(" .. n.kind .. ")"
  elseif op == "finz" then
    s = format("finz(x%d%s)", n.n, n.resurrect and " resurrect" or "")
  elseif op == "gen" then s = n.keep and "gen(keep)" or "gen"
  elseif op == "trace" then
    s = "trace." .. n.what
    if n.what == "sampled" then s = s .. "(" .. n.sample .. ")" end
  elseif op == "gc" then s = "gc." .. n.what
  elseif op == "checkpoint" then
    s = "checkpoint" .. (n.collect and "" or "{collect=false}") .. (n.neutral and "+is_neutral" or "")
  else s = op end
  s = n.uid .. ":" .. s
  if n.body then s = s .. "[" .. describe_block(n.body) .. "]" end
  if n.fin then s = s .. " __gc[" .. describe_block(n.fin) .. "]" end
  return s
end
function describe_block(b)
  local parts = {}
  for i = 1, #b do parts[i] = describe(b[i]) end
  return concat(parts, "; ")
end

-- Failures -----------------------------------------------------------------------------------
-- A check that fails notes the first failure without allocating (it may run inside an
-- exhausted budget or fail_after): a kind and raw values, formatted at top level.

local fail_kind, fail_a, fail_b, fail_c, fail_d, fail_uid = nil, nil, nil, nil, nil, nil
local current_uid = 0

local function note_failure(kind, a, b, c, d)
  if fail_kind then return end
  fail_kind, fail_a, fail_b, fail_c, fail_d, fail_uid = kind, a, b, c, d, current_uid
end

local MESSAGES = {
  open_at_top = "a scope is still active at top level (no scope open in the main thread): %s",
  current = "mem.current() is %s, expected %s",
  current_raised = "mem.current() raised: %s",
  exact = "live_bytes %s ~= collectgarbage('count') * 1024 = %s (%s)",
  object = "a kept %s (#%s) is damaged: %s",
  arena_ended_empty = "arena %s: its scope ended and it has no live block, but it is still listed",
  arena_running = "%s arenas are running, the model says %s",
  arena_pinned = "arena %s is pinned (live objects, age %s) after everything was released",
  arena_sums = "mem.stats() and mem.arenas() disagree: %s (stats %s, arenas %s)",
  budget = "scope %s: %s %s is over its limit %s",
  arena_credit = "arena scope %s: freed_bytes %s > allocated_bytes %s " ..
    "(frees of blocks it did not make counted for it)",
  not_closed = "on_exit of scope %s got stats with closed ~= true",
  results = "%s returned wrong results (%s)",
  step_error = "the step raised: %s",
  co_error = "a coroutine died with an unexpected error: %s",
  fin_error = "a finalizer raised: %s",
  trace = "mem.trace: %s (%s, %s)",
  status = "coroutine status %s, expected %s",
  arena_of = "a new table in %s is in arena %s",
  arena_lost = "a kept table is no longer in its arena %s (mem.arena_of says %s)",
  arena_missing = "the arena %s of the active scope is not listed as running",
  model = "fuzzer model: %s",
  settle = "%s",
  raised = "%s raised: %s",
}

local function failure_text()
  local fmt = MESSAGES[fail_kind] or (fail_kind .. ": %s %s %s")
  local _, count = fmt:gsub("%%s", "")
  local vals = { tostring(fail_a), tostring(fail_b), tostring(fail_c), tostring(fail_d) }
  return fail_kind .. ": " .. format(fmt, unpack(vals, 1, count))
end

-- Errors ---------------------------------------------------------------------------------------

-- (lauxlib reports a stack that cannot grow, for memory, as a stack overflow: luaL_checkstack,
-- called by string.byte, table.sort and the module's own C functions, says "stack overflow" or
-- "stack overflow (...)" when lua_checkstack fails, which it does when the allocation is refused:
-- seeds 880, 1811, 1821 on lua5.2 under used-up budgets. The programs here are never deep
-- enough to overflow for real; "C stack overflow", about C calls, is not that.)
local function is_oom(e)
  if type(e) ~= "string" then return false end
  if e:find("not enough memory", 1, true) then return true end
  return not e:find("C stack overflow", 1, true)
    and (e:find("stack overflow (", 1, true) ~= nil or e:sub(-14) == "stack overflow")
end
local function is_yield_error(e)
  return type(e) == "string" and e:find("attempt to yield across", 1, true) ~= nil
end

-- The model ------------------------------------------------------------------------------------
-- A scope record mirrors one mem.scope (or fail_after) call: its name, the scope it was opened
-- in (the active one then), its budget, whether it has an arena, and its state: "new" (not yet
-- open), "open", "closed", or "limbo" (open in a coroutine the fuzzer dropped or closed: it ends
-- when the collector frees the coroutine). A context is one thread's view: its stack of open
-- scope records and `base`, the scope it inherits from its last resumer.

local UNKNOWN = { name = "?" } -- a scope the model cannot know (a finalizer runs anywhere)
local NOSCOPE = false

local scope_seq, id_seq = 0, 0

local function new_rec(name, parent, limit, arena, fail)
  id_seq = id_seq + 1
  -- (the model's name for an anonymous scope is nil: any name will do)
  return { id = id_seq, name = name, parent = parent, limit = limit or false,
    guard = (limit and true) or fail or false, arena = arena or false, state = "new",
    handle = false }
end

local function new_ctx(kind)
  return { kind = kind, stack = { false, false, false, false, false, false, false, false },
    depth = 0, base = NOSCOPE, nonyield = 0, yield_may_fail = false, limbo_arenas = 0 }
end

local function effective(ctx)
  local d = ctx.depth
  if d > 0 then return ctx.stack[d] end
  return ctx.base
end

-- Whether an allocation can fail under `rec`: a budget or fail_after in it or the open scopes it
-- was opened in (the module walks them up to the first closed one).
local function guarded_chain(rec)
  while rec do
    if rec == UNKNOWN then return true end
    if rec.state == "closed" then return false end
    if rec.guard then return true end
    rec = rec.parent
  end
  return false
end

-- The arena new objects go to under `rec`: the name of the nearest own arena if that scope is
-- open, true for an open anonymous one, false for none, nil when unknown.
local function expected_arena(rec)
  while rec do
    if rec == UNKNOWN then return nil end
    if rec.arena then
      if rec.state == "open" then return rec.name or true end
      if rec.state == "limbo" then return nil end
      return false
    end
    rec = rec.parent
  end
  return false
end

-- World state (reset for each seed).
local main_ctx
local keep, pool, entries, limbo, cps
local open_arena_sure -- arena scope records "open" (in live, held contexts)
local trace_exact, last_snapshot
local fin_depth = 0 -- > 0 while a finalizer of ours runs (collections are not run from there)
local co_of = setmetatable({}, { __mode = "v" }) -- ctx -> its coroutine, while it lives
local KEEP_MAX = 160

local function keep_add(rec)
  local n = #keep
  if n < KEEP_MAX then keep[n + 1] = rec end
end

-- Opens `rec` in `ctx` (at the start of the scope's function).
local function open_rec(rec, ctx)
  local d = ctx.depth + 1
  ctx.stack[d] = rec -- (may fail on a new slot: then nothing changed)
  ctx.depth = d
  rec.state = "open"
  if rec.arena then open_arena_sure = open_arena_sure + 1 end
end

local function mark_closed(rec)
  if rec.state == "open" then
    rec.state = "closed"
    if rec.arena then open_arena_sure = open_arena_sure - 1 end
  end
  rec.handle = false
end

-- After the mem.scope call that `rec` mirrors returned (or raised): the scope is closed, and so
-- are the scopes still open above it in `ctx`, which the module closes with it. (On LuaJIT betas
-- an overdrawn budget raises its memory error at the next instruction the interpreter runs in
-- the scope: that can be one of an inner EXEC.scope between its mem.scope call and its own
-- close_rec.) Nothing here allocates (this runs after memory errors too).
local function close_rec(rec, ctx, depth)
  for i = ctx.depth, depth + 1, -1 do
    local above = ctx.stack[i]
    if above then mark_closed(above) end
    ctx.stack[i] = false
  end
  mark_closed(rec)
  ctx.depth = depth
end

-- A coroutine entry leaves the fuzzer's hands: the scopes still open in it stay open until the
-- collector frees the coroutine ("limbo"). The limbo list is grown first: if that fails,
-- nothing changed and the entry stays registered.
local function abandon(entry)
  if entry.abandoned then return end
  local ctx = entry.ctx
  local arenas = 0
  for i = 1, ctx.depth do
    local rec = ctx.stack[i]
    if rec.state == "open" and rec.arena then arenas = arenas + 1 end
  end
  if arenas > 0 then limbo[#limbo + 1] = ctx end
  for i = 1, ctx.depth do
    local rec = ctx.stack[i]
    if rec.state == "open" then
      rec.state = "limbo"
      if rec.arena then open_arena_sure = open_arena_sure - 1 end
    end
    rec.handle = false -- (a scope object keeps its scope open: only the coroutine may)
  end
  ctx.limbo_arenas = arenas
  entry.abandoned = true
  -- off the entries list (swap-remove: no allocation)
  local i, n = entry.index, #entries
  if entries[i] == entry then
    entries[i] = entries[n]
    entries[i].index = i
    entries[n] = nil
  end
end

local function pool_remove(i)
  local n = #pool
  pool[i] = pool[n]
  pool[n] = nil
end

-- Checks inside the program ------------------------------------------------------------------

local function current_name()
  local s = mem.current()
  if s == nil then return nil end
  return s.name
end

-- mem.current() against the model. Allocates (the scope object, its name): a memory error there
-- skips the check.
local function check_current(ctx)
  local want = effective(ctx)
  if want == UNKNOWN then return end
  local ok, got = pcall(current_name)
  if not ok then
    if not is_oom(got) then note_failure("current_raised", got) end
    return
  end
  if want == NOSCOPE then
    if got ~= nil then note_failure("current", got, "no scope") end
  elseif want.name == nil then
    if got == nil then note_failure("current", "no scope", "an anonymous scope") end
  elseif got ~= want.name then
    note_failure("current", got, want.name)
  end
end

-- live_bytes against the interpreter's count, read back to back (on LuaJIT with the compiler off
-- for this function: the trace recorder allocates for real between two reads; spec/helpers.lua).
-- (Lua 5.4 answers nil to collectgarbage("count") inside a finalizer: nothing to compare then.)
-- The collector is stopped around the two reads where it can be (5.2+): a call of a C function
-- may run a collection step before it starts (5.2 at every call, 5.3 and 5.4 when the stack
-- grows), which frees garbage, and runs finalizers, between the reads (seeds 1151 and 1960 on
-- lua5.2: live_bytes read 6 to 14 KB below the count taken just before). (Not when the program
-- stopped it, nor where "isrunning" is unknown: 5.1 and LuaJIT, which run no step there.)
-- (check_exact restarts it, also when mem.stats() raised for memory under a budget. The two reads
-- stay in this function's frame: a deeper call between them would grow the stack.)
local CAN_STOP = not IS_JIT and VERSION ~= "lua51"
local exact_stopped = false
local function exact()
  exact_stopped = CAN_STOP and collectgarbage("isrunning")
  if exact_stopped then collectgarbage("stop") end
  local count = collectgarbage("count")
  local live = mem.stats().live_bytes
  if count == nil then return true, live, nil end
  return live == count * 1024, live, count * 1024
end
if IS_JIT then jit.off(exact) end

local function check_exact(where)
  local ok, same, live, counted = pcall(exact)
  if exact_stopped then
    exact_stopped = false
    collectgarbage("restart")
  end
  if not ok then
    if not is_oom(same) then note_failure("raised", "mem.stats()", same) end
    return
  end
  if not same then note_failure("exact", live, counted, where) end
end

-- Budgets and arena attribution from a scope's stats (on_exit, or scope:stats() while open).
-- What a budget bounds: `kept_bytes` (the scope's own live blocks) where the module reports
-- it, else `net_bytes` (and its peak). LuaJIT admits the running thread's stack growth past the
-- limit (counted; the next allocation fails): there a budget holds only where an allocation
-- followed, such as the one of the stats table a sample gets (`sampled`), not at on_exit; and not
-- while a finalizer runs (a coroutine it resumes included), whose allocations a budget admits
-- uncharged (README), so that the growth stays past the limit (seeds 572, 1700, 2140 on
-- luajit-current: a pooled coroutine's limited scope resumed by a finalizer).
local function check_scope_stats(rec, s, sampled)
  if rec.limit then
    local kept = s.kept_bytes
    if kept then
      if (sampled and fin_depth == 0 or not IS_JIT) and not OOM_DEFERRED and kept > rec.limit then
        note_failure("budget", s.name, "kept_bytes", kept, rec.limit)
      end
    else
      if s.net_bytes > rec.limit then
        note_failure("budget", s.name, "net_bytes", s.net_bytes, rec.limit)
      end
      if s.peak_bytes > rec.limit then
        note_failure("budget", s.name, "peak_bytes", s.peak_bytes, rec.limit)
      end
    end
  end
  if rec.arena and s.freed_bytes > s.allocated_bytes then
    note_failure("arena_credit", s.name, s.freed_bytes, s.allocated_bytes)
  end
end

local function check_budgets(ctx)
  for i = 1, ctx.depth do
    local rec = ctx.stack[i]
    if rec and rec.handle and (rec.limit or rec.arena) then
      local ok, s = pcall(rec.handle.stats, rec.handle)
      if ok then
        if s.closed then note_failure("model", "an open scope's stats say closed") end
        check_scope_stats(rec, s, true)
      elseif not is_oom(s) then
        note_failure("raised", "scope:stats()", s)
      end
    end
  end
end

-- Kept objects -------------------------------------------------------------------------------

local PATTERN = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"

local function checksum(s)
  local n, sum = #s, 0
  local step = n > 4096 and floor(n / 997) or 1
  for i = 1, n, step do sum = (sum * 31 + s:byte(i)) % 1000000007 end
  return sum
end

local function new_id()
  id_seq = id_seq + 1
  return id_seq
end

local fin_gc -- the __gc of finalizable objects (defined with the interpreter)

local function make_object(kind, n, ctx)
  local id = new_id()
  if kind == "table" then
    local t = { id = id, tag = "fz", n = n.size, s = "t" .. id }
    for i = 1, n.size do t[i] = id * 31 + i end
    t.sub = { id, -id }
    local rec = { kind = "table", obj = t, id = id, n = n.size, arena = false }
    -- in the arena the model expects (nil: unknown here)
    local want = ctx and expected_arena(effective(ctx))
    if want ~= nil then
      local ok, got = pcall(mem.arena_of, t)
      if ok then
        if want == false then
          if got ~= nil then note_failure("arena_of", "no arena scope", got) end
        elseif got == nil then
          -- (LuaJIT places nothing in arenas while it records a trace)
          if not IS_JIT then note_failure("arena_of", want == true and "an arena" or want, "none") end
        elseif want ~= true and got ~= want then
          note_failure("arena_of", want, got)
        end
        rec.arena = got or false
      elseif not is_oom(got) then
        note_failure("raised", "mem.arena_of", got)
      end
    end
    return rec
  elseif kind == "string" or kind == "bigstring" then
    local len = kind == "bigstring" and 300000 or n.len
    local start = id % 40 + 1
    local unit = PATTERN:sub(start, start + 9)
    local s = unit:rep(floor(len / 10) + 1):sub(1, len) .. "#" .. id
    return { kind = "string", obj = s, id = id, len = #s, sum = checksum(s) }
  elseif kind == "closure" then
    local up = { id, "c" .. id }
    local f = function(x) return up[1] * 7 + x, up[2] end
    return { kind = "closure", obj = f, id = id }
  elseif kind == "userdata" then
    -- finalizable, with nothing to do when finalized
    if newproxy then
      local u = newproxy(true)
      local mt = getmetatable(u)
      mt.id, mt.tag, mt.__gc = id, "ud", fin_gc
      return { kind = "userdata", obj = u, id = id }
    end
    local o = setmetatable({ id = id, tag = "ud" }, { __gc = fin_gc, id = id })
    return { kind = "userdata", obj = o, id = id }
  elseif kind == "big" then
    -- over 256 KiB: never placed in an arena
    local t = {}
    for i = 1, 40000 do t[i] = i + id end
    return { kind = "big", obj = t, id = id, n = 40000 }
  end
  error("unknown kind " .. tostring(kind))
end

local function gen_body(id)
  local k = 0
  while true do
    k = k + 1
    local t = { id, k }
    co_yield(t[1] * 1000 + t[2])
  end
end

-- Returns true, or false and what is wrong. Allocates (top level, or under pcall).
local function verify(rec)
  local o, id = rec.obj, rec.id
  local kind = rec.kind
  if kind == "table" then
    if type(o) ~= "table" then return false, "not a table" end
    if o.id ~= id or o.tag ~= "fz" or o.n ~= rec.n then return false, "header fields" end
    if o.s ~= "t" .. id then return false, "string field" end
    if type(o.sub) ~= "table" or o.sub[1] ~= id or o.sub[2] ~= -id then return false, "sub-table" end
    for i = 1, rec.n do
      if o[i] ~= id * 31 + i then return false, "array item " .. i end
    end
    if rec.arena then
      local where = mem.arena_of(o)
      if where ~= rec.arena then
        note_failure("arena_lost", rec.arena, where)
        return false, "arena"
      end
    end
  elseif kind == "string" then
    if type(o) ~= "string" or #o ~= rec.len then return false, "length" end
    if checksum(o) ~= rec.sum then return false, "content" end
  elseif kind == "closure" then
    local a, b = o(3)
    if a ~= id * 7 + 3 or b ~= "c" .. id then return false, "upvalues" end
  elseif kind == "userdata" or kind == "finz" then
    local mt = getmetatable(o)
    if type(mt) ~= "table" or mt.id ~= id then return false, "metatable" end
    if type(o) == "table" and o.id ~= id then return false, "fields" end
  elseif kind == "big" then
    if #o ~= rec.n or o[1] ~= 1 + id or o[rec.n] ~= rec.n + id or o[20000] ~= 20000 + id then
      return false, "array"
    end
  elseif kind == "gen" then
    if co_status(o) ~= "suspended" then return false, "generator " .. co_status(o) end
    local ok, v = coroutine.resume(o)
    if not ok then return false, "generator raised " .. tostring(v) end
    if v ~= id * 1000 + rec.k then return false, "generator yielded " .. tostring(v) end
    rec.k = rec.k + 1
  end
  return true
end

-- The interpreter ----------------------------------------------------------------------------

local EXEC = {}
local skip = opts.skip

local function exec(block, ctx)
  for i = 1, #block do
    local n = block[i]
    if not skip[n.uid] then
      current_uid = n.uid
      EXEC[n.op](n, ctx)
    end
  end
end

-- The function a scope runs: registers the scope, checks it is the active one, runs the body.
local function scope_body(rec, n, ctx)
  open_rec(rec, ctx)
  if rec.guard or rec.arena then
    local ok, h = pcall(mem.current)
    if ok then rec.handle = h end
  end
  check_current(ctx)
  exec(n.body, ctx)
  check_budgets(ctx)
  return rec.id, nil, "r"
end

local function fresh_scope_fn(...) return scope_body(...) end

local function with_count(ok, ...)
  return ok, select("#", ...), ...
end

-- mem.scope(...) in a protected call, with the count of its results. The whole runs protected:
-- the call of `with_count` needs stack, whose growth a used-up budget or fail_after around
-- refuses after mem.scope returned, and EXEC.scope must still close the scope's record then
-- (seeds 299, 820, 1531, 1578 on lua5.2 and 1522 on luajit: the model kept a closed arena
-- scope open).
local function scope_call(...)
  return with_count(pcall(mem.scope, ...))
end

local function make_on_exit(rec)
  return function(s)
    if s.closed ~= true then note_failure("not_closed", s.name) end
    check_scope_stats(rec, s)
  end
end

function EXEC.scope(n, ctx)
  scope_seq = scope_seq + 1
  local named = n.form == "name" or (n.form == "opts" and n.named)
  local name = named and ("s" .. scope_seq) or nil
  local arena = n.form == "opts" and n.arena ~= false
  local rec = new_rec(name, effective(ctx), n.form == "opts" and n.limit, arena, false)
  local depth, nonyield = ctx.depth, ctx.nonyield
  -- (the shared function's default name is computed once; a fresh closure's each time)
  local fn = n.shared_fn and scope_body or function(...) return fresh_scope_fn(...) end
  local done, ok, count, r1, r2, r3
  if LUA51 then ctx.nonyield = nonyield + 1 end
  if n.form == "name" then
    done, ok, count, r1, r2, r3 = pcall(scope_call, name, fn, rec, n, ctx)
  elseif n.form == "fn" then
    done, ok, count, r1, r2, r3 = pcall(scope_call, fn, rec, n, ctx)
  else
    local arena_opt = n.arena
    if type(arena_opt) == "number" then arena_opt = { chunk_size = arena_opt } end
    local o = { name = name, arena = arena_opt or nil, limit = n.limit or nil,
      on_exit = n.on_exit and make_on_exit(rec) or nil }
    done, ok, count, r1, r2, r3 = pcall(scope_call, o, fn, rec, n, ctx)
  end
  ctx.nonyield = nonyield
  close_rec(rec, ctx, depth)
  check_current(ctx)
  if not done then
    if is_oom(ok) then return end -- (the harness's own call, refused: see scope_call)
    error(ok, 0)
  end
  if ok then
    if count ~= 3 or r1 ~= rec.id or r2 ~= nil or r3 ~= "r" then
      note_failure("results", "mem.scope", count)
    end
    return
  end
  if rec.limit and is_oom(r1) then return end -- the budget ran out: the expected end
  error(r1, 0)
end

local function fail_body(rec, n, ctx)
  open_rec(rec, ctx)
  check_current(ctx)
  exec(n.body, ctx)
  return rec.id
end

function EXEC.fail_after(n, ctx)
  local rec = new_rec("fail_after", effective(ctx), false, false, true)
  local depth, nonyield = ctx.depth, ctx.nonyield
  ctx.nonyield = nonyield + 1 -- fail_after calls fn from C: no yield across it
  local called, ok, r1 = pcall(mem.fail_after, n.n, fail_body, rec, n, ctx)
  ctx.nonyield = nonyield
  close_rec(rec, ctx, depth)
  check_current(ctx)
  if not called then error(ok, 0) end -- raised by fail_after itself (an outer budget)
  if ok then
    if r1 ~= rec.id then note_failure("results", "mem.fail_after", r1) end
    return
  end
  if is_oom(r1) or (is_yield_error(r1) and ctx.yield_may_fail) then return end
  error(r1, 0)
end

function EXEC.alloc(n, ctx)
  for i = 1, n.n do
    local rec = make_object(n.kind, n, ctx)
    if n.keeps[i] then keep_add(rec) end
  end
end

function EXEC.churn(n)
  local t = {}
  for i = 1, n.n do
    if i % 3 == 0 then t[i % 50 + 1] = "g" .. i .. "-" .. current_uid
    else t[i % 50 + 1] = { i } end
  end
  return t -- (garbage: the caller drops it)
end

function EXEC.drop(n)
  for i = 1, #n.picks do
    local count = #keep
    if count == 0 then return end
    local at = n.picks[i] % count + 1
    keep[at] = keep[count]
    keep[count] = nil
  end
end

local EXHAUST = {
  tables = function()
    local t = {}
    for i = 1, 4000 do t[i] = { i } end
    return t
  end,
  strings = function()
    local t = {}
    for i = 1, 4000 do t[i] = ("x"):rep(40) .. i end
    return t
  end,
  grow = function()
    local t = {}
    for i = 1, 60000 do t[i] = i end
    return t
  end,
}

function EXEC.exhaust(n)
  local ok, err = pcall(EXHAUST[n.kind])
  if not ok and not is_oom(err) then error(err, 0) end
end

-- Finalizers -----------------------------------------------------------------------------------

local function run_finalizer(o, node, id, depth)
  fin_depth = depth + 1
  if node.resurrect then keep_add({ kind = "finz", obj = o, id = id }) end
  local ctx = new_ctx("fin")
  ctx.base = UNKNOWN
  exec(node.fin, ctx)
end

-- The __gc of every finalizable object: runs the operations of the `finz` node that made it,
-- in a context the model cannot know (any thread, any scope). Errors stay inside: a memory error
-- is expected when the collector runs under a budget.
function fin_gc(o)
  local mt = getmetatable(o)
  local node = type(mt) == "table" and mt.node
  if not node then return end
  local depth, uid_now = fin_depth, current_uid
  local ok, err = pcall(run_finalizer, o, node, mt.id, depth)
  fin_depth, current_uid = depth, uid_now
  -- (is_oom counts lauxlib's "stack overflow (...)" too: seeds 477 and 549 on lua5.2, a
  -- finalizer run inside a used-up budget, which 5.1 to 5.3 refuse)
  if not ok and not is_oom(err) then note_failure("fin_error", err) end
end

function EXEC.finz(n)
  for i = 1, n.n do
    local id = new_id()
    local o
    if newproxy then
      o = newproxy(true)
      local mt = getmetatable(o)
      mt.id, mt.tag, mt.node, mt.__gc = id, "finz", n, fin_gc
    else
      o = setmetatable({ id = id, tag = "finz" }, { __gc = fin_gc, node = n, id = id })
    end
    if n.keeps[i] then keep_add({ kind = "finz", obj = o, id = id }) end
  end
end

function EXEC.gen(n)
  local id = new_id()
  local co = co_create(gen_body)
  local ok, v = coroutine.resume(co, id)
  if ok then
    if v ~= id * 1000 + 1 then note_failure("results", "a generator", v) end
    if n.keep then keep_add({ kind = "gen", obj = co, id = id, k = 2 }) end
  elseif not is_oom(v) then
    note_failure("co_error", v)
  end
end

-- Coroutines -----------------------------------------------------------------------------------

local DONE = "co-done"

local function co_main(entry)
  local ctx = entry.ctx
  if entry.wrap then co_of[ctx] = co_running() end
  exec(entry.body, ctx)
  if ctx.depth ~= 0 then note_failure("model", "a coroutine ended with scopes in the model") end
  return DONE
end

-- Resumes `entry` from the context `rctx`, if it can be resumed.
local function resume_entry(entry, rctx)
  local state = entry.state
  if state ~= "fresh" and state ~= "suspended" then return end
  -- (an entry given up is no longer the fuzzer's to resume, though a finalizer may still find
  -- it in the pool for a moment: release_all abandons the entries before it empties the pool,
  -- and pool_add abandons the oldest before removing it; resumed, its scopes would be open in
  -- the model for good, while the module ends them with the coroutine)
  if entry.abandoned then return end
  local cctx = entry.ctx
  cctx.base = effective(rctx)
  -- what may make the coroutine's allocations fail during this resume: the scopes it runs in,
  -- and once it has closed them, the resumer's
  local guarded = guarded_chain(effective(cctx)) or guarded_chain(cctx.base)
  entry.state = "running"
  local ok, v
  if entry.co then
    if co_status(entry.co) ~= "suspended" then
      note_failure("status", co_status(entry.co), "suspended")
      entry.state = "broken"
      return
    end
    ok, v = coroutine.resume(entry.co, entry)
  else
    ok, v = pcall(entry.fn, entry)
  end
  if ok then
    entry.state = v == DONE and "dead" or "suspended"
    if entry.co and (co_status(entry.co) == "dead") ~= (v == DONE) then
      note_failure("status", co_status(entry.co), v == DONE and "dead" or "suspended")
    end
  else
    if entry.co then
      entry.state = co_status(entry.co) == "dead" and "dead" or "suspended"
    else
      entry.state = "broken" -- (a wrapped coroutine's state cannot be read)
    end
    local accepted = false
    if is_oom(v) or v == "too many arguments to resume" then
      accepted = guarded
    elseif is_yield_error(v) then
      accepted = cctx.yield_may_fail
    end
    if not accepted then note_failure("co_error", v) end
  end
  check_current(rctx)
end

local function new_entry(n)
  local ctx = new_ctx("co")
  return { ctx = ctx, body = n.body, wrap = n.wrap, state = "fresh", abandoned = false,
    index = 0, co = false, fn = false }
end

local function register(entry)
  local i = #entries + 1
  entry.index = i
  entries[i] = entry
end

local function pool_add(entry)
  if #pool >= 8 then
    abandon(pool[1])
    pool_remove(1)
  end
  pool[#pool + 1] = entry
end

function EXEC.co(n, ctx)
  local entry = new_entry(n)
  if n.wrap then
    entry.fn = coroutine.wrap(co_main)
  else
    entry.co = co_create(co_main)
    co_of[entry.ctx] = entry.co
  end
  register(entry)
  for _ = 1, n.resumes do
    resume_entry(entry, ctx)
  end
  local fate = n.fate
  if fate == "finish" then
    for _ = 1, 30 do
      if entry.state ~= "fresh" and entry.state ~= "suspended" then break end
      resume_entry(entry, ctx)
    end
    fate = "pool"
  end
  if fate == "close" and entry.co and entry.state ~= "running" then
    local ok, err = pcall(coroutine.close, entry.co)
    if not ok and not is_oom(err) then note_failure("raised", "coroutine.close", err) end
    entry.state = "dead"
    check_current(ctx)
    abandon(entry)
  elseif fate == "abandon" or fate == "close" then
    abandon(entry)
  elseif entry.state == "fresh" or entry.state == "suspended" then
    pool_add(entry)
  elseif entry.ctx.depth == 0 then
    abandon(entry)
  end
end

function EXEC.resume(n, ctx)
  for _ = 1, n.times do
    local count = #pool
    if count == 0 then return end
    local at = n.pick % count + 1
    local entry = pool[at]
    resume_entry(entry, ctx)
    if entry.state == "dead" or entry.state == "broken" then
      -- (look again: the resume may have changed the pool)
      for i = 1, #pool do
        if pool[i] == entry then
          pool_remove(i)
          break
        end
      end
      abandon(entry)
    end
  end
end

function EXEC.close(n, ctx)
  local count = #pool
  if count == 0 then return end
  local at = n.pick % count + 1
  local entry = pool[at]
  if not entry.co or entry.state == "running" then return end
  local ok, err = pcall(coroutine.close, entry.co)
  if not ok and not is_oom(err) then note_failure("raised", "coroutine.close", err) end
  entry.state = "dead"
  pool_remove(at)
  abandon(entry)
  check_current(ctx)
end

function EXEC.yield(_, ctx)
  if ctx.kind ~= "co" then return end
  if ctx.nonyield > 0 then ctx.yield_may_fail = true end
  co_yield("y")
  check_current(ctx)
end

-- Tracing, checkpoints, collections ----------------------------------------------------------

local function snapshot_check()
  local tracing = mem.trace.is_tracing()
  local snap = mem.trace.snapshot()
  local live = mem.stats().live_bytes
  collectgarbage("restart")
  if tracing ~= (snap ~= nil) then
    note_failure("trace", "snapshot() disagrees with is_tracing()", tracing, snap)
    return
  end
  if not snap then return end
  local rows = snap:top()
  local sum = 0
  for i = 1, #rows do
    if i > 1 and rows[i].bytes > rows[i - 1].bytes then
      note_failure("trace", "top() is not sorted", rows[i - 1].bytes, rows[i].bytes)
    end
    sum = sum + rows[i].bytes
  end
  if trace_exact and sum > live then
    note_failure("trace", "exact snapshot holds more than live_bytes", sum, live)
  end
  if last_snapshot then snap:compare(last_snapshot) end
  last_snapshot = snap
end

function EXEC.trace(n)
  if fin_depth > 0 then return end
  local what = n.what
  if what == "start" or what == "sampled" then
    local before = mem.trace.is_tracing()
    local o
    if what == "sampled" then o = { sample_bytes = n.sample, depth = n.depth or nil }
    elseif n.depth then o = { depth = n.depth } end
    local ok, started = pcall(mem.trace.start, o)
    if not ok then
      if not is_oom(started) then error(started, 0) end
      return
    end
    if started ~= not before then
      note_failure("trace", "start() returned (and tracing before)", started, before)
    end
    if started then trace_exact = what == "start" end
    if not mem.trace.is_tracing() then note_failure("trace", "not tracing after start()", "", "") end
  elseif what == "stop" then
    mem.trace.stop()
    if mem.trace.is_tracing() then note_failure("trace", "still tracing after stop()", "", "") end
  else
    -- (the collector stopped: the snapshot and live_bytes are read at one point)
    collectgarbage("stop")
    local ok, err = pcall(snapshot_check)
    collectgarbage("restart")
    if not ok then
      if not is_oom(err) then error(err, 0) end
    end
  end
end

function EXEC.gc(n)
  if fin_depth > 0 then return end
  local what = n.what
  if what == "step" then collectgarbage("step", n.k)
  elseif what == "collect" then collectgarbage()
  elseif what == "count" then collectgarbage("count")
  else collectgarbage(what) end
end

function EXEC.checkpoint(n)
  if fin_depth > 0 then return end
  local cp = n.collect and mem.checkpoint() or mem.checkpoint { collect = false }
  cps[n.uid % 4 + 1] = cp
  local d = cp:delta()
  if type(d) ~= "table" or type(d.bytes) ~= "number" or type(d.blocks) ~= "number" then
    note_failure("results", "cp:delta()", d)
  end
  if n.neutral then cp:is_neutral() end
end

function EXEC.delta(n)
  local cp = cps[n.pick % 4 + 1]
  if not cp then return end
  local d = cp:delta()
  if type(d) ~= "table" or type(d.bytes) ~= "number" or d.bytes ~= floor(d.bytes) then
    note_failure("results", "cp:delta()", d and d.bytes)
  end
end

function EXEC.settle()
  if fin_depth > 0 then return end
  mem.settle()
end

-- The arena of the innermost arena scope is listed, running.
function EXEC.arenas(_, ctx)
  local want = expected_arena(effective(ctx))
  local ok, list = pcall(mem.arenas)
  if not ok then
    if not is_oom(list) then note_failure("raised", "mem.arenas()", list) end
    return
  end
  if type(want) ~= "string" then return end
  for i = 1, #list do
    if list[i].name == want then
      if not list[i].running then note_failure("arena_missing", want) end
      return
    end
  end
  note_failure("arena_missing", want)
end

function EXEC.check(n, ctx)
  check_current(ctx)
  check_exact("inside a step")
  check_budgets(ctx)
  local count = #keep
  if count > 0 then
    local rec = keep[n.pick % count + 1]
    if rec and rec.kind ~= "gen" then
      local ok, good, why = pcall(verify, rec)
      if ok and not good then note_failure("object", rec.kind, rec.id, why)
      elseif not ok and not is_oom(good) then note_failure("raised", "verify", good) end
    end
  end
end

-- Release: drop everything, settle, and check the arenas -------------------------------------

-- Overwrites dead stack slots below the running frame with nil: a value left there by a function
-- that returned is still seen by the collector (it marks whole frames) and would keep a dropped
-- coroutine or object alive.
-- luacheck: push ignore 221
local function scrub(level)
  local a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
    a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33, a34, a35, a36, a37, a38, a39,
    a40, a41, a42, a43, a44, a45, a46, a47, a48, a49, a50, a51, a52, a53, a54, a55, a56, a57, a58,
    a59, a60, a61, a62, a63, a64, a65, a66, a67, a68, a69, a70, a71, a72, a73, a74, a75, a76, a77,
    a78, a79, a80
  if level > 0 then scrub(level - 1) end
  return a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
    a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33, a34, a35, a36, a37, a38, a39,
    a40, a41, a42, a43, a44, a45, a46, a47, a48, a49, a50, a51, a52, a53, a54, a55, a56, a57, a58,
    a59, a60, a61, a62, a63, a64, a65, a66, a67, a68, a69, a70, a71, a72, a73, a74, a75, a76, a77,
    a78, a79, a80
end
-- luacheck: pop

-- Limbo contexts whose coroutine the collector freed: their scopes ended with it. Valid after a
-- full settle (the module ends a collected coroutine's scopes in a finalizer of the same cycle).
local function resolve_limbo()
  local kept_ctx = {}
  for i = 1, #limbo do
    local ctx = limbo[i]
    if co_of[ctx] ~= nil then kept_ctx[#kept_ctx + 1] = ctx end
  end
  limbo = kept_ctx
end

local function limbo_arenas()
  local n = 0
  for i = 1, #limbo do n = n + limbo[i].limbo_arenas end
  return n
end

-- The arenas against stats and the model, with the collector stopped (so that nothing is freed
-- between the readings).
local function check_arenas(released)
  collectgarbage("stop")
  local ok, err = pcall(function()
    local s = mem.stats()
    local list = mem.arenas()
    local running, live_bytes, live_blocks, reserved = 0, 0, 0, 0
    for i = 1, #list do
      local a = list[i]
      if a.running then
        running = running + 1
      elseif a.live_blocks == 0 then
        note_failure("arena_ended_empty", a.name)
      end
      -- (a coroutine still in limbo holds the fuzzer's context, made where it was created; an
      -- object a finalizer kept again after eight rounds of release is alive on purpose)
      if released and EXACT_PINNING and #limbo == 0 and #keep == 0 and a.pinned then
        note_failure("arena_pinned", a.name, a.age)
      end
      live_bytes = live_bytes + a.live_bytes
      live_blocks = live_blocks + a.live_blocks
      reserved = reserved + a.reserved_bytes
    end
    if s.arenas ~= #list then note_failure("arena_sums", "arenas", s.arenas, #list) end
    if s.arena_live_bytes ~= live_bytes then
      note_failure("arena_sums", "arena_live_bytes", s.arena_live_bytes, live_bytes)
    end
    if s.arena_live_blocks ~= live_blocks then
      note_failure("arena_sums", "arena_live_blocks", s.arena_live_blocks, live_blocks)
    end
    if s.arena_bytes ~= reserved then
      note_failure("arena_sums", "arena_bytes", s.arena_bytes, reserved)
    end
    local lo, hi = open_arena_sure, open_arena_sure + limbo_arenas()
    if running < lo or running > hi then
      note_failure("arena_running", running, lo == hi and tostring(lo) or (lo .. ".." .. hi))
    end
  end)
  collectgarbage("restart")
  if not ok then note_failure("raised", "the arena check", err) end
end

-- A table only a weak table refers to: mem.settle() must collect it.
local sentinel = setmetatable({}, { __mode = "k" })
local function arm_sentinel() sentinel[{}] = true end

local function release_all()
  -- First from this frame's lowest register: the frames of the checks that ran after the last
  -- step may have left a kept object in a register of this frame above it, where the calls in
  -- the loop below, made from higher registers, do not overwrite it. (The loop's collections
  -- then saw the object alive, and its finalizer kept it again at the last one: seed 2423.)
  scrub(40)
  for _ = 1, 8 do
    for i = #entries, 1, -1 do abandon(entries[i]) end
    keep, pool, entries, cps = {}, {}, {}, { false, false, false, false }
    last_snapshot = nil
    arm_sentinel()
    scrub(40)
    mem.settle()
    if next(sentinel) ~= nil then
      note_failure("settle", "mem.settle() returned without collecting garbage")
      sentinel = setmetatable({}, { __mode = "k" })
    end
    resolve_limbo()
    -- (finalizers run by the settle may have kept new objects)
    if #keep == 0 and #entries == 0 then
      -- what the limbo list held (contexts made in arenas) is garbage now too, and the
      -- finalizers its collection runs may keep objects again: then once more
      scrub(40)
      mem.settle()
      if #keep == 0 and #entries == 0 then break end
    end
  end
end

-- Running a seed -------------------------------------------------------------------------------

local function reset_world()
  main_ctx = new_ctx("main")
  keep, pool, entries, limbo, cps = {}, {}, {}, {}, { false, false, false, false }
  open_arena_sure = 0
  trace_exact, last_snapshot = false, nil
  fin_depth = 0
  scope_seq, id_seq = 0, 0
  fail_kind, fail_a, fail_b, fail_c, fail_d, fail_uid = nil, nil, nil, nil, nil, nil
end

local function set_gc(prog)
  if VERSION == "lua55" then -- (5.5 sets the parameters with "param")
    collectgarbage("param", "pause", prog.pause)
    collectgarbage("param", "stepmul", prog.stepmul)
    collectgarbage(prog.gc_mode)
  elseif HAS_GEN_MODE then
    collectgarbage("incremental", prog.pause, prog.stepmul)
    collectgarbage(prog.gc_mode)
  else
    collectgarbage("setpause", prog.pause)
    collectgarbage("setstepmul", prog.stepmul)
  end
end

local function reset_gc()
  if VERSION == "lua55" then
    collectgarbage("param", "pause", 200)
    collectgarbage("param", "stepmul", 100)
    collectgarbage("incremental")
  elseif HAS_GEN_MODE then
    collectgarbage("incremental", 200, 100)
  else
    collectgarbage("setpause", 200)
    collectgarbage("setstepmul", 200)
  end
end

-- The checks after every step, at top level; `released`: after a release step (everything
-- dropped, settled).
local function check_top(released)
  if main_ctx.depth ~= 0 then note_failure("model", "the main context has scopes after a step") end
  local cur = mem.current()
  if cur ~= nil then note_failure("open_at_top", cur.name) end
  check_exact("at top level")
  for i = 1, #keep do
    local rec = keep[i]
    local ok, why = true, nil
    if rec then ok, why = verify(rec) end
    if not ok then
      note_failure("object", rec.kind, rec.id, why)
      break
    end
  end
  if released then resolve_limbo() end
  check_arenas(released)
end

local function run_step(step)
  if step.op == "release" then
    release_all()
  else
    exec({ step }, main_ctx)
    -- dead coroutines leave the pool
    for i = #pool, 1, -1 do
      local e = pool[i]
      if e.state == "dead" or e.state == "broken" then
        pool_remove(i)
        abandon(e)
      end
    end
  end
end

-- Runs one seed; returns nil, or the failure report (lines).
local function run_seed(seed)
  local prog = generate(seed, opts.steps)
  reset_world()
  set_gc(prog)
  local report
  for i, step in ipairs(prog.steps) do
    if not opts.only or opts.only[i] then
      if opts.verbose then io.stderr:write(format("seed %d step %d: %s\n", seed, i, describe(step))) end
      current_uid = step.uid
      local ok, err = pcall(run_step, step)
      if not ok then note_failure("step_error", err) end
      if not fail_kind then
        local checked, cerr = pcall(check_top, step.op == "release")
        if not checked then note_failure("raised", "the top-level check", cerr) end
      end
      if fail_kind then
        local lines = {
          format("FAIL seed=%d step=%d (%s) %s", seed, i, INTERP_NAME, failure_text()),
          format("  at operation %s of step %d: %s", tostring(fail_uid), i,
            #describe(step) > 600 and describe(step):sub(1, 600) .. " ..." or describe(step)),
        }
        report = lines
        break
      end
    end
  end
  -- leave nothing behind for the next seed
  if not report then
    mem.trace.stop()
    release_all()
  end
  reset_gc()
  if HAS_GEN_MODE then collectgarbage("incremental") end
  return report
end

-- Minimizing -----------------------------------------------------------------------------------
-- Re-runs the seed in fresh processes with fewer steps (--only) and fewer operations (--skip),
-- keeping each cut that still fails the same way.

local function interpreter_command()
  local i = -1
  while arg[i - 1] do i = i - 1 end
  local parts = {}
  for k = i, -1 do parts[#parts + 1] = arg[k] end
  return concat(parts, " ")
end

-- This run's own command line.
local function command_line()
  local parts = { interpreter_command(), SCRIPT }
  for k = 1, #arg do parts[#parts + 1] = arg[k] end
  return concat(parts, " ")
end

local function run_child(seed, only, skipped)
  local cmd = format("timeout 120 %s %s --machine --seed %d --steps %d", interpreter_command(),
    SCRIPT, seed, opts.steps)
  if only then cmd = cmd .. " --only " .. concat(only, ",") end
  if skipped and #skipped > 0 then cmd = cmd .. " --skip " .. concat(skipped, ",") end
  local p = assert(io.popen(cmd .. " 2>&1; echo \"exit=$?\""))
  local out = p:read("*a")
  p:close()
  local kind = out:match("FAIL seed=%d+ step=%d+ %(%S+%) ([%w_]+):")
  if kind then return kind end
  local status = tonumber(out:match("exit=(%d+)%s*$"))
  if status ~= 0 then return "exit " .. tostring(status) end
  return nil
end

local function minimize(seed)
  io.stderr:write(format("minimizing seed %d on %s ...\n", seed, INTERP_NAME))
  local want = run_child(seed, nil, nil)
  if not want then
    print(format("seed %d passes on %s: nothing to minimize", seed, INTERP_NAME))
    return
  end
  io.stderr:write("failure: " .. want .. "\n")
  local prog = generate(seed, opts.steps)
  -- steps: removal of chunks, halving their size
  local steps = {}
  for i = 1, #prog.steps do steps[i] = i end
  local chunk = floor(#steps / 2)
  while chunk >= 1 do
    local i = 1
    while i <= #steps do
      local trial = {}
      for k = 1, #steps do
        if k < i or k >= i + chunk then trial[#trial + 1] = steps[k] end
      end
      if #trial > 0 and run_child(seed, trial, nil) == want then
        steps = trial
        io.stderr:write(format("  %d steps left\n", #steps))
      else
        i = i + chunk
      end
    end
    chunk = floor(chunk / 2)
  end
  -- operations of the steps left, biggest subtrees first (preorder: a parent before its children)
  local skipped = {}
  local function try_block(b)
    for i = 1, #b do
      local n = b[i]
      skipped[#skipped + 1] = n.uid
      if run_child(seed, steps, skipped) == want then
        io.stderr:write(format("  skipped operation %d\n", n.uid))
      else
        skipped[#skipped] = nil
        if n.body then try_block(n.body) end
        if n.fin then try_block(n.fin) end
      end
    end
  end
  for _, i in ipairs(steps) do
    local step = prog.steps[i]
    if step.body then try_block(step.body) end
    if step.fin then try_block(step.fin) end
  end
  local skipset = {}
  for _, u in ipairs(skipped) do skipset[u] = true end
  local function prune(b)
    local out = {}
    for _, n in ipairs(b) do
      if not skipset[n.uid] then
        local c = {}
        for k, v in pairs(n) do c[k] = v end
        if n.body then c.body = prune(n.body) end
        if n.fin then c.fin = prune(n.fin) end
        out[#out + 1] = c
      end
    end
    return out
  end
  print(format("seed %d on %s fails with %s; needs steps %s:", seed, INTERP_NAME, want,
    concat(steps, ",")))
  for _, i in ipairs(steps) do
    local kept = prune({ prog.steps[i] })
    print(format("  step %d: %s", i, kept[1] and describe(kept[1]) or "(skipped)"))
  end
  print(format("reproduce: %s %s --seed %d --steps %d --only %s%s", interpreter_command(), SCRIPT,
    seed, opts.steps, concat(steps, ","), #skipped > 0 and (" --skip " .. concat(skipped, ",")) or ""))
end

-- Main -----------------------------------------------------------------------------------------

if opts.print then
  for seed = opts.seed, opts.seed + opts.count - 1 do
    local prog = generate(seed, opts.steps)
    print(format("seed %d: gc %s pause %d stepmul %d", seed, prog.gc_mode, prog.pause, prog.stepmul))
    for i, step in ipairs(prog.steps) do print(format("  step %d: %s", i, describe(step))) end
  end
  os.exit(0)
end

if opts.minimize then
  minimize(opts.seed)
  os.exit(0)
end

-- Lua 5.3 and 5.4 make the metatable of luaL_Buffer's box lazily, the first time a buffer
-- outgrows the C stack (8 KiB on 5.3, 1 KiB on 5.4); made inside an arena scope it would pin that
-- arena for good (the VM's doing, not the module's). Made once here, as
-- spec/11-faults_spec.lua does.
local _ = concat({ ("x"):rep(20000), ("y"):rep(20000) })

local passed = 0
for seed = opts.seed, opts.seed + opts.count - 1 do
  if opts.machine then
    io.write("begin ", seed, "\n")
    io.flush()
  end
  local report = run_seed(seed)
  if report then
    for _, line in ipairs(report) do io.write(line, "\n") end
    -- (the same command replays it exactly: any other arguments, output or seed run before
    -- change what is allocated before the failure, and with it when the collector runs)
    io.write("  reproduce: ", command_line(), "\n")
    if seed > opts.seed then
      io.write(format("  (after seeds %d..%d; alone: --seed %d, which may differ)\n", opts.seed,
        seed - 1, seed))
    end
    io.flush()
    if not opts.machine then
      io.stderr:write(format("%s: %d passed, 1 failed (stopped at seed %d)\n", INTERP_NAME,
        passed, seed))
    end
    os.exit(1)
  end
  passed = passed + 1
  if opts.machine then
    io.write("ok ", seed, "\n")
    io.flush()
  elseif opts.count > 1 then
    io.stderr:write(format("\r%s: %d/%d", INTERP_NAME, passed, opts.count))
  end
end
if opts.machine then
  io.write("done\n")
else
  if opts.count > 1 then io.stderr:write("\n") end
  print(format("%s: %d passed, 0 failed (seeds %d..%d)", INTERP_NAME, passed, opts.seed,
    opts.seed + opts.count - 1))
end
