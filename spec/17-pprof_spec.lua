local helpers = require "spec.helpers"
local mem = helpers.mem
local trace = mem.trace

local function settle()
  collectgarbage("collect")
  collectgarbage("collect")
end

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

-- The profile.proto fields the checks read, from the uncompressed bytes (gzip -dc): a varint
-- and length-delimited reader is all protobuf needs here.
local function varint(buf, pos)
  local n, scale = 0, 1
  repeat
    local b = buf:byte(pos)
    pos = pos + 1
    n = n + (b % 128) * scale
    scale = scale * 128
  until b < 128
  return n, pos
end

-- Calls `on_field(number, value)` for each field of the message in buf[first..last]; a
-- length-delimited value comes as a string, a varint as a number.
local function fields(buf, on_field, first, last)
  local pos = first or 1
  last = last or #buf
  while pos <= last do
    local key
    key, pos = varint(buf, pos)
    local number, wire = math.floor(key / 8), key % 8
    if wire == 0 then
      local v
      v, pos = varint(buf, pos)
      on_field(number, v)
    elseif wire == 2 then
      local len
      len, pos = varint(buf, pos)
      on_field(number, buf:sub(pos, pos + len - 1))
      pos = pos + len
    else
      error("unexpected wire type " .. wire)
    end
  end
end

-- The string table and, per sample, its values and its `scope` label.
local function decode(path)
  local p = assert(io.popen("gzip -dc '" .. path .. "'", "r"))
  local buf = p:read("*a")
  p:close()
  local strings, samples = {}, {}
  fields(buf, function(number, v)
    if number == 6 then strings[#strings + 1] = v end
    if number == 2 then
      local sample = { value = {}, labels = {} }
      fields(v, function(n, sv)
        if n == 2 and type(sv) == "string" then -- packed values
          local pos = 1
          while pos <= #sv do
            local x
            x, pos = varint(sv, pos)
            sample.value[#sample.value + 1] = x
          end
        elseif n == 2 then
          sample.value[#sample.value + 1] = sv
        elseif n == 3 then
          local label = {}
          fields(sv, function(ln, lv) label[ln] = lv end)
          sample.labels[#sample.labels + 1] = label
        end
      end)
      samples[#samples + 1] = sample
    end
  end)
  for _, s in ipairs(samples) do
    for _, l in ipairs(s.labels) do
      -- (string indices are 0-based; strings[1] is "")
      s[strings[(l[1] or 0) + 1]] = strings[(l[2] or 0) + 1]
    end
  end
  return strings, samples, buf
end

local kept = {}
local function make(n, size)
  for i = 1, n do kept[#kept + 1] = ("p"):rep(size) .. i end
end

describe("snap:pprof()", function()
  after_each(function()
    trace.stop()
    kept = {}
  end)

  it("writes a gzip file (magic 1f 8b, deflate)", function()
    settle()
    trace.start()
    make(50, 100)
    local path = os.tmpname()
    assert.is_true(trace.snapshot():pprof(path))
    local data = read_file(path)
    os.remove(path)
    assert.are.equal("\31\139\8", data:sub(1, 3))
  end)

  it("holds the four heap sample types, the inuse_space default and a scope label", function()
    settle()
    trace.start()
    mem.scope("GET /pprof", make, 100, 200)
    settle()
    local snap = trace.snapshot()
    local path = os.tmpname()
    assert.is_true(snap:pprof(path))
    local strings, samples, raw = decode(path)
    os.remove(path)
    assert.are.equal("", strings[1])
    local have = {}
    for _, s in ipairs(strings) do have[s] = true end
    for _, name in ipairs { "alloc_objects", "alloc_space", "inuse_objects", "inuse_space",
      "count", "bytes", "scope", "GET /pprof", "space" } do
      assert.is_true(have[name], name)
    end
    -- Sizes: the inuse_space values sum to the snapshot's live bytes (an exact trace), the
    -- scope's samples hold its 100 strings of 200+ bytes, and alloc_* = inuse_*.
    local live = 0
    for _, s in ipairs(snap:top()) do live = live + s.bytes end
    local total, in_scope, objects = 0, 0, 0
    for _, s in ipairs(samples) do
      assert.are.equal(4, #s.value)
      assert.are.equal(s.value[1], s.value[3])
      assert.are.equal(s.value[2], s.value[4])
      total = total + s.value[4]
      if s.scope == "GET /pprof" then
        in_scope = in_scope + s.value[4]
        objects = objects + s.value[3]
      end
    end
    assert.are.equal(live, total)
    assert.is_true(objects >= 100, tostring(objects))
    assert.is_true(in_scope >= 100 * 200 and in_scope <= live, tostring(in_scope))
    assert.is_true(#raw > 0)
  end)

  it("sets the period of a sampled trace", function()
    settle()
    trace.start({ sample_bytes = 4096 })
    make(500, 300)
    local path = os.tmpname()
    assert.is_true(trace.snapshot():pprof(path))
    local period, period_type
    local p = assert(io.popen("gzip -dc '" .. path .. "'", "r"))
    local buf = p:read("*a")
    p:close()
    os.remove(path)
    local strings = {}
    fields(buf, function(number, v)
      if number == 6 then strings[#strings + 1] = v end
      if number == 12 then period = v end
      if number == 11 then
        period_type = {}
        fields(v, function(n, x) period_type[n] = x end)
      end
    end)
    assert.are.equal(4096, period)
    assert.are.equal("space", strings[period_type[1] + 1])
    assert.are.equal("bytes", strings[period_type[2] + 1])
  end)

  it("still writes after trace.stop() (a snapshot is a copy)", function()
    trace.start()
    make(10, 50)
    local snap = trace.snapshot()
    trace.stop()
    local path = os.tmpname()
    assert.is_true(snap:pprof(path))
    os.remove(path)
  end)

  it("returns nil and a message for a path it cannot write", function()
    trace.start()
    local ok, msg = trace.snapshot():pprof("/nonexistent/dir/heap.pb.gz")
    assert.is_nil(ok)
    assert.matches("/nonexistent/dir/heap.pb.gz: ", msg, 1, true)
  end)

  it("raises on bad arguments", function()
    trace.start()
    local snap = trace.snapshot()
    helpers.raises("bad argument #2 to 'pprof' (string expected, got nil)", function() snap:pprof() end)
    helpers.raises("bad argument #2 to 'pprof' (string expected, got number)",
      function() snap:pprof(1) end)
    helpers.raises("bad argument #1 to 'pprof' (snapshot expected, got table)",
      function() snap.pprof({}, "x") end)
  end)
end)
