-- Allocates on known lines in two scopes with mem.trace on, then writes a pprof heap profile:
--   lua tests/lua/pprof_scopes.lua out.pb.gz
-- (run by tests/pprof.sh, which reads the profile with `go tool pprof`). Prints the lines that
-- allocate (`users_line=N`, `orders_line=N`) and the snapshot's live bytes (`live_bytes=N`).
local mem = require "lunet.mem"
local path = assert(arg[1], "usage: lua tests/lua/pprof_scopes.lua out.pb.gz")

-- Kept past the script's end too: `lunet-mem run` takes its snapshot at exit.
local kept = {}
rawset(_G, "pprof_scopes_kept", kept)
local lines = {}

-- Strings made by a call and a concatenation get their line on every interpreter (a table
-- constructor gets the last call's line on 5.1 and 5.4); each is new (5.1 and LuaJIT intern
-- strings: one made twice is allocated once).
local function users()
  lines.users = debug.getinfo(1, "l").currentline + 2
  for i = 1, 2000 do
    kept[#kept + 1] = string.rep("u", 200) .. i
  end
end

local function orders()
  lines.orders = debug.getinfo(1, "l").currentline + 2
  for i = 1, 500 do
    kept[#kept + 1] = string.rep("o", 1000) .. i
  end
end

-- (under `lunet-mem run` the runner traces already: it writes its own profile at exit)
local own_trace = mem.trace.start()
mem.scope("GET /users", users)
mem.scope("GET /orders", orders)
-- Live means reachable: what is garbage now is not in the snapshot.
collectgarbage("collect")
collectgarbage("collect")
local snap = assert(mem.trace.snapshot())
if own_trace then mem.trace.stop() end
assert(snap:pprof(path))
local live = 0
for _, site in ipairs(snap:top()) do live = live + site.bytes end
print(("users_line=%d"):format(lines.users))
print(("orders_line=%d"):format(lines.orders))
print(("live_bytes=%d"):format(live))
