#!/usr/bin/env bash
# Runs the seeded random-program fuzzer (tests/fuzz/fuzz.lua) on each interpreter, seeds in
# batches (one process per batch, under `timeout`), and ends with "N passed, N failed".
#
#   bash scripts/fuzz.sh                      # CI: 100 seeds from 1 on each of the seven
#                                             # interpreters (scripts/test.sh's list)
#   bash scripts/fuzz.sh --seeds 2000 --from 5000 --lua lua5.4
#   bash scripts/fuzz.sh --lua luajit --lua lua5.1 --steps 120
#
# Options: --seeds N (seeds per interpreter), --from S (first seed), --lua INTERP (repeatable or
# comma-separated), --steps N (steps per seed, default the fuzzer's 60), --batch K (seeds per
# process, default 10), --timeout SECS (per seed, default 60).
# Each failing seed is printed with the fuzzer's message and a one-line reproduction command:
# the failing seed is re-run alone, and the command is that one if it fails the same way, else
# the batch's (the seeds run before it in the process are then part of the case; the exact
# command matters, since what is allocated before the failure moves the collector's steps). A
# crash or a hang names its seed (the fuzzer announces each seed before running it) and is
# re-run alone the same way; a crash at exit (lua_close) re-runs the batch's seeds one by one.
# The module is the one scripts/rock.sh installed in .luarocks/<interpreter> (the fuzzer finds
# it), or the one LUA_PATH/LUA_CPATH point to.
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=100
from=1
steps=""
batch=10
per_seed_timeout=60
interps=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    --lua) IFS=',' read -r -a more <<<"$2"; interps+=("${more[@]}"); shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --timeout) per_seed_timeout=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fuzz.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#interps[@]} -gt 0 ] || interps=(luajit luajit-current lua5.1 lua5.2 lua5.3 lua5.4 lua5.5)
# (the interpreters the project builds: scripts/lua55.sh, scripts/luajit.sh)
export PATH="$PWD/.lua55/bin:$PWD/.luajit/bin:$PATH"

fuzzer=tests/fuzz/fuzz.lua
step_args=()
[ -n "$steps" ] && step_args=(--steps "$steps")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

total_passed=0
total_failed=0

# run_batch INTERP FIRST COUNT LOG: runs seeds FIRST.. (at most COUNT) in one process; its exit
# status is the process's (124: timed out).
run_batch() {
  local lua=$1 first=$2 count=$3 log=$4
  local rc=0
  # (in a subshell whose stderr is closed, since bash reports a child killed by a signal; the
  # `exit` keeps bash from running the command in place of the subshell)
  (timeout --kill-after=5 "$((per_seed_timeout * count))" \
    "$lua" "$fuzzer" --machine --seed "$first" --count "$count" "${step_args[@]}" \
    >"$log" 2>&1; exit $?) 2>/dev/null || rc=$?
  return "$rc"
}

# describe_exit RC: what a non-zero exit status means.
describe_exit() {
  case "$1" in
    124|137) echo "hung (killed after the timeout)" ;;
    1) echo "exited with status 1 without a failure report" ;;
    *) if [ "$1" -gt 128 ]; then
         echo "crashed (signal $(($1 - 128)): $(kill -l "$(($1 - 128))" 2>/dev/null || echo '?'))"
       else
         echo "exited with status $1"
       fi ;;
  esac
}

# kind_of LOG: "seed=S step=N (interp) kind" of the first failure in LOG (the figures after it
# may differ from run to run on LuaJIT, whose compiler picks hot code by address).
kind_of() {
  grep -m1 '^FAIL ' "$1" | sed 's/^\(FAIL [^:]*\):.*/\1/' || true
}

repro() { # repro INTERP SEED COUNT: the command run_batch ran
  echo "  reproduce: $1 $fuzzer --machine --seed $2 --count $3${steps:+ --steps $steps}"
}

