-- One benchmark run: lua bench/workloads.lua WORKLOAD MODE N
--   WORKLOAD: churn | strings | handler | retain16 | retain256 (the handler's responses kept
--             for the next 16 or 256 requests) | luacheck (Debian's luacheck, a real Lua
--             program, checking this repository's Lua files N times, each file a request)
--   MODE:     bare (no module) | track (module loaded) | scope (module, a scope per request)
--             | arena (module, an arena scope per request) | metrics (scope, with
--             mem.metrics.enable(): each scope's figures aggregated when it closes)
--             | trace (module, mem.trace.start())
--             | trace-sampled (mem.trace.start{sample_bytes = $LUNET_MEM_SAMPLE_BYTES or
--             524288}) | interp (bare, LuaJIT's compiler off)
--   (LUNET_MEM_ALLOCATOR=host|mimalloc in the environment picks where new blocks come from)
-- Prints the CPU seconds the workload took (start-up and loading excluded) and the process's
-- peak resident set in KiB (VmHWM).
local workload, mode, n = arg[1], arg[2], tonumber(arg[3])
local mem
if mode ~= "bare" and mode ~= "interp" then mem = require "lunet.mem" end
if mode == "interp" and rawget(_G, "jit") then jit.off() end
-- (metrics: the scope mode plus the aggregation at each close)
local scoped = mode == "scope" or mode == "metrics"
if mode == "metrics" then
  mem.metrics.enable()
elseif mode == "trace" then
  mem.trace.start()
elseif mode == "trace-sampled" then
  mem.trace.start({ sample_bytes = tonumber(os.getenv("LUNET_MEM_SAMPLE_BYTES") or "524288") })
end

local work = {}

-- Short-lived tables kept in a ring, so that they really are allocated (LuaJIT cannot sink
-- them) and die young.
function work.churn(iterations)
  local ring = {}
  for i = 1, iterations do
    ring[i % 64 + 1] = { i, i + 1, { x = i } }
  end
  return ring
end

-- String building: formatting, concatenation, table.concat.
function work.strings(iterations)
  local parts, out = {}, nil
  for i = 1, iterations do
    parts[i % 32 + 1] = ("%d:%s"):format(i, "v" .. (i % 1000))
    if i % 32 == 0 then out = table.concat(parts, ",") end
  end
  return out
end

-- A request handler: parse a header block, build a response table, format a body, drop it all.
local handler, raw = dofile("bench/handler.lua")

-- Each request's response is kept for the `keep` requests that follow (1: dropped at once, as
-- a request whose result is written out; 16 or 256: a send queue or a cache), so that with an
-- arena scope the arenas of the last `keep` requests are alive at any time.
local ARENA = { name = "GET /users", arena = true }
local function serve(iterations, keep)
  local ring = {}
  if scoped then
    for i = 1, iterations do ring[i % keep + 1] = mem.scope("GET /users", handler, raw) end
  elseif mode == "arena" then
    for i = 1, iterations do ring[i % keep + 1] = mem.scope(ARENA, handler, raw) end
  else
    for i = 1, iterations do ring[i % keep + 1] = handler(raw) end
  end
  return ring
end
function work.handler(iterations) return serve(iterations, 1) end
function work.retain16(iterations) return serve(iterations, 16) end
function work.retain256(iterations) return serve(iterations, 256) end

-- luacheck over the repository's own Lua code (about 10,000 lines), one file per request.
-- Debian installs luacheck for 5.1 only; it is plain Lua and runs on every version.
if workload == "luacheck" then
  package.path = "/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;" .. package.path
  local luacheck = require "luacheck"
  local sources, names = {}, {}
  local list = assert(io.popen("ls lua/lunet/*.lua lua/lunet/mem/*.lua spec/*.lua bench/*.lua " ..
    "examples/*.lua tests/fuzz/*.lua tests/conformance/*.lua"))
  for path in list:lines() do
    local h = assert(io.open(path, "rb"))
    sources[#sources + 1] = h:read("*a")
    names[#names + 1] = path
    h:close()
  end
  list:close()
  local function check(src) return luacheck.check_strings({ src }) end
  function work.luacheck(passes)
    local warnings = 0
    for _ = 1, passes do
      for i, src in ipairs(sources) do
        local report
        if scoped then
          report = mem.scope(names[i], check, src)
        elseif mode == "arena" then
          report = mem.scope({ name = names[i], arena = true }, check, src)
        else
          report = check(src)
        end
        warnings = warnings + report.warnings
      end
    end
    return warnings
  end
end

local f = assert(work[workload], "unknown workload")
collectgarbage("collect")
local t0 = os.clock()
f(n)
local seconds = os.clock() - t0
local status = io.open("/proc/self/status")
local hwm = status and status:read("*a"):match("VmHWM:%s*(%d+)") or "0"
if status then status:close() end
print(string.format("%.6f %s", seconds, hwm))
