/*
** The C side under load: a libuv loop running many uv_queue_work items whose worker threads use
** worker arenas and tracked buffers, checkpoints on the loop thread, and a Lua state with the
** module installed from C running request handlers in coroutines resumed with
** lunet_mem_resume. Exits 0 when every check holds; run plain, under ASan+LSan and valgrind by
** scripts/c-tests.sh.
**
**   uv_proof [work_items]      (default 100000)
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
    lua_State *L = luaL_newstate();
    CHECK(L != NULL, "luaL_newstate");
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
    lua_close(L);
}

int main(int argc, char **argv) {
    int items = argc > 1 ? atoi(argv[1]) : 100000;
    run_loop(items);
    run_entry_points();
    run_lua(50);
    lunet_mem_report(stdout);
    printf("uv_proof: %d work items and 50 Lua requests: ok\n", items);
    return 0;
}
