-- Several OS threads (luv), each with a Lua state of its own that loads lunet.mem and runs
-- scoped requests, with and without arenas, at the same time: each state's counts must be exact
-- and equal to those of a lone run (no cross-talk through the process-wide arena range).
-- Prints "ok" and exits 0, or says what differed and exits 1.
local uv = require "luv"

local THREADS = 4

-- The work of one thread; returns a line "allocs net exact arenas_left" (run in its own state:
-- passed as bytecode, so it uses no upvalue).
local function work(arena)
  local mem = require "lunet.mem"
  if rawget(_G, "jit") then jit.off() end -- (the trace recorder's memory would count)
  collectgarbage("stop")
  local allocs, net, exact = 0, 0, true
  for r = 1, 300 do
    mem.scope({ name = "req", arena = arena, on_exit = function(s)
      allocs = allocs + s.allocs
      net = net + s.net_bytes
    end }, function()
      local rows = {}
      for i = 1, 20 do rows[i] = { id = i, name = "n" .. i } end
      return rows
    end)
    local counted = collectgarbage("count") * 1024
    if mem.stats().live_bytes ~= counted then exact = false end
    if r % 100 == 0 then collectgarbage("collect") collectgarbage("stop") end
  end
  collectgarbage("restart")
  collectgarbage("collect")
  collectgarbage("collect")
  return ("%d %d %s %d"):format(allocs, net, tostring(exact), mem.stats().arenas)
end

-- Runs `work` in a new thread, which writes its line to `path`.
local function spawn(arena, path)
  return uv.new_thread(function(code, flag, out)
    local f = assert((loadstring or load)(code))
    local line = f(flag == "arena")
    local h = assert(io.open(out, "w"))
    h:write(line)
    h:close()
  end, string.dump(work), arena and "arena" or "plain", path)
end

local function read(path)
  local h = assert(io.open(path))
  local s = h:read("*a")
  h:close()
  os.remove(path)
  return s
end

local base = os.tmpname()
local expected = {}
for _, arena in ipairs { false, true } do
  -- a lone run first, then THREADS at once
  local lone = base .. (arena and "-a" or "-p")
  spawn(arena, lone):join()
  expected[arena] = read(lone)
end
local threads, paths = {}, {}
for i = 1, THREADS * 2 do
  local arena = i % 2 == 0
  paths[i] = base .. "-" .. i
  threads[i] = { spawn(arena, paths[i]), arena }
end
local failed = false
for i, t in ipairs(threads) do
  t[1]:join()
  local got = read(paths[i])
  local want = expected[t[2]]
  if got ~= want or not got:match(" true 0$") then
    print(("thread %d (%s): %s, alone: %s"):format(i, t[2] and "arena" or "plain", got, want))
    failed = true
  end
end
os.remove(base)
if failed then os.exit(1) end
print(("ok: %d threads, each %s (plain) / %s (arena) as alone"):format(THREADS * 2,
  expected[false], expected[true]))
