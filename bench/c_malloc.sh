#!/usr/bin/env bash
# Tracked C allocation and worker arenas against glibc malloc, in one run: bash bench/c_malloc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --no-default-features --features lua54,module --target-dir target/c-lua54 >&2
mkdir -p target/c
gcc -std=c11 -D_DEFAULT_SOURCE -O2 -Wall -Wextra -Iinclude bench/c_malloc.c -o target/c/c_malloc \
  target/c-lua54/release/liblunet_mem.a -llua5.4 -lpthread -ldl -lm
target/c/c_malloc
