#!/usr/bin/env bash
# Installs the rock into a local tree for one interpreter, the way users get it:
#   scripts/rock.sh luajit|lua5.1|lua5.3|lua5.4   -> .luarocks/<interpreter>
# and prints the LUA_PATH/LUA_CPATH exports that make `require "lunet.mem"` find it.
set -euo pipefail
cd "$(dirname "$0")/.."
interp=${1:?usage: scripts/rock.sh luajit|lua5.1|lua5.3|lua5.4}
root=$PWD
tree=$root/.luarocks/$interp
mkdir -p "$tree"
case "$interp" in
  luajit) version=5.1; incdir=/usr/include/luajit-2.1 ;;
  lua5.1) version=5.1; incdir=/usr/include/lua5.1 ;;
  lua5.2) version=5.2; incdir=/usr/include/lua5.2 ;;
  lua5.3) version=5.3; incdir=/usr/include/lua5.3 ;;
  lua5.4) version=5.4; incdir=/usr/include/lua5.4 ;;
  *) echo "rock.sh: unknown interpreter $interp" >&2; exit 2 ;;
esac
# A config of our own, so that luarocks targets exactly this interpreter (LuaJIT shares 5.1).
config=$tree/config.lua
cat > "$config" <<LUA
lua_version = "$version"
lua_interpreter = "$interp"
variables = {
  LUA = "$(command -v "$interp")",
  LUA_BINDIR = "/usr/bin",
  LUA_INCDIR = "$incdir",
  LUA_DIR = "/usr",
}
rocks_trees = { { name = "project", root = "$tree" } }
LUA
LUAROCKS_CONFIG=$config luarocks --lua-version="$version" --tree="$tree" make lunet-mem-dev-1.rockspec >&2
share=$tree/share/lua/$version
lib=$tree/lib/lua/$version
echo "export LUA_PATH='$share/?.lua;$share/?/init.lua;;' LUA_CPATH='$lib/?.so;;'"
