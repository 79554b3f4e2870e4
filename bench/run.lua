-- Benchmark driver: runs each workload on the bare interpreter and with the module loaded,
-- interleaved (bare, host, mimalloc, scope, arena, bare, ...) in one run, and prints the best
-- time of the bare runs and the ratio of each mode's best time to it, then the peak RSS of the
-- handler workload in each mode against the bare run's. `*` marks the default allocator.
-- The best of several runs is the estimate least disturbed by a shared, noisy machine (the
-- noise only ever adds time); compare ratios, not seconds.
--
--   lua5.4 bench/run.lua [interpreter] [rounds]      (module found through LUA_CPATH)
local interpreter = arg[1] or "lua5.4"
local rounds = tonumber(arg[2] or "11")
local sizes = { churn = 2000000, strings = 1000000, handler = 40000 }
local workloads = { "churn", "strings", "handler" }

-- Modes: the bare interpreter; the module with each allocator; a scope per request.
local MODES = {
  bare = { "bare", "" },
  host = { "track", "LUNET_MEM_ALLOCATOR=host " },
  mimalloc = { "track", "LUNET_MEM_ALLOCATOR=mimalloc " },
  scope = { "scope", "" },
  arena = { "arena", "" },
}

local function run(workload, name)
  local mode, env = MODES[name][1], MODES[name][2]
  local cmd = ("%s%s bench/workloads.lua %s %s %d"):format(env, interpreter, workload, mode, sizes[workload])
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  local seconds, hwm = out:match("^(%S+) (%d+)")
  return assert(tonumber(seconds), "bad output from " .. cmd .. ": " .. out), tonumber(hwm)
end

local function best(xs)
  table.sort(xs)
  return xs[1]
end

-- The allocator the module uses unless told (see src/state.rs: default_serve).
local default = "mimalloc"

print(("%-8s %-8s %9s %11s %11s %11s %11s")
  :format("interp", "workload", "bare (s)", "host/bare", "mimalloc/b", "scope/bare", "arena/bare"))
local rss = {}
for _, workload in ipairs(workloads) do
  local times = { bare = {}, host = {}, mimalloc = {}, scope = {}, arena = {} }
  local modes = { "bare", "host", "mimalloc" }
  if workload == "handler" then
    modes[#modes + 1] = "scope"
    modes[#modes + 1] = "arena"
  end
  for _ = 1, rounds do
    for _, name in ipairs(modes) do
      local t = times[name]
      local seconds, hwm = run(workload, name)
      t[#t + 1] = seconds
      if workload == "handler" then rss[name] = math.max(rss[name] or 0, hwm) end
    end
  end
  local bare = best(times.bare)
  local function ratio(name, mark)
    if #times[name] == 0 then return ("%11s"):format("-") end
    return ("%10.3f%s"):format(best(times[name]) / bare, mark and "*" or " ")
  end
  print(("%-8s %-8s %9.3f %s %s %s %s"):format(interpreter, workload, bare,
    ratio("host", default == "host"), ratio("mimalloc", default == "mimalloc"), ratio("scope"),
    ratio("arena")))
end
print(("%-8s %-8s %7d KiB %10.3f  %10.3f  %10.3f  %10.3f   (peak RSS / bare)"):format(
  interpreter, "rss", rss.bare, rss.host / rss.bare, rss.mimalloc / rss.bare,
  rss.scope / rss.bare, rss.arena / rss.bare))
