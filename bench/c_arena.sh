#!/usr/bin/env bash
# Request arenas against malloc/free per buffer, and charging a Lua scope from another thread, in
# one run: bash bench/c_arena.sh   (bench/c_arena.c says what each figure measures)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --no-default-features --features lua54,module --target-dir target/c-lua54 >&2
mkdir -p target/c
gcc -std=c11 -D_DEFAULT_SOURCE -O2 -Wall -Wextra -Werror -Iinclude -I/usr/include/lua5.4 \
  bench/c_arena.c -o target/c/c_arena target/c-lua54/release/liblunet_mem.a -llua5.4 -lpthread \
  -ldl -lm
target/c/c_arena
