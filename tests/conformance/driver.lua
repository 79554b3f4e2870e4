-- Runs an upstream Lua test suite with lunet.mem loaded in one mode; scripts/conformance.sh
-- runs it in each mode and compares the results with the same run in mode `bare`.
-- Run from the suite's folder (the files use relative paths), with the rock on LUA_(C)PATH:
--   <lua> driver.lua MODE puc-all            the suite's all.lua, each file it runs in MODE
--   <lua> driver.lua MODE puc-file FILE      one file, with the globals the suite's README gives
--                                            for a file run alone (_U _soft _port _nomsg)
--   <lua> driver.lua MODE luajit [ARGS]      LuaJIT's test.lua, each of its tests in MODE
-- MODE: bare (the module not loaded: the baseline), loaded, scope, arena, budget, trace,
-- trace_sampled. After each file (each test on LuaJIT) it checks
-- mem.stats().live_bytes == collectgarbage("count") * 1024; a mismatch prints
-- "conformance: FAIL ..." and fails the run (on LuaJIT: that test).
local mode, kind = arg[1], arg[2]
local usage = "usage: driver.lua bare|loaded|scope|arena|budget|trace|trace_sampled "
  .. "puc-all|puc-file FILE|luajit [ARGS]"

local real_loadfile, real_load, real_xpcall = loadfile, load, xpcall
local real_dump, collectgarbage, format, select = string.dump, collectgarbage, string.format, select
local stdout, stderr, exit, traceback = io.stdout, io.stderr, os.exit, debug.traceback
local pcall, tostring, type = pcall, tostring, type -- (all.lua erases every global at its end)
local setfenv = rawget(_G, "setfenv")
local jit = rawget(_G, "jit")

-- The mode's wrapper around one file (or one LuaJIT test): name, fn, args -> fn's results.
local mem
local run_in = {
  bare = function(_, fn, ...) return fn(...) end,
  loaded = function(_, fn, ...) return fn(...) end,
  scope = function(name, fn, ...) return mem.scope(name, fn, ...) end,
  arena = function(name, fn, ...) return mem.scope({ name = name, arena = true }, fn, ...) end,
  -- 2^40 bytes: a budget that is checked on every allocation and never reached.
  budget = function(name, fn, ...) return mem.scope({ name = name, limit = 2 ^ 40 }, fn, ...) end,
  trace = function(_, fn, ...) return fn(...) end,
  trace_sampled = function(_, fn, ...) return fn(...) end,
}
if not run_in[mode] or not (kind == "puc-all" or kind == "puc-file" or kind == "luajit") then
  stderr:write(usage, "\n")
  exit(2)
end

