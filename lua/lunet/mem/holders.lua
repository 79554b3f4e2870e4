-- lunet.mem.holders: who holds what a leaking function keeps alive.
--
--   local holders = require "lunet.mem.holders"
--   local before = holders.snapshot()        -- the objects alive now (a weak-keyed set)
--   handler()                                -- the code that leaks
--   local lines = holders.explain(before)    -- what it left alive, and one path to each
--
-- Both walk the heap from the roots with the debug library: the registry (with `_LOADED` and,
-- on 5.2+, the main thread in it), `_G`, the running thread's stack (and on 5.2+ the main
-- thread's), the metatables of the basic types, and `opts.roots` (a list of `{ value, name }`).
-- From a table they follow its metatable, keys and values; from a function its upvalues (and
-- its environment on 5.1); from userdata its metatable and user values (environment on 5.1);
-- from a thread the functions and locals (with their names) of every frame of its stack.
--
-- `snapshot()` records every object it reaches, through weak references too (an object only a
-- weak cache refers to is not new when the code puts it back), with each table's entry count.
-- `explain()` walks again following strong references only, as the collector does: a weak
-- table does not hold its weak keys or values, and on 5.2+ a weak-keyed table holds a value
-- only while its key is reachable from elsewhere (an ephemeron). It reports, grouped by type
-- and site, the objects not in `before`, with one shortest path from a root each, and the
-- tables of `before` that have more entries now (but weak tables: what they gain is reported
-- through what holds it).
--
-- The walk keeps nothing alive: its sets are weak-keyed, and strings are never recorded (they
-- cannot be weak keys; a string is reported through the table that holds it). Frames of
-- lunet.mem itself (this module, the Lua half of lunet.mem, its busted assertion) are skipped.
-- Objects whose finalizer is pending are not reachable from Lua and are not walked.
local holders = {}

local debug = require "debug"
local getinfo, getlocal, getupvalue = debug.getinfo, debug.getlocal, debug.getupvalue
local getmetatable, getregistry = debug.getmetatable, debug.getregistry
local getuservalue, getfenv = debug.getuservalue, debug.getfenv -- 5.2+ / 5.1 and LuaJIT
local next, type, rawget, setmetatable, tostring, pcall = next, type, rawget, setmetatable, tostring, pcall
local format, sort = string.format, table.sort
local running, status = coroutine.running, coroutine.status

local VERSION = _VERSION
-- 5.2+ collect weak-keyed tables as ephemerons; 5.1 and LuaJIT hold their values strongly.
local EPHEMERONS = VERSION ~= "Lua 5.1"
-- 5.4 gives userdata any number of user values: debug.getuservalue(u, n).
local MANY_USERVALUES = VERSION ~= "Lua 5.1" and VERSION ~= "Lua 5.2" and VERSION ~= "Lua 5.3"

-- The types the walk records: values with an identity that a weak table may drop.
local OBJECT = { table = true, ["function"] = true, userdata = true, thread = true, cdata = true }

local WEAK_KEYS = { __mode = "k" }
local function weak_set() return setmetatable({}, WEAK_KEYS) end

-- The running thread's stack when it has no thread object (the main thread on 5.1 and LuaJIT).
local RUNNING_STACK = {}

local OWN_SOURCE = getinfo(1, "S").source
local function own_frame(info)
  local source = info.source
  return source == OWN_SOURCE or source == "=lunet.mem" or source == "=lunet.mem.busted"
    or (source:find("lunet[/\\.]mem[/\\.]busted%.lua$") ~= nil)
end

-- Descriptions -----------------------------------------------------------------------------------

local function site_of(f)
  local info = getinfo(f, "S")
  if info.what == "C" then return "[C]" end
  if info.what == "main" then return "main chunk of " .. info.short_src end
  return info.short_src .. ":" .. info.linedefined
end

local KEYWORDS = {}
for word in ("and break do else elseif end false for function goto if in local nil not or repeat "
  .. "return then true until while"):gmatch("%a+") do KEYWORDS[word] = true end

local function is_name(k)
  return type(k) == "string" and k:match("^[%a_][%w_]*$") ~= nil and not KEYWORDS[k]
end

local function quote(s)
  if #s > 40 then s = s:sub(1, 37) .. "..." end
  return (format("%q", s):gsub("\\\n", "\\n"))
