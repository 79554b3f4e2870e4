#!/usr/bin/env bash
# mem.metrics seen by a real Prometheus: starts examples/server.lua and Debian's `prometheus` on
# 127.0.0.1 (free ports, a temporary directory, a scrape of /metrics every second), drives the
# server with wrk (tests/server_paths.lua: /users, /leak, /big), stops wrk, waits two scrape
# intervals, reads the server's own per-route figures (/stats: scopes closed and bytes_allocated
# summed by on_exit), then asks Prometheus's HTTP API (/api/v1/query) for the per-route request
# counts and allocated-bytes sums it stored and checks they are equal; `promtool check metrics`
# checks the text. Stops everything on exit. Needs prometheus, wrk and a built rock (scripts/rock.sh).
#   bash tests/prometheus.sh luajit|luajit-current|lua5.1|lua5.2|lua5.3|lua5.4     [WRK_SECONDS=3]
# Prints "ok - <check>" or "not ok - <check>: <detail>" per check, then "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
lua=${1:?usage: tests/prometheus.sh luajit|luajit-current|lua5.1|lua5.2|lua5.3|lua5.4}
seconds=${WRK_SECONDS:-3}
scrape_seconds=1

passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $1: $2"; failed=$((failed + 1)); }
finish() { echo "$passed passed, $failed failed"; [ "$failed" -eq 0 ]; exit; }

for tool in prometheus promtool wrk; do
  command -v "$tool" >/dev/null || { not_ok "$tool installed" "run scripts/setup.sh"; finish; }
done
env_line=$(bash scripts/rock.sh "$lua" 2>/dev/null) || { not_ok "rock for $lua" "scripts/rock.sh failed"; finish; }
eval "$env_line"

work=$(mktemp -d)
server_pid=
prom_pid=
cleanup() {
  for pid in $server_pid $prom_pid; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] && echo "kept $work" || rm -rf "$work"
}
trap cleanup EXIT

. tests/server_lib.sh

# http PORT PATH: the body of a GET (HTTP/1.0: no chunked encoding), through bash's /dev/tcp.
http() {
  timeout 20 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$2" >&3
    cat <&3' _ "$1" "$2" | tr -d '\r' | sed '1,/^$/d'
}

# urlencode TEXT: TEXT as a query parameter.
urlencode() {
  local s=$1 i c out=
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case "$c" in
      [a-zA-Z0-9._~-]) out+=$c ;;
      *) out+=$(printf '%%%02X' "'$c") ;;
    esac
  done
  echo "$out"
}

# query PROMQL: the value of the one sample an instant query returns ("" if none).
query() {
  http "$prom_port" "/api/v1/query?query=$(urlencode "$1")" \
    | sed -n 's/.*"value":\[[^,]*,"\([^"]*\)"\].*/\1/p' || true
}

# A port nothing listens on (Prometheus is started again on another one if it was taken since).
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  return 1
}

start_server "$lua" arena "$work/server.out" "$work/server.err" 300
if [ -z "$port" ]; then
  not_ok "server starts ($lua)" "no 'listening on' line; $(tail -n 5 "$work/server.err" | tr '\n' ' ')"
  finish
fi
ok "server starts ($lua) on 127.0.0.1:$port"

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: ${scrape_seconds}s
  scrape_timeout: ${scrape_seconds}s
scrape_configs:
  - job_name: lunet
    static_configs:
      - targets: ["127.0.0.1:$port"]
EOF
ready=
for _ in 1 2 3; do
  prom_port=$(free_port)
  timeout 300 prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
    --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$work/prometheus.log" 2>&1 &
  prom_pid=$!
  for _ in $(seq 1 100); do
    if http "$prom_port" /-/ready 2>/dev/null | grep -q Ready; then ready=1; break; fi
    kill -0 "$prom_pid" 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$ready" ] && break
  kill "$prom_pid" 2>/dev/null || true
done
if [ -z "$ready" ]; then
  not_ok "prometheus starts" "$(tail -n 5 "$work/prometheus.log" | tr '\n' ' ')"
  finish
