local helpers = require "spec.helpers"
local mem = helpers.mem

describe("mem.checkpoint()", function()
  -- A checkpoint compares two readings taken apart; on LuaJIT the trace recorder allocates for
  -- real in between when code gets hot. These specs are about the checkpoint's own semantics,
  -- so they run with the compiler off; the last one runs with it on.
  before_each(function()
    if helpers.is_jit then
      jit.off()
      jit.flush()
    end
  end)
  after_each(function()
    if helpers.is_jit then jit.on() end
  end)
  it("returns a checkpoint with its name", function()
    local cp = mem.checkpoint("boot")
    assert.are.equal("boot", cp.name)
    assert.are.equal('checkpoint "boot"', tostring(cp))
    assert.is_nil(mem.checkpoint().name)
    assert.are.equal("x", mem.checkpoint({ name = "x", collect = false }).name)
  end)

  describe("cp:delta()", function()
    it("is zero right after the checkpoint", function()
      local cp = mem.checkpoint()
      local d = cp:delta()
      assert.are.same({ bytes = 0, blocks = 0 }, d)
    end)

    it("counts what is kept since the checkpoint", function()
      local cp = mem.checkpoint()
      local keep = {}
      local d = cp:delta()
      assert.are.equal(1, d.blocks)
      assert.is_true(d.bytes > 0)
      assert.is_table(keep)
    end)

    it("implies no collection", function()
      collectgarbage("stop")
      local cp = mem.checkpoint({ collect = false })
      local junk = {}
      for i = 1, 100 do junk[i % 2 + 1] = { i } end -- escapes, so LuaJIT cannot sink it
      local d = cp:delta()
      collectgarbage("restart")
      assert.is_true(d.blocks >= 100)
    end)
  end)

  describe("cp:is_neutral()", function()
    it("is true when a block made before the checkpoint only grew", function()
      local list = {}
      for i = 1, 10 do list[i] = i end
      local cp = mem.checkpoint()
      for i = 11, 1000 do list[i] = i end -- reallocations of list's array, no new block
      local ok = cp:is_neutral()
      assert.is_true(ok)
      assert.is_true(cp:delta().bytes > 0)
    end)

    it("is true when only garbage was made", function()
      local cp = mem.checkpoint()
      for i = 1, 1000 do local _ = { i, tostring(i) } end
      -- (the verdict is taken before `assert.is_true` is looked up: luassert allocates then)
      local ok = cp:is_neutral()
      assert.is_true(ok)
    end)

    it("is false with a report when memory is kept", function()
      local cp = mem.checkpoint("request 42")
      local keep = { {}, {} } -- three tables, and keep's array part (apart, but on LuaJIT)
      local ok, report = cp:is_neutral()
      assert.is_false(ok)
      assert.matches('leak since "request 42": %+%d+ bytes, %+[34] blocks', report)
      assert.is_table(keep)
    end)

    it("runs __gc finalizers before comparing", function()
      -- made before the checkpoint: a closure made after it would keep an upvalue alive
      local finalized = { false }
      local function on_gc() finalized[1] = true end
      local cp = mem.checkpoint()
      do
        local mt = { __gc = on_gc }
        local u
        if newproxy then
          u = newproxy(true)
          getmetatable(u).__gc = mt.__gc
        else
          u = setmetatable({}, mt)
        end
        u = nil
        assert.is_nil(u)
      end
      local ok = cp:is_neutral()
      assert.is_true(ok)
      assert.is_true(finalized[1])
    end)

    it("allows growth up to the tolerance", function()
      local cp = mem.checkpoint()
      local keep = {}
      local d = cp:delta().bytes
      local strict = cp:is_neutral { tolerance = d - 1 }
      local tolerant = cp:is_neutral { tolerance = d + 256 } -- + the options table
      assert.is_false(strict)
      assert.is_true(tolerant)
      assert.is_table(keep)
    end)
  end)

  describe("cp:assert_neutral()", function()
    it("returns true when neutral", function()
      local cp = mem.checkpoint()
      local ok = cp:assert_neutral()
      assert.is_true(ok)
    end)

    it("raises the report when not", function()
      local cp = mem.checkpoint("cp")
      local keep = { {} }
      local err = helpers.raises('leak since "cp"', cp.assert_neutral, cp)
      assert.matches("%+%d+ bytes", err)
      assert.is_table(keep)
    end)
  end)

  it("rejects methods called on other objects", function()
    local cp = mem.checkpoint()
    helpers.raises("bad argument #1 to 'delta' (checkpoint expected, got table)", cp.delta, {})
    helpers.raises("bad argument #1 to 'is_neutral' (checkpoint expected, got nil)", cp.is_neutral)
    helpers.raises("bad argument #1 to 'assert_neutral' (checkpoint expected, got string)",
      cp.assert_neutral, "x")
    helpers.raises("bad argument #1 to 'delta' (checkpoint expected, got userdata)",
      cp.delta, io.stdout)
    helpers.raises("bad argument #2 to 'is_neutral' (option 'tolerance': integer from 0 to",
      cp.is_neutral, cp, { tolerance = -1 })
    helpers.raises("bad argument #2 to 'is_neutral' (unknown option 'runs')",
      cp.is_neutral, cp, { runs = 3 })
  end)
end)

describe("a checkpoint with the JIT on", function()
  it("still finds a leak of new objects while compiled code runs", function()
    local keep = {}
    local function work(n)
      for i = 1, n do keep[#keep + 1] = { i } end
    end
    work(200) -- hot: compiled on LuaJIT
    local cp = mem.checkpoint("jit")
    work(100)
    local ok, report = cp:is_neutral()
    assert.is_false(ok)
    assert.matches('leak since "jit": %+%d+ bytes, %+%d+ blocks', report)
  end)
end)
