/*
** The C side under load: a libuv loop running many uv_queue_work items whose worker threads use
** worker arenas and tracked buffers, checkpoints on the loop thread, and a Lua state with the
** module installed from C running request handlers in coroutines resumed with
** lunet_mem_resume. Then the request path with one ledger for Lua and C (run_requests): each
** request's coroutine asks for its scope (lunet_mem_scope_current), the loop thread parses the
** request into a request arena charged to it, a worker thread builds its rows in a worker arena
** begun in the scope (scratch released by the arena's reset) and in the request arena, the
** coroutine formats the response in Lua; every request's C figures are checked against what the
** C side allocated for it, exactly, and requests over their budget get NULL on the C side (or,
** when C holds the budget, a memory error in Lua) and a clean error in Lua. Exits 0 when every
** check holds; run plain, under ASan+LSan and valgrind by scripts/c-tests.sh.
**
**   uv_proof [work_items] [requests]     (default 100000 and 2000)
*/
#define LUNET_TRACE
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "lunet_mem.h"

#define CHECK(cond, ...)                                                                     \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "uv_proof: check failed at line %d: %s: ", __LINE__, #cond);     \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fputc('\n', stderr);                                                             \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

typedef struct job {
    uv_work_t req;
    int id;
    char *result; /* made on the worker thread, outside its arena; freed on the loop thread */
} job_t;

static int done;

/* A worker thread: a "DB query" that parses rows into scratch buffers (in the arena), then
** copies the result out to the heap. */
static void query_work(uv_work_t *req) {
    job_t *job = req->data;
    lunet_worker_arena_begin(16 * 1024);
    char *rows[8];
    for (int i = 0; i < 8; i++) {
        rows[i] = lunet_malloc(64);
        snprintf(rows[i], 64, "row %d of job %d", i, job->id);
    }
    lunet_worker_arena_begin(1024); /* nested: a helper with its own scratch */
    char *tmp = lunet_malloc(200);
    memset(tmp, 'x', 200);
    lunet_free(tmp);
    lunet_worker_arena_end();
    for (int i = 0; i < 8; i++) lunet_free(rows[i]);
    lunet_worker_arena_end();

    job->result = lunet_malloc(32);
    snprintf(job->result, 32, "result %d", job->id);
}

static void query_done(uv_work_t *req, int status) {
    job_t *job = req->data;
    char expected[32];
    CHECK(status == 0, "status %d", status);
    snprintf(expected, sizeof expected, "result %d", job->id);
    CHECK(strcmp(job->result, expected) == 0, "got '%s'", job->result);
    lunet_free(job->result);
    lunet_free(job);
    done++;
}

static void run_loop(int items) {
    uv_loop_t loop;
    CHECK(uv_loop_init(&loop) == 0, "uv_loop_init");
    lunet_mem_checkpoint_t cp = lunet_mem_checkpoint();
    for (int i = 0; i < items; i++) {
        job_t *job = lunet_malloc(sizeof *job);
        CHECK(job != NULL, "out of memory");
        job->id = i;
        job->result = NULL;
        job->req.data = job;
        CHECK(uv_queue_work(&loop, &job->req, query_work, query_done) == 0, "uv_queue_work");
    }
    CHECK(uv_run(&loop, UV_RUN_DEFAULT) == 0, "uv_run");
    CHECK(done == items, "%d of %d done", done, items);
    lunet_mem_assert_neutral(&cp, "after the work items");
    CHECK(uv_loop_close(&loop) == 0, "uv_loop_close");

    lunet_mem_stats_t s;
    lunet_mem_c_stats(&s);
    /* each item: the job, 8 rows, 1 tmp, the result */
    CHECK(s.allocs == (uint64_t)items * 11, "allocs %llu", (unsigned long long)s.allocs);
    CHECK(s.frees == s.allocs && s.live_bytes == 0, "frees %llu, live %lld",
          (unsigned long long)s.frees, (long long)s.live_bytes);
}

