#!/usr/bin/env bash
# The C API's proof (the design report's phase 1: `make sanitize`): builds the module's static
# library for Lua 5.4 and the Lua-free C library (crates/lunet-mem-c), then tests/c/uv_proof.c
# (libuv work items with worker arenas and tracked buffers, checkpoints, a Lua state resumed from
# C, and the request path with one ledger for Lua and C: request arenas, worker arenas begun in
# a request's scope, exact C figures per request, budgets on both sides) and tests/c/misuse.c,
# and runs them
#   plain       bash scripts/c-tests.sh plain      (the exports check too)
#   under ASan  bash scripts/c-tests.sh asan       (gcc -fsanitize=address, LeakSanitizer on)
#   valgrind    bash scripts/c-tests.sh valgrind   (memcheck: 0 errors, 0 bytes definitely lost)
#   misuse      bash scripts/c-tests.sh misuse     (each bad use aborts with a clear message,
#                                                   linked with either library)
#   symbols     bash scripts/c-tests.sh symbols    (tests/c/exports.sh: the exports match
#                                                   include/lunet_mem.h)
#   Lua 5.5     bash scripts/c-tests.sh lua55      (the proof, plain, on Lua 5.5 built by
#                                                   scripts/lua55.sh: lua_newstate with a seed)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-plain}
out=target/c
mkdir -p "$out"
lua_feature=lua54
cflags_lua=(-I/usr/include/lua5.4)
liblua=(-llua5.4)
if [ "$mode" = lua55 ]; then
  bash scripts/lua55.sh >&2
  lua_feature=lua55
  cflags_lua=(-I.lua55/include)
  liblua=(.lua55/build/liblua.a)
fi
cargo build --release --locked --no-default-features --features "$lua_feature,module" \
  --target-dir "target/c-$lua_feature" >&2
cargo build --release --locked -p lunet-mem-c --target-dir target/c-lua54 >&2
lib=target/c-$lua_feature/release/liblunet_mem.a
# The tracked malloc alone: what C code without Lua links.
c_only_lib=target/c-lua54/release/liblunet_mem_c.a
cflags=(-std=c11 -D_DEFAULT_SOURCE -Wall -Wextra -Werror -g -Iinclude "${cflags_lua[@]}")
libs=("$lib" -luv "${liblua[@]}" -lpthread -ldl -lm)

check_exports() {
  bash tests/c/exports.sh target/c-lua54/release/liblunet_mem.so \
    target/c-lua54/release/liblunet_mem_c.so
}

case "$mode" in
  symbols) check_exports ;;
  plain)
    check_exports
    gcc "${cflags[@]}" -O2 tests/c/uv_proof.c -o "$out/uv_proof" "${libs[@]}"
    "$out/uv_proof" "${2:-100000}" ;;
  lua55)
    gcc "${cflags[@]}" -O2 tests/c/uv_proof.c -o "$out/uv_proof55" "${libs[@]}"
    "$out/uv_proof55" "${2:-100000}" ;;
  asan)
    gcc "${cflags[@]}" -O1 -fsanitize=address -fno-omit-frame-pointer tests/c/uv_proof.c \
      -o "$out/uv_proof_asan" "${libs[@]}"
    # Lua's blocks from the host allocator (glibc, which ASan instruments), not mimalloc.
    LUNET_MEM_ALLOCATOR=host ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
      "$out/uv_proof_asan" "${2:-100000}" ;;
  valgrind)
    gcc "${cflags[@]}" -O1 tests/c/uv_proof.c -o "$out/uv_proof_vg" "${libs[@]}"
    valgrind --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite \
      --show-leak-kinds=definite "$out/uv_proof_vg" "${2:-20000}" ;;
  misuse)
    gcc "${cflags[@]}" -O1 tests/c/misuse.c -o "$out/misuse" "${libs[@]}"
    gcc "${cflags[@]}" -O1 tests/c/misuse.c -o "$out/misuse_c_only" "$c_only_lib" -lpthread -ldl -lm
    expect() {
      local case=$1 text=$2 err status bin
      for bin in misuse misuse_c_only; do
        set +e
        err=$("$out/$bin" "$case" 2>&1 >/dev/null)
        status=$?
        set -e
        if [ "$status" -lt 128 ] || ! grep -qF -- "$text" <<<"$err"; then
          echo "$bin $case: status $status, expected an abort with: $text"
          echo "$err"
          return 1
        fi
        echo "$bin $case: aborted with: $(head -n 1 <<<"$err")"
      done
    }
    expect double-free "already freed (allocated at tests/c/misuse.c:"
    expect double-free-late "already freed (allocated at tests/c/misuse.c:"
    expect realloc-freed "already freed (allocated at tests/c/misuse.c:"
    expect foreign-free "not a block from lunet_malloc"
    expect interior-free "not a block from lunet_malloc"
    expect end-without-begin "worker arena end without begin at tests/c/misuse.c:"
    expect escape "1 block(s), 48 byte(s) escaped"
    expect escape-then-free "escaped a worker arena that has ended"
    expect reset-then-free "escaped a worker arena that has ended"
    expect request-free "a block of request arena 'GET /users': its blocks are released with the arena"
    expect request-free-destroyed "a block of a request arena that was destroyed"
    expect request-realloc-foreign "not a live block of request arena 'POST /login'"
    expect arena-free-other-thread "a worker arena's block, freed on another thread"
    expect leak "MEMORY LEAK at request 42: allocs=1 frees=0"
    ;;
  *) echo "usage: scripts/c-tests.sh plain|asan|valgrind|misuse|symbols|lua55" >&2; exit 2 ;;
esac
