#!/usr/bin/env bash
# The soak on every interpreter, each with the module built by `luarocks make`:
#   bash bench/soak.sh [requests]     (default 10^6)
set -euo pipefail
cd "$(dirname "$0")/.."
for lua in luajit lua5.1 lua5.3 lua5.4; do
  env_line=$(bash scripts/rock.sh "$lua" 2>/dev/null)
  (eval "$env_line"; "$lua" bench/soak.lua "${1:-1000000}")
done
