local helpers = require "spec.helpers"
local mem = helpers.mem

describe("mem.stats()", function()
  it("returns a fresh table with the counters", function()
    local a, b = mem.stats(), mem.stats()
    assert.are_not.equal(a, b)
    for _, k in ipairs { "live_bytes", "peak_bytes", "allocs", "frees", "reallocs",
      "bytes_allocated", "bytes_freed", "baseline_bytes", "net_blocks" } do
      assert.is_number(a[k], k)
      assert.are.equal(math.floor(a[k]), a[k], k)
    end
  end)

  it("keeps live_bytes == baseline + bytes_allocated - bytes_freed", function()
    local s = mem.stats()
    assert.are.equal(s.baseline_bytes + s.bytes_allocated - s.bytes_freed, s.live_bytes)
  end)

  it("equals collectgarbage('count') * 1024 at every point", function()
    local keep, misses = {}, 0
    for i = 1, 5000 do
      local t = { i, tostring(i) .. "x", function() return i end, coroutine.create(function() end) }
      keep[i % 97] = t
      if i % 7 == 0 then keep[i % 13] = string.rep("y", i % 300) end
      if i % 500 == 0 then collectgarbage("step") end
      if not helpers.exact() then misses = misses + 1 end
    end
    collectgarbage("collect")
    assert.is_true(helpers.exact())
    assert.are.equal(0, misses)
  end)

  it("stays exact while compiled code allocates (JIT on)", function()
    local function churn(n)
      local last
      for i = 1, n do last = { i, { i } } end
      return last
    end
    for _ = 1, 50 do
      churn(200)
      assert.is_true(helpers.exact())
    end
  end)

  it("stays exact across coroutines, string building and collections", function()
    local co = coroutine.wrap(function()
      local parts = {}
      for i = 1, 200 do
        parts[#parts + 1] = ("%d:%s"):format(i, ("z"):rep(i))
        coroutine.yield(#parts)
      end
    end)
    for i = 1, 200 do
      co()
      if i % 50 == 0 then collectgarbage("collect") end
      assert.is_true(helpers.exact())
    end
  end)

  it("keeps peak_bytes >= live_bytes", function()
    for i = 1, 100 do
      local s = mem.stats()
      assert.is_true(s.peak_bytes >= s.live_bytes)
      local _ = { string.rep("p", i * 10) }
    end
  end)

  it("counts allocations, frees and reallocations", function()
    local s0 = mem.stats()
    local t = {}
    for i = 1, 100 do t[i] = { i } end
    t = nil
    -- (a coroutine's stack grows by reallocation in every Lua; 5.5 grows tables by new blocks)
    local function deep(n) if n > 0 then return 1 + deep(n - 1) end return 0 end
    coroutine.wrap(deep)(500)
    collectgarbage("collect")
    local s1 = mem.stats()
    assert.is_nil(t)
    assert.is_true(s1.allocs - s0.allocs >= 100)
    assert.is_true(s1.frees - s0.frees >= 100)
    assert.is_true(s1.reallocs > s0.reallocs)
    assert.is_true(s1.bytes_allocated > s0.bytes_allocated)
  end)

  if helpers.version ~= "luajit" and helpers.version ~= "lua51" then
    it("counts new objects by type (Lua 5.2+)", function()
      local before = mem.stats().allocs_by_type.table
      local keep = {}
      for i = 1, 10 do keep[i] = {} end
      local after = mem.stats().allocs_by_type.table
      -- the 10 tables, `keep`, and the three tables of the first stats() call
      assert.are.equal(14, after - before)
      assert.is_true(mem.stats().bytes_by_type.string > 0)
    end)
  else
    pending("per-type counts need the type tag that Lua 5.2+ passes to the allocator")
  end

  -- Long strings lauxlib builds in a buffer: on 5.5 the buffer becomes the string's body (an
  -- external string, of which Lua counts the header only); elsewhere Lua copies it.
  it("keeps live_bytes Lua's count with long strings built by lauxlib alive", function()
    collectgarbage("collect")
    local s0 = mem.stats()
    local parts = {}
    for i = 1, 2000 do parts[i] = ("%05d"):format(i) end
    local joined = table.concat(parts, ",")   -- a buffer grown, then fitted: handed over on 5.5
    local repeated = string.rep("x", 300000)  -- a buffer of the exact size
    local ok, live, counted = helpers.exact()
    assert.is_true(ok, ("live_bytes %d, Lua's count %d"):format(live, counted))
    local s1 = mem.stats()
    if helpers.version == "lua55" then
      assert.are.equal(1, s1.external_blocks - s0.external_blocks)
      assert.are.equal(#joined + 1, s1.external_bytes - s0.external_bytes)
    else
      assert.are.same({ 0, 0 }, { s1.external_bytes, s1.external_blocks })
    end
    joined, repeated = nil, nil
    collectgarbage("collect")
    assert.is_nil(joined or repeated)
    ok, live, counted = helpers.exact()
    assert.is_true(ok, ("after: live_bytes %d, Lua's count %d"):format(live, counted))
    local s2 = mem.stats()
    assert.are.same({ s0.external_bytes, s0.external_blocks, s0.buffer_bytes },
      { s2.external_bytes, s2.external_blocks, s2.buffer_bytes })
  end)
end)

describe("mem.reset_peak()", function()
  it("sets peak_bytes to live_bytes", function()
    local big = { string.rep("b", 100000) }
    big = nil
    collectgarbage("collect")
    assert.is_nil(big)
    assert.is_true(mem.stats().peak_bytes > mem.stats().live_bytes)
    mem.reset_peak()
    local s = mem.stats()
    assert.are.equal(s.live_bytes, s.peak_bytes)
  end)
end)
