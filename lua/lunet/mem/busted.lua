-- busted/luassert assertions for lunet.mem:
--
--   require "lunet.mem.busted"
--   assert.is_neutral(fn, [opts])      -- fails with the leak report
--   assert.is_not_neutral(fn, [opts])  -- fails if no leak was found
--
-- `opts` are those of mem.is_neutral (tolerance, warmup, runs, name).
local assert = require "luassert"
local say = require "say"
local mem = require "lunet.mem"

local function neutral(_, arguments)
  local fn, opts = arguments[1], arguments[2]
  local ok, report = mem.is_neutral(fn, opts)
  -- The message shows the report (or that none was made) in place of the function.
  arguments[1] = report or ("no leak found in " .. tostring(fn))
  arguments.n = 1
  arguments.nofmt = { true }
  return ok
end

say:set("assertion.lunet_mem_neutral.positive", "Expected the function to be memory-neutral:\n%s")
say:set("assertion.lunet_mem_neutral.negative", "Expected the function to leak memory:\n%s")
assert:register("assertion", "neutral", neutral,
  "assertion.lunet_mem_neutral.positive", "assertion.lunet_mem_neutral.negative")

return mem
