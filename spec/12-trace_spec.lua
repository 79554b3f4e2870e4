local helpers = require "spec.helpers"
local mem = helpers.mem
local trace = mem.trace

-- Lines of this file where the allocations below happen (checked against the file itself).
local SRC = debug.getinfo(1, "S").short_src

-- Each string is new (5.1 and LuaJIT intern every string: one made twice is allocated once).
local kept, made = {}, 0
local function leak_strings(n)
  for _ = 1, n do
    made = made + 1
    kept[#kept + 1] = ("leak-"):rep(20) .. made -- LEAK_LINE
  end
end

local function make_closures(n)
  local out = {}
  for i = 1, n do
    out[i] = function() return i end -- CLOSURE_LINE
  end
  return out
end

local function line_of(marker)
  local n = 0
  for line in io.lines(SRC) do
    n = n + 1
    if line:find("-- " .. marker, 1, true) then return n end
  end
  error("no line with " .. marker)
end
local LEAK_LINE, CLOSURE_LINE = line_of("LEAK_LINE"), line_of("CLOSURE_LINE")

local function find(stats, site)
  for _, s in ipairs(stats) do
    if s.site == site then return s end
  end
end

local function settle()
  collectgarbage("collect")
  collectgarbage("collect")
end

describe("mem.trace", function()
  after_each(function()
    trace.stop()
    kept = {}
  end)

  it("names the allocating lines with their live blocks, biggest first", function()
    kept = {}
    settle()
    trace.start()
    leak_strings(200)
    local closures = make_closures(100)
    settle()
    local snap = assert(trace.snapshot())
    local top = snap:top(10, "line")
    assert.are.equal(SRC .. ":" .. LEAK_LINE, top[1].site)
    local leaks = find(top, SRC .. ":" .. LEAK_LINE)
    -- 200 strings kept, plus the array part of `kept` (moved by each growth).
    assert.are.equal(201, leaks.blocks)
    assert.is_true(leaks.bytes > 200 * 100)
    local cl = find(top, SRC .. ":" .. CLOSURE_LINE)
    assert.is_not_nil(cl)
    -- A closure and its upvalue per iteration (5.1 gives a closure the line of the previous
    -- call or concatenation: see src/trace/mod.rs).
    if helpers.version ~= "lua51" then
      assert.is_true(cl.blocks >= 200 and cl.blocks <= 202, tostring(cl.blocks))
    end
    for i = 2, #top do assert.is_true(top[i - 1].bytes >= top[i].bytes) end
    assert.is_true(#snap:top(1) == 1)
    assert.are.equal(#snap:top(), #snap:top(1000))
    assert.is_not_nil(closures)
  end)

  it("groups by function and by traceback", function()
    settle()
    trace.start({ depth = 4 })
    leak_strings(50)
    settle()
    local snap = trace.snapshot()
    local funcs = snap:top(5, "function")
    if helpers.version == "lua51" then -- (5.1 frames have no names: see src/trace/mod.rs)
      assert.matches("^function <.*12%-trace_spec.lua:%d+>$", funcs[1].site)
    else
      assert.matches("^leak_strings %(.*12%-trace_spec.lua:%d+%)$", funcs[1].site)
    end
    assert.are.equal(51, funcs[1].blocks)
    local tb = snap:top(1, "traceback")[1]
    assert.is_table(tb.traceback)
    assert.is_true(#tb.traceback >= 2 and #tb.traceback <= 4)
    assert.are.equal(tb.site, table.concat(tb.traceback, " <- "))
    assert.matches(":" .. LEAK_LINE .. " in ", tb.traceback[1], 1, true)
  end)

  it("compare() shows the growth at the leaking line", function()
    settle()
    trace.start()
    leak_strings(10)
    settle()
    local before = trace.snapshot()
    leak_strings(100)
    settle()
    local after = trace.snapshot()
    local diff = after:compare(before)
    assert.are.equal(SRC .. ":" .. LEAK_LINE, diff[1].site)
    assert.are.equal(100, diff[1].blocks_diff)
    assert.are.equal(111, diff[1].blocks)
    assert.is_true(diff[1].bytes_diff > 100 * 100)
  end)

  it("frees remove records, and reading the stack does not change live_bytes", function()
    settle()
    trace.start()
    local tmp = {}
    for i = 1, 100 do tmp[i] = ("t"):rep(50) .. i end
    tmp = nil
    settle()
    local snap = trace.snapshot()
    for _, s in ipairs(snap:top()) do
      assert.is_true(s.blocks < 10, s.site .. " " .. s.blocks)
    end
    assert.is_true(helpers.exact())
  end)

  it("samples with sample_bytes and scales the estimate", function()
    settle()
    trace.start({ sample_bytes = 4096 })
    leak_strings(20000)
    settle()
    local s = find(trace.snapshot():top(), SRC .. ":" .. LEAK_LINE)
    local exact_bytes = 0
    for _, v in ipairs(kept) do exact_bytes = exact_bytes + #v end
    -- Every kept string is a block of its length plus a header of a few dozen bytes. About 650
    -- samples of ~130-byte blocks: the estimate's deviation is ~4%, the bounds are 6 of them.
    assert.is_not_nil(s)
    assert.is_true(s.blocks > 20000 * 0.75 and s.blocks < 20000 * 1.25, tostring(s.blocks))
    assert.is_true(s.bytes > exact_bytes * 0.85 and s.bytes < exact_bytes * 2, tostring(s.bytes))
  end)

  it("dump() writes folded stacks", function()
    settle()
    trace.start()
    leak_strings(30)
    settle()
    local path = os.tmpname()
    assert.is_true(trace.snapshot():dump(path))
    local found = false
    for line in io.lines(path) do
      assert.matches("^.+ %d+$", line)
      if line:find("leak_strings", 1, true) or line:find(":" .. LEAK_LINE .. ")", 1, true) then
        found = true
      end
    end
    os.remove(path)
    assert.is_true(found)
  end)

  it("flamegraph() writes an SVG with the function names", function()
    settle()
    trace.start()
    leak_strings(30)
    settle()
    local path = os.tmpname()
    assert.is_true(trace.snapshot():flamegraph(path, { title = "spec flame" }))
    local f = assert(io.open(path))
    local svg = f:read("*a")
    f:close()
    os.remove(path)
    assert.matches("^<%?xml", svg)
    assert.matches("<svg", svg, 1, true)
    assert.matches("spec flame", svg, 1, true)
    assert.matches(helpers.version == "lua51" and "function &lt;" or "leak_strings", svg, 1, true)
    local ok, msg = trace.snapshot():flamegraph("/nonexistent/dir/x.svg")
    assert.is_nil(ok)
    assert.matches("/nonexistent/dir/x.svg", msg, 1, true)
  end)

  it("stop() ends recording; snapshot() then says so", function()
    trace.start()
    assert.is_true(trace.is_tracing())
    assert.is_false(trace.start())
    local snap = trace.snapshot()
    trace.stop()
    assert.is_false(trace.is_tracing())
    local none, msg = trace.snapshot()
    assert.is_nil(none)
    assert.matches("not tracing", msg)
    -- A snapshot taken before stays readable.
    assert.is_table(snap:top())
  end)

  it("follows coroutines: a coroutine's allocations name its lines", function()
    settle()
    trace.start()
    local co = coroutine.wrap(function()
      coroutine.yield()
      leak_strings(40)
    end)
    co()
    co()
    settle()
    local s = find(trace.snapshot():top(), SRC .. ":" .. LEAK_LINE)
    assert.are.equal(41, s.blocks)
  end)

  it("raises bad argument errors", function()
    helpers.raises("bad argument #1 to 'start' (table expected, got number)", function() trace.start(1) end)
    helpers.raises("bad argument #1 to 'start' (unknown option 'x')", function() trace.start({ x = 1 }) end)
    helpers.raises("bad argument #1 to 'start' (option 'depth': integer from 1 to 64 expected, got 0)",
      function() trace.start({ depth = 0 }) end)
    helpers.raises("bad argument #1 to 'start' (option 'sample_bytes': integer from 1",
      function() trace.start({ sample_bytes = "x" }) end)
    trace.start()
    local snap = trace.snapshot()
    helpers.raises("bad argument #2 to 'top' (integer from 0 to", function() snap:top("x") end)
    helpers.raises("bad argument #3 to 'top' ('line', 'function' or 'traceback' expected, got 'file')",
      function() snap:top(1, "file") end)
    helpers.raises("bad argument #1 to 'top' (snapshot expected, got table)", function() snap.top({}) end)
    helpers.raises("bad argument #2 to 'compare' (snapshot expected, got nil)", function() snap:compare() end)
    helpers.raises("bad argument #2 to 'dump' (string expected, got nil)", function() snap:dump() end)
    helpers.raises("bad argument #2 to 'flamegraph' (string expected, got number)",
      function() snap:flamegraph(1) end)
    helpers.raises("bad argument #3 to 'flamegraph' (unknown option 'w')",
      function() snap:flamegraph("x", { w = 1 }) end)
  end)
end)
