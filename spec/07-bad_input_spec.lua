local helpers = require "spec.helpers"
local mem = helpers.mem

local BAD_ARGUMENT = "^bad argument #%d+ to '[%w_]+' %(.+ expected, got .+%)$"
local BAD_OPTION = "^bad argument #%d+ to '[%w_]+' %(unknown option '.*'%)$"

-- Strips the "file:line: " prefix that errors raised from Lua carry.
local function message(err)
  return (tostring(err):gsub("^[^:]*:%d+: ", ""))
end

describe("bad input", function()
  it("gets `bad argument` errors naming the function", function()
    local cp = mem.checkpoint()
    local scope = mem.scope(mem.current)
    local cases = {
      { "scope", mem.scope },
      { "scope", mem.scope, 42 },
      { "scope", mem.scope, "name", {} },
      { "scope", mem.scope, { name = 1 }, print },
      { "is_neutral", mem.is_neutral, {} },
      { "is_neutral", mem.is_neutral, print, { runs = -3 } },
      { "is_neutral", mem.is_neutral, print, { tolerance = 0.5 } },
      { "is_neutral", mem.is_neutral, print, { warmup = 1e9 } },
      { "is_neutral", mem.is_neutral, print, { runs = 0 / 0 } },
      { "assert_neutral", mem.assert_neutral, nil, {}, n = 4 },
      { "checkpoint", mem.checkpoint, 1 },
      { "checkpoint", mem.checkpoint, { collect = "yes" } },
      { "delta", cp.delta, scope },
      { "is_neutral", cp.is_neutral, {} },
      { "is_neutral", cp.is_neutral, cp, "x" },
      { "assert_neutral", cp.assert_neutral, cp, { tolerance = -1 } },
      { "stats", scope.stats, cp },
      { "stats", scope.stats },
      { "scope", mem.scope, { arena = 1 }, print },
      { "scope", mem.scope, { arena = { chunk_size = 0 } }, print },
      { "scope", mem.scope, { limit = -1 }, print },
      { "scope", mem.scope, { limit = "1k" }, print },
      { "fail_after", mem.fail_after, -1, print },
      { "fail_after", mem.fail_after, 0 },
      { "charge", mem.charge },
      { "charge", mem.charge, "64" },
      { "charge", mem.charge, 1.5 },
      { "charge", mem.charge, 0 / 0 },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(case[2], (unpack or table.unpack)(case, 3, case.n or #case))
      assert.is_false(ok, case[1])
      local msg = message(err)
      assert.matches("^bad argument #%d+ to '" .. case[1] .. "' %(", msg)
      assert.is_truthy(msg:match(BAD_ARGUMENT) or msg:match(BAD_OPTION), msg)
    end
  end)

  it("names the line of the bad call", function()
    local cp = mem.checkpoint()
    local calls = {
      function() mem.is_neutral(print, { runs = -1 }) end,
      function() mem.assert_neutral(print, { nope = 1 }) end,
      function() mem.scope({ name = 1 }, print) end,
      function() mem.scope("x") end,
      function() mem.checkpoint({ collect = 1 }) end,
      function() cp:is_neutral({ tolerance = -1 }) end,
      function() cp:assert_neutral({ tolerance = "x" }) end,
    }
    for i, call in ipairs(calls) do
      local ok, err = pcall(call)
      assert.is_false(ok)
      assert.matches("^spec/07%-bad_input_spec%.lua:%d+: bad argument", err, 1, false, "call " .. i)
    end
  end)

  it("never crashes under a seeded stream of random calls", function()
    local cp = mem.checkpoint({ collect = false })
    local scope = mem.scope(mem.current)
    local pool = {
      nil, true, false, 0, -1, 1.5, 1e308, -1e308, 0 / 0, math.huge, "", "x", {},
      { runs = -1 }, { tolerance = "a" }, { name = 1 }, { warmup = 2, runs = 3 }, { collect = false },
      { on_exit = 1 }, type, io.stdout, coroutine.create(function() end), cp, scope,
      setmetatable({}, { __call = function() return 1 end }),
      { arena = true }, { arena = { chunk_size = 1e9 } }, { arena = { size = 1 } }, { limit = -1 },
      { limit = 64 }, { limit = 1e6, arena = true }, 2, 100, mem.stats, mem.arenas,
    }
    local targets = {
      mem.stats, mem.reset_peak, mem.checkpoint, mem.current, mem.is_neutral,
      mem.assert_neutral, mem.scope, cp.delta, cp.is_neutral, cp.assert_neutral, scope.stats,
      mem.arenas, mem.arena_of, mem.fail_after, mem.charge,
    }
    local seed = 20261124
    local function random(n) -- a small LCG, the same on every version
      seed = (seed * 1103515245 + 12345) % 2147483648
      return seed % n + 1
    end
    local calls, errors = 0, 0
    for _ = 1, 10000 do
      local f = targets[random(#targets)]
      local nargs = random(4) - 1
      local args = {}
      for i = 1, nargs do args[i] = pool[random(#pool + 1)] end
      local ok, err = pcall(f, (unpack or table.unpack)(args, 1, nargs))
      calls = calls + 1
      if not ok then
        errors = errors + 1
        local msg = message(err)
        -- (a scope given a budget of 64 bytes runs out of memory: Lua's own error)
        assert.is_truthy(msg:match("^bad argument #%d+ to '[%w_]+' %(")
          or msg:match("^leak ") or msg == "not enough memory", msg)
      end
    end
    assert.are.equal(10000, calls)
    assert.is_true(errors > 0)
    assert.is_true(helpers.exact())
  end)
end)
