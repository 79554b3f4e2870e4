#!/usr/bin/env bash
# examples/server.lua under wrk, per interpreter: bare (no module), track (module loaded, no
# scopes) and arena (each request in mem.scope{arena = true, limit = ...}), one after the other,
# `wrk -t2 -c16 -d5s --latency` on /users; prints requests/s, p99 latency and the ratios to bare.
#   bash bench/server.sh [interpreter...]   (default: luajit luajit-current lua5.1 lua5.2 lua5.3
#                                            lua5.4; lua5.5 has no lua-luv in Debian)
# Needs the rock built for each (scripts/rock.sh), wrk and lua-luv.
set -uo pipefail
cd "$(dirname "$0")/.."
. tests/server_lib.sh
interpreters=("$@")
[ ${#interpreters[@]} -eq 0 ] && interpreters=(luajit luajit-current lua5.1 lua5.2 lua5.3 lua5.4)
export PATH="$PWD/.luajit/bin:$PATH"
seconds=${WRK_SECONDS:-5}
work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill "$server_pid"; fi
  rm -rf "$work"
}
trap cleanup EXIT

# to_ms VALUE: wrk's latency (us, ms or s) in milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000
    printf "%.3f", n }'
}

# measure LUA MODE: prints "requests/s p99_ms", or "- -" when the server or wrk failed.
measure() {
  local lua=$1 mode=$2
  start_server "$lua" "$mode" "$work/out" "$work/err" $((seconds + 60))
  if [ -z "$port" ]; then
    echo "server ($lua, $mode) did not start: $(tail -n 3 "$work/err" | tr '\n' ' ')" >&2
    echo "- -"
    return
  fi
  timeout $((seconds + 30)) wrk -t2 -c16 -d"${seconds}s" --latency "http://127.0.0.1:$port/users" \
    >"$work/wrk" 2>&1
  get /quit >/dev/null 2>&1
  wait "$server_pid" 2>/dev/null
  server_pid=
  local rps p99
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$work/wrk")
  p99=$(awk '$1 == "99%" { print $2 }' "$work/wrk")
  if [ -z "$rps" ] || [ -z "$p99" ] || grep -q "Socket errors\|Non-2xx" "$work/wrk"; then
    echo "wrk ($lua, $mode): $(grep -E 'errors|Non-2xx' "$work/wrk" | tr '\n' ' ')" >&2
  fi
  echo "${rps:--} $(if [ -n "$p99" ]; then to_ms "$p99"; else echo -; fi)"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.3f", a / b }'; }

printf "%-8s %-6s %12s %10s %12s %10s\n" interp mode "requests/s" "p99 (ms)" "req/s /bare" "p99 /bare"
for lua in "${interpreters[@]}"; do
  env_line=$(bash scripts/rock.sh "$lua" 2>/dev/null) || { echo "$lua: scripts/rock.sh failed" >&2; continue; }
  eval "$env_line"
  bare_rps=- bare_p99=-
  for mode in bare track arena; do
    read -r rps p99 < <(measure "$lua" "$mode")
    if [ "$mode" = bare ]; then bare_rps=$rps bare_p99=$p99; fi
    printf "%-8s %-6s %12s %10s %12s %10s\n" "$lua" "$mode" "$rps" "$p99" \
      "$(ratio "$rps" "$bare_rps")" "$(ratio "$p99" "$bare_p99")"
  done
done
