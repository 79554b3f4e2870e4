#!/usr/bin/env bash
# Builds a real Lua 5.5 interpreter, `lua5.5`, that loads C modules, into .lua55/ (Debian has no
# Lua 5.5 yet):
#   bash scripts/lua55.sh            -> .lua55/bin/lua5.5, .lua55/include/*.h
# from the official sources in the upstream suites folder (lua-5.5.0: its own makefile, which
# builds `lua` for Linux with -Wl,-E and -ldl), copied first: that folder is read-only. Then the
# small stand-ins for busted's native helpers (tests/busted55/helpers.c: `system.core`,
# `term.core`, `lfs`; Debian builds luasystem, lua-term and luafilesystem for 5.1-5.4 only)
# into .lua55/lib/lua/5.5. Safe to run again: does nothing when both are up to date.
# Prints nothing but errors; exits 3 (and says why on stderr) when the sources are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
suites=${LUNET_MEM_SUITES:-$root/../shared/suites}
src=$suites/lua-5.5.0
out=$root/.lua55
if [ ! -f "$src/lua.c" ] || [ ! -f "$src/makefile" ]; then
  echo "lua55.sh: no Lua 5.5.0 sources in $src (LUNET_MEM_SUITES=DIR)" >&2
  exit 3
fi
mkdir -p "$out/bin" "$out/include" "$out/lib/lua/5.5/system" "$out/lib/lua/5.5/term"
if [ ! -x "$out/bin/lua5.5" ] || [ -n "$(find "$src" -newer "$out/bin/lua5.5" -name '*.[ch]' | head -n 1)" ]; then
  rm -rf "$out/build"
  mkdir -p "$out/build"
  cp "$src"/*.c "$src"/*.h "$src/makefile" "$out/build/"
  # (upstream's flags but -march=native: the binary may move to another machine of CI's)
  make -s -C "$out/build" CWARNS= \
    CFLAGS='-Wall -O2 $(MYCFLAGS) -fno-stack-protector -fno-common' >/dev/null
  cp "$out/build/lua" "$out/bin/lua5.5"
  cp "$src/lua.h" "$src/luaconf.h" "$src/lualib.h" "$src/lauxlib.h" "$out/include/"
fi
# Debian's luarocks (3.8, older than 5.5) checks LUA_INCDIR's lua.h for a literal
# `LUA_VERSION_NUM 505`, which 5.5's lua.h computes: scripts/rock.sh points it at this one.
mkdir -p "$out/luarocks-include"
printf '%s\n' '/* for Debian luarocks 3.8: LUA_VERSION_NUM 505 */' '#include "../include/lua.h"' \
  >"$out/luarocks-include/lua.h"
helpers=$root/tests/busted55/helpers.c
so=$out/lib/lua/5.5/busted55.so
if [ ! -f "$so" ] || [ "$helpers" -nt "$so" ] || [ "$out/bin/lua5.5" -nt "$so" ]; then
  gcc -std=c99 -O2 -Wall -Wextra -Werror -shared -fPIC -I"$out/include" -o "$so" "$helpers"
  for name in system/core.so term/core.so lfs.so; do
    ln -sf "$so" "$out/lib/lua/5.5/$name"
  done
fi