for lua in "${interps[@]}"; do
  if ! command -v "$lua" >/dev/null; then
    echo "FAIL $lua: not installed"
    total_failed=$((total_failed + 1))
    continue
  fi
  passed=0
  failed=0
  started=$(date +%s)
  last=$((from + seeds - 1))
  seed=$from
  while [ "$seed" -le "$last" ]; do
    count=$((last - seed + 1))
    [ "$count" -gt "$batch" ] && count=$batch
    log="$out/$lua-$seed.log"
    rc=0
    run_batch "$lua" "$seed" "$count" "$log" || rc=$?
    ok_seeds=$(grep -c '^ok ' "$log" || true)
    passed=$((passed + ok_seeds))
    if grep -q '^FAIL ' "$log"; then
      # a failure report: the seed after it is where the next batch starts
      bad=$(sed -n 's/^FAIL seed=\([0-9]*\) .*/\1/p' "$log" | head -n 1)
      failed=$((failed + 1))
      sed -n '/^FAIL /,$p' "$log" | grep -v -e '^done$' -e '^begin ' -e '^ok ' \
        -e '^  reproduce: ' -e '^  (after seeds ' || true
      # alone, with the command printed (the exact command replays it; another may not)
      alone="$out/$lua-alone-$bad.log"
      run_batch "$lua" "$bad" 1 "$alone" || true
      if [ "$(kind_of "$alone")" = "$(kind_of "$log")" ]; then
        repro "$lua" "$bad" 1
      else
        what=$(grep -m1 '^FAIL ' "$alone" | cut -c1-140 || true)
        echo "  (alone it ${what:+fails otherwise: }${what:-passes}; the seeds before it count)"
        repro "$lua" "$seed" "$count"
      fi
      seed=$((bad + 1))
    elif [ "$rc" -ne 0 ]; then
      # a crash or a hang: the seed announced last and not passed
      bad=$(awk '/^begin /{s=$2} /^ok /{if ($2==s) s=""} END{print s}' "$log")
      if [ -n "$bad" ]; then
        failed=$((failed + 1))
        echo "FAIL seed=$bad ($lua) $(describe_exit "$rc")"
        tail -n 3 "$log" | grep -v -e '^begin ' -e '^ok ' | sed 's/^/  | /' || true
        alone="$out/$lua-alone-$bad.log"
        arc=0
        run_batch "$lua" "$bad" 1 "$alone" || arc=$?
        if [ "$arc" -eq "$rc" ] && ! grep -q '^FAIL ' "$alone"; then
          repro "$lua" "$bad" 1
        else
          # not the same alone: the seeds run before it in the process are part of the case
          if [ "$arc" -eq 0 ]; then what="passes"
          elif grep -q '^FAIL ' "$alone"; then what="fails otherwise: $(grep -m1 '^FAIL ' "$alone" | cut -c1-120)"
          else what="$(describe_exit "$arc")"; fi
          echo "  (alone it $what; the seeds before it count)"
          repro "$lua" "$seed" "$count"
        fi
        seed=$((bad + 1))
      else
        # every seed of the batch passed, then the process died: at exit (lua_close)
        named=0
        for s in $(seq "$seed" $((seed + count - 1))); do
          arc=0
          run_batch "$lua" "$s" 1 "$out/$lua-exit-$s.log" || arc=$?
          if [ "$arc" -ne 0 ]; then
            named=1
            failed=$((failed + 1))
            passed=$((passed - 1))
            echo "FAIL seed=$s ($lua) $(describe_exit "$arc") at exit, after passing its checks"
            repro "$lua" "$s" 1
          fi
        done
        if [ "$named" -eq 0 ]; then
          failed=$((failed + 1))
          echo "FAIL seeds $seed..$((seed + count - 1)) ($lua) $(describe_exit "$rc") at exit;" \
            "no seed does alone"
          repro "$lua" "$seed" "$count"
        fi
        seed=$((seed + count))
      fi
    else
      seed=$((seed + count))
    fi
  done
  echo "$lua: $passed passed, $failed failed (seeds $from..$last, $(($(date +%s) - started)) s)"
  total_passed=$((total_passed + passed))
  total_failed=$((total_failed + failed))
done

echo "$total_passed passed, $total_failed failed"
[ "$total_failed" -eq 0 ]
