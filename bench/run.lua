-- Benchmark driver: runs each workload on the bare interpreter and with the module loaded,
-- interleaved (bare, track, scope, bare, ...) in one run, and prints the median time of each
-- mode and the ratios to bare. Machines are noisy: compare ratios, not seconds.
--
--   lua5.4 bench/run.lua [interpreter] [rounds]      (module found through LUA_CPATH)
local interpreter = arg[1] or "lua5.4"
local rounds = tonumber(arg[2] or "9")
local sizes = { churn = 2000000, strings = 1000000, handler = 40000 }
local workloads = { "churn", "strings", "handler" }

local function run(workload, mode)
  local cmd = ("%s bench/workloads.lua %s %s %d"):format(interpreter, workload, mode, sizes[workload])
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return assert(tonumber(out), "bad output from " .. cmd .. ": " .. out)
end

local function median(xs)
  table.sort(xs)
  return xs[math.floor((#xs + 1) / 2)]
end

print(("%-8s %-8s %10s %12s %12s"):format("interp", "workload", "bare (s)", "track/bare", "scope/bare"))
for _, workload in ipairs(workloads) do
  local times = { bare = {}, track = {}, scope = {} }
  local modes = workload == "handler" and { "bare", "track", "scope" } or { "bare", "track" }
  for _ = 1, rounds do
    for _, mode in ipairs(modes) do
      local t = times[mode]
      t[#t + 1] = run(workload, mode)
    end
  end
  local bare = median(times.bare)
  local track = median(times.track) / bare
  local scope = #times.scope > 0 and ("%12.3f"):format(median(times.scope) / bare) or ("%12s"):format("-")
  print(("%-8s %-8s %10.3f %12.3f %s"):format(interpreter, workload, bare, track, scope))
end
