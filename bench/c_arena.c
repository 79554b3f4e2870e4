/*
** A request's C buffers from a request arena against malloc/free per buffer, and the cost of
** charging a Lua scope from another thread, in one run (best of 9 interleaved rounds). Built and
** run by bench/c_arena.sh. Everything runs inside a mem.scope of a real Lua state: the scope
** handle comes from lunet_mem_scope_current, as a runtime gets it.
**
**   request buffers   per request: BUFFERS buffers of 32..543 bytes, then all released: glibc
**                     malloc + free per buffer; a request arena (create, alloc, destroy)
**                     charged to no scope; the same charged to the request's scope. Twice: each
**                     buffer touched at its first byte (the allocators alone, as
**                     bench/c_malloc.c measures), then each buffer written whole (what a
**                     request does with its buffers: the same memset on both sides).
**   charging          a second thread calls lunet_mem_charge(s, +n) then (s, -n) on the
**                     request's scope, while the loop thread waits, then while it runs Lua in
**                     that scope (allocating tables: the same scope's Lua counters move at the
**                     same time); beside it, the same loop of one bare atomic addition (C11
**                     atomic_fetch_add) per charge in the same conditions, to calibrate the
**                     machine (on a shared 2-core machine the second case varies from run to
**                     run with what else runs).
*/
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_clock.h"
#include "lunet_mem.h"

#define REQUESTS 100000
#define BUFFERS 16
#define CHARGES 10000000

static size_t size_of(unsigned i) { return 32 + (i * 2654435761u >> 20) % 512; }

static void touch(char *p, size_t n, int whole) {
    if (whole)
        memset(p, 1, n);
    else
        *(volatile char *)p = 1;
}

static double run_malloc(int whole) {
    void *buf[BUFFERS];
    double t = now();
    for (unsigned r = 0; r < REQUESTS; r++) {
        for (unsigned j = 0; j < BUFFERS; j++) {
            size_t n = size_of(r * BUFFERS + j);
            buf[j] = malloc(n);
            touch(buf[j], n, whole);
        }
        for (unsigned j = 0; j < BUFFERS; j++) free(buf[j]);
    }
    return now() - t;
}

static double run_arena(lunet_mem_scope_t *s, int whole) {
    double t = now();
    for (unsigned r = 0; r < REQUESTS; r++) {
        lunet_request_arena_t *a = lunet_request_arena_create(s, "GET /users");
        for (unsigned j = 0; j < BUFFERS; j++) {
            size_t n = size_of(r * BUFFERS + j);
            touch(lunet_request_alloc(a, n), n, whole);
        }
        lunet_request_arena_destroy(a);
    }
    return now() - t;
}

typedef struct charger {
    lunet_mem_scope_t *s; /* NULL: the bare atomic addition */
    double seconds;
    atomic_int done;
} charger_t;

static _Alignas(64) _Atomic int64_t bare_counter;

static void *charge_loop(void *arg) {
    charger_t *c = arg;
    double t = now();
    if (c->s != NULL) {
        for (int i = 0; i < CHARGES / 2; i++) {
            if (lunet_mem_charge(c->s, 64) != 0 || lunet_mem_charge(c->s, -64) != 0) abort();
        }
    } else {
        for (int i = 0; i < CHARGES / 2; i++) {
            atomic_fetch_add_explicit(&bare_counter, 64, memory_order_relaxed);
            atomic_fetch_add_explicit(&bare_counter, -64, memory_order_relaxed);
        }
    }
    c->seconds = now() - t;
    atomic_store(&c->done, 1);
    return NULL;
}

/* Charges s (or the bare counter) from another thread, while this thread waits or runs Lua in
** the scope. */
static double run_charges(lua_State *L, lunet_mem_scope_t *s, int lua_runs) {
    charger_t c = {s, 0, 0};
    pthread_t th;
    if (pthread_create(&th, NULL, charge_loop, &c) != 0) abort();
    while (lua_runs && !atomic_load(&c.done)) {
        lua_getglobal(L, "busy");
        lua_call(L, 0, 0);
    }
    pthread_join(th, NULL);
    return c.seconds;
}

/* The C function the Lua scope calls: every measurement, with the scope's handle. */
static int l_bench(lua_State *L) {
    lunet_mem_scope_t *s = lunet_mem_scope_current(L);
    if (s == NULL) return luaL_error(L, "no scope");
    enum { RUNS = 10 };
    double best[RUNS];
    for (int k = 0; k < RUNS; k++) best[k] = 1e9;
    for (int round = 0; round < 9; round++) {
        double t[RUNS] = {run_malloc(0),           run_arena(NULL, 0),      run_arena(s, 0),
                          run_malloc(1),           run_arena(NULL, 1),      run_arena(s, 1),
                          run_charges(L, s, 0),    run_charges(L, NULL, 0), run_charges(L, s, 1),
                          run_charges(L, NULL, 1)};
        for (int k = 0; k < RUNS; k++)
            if (t[k] < best[k]) best[k] = t[k];
    }
    lunet_mem_scope_stats_t st;
    lunet_mem_scope_stats(s, &st);
    if (st.c_bytes != 0) return luaL_error(L, "c_bytes %lld after the runs", (long long)st.c_bytes);
    double per = (double)REQUESTS * BUFFERS;
    for (int whole = 0; whole <= 1; whole++) {
        const double *b = best + 3 * whole;
        printf("request buffers (%d per request, 32..543 bytes, %s):\n", BUFFERS,
               whole ? "each written whole" : "each touched at its first byte");
        printf("  glibc malloc + free per buffer   %6.1f ns per buffer\n", b[0] / per * 1e9);
        printf("  request arena, no scope          %6.1f ns per buffer   %.2fx of malloc\n",
               b[1] / per * 1e9, b[1] / b[0]);
        printf("  request arena, charged to scope  %6.1f ns per buffer   %.2fx of malloc\n",
               b[2] / per * 1e9, b[2] / b[0]);
    }
    for (int lua_runs = 0; lua_runs <= 1; lua_runs++) {
        const double *b = best + 6 + 2 * lua_runs;
        printf("charging the scope from another thread, the loop thread %s:\n",
               lua_runs ? "running Lua in the scope" : "waiting");
        printf("  lunet_mem_charge                 %6.2f ns per charge\n", b[0] / CHARGES * 1e9);
        printf("  a bare atomic addition           %6.2f ns per addition\n", b[1] / CHARGES * 1e9);
    }
    printf("(%llu charges counted in the scope, none left)\n",
           (unsigned long long)st.c_allocs + st.c_frees);
    lunet_mem_scope_release(s);
    return 0;
}

int main(void) {
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    if (lunet_mem_install(L) != 0) abort();
    lua_register(L, "bench", l_bench);
    const char *code = "local mem = require 'lunet.mem'\n"
                       "function busy() local t = {} for i = 1, 1000 do t[i] = { i } end end\n"
                       "mem.scope('bench', bench)\n";
    if (luaL_dostring(L, code) != 0) {
        fprintf(stderr, "%s\n", lua_tostring(L, -1));
        return 1;
    }
    lua_close(L);
    return 0;
}
