local helpers = require "spec.helpers"

-- These run a fresh interpreter: loading, closing and exiting are per process.
local function run(code)
  local ok, out, status = helpers.run_lua(code)
  assert.is_true(status ~= nil and status < 128, "crashed (status " .. tostring(status) .. "):\n" .. out)
  return ok, out, status
end

describe("the module's life in a state", function()
  it("wraps the allocator once when loaded again", function()
    local ok, out = run [[
      local m1 = require "lunet.mem"
      local resume, wrap = coroutine.resume, coroutine.wrap
      local allocs = m1.stats().allocs
      package.loaded["lunet.mem"] = nil
      local m2 = require "lunet.mem"
      assert(m1 ~= m2)
      assert(coroutine.resume == resume and coroutine.wrap == wrap, "wrapped twice")
      assert(m2.stats().allocs > allocs, "counters were reset")
      local c = collectgarbage("count") * 1024
      assert(m2.stats().live_bytes == c, "not exact after reload")
      local s = m2.scope("x", function() return m1.current().name end)
      assert(s == "x")
      print("ok")
    ]]
    assert.is_true(ok, out)
    assert.matches("ok", out)
  end)

  it("closes cleanly with open scopes, suspended coroutines and checkpoints", function()
    local ok, out = run [[
      local mem = require "lunet.mem"
      local cp = mem.checkpoint("at exit")
      local keep = {}
      for i = 1, 10 do
        local co = coroutine.create(function()
          mem.scope("pending " .. i, function() coroutine.yield() end)
        end)
        coroutine.resume(co)
        keep[i] = co
      end
      local scope = mem.scope(mem.current)
      setmetatable(keep, { __gc = function() pcall(mem.stats) end })
      io.write("ok\n")
      os.exit(0, true)
    ]]
    assert.is_true(ok, out)
    assert.matches("ok", out)
  end)

  it("survives finalizers that use the module while the state closes", function()
    local ok, out = run [[
      local mem = require "lunet.mem"
      local objs = {}
      for i = 1, 100 do
        local o = newproxy and newproxy(true) or setmetatable({}, {})
        local mt = getmetatable(o)
        mt.__gc = function()
          pcall(mem.stats)
          pcall(mem.scope, "gc", function() return {} end)
          pcall(mem.checkpoint)
        end
        objs[i] = o
      end
      print("ok")
    ]]
    assert.is_true(ok, out)
  end)

  it("reports an error raised at top level inside a scope without crashing", function()
    local ok, out, status = run [[
      local mem = require "lunet.mem"
      mem.scope("top", function() error("top-level failure") end)
    ]]
    assert.is_false(ok)
    assert.are.equal(1, status)
    assert.matches("top%-level failure", out)
  end)

  it("counts exactly from the first allocation after loading", function()
    local ok, out = run [[
      local mem = require "lunet.mem"
      local c = collectgarbage("count") * 1024
      local s = mem.stats()
      assert(s.live_bytes == c, s.live_bytes .. " ~= " .. c)
      print("ok")
    ]]
    assert.is_true(ok, out)
  end)
end)
