-- Tracing overhead: each workload on the bare interpreter, with the module loaded (no
-- tracing), with mem.trace in exact mode and sampled (every 512 KiB on average), interleaved
-- in one run, best of `rounds` (as bench/run.lua). On LuaJIT tracing runs with the compiler
-- off, so the interpreter with the compiler off (`interp`) is shown too.
--
--   lua5.4 bench/trace.lua [interpreter] [rounds]      (module found through LUA_CPATH)
--   bash bench/run.sh trace [rounds]                   (every interpreter)
local interpreter = arg[1] or "lua5.4"
local rounds = tonumber(arg[2] or "7")
local sizes = { churn = 1000000, strings = 500000, handler = 20000 }
local workloads = { "churn", "strings", "handler" }
local is_jit = interpreter:find("luajit", 1, true) ~= nil
local modes = { "bare", "track", "trace", "trace-sampled" }
if is_jit then table.insert(modes, 2, "interp") end

local function run(workload, mode)
  local cmd = ("%s bench/workloads.lua %s %s %d"):format(interpreter, workload, mode, sizes[workload])
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  local seconds = out:match("^(%S+) ")
  return assert(tonumber(seconds), "bad output from " .. cmd .. ": " .. out)
end

local header = { ("%-8s %-8s %9s"):format("interp", "workload", "bare (s)") }
for i = 2, #modes do header[#header + 1] = ("%14s"):format(modes[i] .. "/bare") end
print(table.concat(header, " "))
for _, workload in ipairs(workloads) do
  local times = {}
  for _, m in ipairs(modes) do times[m] = {} end
  for _ = 1, rounds do
    for _, m in ipairs(modes) do
      local t = times[m]
      t[#t + 1] = run(workload, m)
    end
  end
  for _, m in ipairs(modes) do table.sort(times[m]) end
  local bare = times.bare[1]
  local row = { ("%-8s %-8s %9.3f"):format(interpreter, workload, bare) }
  for i = 2, #modes do row[#row + 1] = ("%14.3f"):format(times[modes[i]][1] / bare) end
  print(table.concat(row, " "))
end
