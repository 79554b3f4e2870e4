-- busted/luassert assertions for lunet.mem:
--
--   require "lunet.mem.busted"
--   assert.is_neutral(fn, [opts])             -- fails with the leak report
--   assert.is_not_neutral(fn, [opts])         -- fails if no leak was found
--   assert.allocates_at_most(limit, fn, ...)  -- limit: bytes, or {bytes = n, blocks = n}
--   assert.retains_at_most(bytes, fn, ...)
--
-- `opts` are those of mem.is_neutral (tolerance, warmup, runs, name). The last two measure one
-- call fn(...) with mem.measure (one warm-up call first): `allocates` bounds its
-- allocated_bytes (and its allocs, as `blocks`), `retains` its retained_bytes. Their negations
-- (assert.is_not.allocates_at_most, ...) pass when the figure is over the limit. A failure names
-- the figures and the top allocation sites of one more call of fn(...), traced.
local assert = require "luassert"
local say = require "say"
local mem = require "lunet.mem"

local format, concat = string.format, table.concat
local unpack = rawget(table, "unpack") or unpack

local function neutral(_, arguments)
  local fn, opts = arguments[1], arguments[2]
  local ok, report = mem.is_neutral(fn, opts)
  -- The message shows the report (or that none was made) in place of the function.
  arguments[1] = report or ("no leak found in " .. tostring(fn))
  arguments.n = 1
  arguments.nofmt = { true }
  return ok
end

say:set("assertion.lunet_mem_neutral.positive", "Expected the function to be memory-neutral:\n%s")
say:set("assertion.lunet_mem_neutral.negative", "Expected the function to leak memory:\n%s")
assert:register("assertion", "neutral", neutral,
  "assertion.lunet_mem_neutral.positive", "assertion.lunet_mem_neutral.negative")

-- Per-call bounds ---------------------------------------------------------------------------------

local TOP_SITES = 5

local function plural(n, word)
  if n == 1 or n == -1 then return word end
  return word .. "s"
end

local function is_callable(v)
  if type(v) == "function" then return true end
  local mt = getmetatable(v)
  return type(mt) == "table" and rawget(mt, "__call") ~= nil
end

local function is_count(v)
  return type(v) == "number" and v >= 0 and v <= 2 ^ 53 and v == math.floor(v)
end

-- Raises "bad argument #n to 'fname' (msg)" at the line of the assertion (`level` as luassert
-- gives it to an assertion: the caller's level seen from the assertion's own frame).
local function argerror(n, fname, msg, level)
  error(format("bad argument #%d to '%s' (%s)", n, fname, msg), (level or 1) + 2)
end

-- The bounds of `allocates_at_most`: `bytes, blocks` (either may be nil), checked.
local function allocation_limit(limit, level)
  if is_count(limit) then return limit, nil end
  local fname = "allocates_at_most"
  if type(limit) ~= "table" then
    argerror(1, fname, (type(limit) == "number" and "non-negative integer" or "number or table")
      .. " expected, got " .. (type(limit) == "number" and tostring(limit) or type(limit)), level + 1)
  end
  for k, v in pairs(limit) do
    if k ~= "bytes" and k ~= "blocks" then
      argerror(1, fname, format("unknown field '%s'", tostring(k)), level + 1)
    end
    if not is_count(v) then
      argerror(1, fname, format("field '%s': non-negative integer expected, got %s", k,
        type(v) == "number" and tostring(v) or type(v)), level + 1)
    end
  end
  if limit.bytes == nil and limit.blocks == nil then
    argerror(1, fname, "table with 'bytes' or 'blocks' expected, got an empty table", level + 1)
  end
  return limit.bytes, limit.blocks
end

-- The arguments after the limit: `fn` and its arguments, packed.
local function call_of(arguments, fname, level)
  local fn = arguments[2]
  if not is_callable(fn) then argerror(2, fname, "function expected, got " .. type(fn), level + 1) end
  local args = { n = arguments.n - 2 }
  for i = 3, arguments.n do args[i - 2] = arguments[i] end
  return fn, args
end