/* realloc through the macros and the entry points without a call-site slot (what a compiler
** without statement expressions gets), a block of every cached size and some bigger ones, on a
** thread with no arena: contents kept, every count exact. */
static void run_entry_points(void) {
    lunet_mem_stats_t before, after;
    lunet_mem_c_stats(&before);
    lunet_mem_checkpoint_t cp = lunet_mem_checkpoint();
    enum { BLOCKS = 1200 };
    static unsigned char *blocks[BLOCKS];
    size_t bytes = 0;
    for (int i = 0; i < BLOCKS; i++) {
        size_t n = (size_t)i * 3 + 1;
        blocks[i] = i % 2 ? lunet_malloc(n) : lunet_mem_malloc_at(n, __FILE__, __LINE__);
        CHECK(blocks[i] != NULL && ((uintptr_t)blocks[i] & 15) == 0, "block %d", i);
        memset(blocks[i], i & 0xff, n);
        bytes += n;
    }
    for (int i = 0; i < BLOCKS; i++) { /* grow, then shrink: the bytes kept are the same */
        size_t n = (size_t)i * 3 + 1;
        unsigned char *p = i % 2 ? lunet_realloc(blocks[i], n + 100)
                                 : lunet_mem_realloc_at(blocks[i], n + 100, __FILE__, __LINE__);
        CHECK(p != NULL && p[0] == (i & 0xff) && p[n - 1] == (i & 0xff), "realloc %d", i);
        blocks[i] = lunet_realloc(p, n);
        CHECK(blocks[i][n - 1] == (i & 0xff), "shrink %d", i);
    }
    for (int i = 0; i < BLOCKS; i++) {
        if (i % 3 == 0) {
            CHECK(lunet_realloc(blocks[i], 0) == NULL, "realloc to 0");
        } else {
            lunet_free(blocks[i]);
        }
    }
    lunet_free(NULL);
    lunet_mem_assert_neutral(&cp, "after the entry points");
    lunet_mem_c_stats(&after);
    /* each block: malloc, realloc up, realloc down (two allocations and two frees), free */
    CHECK(after.allocs - before.allocs == 3 * BLOCKS, "allocs %llu",
          (unsigned long long)(after.allocs - before.allocs));
    CHECK(after.bytes_allocated - before.bytes_allocated == 3 * bytes + 100 * BLOCKS,
          "bytes %llu", (unsigned long long)(after.bytes_allocated - before.bytes_allocated));
    CHECK(after.live_bytes == before.live_bytes, "live %lld", (long long)after.live_bytes);
}

/* Lua handlers in coroutines, resumed from C as a runtime does. */
/* ---- The states: made on the host's own allocator -------------------------------------------- */

/* The allocator a runtime gives its states (lua_newstate's, here glibc's, counting the blocks it
** holds): the module wraps it at install and hands the state back to it at lua_close, so that by
** then every block it made is freed. */
typedef struct host_heap {
    long live;
} host_heap_t;

static void *host_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    host_heap_t *h = ud;
    (void)osize; /* (a type tag when ptr is NULL) */
    if (nsize == 0) {
        if (ptr != NULL) h->live--;
        free(ptr);
        return NULL;
    }
    void *p = realloc(ptr, nsize);
    if (p != NULL && ptr == NULL) h->live++;
    return p;
}

static int host_panic(lua_State *L) {
    fprintf(stderr, "uv_proof: Lua panic: %s\n", lua_tostring(L, -1));
    abort();
}

/* Lua 5.5's lua_newstate takes the seed of its string hashes too. */
static lua_State *new_state(host_heap_t *h) {
#if LUA_VERSION_NUM >= 505
    lua_State *L = lua_newstate(host_alloc, h, luaL_makeseed(NULL));
#else
    lua_State *L = lua_newstate(host_alloc, h);
#endif
    CHECK(L != NULL, "lua_newstate");
    lua_atpanic(L, host_panic);
    return L;
}

/* lua_close, then what the host's allocator still holds: nothing. */
static void close_state(lua_State *L, host_heap_t *h) {
    lua_close(L);
    CHECK(h->live == 0, "the host's allocator holds %ld blocks after lua_close", h->live);
}

