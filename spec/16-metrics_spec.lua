local helpers = require "spec.helpers"
local mem = helpers.mem
local metrics = mem.metrics

-- The value of the sample `name{labels}` (labels as written in the text, or nil for none).
local function sample(text, name, labels)
  local head = labels and (name .. "{" .. labels .. "} ") or (name .. " ")
  for line in text:gmatch("[^\n]+") do
    if line:sub(1, #head) == head then return tonumber(line:sub(#head + 1)) end
  end
  return nil
end

-- Runs `n` scopes named `name` around `fn`, returning the stats on_exit saw for each.
local function run_scopes(name, n, fn, opts)
  local seen = {}
  for _ = 1, n do
    local o = { name = name, on_exit = function(s) seen[#seen + 1] = s end }
    for k, v in pairs(opts or {}) do o[k] = v end
    pcall(mem.scope, o, fn)
  end
  return seen
end

local function sum(list, field)
  local total = 0
  for _, s in ipairs(list) do total = total + s[field] end
  return total
end

local function make_tables()
  local t = {}
  for i = 1, 50 do t[i] = { i } end
  return t
end

describe("mem.metrics", function()
  after_each(function() metrics.disable() end)

  describe("text()", function()
    it("has the state's totals with HELP and TYPE lines, and no scope families while off", function()
      local text = metrics.text()
      for name, kind in pairs {
        lunet_mem_live_bytes = "gauge", lunet_mem_peak_bytes = "gauge",
        lunet_mem_allocs_total = "counter", lunet_mem_frees_total = "counter",
        lunet_mem_allocated_bytes_total = "counter", lunet_mem_arena_bytes = "gauge",
        lunet_mem_arenas_pinned = "gauge",
      } do
        assert.truthy(text:find("# HELP " .. name .. " ", 1, true), name)
        assert.truthy(text:find("# TYPE " .. name .. " " .. kind .. "\n", 1, true), name)
        assert.is_number(sample(text, name), name)
      end
      assert.is_nil(text:find("lunet_mem_scope_", 1, true))
    end)

    it("is made of HELP, TYPE and sample lines only, each family announced once", function()
      metrics.enable()
      run_scopes("GET /x", 3, make_tables)
      local text = metrics.text()
      local typed = {}
      for line in text:gmatch("[^\n]*\n") do
        local family = line:match("^# TYPE (%S+) %a+\n$")
        if family then
          assert.is_nil(typed[family], family)
          typed[family] = true
        else
          assert.truthy(line:match("^# HELP %S+ .+\n$") or
            line:match('^[%a_]+ %-?%d+\n$') or line:match('^[%a_]+{.*} %-?%d+\n$'), line)
        end
      end
      for _, family in ipairs { "lunet_mem_scope_requests_total", "lunet_mem_scope_allocated_bytes",
        "lunet_mem_scope_retained_bytes", "lunet_mem_scope_peak_bytes",
        "lunet_mem_scope_budget_refusals_total", "lunet_mem_scope_pinned_arenas" } do
        assert.truthy(typed[family], family)
      end
      assert.truthy(text:find("# TYPE lunet_mem_scope_peak_bytes histogram\n", 1, true))
    end)
  end)

  describe("aggregates", function()
    it("equal the scopes' own stats (on_exit), per scope name", function()
      metrics.enable()
      local seen = run_scopes("GET /users", 20, make_tables)
      local text = metrics.text()
      local l = 'scope="GET /users"'
      assert.equal(20, sample(text, "lunet_mem_scope_requests_total", l))
      assert.equal(sum(seen, "bytes_allocated"), sample(text, "lunet_mem_scope_allocated_bytes_sum", l))
      assert.equal(sum(seen, "net_bytes"), sample(text, "lunet_mem_scope_retained_bytes_sum", l))
      assert.equal(sum(seen, "peak_bytes"), sample(text, "lunet_mem_scope_peak_bytes_sum", l))
      assert.equal(20, sample(text, "lunet_mem_scope_allocated_bytes_count", l))
      assert.equal(0, sample(text, "lunet_mem_scope_budget_refusals_total", l))
    end)

    it("has cumulative buckets, powers of 4 from 1 KiB by default, +Inf equal to the count", function()
      metrics.enable()
      local seen = run_scopes("GET /b", 5, make_tables)
      run_scopes("GET /b", 5, function() return {} end)
      local text = metrics.text()
      local previous, bound = -1, 1024
      for _ = 1, 11 do
        local v = sample(text, "lunet_mem_scope_allocated_bytes_bucket",
          ('scope="GET /b",le="%d"'):format(bound))
        assert.is_number(v, bound)
        assert.is_true(v >= previous)
        previous, bound = v, bound * 4
      end
      assert.equal(10, sample(text, "lunet_mem_scope_allocated_bytes_bucket", 'scope="GET /b",le="+Inf"'))
      assert.equal(10, sample(text, "lunet_mem_scope_allocated_bytes_count", 'scope="GET /b"'))
      -- a bucket counts the scopes at or under its bound
      local under = 0
      for _, s in ipairs(seen) do if s.bytes_allocated <= 4096 then under = under + 1 end end
      local le_4096 = sample(text, "lunet_mem_scope_allocated_bytes_bucket", 'scope="GET /b",le="4096"')
      assert.equal(under + 5, le_4096) -- (and the five that made one empty table)
    end)

    it("takes its bucket bounds from `buckets`", function()
      metrics.enable({ buckets = { -10, 0, 100, 1e6 } })
      run_scopes("r", 2, make_tables)
      local text = metrics.text()
      for _, le in ipairs { "-10", "0", "100", "1000000", "+Inf" } do
        assert.is_number(sample(text, "lunet_mem_scope_peak_bytes_bucket", 'scope="r",le="' .. le .. '"'), le)
      end
      assert.equal(2, sample(text, "lunet_mem_scope_peak_bytes_bucket", 'scope="r",le="1000000"'))
      assert.is_nil(text:find('le="1024"', 1, true))
    end)

    it("counts a scope whose fn raised, and the refusals of its budget", function()
      metrics.enable()
      local seen = run_scopes("GET /big", 3, function()
        local t = {}
        for i = 1, 1e5 do t[i] = { i } end
      end, { limit = 16 * 1024 })
      local text = metrics.text()
      local l = 'scope="GET /big"'
      assert.equal(3, sample(text, "lunet_mem_scope_requests_total", l))
      local refusals = sum(seen, "budget_refusals")
      assert.is_true(refusals >= 3)
      assert.equal(refusals, sample(text, "lunet_mem_scope_budget_refusals_total", l))
    end)

    it("counts nested scopes each under its own name", function()
      metrics.enable()
      mem.scope("outer", function()
        mem.scope("inner", make_tables)
        mem.scope("inner", make_tables)
      end)
      local text = metrics.text()
      assert.equal(1, sample(text, "lunet_mem_scope_requests_total", 'scope="outer"'))
      assert.equal(2, sample(text, "lunet_mem_scope_requests_total", 'scope="inner"'))
    end)

    it("counts the scopes of a coroutine collected inside them", function()
      if mem.lua == "lua51" then
        pending("Lua 5.1 cannot yield inside mem.scope")
        return
      end
      metrics.enable()
      local co = coroutine.create(function()
        mem.scope("abandoned", function() coroutine.yield() end)
      end)
      coroutine.resume(co)
      assert.is_nil(sample(metrics.text(), "lunet_mem_scope_requests_total", 'scope="abandoned"'))
      co = nil -- luacheck: ignore
      collectgarbage("collect")
      collectgarbage("collect")
      assert.equal(1, sample(metrics.text(), "lunet_mem_scope_requests_total", 'scope="abandoned"'))
    end)

    it("puts names beyond max_scopes under scope=\"other\"", function()
      metrics.enable({ max_scopes = 2 })
      for _, name in ipairs { "a", "b", "c", "d", "a", "c" } do mem.scope(name, function() end) end
      local text = metrics.text()
      assert.equal(2, sample(text, "lunet_mem_scope_requests_total", 'scope="a"'))
      assert.equal(1, sample(text, "lunet_mem_scope_requests_total", 'scope="b"'))
      assert.equal(3, sample(text, "lunet_mem_scope_requests_total", 'scope="other"'))
      assert.is_nil(text:find('scope="c"', 1, true))
    end)

    it("escapes backslash, double quote and newline in label values", function()
      metrics.enable()
      mem.scope('a\\b"c\nd', function() end)
      assert.equal(1, sample(metrics.text(), "lunet_mem_scope_requests_total", 'scope="a\\\\b\\"c\\nd"'))
    end)
  end)

  describe("disable() and reset()", function()
    it("disable() stops the aggregates and drops them", function()
      metrics.enable()
      mem.scope("x", function() end)
      metrics.disable()
      mem.scope("x", function() end)
      assert.is_nil(metrics.text():find("lunet_mem_scope_", 1, true))
    end)

    it("reset() starts the aggregates over, with the same options", function()
      metrics.enable({ buckets = { 10 } })
      mem.scope("x", function() end)
      metrics.reset()
      mem.scope("y", function() end)
      local text = metrics.text()
      assert.is_nil(sample(text, "lunet_mem_scope_requests_total", 'scope="x"'))
      assert.equal(1, sample(text, "lunet_mem_scope_requests_total", 'scope="y"'))
      assert.equal(1, sample(text, "lunet_mem_scope_peak_bytes_bucket", 'scope="y",le="10"'))
    end)
  end)

  describe("bad arguments", function()
    it("raise bad argument errors naming the function", function()
      helpers.raises("bad argument #1 to 'enable' (table expected, got string)", metrics.enable, "x")
      helpers.raises("bad argument #1 to 'enable' (unknown option 'max')", metrics.enable, { max = 1 })
      helpers.raises("bad argument #1 to 'enable' (option 'max_scopes': integer from 1 to 100000 "
        .. "expected, got 0)", metrics.enable, { max_scopes = 0 })
      helpers.raises("bad argument #1 to 'enable' (option 'buckets': array of 1 to 64 increasing "
        .. "integers expected, got 0 bounds)", metrics.enable, { buckets = {} })
      helpers.raises("got bound 2 = 1 after 2)", metrics.enable, { buckets = { 2, 1 } })
      helpers.raises("got bound 1 = 1.5)", metrics.enable, { buckets = { 1.5 } })
      helpers.raises("got key 'x')", metrics.enable, { buckets = { x = 1 } })
      for _, fname in ipairs { "disable", "reset", "text" } do
        helpers.raises(("bad argument #1 to '%s' (no argument expected, got number)"):format(fname),
          metrics[fname], 1)
      end
    end)
  end)

  it("leaves lua_close clean with a scope open in a suspended coroutine", function()
    local ok, out = helpers.run_lua([[
      local mem = require "lunet.mem"
      mem.metrics.enable()
      local co = coroutine.wrap(function() mem.scope("open", function() coroutine.yield() end) end)
      if mem.lua ~= "lua51" then co() end
      mem.scope("closed", function() end)
      assert(mem.metrics.text():find('lunet_mem_scope_requests_total{scope="closed"} 1', 1, true))
      print("done")
    ]])
    assert.is_true(ok, out)
    assert.truthy(out:find("done"))
  end)
end)
