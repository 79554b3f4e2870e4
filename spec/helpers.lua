-- Shared helpers for the specs. Run through scripts/test.sh, which installs the rock for the
-- interpreter busted runs under and sets LUNET_MEM_LUA to that interpreter.
local helpers = {}

helpers.mem = require "lunet.mem"
helpers.is_jit = rawget(_G, "jit") ~= nil
helpers.version = helpers.mem.lua -- "luajit", "lua51", ..., "lua55"
helpers.can_yield_in_scope = helpers.version ~= "lua51"

-- The interpreter running the specs, for the specs that start a fresh process.
function helpers.interpreter()
  local lua = os.getenv("LUNET_MEM_LUA")
  if lua and lua ~= "" then return lua end
  local i = -1
  while arg and arg[i - 1] do i = i - 1 end
  return arg and arg[i] or "lua"
end

-- Reads live bytes and the interpreter's own count back to back. The comparison runs with the
-- JIT off for this one function: on LuaJIT the trace recorder may allocate (really) between two
-- reads, which says nothing about the counts; the code under test stays compiled.
local mem = helpers.mem
function helpers.exact()
  local counted = collectgarbage("count") * 1024
  local live = mem.stats().live_bytes
  return live == counted, live, counted
end
if helpers.is_jit then jit.off(helpers.exact) end

-- Runs `fn` with LuaJIT's compiler off and its traces flushed, then turns it back on. For specs
-- that compare two readings taken apart: the trace recorder allocates (really) when code gets
-- hot, which is the JIT's memory, not the code's.
function helpers.without_jit(fn)
  return function(...)
    if not helpers.is_jit then return fn(...) end
    jit.off()
    jit.flush()
    local ok, err = pcall(fn, ...)
    jit.on()
    if not ok then error(err, 0) end
  end
end

-- Two full collections: garbage made before is freed (and objects with finalizers finalized).
function helpers.settle()
  collectgarbage("collect")
  collectgarbage("collect")
end

-- On LuaJIT, what the interpreter makes while the trace recorder records is the compiler's
-- for the hook (README, Limits): the specs that check where each new object goes run with the
-- compiler off (traces compiled before still run), between these two.
function helpers.recorder_off()
  helpers.settle()
  if helpers.is_jit then jit.off() end
end
function helpers.recorder_back()
  if helpers.is_jit then jit.on() end
end

-- Runs `code` in a fresh interpreter; returns the exit status (true/false), its output and code.
function helpers.run_lua(code)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(code)
  f:close()
  -- (a bounded run: a process that hangs fails its spec instead of the whole suite)
  local cmd = string.format("timeout 120 %s %s 2>&1; echo \"exit=$?\"", helpers.interpreter(), path)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  os.remove(path)
  local status = tonumber(out:match("exit=(%d+)%s*$"))
  return status == 0, out:gsub("exit=%d+%s*$", ""), status
end

-- Asserts that `fn` raises an error whose message contains `text` (plain match).
function helpers.raises(text, fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected an error containing: " .. text)
  assert(type(err) == "string" and err:find(text, 1, true),
    "expected an error containing:\n  " .. text .. "\ngot:\n  " .. tostring(err))
  return err
end
-- Debian's LuaJIT 2.1.0-beta3 once passed this function's varargs on as empty (1 run in ~50 of
-- the suite, not reproduced alone): it runs interpreted; the code it calls stays compiled.
if helpers.is_jit then jit.off(helpers.raises) end

return helpers
