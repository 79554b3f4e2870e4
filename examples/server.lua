-- An HTTP/1.1 server on luv where every request's handler runs in a coroutine of its own, inside
-- an arena scope with a memory budget, and waits for a "database" (a luv timer) in the middle,
-- so requests interleave. One route leaks on purpose, one goes over its budget.
--
--   lua5.4 examples/server.lua [port] [mode]      (after scripts/rock.sh lua5.4 and its exports)
--
-- port: 0 (the default) picks a free one; the server prints `listening on <port>` either way.
-- mode: `arena` (the default) runs handlers in mem.scope{arena = true, limit = ...}; `track`
-- loads the module but opens no scope; `bare` does not load it (bench/server.sh compares them).
--
-- Routes: /users (clean), /leak (keeps a table per request), /big (over its budget: 500),
-- /stats (text report), /metrics (mem.metrics.text(), for Prometheus; not in bare mode),
-- /quit (answers, prints the final report on stdout, stops the loop).
-- tests/server.sh drives it with wrk and checks the final report; tests/prometheus.sh has a
-- real Prometheus scrape /metrics and compares what it stored with /stats.
local uv = require "luv"

local PORT = tonumber(arg and arg[1] or "0") or 0
local MODE = arg and arg[2] or "arena"
assert(MODE == "bare" or MODE == "track" or MODE == "arena", "mode: bare, track or arena")

local mem = MODE ~= "bare" and require "lunet.mem" or nil
local SCOPES = MODE == "arena"
local IS_LUA51 = _VERSION == "Lua 5.1" and not rawget(_G, "jit")
-- Lua 5.1 cannot yield inside mem.scope (a C call, lua_pcall, sits between the handler and
-- the coroutine; nor inside pcall): there the database wait happens in the request's coroutine
-- before the scope opens, and the handler runs to completion inside it (in every mode, so that
-- the modes compare).
local WAIT_BEFORE_SCOPE = IS_LUA51
local DB_MS = 1         -- the "database call": a luv timer
local LIMIT = 64 * 1024 -- each request's budget (net bytes), arena mode

local format, concat = string.format, table.concat
io.stdout:setvbuf("line")

