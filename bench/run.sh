#!/usr/bin/env bash
# Runs one benchmark on every interpreter, each with the module built by `luarocks make`:
#   bash bench/run.sh [rounds]              the workloads, bare and in each mode (bench/run.lua)
#   bash bench/run.sh trace [rounds]        tracing overhead (bench/trace.lua)
#   bash bench/run.sh soak [requests]       memory over 10^6 arena-scoped requests (bench/soak.lua)
# The drivers print their header (two lines for run.lua, one for trace.lua) and a block per
# interpreter; the header is printed once.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  trace) script=bench/trace.lua; args=("${2:-7}"); header=1 ;;
  soak) script=bench/soak.lua; args=("${2:-1000000}"); header=0 ;;
  *) script=bench/run.lua; args=("${1:-11}"); header=2 ;;
esac
first=1
# (lua5.5: Debian's luacheck, the luacheck workload, assigns to a loop variable in one file,
# which 5.5 refuses to compile: loaded through the stand-in loader of busted's run)
export LUA_INIT_5_5="@$PWD/tests/busted55/compat.lua"
for lua in luajit luajit-current lua5.1 lua5.2 lua5.3 lua5.4 lua5.5; do
  env_line=$(bash scripts/rock.sh "$lua" 2>/dev/null)
  if [ "$script" = bench/soak.lua ]; then
    (eval "$env_line"; "$lua" "$script" "${args[@]}")
  else
    (eval "$env_line"; "$lua" "$script" "$lua" "${args[@]}") | { [ $first = 1 ] && cat || tail -n +$((header + 1)); }
  fi
  first=0
done
