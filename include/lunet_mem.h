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
** (double free, a pointer lunet_malloc did not make, a request arena's block, an arena end
** without begin, a free of a block its worker arena released, a block left in an arena that
** ends with the strict check) prints what happened and where, then aborts. Without LUNET_TRACE
** the macros are plain malloc/realloc/free and no-ops: nothing is left in a release build.
**
** The Lua side (lunet_mem_install, lunet_mem_resume, lunet_mem_live_bytes), the scope handles
** (lunet_mem_scope_current, lunet_mem_charge, ...) and the request arenas (lunet_request_*) are
** real in every build, with or without LUNET_TRACE.
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

/* ---- One ledger: a Lua scope's account for C memory ---------------------------------------- */

/* A handle on the C account of a Lua scope (mem.scope): what C code charges its memory to, so
** that the scope's stats (scope:stats().c_bytes, c_bytes_allocated, c_bytes_freed, c_allocs,
** c_frees, c_peak_bytes; on_exit sees them) count it, the scopes it was opened in count it too,
** and the scope's limit covers Lua and C bytes together. Reference counted: valid until its last
** reference is released, on any thread, whether its scope is open or closed. */
typedef struct lunet_mem_scope_t lunet_mem_scope_t;

/* The innermost scope of the coroutine running in L (the scope its allocations go to now), with
** a new reference the caller releases with lunet_mem_scope_release; NULL when no scope is active
** or the tracker is not installed on L. Call on the thread that runs L (a C function called by
** the request's coroutine is the usual place). Allocates only the first time a scope is asked
** for (its account and those of the scopes it was opened in). */
lunet_mem_scope_t *lunet_mem_scope_current(lua_State *L);

/* One more reference to s (returns s; NULL: NULL), for another owner. Any thread. */
lunet_mem_scope_t *lunet_mem_scope_retain(lunet_mem_scope_t *s);

/* Releases one reference (NULL: nothing). Any thread; the scope may be open or closed. */
void lunet_mem_scope_release(lunet_mem_scope_t *s);

/* Memory the runtime allocates with its own allocator for the scope s: bytes > 0 charges one
** block of that size, bytes < 0 releases one. Returns 0, or -1 (nothing counted) when s is NULL
** or when a charge would take s, or an open scope it was opened in, past its limit: the limit
** bounds the scope's kept Lua bytes (what mem.scope's limit counts) plus its live C bytes.
** Any thread, concurrently with Lua running on the loop thread: the charge is a few atomic
** additions on the scope's account and those above it; the Lua allocation hook pays nothing
** for it. Concurrent C charges never pass a limit together; a C charge and a Lua allocation at
** the same moment may pass it by that one allocation. A charge to a closed scope is counted
** apart (late_bytes, late_allocs, late_frees below) and still rolls up to the open scopes
** above it. */
int lunet_mem_charge(lunet_mem_scope_t *s, int64_t bytes);

/* The C figures of s: live C bytes (c_bytes = c_bytes_allocated - c_bytes_freed), blocks
** charged and released, the peak of c_bytes, charges after the scope closed (late_*), charges a
** limit refused (refusals), the scope's limit (INT64_MAX: none), whether it is closed. Counted
** while the scope was open; rolled up from the scopes opened in it. NULL s: all zero. */
typedef struct lunet_mem_scope_stats_t {
    int64_t c_bytes;
    uint64_t c_bytes_allocated, c_bytes_freed, c_allocs, c_frees;
    int64_t c_peak_bytes, late_bytes;
    uint64_t late_allocs, late_frees, refusals;
    int64_t limit;
    int closed;
} lunet_mem_scope_stats_t;
void lunet_mem_scope_stats(const lunet_mem_scope_t *s, lunet_mem_scope_stats_t *out);

/* ---- Request arenas (every build) ------------------------------------------------------------ */

/* A request's C buffers (its parsed headers, rows a worker builds for it): bump-allocated,
** 16-byte aligned, in 64 KiB chunks from a pool each thread keeps (16 chunks at most; a block
** over 16 KiB gets a chunk of its own), charged to a scope, released all at once. An arena is
** used by one thread at a time (any thread: the loop thread, then a worker while the request
** waits for it). */
typedef struct lunet_request_arena_t lunet_request_arena_t;

typedef struct lunet_request_arena_stats_t {
    uint64_t bytes;       /* bytes of the live blocks (the sizes asked for) */
    uint64_t blocks;      /* live blocks */
    uint64_t chunks;      /* chunks held, and their bytes */
    uint64_t chunk_bytes;
    uint64_t peak_bytes;  /* the highest `bytes` seen */
} lunet_request_arena_stats_t;

/* A new arena charged to s (NULL: to no scope; the arena takes a reference of its own, so the
** caller may release s at once), named name (NULL: ""; copied, cut at 127 bytes, used in
** messages). NULL if out of memory. */
lunet_request_arena_t *lunet_request_arena_create(lunet_mem_scope_t *s, const char *name);