static const char *LUA_CODE =
    "local mem = require 'lunet.mem'\n"
    "stats = {}\n"
    "function handler(id, n)\n"
    "  return mem.scope({ name = 'req ' .. id, on_exit = function(s) stats[id] = s end }, function()\n"
    "    local rows = {}\n"
    "    for i = 1, n do rows[i] = { id = i } end\n"
    "    coroutine.yield()          -- waits for I/O: the runtime resumes it later\n"
    "    for i = 1, n do rows[i] = { id = i, done = true } end\n"
    "    coroutine.yield()\n"
    "    return #rows\n"
    "  end)\n"
    "end\n"
    "function check(k, n)\n"
    "  assert(mem.current() == nil, 'the resumer has no scope')\n"
    "  for id = 2, k do\n"
    "    assert(stats[id].allocs == stats[1].allocs, 'request ' .. id .. ': ' .. stats[id].allocs .. ' allocs, request 1: ' .. stats[1].allocs)\n"
    "    assert(stats[id].allocs >= 2 * n, 'too few allocs')\n"
    "  end\n"
    "  local c = collectgarbage('count') * 1024\n"
    "  assert(mem.stats().live_bytes == c)\n"
    "end\n";

static void run_lua(int requests) {
    host_heap_t heap = {0};
    lua_State *L = new_state(&heap);
    luaL_openlibs(L);
    CHECK(lunet_mem_install(L) == 0, "lunet_mem_install");
    if (luaL_dostring(L, LUA_CODE) != 0) CHECK(0, "%s", lua_tostring(L, -1));
    lua_gc(L, LUA_GCSTOP, 0); /* so that every request sees the same collector */

    lua_State **co = lunet_malloc(sizeof *co * requests);
    for (int i = 0; i < requests; i++) {
        co[i] = lua_newthread(L);
        luaL_ref(L, LUA_REGISTRYINDEX); /* keep it */
        lua_getglobal(co[i], "handler");
        lua_pushinteger(co[i], i + 1);
        lua_pushinteger(co[i], 20);
    }
    int pending = requests, round = 0;
    while (pending > 0) {
        pending = 0;
        for (int i = 0; i < requests; i++) {
            int nres = 0, nargs = round == 0 ? 2 : 0;
            if (round > 0 && lua_status(co[i]) != LUA_YIELD) continue;
            int status;
            if (i % 2 == 0) {
                status = lunet_mem_resume(L, co[i], nargs, &nres);
            } else { /* the enter/leave pair around the runtime's own lua_resume */
                int entered = lunet_mem_enter(L, co[i]);
#if LUA_VERSION_NUM >= 504
                status = lua_resume(co[i], L, nargs, &nres);
#else
                status = lua_resume(co[i], L, nargs);
                nres = lua_gettop(co[i]);
#endif
                if (entered) lunet_mem_leave(L, co[i]);
            }
            CHECK(status == LUA_OK || status == LUA_YIELD, "resume: %s", lua_tostring(co[i], -1));
            lua_pop(co[i], nres);
            if (status == LUA_YIELD) pending++;
            /* between resumes the loop thread allocates too: not the requests' */
            lua_newtable(L);
            lua_pop(L, 1);
        }
        round++;
    }
    lunet_free(co);
    lua_gc(L, LUA_GCRESTART, 0);
    lua_getglobal(L, "check");
    lua_pushinteger(L, requests);
    lua_pushinteger(L, 20);
    if (lua_pcall(L, 2, 0, 0) != 0) CHECK(0, "%s", lua_tostring(L, -1));
    CHECK(lunet_mem_live_bytes(L) > 0, "tracker installed");
    close_state(L, &heap);
}

/* ---- The request path: one ledger for a request's Lua and C memory ---------------------------- */

enum { HEADERS = 6, SCRATCH = 4, ROWS = 5 };
enum { KIND_OK, KIND_C_OVER_BUDGET, KIND_LUA_OVER_BUDGET };

typedef struct request {
    uv_work_t work;
    int id, kind;
    lua_State *co;
    int co_ref;
    lunet_mem_scope_t *scope;       /* the request's scope, referenced */
    lunet_request_arena_t *arena;   /* its C buffers */
    char *rows[ROWS];
    int rows_made, refused;
    /* what the C side allocated for it, counted here as it goes */
    int64_t arena_bytes, arena_blocks; /* live in the request arena */
    int64_t scratch_bytes;             /* in the worker arena (all released by its end) */
    int64_t allocs;
} request_t;

static uv_loop_t *request_loop;
static int requests_done;

static size_t header_size(int id, int k) { return 16 + (size_t)(id * 7 + k * 13) % 48; }

