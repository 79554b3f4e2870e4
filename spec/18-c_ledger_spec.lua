local helpers = require "spec.helpers"
local mem = helpers.mem

local MEMERR = "not enough memory"
local C_FIELDS = {
  "c_bytes", "c_bytes_allocated", "c_bytes_freed", "c_allocs", "c_frees", "c_peak_bytes",
  "c_late_bytes", "c_refusals",
}

-- A new string of about n bytes: LuaJIT interns every string, so `("x"):rep(n)` made again
-- while an earlier one lives allocates nothing.
local made = 0
local function fresh_string(n)
  made = made + 1
  return made .. ":" .. ("x"):rep(n)
end

-- (see spec/11: Lua 5.4.4's lazily made metatable of luaL_Buffer's box)
table.concat({ ("x"):rep(1000), ("y"):rep(1000) })

describe("scope:stats() C figures", function()
  it("are all 0 for a scope no C code charged", function()
    local s = mem.scope(function()
      local t = {}
      for i = 1, 10 do t[i] = { i } end
      return mem.current():stats()
    end)
    for _, k in ipairs(C_FIELDS) do
      assert.are.equal(0, s[k], k)
    end
    assert.is_true(s.allocs >= 10)
  end)

  it("count what mem.charge charges, in the scope and the scopes it was opened in", function()
    local inner, outer
    mem.scope("outer", function()
      mem.scope("inner", function()
        assert.is_true(mem.charge(100))
        assert.is_true(mem.charge(50))
        assert.is_true(mem.charge(-100))
        inner = mem.current():stats()
      end)
      outer = mem.current():stats()
    end)
    for _, s in ipairs({ inner, outer }) do
      assert.are.equal(50, s.c_bytes)
      assert.are.equal(150, s.c_bytes_allocated)
      assert.are.equal(100, s.c_bytes_freed)
      assert.are.equal(2, s.c_allocs)
      assert.are.equal(1, s.c_frees)
      assert.are.equal(150, s.c_peak_bytes)
    end
  end)

  it("reach on_exit beside the Lua figures", function()
    local seen
    mem.scope({ name = "GET /users", on_exit = function(s) seen = s end }, function()
      mem.charge(4096)
      local rows = {}
      for i = 1, 20 do rows[i] = { id = i } end
      return rows
    end)
    assert.are.equal(4096, seen.c_bytes)
    assert.are.equal(1, seen.c_allocs)
    assert.is_true(seen.allocs >= 20)
    assert.is_true(seen.closed)
  end)

  it("stop moving when the scope closes", function()
    local scope
    mem.scope(function()
      scope = mem.current()
      mem.charge(10)
    end)
    local before = scope:stats()
    mem.scope(function() mem.charge(20) end)
    assert.are.same(before, scope:stats())
  end)

  it("follow the coroutine that runs", function()
    if not helpers.can_yield_in_scope then
      pending("Lua 5.1 cannot yield across mem.scope (a C function)")
      return
    end
    local seen = {}
    local function request(id, bytes)
      return coroutine.wrap(function()
        mem.scope({ name = id, on_exit = function(s) seen[id] = s end }, function()
          mem.charge(bytes)
          coroutine.yield()
          mem.charge(bytes)
        end)
      end)
    end
    local a, b = request("a", 100), request("b", 7)
    a()
    b()
    a()
    b()
    assert.are.equal(200, seen.a.c_bytes)
    assert.are.equal(14, seen.b.c_bytes)
  end)
end)

describe("mem.charge()", function()
  it("returns false with no scope active", function()
    assert.is_nil(mem.current())
    assert.is_false(mem.charge(100))
  end)

  it("raises bad argument for a value that is not an integer", function()
    helpers.raises("bad argument #1 to 'charge' (integer expected, got string)", mem.charge, "1")
    helpers.raises("bad argument #1 to 'charge' (integer expected, got 0.5)", mem.charge, 0.5)
    helpers.raises("bad argument #1 to 'charge' (integer expected, got nil)", mem.charge)
  end)
end)

describe("a limit over Lua and C together", function()
  before_each(function()
    collectgarbage("collect")
    collectgarbage("collect")
  end)

  it("refuses a C charge past what Lua keeps", function()
    local refusals
    local limit = 128 * 1024
    mem.scope({ limit = limit }, function()
      local scope = mem.current()
      local keep = fresh_string(16 * 1024)
      -- (what Lua keeps: the string, and what making it left, by VM)
      local kept = scope:stats().kept_bytes
      assert.is_true(kept >= 16 * 1024)
      assert.is_false(mem.charge(limit - kept + 1))
      assert.is_true(mem.charge(limit - kept - 16 * 1024)) -- (the stats table is kept too)
      refusals = scope:stats().c_refusals
      return keep
    end)
    assert.are.equal(1, refusals)
  end)

  it("fails a Lua allocation past what C holds, with Lua's own error", function()
    local ok, err = pcall(mem.scope, { limit = 64 * 1024 }, function()
      assert.is_true(mem.charge(60 * 1024))
      return fresh_string(16 * 1024)
    end)
    assert.is_false(ok)
    assert.are.equal(MEMERR, err)
    -- the same allocation fits once C released its bytes
    local s = mem.scope({ limit = 64 * 1024 }, function()
      assert.is_true(mem.charge(60 * 1024))
      assert.is_true(mem.charge(-60 * 1024))
      return fresh_string(16 * 1024)
    end)
    assert.is_true(#s > 16 * 1024)
    assert.is_true(helpers.exact())
  end)

  it("holds in a scope opened inside the limited one", function()
    local ok, err = pcall(mem.scope, { limit = 64 * 1024 }, function()
      mem.scope("inner", function()
        assert.is_true(mem.charge(60 * 1024))
      end)
      return fresh_string(16 * 1024)
    end)
    assert.is_false(ok)
    assert.are.equal(MEMERR, err)
  end)
end)
