#!/usr/bin/env bash
# Tracing overhead on every interpreter (bench/trace.lua), each with the module built by
# `luarocks make`:   bash bench/trace.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
for lua in luajit lua5.1 lua5.3 lua5.4; do
  env_line=$(bash scripts/rock.sh "$lua" 2>/dev/null)
  (eval "$env_line"; "$lua" bench/trace.lua "$lua" "$rounds") | { [ "$lua" = luajit ] && cat || tail -n +2; }
done