-- Line by line, so that a crash leaves the name of the file or test it happened in as the last
-- line of the log (the LuaJIT runner's own promise).
stdout:setvbuf("line")

local failures = 0
local function fail(what)
  failures = failures + 1
  stderr:write("conformance: FAIL ", what, "\n")
  return what
end

-- Loading the module first, as a server would, so that it wraps the allocator before the
-- suite allocates anything (and coroutine.resume/wrap before the suite reads them).
-- It is then taken out of package.loaded, as if a host had installed it from C: LuaJIT's suite
-- checks the list of loaded packages (lib/contents.lua) and its runner seals every table
-- reachable from _G against writes, which says nothing about the module's behaviour.
if mode ~= "bare" then
  mem = require "lunet.mem"
  package.loaded["lunet.mem"] = nil
  if mode == "trace" then
    assert(mem.trace.start() == true, "mem.trace.start() did not start")
  elseif mode == "trace_sampled" then
    assert(mem.trace.start { sample_bytes = 512 * 1024 } == true,
      "mem.trace.start{sample_bytes} did not start")
  end
end

-- live_bytes against Lua's own count, read back to back. On LuaJIT with the compiler off for
-- this function: the trace recorder allocates (really) when code gets hot, and it could do so
-- between the two reads (spec/helpers.lua's helpers.exact does the same).
local function live_bytes_exact()
  local counted = collectgarbage("count") * 1024
  local live = mem.stats().live_bytes
  return live == counted, live, counted
end
if jit then jit.off(live_bytes_exact) end

-- Nil when the counts agree after `what`, else the failure message (printed, and counted as a
-- failure of the run, unless `in_test`: then the caller fails the test with it).
local function check_after(what, in_test)
  if not mem then return nil end
  local same, live, counted = live_bytes_exact()
  if same then return nil end
  return (in_test and tostring or fail)(format("live_bytes after %s: mem.stats().live_bytes = %.0f, "
    .. "collectgarbage('count') * 1024 = %.0f", what, live, counted))
end

local function pass_on(what, ...)
  check_after(what)
  return ...
end

-- How many files (tests on LuaJIT) ran through the mode's wrapper: printed at the end, so that
-- the script can tell a run in the mode from a run that bypassed the wrapper.
local wrapped = 0

-- Runs fn(...) as the mode's wrapper says, then checks the counts; returns fn's results.
local function run_file(name, fn, ...)
  wrapped = wrapped + 1
  return pass_on(name, run_in[mode](name, fn, ...))
end

-- At the end: the counts once more, and in trace modes that the tracer is still on and gives a
-- snapshot (the suite ran with it all along).
local function check_end(what)
  if not mem then return end
  check_after(what)
  if mode == "trace" or mode == "trace_sampled" then
    if not mem.trace.is_tracing() then
      fail("mem.trace.is_tracing() is false at the end of the run")
    else
      local snap, err = mem.trace.snapshot()
      local ok, top = pcall(function() return snap and snap:top(3) end)
      if not snap or not ok or type(top) ~= "table" then
        fail("mem.trace.snapshot():top(3) at the end: " .. tostring(err or top))
      end
    end
  end
end

-- Loads a chunk with `env` as its globals (5.1/LuaJIT: setfenv; 5.2+: loadfile's env).
local function loadfile_with_env(path, env)
  if setfenv then
    local chunk = assert(real_loadfile(path))
    return setfenv(chunk, env)
  end
  return assert(real_loadfile(path, "t", env))
end

-- A view of _G for the suite's runner: reads and writes go to _G (so the globals it sets are
-- the real ones the files see), except the names in `own`, which the runner alone sees.
local function runner_env(own)
  return setmetatable(own, { __index = _G, __newindex = _G })
end

local function report_wrapped()
  stdout:write(format("conformance: %d run in mode %s\n", wrapped, mode))
  stdout:flush()
  stderr:flush()
end

local function exit_with_status()
  report_wrapped()
  exit(failures == 0 and 0 or 1)
end

if kind == "puc-all" then
  -- all.lua runs each file in one of three ways: its own local dofile (loadfile, string.dump
  -- with or without strip, load of the dump, call), the real dofile (`olddofile`), or
  -- loadfile and a call (gc.lua; big.lua in a coroutine). Its own code alone sees wrappers of
  -- loadfile, string.dump, load and dofile that keep each of these paths (the dump really
  -- dumps the file's function, with all.lua's strip flag) and put the call of the file in
  -- the mode. The files themselves see the real functions.
  local file_of_wrapper = setmetatable({}, { __mode = "k" }) -- wrapper -> {name, fn}
  local file_of_dump = {} -- string.dump's result -> file name, until load takes it
  local function wrap(name, fn)
    local wrapper = function(...) return run_file(name, fn, ...) end
    file_of_wrapper[wrapper] = { name, fn }
    return wrapper
  end
  local own = {}
  own.loadfile = function(path, ...)
    local fn, err = real_loadfile(path, ...)
    if not fn then return fn, err end
    return wrap(path, fn)
  end
  own.string = setmetatable({
    dump = function(fn, ...)
      local file = file_of_wrapper[fn]
      if not file then return real_dump(fn, ...) end
      local bytes = real_dump(file[2], ...)
      file_of_dump[bytes] = file[1]
      return bytes
    end,
  }, { __index = string })
  own.load = function(chunk, ...)
    local name = type(chunk) == "string" and file_of_dump[chunk]
    if not name then return real_load(chunk, ...) end
    file_of_dump[chunk] = nil
    local fn, err = real_load(chunk, ...)
    if not fn then return fn, err end
    return wrap(name, fn)
  end
  own.dofile = function(path)
    local fn = assert(real_loadfile(path))
    return run_file(path, fn)
  end
  -- The suite README's command: `lua -e "_U=true" all.lua` (user mode: no internal T library,
  -- no non-portable or long tests).
  _U = true -- luacheck: ignore 111
  local all = loadfile_with_env("all.lua", runner_env(own))
  all(select(3, ...))
  check_end("all.lua")
  exit_with_status()
elseif kind == "puc-file" then
  local path = assert(arg[3], usage)
  -- The suite README's way to run one file: `lua -e "_U=true _soft=true _port=true
  -- _nomsg=true" file.lua`.
  _U, _soft, _port, _nomsg = true, true, true, true -- luacheck: ignore 111
  local fn = assert(real_loadfile(path))
  local ok, err = real_xpcall(function() return run_file(path, fn) end, traceback)
  if not ok then fail(path .. ": " .. tostring(err)) end
  check_end(path)
  exit_with_status()
else
  -- LuaJIT's test.lua runs each test as xpcall(test, debug.traceback), with xpcall read into a
  -- local when it starts: it gets an xpcall that runs the test in the mode and checks the
  -- counts after it (a mismatch fails that test, so it shows in the list of failing tests).
  -- Its tests see the real xpcall.
  -- (The runner prints the test's number and name before it runs: the messages say "test".)
  local own = {
    xpcall = function(test, handler)
      wrapped = wrapped + 1
      local ok, err = real_xpcall(function() return run_in[mode]("test.lua test", test) end, handler)
      local mismatch = check_after("the test", true)
      if ok and mismatch then return false, "lunet.mem conformance: " .. mismatch end
      return ok, err
    end,
    -- test.lua ends with os.exit(1) when a test failed.
    os = setmetatable({
      exit = function(...)
        check_end("test.lua")
        report_wrapped()
        return exit(...)
      end,
    }, { __index = os }),
  }
  local args = { select(3, ...) }
  -- The plan is that of the interpreter with its compiler on, whatever the mode: tracing turns
  -- LuaJIT's compiler off (and a budget does, on 2.1.0-beta), which would drop the `+jit` tests
  -- from the plan and renumber the rest. With `+jit` the same tests run, under the same numbers.
  if jit and jit.version then args[#args + 1] = "+jit" end
  local test_lua = loadfile_with_env("test.lua", runner_env(own))
  test_lua((unpack or table.unpack)(args))
  check_end("test.lua")
  exit_with_status()
end