end

-- `k` as an index: `.name`, `["a.b"]`, `[3]`, `[table]`.
local function index_expr(k)
  if is_name(k) then return "." .. k end
  local t = type(k)
  if t == "string" then return "[" .. quote(k) .. "]" end
  if t == "number" or t == "boolean" then return "[" .. tostring(k) .. "]" end
  return "[" .. t .. "]"
end

local function field_text(k)
  if is_name(k) then return "field '" .. k .. "'" end
  return "field " .. index_expr(k)
end

-- The walk -----------------------------------------------------------------------------------------

-- A walk: `seen` (object -> true, or a table's entry count in a snapshot), and for `explain`
-- (`paths`) each object's `parent`, the kind of edge from it (`how`: "field", "key",
-- "metatable", "upvalue", "environment", "uservalue", "local", "frame"), the edge's `key` (a
-- field's key, an upvalue's or local's name) and for locals the frame's function (`frame_fn`).
local function new_walk(strong, paths)
  local w = { strong = strong, seen = weak_set(), queue = {}, head = 1, tail = 0,
    root_name = weak_set(), ephemerons = {} }
  if paths then
    w.parent, w.how, w.key, w.frame_fn = weak_set(), weak_set(), weak_set(), weak_set()
  end
  return w
end

local function visit(w, v, parent, how, key, frame_fn)
  if not OBJECT[type(v)] or w.seen[v] then return end
  w.seen[v] = true
  if w.parent then
    w.parent[v], w.how[v], w.key[v], w.frame_fn[v] = parent, how, key, frame_fn
  end
  w.tail = w.tail + 1
  w.queue[w.tail] = v
end

local function root(w, v, name)
  if not OBJECT[type(v)] or w.seen[v] then return end
  visit(w, v)
  w.root_name[v] = name
end

local function expand_table(w, t)
  local mt = getmetatable(t)
  local weak_k, weak_v = false, false
  if mt ~= nil then
    visit(w, mt, t, "metatable")
    local mode = type(mt) == "table" and rawget(mt, "__mode")
    if w.strong and type(mode) == "string" then
      weak_k, weak_v = mode:find("k", 1, true) ~= nil, mode:find("v", 1, true) ~= nil
      if w.weak and (weak_k or weak_v) then w.weak[t] = true end
    end
  end
  local n, pending = 0, false
  for k, v in next, t do
    n = n + 1
    if not weak_k then visit(w, k, t, "key") end
    if not weak_v then
      if weak_k and EPHEMERONS and OBJECT[type(k)] and not w.seen[k] then
        pending = true -- held only if `k` turns out reachable from elsewhere
      else
        visit(w, v, t, "field", k)
      end
    end
  end
  if pending then w.ephemerons[#w.ephemerons + 1] = t end
  return n
end

-- Lua 5.2 to 5.5 make the main function of a chunk before they parse it and set its upvalue
-- after: a collection step in the parser can run a finalizer that walks the heap (a leak check
-- in a `__gc`), and debug.getupvalue on that function, found on `load`'s stack, reads through a
-- null pointer. Its upvalue's id is null then: `fail` on 5.4+, a null light userdata on 5.2.
-- 5.3's debug.upvalueid reads the upvalue itself: there the upvalues of main functions (their
-- `_ENV`, nearly always) are not followed.
local upvalueid = debug.upvalueid
local ID_OF_UNSET = VERSION == "Lua 5.2" and "null" or VERSION == "Lua 5.3" and "unsafe" or "fail"
local function upvalue_unset(f, i)
  local ok, id = pcall(upvalueid, f, i)
  if not ok or id == nil then return true end
  if ID_OF_UNSET ~= "null" then return false end
  local address = tostring(id):match(": (.*)$")
  return address == nil or address == "(nil)" or address:find("^[0x]*$") ~= nil
end

local function expand_function(w, f)
  local info = getinfo(f, "Su")
  if not (upvalueid and ID_OF_UNSET == "unsafe" and info.what == "main") then
    for i = 1, info.nups do
      if upvalueid and upvalue_unset(f, i) then break end
      local name, v = getupvalue(f, i)
      if name == nil then break end
      visit(w, v, f, "upvalue", name ~= "" and name or i)
    end
  end
  if getfenv then visit(w, getfenv(f), f, "environment") end
