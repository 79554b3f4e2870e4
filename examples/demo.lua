-- A request loop in the shape of a Lunet (or OpenResty, luvit) server: each request runs in
-- its own coroutine, inside a scope named after its route, and yields while it "waits for the
-- database", so requests interleave. One route leaks on purpose.
--
--   lua5.4 examples/demo.lua      (after scripts/rock.sh lua5.4, or `luarocks make`)
local mem = require "lunet.mem"

-- Lua 5.1 cannot yield across the pcall inside mem.scope: there, requests run to completion.
local can_yield = mem.lua ~= "lua51"
local function wait_for_db()
  if can_yield then coroutine.yield() end
end

local templates = {} -- a cache filled once: not a leak
local function render(name, rows)
  local template = templates[name]
  if not template then
    template = { head = "<h1>" .. name .. "</h1>", row = "<li>%d: %s</li>" }
    templates[name] = template
  end
  local out = { template.head }
  for i = 1, #rows do out[#out + 1] = template.row:format(rows[i].id, rows[i].name) end
  return table.concat(out, "\n")
end

local sessions = {} -- the planted leak: GET /leaky remembers every request
local routes = {
  ["GET /users"] = function(req)
    local rows = {}
    for i = 1, 20 do rows[i] = { id = i, name = "user" .. i } end
    wait_for_db()
    return 200, render("users", rows) .. req.path
  end,
  ["GET /leaky"] = function(req)
    sessions[#sessions + 1] = { id = req.id, headers = req.headers }
    wait_for_db()
    return 200, "remembered " .. #sessions
  end,
}

local totals = {}
local function record(stats)
  local t = totals[stats.name] or { requests = 0, allocated = 0, net = 0, peak = 0 }
  t.requests = t.requests + 1
  t.allocated = t.allocated + stats.allocated_bytes
  t.net = t.net + stats.net_bytes
  t.peak = math.max(t.peak, stats.peak_bytes)
  totals[stats.name] = t
end

-- One request: a coroutine running the handler in a scope.
local function request(route, id)
  local req = { id = id, path = route:match(" (.*)"), headers = { host = "localhost" } }
  return coroutine.create(function()
    return mem.scope({ name = route, on_exit = record }, routes[route], req)
  end)
end

-- The event loop: resumes every pending request until all are done.
local function serve(n)
  local pending = {}
  for i = 1, n do pending[i] = request(i % 4 == 0 and "GET /leaky" or "GET /users", i) end
  while #pending > 0 do
    local still = {}
    for _, co in ipairs(pending) do
      local ok, err = coroutine.resume(co)
      assert(ok, err)
      if coroutine.status(co) ~= "dead" then still[#still + 1] = co end
    end
    pending = still
  end
end

serve(400)

print(("%-12s %8s %16s %14s %12s"):format("route", "requests", "allocated/req", "net/req", "peak"))
for _, route in ipairs { "GET /users", "GET /leaky" } do
  local t = totals[route]
  print(("%-12s %8d %14.0f B %12.0f B %10d B"):format(route, t.requests,
    t.allocated / t.requests, t.net / t.requests, t.peak))
end

local counted = collectgarbage("count") * 1024
local s = mem.stats()
print(("\nstate: live %d B (%s collectgarbage('count') * 1024), peak %d B, %d allocs, %d frees")
  :format(s.live_bytes, s.live_bytes == counted and "==" or "~=", s.peak_bytes, s.allocs, s.frees))

-- Leak checks: run one request of each route repeatedly and compare.
local function one(route)
  return function()
    local co = request(route, 0)
    while coroutine.status(co) ~= "dead" do assert(coroutine.resume(co)) end
  end
end
for _, route in ipairs { "GET /users", "GET /leaky" } do
  local ok, report = mem.is_neutral(one(route), { name = route })
  print(ok and ("%s: neutral"):format(route) or report)
end
