local helpers = require "spec.helpers"
local mem = helpers.mem

-- A request handler: parses a header string, builds a response table, formats a body, drops it.
local function handler(req)
  local headers = {}
  for k, v in req:gmatch("(%w+)=(%w+)") do headers[k] = v end
  local parts = {}
  for i = 1, 10 do parts[i] = ("%s:%d"):format(headers.path or "?", i) end
  return #table.concat(parts, ",")
end

local settle = helpers.settle

-- The arena named `name`, if not reclaimed.
local function arena_named(name)
  for _, a in ipairs(mem.arenas()) do
    if a.name == name then return a end
  end
end

-- Runs `n` clean requests in arena scopes, so that chunks are taken, given back and reused.
local function churn(n)
  for i = 1, n do
    mem.scope({ name = "churn", arena = { chunk_size = 4096 } }, handler, "path=p" .. i .. "&x=y")
  end
end

local recorder_off, recorder_back = helpers.recorder_off, helpers.recorder_back

describe("mem.scope{arena = true}", function()
  before_each(recorder_off)
  after_each(recorder_back)

  it("places the scope's new objects in its arena and returns fn's results", function()
    local where
    local t, s = mem.scope({ name = "GET /a", arena = true }, function(x)
      local obj = { x }
      where = mem.arena_of(obj)
      return obj, "ok"
    end, 5)
    assert.are.equal("GET /a", where)
    assert.are.equal(5, t[1])
    assert.are.equal("ok", s)
    assert.is_nil(mem.arena_of({}))
    assert.is_nil(mem.arena_of(42))
  end)

  it("reports the arena in the scope's stats and the state's stats", function()
    local stats
    mem.scope({ name = "GET /stats", arena = true, on_exit = function(s) stats = s end },
      function()
        local keep = {}
        for i = 1, 100 do keep[i] = { i } end
        local s = mem.stats()
        assert.is_true(s.arenas >= 1)
        assert.is_true(s.arena_bytes >= 4096)
        assert.is_true(s.arena_live_bytes > 0)
        local a = arena_named("GET /stats")
        assert.is_true(a.running)
        assert.are.equal(0, a.age)
        assert.is_false(a.pinned)
        return #keep
      end)
    assert.is_table(stats.arena)
    assert.is_true(stats.arena.blocks >= 100)
    assert.is_true(stats.arena.reserved_bytes >= 4096)
    for _, k in ipairs { "arena_bytes", "arena_live_bytes", "arena_live_blocks", "arenas",
      "arena_pool_bytes", "arenas_reclaimed", "gc_cycles" } do
      assert.is_number(mem.stats()[k], k)
    end
  end)

  it("keeps live_bytes equal to collectgarbage('count') * 1024", function()
    local misses = 0
    for i = 1, 300 do
      mem.scope({ name = "exact", arena = true }, function()
        handler("path=x" .. i)
        if not helpers.exact() then misses = misses + 1 end
      end)
      if not helpers.exact() then misses = misses + 1 end
    end
    settle()
    assert.is_true(helpers.exact())
    assert.are.equal(0, misses)
  end)

  it("reclaims every arena of a handler that leaks nothing: 0 pinned", function()
    recorder_back() -- (the compiler on: its traces are part of the case)
    churn(50) -- warm-up (LuaJIT compiles its traces here)
    settle()
    local before = mem.stats().arenas_reclaimed
    churn(2000)
    settle()
    local function count()
      local pinned, kept = 0, 0
      for _, a in ipairs(mem.arenas()) do
        if a.pinned then pinned = pinned + 1 end
        kept = kept + a.live_bytes
      end
      return pinned, kept
    end
    local pinned, kept = count()
    if helpers.is_jit and pinned > 0 then
      -- A trace compiled while a request ran may hold one of its strings as a constant; the
      -- arena is then pinned as long as the trace lives.
      print(("\n# LuaJIT: %d of 2000 arenas pinned by trace constants"):format(pinned))
      jit.flush()
      settle()
      pinned, kept = count()
    end
    local s = mem.stats()
    assert.are.equal(0, pinned, "pinned arenas")
    -- (a VM structure that grew during a request, such as a long-lived coroutine's call info
    -- or the string table, can keep a few blocks in an arena without pinning it)
    assert.is_true(s.arenas <= 3, "arenas left")
    assert.is_true(kept <= 256 * 1024, kept)
    assert.is_true(s.arenas_reclaimed - before >= 1998)
  end)

  it("reuses its chunks: arena memory stays flat over many requests", function()
    churn(200)
    settle()
    local function held()
      local s = mem.stats()
      return s.arena_bytes + s.arena_pool_bytes
    end
    local before = held()
    churn(5000)
    settle()
    -- (on 5.1 and LuaJIT the string table, which grows with the number of strings, can be
    -- placed in an arena and keep one chunk: see the README)
    assert.is_true(held() <= before + 256 * 1024, held() - before)
  end)

  it("accepts arena = false and { chunk_size = bytes }", function()
    local where
    mem.scope({ arena = false }, function() where = mem.arena_of({}) end)
    assert.is_nil(where)
    mem.scope({ name = "big", arena = { chunk_size = 256 * 1024 } }, function()
      local t = {}
      where = mem.arena_of(t)
      assert.is_true(arena_named("big").reserved_bytes >= 256 * 1024)
    end)
    assert.are.equal("big", where)
  end)

  it("rejects bad arena options with bad argument errors", function()
    local f = function() end
    for _, bad in ipairs {
      { 3, "option 'arena': boolean or table expected, got number" },
      { "yes", "option 'arena': boolean or table expected, got string" },
      { { chunk_size = 0 }, "chunk_size integer from 1 to 1048576 expected, got 0" },
      { { chunk_size = 2 ^ 21 }, "chunk_size integer from 1 to 1048576 expected, got" },
      { { chunk_size = 1.5 }, "chunk_size integer from 1 to 1048576 expected, got 1.5" },
      { { chunk_size = "4k" }, "chunk_size integer from 1 to 1048576 expected, got string" },
      { { size = 1 }, "option 'arena': table with only 'chunk_size' expected, got field 'size'" },
    } do
      local ok, err = pcall(mem.scope, { arena = bad[1] }, f)
      assert.is_false(ok)
      assert.matches("bad argument #1 to 'scope'", err, 1, true)
      assert.matches(bad[2], err, 1, true)
    end
  end)
end)

