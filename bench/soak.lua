-- Soak: N requests of bench/workloads.lua's handler, each in an arena scope, with the resident
-- set and live bytes sampled ten times. Memory is flat when the last samples match the first
-- ones after warm-up.
--
--   lua5.4 bench/soak.lua [requests]      (module found through LUA_CPATH; bench/soak.sh runs all)
local mem = require "lunet.mem"
local n = tonumber(arg[1] or "1000000")

local raw = "GET /users?id=42 HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nX-Trace: abc123\r\n\r\n"
local function handler(request)
  local method, path = request:match("^(%u+) (%S+)")
  local headers = {}
  for k, v in request:gmatch("([%w%-]+): ([^\r]+)\r\n") do headers[k:lower()] = v end
  local rows = {}
  for i = 1, 8 do rows[i] = { id = i, name = "user" .. i } end
  local body = {}
  for i = 1, #rows do body[i] = ('{"id":%d,"name":"%s"}'):format(rows[i].id, rows[i].name) end
  return { status = 200, method = method, path = path, host = headers.host,
           body = "[" .. table.concat(body, ",") .. "]" }
end

local function rss_kib()
  local f = assert(io.open("/proc/self/status"))
  local kib = tonumber(f:read("*a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return kib
end

local OPTS = { name = "GET /users", arena = true }
local step = math.floor(n / 10)
local samples = {}
for i = 1, n do
  mem.scope(OPTS, handler, raw)
  if i % step == 0 then
    local s = mem.stats()
    samples[#samples + 1] = { i, rss_kib(), s.live_bytes, s.arenas, s.arena_bytes + s.arena_pool_bytes }
  end
end

print(("%-10s %10s %12s %8s %12s"):format("requests", "rss (KiB)", "live_bytes", "arenas", "arena mem"))
for _, r in ipairs(samples) do
  print(("%-10d %10d %12d %8d %12d"):format(r[1], r[2], r[3], r[4], r[5]))
end
collectgarbage("collect")
collectgarbage("collect")
local s = mem.stats()
local first, last = samples[2][2], samples[#samples][2] -- (the first sample is warm-up)
print(("%s: %d requests, RSS %d -> %d KiB (%.3fx), after a full collection %d arenas left"):format(
  mem.lua, n, first, last, last / first, s.arenas))
