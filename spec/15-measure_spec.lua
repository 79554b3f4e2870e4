local helpers = require "spec.helpers"
local mem = helpers.mem
require "lunet.mem.busted"

-- The interpreter's own count of the bytes `make()` leaves live (its tables included), read with
-- the collector stopped: the figures mem.measure gives are checked against it.
-- (LuaJIT's compiler is off meanwhile: its trace recorder allocates too.)
local function counted_bytes(make, ...)
  if helpers.is_jit then
    jit.off()
    jit.flush()
  end
  collectgarbage("collect")
  collectgarbage("stop")
  local before = collectgarbage("count")
  make(...)
  local after = collectgarbage("count")
  collectgarbage("restart")
  if helpers.is_jit then jit.on() end
  return (after - before) * 1024
end

local function new_table(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

local FIELDS = { "allocs", "frees", "reallocs", "allocated_bytes", "freed_bytes", "bytes_allocated",
  "bytes_freed", "net_bytes", "peak_bytes", "retained_bytes" }

local function message_of(err)
  return type(err) == "table" and err.message or tostring(err)
end

-- A request handler; with `with_tag`, the change that adds one table. (On a line of its own,
-- after a call: Lua 5.1 and 5.4 do not save the pc before a table constructor, and the tracer
-- gives it the line of the last call in its function; see the README's `mem.trace`.)
local TAG_LINE = debug.getinfo(1, "l").currentline + 1
local function new_tag(req) local id = tostring(req.id); return { id = id } end
local function handler(req, with_tag)
  local response = { status = 200, body = "user " .. req.id }
  if with_tag then response.tag = new_tag(req) end
  return response
end

describe("mem.measure()", function()
  it("counts a new table: one block, its size", function()
    local size = counted_bytes(function() return {} end)
    local m = mem.measure(function() return {} end)
    assert.same({ 1, 0, size, 0, size, size, 0 },
      { m.allocs, m.frees, m.allocated_bytes, m.freed_bytes, m.net_bytes, m.peak_bytes, m.retained_bytes })
  end)

  it("counts a table of n entries, and what the call keeps as retained", function()
    for _, n in ipairs { 1, 10, 100, 1000 } do
      local size = counted_bytes(new_table, n)
      local keep = { false }
      local m = mem.measure({ warmup = 0 }, function() keep[1] = new_table(n) end)
      assert.are.equal(size, m.net_bytes)
      if helpers.version == "lua55" then
        -- (5.5 grows a table's array into a new block, then frees the old one: both are live
        -- for a moment; the others resize it in place)
        assert.is_true(m.peak_bytes >= size and m.peak_bytes <= 2 * size,
          ("peak %d for a table of %d bytes"):format(m.peak_bytes, size))
      else
        assert.are.equal(size, m.peak_bytes)
      end
      assert.are.equal(size, m.retained_bytes)
      if helpers.version == "lua55" then
        -- the table and its array, each growth of the array a new block and a free
        assert.are.equal(m.allocs - 2, m.frees)
        assert.are.equal(0, m.reallocs)
      else
        assert.are.equal(2, m.allocs) -- the table and its array (grown in place: reallocs)
      end
      assert.are.equal(m.allocated_bytes - m.freed_bytes, m.net_bytes)
      -- what a call drops is not retained
      assert.are.equal(0, mem.measure(new_table, n).retained_bytes)
    end
  end)

  it("gives the scope vocabulary's names for the same figures", function()
    local m = mem.measure(new_table, 10)
    assert.are.equal(m.allocated_bytes, m.bytes_allocated)
    assert.are.equal(m.freed_bytes, m.bytes_freed)
  end)

  it("has the peak of a call above its start, however much it frees before returning", function()
    local size = counted_bytes(new_table, 1000)
    -- (dropped in a frame of its own: LuaJIT's collector sees every slot of a live frame)
    local function make_garbage() new_table(1000) end
    local m = mem.measure(function()
      make_garbage()
      collectgarbage("collect")
      return {}
    end)
    assert.is_true(m.peak_bytes >= size)
    assert.is_true(m.net_bytes < m.peak_bytes - size / 2)
    assert.is_true(m.frees >= 2)
  end)

  it("gives the same figures on every run", function()
    local runs = {}
    for i = 1, 5 do runs[i] = mem.measure(handler, { id = 7 }, true) end
    for i = 2, 5 do
      for _, k in ipairs(FIELDS) do assert.are.equal(runs[1][k], runs[i][k], k) end
    end
  end)

  it("runs `warmup` calls first (default 1)", function()
    local calls, cache = 0, nil
    local function cached()
      calls = calls + 1
      if not cache then cache = new_table(100) end
      return {}
    end
    local cold = mem.measure({ warmup = 0 }, cached)
    assert.are.equal(1, calls)
    cache = nil
    local warm = mem.measure(cached)
    assert.are.equal(3, calls)
    assert.is_true(cold.retained_bytes > 0)
    assert.are.equal(0, warm.retained_bytes)
    assert.are.equal(1, warm.allocs)
    mem.measure({ warmup = 3 }, cached)
    assert.are.equal(7, calls)
  end)

  it("passes the arguments to fn", function()
    local got
    mem.measure(function(...) got = { n = select("#", ...), ... } end, 1, nil, "x", nil)
    assert.same({ n = 4, 1, nil, "x", nil }, got)
    mem.measure({ warmup = 0 }, function(...) got = { n = select("#", ...), ... } end, "y")
    assert.same({ n = 1, "y" }, got)
  end)

  it("checks its arguments", function()
    helpers.raises("bad argument #1 to 'measure' (function or table expected, got nil)", mem.measure)
    helpers.raises("bad argument #1 to 'measure' (function or table expected, got number)",
      mem.measure, 5, print)
    helpers.raises("bad argument #2 to 'measure' (function expected, got nil)", mem.measure, {})
    helpers.raises("bad argument #1 to 'measure' (unknown option 'runs')",
      mem.measure, { runs = 2 }, print)
    helpers.raises(
      "bad argument #1 to 'measure' (option 'warmup': integer from 0 to 100000 expected, got -1)",
      mem.measure, { warmup = -1 }, print)
    helpers.raises("(option 'warmup': integer from 0 to 100000 expected, got 1.5)",
      mem.measure, { warmup = 1.5 }, print)
    helpers.raises("(option 'warmup': integer from 0 to 100000 expected, got string)",
      mem.measure, { warmup = "1" }, print)
    -- the caller's line
    local ok, err = pcall(function() mem.measure(nil) end)
    assert.is_false(ok)
    assert.matches("15%-measure_spec%.lua:%d+: bad argument #1 to 'measure'", err)
  end)

  it("takes a callable table", function()
    local callable = setmetatable({}, { __call = function() return {} end })
    assert.are.equal(1, mem.measure(callable).allocs)
  end)

  it("lets errors of fn through, and gives the compiler back", function()
    local ok, err = pcall(mem.measure, function() error("boom") end)
    assert.is_false(ok)
    assert.matches("boom", err)
    local value = {}
    ok, err = pcall(mem.measure, { warmup = 0 }, function() error(value) end)
    assert.are.equal(value, err)
    if helpers.is_jit then assert.is_true((jit.status())) end
    -- and measures again after
    assert.are.equal(1, mem.measure(function() return {} end).allocs)
  end)

  it("keeps LuaJIT's compiler off while it measures, and on after", function()
    if not helpers.is_jit then
      pending("LuaJIT only")
      return
    end
    local during
    mem.measure(function() during = jit.status() end)
    assert.is_false(during)
    assert.is_true((jit.status()))
  end)

  it("works inside a coroutine, with the same figures", function()
    local outside = mem.measure(handler, { id = 1 }, true)
    local inside = coroutine.wrap(function() return mem.measure(handler, { id = 1 }, true) end)()
    for _, k in ipairs(FIELDS) do assert.are.equal(outside[k], inside[k], k) end
  end)

  it("gives the same figures whatever the caller's depth (the stack is reserved)", function()
    -- (Lua 5.3 shrinks a thread's stack at each collection to 9/8 of what is in use: a call
    -- deeper than the readings would grow it inside its scope, by an amount set by the depth.)
    local function at_depth(n, deep_fn)
      if n == 0 then return mem.measure(deep_fn, 40) end
      return (at_depth(n - 1, deep_fn))
    end
    local function recurse(n)
      if n == 0 then return { n } end
      local t = recurse(n - 1)
      return t
    end
    local first = at_depth(0, recurse)
    for _, depth in ipairs({ 1, 3, 10, 50, 3, 0 }) do
      local m = at_depth(depth, recurse)
      for _, k in ipairs(FIELDS) do assert.are.equal(first[k], m[k], k .. " at depth " .. depth) end
    end
    local inside = coroutine.wrap(function() return at_depth(5, recurse) end)()
    for _, k in ipairs(FIELDS) do assert.are.equal(first[k], inside[k], k .. " in a coroutine") end
  end)

  it("refuses a fn that yields", function()
    local co = coroutine.create(function() return mem.measure(coroutine.yield) end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.matches("attempt to yield across", err)
    if helpers.is_jit then assert.is_true((jit.status())) end
  end)

  it("works inside another scope, which counts the call too", function()
    local alone = mem.measure(handler, { id = 1 }, true)
    local stats
    local inner = mem.scope({ name = "outer", on_exit = function(s) stats = s end }, mem.measure,
      handler, { id = 1 }, true)
    for _, k in ipairs(FIELDS) do assert.are.equal(alone[k], inner[k], k) end
    assert.is_true(stats.bytes_allocated >= 2 * inner.allocated_bytes) -- warm-up and measured calls
  end)

  it("works inside another measure", function()
    local alone = mem.measure(handler, { id = 1 }, true)
    local inner
    local outer = mem.measure({ warmup = 0 }, function() inner = mem.measure(handler, { id = 1 }, true) end)
    for _, k in ipairs(FIELDS) do assert.are.equal(alone[k], inner[k], k) end
    assert.is_true(outer.allocated_bytes > inner.allocated_bytes)
    if helpers.is_jit then assert.is_true((jit.status())) end
  end)
end)

describe("assert.allocates_at_most()", function()
  it("gates a handler's bytes per call, exactly", function()
    local bytes = mem.measure(handler, { id = 1 }).allocated_bytes
    assert.allocates_at_most(bytes, handler, { id = 1 })
    assert.is_not.allocates_at_most(bytes - 1, handler, { id = 1 })
  end)

  it("gates bytes and blocks", function()
    local m = mem.measure(handler, { id = 1 })
    assert.allocates_at_most({ bytes = m.allocated_bytes, blocks = m.allocs }, handler, { id = 1 })
    assert.allocates_at_most({ blocks = m.allocs }, handler, { id = 1 })
    assert.is_not.allocates_at_most({ blocks = m.allocs - 1 }, handler, { id = 1 })
    assert.is_not.allocates_at_most({ bytes = m.allocated_bytes, blocks = m.allocs - 1 }, handler, { id = 1 })
  end)

  it("fails when a change adds one table, naming the figures and the table's line", function()
    local before = mem.measure(handler, { id = 1 })
    local after = mem.measure(handler, { id = 1 }, true)
    local ok, err = pcall(assert.allocates_at_most, before.allocated_bytes, handler, { id = 1 }, true)
    assert.is_false(ok)
    local msg = message_of(err)
    assert.matches(("Expected the call to allocate at most %d bytes:"):format(before.allocated_bytes),
      msg, 1, true)
    assert.matches(("allocated %d bytes in %d blocks"):format(after.allocated_bytes, after.allocs),
      msg, 1, true)
    assert.matches("top allocation sites of a traced call:", msg, 1, true)
    assert.matches("#%d+  [^\n]*15%-measure_spec%.lua:" .. TAG_LINE .. " ", msg)
  end)

  it("has a negation that fails for a call within the limit", function()
    local ok, err = pcall(assert.is_not.allocates_at_most, 1000000, handler, { id = 1 })
    assert.is_false(ok)
    assert.matches("Expected the call to allocate more than 1000000 bytes:", message_of(err), 1, true)
  end)

  it("checks its arguments", function()
    helpers.raises("bad argument #1 to 'allocates_at_most' (number or table expected, got nil)",
      assert.allocates_at_most, nil, handler)
    helpers.raises("bad argument #1 to 'allocates_at_most' (non-negative integer expected, got -1)",
      assert.allocates_at_most, -1, handler)
    helpers.raises("bad argument #1 to 'allocates_at_most' (unknown field 'count')",
      assert.allocates_at_most, { count = 1 }, handler)
    helpers.raises("(field 'blocks': non-negative integer expected, got 0.5)",
      assert.allocates_at_most, { blocks = 0.5 }, handler)
    helpers.raises("(table with 'bytes' or 'blocks' expected, got an empty table)",
      assert.allocates_at_most, {}, handler)
    helpers.raises("bad argument #2 to 'allocates_at_most' (function expected, got nil)",
      assert.allocates_at_most, 10)
    local ok, err = pcall(function() assert.allocates_at_most(nil, handler) end)
    assert.is_false(ok)
    assert.matches("15%-measure_spec%.lua:%d+: bad argument #1", err)
  end)
end)

describe("assert.retains_at_most()", function()
  it("passes for a handler that keeps nothing", function()
    assert.retains_at_most(0, handler, { id = 1 }, true)
  end)

  it("fails for a handler that keeps a table, naming the figures and the table's line", function()
    local kept -- a list: every call keeps the same bytes (an array part would grow by steps)
    local function remember(req)
      local tag = new_tag(req)
      tag.next = kept
      kept = tag
    end
    local size = mem.measure(remember, { id = 1 }).retained_bytes
    assert.is_true(size > 0)
    assert.retains_at_most(size, remember, { id = 1 })
    assert.is_not.retains_at_most(size - 1, remember, { id = 1 })
    local ok, err = pcall(assert.retains_at_most, 0, remember, { id = 1 })
    assert.is_false(ok)
    local msg = message_of(err)
    assert.matches("Expected the call to retain at most 0 bytes:", msg, 1, true)
    assert.matches(("retained %+d bytes"):format(size), msg, 1, true)
    assert.matches("top sites of what a traced call retained:", msg, 1, true)
    assert.matches("15%-measure_spec%.lua:" .. TAG_LINE .. " ", msg)
  end)

  it("has a negation that reads as one", function()
    local ok, err = pcall(assert.is_not.retains_at_most, 0, handler, { id = 1 })
    assert.is_false(ok)
    assert.matches("Expected the call to retain more than 0 bytes:", message_of(err), 1, true)
  end)

  it("checks its arguments", function()
    helpers.raises("bad argument #1 to 'retains_at_most' (number expected, got table)",
      assert.retains_at_most, {}, handler)
    helpers.raises("bad argument #1 to 'retains_at_most' (non-negative integer expected, got -5)",
      assert.retains_at_most, -5, handler)
    helpers.raises("bad argument #2 to 'retains_at_most' (function expected, got string)",
      assert.retains_at_most, 0, "handler")
  end)
end)