end

local function expand_userdata(w, u)
  visit(w, getmetatable(u), u, "metatable")
  if MANY_USERVALUES then
    for n = 1, 1000 do
      local v, has = getuservalue(u, n)
      if not has then break end
      visit(w, v, u, "uservalue", n)
    end
  elseif getuservalue then
    visit(w, getuservalue(u), u, "uservalue")
  elseif getfenv then
    visit(w, getfenv(u), u, "environment")
  end
end

-- The frames of `th`'s stack (`th` nil: the running thread, for which level 1 is this function),
-- their functions and locals (varargs too where the version lists them).
local function expand_stack(w, th, owner)
  local level = th and 0 or 1
  while true do
    local info
    if th then info = getinfo(th, level, "fS") else info = getinfo(level, "fS") end
    if not info then break end
    if not own_frame(info) then
      local f = info.func
      visit(w, f, owner, "frame")
      for i = 1, 100000 do
        local name, v
        if th then name, v = getlocal(th, level, i) else name, v = getlocal(level, i) end
        if name == nil then break end
        visit(w, v, owner, "local", name, f)
      end
      for i = -1, -100000, -1 do
        local ok, name, v
        if th then ok, name, v = pcall(getlocal, th, level, i)
        else ok, name, v = pcall(getlocal, level + 1, i) end -- (+1: pcall's own frame)
        if not ok or name == nil then break end
        visit(w, v, owner, "local", "vararg " .. -i, f)
      end
    end
    level = level + 1
  end
  if th and getfenv then visit(w, getfenv(th), th, "environment") end
end

local function expand(w, v)
  if v == RUNNING_STACK then return expand_stack(w, nil, v) end
  local t = type(v)
  if t == "table" then
    local n = expand_table(w, v)
    if w.counts then w.counts[v] = n end
  elseif t == "function" then expand_function(w, v)
  elseif t == "userdata" then expand_userdata(w, v)
  elseif t == "thread" then expand_stack(w, v, v)
  end
end

-- Values of weak-keyed tables whose key was reached after the table (5.2+ ephemerons).
local function drain_ephemerons(w)
  local again = false
  for i = 1, #w.ephemerons do
    local t = w.ephemerons[i]
    for k, v in next, t do
      if OBJECT[type(k)] and w.seen[k] and OBJECT[type(v)] and not w.seen[v] then
        visit(w, v, t, "field", k)
        again = true
      end
    end
  end
  return again
end

local function run(w)
  repeat
    while w.head <= w.tail do
      local v = w.queue[w.head]
      w.head = w.head + 1
      expand(w, v)
    end
  until not drain_ephemerons(w)
end

-- The roots, in the order that names paths when several are as short: `_G` first.
local function seed(w, opts)
  local registry = getregistry()
  root(w, rawget(_G, "_G") or _G, "_G")
  root(w, registry, "registry")
  for _, r in ipairs(opts and opts.roots or {}) do root(w, r[1], r[2]) end
  local co, is_main = running()
  if co == nil then
    root(w, RUNNING_STACK, "main thread")
  else
    if not is_main and type(rawget(registry, 1)) == "thread" then
      root(w, rawget(registry, 1), "main thread") -- 5.2+: LUA_RIDX_MAINTHREAD
    end
    root(w, co, is_main and "main thread" or "running coroutine")
  end
  for _, sample in ipairs { "", 0, true, print } do
    local name = type(sample) == "string" and '""' or tostring(sample)
    if sample == print then name = "print" end
    root(w, getmetatable(sample), "debug.getmetatable(" .. name .. ")")
  end
  root(w, getmetatable(nil), "debug.getmetatable(nil)")
  if co then root(w, getmetatable(co), "debug.getmetatable(coroutine.running())") end
end

-- Arguments ------------------------------------------------------------------------------------

local function argerror(n, fname, msg)
  error(format("bad argument #%d to '%s' (%s)", n, fname, msg), 3)
end

-- What each option must be: nil when fine, else what was expected.
local OPTION_CHECKS = {
  roots = function(v)
    if type(v) ~= "table" then return "table of {value, name} pairs" end
    for i, r in ipairs(v) do
      if type(r) ~= "table" or type(r[2]) ~= "string" then
        return format("table of {value, name} pairs (entry %d is not)", i)
      end
    end
  end,
  limit = function(v)
    if type(v) ~= "number" or v < 0 or v ~= math.floor(v) then return "non-negative integer" end
  end,
  indent = function(v)
    if type(v) ~= "string" then return "string" end
  end,
  site_of = function(v)
    if type(v) ~= "function" then return "function" end
  end,
}

-- Checks argument `n` of `fname`: nil or a table of options among `allowed`.
local function check_opts(opts, n, fname, allowed)
  if opts == nil then return end
  if type(opts) ~= "table" then
    argerror(n, fname, "table expected, got " .. type(opts))
  end
  for k, v in pairs(opts) do
    if not allowed[k] then argerror(n, fname, format("unknown option '%s'", tostring(k))) end
    local expected = OPTION_CHECKS[k](v)
    if expected then
      argerror(n, fname, format("option '%s': %s expected, got %s", k, expected, type(v)))
    end
  end
end

local SNAPSHOT_OPTS = { roots = true }
local EXPLAIN_OPTS = { roots = true, limit = true, indent = true, site_of = true }

--- The objects alive now: a weak-keyed set of every object reachable from the roots, through
-- weak references too, with each table's entry count as its value (`true` for the others).
-- `opts.roots`: more roots, a list of `{ value, name }`.
function holders.snapshot(opts)
  check_opts(opts, 1, "snapshot", SNAPSHOT_OPTS)
  local w = new_walk(false, false)
  w.counts = w.seen -- tables record their entry count
  local set = w.seen
  seed(w, opts)
  run(w)
  set[set] = true -- the set and its metatable are not new objects either
  set[WEAK_KEYS] = true
  return set
end

-- Paths ---------------------------------------------------------------------------------------------

-- An object's name as an expression from a root by fields (`_G.cache`, `registry._LOADED["x"]`),
-- or nil.
local function name_of(w, v, depth)
  local name = w.root_name[v]
  if name then return name end
  if w.how[v] ~= "field" or depth > 8 or OBJECT[type(w.key[v])] then return nil end
  local parent_name = name_of(w, w.parent[v], depth + 1)
  return parent_name and parent_name .. index_expr(w.key[v])
end

local function thread_text(th)
  -- Its outermost Lua function names it.
  local site
  for level = 0, 1000 do
    local info = getinfo(th, level, "S")
    if not info then break end
    if info.what ~= "C" then site = info.short_src .. ":" .. info.linedefined end
  end
  return "coroutine " .. (site and "<" .. site .. "> " or "") .. "(" .. status(th) .. ")"
end

-- A function's or thread's description; `name` where one is known.
local function object_text(w, v, name)
  local t = type(v)
  if t == "function" then
    if w.root_name[v] then return w.root_name[v] .. " (" .. site_of(v) .. ")" end
    if not name then
      local key = w.key[v]
      if w.how[v] ~= "frame" and is_name(key) then name = key end
    end
    if getinfo(v, "S").what == "main" then return site_of(v) end
    return "function " .. (name and name .. " " or "") .. "(" .. site_of(v) .. ")"
  elseif t == "thread" then
    if w.root_name[v] then return w.root_name[v] end
    local text = thread_text(v)
    return name and text .. " " .. name or text
  end
  return name or t
end

local MAX_STEPS = 12
local held_by

-- A phrase for `v` as the holder of something: its name, or how it is held in turn.
local function ref(w, v, steps)
  local name = name_of(w, v, 0)
  local t = type(v)
  if t == "function" or t == "thread" or v == RUNNING_STACK then
    local text = v == RUNNING_STACK and w.root_name[v] or object_text(w, v, name)
    if name or w.parent[v] == nil then return text end
    return text .. " <- " .. held_by(w, v, steps + 1)
  end
  return name or held_by(w, v, steps + 1)
end

-- How `v` is held: "field 'users' of registry._LOADED["app.users"]", "upvalue 'seen' of
-- function handler (app.lua:12) <- ...".
held_by = function(w, v, steps)
  local name = name_of(w, v, 0)
  if name then return name end
  local parent = w.parent[v]
  if parent == nil then return "?" end
  if steps > MAX_STEPS then return "..." end
  local how, key = w.how[v], w.key[v]
  local edge
  if how == "field" then edge = field_text(key) .. " of "
  elseif how == "key" then edge = "key in "
  elseif how == "metatable" then edge = "metatable of "
  elseif how == "upvalue" then edge = format("upvalue '%s' of ", tostring(key))
  elseif how == "environment" then edge = "environment of "
  elseif how == "uservalue" then edge = "user value of "
  elseif how == "local" then
    edge = format("local '%s' in %s of ", key, object_text(w, w.frame_fn[v]))
  else edge = "a frame of " end
  return edge .. ref(w, parent, steps)
end

-- Where `v` comes from: a function's `source:linedefined`; for another object, that of the
-- nearest function that holds it (an upvalue, a local of its frame), or "?".
local function site(w, v)
  for _ = 1, 64 do
    if type(v) == "function" then return site_of(v) end
    if w.how[v] == "local" then return site_of(w.frame_fn[v]) end
    v = w.parent[v]
    if v == nil then break end
  end
  return "?"
end

local function plural(n, word)
  if n == 1 then return word end
  if word:sub(-1) == "y" then return word:sub(1, -2) .. "ies" end
  return word .. "s"
end

--- Report lines for what is alive now and was not in `before` (a `snapshot()`): objects grouped
-- by type and site, each group with one path from a root; then the tables of `before` that have
-- more entries. `opts.roots` as for `snapshot`; `opts.limit`: groups shown of each kind (8).
-- `opts.indent`: prefix of each line ("  "). `opts.site_of(v)`: the line that allocated `v` (or
-- nil), used for the group's site in place of the holder's.
function holders.explain(before, opts)
  if type(before) ~= "table" then
    argerror(1, "explain", "table expected (a snapshot), got " .. type(before))
  end
  check_opts(opts, 2, "explain", EXPLAIN_OPTS)
  local limit = opts and opts.limit or 8
  local indent = opts and opts.indent or "  "
  -- opts.site_of(v): the line that allocated `v`, if known (mem.trace records it)
  local site_of_alloc = opts and opts.site_of
  local w = new_walk(true, true)
  w.counts, w.weak = weak_set(), weak_set()
  seed(w, opts)
  run(w)

  -- New objects, in the order the walk reached them (breadth first: shortest paths first).
  local groups, by_key, grown = {}, {}, {}
  local order = w.queue
  for i = 1, w.tail do
    local v = order[i]
    local old = before[v]
    if v ~= before and v ~= RUNNING_STACK then
      if old == nil then
        local key = type(v) .. " (" .. (site_of_alloc and site_of_alloc(v) or site(w, v)) .. ")"
        local g = by_key[key]
        if not g then
          g = { key = key, count = 0, first = v, rank = #groups }
          by_key[key] = g
          groups[#groups + 1] = g
        end
        g.count = g.count + 1
      elseif type(old) == "number" and type(v) == "table" and not w.weak[v]
        and (w.counts[v] or 0) > old then
        grown[#grown + 1] = { table = v, by = w.counts[v] - old, rank = #grown }
      end
    end
  end
  sort(groups, function(a, b)
    if a.count ~= b.count then return a.count > b.count end
    return a.rank < b.rank
  end)
  sort(grown, function(a, b)
    if a.by ~= b.by then return a.by > b.by end
    return a.rank < b.rank
  end)

  local lines = {}
  for i = 1, #groups do
    local g = groups[i]
    if i > limit then
      lines[#lines + 1] = format("%s... and %d more %s", indent, #groups - limit,
        plural(#groups - limit, "group"))
      break
    end
    lines[#lines + 1] = format("%s%s, %d %s", indent, g.key, g.count, plural(g.count, "object"))
    lines[#lines + 1] = format("%s  held by: %s", indent, held_by(w, g.first, 0))
  end
  for i = 1, #grown do
    local g = grown[i]
    if i > limit then
      lines[#lines + 1] = format("%s... and %d more grown %s", indent, #grown - limit,
        plural(#grown - limit, "table"))
      break
    end
    lines[#lines + 1] = format("%stable grew by %d %s", indent, g.by, plural(g.by, "entry"))
    lines[#lines + 1] = format("%s  held by: %s", indent, held_by(w, g.table, 0))
  end
  if #lines == 0 then
    lines[1] = indent .. "no new object is reachable and no table grew (strings that replace "
      .. "others, memory held by C code, or the VM's own structures)"
  end
  return lines
end

return holders
