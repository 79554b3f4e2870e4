local helpers = require "spec.helpers"
local mem = helpers.mem

describe("mem.is_neutral()", function()
  it("is true for a function that allocates nothing", function()
    assert.is_true(mem.is_neutral(function() end))
  end)

  it("catches a handler that keeps one small table per call in an upvalue", function()
    local seen = {}
    local function handler() seen[#seen + 1] = {} end
    local ok, report = mem.is_neutral(handler, { name = "GET /users" })
    assert.is_false(ok)
    assert.matches('^leak in "GET /users": %+[%d.]+ bytes, %+1 block per run %(runs: ', report)
  end)

  it("catches a handler that keeps a table per call in a global", function()
    _G.__lunet_leak = {}
    local function handler(i) _G.__lunet_leak[tostring(i or math.random())] = { 1, 2, 3 } end
    local ok, report = mem.is_neutral(handler)
    assert.is_false(ok)
    assert.matches('^leak in "function <[^>]+03%-is_neutral_spec.lua:%d+>"', report)
    _G.__lunet_leak = nil
  end)

  it("catches amortized growth with more runs (a list that gets one element per call)", function()
    local list = {}
    local ok, report = mem.is_neutral(function() list[#list + 1] = true end, { runs = 32 })
    assert.is_false(ok)
    assert.matches("grows over the runs", report)
  end)

  it("does not fail a handler that builds and drops large structures", function()
    local function handler()
      local rows = {}
      for i = 1, 5000 do rows[i] = { id = i, name = "user" .. i, tags = { "a", "b" } } end
      local body = {}
      for i = 1, #rows do body[i] = rows[i].name end
      return table.concat(body, ",")
    end
    assert.is_true(mem.is_neutral(handler))
  end)

  it("does not fail a handler that fills a module cache once", function()
    local cache
    local function handler()
      if not cache then
        cache = {}
        for i = 1, 100 do cache[i] = ("entry %d"):format(i) end
      end
      return cache[7]
    end
    assert.is_true(mem.is_neutral(handler))
  end)

  it("does not fail a handler that gets JIT-compiled, also late", function()
    local function handler()
      local acc = {}
      for i = 1, 12 do acc[i % 4 + 1] = { i } end
      return acc
    end
    -- With no warm-up, the loop becomes hot (and is compiled on LuaJIT) during the runs.
    assert.is_true(mem.is_neutral(handler, { warmup = 0, runs = 10 }))
    assert.is_true(mem.is_neutral(handler))
  end)

  it("reports each run's figure", function()
    local keep = {}
    local ok, report = mem.is_neutral(function() keep[#keep + 1] = "s" .. #keep end,
      { runs = 3, name = "strings" })
    assert.is_false(ok)
    local runs = report:match("%(runs: ([%d%s%-]+);")
    local n = 0
    for _ in runs:gmatch("%-?%d+") do n = n + 1 end
    assert.are.equal(3, n)
  end)

  it("tolerates growth up to `tolerance` bytes per run", function()
    local keep = {}
    local function handler() keep[#keep + 1] = {} end
    assert.is_false((mem.is_neutral(handler)))
    assert.is_true(mem.is_neutral(handler, { tolerance = 4096 }))
  end)

  it("propagates an error raised by the function", function()
    local e = {}
    local ok, err = pcall(mem.is_neutral, function() error(e) end)
    assert.is_false(ok)
    assert.are.equal(e, err)
  end)

  it("checks its arguments", function()
    helpers.raises("bad argument #1 to 'is_neutral' (function expected, got nil)", mem.is_neutral)
    helpers.raises("bad argument #2 to 'is_neutral' (table expected, got number)",
      mem.is_neutral, print, 3)
    helpers.raises("bad argument #2 to 'is_neutral' (option 'runs': integer from 1 to 100000 "
      .. "expected, got 0)", mem.is_neutral, print, { runs = 0 })
    helpers.raises("(option 'warmup': integer from 0 to 100000 expected, got 1.5)",
      mem.is_neutral, print, { warmup = 1.5 })
    helpers.raises("(option 'runs': integer from 1 to 100000 expected, got 1e+99)",
      mem.is_neutral, print, { runs = 1e99 })
    helpers.raises("(option 'name': string expected, got boolean)",
      mem.is_neutral, print, { name = true })
  end)
end)

describe("mem.assert_neutral()", function()
  it("returns true for a neutral function", function()
    assert.is_true(mem.assert_neutral(function() return { 1 } end))
  end)

  it("raises the report for a leaking one", function()
    local keep = {}
    helpers.raises('leak in "leaky"', mem.assert_neutral, function() keep[#keep + 1] = {} end,
      { name = "leaky" })
  end)

  it("checks its arguments with its own name", function()
    helpers.raises("bad argument #1 to 'assert_neutral' (function expected, got string)",
      mem.assert_neutral, "f")
  end)
end)
