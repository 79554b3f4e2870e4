require "lunet.mem.busted"

describe("assert.is_neutral()", function()
  it("passes for a neutral function", function()
    assert.is_neutral(function() return { 1, 2, 3 } end)
  end)

  it("fails with the leak report", function()
    local keep = {}
    local ok, err = pcall(assert.is_neutral, function() keep[#keep + 1] = {} end, { name = "h" })
    assert.is_false(ok)
    local msg = type(err) == "table" and err.message or tostring(err)
    assert.matches("Expected the function to be memory%-neutral", msg)
    assert.matches('leak in "h": %+[%d.]+ bytes, %+1 block per run', msg)
  end)

  it("has a negation that passes for a leak", function()
    local keep = {}
    assert.is_not_neutral(function() keep[#keep + 1] = {} end)
    local ok, err = pcall(assert.is_not_neutral, function() end)
    assert.is_false(ok)
    local msg = type(err) == "table" and err.message or tostring(err)
    assert.matches("Expected the function to leak memory", msg)
  end)

  it("passes options through", function()
    local keep = {}
    assert.is_neutral(function() keep[#keep + 1] = {} end, { tolerance = 4096 })
  end)
end)
