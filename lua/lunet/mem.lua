-- lunet.mem, the Lua half: argument checks, neutrality checks, scopes and the coroutine
-- wrappers. Compiled into the library (src/lib.rs) and run once per load with the C functions
-- of src/bindings/ as `core`. Returns the module table.
local core = ...

-- This file found on package.path (a source tree on LUA_PATH, as the specs run): `require` got
-- here before the library, which is the module; it is loaded from package.cpath and runs its
-- own compiled copy of this file.
if type(core) ~= "table" then
  local name = type(core) == "string" and core or "lunet.mem"
  local searchers = package.searchers or package.loaders
  local loader = searchers[3](name)
  if type(loader) ~= "function" then
    error(("module '%s' not found beside %s:%s"):format(name, select(2, ...) or "this file",
      tostring(loader)), 2)
  end
  return loader(name)
end

local collectgarbage, error, pcall, type, tostring, pairs, setmetatable, rawget, select =
  collectgarbage, error, pcall, type, tostring, pairs, setmetatable, rawget, select
-- `pairs(t)` under another name: LuaJIT specializes a loop over `pairs(t)` or `next, t`
-- (BC_ITERN), and on the 2.1 betas a trace of it that exits at its start re-enters itself
-- forever inside a __gc finalizer (LuaJIT issue #1000, fixed in 2023), where these loops run too.
local function fields(t) return pairs(t) end
local floor, format, concat = math.floor, string.format, table.concat
local getmetatable = (rawget(_G, "debug") and debug.getmetatable) or getmetatable
local getinfo = rawget(_G, "debug") and debug.getinfo
local jit = rawget(_G, "jit")
local jit_flush = type(jit) == "table" and jit.flush or nil
local jit_can_switch = core.jit_can_switch

local live = core.live
local VERSION = core.version()

local M = {
  _VERSION = "lunet.mem 0.1.0",
  lua = VERSION,
  stats = core.stats,
  reset_peak = core.reset_peak,
  current = core.current,
  arenas = core.arenas,
  arena_of = core.arena_of,
  adaptive_arenas = core.adaptive_arenas,
}

-- Errors -------------------------------------------------------------------------------------

local function typename(v)
  if type(v) == "userdata" then
    if core.is_checkpoint(v) then return "checkpoint" end
    if core.is_scope(v) then return "scope" end
  end
  return type(v)
end

-- Raises "bad argument #n to 'fname' (msg)" at `level` (1 = the caller of argerror).
local function argerror(n, fname, msg, level)
  error(format("bad argument #%d to '%s' (%s)", n, fname, msg), level + 1)
end

local function is_callable(v)
  if type(v) == "function" then return true end
  local mt = getmetatable(v)
  return type(mt) == "table" and rawget(mt, "__call") ~= nil
end

-- How an option's key is shown in an error (its own __tostring is not run: it may fail).
local function key_name(k)
  local tk = type(k)
  if tk == "string" or tk == "number" or tk == "boolean" then return tostring(k) end
  return core.address_name(k)
end

-- Option kinds: name -> check(value) returning nil when fine, else what was expected.
local MAX_COUNT = 100000
local MAX_CHUNK = 1024 * 1024
-- A range check names the value it got, a type check the type.
local function integer_in(lo, hi)
  return function(v)
    if type(v) ~= "number" or v ~= v or v < lo or v > hi or floor(v) ~= v then
      return format("integer from %d to %d", lo, hi), type(v) == "number"
    end
  end
end
local function of_type(t)
  return function(v)
    if type(v) ~= t then return t end
  end
end
local KINDS = {
  tolerance = integer_in(0, 2 ^ 53),
  warmup = integer_in(0, MAX_COUNT),
  runs = integer_in(1, MAX_COUNT),
  name = of_type("string"),
  on_exit = function(v)
    if not is_callable(v) then return "function" end
  end,
  collect = of_type("boolean"),
  holders = of_type("boolean"),
  limit = integer_in(0, 2 ^ 53),
  -- true, false, or { chunk_size = bytes }
  arena = function(v)
    if v == true or v == false then return nil end
    if type(v) ~= "table" then return "boolean or table" end
    for k, size in fields(v) do
      if k ~= "chunk_size" then
        return "table with only 'chunk_size'", format("field '%s'", key_name(k))
      end
      local expected, show_value = integer_in(1, MAX_CHUNK)(size)
      if expected then
        return "chunk_size " .. expected, show_value and tostring(size) or typename(size)
      end
    end
  end,
}

-- What core.scope_open gets for an `arena` option: nil for none, else the first chunk's size in
-- bytes (0: the default).
local function arena_arg(v)
  if v == true then return 0 end
  if type(v) == "table" then return v.chunk_size or 0 end
  return nil
end

-- Checks the options table at argument `n` of `fname`, allowing the keys in `allowed`.
local function check_opts(opts, n, fname, allowed, level)
  if opts == nil then return nil end
  if type(opts) ~= "table" then
    argerror(n, fname, "table expected, got " .. typename(opts), level + 1)
  end
  for k, v in fields(opts) do
    if not allowed[k] then
      argerror(n, fname, format("unknown option '%s'", key_name(k)), level + 1)
    end
    -- `got`: true to show the value, a string to show that, else the value's type is shown.
    local expected, got = KINDS[k](v)
    if expected then
      if type(got) ~= "string" then got = got and tostring(v) or typename(v) end
      argerror(n, fname, format("option '%s': %s expected, got %s", k, expected, got), level + 1)
    end
  end
  return opts
end

-- Measuring -------------------------------------------------------------------------------------

-- Collects until live memory stops changing (at least two full cycles, so that objects with
-- finalizers are finalized and then freed) and returns `live_bytes, net_blocks`.
-- On LuaJIT the compiled traces are flushed first: their memory belongs to the JIT, not to the
-- code measured. The running thread's stack is stretched first and shrunk by the collections
-- (see core.stretch); Lua 5.4 shrinks stacks only in incremental mode, so a generational
-- collector (lua.c's default) is switched to incremental for the collections and back.
local stretch = core.stretch
local keep_gc_ticking = core.keep_gc_ticking
local switch_mode = VERSION == "lua54" or VERSION == "lua55"
local settling = false
local function settle_now()
  settling = true
  keep_gc_ticking() -- (a GC cycle counter whose finalizer a budget refused: replaced)
  if jit_flush and jit_can_switch() then jit_flush() end
  local mode = switch_mode and collectgarbage("incremental")
  -- (inside a `__gc` finalizer 5.4 and 5.5 do not collect, "isrunning" answers fail there: a
  -- stack stretched then stays stretched, and a reading a few slots deeper finds it doubled)
  if not switch_mode or collectgarbage("isrunning") ~= nil then stretch() end
  collectgarbage("collect")
  local bytes, blocks = live()
  for _ = 1, 32 do
    collectgarbage("collect")
    local b, k = live()
    if b == bytes and k == blocks then break end
    bytes, blocks = b, k
  end
  if mode == "generational" then
    collectgarbage("generational")
    bytes, blocks = live()
  end
  return bytes, blocks
end

-- A finalizer run by one of these collections that settles again (say, by taking a checkpoint)
-- gets the figures as they are: collections nested in finalizers would run the other pending
-- finalizers from inside each other (and, in Lua 5.1's lua_close, never end). The flag is set
-- inside the protected call and cleared right after it, where nothing can fail: a memory error
-- between the two (a budget or fail_after refusing the call's stack) must not leave it set,
-- which would turn every later settle into a plain reading (fuzzer seed 8 on lua5.2).
local function settle()
  if settling then return live() end
  local ok, bytes, blocks = pcall(settle_now)
  settling = false
  if not ok then error(bytes, 0) end
  return bytes, blocks
end
function M.settle(...)
  if select("#", ...) > 0 then
    argerror(1, "settle", "no argument expected, got " .. typename((...)), 2)
  end
  return settle()
end

local function plural(n, word)
  if n == 1 or n == -1 then return word end
  return word .. "s"
end

local function label_of(fn, opts)
  if opts and opts.name then return opts.name end
  local info = getinfo and type(fn) == "function" and getinfo(fn, "S")
  if info and info.what ~= "C" then
    return format("function <%s:%d>", info.short_src, info.linedefined)
  end
  return core.address_name(fn) -- (tostring would run a __tostring metamethod, which may fail)
end

-- Checkpoints -----------------------------------------------------------------------------------

local CP_NEW_OPTS = { name = true, collect = true, holders = true }
local CP_OPTS = { tolerance = true, name = true }

-- mem.checkpoint, cp:is_neutral and cp:assert_neutral are made by `core.measured`: they check
-- their arguments, then settle, then read, all with the same stack layout below the caller, so a
-- checkpoint and its check compare like with like (live memory includes the thread's stack).
local measured = core.measured

-- `mem.checkpoint{holders = true}` walks the heap (lunet.mem.holders) before its reading, so that
-- the snapshot is memory of before the checkpoint; the snapshot is kept with the checkpoint and
-- a leak report of `cp:is_neutral` says what holds the objects made since.
local pending_snapshot

local function heap_snapshot()
  local found, holders = pcall(require, "lunet.mem.holders")
  if not found or type(holders) ~= "table" then return nil end
  local kept = { holders = holders }
  local snapshot = holders.snapshot()
  -- (what the checkpoint keeps is not new when its report walks the heap again)
  snapshot[kept], snapshot[snapshot] = true, true
  kept.snapshot = snapshot
  return kept
end

M.checkpoint = measured(function(arg)
  if type(arg) == "table" then
    check_opts(arg, 1, "checkpoint", CP_NEW_OPTS, 3)
    pending_snapshot = arg.holders and heap_snapshot() or nil
    return arg.collect ~= false
  elseif arg ~= nil and type(arg) ~= "string" then
    argerror(1, "checkpoint", "string or table expected, got " .. typename(arg), 3)
  end
  pending_snapshot = nil
  return true
end, settle, function(arg)
  local cp = core.checkpoint(type(arg) == "table" and arg.name or arg)
  if pending_snapshot then
    core.cp_attach(cp, pending_snapshot)
    pending_snapshot = nil
  end
  return cp
end)

-- The lines saying what holds the objects made since the checkpoint, if it kept a snapshot.
local function cp_holders(cp)
  local kept = core.cp_attached(cp)
  if type(kept) ~= "table" or rawget(kept, "snapshot") == nil then return "" end
  local ok, lines = pcall(kept.holders.explain, kept.snapshot)
  if not ok then return "\n  (could not tell what holds it: " .. tostring(lines) .. ")" end
  return "\n" .. concat(lines, "\n")
end

-- The verdict of a checkpoint method, after `settle()`. Both methods and `mem.checkpoint` call
-- `settle()` from their own frame: live memory includes the running thread's call frames, so the
-- two readings are taken at the same depth below the user's call.
--
-- Neutral means that what was allocated since the checkpoint has been freed: a leak is more
-- live bytes (beyond `tolerance`) *and* more live blocks. Growth without new blocks is a block
-- made before the checkpoint that was reallocated larger, which a single comparison cannot tell
-- from the VM's own structures that grow and shrink lazily (a thread's stack, the string table);
-- mem.is_neutral, which repeats the run, catches growth of that kind.
local function cp_verdict(cp, opts, fname)
  local tolerance = opts and opts.tolerance or 0
  local bytes, blocks = core.cp_values(cp, fname)
  if bytes <= tolerance or blocks <= 0 then return true end
  local name = opts and opts.name or core.cp_name(cp) or "checkpoint"
  return false, format('leak since "%s": +%d bytes, %+d %s (tolerance %d)',
    name, bytes, blocks, plural(blocks, "block"), tolerance) .. cp_holders(cp)
end

local function cp_args(fname)
  return function(cp, opts)
    if not core.is_checkpoint(cp) then
      argerror(1, fname, "checkpoint expected, got " .. typename(cp), 3)
    end
    check_opts(opts, 2, fname, CP_OPTS, 3)
    return true
  end
end

local CP_METHODS = {
  delta = core.cp_delta,
  is_neutral = measured(cp_args("is_neutral"), settle, function(cp, opts)
    return cp_verdict(cp, opts, "is_neutral")
  end),
  assert_neutral = measured(cp_args("assert_neutral"), settle, function(cp, opts)
    local ok, report = cp_verdict(cp, opts, "assert_neutral")
    if not ok then error(report, 3) end
    return true
  end),
}
-- Objects of this module: `obj.name` from `name_of`, methods from `methods`.
local function object_class(mt, name_of, methods)
  mt.__index = function(obj, k)
    if k == "name" then return name_of(obj) end
    return methods[k]
  end
  return mt
end

local cp_mt = object_class(core.checkpoint_mt, core.cp_name, CP_METHODS)
cp_mt.__tostring = function(cp)
  local name = core.cp_name(cp)
  return name and format('checkpoint "%s"', name) or "checkpoint"
end

-- Repeat-and-compare ----------------------------------------------------------------------------

local NEUTRAL_OPTS = { tolerance = true, warmup = true, runs = true, name = true }
local DEFAULT_WARMUP, DEFAULT_RUNS = 2, 5

-- Once a leak is found: runs `fn` once more between two walks of the heap by
-- lunet.mem.holders (loaded only then, and optional) and returns its lines, what that run left
-- alive and what holds it, each line after a newline. The verdict is made before, so the walks
-- (which allocate) cannot change it.
-- That run is traced (src/trace/; the JIT is off here already): the report names the line
-- that allocated each object where the tracer saw it.
local function who_holds(fn)
  local found, holders = pcall(require, "lunet.mem.holders")
  if not found or type(holders) ~= "table" then return "" end
  local walk_opts = { roots = { { fn, "the checked function" } } }
  local traced = core.trace_start and not core.trace_is_on() and core.trace_start(8, 0)
  local ok, lines = pcall(function()
    local before = holders.snapshot(walk_opts)
    fn()
    if core.trace_is_on and core.trace_is_on() then walk_opts.site_of = core.trace_site_of end
    return holders.explain(before, walk_opts)
  end)
  if traced then core.trace_stop() end
  if not ok then return "\n  (could not tell what holds it: " .. tostring(lines) .. ")" end
  return "\n" .. concat(lines, "\n")
end

-- Runs `fn` `warmup` times, then `runs` times with memory settled around each run, and
-- judges the per-run growth. A leak is growth in every run (as CPython's `regrtest -R`; with 4
-- runs or more, in all runs but one), or, with 4 runs or more, growth in both halves of the runs,
-- in 2 runs at least, with at most one run shrinking memory: the shape of amortized growth (a
-- list that gets one element per call grows its array part at powers of two). One-time growth
-- (caches filled once, string table growth) is neither.
local function judge(fn, opts, fname, level)
  if not is_callable(fn) then
    argerror(1, fname, "function expected, got " .. typename(fn), level + 1)
  end
  check_opts(opts, 2, fname, NEUTRAL_OPTS, level + 1)
  local warmup = opts and opts.warmup or DEFAULT_WARMUP
  local runs = opts and opts.runs or DEFAULT_RUNS
  local tolerance = opts and opts.tolerance or 0

  -- Warm-up runs settle too, so that they meet the state measured runs meet.
  for _ = 1, warmup do
    fn()
    settle()
  end
  -- Both arrays are sized before the first measurement, so filling them allocates nothing.
  local bytes, blocks = {}, {}
  for i = 1, runs do bytes[i], blocks[i] = 0, 0 end
  -- Every reading is taken at the same call site: live memory includes this thread's stack,
  -- whose size after a collection follows the slots in use where the collection ran.
  local b0, k0 = 0, 0
  for i = 0, runs do
    if i > 0 then fn() end
    local b1, k1 = settle()
    if i > 0 then bytes[i], blocks[i] = b1 - b0, k1 - k0 end
    b0, k0 = b1, k1
  end

  -- One run may be off either way: memory the VM gives back lazily (a thread's stack, its call
  -- frames, the string table, objects of earlier code finalized late) can shrink one run's
  -- figure below a steady leak's.
  local grew, shrank, first, second, total, total_blocks = 0, 0, 0, 0, 0, 0
  local half = floor(runs / 2)
  for i = 1, runs do
    local d = bytes[i]
    if d > tolerance then grew = grew + 1 end
    if d < -tolerance then shrank = shrank + 1 end
    if i <= half then first = first + d else second = second + d end
    total, total_blocks = total + d, total_blocks + blocks[i]
  end
  local every = total > tolerance * runs and grew >= (runs >= 4 and runs - 1 or runs)
  local trend = runs >= 4 and shrank <= 1 and grew >= 2
    and first > tolerance * half and second > tolerance * (runs - half)
  if not (every or trend) then return true end

  local per_run, per_run_blocks = total / runs, total_blocks / runs
  local function fmt(n)
    if n == floor(n) then return format("%d", n) end
    return format("%.1f", n)
  end
  local report = format('leak in "%s": %s%s bytes, %s%s %s per run (runs: %s; blocks: %s)%s',
    label_of(fn, opts),
    per_run >= 0 and "+" or "", fmt(per_run),
    per_run_blocks >= 0 and "+" or "", fmt(per_run_blocks), plural(per_run_blocks, "block"),
    concat(bytes, " "), concat(blocks, " "),
    every and "" or " [grows over the runs]")
  return false, report .. who_holds(fn)
end

-- LuaJIT's compiler: switched only where LuaJIT allows it (not inside a `__gc` finalizer, where
-- LuaJIT 2.1.0-beta3 does not survive the error it raises).
local jit_status = type(jit) == "table" and jit.status or nil

-- On LuaJIT the check runs with the JIT compiler off and its traces flushed, and the compiler's
-- state is restored afterwards, whatever happens. What the trace recorder allocates is real
-- memory, but it belongs to the JIT, it grows when new code gets hot (late, too), and a leak is
-- a matter of what the program keeps reachable, which compiled code does not change. The check
-- runs through C (`core.cpcall`): a `fn` that yields cannot leave it suspended with the compiler
-- off.
local cpcall = core.cpcall

-- Reasons the module keeps the compiler off (src/hook.rs, `Tracker::hold_jit`): each holder
-- starts and ends on its own, and the compiler is on again when none is left.
local JIT_HELD_BY_TRACE, JIT_HELD_BY_CHECK = 2, 4
local jit_hold = core.jit_hold

-- Checks running now (mem.is_neutral, mem.measure): one may run inside another's function, and
-- only the outermost gives the compiler back.
local checks_running = 0

local function hold_for_check()
  checks_running = checks_running + 1
  jit_hold(JIT_HELD_BY_CHECK, true)
  if jit_flush and jit_can_switch() then jit_flush() end
end

local function release_check(ok, ...)
  checks_running = checks_running - 1
  if checks_running == 0 then jit_hold(JIT_HELD_BY_CHECK, false) end
  if not ok then error((...), 0) end
  return ...
end

-- (No tail calls on these paths: argument errors name the caller's line by counting levels.)
local function judge_without_jit(fn, opts, fname)
  if not jit_status then
    local ok, report = judge(fn, opts, fname, 3)
    return ok, report
  end
  hold_for_check()
  local ok, report = release_check(cpcall(judge, fn, opts, fname, 4))
  return ok, report
end

function M.is_neutral(fn, opts)
  local ok, report = judge_without_jit(fn, opts, "is_neutral")
  return ok, report
end

function M.assert_neutral(fn, opts)
  local ok, report = judge_without_jit(fn, opts, "assert_neutral")
  if not ok then error(report, 2) end
  return true
end

-- Scopes ----------------------------------------------------------------------------------------

local SCOPE_OPTS = { name = true, on_exit = true, arena = true, limit = true }

-- Default scope names, computed once per function, as the module's bookkeeping (the cache
-- outlives the request that first names a function: its strings must not be the request's, nor
-- be placed in its arena).
local names = setmetatable({}, { __mode = "k" })
local exempt_call = core.exempt_call
local function remember_name(fn)
  local name = label_of(fn, nil)
  names[fn] = name
  return name
end
local function default_name(fn)
  return names[fn] or exempt_call(remember_name, fn)
end

-- The one check of mem.scope's arguments: returns `name, on_exit, arena, limit, index of fn`.
-- (On PUC Lua, mem.scope is C, src/bindings/scope_c.rs `l_scope`, which calls this for
-- every form but `(name, fn)`, a function whose default name is known, and an options table
-- whose every field is valid at sight; that fast path never raises: anything else comes here.)
local function prepare(a, b)
  local ta = type(a)
  if ta == "string" then
    if not is_callable(b) then
      argerror(2, "scope", "function expected, got " .. typename(b), 3)
    end
    return a, nil, nil, nil, 2
  elseif ta == "table" and not is_callable(a) then
    check_opts(a, 1, "scope", SCOPE_OPTS, 3)
    if not is_callable(b) then
      argerror(2, "scope", "function expected, got " .. typename(b), 3)
    end
    return a.name or default_name(b), a.on_exit, arena_arg(a.arena), a.limit, 2
  elseif is_callable(a) then
    return default_name(a), nil, nil, nil, 1
  end
  argerror(1, "scope", "function expected, got " .. typename(a), 3)
end

-- (Debian's LuaJIT 2.1.0-beta3, and the betas before the 2023 fixes of LuaJIT issues #906 and
-- #1034, can crash when an allocation fails while compiled code runs: src/hook.rs admits those
-- and fails the run at a safe point, and turns the compiler off while a budgeted scope is
-- active.)

-- Buffers the VM makes on first use and keeps until it closes: LuaJIT's string buffer and,
-- once the compiler is on, its trace recorder's IR and snapshot buffers; Lua 5.1's
-- concatenation buffer. 5.1 and LuaJIT do not tell the allocator which blocks are objects
-- (src/arena.rs), so such a buffer first made inside an arena scope would pin its arena for
-- good: they are made here, outside every scope, when the module loads and (LuaJIT) at the
-- first arena scope opened with no scope active after the compiler is switched on.
local vm_primed = false
local function prime_vm()
  local n = 1.5
  local s = tostring(n) .. format("%d", 1) .. concat({ "a", "b" }, ",")
  if jit_status and jit_status() then
    -- hot enough to be recorded at any `hotloop` up to 2^16 / 2
    local x = 0
    for i = 1, 40000 do x = x + i end
    vm_primed = true
  elseif not jit_status then
    vm_primed = true
  end
  return s
end
prime_vm()

if core.make_scope then
  M.scope = core.make_scope(prepare, names)
else
  -- LuaJIT: Lua, so that `fn` can yield inside the scope (LuaJIT yields across its
  -- own `pcall`, not across a C function). The scope becomes active inside the protected call
  -- and closes right after it (src/bindings/scope_lua.rs).
  local scope_prepare, scope_activate = core.scope_prepare, core.scope_activate
  local scope_close_ok, scope_finish = core.scope_close_ok, core.scope_finish

  -- Three of them through the FFI, callable from compiled code: a C function called through
  -- the Lua API ends a trace, and every request ran through the interpreter's C-call path four
  -- times. They do the common case (a scope without a budget, opened, closed and finished by
  -- the thread whose record the module has cached) and answer 0 for anything else, which the
  -- Lua C functions then do (src/bindings/scope_lua.rs).
  local jit_prepare, jit_activate, jit_close, T
  do
    local has_ffi, ffi = pcall(require, "ffi")
    if has_ffi then
      local t, prepare_fn, activate_fn, close_fn = core.jit_scope_calls()
      T = ffi.cast("void *", t) -- (a light userdata argument stops the trace recorder)
      jit_prepare = ffi.cast("double (*)(void *, const char *, size_t, double)", prepare_fn)
      jit_activate = ffi.cast("int (*)(void *, double)", activate_fn)
      jit_close = ffi.cast("int (*)(void *, double)", close_fn)
    end
  end

  local function prepare_scope(name, arena, limit)
    if jit_prepare and limit == nil and type(name) == "string" then
      local token = jit_prepare(T, name, #name, arena or -1)
      if token ~= 0 then return token end
    end
    return scope_prepare(name, arena, limit)
  end

  local function activate(token)
    if not (jit_activate and jit_activate(T, token) ~= 0) then scope_activate(token) end
  end

  -- After the protected call: `fn` returned (`ok`) and its scope is still open, or it failed.
  -- (The scope closes here, not in the protected call: a trace cannot record the return of a
  -- function with `...` into pcall's frame, "NYI: return to lower frame". A close that fails,
  -- its scope overdrawn, still fails in a protected call, and scope_finish then sees it.)
  local function finish(token, on_exit, ok, ...)
    if ok then
      if on_exit == nil and jit_close and jit_close(T, token) ~= 0 then return ... end
      return scope_finish(token, on_exit, pcall(scope_close_ok, token, ...))
    end
    return scope_finish(token, on_exit, ok, ...)
  end

  local function run(token, fn, ...)
    activate(token)
    return fn(...)
  end

  -- (`fn` is a named parameter rather than taken with `select(2, ...)`: Debian's LuaJIT
  -- 2.1.0-beta3 miscompiled that form inside pcall, calling the scope's function with wrong
  -- arguments.)
  local current = core.current
  local function scope_with(name, on_exit, arena, limit, fn, ...)
    if arena and not vm_primed and current() == nil then prime_vm() end
    local token = prepare_scope(name, arena, limit)
    return finish(token, on_exit, pcall(run, token, fn, ...))
  end

  -- The same for a call with at most three arguments, held in fixed parameters: LuaJIT's trace
  -- recorder cannot forward `...` after a C call (a trace stitched after `scope_prepare` met
  -- "NYI: bytecode VARG" and the rest of every request ran interpreted). `n` keeps the count,
  -- so that `fn` gets exactly the arguments it was given (trailing nils included).
  local function call_n(fn, n, x1, x2, x3)
    if n == 0 then return fn() end
    if n == 1 then return fn(x1) end
    if n == 2 then return fn(x1, x2) end
    return fn(x1, x2, x3)
  end

  local function run_n(token, fn, n, x1, x2, x3)
    activate(token)
    return call_n(fn, n, x1, x2, x3)
  end

  local function scope_with_n(name, on_exit, arena, limit, fn, n, x1, x2, x3)
    if arena and not vm_primed and current() == nil then prime_vm() end
    local token = prepare_scope(name, arena, limit)
    return finish(token, on_exit, pcall(run_n, token, fn, n, x1, x2, x3))
  end

  function M.scope(a, ...)
    local name, on_exit, arena, limit, at = prepare(a, (...))
    local n = select("#", ...)
    if at == 1 then
      if n <= 3 then
        local x1, x2, x3 = ...
        return scope_with_n(name, on_exit, arena, limit, a, n, x1, x2, x3)
      end
      return scope_with(name, on_exit, arena, limit, a, ...)
    end
    if n <= 4 then
      local fn, x1, x2, x3 = ...
      return scope_with_n(name, on_exit, arena, limit, fn, n - 1, x1, x2, x3)
    end
    return scope_with(name, on_exit, arena, limit, ...)
  end
end

-- Exact per-call figures (mem.measure) ---------------------------------------------------------

-- mem.measure([opts,] fn, ...): the figures of one call of fn(...), made after `warmup` calls.
--
-- The call runs in a scope of its own, and its figures are the scope's: every block allocated,
-- freed or resized while it runs. Memory is settled first (full collections until nothing more
-- is freed), so the collector has no garbage of before the call to free during it, and starts
-- it in the same state on every run of the program. A second settle after the call, read at
-- the same call site as the first (live memory includes this thread's stack), gives
-- `retained_bytes`: what the call left reachable. On LuaJIT the compiler is held off and its
-- traces flushed while this runs, as for mem.is_neutral (the trace recorder allocates when code
-- gets hot: the JIT's memory, at moments that vary), and given back whatever happens; `fn` runs
-- through C (core.cpcall), so it cannot yield with the compiler held.
do
  local MEASURE_OPTS = { warmup = true }
  local DEFAULT_MEASURE_WARMUP = 1
  local scope = M.scope
  local reserved_call = core.reserved_call

  -- The measured scope's stats, from its on_exit: one function for every call, which allocates
  -- nothing per call (a nested measure's scope closes before its caller reads this).
  local closed_stats
  local function keep_stats(stats) closed_stats = stats end
  local function nothing() end

  -- Every call of `fn` runs here, in a scope: the warm-up calls grow the thread's stack as the
  -- measured call does (LuaJIT keeps a stack that grew unless it is mostly unused, so a first
  -- reading with a smaller stack would find the measured call "retaining" the growth). A frame
  -- of its own: the results the call leaves in its slots are not seen by the readings.
  local function call_in_scope(scope_opts, fn, ...)
    scope(scope_opts, fn, ...)
  end

  -- The figures of the scope just closed, as numbers: its stats table is garbage before the
  -- second reading (not in a slot of the reading's frame).
  local function take_figures()
    local stats = closed_stats
    closed_stats = nil
    return stats.allocs, stats.frees, stats.reallocs, stats.bytes_allocated, stats.bytes_freed,
      stats.net_bytes, stats.peak_bytes
  end

  local function measure_call(warmup, fn, ...)
    -- Made before the first reading and alive until the second: not the call's.
    local scope_opts = { name = default_name(fn), on_exit = keep_stats }
    -- (so is the running coroutine's record of its scopes, made by its first scope)
    call_in_scope(scope_opts, nothing)
    closed_stats = nil
    -- Warm-up calls settle too, so that they meet the state the measured call meets.
    for _ = 1, warmup do
      call_in_scope(scope_opts, fn, ...)
      closed_stats = nil
      reserved_call(settle)
    end
    local allocs, frees, reallocs, allocated, freed, net, peak
    local before, retained = 0, 0
    -- (i = -1: a settle at the reading's call site first; a collection shrinks the stack and,
    -- on 5.3, the call records, by what is in use where it runs, which was the warm-up loop's)
    -- The readings hold stack in use (core.reserved_call): they leave the stack the same size
    -- before and after the call, large enough that the call does not grow it.
    for i = -1, 1 do
      if i == 1 then
        call_in_scope(scope_opts, fn, ...)
        allocs, frees, reallocs, allocated, freed, net, peak = take_figures()
      end
      local bytes = reserved_call(settle)
      if i == 1 then retained = bytes - before end
      before = bytes
    end
    return {
      allocs = allocs, frees = frees, reallocs = reallocs,
      allocated_bytes = allocated, bytes_allocated = allocated,
      freed_bytes = freed, bytes_freed = freed,
      net_bytes = net, peak_bytes = peak, retained_bytes = retained,
    }
  end

  local function measure_checked(warmup, fn, ...)
    hold_for_check()
    local figures = release_check(cpcall(measure_call, warmup, fn, ...))
    closed_stats = nil -- (set when fn raised)
    return figures
  end

  -- (No tail calls: argument errors name the caller's line by counting levels.)
  function M.measure(a, ...)
    local figures
    if type(a) == "table" and not is_callable(a) then
      check_opts(a, 1, "measure", MEASURE_OPTS, 2)
      local fn = (...)
      if not is_callable(fn) then
        argerror(2, "measure", "function expected, got " .. typename(fn), 2)
      end
      figures = measure_checked(a.warmup or DEFAULT_MEASURE_WARMUP, ...)
    elseif is_callable(a) then
      figures = measure_checked(DEFAULT_MEASURE_WARMUP, a, ...)
    else
      argerror(1, "measure", "function or table expected, got " .. typename(a), 2)
    end
    return figures
  end
end

-- Failure injection (Lua's testes/memerr.lua style) ---------------------------------------------

local fail_run = core.fail_run

-- Runs fn(...) in protected mode with the first `n` allocations admitted and every later one
-- failing (a limit, not a single failure: Lua 5.4 retries a failed allocation after an emergency
-- collection); returns pcall's results. Normal allocation is back when it returns.
function M.fail_after(n, fn, ...)
  local expected = integer_in(0, 2 ^ 53)(n)
  if expected then
    argerror(1, "fail_after", expected .. " expected, got " ..
      (type(n) == "number" and tostring(n) or typename(n)), 2)
  end
  if not is_callable(fn) then
    argerror(2, "fail_after", "function expected, got " .. typename(fn), 2)
  end
  return fail_run(n, fn, ...)
end

local c_charge = core.charge

-- Counts C memory (bytes > 0: one block made; < 0: one released) in the active scope's ledger,
-- as C code does with lunet_mem_charge: for memory Lua code gets outside Lua's allocator (FFI
-- buffers, a binding's own). Returns true, or false when no scope is active or a limit refuses.
function M.charge(bytes)
  if type(bytes) ~= "number" or bytes ~= bytes or bytes < -2 ^ 53 or bytes > 2 ^ 53
    or floor(bytes) ~= bytes then
    argerror(1, "charge", "integer expected, got " ..
      (type(bytes) == "number" and tostring(bytes) or typename(bytes)), 2)
  end
  return c_charge(bytes)
end

local SCOPE_METHODS = { stats = core.scope_stats }
local scope_mt = object_class(core.scope_mt, core.scope_name, SCOPE_METHODS)
scope_mt.__tostring = function(scope)
  return format('scope "%s"', core.scope_name(scope))
end

-- Coroutines: the active scope follows resume, wrap, yield and close ------------------------
-- (src/bindings/coroutines.rs: C functions that do what the stock ones do, plus the switches). The
-- originals are kept in `saved`, so that a second load wraps nothing twice.

-- A function that is not the stock one was put there by a library loaded before (an
-- instrumenting wrapper, a runtime's own): it keeps being called. A `resume` of that kind is
-- wrapped with the switches around it; a `wrap`, `yield` or `close` of that kind is left as it
-- is (it resumes and yields through whatever it calls: these wrappers when it looks them up,
-- else the yield's own switch and, on 5.2+, its continuation keep the scopes right).
local saved = core.saved
if not saved.resume and type(rawget(_G, "coroutine")) == "table" then
  local is_stock = core.is_stock
  if jit then
    -- (LuaJIT's stock coroutine functions are its builtins)
    is_stock = function(_, f)
      return type(f) == "function" and tostring(f):match("^function: builtin#%d+$") ~= nil
    end
  end
  local mine = { resume = core.co_resume, wrap = core.co_wrap, yield = core.co_yield,
    close = core.co_close }
  for _, name in ipairs { "resume", "wrap", "yield", "close" } do
    local f = rawget(coroutine, name)
    if f ~= nil and mine[name] then
      saved[name] = f
      if is_stock(name, f) then
        coroutine[name] = mine[name]
      elseif name == "resume" then
        coroutine[name] = core.co_resume_via(f)
      end
    end
  end
end

-- Helpers: lunet.mem.holders, .busted, .run (lua/lunet/mem/) ----------------------------------
-- Compiled into the library too (src/lib.rs, `core.embedded`) and offered in package.preload, so
-- that a host with no Lua files of the module (a C program that calls lunet_mem_install) gets
-- holder paths in its leak reports. A copy on package.path is loaded first: the rock installs
-- the same files, and an edited tree (LUA_PATH) must not be shadowed by the compiled one.
local package = rawget(_G, "package")
if type(package) == "table" and type(package.preload) == "table" then
  local embedded = core.embedded
  local function from_path_or_embedded(name, ...)
    local searchers = package.searchers or package.loaders
    local search = type(searchers) == "table" and searchers[2]
    if type(search) == "function" then
      local loader, where = search(name)
      if type(loader) == "function" then return loader(name, where) end
    end
    local chunk = embedded(name)
    if chunk == nil then error(("module '%s' is not compiled into lunet.mem"):format(name), 2) end
    return chunk(name, ...)
  end
  local preload = package.preload
  for _, name in ipairs { "lunet.mem.holders", "lunet.mem.busted", "lunet.mem.run" } do
    if rawget(preload, name) == nil then preload[name] = from_path_or_embedded end
  end
end

-- Allocation tracing (mem.trace; src/trace/) ----------------------------------------------------

do
  local TRACE_OPTS = { sample_bytes = true, depth = true }
  KINDS.sample_bytes = integer_in(1, 2 ^ 40)
  KINDS.depth = integer_in(1, 64)
  local KEYS = { line = true, ["function"] = true, traceback = true }
  local is_snapshot = core.trace_is_snapshot

  local function snapname(v)
    if is_snapshot(v) then return "snapshot" end
    return typename(v)
  end
  local function check_snap(s, fname)
    if not is_snapshot(s) then
      argerror(1, fname, "snapshot expected, got " .. snapname(s), 3)
    end
  end
  local function check_key(key, n, fname)
    if key ~= nil and not KEYS[key] then
      argerror(n, fname, "'line', 'function' or 'traceback' expected, got " ..
        (type(key) == "string" and format("'%s'", key) or snapname(key)), 3)
    end
    return key or "line"
  end

  local trace = {}
  -- Starts recording live blocks by Lua stack. On LuaJIT the compiler is turned off and its
  -- traces flushed (stacks cannot be read in compiled code), and turned on again by stop().
  function trace.start(opts)
    check_opts(opts, 1, "start", TRACE_OPTS, 2)
    if core.trace_is_on() then return false end
    local ok, err = core.trace_start(opts and opts.depth or 8, opts and opts.sample_bytes or 0)
    if ok and jit_status then
      jit_hold(JIT_HELD_BY_TRACE, true)
      if jit_can_switch() then jit_flush() end
    end
    return ok, err
  end

  local function no_argument(fname, ...)
    if select("#", ...) > 0 then
      argerror(1, fname, "no argument expected, got " .. snapname((...)), 3)
    end
  end

  function trace.stop(...)
    no_argument("stop", ...)
    core.trace_stop()
    jit_hold(JIT_HELD_BY_TRACE, false)
  end

  function trace.is_tracing(...)
    no_argument("is_tracing", ...)
    return core.trace_is_on()
  end

  -- A snapshot of the live recorded blocks, or nil and a message when not tracing.
  function trace.snapshot(...)
    no_argument("snapshot", ...)
    return core.trace_snapshot()
  end

  local SNAP = {}
  -- The `n` biggest sites (all if n is nil) as {site=, bytes=, blocks=}, biggest first.
  function SNAP.top(s, n, key)
    check_snap(s, "top")
    if n ~= nil then
      local expected = integer_in(0, 2 ^ 53)(n)
      if expected then
        argerror(2, "top", expected .. " expected, got " ..
          (type(n) == "number" and tostring(n) or snapname(n)), 2)
      end
    end
    key = check_key(key, 3, "top")
    return core.trace_top(s, n or -1, key)
  end

  -- Growth by site since `older`: {site=, bytes=, blocks=, bytes_diff=, blocks_diff=}, the
  -- biggest growth first (sites gone from `s` have bytes = 0).
  function SNAP.compare(s, older, key)
    check_snap(s, "compare")
    if not is_snapshot(older) then
      argerror(2, "compare", "snapshot expected, got " .. snapname(older), 2)
    end
    key = check_key(key, 3, "compare")
    local new, old = core.trace_top(s, -1, key), core.trace_top(older, -1, key)
    local by_site, out = {}, {}
    for _, st in ipairs(old) do by_site[st.site] = st end
    for _, st in ipairs(new) do
      local o = by_site[st.site]
      by_site[st.site] = nil
      out[#out + 1] = { site = st.site, bytes = st.bytes, blocks = st.blocks,
        bytes_diff = st.bytes - (o and o.bytes or 0), blocks_diff = st.blocks - (o and o.blocks or 0),
        traceback = st.traceback }
    end
    for site, o in fields(by_site) do
      out[#out + 1] = { site = site, bytes = 0, blocks = 0, bytes_diff = -o.bytes,
        blocks_diff = -o.blocks, traceback = o.traceback }
    end
    table.sort(out, function(a, b)
      if a.bytes_diff ~= b.bytes_diff then return a.bytes_diff > b.bytes_diff end
      return a.site < b.site
    end)
    return out
  end

  local function check_path(p, fname)
    if type(p) ~= "string" then
      argerror(2, fname, "string expected, got " .. snapname(p), 3)
    end
  end

  -- Writes folded stacks ("root;...;leaf bytes" lines): true, or nil and a message.
  function SNAP.dump(s, path)
    check_snap(s, "dump")
    check_path(path, "dump")
    return core.trace_dump(s, path)
  end

  local FLAME_OPTS = { title = true }
  KINDS.title = of_type("string")
  -- Writes an SVG flame graph of live bytes by Lua stack: true, or nil and a message.
  function SNAP.flamegraph(s, path, opts)
    check_snap(s, "flamegraph")
    check_path(path, "flamegraph")
    check_opts(opts, 3, "flamegraph", FLAME_OPTS, 2)
    return core.trace_flamegraph(s, path, opts and opts.title or "")
  end

  -- Writes a gzipped pprof heap profile (profile.proto) with a `scope` label per sample: true,
  -- or nil and a message.
  function SNAP.pprof(s, path)
    check_snap(s, "pprof")
    check_path(path, "pprof")
    return core.trace_pprof(s, path)
  end

  local snap_mt = core.trace_snapshot_mt
  snap_mt.__index = SNAP
  snap_mt.__tostring = function() return "snapshot" end
  M.trace = trace
end


-- Metrics (mem.metrics; src/metrics.rs) ----------------------------------------------------------

do
  local METRICS_OPTS = { max_scopes = true, buckets = true }
  local MAX_BUCKETS = 64
  KINDS.max_scopes = integer_in(1, MAX_COUNT)
  -- An array of 1 to MAX_BUCKETS strictly increasing integers (bytes).
  KINDS.buckets = function(v)
    local expected = format("array of 1 to %d increasing integers", MAX_BUCKETS)
    if type(v) ~= "table" then return expected end
    local n = 0
    for k in fields(v) do
      if type(k) ~= "number" or k < 1 or floor(k) ~= k then
        return expected, format("key '%s'", key_name(k))
      end
      n = n + 1
    end
    if n == 0 or n > MAX_BUCKETS then return expected, format("%d bounds", n) end
    for i = 1, n do
      local b = v[i]
      if b == nil then return expected, format("a hole at %d", i) end
      if integer_in(-2 ^ 53, 2 ^ 53)(b) then
        return expected, format("bound %d = %s", i, type(b) == "number" and tostring(b) or typename(b))
      end
      if i > 1 and b <= v[i - 1] then
        return expected, format("bound %d = %s after %s", i, tostring(b), tostring(v[i - 1]))
      end
    end
  end

  local function no_argument(fname, ...)
    if select("#", ...) > 0 then
      argerror(1, fname, "no argument expected, got " .. typename((...)), 3)
    end
  end

  local metrics = {}
  -- Aggregates by scope name from now on, as scopes close (see the README); enabling again
  -- starts over with the new options.
  function metrics.enable(opts)
    check_opts(opts, 1, "enable", METRICS_OPTS, 2)
    core.metrics_enable(opts and opts.max_scopes, opts and opts.buckets)
  end

  function metrics.disable(...)
    no_argument("disable", ...)
    core.metrics_disable()
  end

  function metrics.reset(...)
    no_argument("reset", ...)
    core.metrics_reset()
  end

  -- The Prometheus text exposition (format 0.0.4) of the state's totals and the aggregates.
  function metrics.text(...)
    no_argument("text", ...)
    return core.metrics_text()
  end

  M.metrics = metrics
end

return M
