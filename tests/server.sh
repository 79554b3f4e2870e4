#!/usr/bin/env bash
# examples/server.lua under load: starts it on 127.0.0.1 (a free port), drives it with wrk twice
# (tests/server_paths.lua cycles /users, /leak and /big), then /quit, and checks the answers and
# the server's final report. Installs nothing; the rock must be built (scripts/rock.sh).
#   bash tests/server.sh luajit|luajit-current|lua5.1|lua5.2|lua5.3|lua5.4     [WRK_SECONDS=4]
# Prints one line per check, "ok - <check>" or "not ok - <check>: <detail>"; exits non-zero
# when one fails.
set -uo pipefail
cd "$(dirname "$0")/.."
lua=${1:?usage: tests/server.sh luajit|luajit-current|lua5.1|lua5.2|lua5.3|lua5.4}
seconds=${WRK_SECONDS:-4}

eval "$(bash scripts/rock.sh "$lua" 2>/dev/null)" || { echo "not ok - rock for $lua: scripts/rock.sh failed"; exit 1; }

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill "$server_pid" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT

failures=0
ok() { echo "ok - $1"; }
not_ok() { echo "not ok - $1: $2"; failures=$((failures + 1)); }

. tests/server_lib.sh

# field NAME FILE: the number after "NAME=" on the wrk summary line.
field() { grep -Eo "(^| )$1=[0-9]+" "$2" | head -n 1 | cut -d= -f2; }

# The server, bounded in time; its port from its first line.
start_server "$lua" arena "$work/server.out" "$work/server.err" 120
if [ -z "$port" ]; then
  not_ok "server starts ($lua)" "no 'listening on' line; stderr: $(tail -n 5 "$work/server.err" | tr '\n' ' ')"
  exit 1
fi
ok "server starts ($lua) and listens on 127.0.0.1:$port"

# run N: one wrk run, its checks, then /stats (with its RSS after a full collection).
run() {
  local n=$1 out=$work/wrk$1.txt
  timeout 60 wrk -t2 -c8 -d"${seconds}s" -s tests/server_paths.lua "http://127.0.0.1:$port/" \
    >"$out" 2>"$work/wrk$n.err"
  local line
  line=$(grep '^paths:' "$out")
  if [ -z "$line" ]; then
    not_ok "wrk run $n" "no summary line; $(tail -n 5 "$out" "$work/wrk$n.err" | tr '\n' ' ')"
    return
  fi
  local connect read write timeout status responses users leak big unexpected
  connect=$(field connect "$out"); read=$(field read "$out"); write=$(field write "$out")
  timeout=$(field timeout "$out"); status=$(field status "$out"); responses=$(field responses "$out")
  users=$(field users "$out"); leak=$(field leak "$out"); big=$(field big "$out")
  unexpected=$(field unexpected "$out")
  if [ "$connect$read$write$timeout" = "0000" ]; then
    ok "wrk run $n: no socket errors ($responses responses)"
  else
    not_ok "wrk run $n: no socket errors" "connect $connect, read $read, write $write, timeout $timeout"
  fi
  if [ "$unexpected" -eq 0 ] && [ "$users" -gt 0 ] && [ "$leak" -gt 0 ] && [ "$big" -gt 0 ] \
    && [ $((users + leak + big)) -eq "$responses" ] && [ "$status" -eq "$big" ]; then
    ok "wrk run $n: every /big answered 500, every other 200 ($users /users, $leak /leak, $big /big)"
  else
    not_ok "wrk run $n: every /big answered 500, every other 200" \
      "$line; $(head -n 3 "$work/wrk$n.err" | tr '\n' ' ')"
  fi
  get /stats >"$work/stats$n.txt" 2>&1
  rss[n]=$(sed -n 's/^rss_kib \([0-9]*\).*/\1/p' "$work/stats$n.txt" | tr -d '\r')
  arena[n]=$(sed -n 's/^stat arena_bytes \([0-9]*\).*/\1/p' "$work/stats$n.txt" | tr -d '\r')
  live[n]=$(sed -n 's/^stat live_bytes \([0-9]*\).*/\1/p' "$work/stats$n.txt" | tr -d '\r')
}
declare -a rss arena live
run 1
run 2

