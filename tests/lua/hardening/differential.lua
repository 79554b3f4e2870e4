-- Runs a snippet with or without lunet.mem loaded, for the differential specs of
-- spec/13-hardening_spec.lua (the module's coroutine wrappers must behave as stock ones):
--
--   lua differential.lua bare   snippet.lua
--   lua differential.lua loaded snippet.lua
--
-- The snippet is loaded with the chunk name "=snippet" in both modes, so that error positions
-- compare equal; the spec compares the two outputs.
local mode, path = arg[1], arg[2]
if mode == "loaded" then
  require "lunet.mem"
elseif mode ~= "bare" then
  error("usage: differential.lua bare|loaded snippet.lua")
end
local f = assert(io.open(path, "rb"))
local code = f:read("*a")
f:close()
local chunk = assert((rawget(_G, "loadstring") or load)(code, "=snippet"))
chunk()
print("end of snippet") -- (the spec checks that the bare run got here)