/* The loop thread, called by the request's coroutine: its scope, its arena, its headers parsed
** into the arena, its rows queued for a worker. Returns true, or nil and a message when the
** budget refused a header (no work queued then). */
static void rows_work(uv_work_t *w);
static void rows_done(uv_work_t *w, int status);

static int l_begin_request(lua_State *L) {
    request_t *req = lua_touserdata(L, 1);
    char name[32];
    req->scope = lunet_mem_scope_current(L);
    CHECK(req->scope != NULL, "request %d: no scope", req->id);
    snprintf(name, sizeof name, "GET /users/%d", req->id);
    req->arena = lunet_request_arena_create(req->scope, name);
    CHECK(req->arena != NULL, "request arena");
    for (int k = 0; k < HEADERS; k++) {
        size_t n = header_size(req->id, k);
        if (req->kind == KIND_LUA_OVER_BUDGET && k == 0) n = 30000; /* a big body: C holds most */
        char *h = lunet_request_alloc(req->arena, n);
        if (h == NULL) {
            lua_pushnil(L);
            lua_pushliteral(L, "over budget (headers)");
            return 2;
        }
        CHECK(((uintptr_t)h & 15) == 0, "alignment");
        memset(h, 'h', n);
        req->arena_bytes += (int64_t)n;
        req->arena_blocks++;
        req->allocs++;
    }
    CHECK(uv_queue_work(request_loop, &req->work, rows_work, rows_done) == 0, "uv_queue_work");
    lua_pushboolean(L, 1);
    return 1;
}

/* A worker thread: scratch buffers in a worker arena charged to the request's scope (two left
** for the arena's reset), the rows in the request arena (the loop thread does not touch it while
** the request waits for this). Runs while the loop thread runs other requests' Lua. */
static void rows_work(uv_work_t *w) {
    request_t *req = w->data;
    lunet_worker_arena_begin_in(req->scope, 4096);
    char *scratch[SCRATCH];
    for (int k = 0; k < SCRATCH; k++) {
        size_t n = 100 + (size_t)k * 10;
        scratch[k] = lunet_malloc(n);
        CHECK(scratch[k] != NULL, "scratch");
        memset(scratch[k], 's', n);
        req->scratch_bytes += (int64_t)n;
        req->allocs++;
    }
    if (req->kind == KIND_C_OVER_BUDGET) {
        /* a result set bigger than the request's budget: NULL, and nothing counted */
        CHECK(lunet_request_alloc(req->arena, 64 * 1024) == NULL, "over budget: not NULL");
        req->refused = 1;
    } else {
        for (int k = 0; k < ROWS; k++) {
            char text[64];
            int len = snprintf(text, sizeof text, "row %d of request %d", k, req->id);
            char *row = lunet_request_alloc(req->arena, (size_t)len + 1);
            CHECK(row != NULL, "row");
            memcpy(row, text, (size_t)len + 1);
            req->rows[k] = row;
            req->arena_bytes += len + 1;
            req->arena_blocks++;
            req->allocs++;
        }
        req->rows_made = ROWS;
    }
    lunet_free(scratch[0]);
    lunet_free(scratch[1]);
    lunet_worker_arena_end(); /* releases scratch[2] and scratch[3] */
}

/* The coroutine, back from its wait: its rows as Lua strings, or nil and a message. */
static int l_request_rows(lua_State *L) {
    request_t *req = lua_touserdata(L, 1);
    if (req->refused) {
        lua_pushnil(L);
        lua_pushliteral(L, "over budget (rows)");
        return 2;
    }
    lua_createtable(L, req->rows_made, 0);
    for (int k = 0; k < req->rows_made; k++) {
        lua_pushstring(L, req->rows[k]);
        lua_rawseti(L, -2, k + 1);
    }
    return 1;
}