get /quit >"$work/quit.txt" 2>&1
for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
wait "$server_pid"
code=$?
server_pid=
report=$work/server.out
if grep -q '^bye' "$work/quit.txt" && [ "$code" -eq 0 ] && grep -q '^end of report' "$report"; then
  ok "/quit answered, final report printed, server exited 0"
else
  not_ok "/quit answered, final report printed, server exited 0" \
    "exit $code; $(tail -n 5 "$work/server.err" | tr '\n' ' ')"
fi

# The final report (after the server's full collections).
pinned_leak=$(sed -n 's/^pinned GET \/leak arenas=\([0-9]*\).*/\1/p' "$report")
if [ -n "$pinned_leak" ] && [ "$pinned_leak" -gt 0 ]; then
  ok "mem.arenas() names the leaking route: GET /leak, $pinned_leak arenas pinned"
else
  not_ok "mem.arenas() names the leaking route" "no 'pinned GET /leak' line in the report"
fi
pinned_users=$(grep '^pinned GET /users' "$report")
if [ -z "$pinned_users" ]; then
  ok "no /users arena pinned"
else
  not_ok "no /users arena pinned" "$pinned_users"
fi

ref=$(sed -n 's/^users reference //p' "$report")
min=$(sed -n 's/^users min //p' "$report")
max=$(sed -n 's/^users max //p' "$report")
served=$(sed -n 's/^requests GET \/users \([0-9]*\)/\1/p' "$report")
traced=$(sed -n 's/^users traced //p' "$report")
[ "${traced:-0}" -gt 0 ] && served="$served (not counting $traced during which LuaJIT recorded a trace)"
for what in allocs allocated_bytes; do
  r=$(echo "$ref" | grep -Eo "(^| )$what=[0-9-]+" | cut -d= -f2)
  lo=$(echo "$min" | grep -Eo "(^| )$what=[0-9-]+" | cut -d= -f2)
  hi=$(echo "$max" | grep -Eo "(^| )$what=[0-9-]+" | cut -d= -f2)
  if [ -n "$r" ] && [ -n "$lo" ] && [ "$r" -gt 0 ] && [ "$lo" = "$r" ] && [ "$hi" = "$r" ]; then
    ok "each of $served /users requests: $what = $r, as when run alone"
  else
    not_ok "each /users request's $what equals the reference run alone" \
      "reference ${r:-none}, min ${lo:-none}, max ${hi:-none} over ${served:-?} requests"
  fi
done

# RSS after each run (the server collects fully first). The planted leak makes it grow: each
# pinned arena of /leak keeps its chunks (a page of objects and one of other blocks, for a table
# of 56 bytes: arena_bytes) and the list that holds the tables grows (live_bytes). Flat means:
# RSS grew by at most 10% of its first figure beyond what the module counts for those.
r1=${rss[1]:-0} r2=${rss[2]:-0} a1=${arena[1]:-0} a2=${arena[2]:-0} l1=${live[1]:-0} l2=${live[2]:-0}
if [ "$r1" -gt 0 ] && [ "$r2" -gt 0 ]; then
  counted=$(((a2 - a1 + l2 - l1) / 1024))
  detail="RSS $r1 -> $r2 KiB ($(awk -v a="$r1" -v b="$r2" 'BEGIN { printf "%.2fx", b / a }'));"
  detail="$detail arena chunks $((a1 / 1024)) -> $((a2 / 1024)) KiB, live_bytes $((l1 / 1024)) -> $((l2 / 1024)) KiB"
  if [ $(((r2 - r1 - counted) * 10)) -le "$r1" ]; then
    ok "RSS flat after the second run, beyond the pinned arenas of /leak ($detail)"
  else
    not_ok "RSS flat after the second run, beyond the pinned arenas of /leak" "$detail"
  fi
else
  not_ok "RSS read from /stats" "after run 1: '$r1', after run 2: '$r2'"
fi

[ "$failures" -eq 0 ]
