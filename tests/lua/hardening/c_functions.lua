-- Finds every C function of lunet.mem reachable from Lua with the debug library, and calls one of
-- them with bad arguments. Used by spec/13-hardening_spec.lua, one fresh process per function:
--
--   lua c_functions.lua list            -- prints the paths of the functions, one a line
--   lua c_functions.lua call PATH FIRST -- calls the function at PATH with argument patterns
--                                          FIRST, FIRST+1, ...; prints "call N: ok|error: msg"
--                                          before/after each and "done" at the end
--
-- The walk starts from the module tables (lunet.mem, lunet.mem.holders), the module's objects
-- (a checkpoint, a scope, a trace snapshot) and the registry entries named "lunet.mem...", and
-- follows table fields, upvalues and metatables breadth-first, so that each function gets its
-- shortest path. C functions of the standard library (reachable from _G before the module is
-- loaded) are left out: their weaknesses are stock Lua's.
local mode, wanted, first = arg[1], arg[2], tonumber(arg[3]) or 1

local getupvalue, getmetatable, getinfo = debug.getupvalue, debug.getmetatable, debug.getinfo

-- The standard library's functions, before the module replaces any of them.
local stock = {}
do
  local seen = {}
  local function mark(v)
    if seen[v] then return end
    if type(v) == "function" then
      seen[v], stock[v] = true, true
    elseif type(v) == "table" then
      seen[v] = true
      for k, x in pairs(v) do mark(k) mark(x) end
      local mt = getmetatable(v)
      if mt then mark(mt) end
    end
  end
  mark(_G)
  mark(getmetatable(""))
  mark(getmetatable(io.stdout))
  mark(debug.getregistry())
end

local mem = require "lunet.mem"
local holders = require "lunet.mem.holders"
local checkpoint = mem.checkpoint()
local scope = mem.scope(mem.current)
mem.trace.start()
local snapshot = mem.trace.snapshot()
mem.trace.stop()

-- Keys in a stable order (strings first, sorted; other keys by type name), so that the paths are
-- the same in every process.
local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta == "string" or (tb ~= "string" and ta < tb) end
    if ta == "string" or ta == "number" then return a < b end
    return false
  end)
  return keys
end

local found, by_path, core = {}, {}, nil
do
  local seen, queue, head = {}, {}, 1
  local function push(v, path)
    local tv = type(v)
    if (tv == "table" or tv == "function" or tv == "userdata" or tv == "thread") and not seen[v] then
      seen[v] = true
      queue[#queue + 1] = { v, path }
    end
  end
  push(mem, "mem")
  push(holders, "holders")
  push(checkpoint, "checkpoint")
  push(scope, "scope")
  push(snapshot, "snapshot")
  local registry = debug.getregistry()
  for _, k in ipairs(sorted_keys(registry)) do
    if type(k) == "string" and k:find("^lunet%.mem") then push(registry[k], "registry[" .. k .. "]") end
  end
  while queue[head] do
    local v, path = queue[head][1], queue[head][2]
    head = head + 1
    local tv = type(v)
    if tv == "function" then
      if getinfo(v, "S").what == "C" and not stock[v] then
        found[#found + 1] = path
        by_path[path] = v
      end
      for i = 1, 255 do
        local name, up = getupvalue(v, i)
        if not name then break end
        -- (the table of the module's C functions gets its own short name)
        if name == "core" and type(up) == "table" then core = up end
        push(up, name == "core" and "core" or path .. "^" .. (name ~= "" and name or tostring(i)))
      end
    elseif tv == "table" then
      for _, k in ipairs(sorted_keys(v)) do
        push(k, path .. "{key}")
        push(v[k], path .. "." .. tostring(k))
      end
    end
    local mt = getmetatable(v)
    if mt then push(mt, path .. "#mt") end
  end
end

if mode == "list" then
  for _, path in ipairs(found) do print(path) end
  return
end

local f = assert(by_path[wanted], "no C function at " .. tostring(wanted))
local unpack = rawget(_G, "unpack") or table.unpack
local foreign = rawget(_G, "newproxy") and newproxy(true) or io.stdout
local anchor = {}
local function with_upvalue() return anchor end
local light = debug.upvalueid and debug.upvalueid(with_upvalue, 1) or nil -- a light userdata
local patterns = {
  { n = 0 }, { n = 1, nil }, { n = 1, 1 }, { n = 1, -1 }, { n = 1, 0 / 0 }, { n = 1, 1e308 },
  { n = 1, "x" }, { n = 1, {} }, { n = 1, true }, { n = 1, print },
  { n = 1, coroutine.create(function() end) }, { n = 1, light },
  { n = 3, 1, 2, 3 }, { n = 3, "a", "b", "c" }, { n = 2, 1, print }, { n = 2, -1, print },
  { n = 3, snapshot, -5, 7 }, { n = 2, checkpoint, -1 }, { n = 2, scope, {} },
  -- userdata that are not what the function expects: foreign, and this module's other kinds
  { n = 1, foreign }, { n = 1, io.stdout }, { n = 1, checkpoint }, { n = 1, scope },
  { n = 1, snapshot }, { n = 2, io.stdout, io.stdout },
}
-- "(number, function)": what a pattern passes, for the report
local function label(p)
  local kinds = {}
  for k = 1, p.n do
    local v = p[k]
    kinds[k] = v == checkpoint and "checkpoint" or v == scope and "scope"
      or v == snapshot and "snapshot" or v == foreign and "foreign userdata"
      or v == light and "light userdata" or (type(v) == "number" and tostring(v)) or type(v)
  end
  return "(" .. table.concat(kinds, ", ") .. ")"
end
for i = first, #patterns do
  local p = patterns[i]
  io.write("call ", i, " ", label(p), ": ")
  io.flush()
  -- (no table for the results: scope_open may have opened a scope with a budget of a few bytes)
  local ok, err = pcall(f, unpack(p, 1, p.n))
  -- opening a scope, with any budget its arguments give, is what scope_open is for: close it
  if ok and core and f == core.scope_open then core.scope_close(err) end
  if ok then
    io.write("ok\n")
  elseif type(err) ~= "string" then
    -- (a C function raises strings; anything else is a result count gone wrong)
    io.write("error that is not a message: ", tostring(err), "\n")
  else
    io.write("error: ", (err:gsub("\n.*", "")), "\n")
  end
  io.flush()
  -- the state is still sound: allocation, the module and the streams work
  local t = {}
  for k = 1, 100 do t[k] = { k } end
  assert(#t == 100 and type(mem.stats().live_bytes) == "number")
  assert(io.stdout:write(""))
end
print("done")
