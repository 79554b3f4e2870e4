-- Benchmark driver: runs each workload on the bare interpreter and with the module loaded,
-- interleaved (bare, host, mimalloc, scope, arena, bare, ...) in one run, and prints for each
-- mode the ratio of its best time to the bare runs' best and of its median to their median,
-- then the peak RSS of the request loops in each mode against the bare run's. `*` marks the
-- default allocator. The request loops (handler, retain16, retain256) keep each response for
-- the next 1, 16 or 256 requests; luacheck (a real program: Debian's luacheck over this
-- repository's Lua files, each file a request) runs traced too, and each request loop with
-- mem.metrics on (the `metrics` line: its time against scopes alone). The best of several runs is
-- the estimate least disturbed by a shared, noisy machine (the noise only ever adds time); the
-- median shows how noisy it was.
-- Compare ratios, not seconds.
--
--   lua5.4 bench/run.lua [interpreter] [rounds]      (module found through LUA_CPATH)
local interpreter = arg[1] or "lua5.4"
local rounds = tonumber(arg[2] or "11")
local sizes = { churn = 2000000, strings = 1000000, handler = 40000, retain16 = 40000,
  retain256 = 40000, luacheck = 1 }
local workloads = { "churn", "strings", "handler", "retain16", "retain256", "luacheck" }
-- the request loops, run in every mode (scope and arena too), with their peak RSS
local requests = { handler = true, retain16 = true, retain256 = true, luacheck = true }
-- the real program is traced too (sampled and exact)
local traced = { luacheck = true }

-- Modes: the bare interpreter; the module with each allocator; a scope per request.
local MODES = {
  bare = { "bare", "" },
  host = { "track", "LUNET_MEM_ALLOCATOR=host " },
  mimalloc = { "track", "LUNET_MEM_ALLOCATOR=mimalloc " },
  scope = { "scope", "" },
  arena = { "arena", "" },
  metrics = { "metrics", "" },
  sampled = { "trace-sampled", "" },
  trace = { "trace", "" },
}

local common = dofile("bench/common.lua")
local best, median = common.best, common.median

local function run(workload, name)
  return common.run(MODES[name][2], interpreter, workload, MODES[name][1], sizes[workload])
end

-- The allocator the module uses unless told (see src/state.rs: default_serve).
local default = "mimalloc"
local columns = { "host", "mimalloc", "scope", "arena" }

-- Each cell: the ratio of the mode's best time to the bare run's best, then of the medians
-- (their difference shows the noise).
print(("%-8s %-9s %9s  %-13s %-13s %-13s %-13s"):format("interp", "workload", "bare (s)",
  "host/bare", "mimalloc/bare", "scope/bare", "arena/bare"))
print(("%-8s %-9s %9s  %-13s %-13s %-13s %-13s"):format("", "", "best",
  "best  median", "best  median", "best  median", "best  median"))
local rss_rows = {}
for _, workload in ipairs(workloads) do
  local times = { bare = {}, host = {}, mimalloc = {}, scope = {}, arena = {}, metrics = {},
    sampled = {}, trace = {} }
  local rss = {}
  local modes = { "bare", "host", "mimalloc" }
  if requests[workload] then
    modes[#modes + 1] = "scope"
    modes[#modes + 1] = "arena"
    modes[#modes + 1] = "metrics"
  end
  if traced[workload] then
    modes[#modes + 1] = "sampled"
    modes[#modes + 1] = "trace"
  end
  for _ = 1, rounds do
    for _, name in ipairs(modes) do
      local seconds, hwm = run(workload, name)
      local t = times[name]
      t[#t + 1] = seconds
      rss[name] = math.max(rss[name] or 0, hwm)
    end
  end
  local bare_best, bare_median = best(times.bare), median(times.bare)
  local cells = {}
  for _, name in ipairs(columns) do
    if #times[name] == 0 then
      cells[#cells + 1] = ("%-13s"):format("-")
    else
      cells[#cells + 1] = ("%5.3f%s %5.3f"):format(best(times[name]) / bare_best,
        default == name and "*" or " ", median(times[name]) / bare_median)
    end
  end
  print(("%-8s %-9s %9.3f  %s"):format(interpreter, workload, bare_best, table.concat(cells, " ")))
  if traced[workload] then
    print(("%-8s %-9s %9s  traced, sampled every 512 KiB: %5.3f %5.3f; exact: %5.3f %5.3f"):format(
      interpreter, workload, "", best(times.sampled) / bare_best,
      median(times.sampled) / bare_median, best(times.trace) / bare_best,
      median(times.trace) / bare_median))
  end
  if requests[workload] then
    print(("%-8s %-9s %9s  mem.metrics on, against scopes alone: best %5.3f, median %5.3f"):format(
      interpreter, workload, "", best(times.metrics) / best(times.scope),
      median(times.metrics) / median(times.scope)))
    rss_rows[#rss_rows + 1] = ("%-8s %-9s %6d KiB  %-13.3f %-13.3f %-13.3f %-13.3f"):format(
      interpreter, workload, rss.bare, rss.host / rss.bare, rss.mimalloc / rss.bare,
      rss.scope / rss.bare, rss.arena / rss.bare)
  end
end
print(("%-8s %-9s %10s  (peak RSS / bare)"):format(interpreter, "rss", "bare"))
for _, row in ipairs(rss_rows) do print(row) end
