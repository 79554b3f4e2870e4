-- Two builds of the module side by side: runs the request workloads (bench/workloads.lua) with
-- build A and build B, interleaved in one run (A, B, A, B, ...), and prints B's best and median
-- time over A's for each workload and mode, then B's peak RSS over A's. For a change to the
-- hook or the scopes: the ratio is the change's cost (below 1: a gain), free of the drift
-- between two separate runs on a noisy machine.
--
--   lua5.4 bench/compare.lua INTERPRETER ROUNDS CPATH_A CPATH_B
--   (CPATH_x: a LUA_CPATH under which `lunet.mem` is build x, e.g. "/tmp/a/?.so;;")
local interpreter, rounds, cpath_a, cpath_b = arg[1], tonumber(arg[2] or "7"), arg[3], arg[4]
assert(interpreter and cpath_a and cpath_b,
  "usage: lua bench/compare.lua INTERPRETER ROUNDS CPATH_A CPATH_B")
local sizes = { churn = 2000000, handler = 40000, retain256 = 40000 }
local cases = {
  { "churn", "track" }, { "handler", "track" }, { "handler", "scope" }, { "handler", "arena" },
  { "retain256", "arena" },
}

local common = dofile("bench/common.lua")
local best, median = common.best, common.median

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function run(workload, mode, cpath)
  return common.run(("LUA_CPATH=%s "):format(shell_quote(cpath)), interpreter, workload, mode,
    sizes[workload])
end

print(("%-8s %-10s %-6s %8s %8s %8s"):format("interp", "workload", "mode", "B/A best", "median",
  "rss B/A"))
for _, case in ipairs(cases) do
  local workload, mode = case[1], case[2]
  local t = { a = {}, b = {} }
  local rss = { a = 0, b = 0 }
  for _ = 1, rounds do
    for _, which in ipairs { "a", "b" } do
      local seconds, hwm = run(workload, mode, which == "a" and cpath_a or cpath_b)
      t[which][#t[which] + 1] = seconds
      rss[which] = math.max(rss[which], hwm)
    end
  end
  print(("%-8s %-10s %-6s %8.3f %8.3f %8.3f"):format(interpreter, workload, mode,
    best(t.b) / best(t.a), median(t.b) / median(t.a), rss.b / rss.a))
end