-- Sites that are not the call's: this file's (the snapshots made here) and the module's (its
-- collections resize the thread's stack). As the tracer writes them: `short_src:line`.
local own_sources = { debug.getinfo(1, "S").short_src, debug.getinfo(mem.settle, "S").short_src }
local function is_own(site)
  for _, source in ipairs(own_sources) do
    if site:sub(1, #source + 1) == source .. ":" then return true end
  end
  return false
end

-- The top sites of one more call of fn(...), traced, as report lines. `retained`: sites of the
-- blocks still live after a full collection (what the call keeps), else of every block the call
-- made and had not freed when it returned (the collector is stopped during it, so that its
-- garbage is counted too).
local function traced_sites(fn, args, retained)
  local tracing = mem.trace.is_tracing()
  if not tracing then mem.trace.start() end
  -- (5.1 and LuaJIT cannot tell: the collector is assumed running)
  local known, running = pcall(collectgarbage, "isrunning")
  local collecting = not known or running
  local ok, rows = pcall(function()
    mem.settle()
    local before = mem.trace.snapshot()
    if not retained then collectgarbage("stop") end
    fn(unpack(args, 1, args.n))
    if retained then mem.settle() end
    local after = mem.trace.snapshot()
    -- (a restarted collector runs a step at the next allocation: not before the snapshot)
    if collecting then collectgarbage("restart") end
    return after:compare(before)
  end)
  if collecting then collectgarbage("restart") end
  if not tracing then mem.trace.stop() end
  if not ok then return { "  (no traced run: " .. tostring(rows) .. ")" } end

  local lines = { retained and "  top sites of what a traced call retained:"
    or "  top allocation sites of a traced call:" }
  for _, row in ipairs(rows) do
    if #lines > TOP_SITES then break end
    if row.bytes_diff > 0 and not is_own(row.site) then
      lines[#lines + 1] = format("    #%d  %-48s %d bytes in %d %s", #lines, row.site,
        row.bytes_diff, row.blocks_diff, plural(row.blocks_diff, "block"))
    end
  end
  if #lines == 1 then lines[2] = "    (none: the call kept no block it made)" end
  return lines
end

-- The figures of `mem.measure`, as a report line.
local function figures_line(m)
  return format("  allocated %d bytes in %d %s (%d %s), freed %d bytes in %d %s; " ..
    "net %+d bytes, peak %d bytes, retained %+d bytes",
    m.allocated_bytes, m.allocs, plural(m.allocs, "block"), m.reallocs, plural(m.reallocs, "resize"),
    m.freed_bytes, m.frees, plural(m.frees, "block"), m.net_bytes, m.peak_bytes, m.retained_bytes)
end

-- Whether luassert fails the assertion when its callback returns `ok` (a negation fails on true).
local function fails(state, ok)
  return (ok and true or false) == (state.mod == false)
end

-- The message shows `text` in place of the arguments.
local function set_message(arguments, text)
  arguments[1] = text
  arguments.n = 1
  arguments.nofmt = { true }
end

local function allocates_at_most(state, arguments, level)
  local bytes, blocks = allocation_limit(arguments[1], level)
  local fn, args = call_of(arguments, "allocates_at_most", level)
  local m = mem.measure(fn, unpack(args, 1, args.n))
  local ok = (bytes == nil or m.allocated_bytes <= bytes) and (blocks == nil or m.allocs <= blocks)
  local limit = {}
  if bytes then limit[#limit + 1] = format("%d %s", bytes, plural(bytes, "byte")) end
  if blocks then limit[#limit + 1] = format("%d %s", blocks, plural(blocks, "block")) end
  local lines = { concat(limit, state.mod == false and " or " or " in ") .. ":", figures_line(m) }
  if fails(state, ok) then
    for _, line in ipairs(traced_sites(fn, args, false)) do lines[#lines + 1] = line end
  end
  set_message(arguments, concat(lines, "\n"))
  return ok
end

local function retains_at_most(state, arguments, level)
  local bytes = arguments[1]
  if not is_count(bytes) then
    argerror(1, "retains_at_most", (type(bytes) == "number" and "non-negative integer expected, got "
      .. tostring(bytes) or "number expected, got " .. type(bytes)), level)
  end
  local fn, args = call_of(arguments, "retains_at_most", level)
  local m = mem.measure(fn, unpack(args, 1, args.n))
  local ok = m.retained_bytes <= bytes
  local lines = { format("%d %s:", bytes, plural(bytes, "byte")), figures_line(m) }
  if fails(state, ok) then
    for _, line in ipairs(traced_sites(fn, args, true)) do lines[#lines + 1] = line end
  end
  set_message(arguments, concat(lines, "\n"))
  return ok
end

say:set("assertion.lunet_mem_allocates_at_most.positive", "Expected the call to allocate at most %s")
say:set("assertion.lunet_mem_allocates_at_most.negative", "Expected the call to allocate more than %s")
assert:register("assertion", "allocates_at_most", allocates_at_most,
  "assertion.lunet_mem_allocates_at_most.positive", "assertion.lunet_mem_allocates_at_most.negative")

say:set("assertion.lunet_mem_retains_at_most.positive", "Expected the call to retain at most %s")
say:set("assertion.lunet_mem_retains_at_most.negative", "Expected the call to retain more than %s")
assert:register("assertion", "retains_at_most", retains_at_most,
  "assertion.lunet_mem_retains_at_most.positive", "assertion.lunet_mem_retains_at_most.negative")

return mem
