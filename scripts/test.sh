#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine:
#   bash scripts/test.sh
# Installs what it needs (scripts/setup.sh), then runs: cargo fmt, clippy for every Lua
# feature, luacheck, the Rust tests on mlua's vendored LuaJIT and Lua 5.4, `luarocks make` and
# the busted specs on seven interpreters (Debian's luajit 2.1.0-beta3, a current LuaJIT 2.1
# built by scripts/luajit.sh as luajit-current, lua5.1 to lua5.4, and lua5.5 built by
# scripts/lua55.sh), and on each the examples, a 10^5-request soak, lua_close with live arenas,
# heap profiles read by `go tool pprof` (tests/pprof.sh), the upstream test suites in every
# mode (scripts/conformance.sh) and the seeded fuzzer (scripts/fuzz.sh, LUNET_MEM_FUZZ_SEEDS
# seeds, 100 by default); where Debian has lua-luv (all but lua5.5), 8 luv threads, the luv
# server under wrk (tests/server.sh) and scraped by a real Prometheus (tests/prometheus.sh),
# these two on the four Debian interpreters that ran them before and luajit-current (not
# lua5.2: time); the C API's
# proof (scripts/c-tests.sh: plain, ASan, valgrind, misuse); the Lua 5.4 specs and lua_close
# under valgrind. Ends with one line: "N passed, N failed", counting every test of every suite.
# With CI=true it frees each cargo target folder once its step is done (and builds without
# incremental caches): a run keeps one or two build folders at a time (the largest ~0.8 GB) instead
# of 5 GB at its end, and a CI machine's disk can be small (a run whose disk filled failed every
# build after the specs).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
ci=false
case "${CI:-}" in true|1|yes) ci=true; export CARGO_INCREMENTAL=0 ;; esac

# done_with DIR...: on CI, the build folders a step no longer needs go (the disk's free space is
# printed at the end, to see what a run needed).
done_with() {
  [ "$ci" = true ] || return 0
  rm -rf "$@"
}

bash scripts/setup.sh || { echo "setup failed"; echo "0 passed, 1 failed"; exit 1; }

passed=0
failed=0
failures=()
log_dir=$(mktemp -d)

# check NAME CMD...: one test that passes when CMD succeeds.
check() {
  local name=$1
  shift
  local log="$log_dir/$(echo "$name" | tr -c 'a-zA-Z0-9' '_').log"
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    echo "ok   $name"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "FAIL $name"
    tail -n 40 "$log" | sed 's/^/     /'
  fi
}

# count NAME PASSED FAILED LOG: a suite that reported its own counts.
count() {
  local name=$1 p=$2 f=$3 log=$4
  passed=$((passed + p))
  failed=$((failed + f))
  if [ "$f" -eq 0 ] && [ "$p" -gt 0 ]; then
    echo "ok   $name: $p passed"
  else
    [ "$p" -eq 0 ] && [ "$f" -eq 0 ] && failed=$((failed + 1)) && f=1
    failures+=("$name")
    echo "FAIL $name: $p passed, $f failed"
    # (a TAP failure with the diagnostic lines under it; other suites' error lines)
    awk '/^not ok/ { shown = 1; print; next }
         shown && /^#/ { print; next }
         { shown = 0 }
         !/^ok / && /panicked|FAILED|Error|error/ { print }' "$log" | head -n 80 | sed 's/^/     /'
    tail -n 20 "$log" | sed 's/^/     /'
  fi
}

features=(luajit lua51 lua52 lua53 lua54 lua55)
interpreters=(luajit luajit-current lua5.1 lua5.2 lua5.3 lua5.4 lua5.5)
# (the interpreters the project builds: scripts/rock.sh builds them on first use)
export PATH="$root/.lua55/bin:$root/.luajit/bin:$PATH"

echo "== style"
check "cargo fmt --check" cargo fmt --all -- --check
for f in "${features[@]}"; do
  check "cargo clippy ($f,module)" cargo clippy --locked --no-default-features --features "$f,module" \
    --target-dir "target/clippy-$f" -- -D warnings
  done_with "target/clippy-$f"
done
check "cargo clippy (lua54,vendored, tests)" cargo clippy --locked --no-default-features \
  --features lua54,vendored --all-targets --target-dir target/vendored-lua54 -- -D warnings
