-- The request handler the benchmarks run (bench/workloads.lua, bench/soak.lua): parses a header
-- block, builds a response table, formats a body. Returns `handler, request`.
local raw = "GET /users?id=42 HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nX-Trace: abc123\r\n\r\n"
local function handler(request)
  local method, path = request:match("^(%u+) (%S+)")
  local headers = {}
  for k, v in request:gmatch("([%w%-]+): ([^\r]+)\r\n") do headers[k:lower()] = v end
  local rows = {}
  for i = 1, 8 do rows[i] = { id = i, name = "user" .. i } end
  local body = {}
  for i = 1, #rows do body[i] = ('{"id":%d,"name":"%s"}'):format(rows[i].id, rows[i].name) end
  return { status = 200, method = method, path = path, host = headers.host,
           body = "[" .. table.concat(body, ",") .. "]" }
end
return handler, raw