static const char *REQUEST_CODE =
    "local mem = require 'lunet.mem'\n"
    "exits, results = {}, {}\n"
    "function serve(req, id, limit, kind)\n"
    "  local ok, body = pcall(mem.scope, { name = 'GET /users', limit = limit,\n"
    "      on_exit = function(s) exits[id] = s end }, function()\n"
    "    local started, err = begin_request(req)\n"
    "    if not started then error(err, 0) end\n"
    "    coroutine.yield()              -- a worker builds the rows\n"
    "    local rows, err2 = request_rows(req)\n"
    "    if not rows then error(err2, 0) end\n"
    "    local out = {}\n"
    "    for i, row in ipairs(rows) do out[i] = '<li>' .. row .. '</li>' end\n"
    "    if kind == 2 then out[#out + 1] = string.rep('x', 20000) end -- past what C left\n"
    "    return '<ul>' .. table.concat(out) .. '</ul>'\n"
    "  end)\n"
    "  results[id] = { ok = ok, body = body }\n"
    "end\n"
    "function check_lua(n)\n"
    "  local first\n"
    "  for id = 1, n do\n"
    "    local r, s = results[id], exits[id]\n"
    "    if r.ok then\n"
    "      assert(r.body:find('row 4 of request ' .. id, 1, true), 'response ' .. id)\n"
    "      first = first or s\n"
    "      assert(s.allocs == first.allocs, 'request ' .. id .. ': ' .. s.allocs .. ' Lua allocs, not ' .. first.allocs)\n"
    "      assert(s.allocs > 0 and s.c_allocs > 0)\n"
    "    end\n"
    "  end\n"
    "  assert(first, 'no request served')\n"
    "end\n";

static int64_t field(lua_State *L, int idx, const char *name) {
    lua_getfield(L, idx, name);
    CHECK(lua_isnumber(L, -1), "stats field %s", name);
    int64_t v = (int64_t)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return v;
}

/* The request's coroutine has finished: its figures, then its arena and scope go. */
static void finish_request(lua_State *L, request_t *req) {
    lua_getglobal(L, "exits");
    lua_rawgeti(L, -1, req->id);
    CHECK(lua_istable(L, -1), "request %d: no on_exit stats", req->id);
    int st = lua_gettop(L);
    int64_t c_bytes = field(L, st, "c_bytes"), c_allocated = field(L, st, "c_bytes_allocated");
    int64_t c_allocs = field(L, st, "c_allocs"), c_frees = field(L, st, "c_frees");
    int64_t c_peak = field(L, st, "c_peak_bytes"), c_refusals = field(L, st, "c_refusals");
    /* on_exit: the request arena still holds its blocks; the worker's scratch was released */
    CHECK(c_bytes == req->arena_bytes, "request %d: c_bytes %lld, C allocated %lld", req->id,
          (long long)c_bytes, (long long)req->arena_bytes);
    CHECK(c_allocated == req->arena_bytes + req->scratch_bytes, "request %d: c_bytes_allocated %lld",
          req->id, (long long)c_allocated);
    CHECK(c_allocs == req->allocs && c_frees == SCRATCH, "request %d: c_allocs %lld c_frees %lld",
          req->id, (long long)c_allocs, (long long)c_frees);
    CHECK(c_peak == (req->kind == KIND_C_OVER_BUDGET ? req->arena_bytes + req->scratch_bytes
                                                      : c_allocated),
          "request %d: c_peak_bytes %lld", req->id, (long long)c_peak);
    CHECK(c_refusals == (req->kind == KIND_C_OVER_BUDGET), "request %d: c_refusals %lld", req->id,
          (long long)c_refusals);
    lua_pop(L, 2);

    lua_getglobal(L, "results");
    lua_rawgeti(L, -1, req->id);
    lua_getfield(L, -1, "ok");
    int ok = lua_toboolean(L, -1);
    lua_getfield(L, -2, "body");
    const char *body = lua_tostring(L, -1);
    if (req->kind == KIND_OK) {
        CHECK(ok && body != NULL, "request %d failed: %s", req->id, body ? body : "?");
    } else if (req->kind == KIND_C_OVER_BUDGET) {
        CHECK(!ok && body && strcmp(body, "over budget (rows)") == 0, "request %d: %s", req->id,
              body ? body : "?");
    } else {
        CHECK(!ok && body && strstr(body, "not enough memory") != NULL, "request %d: %s", req->id,
              body ? body : "?");
    }
    lua_pop(L, 4);

    /* the scope has closed: the arena's release is counted apart, never lost */
    lunet_mem_scope_stats_t before, after;
    lunet_mem_scope_stats(req->scope, &before);
    CHECK(before.closed && before.c_bytes == req->arena_bytes, "request %d: closed %d", req->id,
          before.closed);
    lunet_request_arena_stats_t as;
    lunet_request_arena_stats(req->arena, &as);
    CHECK((int64_t)as.bytes == req->arena_bytes && (int64_t)as.blocks == req->arena_blocks,
          "request %d: arena bytes %llu", req->id, (unsigned long long)as.bytes);
    lunet_request_arena_destroy(req->arena);
    lunet_mem_scope_stats(req->scope, &after);
    CHECK(after.c_bytes == before.c_bytes && after.late_bytes == -req->arena_bytes &&
              (int64_t)after.late_frees == req->arena_blocks,
          "request %d: late bytes %lld", req->id, (long long)after.late_bytes);
    lunet_mem_scope_release(req->scope);
    luaL_unref(L, LUA_REGISTRYINDEX, req->co_ref);
    lunet_free(req);
    requests_done++;
}

