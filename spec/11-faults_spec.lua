local helpers = require "spec.helpers"
local mem = helpers.mem

local MEMERR = "not enough memory"

local function settle()
  collectgarbage("collect")
  collectgarbage("collect")
end

-- Lua 5.4.4 makes the metatable of luaL_Buffer's box lazily; a memory error in the middle leaves
-- it without __close, and every later table.concat of a long result fails with "got a
-- non-closable value" (a bug of Lua's, found by these specs). Making it once up front avoids it.
table.concat({ ("x"):rep(1000), ("y"):rep(1000) })

-- A request handler: parses a header string, builds a response table, formats a body.
local function handler(req)
  local headers = {}
  for k, v in req:gmatch("(%w+)=(%w+)") do headers[k] = v end
  local parts = {}
  for i = 1, 10 do parts[i] = ("%s:%d"):format(headers.path or "?", i) end
  return table.concat(parts, ",")
end

describe("mem.scope{limit = bytes}", function()
  before_each(settle)

  it("runs a scope within its budget", function()
    assert.are.equal(10, #mem.scope({ limit = 64 * 1024 }, function()
      local t = {}
      for i = 1, 10 do t[i] = ("x"):rep(i) end
      return t
    end))
  end)

  it("fails the allocation that goes over, with Lua's own error, and the VM is unharmed", function()
    local ok, err = pcall(mem.scope, { name = "over", limit = 16 * 1024 }, function()
      local t = {}
      for i = 1, 10000 do t[i] = ("x"):rep(100) .. i end
      return t
    end)
    assert.is_false(ok)
    assert.are.equal(MEMERR, err)
    settle()
    assert.is_true(helpers.exact())
    -- everything still works, and memory outside the scope is not limited
    local big = {}
    for i = 1, 10000 do big[i] = ("y"):rep(10) .. i end
    assert.are.equal(10000, #big)
  end)

  it("lets the tightest of nested limits win", function()
    local inner_ok, inner_err
    local outer = mem.scope({ limit = 1024 * 1024 }, function()
      inner_ok, inner_err = pcall(mem.scope, { limit = 4096 }, function()
        local t = {}
        for i = 1, 1e5 do t[i] = { i } end
      end)
      local t = {}
      for i = 1, 1000 do t[i] = { i } end
      return #t
    end)
    assert.is_false(inner_ok)
    assert.are.equal(MEMERR, inner_err)
    assert.are.equal(1000, outer)
    local ok, err = pcall(mem.scope, { limit = 4096 }, function()
      return mem.scope({ limit = 1024 * 1024 }, function()
        local t = {}
        for i = 1, 1e5 do t[i] = { i } end
      end)
    end)
    assert.is_false(ok)
    assert.are.equal(MEMERR, err)
  end)

  -- (LuaJIT's interpreter leaves the thread's top where the last call into C put it, often
  -- below the running frame's base: a refusal there was taken for one inside a fast function,
  -- where failing would crash, and admitted past the budget. On the current LuaJIT a 4096-byte
  -- budget let 1073 tables be made, and a 1 MiB scope around such a run then failed. A child
  -- with the compiler off from its start, so that no trace of the suite's runs the scope.)
  it("refuses at its limit in interpreted code too (LuaJIT with its compiler off)", function()
    local ok, out = helpers.run_lua([[
      local mem = require "lunet.mem"
      if jit then jit.off() end
      local made = 0
      local function fill(count)
        local t = {}
        for i = 1, 1e5 do
          t[i] = { i }
          count(i)
        end
      end
      local function set(i) made = i end
      local ok, err = pcall(mem.scope, { limit = 4096 }, function() return fill(set) end)
      print("alone", ok, err, made)
      made = 0
      local inner_made
      print("nested", pcall(mem.scope, { limit = 1024 * 1024 }, function()
        local inner_ok = pcall(mem.scope, { limit = 4096 }, function() return fill(set) end)
        inner_made = made
        local t = {}
        for i = 1, 1000 do t[i] = { i } end
        return inner_ok, #t
      end))
      print("nested made", inner_made)
    ]])
    assert.is_true(ok, out)
    local alone = tonumber(out:match("alone\tfalse\tnot enough memory\t(%d+)"))
    assert.is_truthy(alone, out)
    assert.is_true(alone < 200, out)
    assert.is_truthy(out:find("nested\ttrue\tfalse\t1000", 1, true), out)
    assert.is_true(tonumber(out:match("nested made\t(%d+)")) < 200, out)
  end)

  it("never fails a free: a scope at its limit can drop what it made and go on", function()
    local filled, ok, n = mem.scope({ limit = 64 * 1024 }, function()
      local t = {}
      local filled = not pcall(function()
        for i = 1, 1e6 do t[i] = { i } end
      end)
      t = nil -- luacheck: ignore 311
      pcall(collectgarbage, "collect")
      return filled, pcall(function()
        local u = {}
        for i = 1, 100 do u[i] = { i } end
        return #u
      end)
    end)
    assert.is_true(filled)
    assert.is_true(ok)
    assert.are.equal(100, n)
  end)

  -- (JIT off: a trace recorded while the scope ran may keep one of its strings as a constant,
  -- and the arena with it, until the trace is flushed)
  it("combines with an arena", helpers.without_jit(function()
    local ok, err = pcall(mem.scope, { name = "arena+limit", arena = true, limit = 8192 },
      function()
        local t = {}
        for i = 1, 1000 do t[i] = ("z"):rep(20) .. i end
      end)
    assert.is_false(ok)
    assert.are.equal(MEMERR, err)
    settle()
    assert.are.equal(0, mem.stats().arenas)
  end))

  local yield_it = helpers.can_yield_in_scope and it or pending
  -- (With an arena the frees of other requests' blocks are theirs, not this scope's: without
  -- one, garbage the collector frees while the scope runs counts as freed by it.)
  yield_it("limits only the coroutine whose scope it is, across yields", function()
    local co = coroutine.wrap(function()
      return pcall(mem.scope, { limit = 8192, arena = true }, function()
        local t = {}
        for i = 1, 1e5 do
          t[i] = { i }
          if i % 100 == 0 then coroutine.yield("more") end
        end
      end)
    end)
    local last
    repeat
      last = co()
      -- the resumer allocates freely meanwhile
      local mine = {}
      for i = 1, 200 do mine[i] = { i } end
    until last ~= "more"
    assert.is_false(last)
  end)

  it("survives budgets that run out in a loop compiled meanwhile (LuaJIT 2.1.0-beta3 crashed)",
    function()
      local ok, out = helpers.run_lua([[
        local mem = require "lunet.mem"
        local function handler()
          local t = {}
          for i = 1, 1e6 do t[i] = string.format("%d:%s", i, "xxxxxxxx") end
        end
        for _ = 1, 20 do
          local ok, err = pcall(mem.scope, { limit = 65536 }, handler)
          assert(not ok and err == "not enough memory", err)
        end
        -- the compiler is back on (if this LuaJIT had it on) once no budget is open
        io.write(rawget(_G, "jit") and tostring(jit.status()) or "true", " survived")
      ]])
      assert.is_true(ok, out)
      assert.are.equal("true survived", out)
    end)

  it("rejects a bad limit", function()
    for _, bad in ipairs { -1, 1.5, "10", true } do
      local err = helpers.raises("bad argument #1 to 'scope' (option 'limit': ", mem.scope,
        { limit = bad }, function() end)
      assert.matches("integer from 0 to", err, 1, true)
    end
  end)
end)

describe("mem.fail_after(n, fn, ...)", function()
  -- (LuaJIT's recorder off: a block made while it records is the compiler's, not the scope's,
  -- so no budget sees it; see the README's limits)
  before_each(helpers.recorder_off)
  after_each(helpers.recorder_back)

  it("returns pcall's results", function()
    assert.are.same({ true, 1, nil, 3 }, { mem.fail_after(1e6, function(...) return ... end, 1, nil, 3) })
    assert.are.same({ false, "boom" }, { mem.fail_after(1e6, error, "boom", 0) })
    local ok, err = mem.fail_after(0, function() return {} end)
    assert.is_false(ok)
    assert.are.equal(MEMERR, err)
  end)

  it("rejects bad arguments", function()
    helpers.raises("bad argument #1 to 'fail_after' (integer from 0 to", mem.fail_after, -1, print)
    helpers.raises("bad argument #1 to 'fail_after' (integer from 0 to", mem.fail_after, nil, print)
    helpers.raises("bad argument #2 to 'fail_after' (function expected, got nil)",
      mem.fail_after, 1)
  end)

  -- Runs `task` with n = 0, 1, 2, ... admitted allocations until it succeeds. Each step must give
  -- success or Lua's memory error; after each, live_bytes is exact and the module works.
  -- Returns the number of steps.
  local function every_failure(task)
    for n = 0, 100000 do
      local ok, err = mem.fail_after(n, task)
      if not ok then
        assert.are.equal(MEMERR, err, "step " .. n)
      end
      assert.is_nil(mem.current(), "step " .. n .. " left a scope open")
      assert.is_true(helpers.exact(), "step " .. n)
      assert.is_table(mem.stats())
      if ok then return n + 1 end
    end
    error("never succeeded")
  end

  local steps = 0
  local tasks = {
    ["mem.stats()"] = function() return mem.stats() end,
    ["mem.checkpoint() and cp:delta()"] = function()
      local cp = mem.checkpoint { collect = false }
      return cp:delta()
    end,
    ["cp:is_neutral()"] = function()
      local cp = mem.checkpoint()
      return cp:is_neutral()
    end,
    ["mem.is_neutral(fn)"] = function()
      return mem.is_neutral(function() return {} end, { warmup = 1, runs = 2 })
    end,
    ["mem.scope(name, fn)"] = function()
      return mem.scope("GET /x", function() return { 1, 2, 3 } end)
    end,
    ["a scope with an arena"] = function()
      return mem.scope({ name = "arena", arena = true, on_exit = function() end }, handler,
        "path=a&x=y")
    end,
    ["mem.arenas() and mem.arena_of()"] = function()
      return mem.arenas(), mem.arena_of({})
    end,
    ["mem.current() and scope:stats()"] = function()
      return mem.scope("s", function() return mem.current():stats() end)
    end,
    ["the example handler"] = function() return handler("path=users&id=42") end,
  }
  for name, task in pairs(tasks) do
    it("fails cleanly at every allocation of " .. name, helpers.without_jit(function()
      steps = steps + every_failure(task)
    end))
  end

  it("ran the tasks through every allocation failure", function()
    print(("\n# fail_after: %d failure-injection steps"):format(steps))
    assert.is_true(steps > 50)
  end)
end)
