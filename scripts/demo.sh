#!/usr/bin/env bash
# The main job, from a fresh Debian machine:
#   bash scripts/demo.sh [luajit|luajit-current|lua5.1|lua5.2|lua5.3|lua5.4|lua5.5]
# Installs what it needs, builds and installs the rock with `luarocks make` into .luarocks/,
# and runs examples/demo.lua: a request loop in scopes, its stats, and a planted leak found.
set -euo pipefail
cd "$(dirname "$0")/.."
lua=${1:-lua5.4}
bash scripts/setup.sh
env_line=$(bash scripts/rock.sh "$lua")
eval "$env_line"
echo "== examples/demo.lua on $lua"
"$lua" examples/demo.lua
