local helpers = require "spec.helpers"
local mem = helpers.mem

-- Placement gives up on a route whose arenas keep outliving their requests (src/arena/routes.rs):
-- a pinned arena adds 4 to its route's score, a clean one takes 1 off; from 8 the route's
-- scopes run without an arena but for one in 32.

-- Route names of this file's own: scores are kept by name for the state's life, and other
-- specs run in the same state.
local function route(name) return ("%s (adaptive spec %d)"):format(name, math.random(1e9)) end

local settle, recorder_off, recorder_back = helpers.settle, helpers.recorder_off,
  helpers.recorder_back

-- A request whose result is kept (a cache entry): returns it and where it was placed.
local function cached(i)
  local entry = { id = i, body = "entry " .. i }
  return entry, mem.arena_of(entry)
end

-- Runs `n` requests on the route `name`, keeping each result in `kept` and letting GC cycles pass after
-- each (three full collections: its arena is then pinned), and counts those placed in an arena.
local function keep_requests(name, n, kept)
  local placed = 0
  for i = 1, n do
    local entry, where = mem.scope({ name = name, arena = true }, cached, i)
    kept[#kept + 1] = entry
    if where then placed = placed + 1 end
    settle()
    collectgarbage("collect")
  end
  return placed
end

-- Brings the state's score over all routes (where a new route starts) down to 0: each arena
-- reclaimed without having been pinned takes 1 off it.
local function clean_state()
  local was = mem.adaptive_arenas(false)
  for i = 1, 32 do mem.scope({ name = "clean state", arena = true }, function() return { i } end) end
  settle()
  mem.adaptive_arenas(was)
end

describe("adaptive arenas", function()
  before_each(function()
    recorder_off()
    clean_state()
  end)
  after_each(function()
    mem.adaptive_arenas(true)
    recorder_back()
  end)

  it("give up on a route whose results outlive its requests, and probe it", function()
    local kept, name = {}, route("GET /cache")
    local skipped = mem.stats().arenas_skipped
    local placed = keep_requests(name, 2, kept)
    assert.are.equal(2, placed, "the first arenas are made")
    placed = keep_requests(name, 64, kept)
    assert.are.equal(2, placed, "then one probe in 32")
    assert.are.equal(skipped + 62, mem.stats().arenas_skipped)
    for i, entry in ipairs(kept) do assert.are.equal("entry " .. entry.id, entry.body, i) end
  end)

  it("keep arenas for a route whose results die with its requests", function()
    local skipped, name = mem.stats().arenas_skipped, route("GET /clean")
    for i = 1, 64 do
      local where = mem.scope({ name = name, arena = true }, function()
        return mem.arena_of({ i })
      end)
      assert.are.equal(name, where)
      settle()
    end
    assert.are.equal(skipped, mem.stats().arenas_skipped)
  end)

  it("give the route its arenas back once they stop outliving requests", function()
    local kept, name = {}, route("GET /changes")
    keep_requests(name, 8, kept)
    kept = nil
    settle()
    -- (each probe that is reclaimed clean takes 1 off the score, down from 16 to below 8:
    -- 9 probes, one in 32 requests)
    local in_a_row, requests = 0, 0
    while in_a_row < 64 and requests < 32 * 20 do
      requests = requests + 1
      local where = mem.scope({ name = name, arena = true }, function()
        return mem.arena_of({ requests })
      end)
      in_a_row = where and in_a_row + 1 or 0
      settle()
    end
    assert.are.equal(64, in_a_row, "after " .. requests .. " requests")
  end)

  it("start a route seen for the first time from the score over all routes", function()
    -- (a program that names each request apart, as one scope per file, has no route to learn
    -- from: its arenas pinned, a new name runs without its arena)
    local kept = {}
    for i = 1, 3 do keep_requests(route("file " .. i), 1, kept) end
    local skipped = mem.stats().arenas_skipped
    local entry, where = mem.scope({ name = route("file 4"), arena = true }, cached, 4)
    kept[#kept + 1] = entry
    assert.is_nil(where)
    assert.are.equal(skipped + 1, mem.stats().arenas_skipped)
  end)

  it("count a scope without its arena as any scope", function()
    -- (LuaJIT's recorder off: a block made while it records a trace through the call is the
    -- compiler's, not the scope's; spec/04's on_exit spec read allocs 0 once that way)
    helpers.recorder_off()
    finally(helpers.recorder_back)
    local kept, name = {}, route("GET /counted")
    keep_requests(name, 4, kept)
    local skipped = mem.stats().arenas_skipped
    local s = mem.scope({ name = name, arena = true }, function()
      kept[#kept + 1] = { 1, 2, 3 }
      return mem.current()
    end)
    assert.are.equal(skipped + 1, mem.stats().arenas_skipped)
    local st = s:stats()
    assert.is_nil(st.arena)
    assert.is_true(st.allocs >= 1)
    assert.is_true(st.bytes_allocated > 0)
  end)

  it("can be turned off: every arena scope gets its arena", function()
    assert.is_true(mem.adaptive_arenas(false))
    assert.is_false(mem.adaptive_arenas())
    local kept = {}
    local skipped = mem.stats().arenas_skipped
    assert.are.equal(40, keep_requests(route("GET /always"), 40, kept))
    assert.are.equal(skipped, mem.stats().arenas_skipped)
    assert.is_false(mem.adaptive_arenas(true))
  end)

  -- Pinned arenas are found at each GC cycle's tick, a finalizer; Lua 5.3 drops a finalizer
  -- whose call fails for want of memory (a refused stack growth), and the ticks stopped for good.
  it("keep seeing GC cycles after memory errors in collections", function()
    local function cycles_seen()
      local before = mem.stats().gc_cycles
      settle()
      mem.scope({ arena = true }, function() end)
      settle()
      settle()
      return mem.stats().gc_cycles - before
    end
    local task = function() return mem.checkpoint():is_neutral() end
    for n = 0, 1000 do
      local ok = mem.fail_after(n, task)
      assert.is_true(cycles_seen() > 0, "step " .. n)
      if ok then break end
    end
  end)

  it("rejects a bad argument", function()
    assert.has_error(function() mem.adaptive_arenas("yes") end,
      "bad argument #1 to 'adaptive_arenas' (boolean expected, got string)")
  end)
end)