describe("arena lifetime", function()
  before_each(recorder_off)
  after_each(recorder_back)

  -- Makes an object escape from an arena scope named `name` with `escape(obj)`, where `make`
  -- builds the object and `check(obj)` reads it back. Then other requests reuse the chunks, the
  -- collector runs, and the object must be intact, in its arena, and the arena pinned. When
  -- `release()` drops the last reference, the arena is reclaimed.
  -- (With LuaJIT's compiler off: a trace recorded inside the scope would place `make`'s object
  -- outside the arena, see mem.lua.)
  local escapes = helpers.without_jit(function(name, make, escape, check, release)
    mem.scope({ name = name, arena = true }, function()
      escape(make())
    end)
    churn(300)
    settle()
    settle()
    local a = arena_named(name)
    assert.is_table(a, name .. " reclaimed while an object lives in it")
    assert.is_true(a.live_blocks > 0)
    assert.is_true(a.age >= 2, "age")
    assert.is_true(a.pinned)
    assert.is_false(a.running)
    check()
    release()
    settle()
    churn(10)
    settle()
    assert.is_nil(arena_named(name), name .. " not reclaimed after the release")
  end)

  it("keeps an object returned by the scope", function()
    local kept
    local r = mem.scope({ name = "returned", arena = true }, function()
      return { "payload", n = 7 }
    end)
    kept = r
    r = nil -- luacheck: ignore 311
    churn(300)
    settle()
    assert.are.equal("returned", mem.arena_of(kept))
    assert.are.equal("payload", kept[1])
    assert.is_true(arena_named("returned").pinned)
    kept = nil -- luacheck: ignore 311
    settle()
    assert.is_nil(arena_named("returned"))
  end)

  -- The long-lived tables objects escape to have their slot already: on Lua 5.1 and LuaJIT a
  -- table part that grows inside the scope is placed in the arena too (see the next describe).
  local cache = { f = false }
  it("keeps a closure held in a long-lived table (upvalue)", function()
    escapes("upvalue", function()
      local secret = { ("s"):rep(40) }
      return function() return secret[1] end
    end, function(f) cache.f = f end, function()
      assert.are.equal(("s"):rep(40), cache.f())
      assert.are.equal("upvalue", mem.arena_of(cache.f))
    end, function() cache.f = false end)
  end)

  it("keeps an object stored in a global", function()
    _G.lunet_mem_spec_global = false
    escapes("global", function() return { answer = 42 } end,
      function(obj) _G.lunet_mem_spec_global = obj end,
      function()
        assert.are.equal(42, _G.lunet_mem_spec_global.answer)
        assert.are.equal("global", mem.arena_of(_G.lunet_mem_spec_global))
      end,
      function() _G.lunet_mem_spec_global = false end)
  end)

  it("keeps an object stored in the registry", function()
    local registry = debug.getregistry()
    registry.lunet_mem_spec = false
    escapes("registry", function() return { "in the registry" } end,
      function(obj) registry.lunet_mem_spec = obj end,
      function() assert.are.equal("in the registry", registry.lunet_mem_spec[1]) end,
      function() registry.lunet_mem_spec = false end)
  end)

  it("keeps a metatable set on a long-lived table", function()
    local long_lived = {}
    escapes("metatable", function()
      return { __index = function(_, k) return "meta " .. k end }
    end, function(mt) setmetatable(long_lived, mt) end,
      function() assert.are.equal("meta x", long_lived.x) end,
      function() setmetatable(long_lived, nil) end)
  end)

  it("keeps a suspended coroutine made in the scope", function()
    local co
    escapes("coroutine", function()
      return coroutine.create(function(a)
        local acc = { a }
        while true do acc[#acc + 1] = coroutine.yield(#acc) end
      end)
    end, function(c)
      co = c
      assert.is_true(coroutine.resume(co, "first"))
    end, function()
      for i = 2, 50 do
        local ok, n = coroutine.resume(co, i)
        assert.is_true(ok)
        assert.are.equal(i, n)
      end
      assert.are.equal("coroutine", mem.arena_of(co))
    end, function() co = nil end)
  end)

  it("does not let a weak table keep an object, nor a collected one pin the arena", function()
    local weak = setmetatable({ false }, { __mode = "v" })
    mem.scope({ name = "weak", arena = true }, function()
      weak[1] = { "gone soon" }
    end)
    settle()
    assert.is_nil(weak[1])
    assert.is_nil(arena_named("weak"))
  end)

  it("keeps an object that is also held strongly while a weak table refers to it", function()
    -- (a hash part of one free node, which the new key takes without growing the table)
    local weak = setmetatable({ placeholder = true }, { __mode = "k" })
    weak.placeholder = nil
    local strong = { false }
    escapes("weak+strong", function() return { "key" } end, function(obj)
      weak[obj] = true
      strong[1] = obj
    end, function()
      assert.is_true(weak[strong[1]])
      assert.are.equal("key", strong[1][1])
    end, function() strong[1] = false end)
    settle()
    assert.is_nil(next(weak))
  end)

  -- (JIT off: a trace recorded meanwhile may keep one of the strings as a constant, and its
  -- arena with it, until the trace is flushed)
  it("keeps strings made in one request and reused by the next", helpers.without_jit(function()
    local saved = {}
    for i = 1, 3 do
      mem.scope({ name = "strings " .. i, arena = true }, function()
        -- The same short strings each time: interned, the first request's copy is reused
        -- while it lives.
        local s = ("key-%d"):format(7) .. ("-%s"):format("shared")
        saved[i] = s
      end)
      churn(100)
    end
    settle()
    for i = 1, 3 do assert.are.equal("key-7-shared", saved[i]) end
    saved = nil -- luacheck: ignore 311
    settle()
    churn(10)
    settle()
    for i = 1, 3 do assert.is_nil(arena_named("strings " .. i)) end
  end))
end)

describe("a long-lived table that grows inside an arena scope", function()
  -- (LuaJIT's recorder off: a block made while it records is not placed in the arena)
  before_each(recorder_off)
  after_each(recorder_back)

  local tags = helpers.version ~= "lua51" and helpers.version ~= "luajit"
  it(tags and "keeps the arena's memory but does not pin it (5.2+ tags new objects)"
    or "pins the arena until the table is resized (5.1 and LuaJIT do not tag new blocks)",
    function()
      -- (a small part: on 5.1 and LuaJIT, blocks over 512 bytes are not taken as objects)
      local long_lived = {}
      mem.scope({ name = "grows", arena = true }, function()
        for i = 1, 3 do long_lived["k" .. i] = i end
      end)
      for i = 1, 3 do long_lived["k" .. i] = nil end
      churn(200)
      settle()
      local a = arena_named("grows")
      assert.is_table(a, "the table's part lives in the arena")
      assert.are.equal(not tags, a.pinned)
      if tags then assert.are.equal(0, a.live_objects) end
      -- its memory stays valid: the table still works, and resizing it frees the old part
      for i = 1, 200 do long_lived[i] = i end
      assert.are.equal(200, #long_lived)
      long_lived = nil -- luacheck: ignore 311
      settle()
      assert.is_nil(arena_named("grows"))
    end)
end)

describe("the VM's own buffers", function()
  -- Buffers the VM makes on first use and keeps (LuaJIT's string buffer, its trace recorder's
  -- buffers, Lua 5.1's concatenation buffer) are made when the module loads, or (LuaJIT) at the
  -- first arena scope after the compiler is switched on: a request that is the first to use
  -- them does not keep its arena.
  it("are not made in the first request that uses them", function()
    local ok, out = helpers.run_lua([[
      local jit = rawget(_G, "jit")
      if jit then jit.off() end
      local mem = require "lunet.mem"
      if jit then jit.on() end
      local function handler(n)
        local t = {}
        for i = 1, 300 do t[#t + 1] = ("%d:%s"):format(i, tostring(i / 3)) .. "," .. n end
        return #table.concat(t, ";")
      end
      for r = 1, 50 do mem.scope({ name = "r" .. r, arena = true }, handler, r) end
      if jit then jit.flush() end
      collectgarbage() collectgarbage()
      -- (a VM table that grew in a request, such as the string table, may keep its arena's
      -- memory on 5.2+, which tells it apart from objects: it does not pin it)
      local pinned = 0
      for _, a in ipairs(mem.arenas()) do
        if a.pinned then pinned = pinned + 1 end
        print("left", a.name, a.live_blocks, a.live_objects, a.pinned)
      end
      print("pinned", pinned)
    ]])
    assert.is_true(ok, out)
    assert.matches("pinned\t0\n", out, 1, true)
  end)
end)

describe("arena scopes nested and in coroutines", function()
  before_each(recorder_off)
  after_each(recorder_back)

  it("gives an inner arena scope its own arena, and a plain scope its parent's", function()
    local outer_obj, inner_obj, plain_obj
    local outer_stats
    mem.scope({ name = "outer", arena = true, on_exit = function(s) outer_stats = s end },
      function()
        outer_obj = {}
        mem.scope({ name = "inner", arena = true }, function() inner_obj = {} end)
        mem.scope("plain", function() plain_obj = {} end)
      end)
    assert.are.equal("outer", mem.arena_of(outer_obj))
    assert.are.equal("inner", mem.arena_of(inner_obj))
    assert.are.equal("outer", mem.arena_of(plain_obj))
    -- counts roll up: the outer scope counted the inner scope's allocations too
    assert.is_true(outer_stats.allocs >= 3)
    outer_obj, inner_obj, plain_obj = nil, nil, nil
    settle()
    assert.is_nil(arena_named("outer"))
    assert.is_nil(arena_named("inner"))
  end)

  it("follows a coroutine resumed inside the scope", function()
    local where
    local co = coroutine.wrap(function()
      while true do
        where = mem.arena_of({})
        coroutine.yield()
      end
    end)
    mem.scope({ name = "resumer", arena = true }, co)
    assert.are.equal("resumer", where)
    co()
    assert.is_nil(where)
  end)

  local yield_it = helpers.can_yield_in_scope and it or pending
  yield_it("keeps interleaved requests' objects in their own arenas across yields", function()
    local seen = {}
    local function request(name)
      return coroutine.create(function()
        mem.scope({ name = name, arena = true }, function()
          for i = 1, 5 do
            local obj = { name, i }
            seen[#seen + 1] = { name, mem.arena_of(obj) }
            coroutine.yield()
          end
        end)
      end)
    end
    local a, b = request("A"), request("B")
    for _ = 1, 6 do
      assert.is_true(coroutine.resume(a))
      assert.is_true(coroutine.resume(b))
    end
    assert.are.equal(10, #seen)
    for _, pair in ipairs(seen) do assert.are.equal(pair[1], pair[2]) end
    -- (its entries were made in the arenas; the finished coroutines keep the call info they
    -- grew inside the scopes)
    seen, a, b = nil, nil, nil -- luacheck: ignore 311
    settle()
    assert.is_nil(arena_named("A"))
    assert.is_nil(arena_named("B"))
  end)

  yield_it("ends the arena of a scope whose coroutine is collected while suspended", function()
    local co = coroutine.create(function()
      mem.scope({ name = "abandoned", arena = true }, function()
        local t = { "x" }
        coroutine.yield(t)
      end)
    end)
    assert.is_true(coroutine.resume(co))
    assert.is_true(arena_named("abandoned").running)
    co = nil -- luacheck: ignore 311
    settle()
    settle()
    assert.is_nil(arena_named("abandoned"))
  end)
end)

describe("lua_close with live arenas", function()
  it("exits cleanly with pinned arenas and arena scopes open in suspended coroutines", function()
    -- (LuaJIT's compiler off: a table made while it records a trace is not placed in the
    -- scope's arena, see the README's limits, and that scope then leaves no arena)
    local script = [[
      local mem = require "lunet.mem"
      if jit then jit.off() end
      keep = {}
      for i = 1, 50 do
        mem.scope({ name = "pinned", arena = true }, function() keep[i] = { i } end)
      end
      local co = coroutine.create(function()
        mem.scope({ name = "open", arena = true }, function()
          local t = { "held" }
          coroutine.yield(t)
        end)
      end)
      if mem.lua ~= "lua51" then assert(coroutine.resume(co)) end
      collectgarbage()
      io.write(#mem.arenas() >= 50 and "ok" or "missing arenas")
      os.exit(0, true)
    ]]
    local ok, out = helpers.run_lua(script)
    assert.are.equal("ok", out)
    assert.is_true(ok)
  end)
end)