fi
ok "prometheus $(prometheus --version 2>&1 | head -n 1 | awk '{print $3}') ready on 127.0.0.1:$prom_port, scraping every ${scrape_seconds}s"

timeout 60 wrk -t2 -c8 -d"${seconds}s" -s tests/server_paths.lua "http://127.0.0.1:$port/" \
  >"$work/wrk.txt" 2>"$work/wrk.err" || true
responses=$(grep -Eo '(^| )responses=[0-9]+' "$work/wrk.txt" | cut -d= -f2 || true)
if [ "${responses:-0}" -gt 0 ]; then
  ok "wrk: $responses responses in ${seconds}s"
else
  not_ok "wrk" "$(tail -n 3 "$work/wrk.txt" "$work/wrk.err" | tr '\n' ' ')"
fi

if ! kill -0 "$server_pid" 2>/dev/null; then
  not_ok "server still running after the load" "$(tail -n 5 "$work/server.err" | tr '\n' ' ')"
  finish
fi

# The load has stopped: two scrapes later Prometheus holds the final figures. The server's own
# come after that wait (a request that wrk left mid-way finishes first).
sleep $((2 * scrape_seconds))
http "$port" /stats >"$work/stats.txt" || true
http "$port" /metrics >"$work/metrics.txt" || true

for route in /users /leak /big; do
  name="GET $route"
  line=$(grep "^closed $name " "$work/stats.txt" || true)
  scopes=$(echo "$line" | sed -n 's/.* scopes=\([0-9]*\).*/\1/p')
  bytes=$(echo "$line" | sed -n 's/.* allocated_bytes=\([0-9]*\).*/\1/p')
  dispatched=$(sed -n "s|^requests $name \([0-9]*\)|\1|p" "$work/stats.txt")
  if [ -n "$scopes" ] && [ "$scopes" -gt 0 ] && [ "$scopes" = "$dispatched" ]; then
    ok "$name: the server closed a scope for each of its $dispatched requests"
  else
    not_ok "$name: a scope closed for each request" "requests ${dispatched:-none}, scopes closed ${scopes:-none}"
  fi
  # (a scrape delayed by a loaded machine: ask again for a few seconds)
  for _ in $(seq 1 20); do
    stored=$(query "lunet_mem_scope_requests_total{scope=\"$name\"}")
    stored_bytes=$(query "lunet_mem_scope_allocated_bytes_sum{scope=\"$name\"}")
    [ "$stored" = "$scopes" ] && [ "$stored_bytes" = "$bytes" ] && break
    sleep 0.5
  done
  if [ -n "$scopes" ] && [ "$stored" = "$scopes" ]; then
    ok "$name: Prometheus stored lunet_mem_scope_requests_total $stored, the server's own count"
  else
    not_ok "$name: Prometheus's request count equals the server's" "Prometheus '${stored}', server '${scopes}'"
  fi
  if [ -n "$bytes" ] && [ "$stored_bytes" = "$bytes" ]; then
    ok "$name: Prometheus stored lunet_mem_scope_allocated_bytes_sum $stored_bytes, the sum of on_exit's bytes_allocated"
  else
    not_ok "$name: Prometheus's allocated-bytes sum equals the server's" "Prometheus '${stored_bytes}', server '${bytes}'"
  fi
done
refused=$(query 'lunet_mem_scope_budget_refusals_total{scope="GET /big"}')
if [ -n "$refused" ] && [ "$refused" -gt 0 ]; then
  ok "GET /big: Prometheus stored $refused budget refusals"
else
  not_ok "GET /big: budget refusals stored" "'$refused'"
fi

if promtool check metrics <"$work/metrics.txt" >"$work/promtool.txt" 2>&1; then
  ok "promtool check metrics accepts /metrics ($(grep -c '^lunet_mem_' "$work/metrics.txt") samples)"
else
  not_ok "promtool check metrics accepts /metrics" "$(head -n 5 "$work/promtool.txt" | tr '\n' ' ')"
fi

finish
