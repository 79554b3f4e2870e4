-- The README's example: lua5.4 examples/quick.lua
local mem = require "lunet.mem"

local seen = {}
local function handler(req) seen[#seen + 1] = { req.id } return "ok" end  -- leaks

print(mem.stats().live_bytes)                        -- == collectgarbage("count") * 1024
local body = mem.scope("GET /users", handler, { id = 1 })
print(body, mem.is_neutral(function() handler({ id = 2 }) end, { name = "GET /users" }))
