-- What the benchmark drivers (bench/run.lua, bench/compare.lua) share: running one workload
-- in a child process, and the best and median of a list of times.
local M = {}

-- Runs `bench/workloads.lua WORKLOAD MODE N` with `interpreter`, the command prefixed by `env`
-- (variable assignments, or ""); returns its CPU seconds and peak RSS in KiB.
function M.run(env, interpreter, workload, mode, n)
  local cmd = ("%s%s bench/workloads.lua %s %s %d"):format(env, interpreter, workload, mode, n)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  local seconds, hwm = out:match("^(%S+) (%d+)")
  return assert(tonumber(seconds), "bad output from " .. cmd .. ": " .. out), tonumber(hwm)
end

local function sorted(xs)
  local c = {}
  for i, x in ipairs(xs) do c[i] = x end
  table.sort(c)
  return c
end

function M.best(xs) return sorted(xs)[1] end

function M.median(xs)
  local c, n = sorted(xs), #xs
  return n % 2 == 1 and c[(n + 1) / 2] or (c[n / 2] + c[n / 2 + 1]) / 2
end

return M
