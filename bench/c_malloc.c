/*
** Tracked lunet_malloc/lunet_free and worker-arena allocation against glibc malloc/free, side by
** side in one run (best of 9 rounds each, interleaved). Built and run by bench/c_malloc.sh.
** Also the entry point without a call-site slot (lunet_mem_malloc_at: what the macros call with
** a compiler that has no statement expressions).
*/
#define LUNET_TRACE
#include <stdio.h>
#include <stdlib.h>

#include "bench_clock.h"
#include "lunet_mem.h"

#define N 2000000
#define LIVE 64

static size_t size_of(unsigned i) { return 16 + (i * 2654435761u >> 24) % 240; }

/* A working set of LIVE blocks, each replaced in turn: allocate, touch, free. */
static double run_malloc(void) {
    void *slot[LIVE] = {0};
    double t = now();
    for (unsigned i = 0; i < N; i++) {
        free(slot[i % LIVE]);
        slot[i % LIVE] = malloc(size_of(i));
        *(volatile char *)slot[i % LIVE] = 1;
    }
    for (int i = 0; i < LIVE; i++) free(slot[i]);
    return now() - t;
}

static double run_tracked(void) {
    void *slot[LIVE] = {0};
    double t = now();
    for (unsigned i = 0; i < N; i++) {
        lunet_free(slot[i % LIVE]);
        slot[i % LIVE] = lunet_malloc(size_of(i));
        *(volatile char *)slot[i % LIVE] = 1;
    }
    for (int i = 0; i < LIVE; i++) lunet_free(slot[i]);
    return now() - t;
}

static double run_tracked_at(void) {
    void *slot[LIVE] = {0};
    double t = now();
    for (unsigned i = 0; i < N; i++) {
        lunet_free(slot[i % LIVE]);
        slot[i % LIVE] = lunet_mem_malloc_at(size_of(i), __FILE__, __LINE__);
        *(volatile char *)slot[i % LIVE] = 1;
    }
    for (int i = 0; i < LIVE; i++) lunet_free(slot[i]);
    return now() - t;
}

/* A work item's scratch: 64 allocations in an arena released at once. */
static double run_arena(void) {
    double t = now();
    for (unsigned i = 0; i < N / LIVE; i++) {
        lunet_worker_arena_begin(16 * 1024);
        for (unsigned j = 0; j < LIVE; j++) {
            void *p = lunet_malloc(size_of(i * LIVE + j));
            *(volatile char *)p = 1;
            lunet_free(p);
        }
        lunet_worker_arena_end();
    }
    return now() - t;
}

/* The same work item with glibc: 64 malloc/free pairs. */
static double run_malloc_item(void) {
    double t = now();
    for (unsigned i = 0; i < N / LIVE; i++) {
        for (unsigned j = 0; j < LIVE; j++) {
            void *p = malloc(size_of(i * LIVE + j));
            *(volatile char *)p = 1;
            free(p);
        }
    }
    return now() - t;
}

int main(void) {
    double best[5] = {1e9, 1e9, 1e9, 1e9, 1e9};
    for (int round = 0; round < 9; round++) {
        double t[5] = {run_malloc(), run_tracked(), run_malloc_item(), run_arena(),
                       run_tracked_at()};
        for (int k = 0; k < 5; k++) if (t[k] < best[k]) best[k] = t[k];
    }
    printf("glibc malloc/free        %6.1f ns per pair\n", best[0] / N * 1e9);
    printf("lunet_malloc/lunet_free  %6.1f ns per pair   %.2fx of malloc\n", best[1] / N * 1e9,
           best[1] / best[0]);
    printf("  without a site slot  %6.1f ns per pair   %.2fx of malloc\n", best[4] / N * 1e9,
           best[4] / best[0]);
    printf("glibc, per work item     %6.1f ns per pair\n", best[2] / N * 1e9);
    printf("worker arena, per item   %6.1f ns per pair   %.2fx of malloc\n", best[3] / N * 1e9,
           best[3] / best[2]);
    return 0;
}
