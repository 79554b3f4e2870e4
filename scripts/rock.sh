#!/usr/bin/env bash
# Installs the rock into a local tree for one interpreter, the way users get it:
#   scripts/rock.sh luajit|luajit-current|lua5.1|lua5.2|lua5.3|lua5.4|lua5.5
#                                                   -> .luarocks/<interpreter>
# and prints the exports that make `require "lunet.mem"` find it (LUA_PATH/LUA_CPATH; for the
# interpreters the project builds, lua5.5 and luajit-current, also PATH, and for lua5.5 the
# paths of busted's Lua code and its native helpers' stand-ins: scripts/lua55.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/rock.sh luajit|luajit-current|lua5.1|lua5.2|lua5.3|lua5.4|lua5.5"
interp=${1:?$usage}
root=$PWD
tree=$root/.luarocks/$interp
extra_path= extra_cpath= path_dir= after_path= after_cpath=
case "$interp" in
  luajit) version=5.1; incdir=/usr/include/luajit-2.1 ;;
  luajit-current)
    version=5.1; path_dir=$root/.luajit/bin; incdir=$root/.luajit/include
    [ -x "$path_dir/$interp" ] || bash scripts/luajit.sh
    # (built with LuaJIT's default prefix, /usr/local: Debian's Lua 5.1 modules, busted's
    # included, after its defaults)
    after_path=";/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua"
    after_cpath=";/usr/lib/$(gcc -print-multiarch)/lua/5.1/?.so" ;;
  lua5.1) version=5.1; incdir=/usr/include/lua5.1 ;;
  lua5.2) version=5.2; incdir=/usr/include/lua5.2 ;;
  lua5.3) version=5.3; incdir=/usr/include/lua5.3 ;;
  lua5.4) version=5.4; incdir=/usr/include/lua5.4 ;;
  lua5.5)
    version=5.5; path_dir=$root/.lua55/bin; incdir=$root/.lua55/luarocks-include
    bash scripts/lua55.sh
    # busted's Lua code is Debian's (for 5.1-5.4, version-independent Lua); its C helpers are
    # the stand-ins of tests/busted55
    extra_path="/usr/share/lua/5.4/?.lua;/usr/share/lua/5.4/?/init.lua;"
    extra_cpath="$root/.lua55/lib/lua/5.5/?.so;" ;;
  *) echo "rock.sh: unknown interpreter $interp ($usage)" >&2; exit 2 ;;
esac
[ -z "$path_dir" ] || export PATH="$path_dir:$PATH"
mkdir -p "$tree"
if [ "$version" = 5.5 ]; then
  # Debian's luarocks (3.8) runs under an older Lua and, targeting 5.5, rewrites its own module
  # path to 5.5 folders, where Debian has no luarocks: the tree offers it its own code there.
  mkdir -p "$tree/share/lua/5.5"
  ln -sfn /usr/share/lua/5.4/luarocks "$tree/share/lua/5.5/luarocks"
fi
# A config of our own, so that luarocks targets exactly this interpreter (LuaJIT shares 5.1).
config=$tree/config.lua
cat > "$config" <<LUA
lua_version = "$version"
lua_interpreter = "$interp"
variables = {
  LUA = "$(command -v "$interp")",
  LUA_BINDIR = "$(dirname "$(command -v "$interp")")",
  LUA_INCDIR = "$incdir",
  LUA_DIR = "$(dirname "$(dirname "$(command -v "$interp")")")",
}
rocks_trees = { { name = "project", root = "$tree" } }
LUA
LUAROCKS_CONFIG=$config luarocks --lua-version="$version" --tree="$tree" make lunet-mem-dev-1.rockspec >&2
share=$tree/share/lua/$version
lib=$tree/lib/lua/$version
exports="export LUA_PATH='$share/?.lua;$share/?/init.lua;;$after_path' LUA_CPATH='$lib/?.so;;$after_cpath'"
# (lua5.5 reads LUA_PATH_5_5/LUA_CPATH_5_5 first: the stand-ins, built for 5.5, stay out of the
# paths of `busted --lua=lua5.5`'s first process, which runs under another Lua)
[ -z "$extra_path$extra_cpath" ] || exports="$exports LUA_PATH_5_5='$share/?.lua;$share/?/init.lua;$extra_path;' LUA_CPATH_5_5='$lib/?.so;$extra_cpath;'"
[ -z "$path_dir" ] || exports="$exports PATH='$path_dir':\"\$PATH\""
echo "$exports"