check "cargo clippy (lunet-mem-c, tests)" cargo clippy --locked -p lunet-mem-c --all-targets \
  --target-dir target/c-crate -- -D warnings
check "luacheck" luacheck --no-color lua spec examples bench tests
check "module graph has no cycles" bash tests/module_graph.sh

echo "== rust tests (mlua's vendored Lua), with each allocator"
for f in lua54 luajit lua55; do
  for allocator in mimalloc host; do
    log="$log_dir/cargo-test-$f-$allocator.log"
    LUNET_MEM_ALLOCATOR=$allocator cargo test --locked --no-default-features --features "$f,vendored" \
      --target-dir "target/vendored-$f" >"$log" 2>&1
    p=$(grep -Eo "test result: [a-zA-Z]+\. [0-9]+ passed" "$log" | awk '{s += $4} END {print s + 0}')
    f_=$(grep -Eo "[0-9]+ failed" "$log" | awk '{s += $1} END {print s + 0}')
    if ! grep -q "test result" "$log"; then f_=1; fi
    count "cargo test ($f,vendored, $allocator)" "$p" "$f_" "$log"
  done
  done_with "target/vendored-$f"
done

log="$log_dir/cargo-test-c-crate.log"
cargo test --locked -p lunet-mem-c --target-dir target/c-crate >"$log" 2>&1
p=$(grep -Eo "test result: [a-zA-Z]+\. [0-9]+ passed" "$log" | awk '{s += $4} END {print s + 0}')
f_=$(grep -Eo "[0-9]+ failed" "$log" | awk '{s += $1} END {print s + 0}')
if ! grep -q "test result" "$log"; then f_=1; fi
count "cargo test (lunet-mem-c, no Lua)" "$p" "$f_" "$log"
done_with target/c-crate

