/*
** lunet_mem.h: memory tracking for a Lua runtime's own C code, from the lunet-mem library
** (the Rust crate that also builds the `lunet.mem` Lua module).
**
** Link with the static library (target/<...>/release/liblunet_mem.a, built with
** `cargo build --release --no-default-features --features lua54,module`, or the Lua version the
** runtime uses) plus -lpthread -ldl -lm and the Lua library.
**
** Define LUNET_TRACE to track: lunet_malloc/lunet_free then count every block by thread and by
** call site (file:line), worker arenas serve the blocks of libuv worker threads, and bad use
** (double free, a pointer lunet_malloc did not make, an arena end without begin, a block that
** escapes its arena) prints what happened and where, then aborts. Without LUNET_TRACE the
** macros are plain malloc/realloc/free and no-ops: nothing is left in a release build.
**
** The Lua side (lunet_mem_install, lunet_mem_resume, lunet_mem_live_bytes) is always real.
*/
#ifndef LUNET_MEM_H
#define LUNET_MEM_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lua_State lua_State;

/* ---- Lua states ---------------------------------------------------------------------------- */

/* Wraps the allocator of L (a state the runtime created) with the tracking allocator, once, and
** sets package.preload["lunet.mem"], so that a script's require "lunet.mem" gets the same
** tracker from this library (never a second copy). Call after luaL_openlibs. Returns 0, or -1
** when L has no package library. Memory errors are raised as Lua errors (call it where the
** runtime handles those, or in lua_pcall). */
int lunet_mem_install(lua_State *L);

/* lua_resume with Lua 5.4's signature on every Lua version, for runtimes that resume coroutines
** from C: while co runs, its own mem.scope scopes are active (or, with none, the resumer's);
** when it yields or ends, the resumer's scope is active again. Same contract as
** lua_resume(co, L, nargs, nres): L is the running thread (the "from" state). */
int lunet_mem_resume(lua_State *L, lua_State *co, int nargs, int *nres);

/* The same as two calls around the runtime's own lua_resume: lunet_mem_enter before (returns 1
** when lunet_mem_leave must follow), lunet_mem_leave after it returned (yield, end or error). */
int lunet_mem_enter(lua_State *L, lua_State *co);
void lunet_mem_leave(lua_State *L, lua_State *co);

/* Bytes the state has allocated (mem.stats().live_bytes), or -1 if the tracker is not
** installed on it. */
int64_t lunet_mem_live_bytes(lua_State *L);

/* ---- Tracked C allocations ------------------------------------------------------------------ */

/* Process totals of the blocks made by lunet_malloc. peak_bytes is the largest live size one
** thread saw (threads may free each other's blocks). */
typedef struct lunet_mem_stats_t {
    uint64_t allocs, frees, bytes_allocated, bytes_freed;
    int64_t live_bytes, peak_bytes;
} lunet_mem_stats_t;

/* A point to compare with later: process totals and which checkpoint it was. */
typedef struct lunet_mem_checkpoint_t {
    uint64_t allocs, frees, bytes_allocated, bytes_freed, id;
} lunet_mem_checkpoint_t;

/* A call site's slot: a zero-initialised static at the call, which remembers the site after
** its first call so that later calls look nothing up. With gcc and clang the macros make one
** per call (a static in a statement expression); define LUNET_MEM_NO_SITE_SLOTS to call the _at
** forms instead (e.g. for lunet_malloc in an inline function that is not static, which may not
** hold a static). */
typedef struct lunet_mem_site_t {
    uintptr_t id;
} lunet_mem_site_t;

/* The functions behind the macros (call the macros). Blocks are 16-byte aligned; malloc and
** realloc return NULL when out of memory. Inside a worker arena (lunet_worker_arena_begin on the
** same thread), blocks come from the arena. The _site forms take the call site's slot (used
** only for that file:line; NULL: none), the _at forms find the site from file:line.
** free: a double free aborts with "already freed" as long as the memory was not reused: each
** thread holds its last 256 freed blocks back, then keeps blocks of up to 1 KiB (header
** included) in a cache of up to 64 KiB, still marked freed, that lunet_malloc on that thread
** reuses first (so a thread holds at most 64 KiB plus 256 blocks of freed memory). */
void *lunet_mem_malloc_site(size_t size, lunet_mem_site_t *site, const char *file, int line);
void *lunet_mem_realloc_site(void *p, size_t size, lunet_mem_site_t *site, const char *file,
                             int line);
