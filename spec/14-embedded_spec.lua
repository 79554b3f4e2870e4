-- The helpers compiled into the library (lunet.mem.holders, .busted, .run, offered in
-- package.preload): a state with none of the module's Lua files on package.path still gets holder
-- paths in its leak reports, and files on package.path (the rock's) are loaded before them.
local helpers = require "spec.helpers"

describe("helpers compiled into the library", function()
  it("give holder paths to a state with no Lua files of the module", function()
    local ok, out = helpers.run_lua([[
      package.path = "" -- only the library, found on package.cpath
      local mem = require "lunet.mem"
      local holders = require "lunet.mem.holders"
      assert(debug.getinfo(holders.explain, "S").source == "=lunet.mem.holders")
      keep = {}
      local neutral, report = mem.is_neutral(function() keep[#keep + 1] = {} end)
      assert(not neutral, "no leak found")
      local cp = mem.checkpoint { holders = true }
      kept_since = {}
      for i = 1, 100 do kept_since[i] = { i } end
      local _, since = cp:is_neutral()
      print(report)
      print(since)
    ]])
    assert(ok, out)
    assert(out:find("held by: _G.keep", 1, true), out)
    assert(out:find("held by: _G.kept_since", 1, true), out)
  end)

  it("come second to the files on package.path", function()
    local holders = require "lunet.mem.holders"
    local source = debug.getinfo(holders.explain, "S").source
    assert.are.equal("@", source:sub(1, 1), source)
    assert.truthy(source:find("lunet[/\\]mem[/\\]holders%.lua$"), source)
  end)

  it("are not offered under other names", function()
    local ok, out = helpers.run_lua([[
      package.path = ""
      require "lunet.mem"
      print(package.preload["lunet.mem.nothing"] == nil, pcall(require, "lunet.mem.nothing"))
    ]])
    assert(ok, out)
    assert(out:find("^true\tfalse\t"), out)
  end)
end)
