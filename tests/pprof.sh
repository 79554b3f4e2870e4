#!/usr/bin/env bash
# snap:pprof and `lunet-mem run --pprof` read back by Go's own pprof (Debian's golang-go,
# installed by scripts/setup.sh): tests/lua/pprof_scopes.lua allocates on known lines in two
# scopes and writes a profile; `go tool pprof -top -lines` must list those lines,
# `-tagfocus scope=<name>` must keep that scope's samples only, and `-sample_index=inuse_space`
# must sum to the snapshot's live bytes (exact trace, within 1%). Then `bin/lunet-mem run
# --pprof` with a sampled trace must write a profile with its period set.
#   bash tests/pprof.sh luajit|luajit-current|lua5.1|lua5.2|lua5.3|lua5.4
# lunet.mem must be loadable by the interpreter (LUA_PATH/LUA_CPATH, e.g. the line that
# scripts/rock.sh prints). Prints "ok - ..." / "not ok - ..." per check, then
# "N passed, N failed"; exits non-zero when one fails.
set -euo pipefail
cd "$(dirname "$0")/.."
lua=${1:?usage: tests/pprof.sh luajit|luajit-current|lua5.1|lua5.2|lua5.3|lua5.4}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Go wants a home and a build cache; CI runs as a fresh user, so both live in the scratch dir.
export HOME="$work/home" GOCACHE="$work/gocache" GOPATH="$work/gopath"
mkdir -p "$HOME"

passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $1: $2"; failed=$((failed + 1)); }
# check NAME DETAIL CMD...: ok when CMD succeeds.
check() {
  local name=$1 detail=$2
  shift 2
  if "$@"; then ok "$name"; else not_ok "$name" "$detail"; fi
}
pprof() { go tool pprof "$@" 2>"$work/pprof.err"; }

script=tests/lua/pprof_scopes.lua
profile="$work/heap.pb.gz"
if ! "$lua" "$script" "$profile" >"$work/script.out" 2>&1; then
  not_ok "$script writes a profile ($lua)" "$(tail -n 5 "$work/script.out")"
  echo "$passed passed, $failed failed"
  exit 1
fi
value() { sed -n "s/^$1=//p" "$work/script.out"; }
users_line=$(value users_line)
orders_line=$(value orders_line)
live_bytes=$(value live_bytes)

check "the profile is gzip ($lua)" "no gzip magic" \
  test "$(head -c 2 "$profile" | od -An -tx1 | tr -d ' ')" = 1f8b

pprof -top -lines -nodefraction=0 "$profile" >"$work/top.txt" || true
check "-top -lines lists the users line ($lua)" "no $script:$users_line in $(cat "$work/top.txt" "$work/pprof.err")" \
  grep -q "$script:$users_line\$" "$work/top.txt"
check "-top -lines lists the orders line ($lua)" "no $script:$orders_line" \
  grep -q "$script:$orders_line\$" "$work/top.txt"

pprof -top -lines -nodefraction=0 -tagfocus 'scope=GET /users' "$profile" >"$work/users.txt" || true
check "-tagfocus scope=GET /users keeps the users line ($lua)" "$(cat "$work/users.txt")" \
  grep -q "$script:$users_line\$" "$work/users.txt"
check "-tagfocus scope=GET /users drops the orders line ($lua)" "$(cat "$work/users.txt")" \
  bash -c "! grep -q '$script:$orders_line\$' '$work/users.txt'"
pprof -tags -tagfocus 'scope=GET /orders' "$profile" >"$work/tags.txt" || true
check "-tagfocus scope=GET /orders keeps that scope only ($lua)" "$(cat "$work/tags.txt")" \
  bash -c "grep -q 'GET /orders' '$work/tags.txt' && ! grep -q 'GET /users' '$work/tags.txt'"

# "Showing nodes accounting for X, Y% of NB total": N is the sum over all samples.
pprof -top -unit=B -sample_index=inuse_space "$profile" >"$work/inuse.txt" || true
inuse=$(sed -n 's/.* of \([0-9]*\)B total.*/\1/p' "$work/inuse.txt" | head -n 1)
within_1pct() {
  [ -n "$inuse" ] && [ "$live_bytes" -gt 0 ] &&
    awk -v a="$inuse" -v b="$live_bytes" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= b / 100) }'
}
check "inuse_space sums to the snapshot's live bytes ($lua: ${inuse:-?} vs $live_bytes)" \
  "$(cat "$work/inuse.txt" "$work/pprof.err")" within_1pct

# The runner, sampled: the profile says how it was sampled (period_type space/bytes).
sampled="$work/run.pb.gz"
if LUNET_MEM_LUA=$lua sh bin/lunet-mem run --sample-bytes 4096 --pprof "$sampled" \
     "$script" "$work/unused.pb.gz" >"$work/run.out" 2>&1; then
  ok "lunet-mem run --pprof ($lua)"
else
  not_ok "lunet-mem run --pprof ($lua)" "$(tail -n 5 "$work/run.out")"
fi
pprof -raw "$sampled" >"$work/raw.txt" || true
check "a sampled profile has its period set ($lua)" "$(head -n 5 "$work/raw.txt" "$work/pprof.err")" \
  bash -c "grep -q '^PeriodType: space bytes' '$work/raw.txt' && grep -q '^Period: 4096' '$work/raw.txt'"
pprof -top -lines -nodefraction=0 "$sampled" >"$work/sampled.txt" || true
check "a sampled profile lists the users line ($lua)" "$(cat "$work/sampled.txt")" \
  grep -q "$script:$users_line\$" "$work/sampled.txt"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
