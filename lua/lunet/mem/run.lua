-- The runner behind `lunet-mem run` (bin/lunet-mem): run as a script,
--   lua run.lua [--sample-bytes N] [--depth N] [--flamegraph out.svg] [--dump out.folded]
--               [--pprof out.pb.gz] [--top N] -- script.lua [args]
-- it starts mem.trace, runs the script with its own `arg` and `...`, then writes the report to
-- stderr (and the pictures, the pprof heap profile), also when the script fails or calls os.exit.
local mem = require "lunet.mem"

local function usage_error(msg)
  io.stderr:write("lunet-mem: ", msg, "\n")
  os.exit(2)
end

-- An option's value as an integer from `lo` to `hi`, or a usage error naming it.
local function integer(name, value, lo, hi)
  local n = tonumber(value)
  if not n or n ~= math.floor(n) or n < lo or n > hi then
    local range = hi == math.huge and (">= %d"):format(lo) or ("from %d to %d"):format(lo, hi)
    usage_error(("%s expects a whole number %s, got '%s'"):format(name, range, tostring(value)))
  end
  return n
end

local argv = arg or {}
local opts, i = { top = 10 }, 1
while argv[i] and argv[i] ~= "--" do
  local name, value = argv[i], argv[i + 1]
  if value == nil then usage_error(name .. " needs a value") end
  if name == "--sample-bytes" then opts.sample_bytes = integer(name, value, 1, 2 ^ 40)
  elseif name == "--depth" then opts.depth = integer(name, value, 1, 64)
  elseif name == "--flamegraph" then opts.flamegraph = value
  elseif name == "--dump" then opts.dump = value
  elseif name == "--pprof" then opts.pprof = value
  elseif name == "--top" then opts.top = integer(name, value, 0, math.huge)
  else
    usage_error("unknown option " .. tostring(name))
  end
  i = i + 2
end
local script = argv[i + 1]
if not script then
  io.stderr:write("lunet-mem: no script given\n")
  os.exit(2)
end

-- The script's `arg`, as lua.c makes it.
local script_arg = { [0] = script }
for k = i + 2, #argv do script_arg[#script_arg + 1] = argv[k] end
local lowest = 0
while argv[lowest - 1] do lowest = lowest - 1 end
for k = lowest, -1 do script_arg[k - i - 1] = argv[k] end
script_arg[-1] = script_arg[-1] or argv[0]

local function human(n)
  if n >= 1024 * 1024 then return string.format("%.1f MiB", n / 1048576) end
  if n >= 1024 then return string.format("%.1f KiB", n / 1024) end
  return string.format("%d B", n)
end

local reported = false
local function report()
  if reported then return end
  reported = true
  -- Live means reachable: garbage not yet collected is left out.
  collectgarbage("collect")
  collectgarbage("collect")
  local snap = mem.trace.snapshot()
  if not snap then return end
  mem.trace.stop()
  local err = io.stderr
  local sampled = opts.sample_bytes
    and (" (sampled every %d bytes, estimates)"):format(opts.sample_bytes) or ""
  err:write(("lunet-mem: top %d allocation sites by live bytes at exit%s\n"):format(opts.top, sampled))
  for rank, s in ipairs(snap:top(opts.top, "line")) do
    err:write(("  #%-2d %-50s %10s in %d %s\n"):format(rank, s.site, human(s.bytes), s.blocks,
      s.blocks == 1 and "block" or "blocks"))
  end
  if opts.flamegraph then
    local ok, msg = snap:flamegraph(opts.flamegraph, { title = "Live bytes by Lua stack: " .. script })
    err:write(ok and ("lunet-mem: flame graph written to %s\n"):format(opts.flamegraph)
      or ("lunet-mem: no flame graph: %s\n"):format(msg))
  end
  if opts.dump then
    local ok, msg = snap:dump(opts.dump)
    err:write(ok and ("lunet-mem: folded stacks written to %s\n"):format(opts.dump)
      or ("lunet-mem: no folded stacks: %s\n"):format(msg))
  end
  if opts.pprof then
    local ok, msg = snap:pprof(opts.pprof)
    err:write(ok and ("lunet-mem: pprof heap profile written to %s\n"):format(opts.pprof)
      or ("lunet-mem: no pprof heap profile: %s\n"):format(msg))
  end
end

local exit = os.exit
os.exit = function(...) -- luacheck: ignore 122
  report()
  return exit(...)
end

local chunk, load_err = loadfile(script)
if not chunk then
  io.stderr:write("lunet-mem: ", tostring(load_err), "\n")
  exit(1)
end
_G.arg = script_arg
mem.trace.start({ sample_bytes = opts.sample_bytes, depth = opts.depth })
local unpack_args = rawget(_G, "unpack") or table.unpack
local ok, run_err = xpcall(function() return chunk(unpack_args(script_arg, 1, #script_arg)) end,
  debug.traceback)
report()
if not ok then
  io.stderr:write("lua: ", tostring(run_err), "\n")
  exit(1)
end
exit(0)
