local helpers = require "spec.helpers"
local mem = helpers.mem
local holders = require "lunet.mem.holders"

-- The leaking handlers are made here, away from the tests' frames, so that what holds their
-- tables is the handler's upvalue, not a local of the test that is also on the stack.
local function make_handler()
  local seen = {}
  return function(req) seen[#seen + 1] = { req.id } end
end

local function make_cache_filler()
  local cache, n = {}, 0
  return function()
    n = n + 1
    cache[#cache + 1] = "entry " .. n -- a new string per call, kept by a table made before
  end
end

local function make_worker()
  return coroutine.create(function()
    local acc = {}
    while true do
      acc[#acc + 1] = { "job" }
      coroutine.yield()
    end
  end)
end

local function make_wrapped_worker()
  local backlog = {}
  local function body()
    while true do
      backlog[#backlog + 1] = {}
      coroutine.yield()
    end
  end
  local info = debug.getinfo(body, "S")
  return coroutine.wrap(body), info.short_src .. ":" .. info.linedefined
end

local function site(fn)
  local info = debug.getinfo(fn, "S")
  return info.short_src .. ":" .. info.linedefined
end

-- Plain-text search, with the report shown when it fails.
local function has(report, text)
  assert(report:find(text, 1, true), "expected the report to contain:\n  " .. text ..
    "\ngot:\n" .. report)
end
local function has_not(report, text)
  assert(not report:find(text, 1, true), "expected the report not to contain:\n  " .. text ..
    "\ngot:\n" .. report)
end

-- The group of a leaked object names the line that allocated it where the tracer saw that line
-- exactly (5.3, LuaJIT); 5.1 and 5.4 give a table constructor the line of the last call before it.
local EXACT_LINES = helpers.version == "lua53" or helpers.version == "luajit"
local function alloc_site(fn, offset)
  local info = debug.getinfo(fn, "S")
  return info.short_src .. ":" .. (info.linedefined + offset)
end
local function has_group(report, exact_site)
  has(report, "\n  table (spec/10-holders_spec.lua:")
  if EXACT_LINES then has(report, "\n  table (" .. exact_site .. "), 1 object\n") end
end

local function leak_report(fn, opts)
  local ok, report = mem.is_neutral(fn, opts)
  assert.is_false(ok)
  return report
end

describe("leak reports: who holds it", function()
  it("names the upvalue and the function that holds the tables, with its line", function()
    local handler = make_handler()
    local report = leak_report(function() handler({ id = 1 }) end, { name = "GET /users" })
    assert.matches('^leak in "GET /users": %+[%d.]+ bytes, %+[%d.]+ blocks? per run', report)
    has(report, "\n  table (" .. site(handler) .. "), 1 object\n")
    has(report, "held by: field [")
    has(report, "of upvalue 'seen' of function handler (" .. site(handler) .. ")")
    has(report, "table grew by 1 entry")
  end)

  it("names a global", function()
    _G.__holders_leak = {}
    local fn = function() _G.__holders_leak[#_G.__holders_leak + 1] = {} end
    local report = leak_report(fn)
    has(report, "held by: _G.__holders_leak[")
    has(report, "table grew by 1 entry\n    held by: _G.__holders_leak")
    _G.__holders_leak = nil
  end)

  it("names a registry entry", function()
    local registry = debug.getregistry()
    registry["holders.spec"] = { list = {} }
    local fn = function()
      local list = debug.getregistry()["holders.spec"].list
      list[#list + 1] = {}
    end
    local report = leak_report(fn)
    has(report, 'held by: registry["holders.spec"].list[')
    registry["holders.spec"] = nil
  end)

  it("names a metatable", function()
    local obj = setmetatable({}, { log = {} })
    local function log_it() local log = getmetatable(obj).log; log[#log + 1] = {} end
    local report = leak_report(function() log_it() end)
    has(report, "held by: field [")
    -- (`obj` is also a local of this test, as short a path as log_it's upvalue)
    has(report, "of field 'log' of metatable of ")
    assert.matches("of field 'log' of metatable of [a-z]+ 'obj'", report)
  end)

  it("names the metatable of a basic type", function()
    local string_mt = debug.getmetatable("")
    string_mt.__holders_log = {}
    local report = leak_report(function()
      local log = debug.getmetatable("").__holders_log
      log[#log + 1] = {}
    end)
    string_mt.__holders_log = nil
    has(report, 'held by: debug.getmetatable("").__holders_log[')
  end)

  it("names a suspended coroutine and its local", function()
    local worker = make_worker()
    coroutine.resume(worker)
    local report = leak_report(function() coroutine.resume(worker) end)
    local body_fn = debug.getinfo(worker, 1, "f").func
    local body = site(body_fn)
    has_group(report, alloc_site(body_fn, 3)) -- acc[#acc + 1] = { "job" }
    has(report, "of local 'acc' in function (" .. body .. ") of coroutine <" .. body ..
      "> (suspended) <- upvalue 'worker' of the checked function")
  end)

  -- Lua 5.1's debug.getupvalue does not read a C function's upvalues, and the function that
  -- coroutine.wrap returns is a C closure over its coroutine (as stock Lua's is).
  local it_upvalues_of_c = helpers.version == "lua51" and pending or it
  it_upvalues_of_c("names a coroutine's upvalue", function()
    local worker, body = make_wrapped_worker() -- (`body`: where the coroutine's function is)
    worker()
    local report = leak_report(function() worker() end)
    local line = tonumber(body:match(":(%d+)$"))
    has_group(report, body:gsub(":%d+$", ":" .. (line + 2))) -- backlog[#backlog + 1] = {}
    has(report, "of upvalue 'backlog' of function (" .. body .. ") <- a frame of coroutine <"
      .. body .. "> (suspended)")
  end)

  it("reports a table made before that grew, with its holder", function()
    local fill = make_cache_filler()
    local report = leak_report(function() fill() end)
    has(report, "\n  table grew by 1 entry\n    held by: upvalue 'cache' of function fill (" ..
      site(fill) .. ")")
    has_not(report, "object") -- strings are not listed as objects
  end)

  it("is not fooled by weak tables", function()
    local weak_values = setmetatable({}, { __mode = "v" })
    local weak_keys = setmetatable({}, { __mode = "k" })
    local kept = {}
    local function handler()
      local t = {}
      weak_values[#weak_values + 1] = t
      weak_keys[t] = { "only while t lives" }
      kept[#kept + 1] = t
    end
    local report = leak_report(handler)
    -- t, and the value of weak_keys[t], held while t lives:
    -- (on 5.1 and LuaJIT a weak-keyed table holds its values strongly: that value may show)
    -- (t and that value are allocated on two lines: two groups, where lines are known)
    has(report, "\n    held by: field [")
    has(report, "upvalue 'kept' of the checked function")
    has_not(report, "weak_values")
    has(report, "table grew by 1 entry\n    held by: upvalue 'kept' of the checked function")
    has_not(report, "table grew by 1 entry\n    held by: upvalue 'weak") -- weak tables do not count
  end)

  it("shows a userdata key on the path", function()
    local file = io.tmpfile()
    local by_file = { [file] = {} }
    local report = leak_report(function()
      local list = by_file[file]
      list[#list + 1] = {}
    end)
    file:close()
    assert.matches("held by: field %[%d+%] of field %[userdata%] of [a-z]+ 'by_file'", report)
  end)

  it("adds nothing for a handler that leaks nothing", function()
    local cache = {}
    assert.is_true(mem.is_neutral(function()
      local t = { 1, 2, 3 }
      cache.last = t
      return #t
    end))
  end)

  it("appears in the busted assertion's message", function()
    require "lunet.mem.busted"
    local handler = make_handler()
    local ok, err = pcall(assert.is_neutral, function() handler({ id = 2 }) end)
    assert.is_false(ok)
    local msg = type(err) == "table" and err.message or tostring(err)
    has(msg, "of upvalue 'seen' of function handler (" .. site(handler) .. ")")
  end)
end)

describe("checkpoints with holders", function()
  it("say what holds what was made since mem.checkpoint{holders = true}", helpers.without_jit(function()
    local handler = make_handler()
    local cp = mem.checkpoint { name = "since start", holders = true }
    for i = 1, 3 do handler({ id = i }) end
    local ok, report = cp:is_neutral()
    assert.is_false(ok)
    has(report, 'leak since "since start"')
    has(report, "upvalue 'seen' of function")
    local err = helpers.raises("held by:", cp.assert_neutral, cp)
    has(err, "upvalue 'seen'")
  end))

  it("add nothing when nothing leaked", helpers.without_jit(function()
    -- (the garbage is made in a function of its own: a stale slot of this frame would hold it)
    local function churn()
      local t = { 1, 2, 3 }
      return #t
    end
    local function scenario()
      local cp = mem.checkpoint { holders = true }
      churn()
      return cp:is_neutral()
    end
    assert.is_true((scenario()))
  end))

  it("add nothing without the option", helpers.without_jit(function()
    local handler = make_handler()
    local cp = mem.checkpoint()
    handler({ id = 1 })
    local ok, report = cp:is_neutral()
    assert.is_false(ok)
    has_not(report, "held by:")
  end))
end)

describe("holders.snapshot() / holders.explain()", function()
  it("report nothing when nothing new is alive", helpers.without_jit(function()
    local before = holders.snapshot()
    local lines = holders.explain(before)
    assert.are.equal(1, #lines)
    assert.matches("no new object is reachable", lines[1])
  end))

  it("follow weak-keyed tables as the collector does (ephemerons on 5.2+)", helpers.without_jit(function()
    local cache = setmetatable({}, { __mode = "k" })
    local function plant()
      local key = {}
      cache[key] = { key } -- a cycle through the weak key
    end
    local before = holders.snapshot()
    plant()
    local report = "\n" .. table.concat(holders.explain(before), "\n")
    if _VERSION == "Lua 5.1" then
      -- 5.1 and LuaJIT hold the value strongly, and the value holds the key: a real leak.
      -- (a table's site is that of the function that holds it: this one, by `cache`)
      has(report, "\n  table (" .. site(debug.getinfo(1, "f").func) .. "), 2 objects\n")
    else
      has(report, "no new object is reachable")
    end
  end))

  it("keep nothing alive", function()
    local t = {}
    local before = holders.snapshot()
    assert.is_true(before[t] ~= nil)
    local probe = setmetatable({ t }, { __mode = "v" })
    t = nil
    collectgarbage()
    collectgarbage()
    assert.is_nil(probe[1])
    assert.is_true(before ~= nil)
  end)

  it("list new objects by type and function", helpers.without_jit(function()
    local keep = {}
    local function make() return function() return keep end end
    local before = holders.snapshot()
    keep.a, keep.b = make(), {}
    local report = "\n" .. table.concat(holders.explain(before), "\n")
    has(report, "\n  function (" .. site(make) .. "), 1 object\n") -- (made on the same line)
    has(report, "\n  table (" .. site(debug.getinfo(1, "f").func) .. "), 1 object\n")
    -- (the function may be shown held by a stale stack slot: LuaJIT keeps one)
    has(report, "held by: field 'b' of local 'keep'")
  end))
end)
