local helpers = require "spec.helpers"
local mem = helpers.mem
local unpack = table.unpack or unpack

describe("mem.scope()", function()
  it("returns all of fn's results, nils included", function()
    local n = select("#", mem.scope(function() return nil, 2, nil end))
    assert.are.equal(3, n)
    assert.are.same({ 1, nil, 3 }, { mem.scope("s", function(a, b, c) return a, b, c end, 1, nil, 3) })
    assert.are.equal(0, select("#", mem.scope(function() end)))
  end)

  it("passes the arguments exactly", function()
    assert.are.equal(0, mem.scope(function(...) return select("#", ...) end))
    assert.are.equal(2, mem.scope("n", function(...) return select("#", ...) end, nil, nil))
    assert.are.equal(1, mem.scope({}, function(...) return select("#", ...) end, nil))
    -- (LuaJIT: up to three arguments go through fixed parameters, more through `...`)
    local function count_and_pack(...) return select("#", ...), { ... } end
    for n = 0, 6 do
      local args = {}
      for i = 1, n do args[i] = (i % 2 == 0) and nil or i end
      for _, form in ipairs({ "fn", "name", "opts" }) do
        local got, packed
        if form == "fn" then
          got, packed = mem.scope(count_and_pack, unpack(args, 1, n))
        elseif form == "name" then
          got, packed = mem.scope("n", count_and_pack, unpack(args, 1, n))
        else
          got, packed = mem.scope({ name = "o" }, count_and_pack, unpack(args, 1, n))
        end
        assert.are.equal(n, got, form .. " with " .. n)
        for i = 1, n do assert.are.equal(args[i], packed[i], form .. " arg " .. i) end
      end
    end
  end)

  it("names the scope from a string, an option or the function", function()
    assert.are.equal("GET /users", mem.scope("GET /users", function() return mem.current().name end))
    assert.are.equal("opt", mem.scope({ name = "opt" }, function() return mem.current().name end))
    local name = mem.scope(function() return mem.current().name end)
    assert.matches("^function <.*04%-scope_spec.lua:%d+>$", name)
  end)

  it("propagates an error unchanged and closes the scope", function()
    local e = setmetatable({}, { __tostring = function() return "E" end })
    local ok, err = pcall(mem.scope, "boom", function() error(e) end)
    assert.is_false(ok)
    assert.are.equal(e, err)
    assert.is_nil(mem.current())
    ok, err = pcall(mem.scope, function() error("plain", 0) end)
    assert.are.equal("plain", err)
    assert.is_nil(mem.current())
  end)

  it("attributes the allocations made while fn runs, exactly", function()
    -- With the JIT off and no trace left: LuaJIT's recorder, and exits from compiled code,
    -- allocate for real between the readings, outside the scope.
    if helpers.is_jit then
      jit.off()
      jit.flush()
    end
    collectgarbage("stop")
    local scope
    local function handler()
      scope = mem.current()
      local rows = {}
      for i = 1, 50 do rows[i] = { i } end
      return rows
    end
    local keep = {}
    for round = 1, 6 do
      keep[round] = false -- the slot exists before measuring
    end
    -- The first scope of a thread makes the thread's scope record, outside the scope.
    mem.scope("warm-up", handler)
    for round = 1, 6 do
      local before = collectgarbage("count") * 1024
      keep[round] = mem.scope("req", handler)
      local after = collectgarbage("count") * 1024
      local s = scope:stats()
      assert.are.equal(after - before, s.net_bytes)
      assert.are.equal(s.allocated_bytes - s.freed_bytes, s.net_bytes)
      assert.is_true(s.allocs >= 51)
    end
    collectgarbage("restart")
    if helpers.is_jit then jit.on() end
  end)

  it("reports the stats fields", function()
    local stats = mem.scope(function()
      local _ = { {}, {} }
      return mem.current():stats()
    end)
    for _, k in ipairs { "allocs", "frees", "reallocs", "allocated_bytes", "freed_bytes",
      "net_bytes", "peak_bytes" } do
      assert.is_number(stats[k], k)
    end
    assert.is_string(stats.name)
    assert.is_false(stats.closed)
  end)

  it("names its byte counters as the state stats do, with the former names as aliases", function()
    local stats = mem.scope(function()
      local _ = { {}, string.rep("y", 100) }
      return mem.current():stats()
    end)
    assert.is_true(type(stats.bytes_allocated) == "number" and type(stats.bytes_freed) == "number")
    assert.are.same({ stats.bytes_allocated, stats.bytes_freed },
      { stats.allocated_bytes, stats.freed_bytes })
  end)

  it("tracks the peak of net_bytes", function()
    local s = mem.scope({ on_exit = function() end }, function()
      -- (a concatenation: Lua's own string; on 5.5 string.rep's is an external one, whose
      -- body lauxlib made: not Lua's memory, see the README's Exact counts)
      local big = { string.rep("x", 50000) .. "y" }
      big = nil
      collectgarbage("collect")
      return mem.current():stats(), big
    end)
    assert.is_true(s.peak_bytes >= 50000)
    assert.is_true(s.peak_bytes > s.net_bytes)
  end)

  it("calls on_exit with the final stats, also on error", function()
    -- (with LuaJIT's recorder off: a block made while it records a trace through the call is
    -- the compiler's, not the scope's, and `allocs` read 0 once on Debian's LuaJIT)
    helpers.recorder_off()
    finally(helpers.recorder_back)
    local got
    mem.scope({ name = "x", on_exit = function(s) got = s end }, function() return {} end)
    assert.are.equal("x", got.name)
    assert.is_true(got.closed)
    assert.is_true(got.allocs >= 1)
    got = nil
    pcall(mem.scope, { on_exit = function(s) got = s end }, error, "e")
    assert.is_table(got)
  end)

  it("attributes nested scopes to the innermost and rolls up to the outer", function()
    local outer, inner
    mem.scope("outer", function()
      outer = mem.current()
      local _ = {}
      mem.scope("inner", function()
        inner = mem.current()
        local t = {}
        for i = 1, 20 do t[i] = { i } end
        assert.are.equal("inner", mem.current().name)
      end)
      assert.are.equal("outer", mem.current().name)
    end)
    local o, i = outer:stats(), inner:stats()
    assert.is_true(i.allocs >= 21)
    assert.is_true(o.allocs > i.allocs)
    assert.is_true(o.allocated_bytes > i.allocated_bytes)
    assert.is_nil(mem.current())
  end)

  it("counts nothing after it is closed", function()
    local scope = mem.scope(function() return mem.current() end)
    local before = scope:stats()
    for i = 1, 100 do local _ = { i } end
    assert.are.same(before, scope:stats())
  end)

  it("checks its arguments", function()
    helpers.raises("bad argument #1 to 'scope' (function expected, got nil)", mem.scope)
    helpers.raises("bad argument #1 to 'scope' (function expected, got number)", mem.scope, 1)
    helpers.raises("bad argument #2 to 'scope' (function expected, got nil)", mem.scope, "n")
    helpers.raises("bad argument #2 to 'scope' (function expected, got string)",
      mem.scope, {}, "f")
    helpers.raises("bad argument #1 to 'scope' (option 'on_exit': function expected, got number)",
      mem.scope, { on_exit = 1 }, print)
    helpers.raises("bad argument #1 to 'scope' (unknown option 'nmae')",
      mem.scope, { nmae = "x" }, print)
    local scope = mem.scope(mem.current)
    helpers.raises("bad argument #1 to 'stats' (scope expected, got table)", scope.stats, {})
  end)

  it("accepts callable tables", function()
    local callable = setmetatable({}, { __call = function(_, x) return x * 2 end })
    assert.are.equal(4, mem.scope(callable, 2))
    assert.are.equal(6, mem.scope("c", callable, 3))
  end)
end)

describe("mem.current()", function()
  it("is nil outside any scope", function()
    assert.is_nil(mem.current())
  end)

  it("names the innermost active scope", function()
    local s = mem.scope("a", mem.current)
    assert.are.equal("a", s.name)
    assert.are.equal('scope "a"', tostring(s))
  end)
end)
