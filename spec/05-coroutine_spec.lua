local helpers = require "spec.helpers"
local mem = helpers.mem

local yields = helpers.can_yield_in_scope

describe("scopes and coroutines", function()
  if yields then
    it("keep working when fn yields inside the scope", function()
      local co = coroutine.create(function(x)
        return mem.scope("req", function(a)
          local got = coroutine.yield(a + 1)
          return got * 2, mem.current().name
        end, x)
      end)
      local ok, v = coroutine.resume(co, 1)
      assert.is_true(ok)
      assert.are.equal(2, v)
      assert.is_nil(mem.current()) -- the resumer has no scope
      local ok2, r, name = coroutine.resume(co, 21)
      assert.is_true(ok2)
      assert.are.equal(42, r)
      assert.are.equal("req", name)
      assert.are.equal("dead", coroutine.status(co))
    end)

    -- (with LuaJIT's compiler off: what the recorder allocates counts for the active scope)
    it("do not count other coroutines' allocations while suspended", helpers.without_jit(function()
      local scope
      local co = coroutine.wrap(function()
        mem.scope("suspended", function()
          scope = mem.current()
          coroutine.yield()
          coroutine.yield()
        end)
      end)
      co()
      local before = scope:stats()
      local keep = {}
      for i = 1, 500 do keep[i] = { i } end -- the main thread allocates
      co()
      local after = scope:stats()
      assert.is_true(after.allocs - before.allocs < 10)
      assert.is_true(after.net_bytes - before.net_bytes < 500)
      co()
    end))

    it("attribute interleaved requests to their own scopes, as if run alone", function()
      local function handler(n)
        local rows = {}
        for i = 1, n do rows[i] = { i } end
        coroutine.yield()
        for i = 1, n do rows[i] = { rows[i][1], true } end
        coroutine.yield()
        return #rows
      end
      local function request(n)
        local stats
        local co = coroutine.create(function()
          return mem.scope({ name = "n=" .. n, on_exit = function(s) stats = s end }, handler, n)
        end)
        return co, function() return stats end
      end
      -- On LuaJIT, what the trace recorder allocates counts for the scope active while it
      -- records; the comparison is made with the JIT off.
      if helpers.is_jit then
        jit.off()
        jit.flush()
      end
      collectgarbage("stop")
      -- alone
      local alone = {}
      for _, n in ipairs { 10, 40 } do
        local co, stats = request(n)
        while coroutine.status(co) ~= "dead" do assert(coroutine.resume(co)) end
        alone[n] = stats()
      end
      -- interleaved
      local a, sa = request(10)
      local b, sb = request(40)
      while coroutine.status(a) ~= "dead" or coroutine.status(b) ~= "dead" do
        if coroutine.status(a) ~= "dead" then assert(coroutine.resume(a)) end
        local _ = { "noise from the loop" }
        if coroutine.status(b) ~= "dead" then assert(coroutine.resume(b)) end
      end
      collectgarbage("restart")
      if helpers.is_jit then jit.on() end
      assert.are.equal(alone[10].allocs, sa().allocs)
      assert.are.equal(alone[40].allocs, sb().allocs)
      assert.are.equal(alone[10].net_bytes, sa().net_bytes)
      assert.are.equal(alone[40].net_bytes, sb().net_bytes)
    end)

    it("restore the resumer's scope when the coroutine yields, ends or fails", function()
      mem.scope("outer", function()
        local co = coroutine.create(function()
          mem.scope("inner", function()
            coroutine.yield(mem.current().name)
            error("fail")
          end)
        end)
        local _, name = coroutine.resume(co)
        assert.are.equal("inner", name)
        assert.are.equal("outer", mem.current().name)
        local ok = coroutine.resume(co)
        assert.is_false(ok)
        assert.are.equal("outer", mem.current().name)
      end)
      assert.is_nil(mem.current())
    end)
  else
    it("raises a clear error when fn yields inside the scope (Lua 5.1)", function()
      local co = coroutine.create(function()
        return mem.scope(function() coroutine.yield() end)
      end)
      local ok, err = coroutine.resume(co)
      assert.is_false(ok)
      assert.matches("attempt to yield across", err)
      assert.matches("Lua 5.1 cannot yield inside mem.scope", err)
      assert.is_nil(mem.current())
    end)
  end

  it("attribute a coroutine without scopes to the scope that resumes it", function()
    -- (LuaJIT's recorder off: a block made while it records a trace through the call is the
    -- compiler's, not the scope's; spec/04's on_exit spec read allocs 0 once that way)
    helpers.recorder_off()
    finally(helpers.recorder_back)
    local gen = coroutine.wrap(function()
      while true do coroutine.yield({ "made by the generator" }) end
    end)
    gen()
    local stats = mem.scope({ on_exit = function() end }, function()
      for _ = 1, 10 do gen() end
      return mem.current():stats()
    end)
    assert.is_true(stats.allocs >= 10)
  end)

  it("keep coroutine.wrap's error behaviour", function()
    local f = coroutine.wrap(function() error("bad thing") end)
    local ok, err = pcall(f)
    assert.is_false(ok)
    assert.matches("bad thing", err)
    local e = {}
    ok, err = pcall(coroutine.wrap(function() error(e) end))
    assert.are.equal(e, err)
    local done = coroutine.wrap(function() end)
    done()
    ok, err = pcall(done)
    assert.is_false(ok)
    assert.matches("dead coroutine", err)
  end)

  it("keep coroutine.resume's answers for non-resumable coroutines", function()
    local ok, err = coroutine.resume(coroutine.running() or coroutine.create(function() end))
    if coroutine.running() then
      assert.is_false(ok)
      assert.matches("non%-suspended", err)
    end
    local co = coroutine.create(function() end)
    coroutine.resume(co)
    ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.matches("dead coroutine", err)
    assert.has_error(function() coroutine.resume(42) end)
  end)

  -- The running thread's record is cached by address (src/hook.rs `thread_cached`): a thread
  -- collected inside its scopes and a new one made at the same address must not share it.
  it("gives a coroutine made where a collected one was a record of its own", function()
    local wrong = 0
    for round = 1, 600 do
      local co = coroutine.create(function()
        mem.scope("dying", function() coroutine.yield() end)
      end)
      coroutine.resume(co)
      co = nil -- luacheck: ignore 311
      if round % 3 == 0 then collectgarbage() end
      local before, inside = coroutine.wrap(function()
        return mem.current(), mem.scope("fresh", function() return mem.current():stats().name end)
      end)()
      if before ~= nil or inside ~= "fresh" then wrong = wrong + 1 end
    end
    collectgarbage()
    collectgarbage()
    assert.are.equal(0, wrong)
    assert.is_nil(mem.current())
  end)
end)
