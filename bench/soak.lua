-- Soak: N requests of bench/workloads.lua's handler, each in an arena scope, with the resident
-- set and live bytes sampled ten times. Memory is flat when the resident set at the end is within
-- 10% of the one after warm-up (the first tenth), live bytes after a full collection within
-- 8 KiB of the warm-up's, and no arena is pinned; exits 1 otherwise.
--
--   lua5.4 bench/soak.lua [requests]      (module found through LUA_CPATH; `bash bench/run.sh soak` runs all)
local mem = require "lunet.mem"
local n = tonumber(arg[1] or "1000000")

local handler, raw = dofile("bench/handler.lua")

local function rss_kib()
  local f = assert(io.open("/proc/self/status"))
  local kib = tonumber(f:read("*a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return kib
end

local OPTS = { name = "GET /users", arena = true }
local step = math.floor(n / 10)
local samples = {}
local base_live
for i = 1, n do
  mem.scope(OPTS, handler, raw)
  if i == step then
    -- live memory after warm-up, collected: the end must match it
    collectgarbage("collect")
    collectgarbage("collect")
    base_live = mem.stats().live_bytes
  end
  if i % step == 0 then
    local s = mem.stats()
    samples[#samples + 1] = { i, rss_kib(), s.live_bytes, s.arenas, s.arena_bytes + s.arena_pool_bytes }
  end
end

print(("%-10s %10s %12s %8s %12s"):format("requests", "rss (KiB)", "live_bytes", "arenas", "arena mem"))
for _, r in ipairs(samples) do
  print(("%-10d %10d %12d %8d %12d"):format(r[1], r[2], r[3], r[4], r[5]))
end
-- (LuaJIT: a compiled trace keeps the strings it uses as constants, and their arena with them,
-- until it is flushed: README, Limits)
if rawget(_G, "jit") then jit.flush() end
collectgarbage("collect")
collectgarbage("collect")
local s = mem.stats()
local first, last = samples[2][2], samples[#samples][2] -- (the first sample is warm-up)
local pinned = 0
for _, a in ipairs(mem.arenas()) do
  if a.pinned then pinned = pinned + 1 end
end
local flat = last <= first * 1.1 and s.live_bytes <= base_live + 8192 and pinned == 0
print(("%s: %d requests, RSS %d -> %d KiB (%.3fx), live bytes after a full collection %d -> %d, "
  .. "%d arenas left, %d pinned: %s"):format(mem.lua, n, first, last, last / first, base_live,
  s.live_bytes, s.arenas, pinned, flat and "flat" or "NOT FLAT"))
os.exit(flat and 0 or 1)
