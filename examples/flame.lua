-- A small app whose live memory the flame graph explains: a cache filled by one route, and
-- sessions that are never dropped. Run it with tracing on:
--   lunet-mem run --flamegraph docs/flamegraph.svg examples/flame.lua
-- (the app's state is global, as a module's state is held by package.loaded: what is live when
-- the script ends is what the picture shows)
local cache, sessions = {}, {}
rawset(_G, "app", { cache = cache, sessions = sessions })

local function parse(request)
  local method, path = request:match("^(%u+) (%S+)")
  return { method = method, path = path, raw = request }
end

local function remember(key, value)
  cache[key] = value
end

local function new_session(id)
  sessions[#sessions + 1] = { id = id, data = ("s"):rep(200) }
end

local function handle(request, id)
  local req = parse(request)
  if req.path:find("^/users") then remember(req.path, req) end
  if id % 3 == 0 then new_session(id) end
  return ("%s %s ok"):format(req.method, req.path)
end

for i = 1, 3000 do
  handle(("GET /users/%d HTTP/1.1"):format(i % 700), i)
  handle(("GET /health/%d HTTP/1.1"):format(i), i)
end
local n = 0
for _ in pairs(cache) do n = n + 1 end
print(("%d cached, %d sessions"):format(n, #sessions))