echo "== luarocks make + busted"
for lua in "${interpreters[@]}"; do
  log="$log_dir/rock-$lua.log"
  # (lua5.5 is built from the sources in the upstream suites folder: without it, no 5.5)
  if [ "$lua" = lua5.5 ] && { bash scripts/lua55.sh >"$log" 2>&1; [ $? -eq 3 ]; }; then
    echo "skip $lua: $(tail -n 1 "$log")"
    continue
  fi
  if ! env_line=$(bash scripts/rock.sh "$lua" 2>"$log"); then
    count "luarocks make ($lua)" 0 1 "$log"
    continue
  fi
  check "luarocks make ($lua)" true
  allocators=(mimalloc)
  case "$lua" in luajit|luajit-current|lua5.4|lua5.5) allocators+=(host) ;; esac
  for allocator in "${allocators[@]}"; do
    log="$log_dir/busted-$lua-$allocator.log"
    # (lua5.5: Debian's busted stack, made for 5.1-5.4, through tests/busted55/compat.lua)
    (eval "$env_line"; export LUNET_MEM_LUA=$lua LUNET_MEM_ALLOCATOR=$allocator
     [ "$lua" != lua5.5 ] || export LUA_INIT_5_5="@$root/tests/busted55/compat.lua"
     busted --lua="$lua" -o TAP) >"$log" 2>&1
    p=$(grep -cE "^ok [0-9]+" "$log" | tr -d ' ')
    s=$(grep -cE "^ok [0-9]+.*# SKIP" "$log" | tr -d ' ')
    f_=$(grep -cE "^not ok [0-9]+" "$log" | tr -d ' ')
    count "busted ($lua, $allocator)" "$((p - s))" "$f_" "$log"
  done
  check "demo ($lua)" bash -c "$env_line; $lua examples/demo.lua | tee /dev/stderr | grep -q 'leak in \"GET /leaky\"'"
  check "quick example ($lua)" bash -c "$env_line; $lua examples/quick.lua | tee /dev/stderr | grep -q 'leak in \"GET /users\"'"
  check "soak: 10^5 arena-scoped requests, memory flat ($lua)" bash -c "$env_line; $lua bench/soak.lua 100000"
  check "lua_close with live arenas, scopes, budgets ($lua)" bash -c "$env_line; $lua tests/lua/close_with_arenas.lua | grep -qx ok"
  check "lunet-mem run --flamegraph, installed by the rock ($lua)" bash -c "$env_line
    .luarocks/$lua/bin/lunet-mem run --lua $lua --flamegraph '$log_dir/run-$lua.svg' examples/quick.lua >/dev/null
    grep -q '<svg' '$log_dir/run-$lua.svg' && grep -q 'quick.lua' '$log_dir/run-$lua.svg'"
  if [ "$lua" = lua5.5 ]; then
    echo "skip luv threads, server under wrk, Prometheus ($lua): Debian has no lua-luv for 5.5"
  else
    check "8 luv threads, each with its own state and scopes, count alone ($lua)" bash -c "$env_line; timeout 120 $lua tests/lua/luv_threads.lua"
  fi
  case "$lua" in
    lua5.2|lua5.5)
      [ "$lua" = lua5.5 ] || echo "skip server under wrk, Prometheus ($lua): run on the other interpreters (time)" ;;
    *)
      log="$log_dir/server-$lua.log"
      bash tests/server.sh "$lua" >"$log" 2>&1
      count "server under wrk ($lua)" "$(grep -c '^ok - ' "$log")" "$(grep -c '^not ok - ' "$log")" "$log"
      log="$log_dir/prometheus-$lua.log"
      bash tests/prometheus.sh "$lua" >"$log" 2>&1
      read -r p f < <(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$log" | tail -n 1)
      count "mem.metrics scraped by a real Prometheus ($lua)" "${p:-0}" "${f:-1}" "$log" ;;
  esac
  log="$log_dir/pprof-$lua.log"
  (eval "$env_line"; bash tests/pprof.sh "$lua") >"$log" 2>&1
  read -r p f < <(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$log" | tail -n 1)
  count "snap:pprof read by go tool pprof ($lua)" "${p:-0}" "${f:-1}" "$log"
  # The upstream suites (../shared/suites, or $LUNET_MEM_SUITES) in every mode; an interpreter
  # with no suite here (5.1, 5.2) is covered by the fuzzer.
  log="$log_dir/conformance-$lua.log"
  (eval "$env_line"; bash scripts/conformance.sh --lua "$lua") >"$log" 2>&1
  if grep -q '^SKIPPED: conformance:' "$log"; then
    echo "skip upstream suites ($lua): $(grep -m1 '^SKIPPED: conformance:' "$log")"
  else
    read -r p f < <(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$log" | tail -n 1)
    count "upstream suites with lunet.mem in every mode ($lua)" "${p:-0}" "${f:-1}" "$log"
  fi
  log="$log_dir/fuzz-$lua.log"
  (eval "$env_line"; bash scripts/fuzz.sh --lua "$lua" --seeds "${LUNET_MEM_FUZZ_SEEDS:-100}") >"$log" 2>&1
  read -r p f < <(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$log" | tail -n 1)
  count "fuzzer, seeded random programs ($lua)" "${p:-0}" "${f:-1}" "$log"
  [ "$lua" != lua5.4 ] || env_line54=$env_line
  # (luajit-current, next, builds into luajit's folder)
  [ "$lua" = luajit ] || done_with target/rock-*
done

echo "== the C API (tests/c): plain, ASan + LSan, valgrind, misuse; the Lua specs under valgrind"
for mode in plain asan valgrind misuse; do
  check "c-tests $mode" bash scripts/c-tests.sh "$mode"
done
# (Lua 5.5 where its sources were there to build it)
if [ -f .lua55/build/liblua.a ]; then
  check "c-tests lua55 (lua_newstate with a seed)" bash scripts/c-tests.sh lua55
fi
env_line=${env_line54:-$(bash scripts/rock.sh lua5.4 2>/dev/null)}
check "busted (lua5.4) under valgrind" bash -c "$env_line; export LUNET_MEM_LUA=lua5.4
  valgrind --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite \
    lua5.4 /usr/bin/busted -o TAP >/tmp/lunet-mem-valgrind.log 2>&1 || { tail -40 /tmp/lunet-mem-valgrind.log; exit 1; }
  ! grep -q '^not ok' /tmp/lunet-mem-valgrind.log"
check "lua_close with live arenas under valgrind (lua5.4)" bash -c "$env_line
  valgrind --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite \
    lua5.4 tests/lua/close_with_arenas.lua"

done_with target/c-lua54 target/c-lua55
rm -rf "$log_dir"
echo
echo "disk: $(df -h --output=used,avail . | tail -n 1 | awk '{print $1 " used, " $2 " free"}'), builds $(du -sh target 2>/dev/null | cut -f1)"
if [ ${#failures[@]} -gt 0 ]; then
  echo "failed: ${failures[*]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
