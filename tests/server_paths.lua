-- wrk script for tests/server.sh (runs in wrk's own LuaJIT): cycles /users, /leak and /big on
-- every connection and counts the responses by what they are. done() prints one line:
--   paths: responses=N users=N leak=N big=N unexpected=N connect=N read=N write=N timeout=N status=N
-- where users/leak are 200 responses with their route's body, big the 500 "over budget" answers,
-- and unexpected anything else (its first instances go to stderr).
-- luacheck: globals wrk setup init request response done counts
local threads = {}
local PATHS = { "/users", "/leak", "/big" }

function setup(thread)
  threads[#threads + 1] = thread
end

local n = 0
counts = { users = 0, leak = 0, big = 0, unexpected = 0 } -- a global: done() reads it with thread:get
local requests = {}
local shown = 0

function init(_)
  for i, path in ipairs(PATHS) do requests[i] = wrk.format("GET", path) end
end

function request()
  n = n + 1
  return requests[(n - 1) % #requests + 1]
end

-- The server names the route it answered in X-Route: that says which request this answers.
function response(status, headers, body)
  local route, kind = headers["X-Route"], "unexpected"
  if route == "/users" and status == 200
    and body:find('^%[{"id":1,"name":"user1%-r%d+","req":"r%d+"}') then
    kind = "users"
  elseif route == "/leak" and status == 200 and body:find("^leaked %d+ %(r%d+%)\n$") then
    kind = "leak"
  elseif route == "/big" and status == 500 and body == "over budget: not enough memory\n" then
    kind = "big"
  end
  if kind == "unexpected" and shown < 3 then
    shown = shown + 1
    io.stderr:write(("unexpected response to %s: %d %q\n"):format(tostring(route), status,
      body:sub(1, 200)))
  end
  counts[kind] = counts[kind] + 1
end

function done(summary, _, _)
  local total = { users = 0, leak = 0, big = 0, unexpected = 0 }
  for _, thread in ipairs(threads) do
    local c = thread:get("counts")
    for k in pairs(total) do total[k] = total[k] + c[k] end
  end
  local e = summary.errors
  io.write(("paths: responses=%d users=%d leak=%d big=%d unexpected=%d "
    .. "connect=%d read=%d write=%d timeout=%d status=%d\n"):format(summary.requests, total.users,
    total.leak, total.big, total.unexpected, e.connect, e.read, e.write, e.timeout, e.status))
end