/* A block of n bytes, 16-byte aligned; NULL if the scope's budget refuses it (see
** lunet_mem_charge) or out of memory. Each block is charged as one C block of n bytes. */
void *lunet_request_alloc(lunet_request_arena_t *a, size_t n);

/* p (NULL, or a live block of a) resized to n bytes: in place if it is the arena's last block
** and there is room, else moved (contents copied; the old block's room is reused only when the
** arena is destroyed). n == 0 releases p and returns NULL. NULL if the budget refuses the
** growth or out of memory, and p is then unchanged. Counted as one block released and one made.
** A p that is not a live block of a aborts with a message. */
void *lunet_request_realloc(lunet_request_arena_t *a, void *p, size_t n);

/* The arena's figures (out may be NULL). */
void lunet_request_arena_stats(const lunet_request_arena_t *a, lunet_request_arena_stats_t *out);

/* Releases every block at once and gives the chunks back to this thread's pool: O(chunks), not
** O(blocks); the blocks' bytes are released from the scope in one charge (to a closed scope:
** counted apart, see lunet_mem_charge). With poisoning on (the default in debug builds of the
** library, or lunet_mem_set_poisoning(1)) the memory is overwritten with 0xde first. In a
** LUNET_TRACE build, lunet_free or lunet_realloc of one of its blocks, before or after this,
** aborts naming the request arena (or saying that its arena was destroyed). NULL: nothing. */
void lunet_request_arena_destroy(lunet_request_arena_t *a);

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
** bump-allocates in a fresh arena (size_hint: its first chunk); a nested arena charges the
** scope its enclosing arena charges, if any. begin_in: the same, with the arena's blocks charged
** to the scope s (NULL: none) while they live (a block its budget refuses is NULL); the arena
** holds a reference to s until it ends. end: returns the number of the arena's blocks still live
** (escaped) and releases them, by mode:
**   LUNET_MEM_ARENA_RESET    releases them silently: counted freed at their sites (checkpoints
**                            stay neutral) and released from the scope (what
**                            lunet_worker_arena_end gives);
**   LUNET_MEM_ARENA_NEUTRAL  the strict check: prints them with their sites and aborts (what
**                            lunet_worker_arena_end_neutral gives);
**   LUNET_MEM_ARENA_REPORT   prints them on stderr, then releases them as RESET does.
** Then the arena's memory is released at once (poisoned with 0xde first if poisoning is on: the
** default in debug builds of the library, or lunet_mem_set_poisoning(1); it covers request
** arenas too). Freeing an arena block with lunet_free before the end is accounted; after the end
** it aborts with "escaped a worker arena" as long as the memory was not reused by a later
** arena (the escape detection after release). */
#define LUNET_MEM_ARENA_NEUTRAL 0
#define LUNET_MEM_ARENA_REPORT 1
#define LUNET_MEM_ARENA_RESET 2
void lunet_mem_arena_begin(size_t size_hint, const char *file, int line);
void lunet_mem_arena_begin_in(lunet_mem_scope_t *s, size_t size_hint, const char *file, int line);
int64_t lunet_mem_arena_end_at(int mode, const char *file, int line);
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

/* The macros. With LUNET_TRACE: the tracked functions above; lunet_worker_arena_end() is the
** reset (blocks still in the arena are released) and lunet_worker_arena_end_neutral() the strict
** check (a block still in it aborts). Without LUNET_TRACE: plain malloc/realloc/free, and the
** worker arena macros do nothing (no arena, nothing charged), so a block is released only by
** lunet_free: code built both ways frees what it allocates (the tracing build checks it with
** lunet_worker_arena_end_neutral), or puts a request's buffers in a request arena, which is
** real in every build. */
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
#define lunet_worker_arena_begin_in(s, n) lunet_mem_arena_begin_in((s), (n), __FILE__, __LINE__)
#define lunet_worker_arena_end()                                                              \
    ((void)lunet_mem_arena_end_at(LUNET_MEM_ARENA_RESET, __FILE__, __LINE__))
#define lunet_worker_arena_end_neutral()                                                      \
    ((void)lunet_mem_arena_end_at(LUNET_MEM_ARENA_NEUTRAL, __FILE__, __LINE__))
#define lunet_mem_checkpoint() lunet_mem_checkpoint_take()
#define lunet_mem_assert_neutral(cp, ctx) lunet_mem_assert_neutral_at((cp), (ctx), __FILE__, __LINE__)
#else
#define lunet_malloc(n) malloc(n)
#define lunet_realloc(p, n) realloc((p), (n))
#define lunet_free(p) free(p)
#define lunet_worker_arena_begin(n) ((void)(n))
#define lunet_worker_arena_begin_in(s, n) ((void)(s), (void)(n))
#define lunet_worker_arena_end() ((void)0)
#define lunet_worker_arena_end_neutral() ((void)0)
#define lunet_mem_checkpoint() ((lunet_mem_checkpoint_t){0, 0, 0, 0, 0})
#define lunet_mem_assert_neutral(cp, ctx) ((void)(cp), (void)(ctx))
#endif

#ifdef __cplusplus
}
#endif

#endif /* LUNET_MEM_H */
