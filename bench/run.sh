#!/usr/bin/env bash
# Runs the benchmark on every interpreter, each with the module built by `luarocks make`:
#   bash bench/run.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-11}
for lua in luajit lua5.1 lua5.3 lua5.4; do
  env_line=$(bash scripts/rock.sh "$lua" 2>/dev/null)
  (eval "$env_line"; "$lua" bench/run.lua "$lua" "$rounds") | { [ "$lua" = luajit ] && cat || tail -n +2; }
done
