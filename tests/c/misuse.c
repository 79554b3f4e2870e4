/*
** Bad use of the C API must print what happened and where, then abort (never corrupt memory
** silently). scripts/c-tests.sh runs each case and checks the message.
**
**   misuse double-free|double-free-late|realloc-freed|foreign-free|interior-free|
**          end-without-begin|escape|escape-then-free|reset-then-free|arena-free-other-thread|
**          leak|request-free|request-free-destroyed|request-realloc-foreign
*/
#define LUNET_TRACE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lunet_mem.h"

static void *free_on_this_thread(void *p) {
    lunet_free(p);
    return NULL;
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    if (strcmp(what, "double-free") == 0) {
        void *p = lunet_malloc(10);
        lunet_free(p);
        lunet_free(p);
    } else if (strcmp(what, "double-free-late") == 0) {
        /* long after the first free: the block left the quarantine (for the thread's cache) */
        void *p = lunet_malloc(10);
        lunet_free(p);
        for (int i = 0; i < 1000; i++) lunet_free(lunet_malloc(500));
        lunet_free(p);
    } else if (strcmp(what, "realloc-freed") == 0) {
        void *p = lunet_malloc(10);
        lunet_free(p);
        p = lunet_realloc(p, 20);
    } else if (strcmp(what, "foreign-free") == 0) {
        void *p = malloc(64);
        lunet_free(p);
    } else if (strcmp(what, "interior-free") == 0) {
        char *p = lunet_malloc(64);
        lunet_free(p + 16);
    } else if (strcmp(what, "end-without-begin") == 0) {
        lunet_worker_arena_end();
    } else if (strcmp(what, "escape") == 0) { /* the strict end */
        lunet_worker_arena_begin(1024);
        void *kept = lunet_malloc(48);
        (void)kept;
        lunet_worker_arena_end_neutral();
    } else if (strcmp(what, "reset-then-free") == 0) { /* the reset released it: escaped */
        lunet_worker_arena_begin(1024);
        void *kept = lunet_malloc(48);
        lunet_worker_arena_end();
        lunet_free(kept);
    } else if (strcmp(what, "request-free") == 0) {
        lunet_request_arena_t *a = lunet_request_arena_create(NULL, "GET /users");
        void *p = lunet_request_alloc(a, 100);
        lunet_free(p);
    } else if (strcmp(what, "request-free-destroyed") == 0) {
        lunet_request_arena_t *a = lunet_request_arena_create(NULL, "GET /users");
        void *p = lunet_request_alloc(a, 100);
        lunet_request_arena_destroy(a);
        lunet_free(p);
    } else if (strcmp(what, "request-realloc-foreign") == 0) {
        lunet_request_arena_t *a = lunet_request_arena_create(NULL, "POST /login");
        lunet_request_arena_t *b = lunet_request_arena_create(NULL, "GET /other");
        void *p = lunet_request_alloc(b, 100);
        lunet_request_realloc(a, p, 200);
    } else if (strcmp(what, "escape-then-free") == 0) {
        lunet_worker_arena_begin(1024);
        void *kept = lunet_malloc(48);
        lunet_mem_arena_end_at(1, __FILE__, __LINE__); /* allowed: reported, not fatal */
        lunet_free(kept);
    } else if (strcmp(what, "arena-free-other-thread") == 0) {
        pthread_t t;
        lunet_worker_arena_begin(1024);
        void *p = lunet_malloc(48);
        pthread_create(&t, NULL, free_on_this_thread, p);
        pthread_join(t, NULL);
        lunet_worker_arena_end();
    } else if (strcmp(what, "leak") == 0) {
        lunet_mem_checkpoint_t cp = lunet_mem_checkpoint();
        void *kept = lunet_malloc(100);
        (void)kept;
        lunet_mem_assert_neutral(&cp, "request 42");
    } else {
        fprintf(stderr, "misuse: unknown case '%s'\n", what);
        return 2;
    }
    return 0; /* not reached for the bad uses */
}