static lua_State *request_L;

static void resume_request(request_t *req, int nargs) {
    int nres = 0;
    int status = lunet_mem_resume(request_L, req->co, nargs, &nres);
    CHECK(status == LUA_OK || status == LUA_YIELD, "resume: %s", lua_tostring(req->co, -1));
    lua_pop(req->co, nres);
    if (status == LUA_OK) finish_request(request_L, req);
}

static void rows_done(uv_work_t *w, int status) {
    CHECK(status == 0, "status %d", status);
    resume_request(w->data, 0);
    /* between resumes the loop thread allocates too: not the requests' */
    lua_newtable(request_L);
    lua_pop(request_L, 1);
}

static void run_requests(int n) {
    uv_loop_t loop;
    CHECK(uv_loop_init(&loop) == 0, "uv_loop_init");
    request_loop = &loop;
    host_heap_t heap = {0};
    lua_State *L = request_L = new_state(&heap);
    luaL_openlibs(L);
    CHECK(lunet_mem_install(L) == 0, "lunet_mem_install");
    lua_register(L, "begin_request", l_begin_request);
    lua_register(L, "request_rows", l_request_rows);
    if (luaL_dostring(L, REQUEST_CODE) != 0) CHECK(0, "%s", lua_tostring(L, -1));
    lua_gc(L, LUA_GCSTOP, 0); /* so that every request sees the same collector */
    CHECK(lunet_mem_scope_current(L) == NULL, "no scope outside the requests");

    for (int i = 1; i <= n; i++) {
        request_t *req = lunet_malloc(sizeof *req);
        CHECK(req != NULL, "out of memory");
        memset(req, 0, sizeof *req);
        req->id = i;
        req->kind = i % 10 == 3 ? KIND_C_OVER_BUDGET : i % 10 == 7 ? KIND_LUA_OVER_BUDGET : KIND_OK;
        req->work.data = req;
        req->co = lua_newthread(L);
        req->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_getglobal(req->co, "serve");
        lua_pushlightuserdata(req->co, req);
        lua_pushinteger(req->co, i);
        lua_pushinteger(req->co, req->kind == KIND_OK ? 1000000 : 40000);
        lua_pushinteger(req->co, req->kind);
        resume_request(req, 4); /* parses, queues the worker, yields */
    }
    CHECK(uv_run(&loop, UV_RUN_DEFAULT) == 0, "uv_run");
    CHECK(requests_done == n, "%d of %d requests done", requests_done, n);
    CHECK(uv_loop_close(&loop) == 0, "uv_loop_close");
    lua_gc(L, LUA_GCRESTART, 0);
    lua_getglobal(L, "check_lua");
    lua_pushinteger(L, n);
    if (lua_pcall(L, 1, 0, 0) != 0) CHECK(0, "%s", lua_tostring(L, -1));
    close_state(L, &heap);
}

int main(int argc, char **argv) {
    int items = argc > 1 ? atoi(argv[1]) : 100000;
    int requests = argc > 2 ? atoi(argv[2]) : 2000;
    run_loop(items);
    run_entry_points();
    run_lua(50);
    lunet_mem_checkpoint_t cp = lunet_mem_checkpoint();
    run_requests(requests);
    lunet_mem_assert_neutral(&cp, "after the requests");
    lunet_mem_report(stdout);
    printf("uv_proof (%s): %d work items, 50 Lua requests, %d requests with C and Lua in one "
           "ledger: ok\n", LUA_RELEASE, items, requests);
    return 0;
}
