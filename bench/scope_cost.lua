-- The cost of one scope switch: nanoseconds per call of an empty function, called directly,
-- through pcall, and in a scope (named, with options, with an arena), best of 5 loops; then
-- the cost of counting blocks for a scope: ns per small table made outside and inside one.
--   lua bench/scope_cost.lua [calls]       (with the module on package.cpath: scripts/rock.sh)
local mem = require "lunet.mem"
local N = tonumber(arg[1] or 1000000)
local function h(x) return x end
local clock = os.clock

local function bench(label, calls, loop)
  local best = math.huge
  for _ = 1, 5 do
    local t0 = clock()
    loop(calls)
    best = math.min(best, clock() - t0)
  end
  print(("%-8s %-22s %8.1f ns/call"):format(mem.lua, label, best / calls * 1e9))
end

bench("direct", N, function(n) local s = 0 for i = 1, n do s = s + h(i) end return s end)
bench("pcall", N, function(n)
  local s = 0
  for i = 1, n do
    local _, r = pcall(h, i)
    s = s + r
  end
  return s
end)
bench("scope(name, fn)", N, function(n)
  local s = 0
  for i = 1, n do s = s + mem.scope("GET /x", h, i) end
  return s
end)
local OPTS = { name = "GET /x" }
bench("scope(opts, fn)", N, function(n)
  local s = 0
  for i = 1, n do s = s + mem.scope(OPTS, h, i) end
  return s
end)
local ARENA = { name = "GET /a", arena = true }
bench("scope{arena = true}", math.floor(N / 4), function(n)
  local s = 0
  for i = 1, n do s = s + mem.scope(ARENA, h, i) end
  return s
end)

-- What counting a block for the active scope costs: a small table made (and, by the collector,
-- freed) outside any scope and inside one, in ns per table.
local ring = {}
local function churn(n)
  for i = 1, n do ring[i % 64 + 1] = { i } end
  return #ring
end
bench("table, no scope", N, churn)
bench("table, in a scope", N, function(n) mem.scope("churn", churn, n) end)
