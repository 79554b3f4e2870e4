/* What the C benchmarks (bench/c_malloc.c, bench/c_arena.c) share: a monotonic clock in seconds. */
#ifndef LUNET_BENCH_CLOCK_H
#define LUNET_BENCH_CLOCK_H

#include <time.h>

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#endif
