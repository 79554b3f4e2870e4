#!/bin/sh
# Called by `luarocks make` (see the rockspec): builds the module for the interpreter luarocks
# targets ($LUA) and leaves it at target/rock/mem.so.
set -eu
LUA=${LUA:-lua}
flavour=$("$LUA" -e 'if jit then print("luajit") else print((_VERSION:gsub("Lua (%d)%.(%d)", "lua%1%2"))) end')
case "$flavour" in
  luajit|lua51|lua52|lua53|lua54|lua55) ;;
  *) echo "rock-build: unsupported interpreter $LUA ($flavour)" >&2; exit 1 ;;
esac
cargo build --release --locked --no-default-features --features "$flavour,module" \
  --target-dir "target/rock-$flavour"
mkdir -p target/rock
cp "target/rock-$flavour/release/liblunet_mem.so" target/rock/mem.so
echo "rock-build: built lunet.mem for $flavour"