void *lunet_mem_malloc_at(size_t size, const char *file, int line);
void *lunet_mem_realloc_at(void *p, size_t size, const char *file, int line);
void lunet_mem_free_at(void *p, const char *file, int line);

/* Worker arenas (thread-local, nested begin/end allowed). begin: lunet_malloc on this thread
** bump-allocates in a fresh arena (size_hint: its first chunk). end: returns the number of the
** arena's blocks still live (escaped), naming their sites; aborts on an escape unless
** allow_escape is nonzero; then releases the arena's memory at once (poisoned with 0xde first if
** poisoning is on: the default in debug builds of the library, or lunet_mem_set_poisoning(1)).
** Freeing an arena block with lunet_free before the end is accounted; after the end it aborts
** with "escaped a worker arena" as long as the memory was not reused by a later arena. */
void lunet_mem_arena_begin(size_t size_hint, const char *file, int line);
int64_t lunet_mem_arena_end_at(int allow_escape, const char *file, int line);
void lunet_mem_set_poisoning(int on);

/* Checkpoints. take: the totals now (the per-site figures of the last 64 checkpoints are kept).
** check: 1 if there were as many frees as allocations and bytes freed as allocated since cp,
** else 0, printing (if report) allocs, frees, bytes and the sites whose live blocks grew.
** assert: check with report, then abort if not neutral. Counts are process-wide: take and check
** them where worker threads are quiet. */
lunet_mem_checkpoint_t lunet_mem_checkpoint_take(void);
int lunet_mem_check_neutral(const lunet_mem_checkpoint_t *cp, const char *ctx, int report);
void lunet_mem_assert_neutral_at(const lunet_mem_checkpoint_t *cp, const char *ctx,
                                 const char *file, int line);

/* Totals, and a report of allocs, frees and live bytes by file:line (to f, or stderr if NULL). */
void lunet_mem_c_stats(lunet_mem_stats_t *out);
void lunet_mem_report(FILE *f);

#ifdef LUNET_TRACE
#if (defined(__GNUC__) || defined(__clang__)) && !defined(LUNET_MEM_NO_SITE_SLOTS)
/* A static slot per call (a statement expression, a GNU C extension that gcc and clang have). */
#define lunet_malloc(n)                                                                        \
    (__extension__({                                                                          \
        static lunet_mem_site_t lunet_mem_site_;                                              \
        lunet_mem_malloc_site((n), &lunet_mem_site_, __FILE__, __LINE__);                     \
    }))
#define lunet_realloc(p, n)                                                                    \
    (__extension__({                                                                          \
        static lunet_mem_site_t lunet_mem_site_;                                              \
        lunet_mem_realloc_site((p), (n), &lunet_mem_site_, __FILE__, __LINE__);               \
    }))
#else
#define lunet_malloc(n) lunet_mem_malloc_at((n), __FILE__, __LINE__)
#define lunet_realloc(p, n) lunet_mem_realloc_at((p), (n), __FILE__, __LINE__)
#endif
#define lunet_free(p) lunet_mem_free_at((p), __FILE__, __LINE__)
#define lunet_worker_arena_begin(n) lunet_mem_arena_begin((n), __FILE__, __LINE__)
#define lunet_worker_arena_end() ((void)lunet_mem_arena_end_at(0, __FILE__, __LINE__))
#define lunet_mem_checkpoint() lunet_mem_checkpoint_take()
#define lunet_mem_assert_neutral(cp, ctx) lunet_mem_assert_neutral_at((cp), (ctx), __FILE__, __LINE__)
#else
#define lunet_malloc(n) malloc(n)
#define lunet_realloc(p, n) realloc((p), (n))
#define lunet_free(p) free(p)
#define lunet_worker_arena_begin(n) ((void)(n))
#define lunet_worker_arena_end() ((void)0)
#define lunet_mem_checkpoint() ((lunet_mem_checkpoint_t){0, 0, 0, 0, 0})
#define lunet_mem_assert_neutral(cp, ctx) ((void)(cp), (void)(ctx))
#endif

#ifdef __cplusplus
}
#endif

#endif /* LUNET_MEM_H */
