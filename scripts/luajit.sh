#!/usr/bin/env bash
# Builds a current LuaJIT 2.1 (the rolling release mlua vendors: the `luajit-src` crate's
# sources, from cargo's registry) as a real interpreter beside Debian's 2.1.0-beta3:
#   bash scripts/luajit.sh       -> .luajit/bin/luajit-current, .luajit/include/*.h
# LuaJIT's own makefile, default options (GC64 on x86-64, its own allocator, -Wl,-E so that C
# modules load). Safe to run again: does nothing when the build is there. The crate is fetched
# first if cargo has not yet (it is in Cargo.lock through mlua's `luajit` feature).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/.luajit
[ -x "$out/bin/luajit-current" ] && [ -f "$out/include/luajit.h" ] && exit 0
registry=${CARGO_HOME:-$HOME/.cargo}/registry/src
find_src() { find "$registry" -maxdepth 2 -type d -name 'luajit-src-*' 2>/dev/null | sort -V | tail -n 1; }
src=$(find_src)
if [ -z "$src" ]; then
  cargo fetch --locked >/dev/null 2>&1 || true
  src=$(find_src)
fi
if [ -z "$src" ] || [ ! -d "$src/luajit2/src" ]; then
  echo "luajit.sh: no luajit-src crate in $registry (cargo fetch)" >&2
  exit 3
fi
rm -rf "$out/build"
mkdir -p "$out/build" "$out/bin" "$out/include"
cp -r "$src/luajit2/." "$out/build/"
# (the release number a git checkout would give, as the crate records it)
cp "$src/luajit_relver.txt" "$out/build/.relver"
make -s -C "$out/build" -j2 >/dev/null
cp "$out/build/src/luajit" "$out/bin/luajit-current"
cp "$out/build/src/"{lua.h,luaconf.h,lualib.h,lauxlib.h,luajit.h,lua.hpp} "$out/include/"
echo "luajit.sh: built $("$out/bin/luajit-current" -v | head -n 1) from $(basename "$src")" >&2