local function rss_kib()
  local f = io.open("/proc/self/status")
  if not f then return 0 end
  local kib = tonumber(f:read("*a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return kib or 0
end

-- Handlers ---------------------------------------------------------------------------------------
-- A handler gets the request and returns status, body (a string or a list of pieces).

-- The database wait: yields to the loop, which resumes the coroutine from a timer. Its frame is
-- large on purpose: Lua 5.3's collector shrinks a suspended coroutine's stack to what it uses
-- plus an eighth plus 10 slots, and the request would regrow it after the wait (a realloc
-- counted for it, only when a collection came in between). With this frame in use at the
-- yield, the stack already holds all the handler needs later, and is never shrunk.
local function db_wait()
  local s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16 -- luacheck: ignore
  if not WAIT_BEFORE_SCOPE then coroutine.yield(DB_MS) end
end

-- Clean: builds rows and formats them. Every string it makes contains the request's unique id,
-- so no other request can hold an equal interned string that would spare an allocation here,
-- and each request's counts are the same as when it runs alone. It calls only string.format
-- (no helper of its own, no `..`) and returns the pieces for the server to join: on LuaJIT and
-- Lua 5.1 `..`, and on LuaJIT string.format and table.concat too, go through one buffer of the
-- VM that the collector halves at the end of each cycle, so a long result would regrow it (a
-- realloc counted for this request) only when a collection happened to come before.
-- Each piece is under 64 bytes, a size that buffer keeps.
local function users(req)
  db_wait()
  local rid = req.id
  local rows = {}
  for i = 1, 20 do
    rows[i] = { id = i, name = format("user%d-%s", i, rid) }
  end
  local pieces = {}
  for i = 1, #rows do
    local row = rows[i]
    pieces[i] = format('%s{"id":%d,"name":"%s","req":"%s"}', i == 1 and "[" or ",", row.id,
      row.name, rid)
  end
  pieces[#pieces + 1] = "]\n"
  return 200, pieces
end

-- Leaks on purpose: every request leaves a small table reachable from a module-level table.
-- (A chain rather than a list: the doubling of a growing list is counted for the request that
-- triggers it, and at 4096 entries (64 KiB) it would take that request over its budget, and
-- every later one trying again.)
local sessions = { count = 0, last = nil }
local function leak(req)
  db_wait()
  sessions.last = { id = req.id, previous = sessions.last }
  sessions.count = sessions.count + 1
  return 200, format("leaked %d (%s)\n", sessions.count, req.id)
end

-- Builds far more than a request's budget: in arena mode the allocation that goes over it
-- fails with "not enough memory", which becomes a 500. (Without a budget it stops at 1e5 rows.)
local function big(req)
  db_wait()
  local rows = {}
  for i = 1, 1e5 do rows[i] = format("%s row %d of a result too big to keep", req.id, i) end
  return 200, format("built %d rows\n", #rows)
end

-- Debian's LuaJIT (2.1.0-beta3, a 2022-03 snapshot) crashes after an out-of-memory error raised
-- inside compiled code (fixed upstream in 2022-11 and 2023: LuaJIT commits ca8d3257, 2d8300c1,
-- d5bbf9cd, issues #906, #1034): the second /big whose budget runs out in its compiled loop
-- segfaults. Its loop runs interpreted there, so that the error is raised by the interpreter.
local jit = rawget(_G, "jit")
if jit and SCOPES then jit.off(big, true) end

local KEPT_STRINGS = {} -- see keep_strings() below
local routes, route_list = {}, {}
local counts = {}        -- requests by route name
local closed = {}        -- scopes closed by route name, and their bytes_allocated summed (on_exit)
local allocated = {}
local users_figures = {  -- allocs and allocated_bytes of each /users request, arena mode
  phase = "warmup",      -- "warmup", "reference", then "serving"
  ref_allocs = -1, ref_bytes = -1,
  min_allocs = math.huge, max_allocs = -1, min_bytes = math.huge, max_bytes = -1,
  traced = 0,            -- requests during which LuaJIT recorded a trace (not compared)
}

-- on_exit of every scope. It allocates nothing (every key exists already): it runs right after
-- the scope closes.
local function record(stats)
  local name = stats.name
  closed[name] = closed[name] + 1
  allocated[name] = allocated[name] + stats.bytes_allocated
  if name ~= "GET /users" then return end
  local f, allocs, bytes = users_figures, stats.allocs, stats.allocated_bytes
  if f.phase == "reference" then
    f.ref_allocs, f.ref_bytes = allocs, bytes
  elseif f.phase == "serving" then
    -- What LuaJIT's recorder allocates while a trace is recorded counts for the active scope
    -- (the scope's stats say how many traces started): such a request is not compared.
    if stats.jit_traces > 0 then
      f.traced = f.traced + 1
      return
    end
    if allocs < f.min_allocs then f.min_allocs = allocs end
    if allocs > f.max_allocs then f.max_allocs = allocs end
    if bytes < f.min_bytes then f.min_bytes = bytes end
    if bytes > f.max_bytes then f.max_bytes = bytes end
  end
end

local function stats_text()
  collectgarbage("collect")
  collectgarbage("collect")
  local out = {}
  out[#out + 1] = format("mode %s\nlua %s\n", MODE, mem and mem.lua or _VERSION)
  if mem then
    local s = mem.stats()
    for _, k in ipairs { "live_bytes", "peak_bytes", "allocs", "frees", "reallocs", "net_blocks",
      "arenas", "arenas_reclaimed", "arena_bytes", "arena_live_bytes", "arena_pool_bytes",
      "gc_cycles" } do
      out[#out + 1] = format("stat %s %d\n", k, s[k])
    end
    local pinned, names = {}, {}
    for _, a in ipairs(mem.arenas()) do
      if a.pinned then
        local p = pinned[a.name]
        if not p then
          p = { arenas = 0, live_blocks = 0, live_bytes = 0 }
          pinned[a.name] = p
          names[#names + 1] = a.name
        end
        p.arenas, p.live_blocks = p.arenas + 1, p.live_blocks + a.live_blocks
        p.live_bytes = p.live_bytes + a.live_bytes
      end
    end
    table.sort(names)
    for _, name in ipairs(names) do
      local p = pinned[name]
      out[#out + 1] = format("pinned %s arenas=%d live_blocks=%d live_bytes=%d\n", name, p.arenas,
        p.live_blocks, p.live_bytes)
    end
  end
  for _, r in ipairs(route_list) do
    out[#out + 1] = format("requests %s %d\n", r.name, counts[r.name])
  end
  if SCOPES then
    for _, r in ipairs(route_list) do
      out[#out + 1] = format("closed %s scopes=%d allocated_bytes=%d\n", r.name, closed[r.name],
        allocated[r.name])
    end
  end
  if SCOPES then
    local f = users_figures
    out[#out + 1] = format("users reference allocs=%d allocated_bytes=%d\n", f.ref_allocs, f.ref_bytes)
    if f.max_allocs >= 0 then
      out[#out + 1] = format("users min allocs=%d allocated_bytes=%d\n", f.min_allocs, f.min_bytes)
      out[#out + 1] = format("users max allocs=%d allocated_bytes=%d\n", f.max_allocs, f.max_bytes)
      out[#out + 1] = format("users traced %d\n", f.traced)
    end
  end
  out[#out + 1] = format("kept_strings %d\nrss_kib %d\n", #KEPT_STRINGS, rss_kib())
  return concat(out)
end

local function stats(_) return 200, stats_text() end
local function quit(_) return 200, "bye\n" end
local function metrics(_) return 200, mem.metrics.text() end

-- Routes: the arena ones get a scope with an arena and a budget; /stats and /quit a plain scope
-- (their full collections and reports are not what is measured).
local function route(path, handler, arena)
  local name = "GET " .. path
  local r = { name = name, handler = handler }
  if SCOPES then
    r.opts = arena and { name = name, arena = true, limit = LIMIT, on_exit = record }
      or { name = name, on_exit = record }
  end
  routes[name] = r
  route_list[#route_list + 1] = r
  counts[name] = 0
  closed[name], allocated[name] = 0, 0
end
route("/users", users, true)
route("/leak", leak, true)
route("/big", big, true)
route("/stats", stats, false)
route("/quit", quit, false)
if mem then route("/metrics", metrics, false) end

-- Requests ---------------------------------------------------------------------------------------

-- The body of a request's coroutine: returns pcall's results (ok, status, body or false, err).
local function run_request(r, req)
  if WAIT_BEFORE_SCOPE then coroutine.yield(DB_MS) end
  if r.opts then return pcall(mem.scope, r.opts, r.handler, req) end
  return pcall(r.handler, req)
end

local next_id = 0
local function new_id()
  next_id = next_id + 1
  return format("r%08d", next_id)
end

-- The collector runs between requests, not inside them. A collection step does the VM's own
-- upkeep besides freeing: at the end of a cycle it halves the string table when it is under a
-- quarter full and, on Lua 5.1 and LuaJIT, the buffer `..` (and on LuaJIT every string
-- function) builds strings in; on 5.3 and 5.4 it shrinks coroutine stacks. Run from an
-- allocation inside a request, that realloc would count for the request (and could take it over
-- its budget), so no two runs of a handler would count the same. So the automatic collector is
-- stopped, and a full collection runs after a request ends whenever the heap has grown by
-- GC_STEP_KIB since the last one (in every mode, so that the modes compare).
local GC_STEP_KIB = 512
local gc_next = 0
local function collect_between_requests()
  if collectgarbage("count") < gc_next then return end
  collectgarbage("collect")
  collectgarbage("stop") -- (on 5.1 and LuaJIT a collection restarts the automatic collector)
  gc_next = collectgarbage("count") + GC_STEP_KIB
end

-- Closes a connection's timer. A request whose client went away while it waited for its timer
-- finishes all the same (respond drops its answer): its scope closes as every other, and its
-- on_exit runs (tests/prometheus.sh counts them).
local function close_timer(conn)
  conn.timer:stop()
  if not conn.timer:is_closing() then conn.timer:close() end
end

-- Resumes the request of `conn` (conn.co); when it waits, starts conn.timer; when it is done,
-- calls conn.finish(conn, req, status, body).
local function step(conn, ...)
  local co = conn.co
  local resumed, ok, status, body = coroutine.resume(co, ...)
  if resumed and coroutine.status(co) == "suspended" then
    conn.timer:start(ok, 0, conn.on_timer) -- `ok` is the wait in ms the handler yielded
    return
  end
  conn.co = nil
  if conn.closed then close_timer(conn) end
  collect_between_requests()
  local req = conn.req
  if not resumed then -- a bug of the server's own
    io.stderr:write("request coroutine failed: ", tostring(ok), "\n")
    return conn.finish(conn, req, 500, "internal error\n")
  end
  if not ok then return conn.finish(conn, req, 500, format("over budget: %s\n", tostring(status))) end
  if type(body) == "table" then body = concat(body) end
  return conn.finish(conn, req, status, body)
end

local function dispatch(conn, req)
  local r = routes[req.method .. " " .. req.path]
  if not r then return conn.finish(conn, req, 404, "not found\n") end
  counts[r.name] = counts[r.name] + 1
  conn.req = req
  conn.co = coroutine.create(run_request)
  return step(conn, r, req)
end

-- A connection-like object whose timer and callbacks are made once.
local function new_conn(finish)
  local conn = { finish = finish, timer = uv.new_timer() }
  conn.on_timer = function() step(conn) end
  return conn
end

-- Connections ------------------------------------------------------------------------------------

local server = uv.new_tcp()
local conns = {}
local stopping = false

local function close_conn(conn)
  if conn.closed then return end
  conn.closed = true
  conns[conn] = nil
  if not conn.co or stopping then close_timer(conn) end
  if not conn.client:is_closing() then conn.client:close() end
end

local METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
local REASONS = { [200] = "OK", [400] = "Bad Request", [404] = "Not Found",
  [500] = "Internal Server Error" }

local serve_next, shutdown

-- Parses one request from conn.buf: a table, false for a malformed one, nil when incomplete.
local function parse(conn)
  local buf = conn.buf
  local head_end = buf:find("\r\n\r\n", 1, true)
  if not head_end then return #buf > 65536 and false or nil end
  local head = buf:sub(1, head_end + 1):lower()
  local method, target, minor = buf:match("^(%u+) (%S+) HTTP/1%.(%d)\r\n")
  if not method then return false end
  local length = tonumber(head:match("\r\ncontent%-length:%s*(%d+)") or "0")
  if #buf < head_end + 3 + length then return nil end
  conn.buf = buf:sub(head_end + 4 + length)
  local connection = head:match("\r\nconnection:%s*([%w%-]+)")
  local close = connection == "close" or (minor == "0" and connection ~= "keep-alive")
  return { method = method, path = target:match("^[^?]*"), close = close, id = new_id() }
end

local function respond(conn, req, status, body)
  if conn.closed then return end -- the client went away while the request ran
  local close = req.close or stopping
  local head = format("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
    .. "X-Route: %s\r\n%s\r\n", status, REASONS[status] or "Unknown",
    req.path == "/metrics" and METRICS_TYPE or "text/plain", #body, req.path,
    close and "Connection: close\r\n" or "")
  local quitting = req.path == "/quit" and status == 200
  conn.client:write({ head, body }, function()
    if quitting then shutdown() end
  end)
  conn.busy = false
  if close then
    if not quitting then conn.client:shutdown(function() close_conn(conn) end) end
  else
    serve_next(conn)
  end
end

function serve_next(conn)
  if conn.busy or conn.closed then return end
  local req = parse(conn)
  if req == nil then return end
  if req == false then
    conn.busy = true
    return respond(conn, { close = true, path = "" }, 400, "bad request\n")
  end
  conn.busy = true
  return dispatch(conn, req)
end

local function on_connection(err)
  assert(not err, err)
  local client = uv.new_tcp()
  server:accept(client)
  local conn = new_conn(respond)
  conn.client, conn.buf, conn.busy = client, "", false
  conns[conn] = true
  client:read_start(function(rerr, chunk)
    if rerr or not chunk then return close_conn(conn) end
    conn.buf = conn.buf .. chunk
    serve_next(conn)
  end)
end

function shutdown()
  stopping = true
  io.stdout:write("final report\n", stats_text(), "end of report\n")
  io.stdout:flush()
  for conn in pairs(conns) do close_conn(conn) end
  if not server:is_closing() then server:close() end
  uv.stop()
end

-- The reference: /users run alone through the same path (a fresh coroutine, the timer wait, an
-- id of the same length), after a few warm-up requests (LuaJIT compiles its traces there).
local function run_alone(n)
  for _ = 1, n do
    local done = false
    local conn = new_conn(function() done = true end)
    dispatch(conn, { method = "GET", path = "/users", id = new_id() })
    while not done do uv.run("once") end
    conn.timer:close()
    uv.run("nowait")
  end
end
-- The string table is one hash array shared by every request; it doubles when it holds as many
-- strings as it has slots (dead ones count until swept) and halves at the end of a collection
-- when under a quarter full. Either happens inside whichever request crosses the line, which
-- then counts the new array (64 KiB at 8192 slots). A server's working set of strings keeps it
-- at a stable size; here 40000 kept strings stand for it (the table grows to 65536 slots; the
-- garbage strings made between two collections, see GC_STEP_KIB, never fill the rest, and it
-- never drops to a quarter full).
local function keep_strings(n)
  for i = 1, n do KEPT_STRINGS[i] = format("kept string %d", i) end
end

keep_strings(40000)
collect_between_requests()
if SCOPES then
  run_alone(200)
  users_figures.phase = "reference"
  run_alone(1)
  users_figures.phase = "serving"
  counts["GET /users"] = 0
  closed["GET /users"], allocated["GET /users"] = 0, 0
end
-- Per-route aggregates in Prometheus's text format at /metrics, from here on (the warm-up
-- above is not served).
if mem then mem.metrics.enable() end

assert(server:bind("127.0.0.1", PORT))
assert(server:listen(128, on_connection))
io.stdout:write(format("listening on %d\n", server:getsockname().port))
io.stdout:flush()
uv.run()
