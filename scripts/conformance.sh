#!/usr/bin/env bash
# Conformance: runs the official upstream test suites with lunet.mem loaded in each mode and
# reports every difference from the bare interpreter's results.
#
#   bash scripts/conformance.sh [--suites DIR] [--lua INTERP]... [--modes m1,m2,...]
#                               [--env-from DIR] [--timeout SECONDS] [--keep-logs]
#
# --suites DIR   the upstream suites (default: $LUNET_MEM_SUITES, else ../shared/suites next to
#                the repository). Absent: prints a line starting "SKIPPED: conformance:", then
#                "0 passed, 0 failed", and exits 0.
# --lua INTERP   only this interpreter (repeatable; default: each one of SUITES installed here;
#                one with no suite, as lua5.1, is skipped)
# --modes LIST   default loaded,scope,arena,budget,trace,trace_sampled:
#                  loaded         the module loaded, nothing else
#                  scope          each file in mem.scope("file", ...)
#                  arena          each file in mem.scope({name = "file", arena = true}, ...)
#                  budget         each file in mem.scope({name = "file", limit = 2^40}, ...)
#                  trace          mem.trace.start() for the whole run (exact)
#                  trace_sampled  mem.trace.start{sample_bytes = 512 KiB} for the whole run
#                and in every mode, after each file (each test on LuaJIT),
#                mem.stats().live_bytes must equal collectgarbage("count") * 1024.
# --env-from DIR read the rock's LUA_PATH/LUA_CPATH export line (scripts/rock.sh's output)
#                from DIR/rock-INTERP.env
# --timeout S    the limit for one run of a suite (default 600 s; a run of one file: S/5, at
#                least 30 s): a hang fails, it does not stop CI
# --keep-logs    keep the logs (kept anyway when something failed; the path is printed)
#
# The rock (.luarocks/INTERP) is found, first match wins: --env-from DIR; the export line in
# $LUNET_MEM_ENV_<INTERP> (non-alphanumerics as `_`: LUNET_MEM_ENV_lua5_4); an exported
# LUA_CPATH that points into .luarocks/INTERP already, as in scripts/test.sh's
# `(eval "$env_line"; bash scripts/conformance.sh --lua "$lua")`; else `bash scripts/rock.sh
# INTERP`, which builds and installs it. The bare runs get the same paths, so that the module
# being loaded is the only difference.
#
# What is compared (tests/conformance/driver.lua runs the suites, in a copy of their folder):
# - PUC Lua: all.lua as the suite's README runs it (`lua -e "_U=true" all.lua`), each file it
#   runs wrapped in the mode; and each file of all.lua's list alone, one process each, as the
#   README runs one file (all.lua stops at the first failure; this way none hides another).
#   One test per interpreter x mode x file, all.lua counting as one: its outcome (ok, or
#   failing) must be the bare run's.
# - LuaJIT: test.lua, each of its tests wrapped in the mode. One test per mode: the failing
#   tests must be the bare run's (Debian's 2.1.0-beta3 fails 4 bare: 279 363 365 366). After
#   a crash the run goes on from the next test, so a crash hides nothing either.
# - First, the driver's bare run must give what the suite's own command gives, and each file
#   (test) must have gone through the mode's wrapper: else the fault is the driver's, and the
#   failure says so.
# Prints a line per interpreter x mode, each difference with the tail of its log, and ends with
# "N passed, N failed"; exits non-zero when something differs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
driver=$root/tests/conformance/driver.lua

# One line per interpreter: the command (on PATH, or a path), the suite's kind (puc: all.lua
# and its files; luajit: test.lua), its folder under the suites directory. lua5.5 and
# luajit-current are the project's own builds (scripts/lua55.sh, scripts/luajit.sh: .lua55/bin,
# .luajit/bin, put on PATH here); LuaJIT's suite runs on both LuaJITs.
SUITES=(
  "lua5.5 puc lua-5.5.0/testes"
  "lua5.4 puc lua-5.4.4/testes"
  "lua5.3 puc lua-5.3.6/testes"
  "luajit luajit luajit-tests/test"
  "luajit-current luajit luajit-tests/test"
)
export PATH="$root/.lua55/bin:$root/.luajit/bin:$PATH"
ALL_MODES=loaded,scope,arena,budget,trace,trace_sampled

suites=${LUNET_MEM_SUITES:-$root/../shared/suites}
wanted=()
modes=$ALL_MODES
env_from=
limit=600
keep_logs=0
while [ $# -gt 0 ]; do
  case "$1" in
    --suites) suites=${2:?--suites needs a directory}; shift 2 ;;
    --lua) wanted+=("${2:?--lua needs an interpreter}"); shift 2 ;;
    --modes) modes=${2:?--modes needs a list}; shift 2 ;;
    --env-from) env_from=${2:?--env-from needs a directory}; shift 2 ;;
    --timeout) limit=${2:?--timeout needs seconds}; shift 2 ;;
    --keep-logs) keep_logs=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "conformance.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
IFS=, read -r -a modes <<<"$modes"
for m in "${modes[@]}"; do
  case ",$ALL_MODES," in *",$m,"*) ;; *) echo "conformance.sh: unknown mode $m" >&2; exit 2 ;; esac
done
# is_one_of WORD LIST...: whether WORD is in LIST.
is_one_of() {
  local word=$1 item
  shift
  for item in "$@"; do [ "$item" = "$word" ] && return 0; done
  return 1
}

if [ ! -d "$suites" ]; then
  echo "SKIPPED: conformance: no upstream suites in $suites (--suites DIR or LUNET_MEM_SUITES=DIR)"
  echo "0 passed, 0 failed"
  exit 0
fi
suites=$(cd "$suites" && pwd)

logs=$(mktemp -d "${TMPDIR:-/tmp}/lunet-mem-conformance.XXXXXX")
passed=0
failed=0
failures=()
ran_any=0
# A per-file run gets a fifth of a whole suite's time limit (at least 30 s, or the limit).
floor=$(( limit < 30 ? limit : 30 ))
file_limit=$(( limit / 5 > floor ? limit / 5 : floor ))

pass() { passed=$((passed + ${2:-1})); [ -z "$1" ] || echo "ok   $1"; }
# fail NAME [LOG [HOW]]: one failing test, with what differs and the tail of its log.
fail() {
  failed=$((failed + 1))
  failures+=("$1")
  echo "FAIL $1${3:+: $3}"
  if [ -n "${2:-}" ] && [ -f "$2" ]; then
    echo "     log: $2"
    tail -n 25 "$2" | sed 's/^/     | /'
  fi
}

# run LOG SECONDS CMD...: CMD in the suite's copy, with a time limit; sets rc and took (ms).
run() {
  local log=$1 seconds=$2 start
  shift 2
  start=$(date +%s%N)
  # (in a command substitution with its stderr closed: the shell's own "Segmentation fault"
  # notice would come out of order; the crash is reported with the test it happened in)
  rc=$({ (cd "$work" && exec timeout -k 10 "$seconds" "$@") >"$log" 2>&1; echo $?; } 2>/dev/null)
  took=$(( ($(date +%s%N) - start) / 1000000 ))
}

# outcome LOG RC [OK_PATTERN]: "ok", or how the run failed: the first error line, a crash, a
# time-out.
outcome() {
  local log=$1 code=$2 ok_pattern=${3:-}
  if [ "$code" -eq 0 ] && { [ -z "$ok_pattern" ] || grep -aq "$ok_pattern" "$log"; }; then
    echo ok
  elif [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
    echo "timed out"
  elif [ "$code" -gt 128 ]; then
    echo "crashed (signal $((code - 128))) after: $(grep -a . "$log" | tail -n 1 | cut -c1-200)"
  else
    local first
    first=$(grep -a -m1 -E '^conformance: FAIL|^[^ ]*(lua|luajit)[0-9.]*: ' "$log" | cut -c1-300 || true)
    echo "fails (exit $code): ${first:-$(grep -a . "$log" | tail -n 1 | cut -c1-200)}"
  fi
}

# The number of files (tests) the driver ran through the mode's wrapper, from its last line.
wrapped_in() { sed -n 's/^conformance: \([0-9]*\) run in mode .*/\1/p' "$1" | tail -n 1; }

seconds() { awk -v ms="$1" 'BEGIN { printf "%.1f s", ms / 1000 }'; }

# rock_env INTERP: the export line that makes `require "lunet.mem"` find INTERP's rock.
rock_env() {
  local interp=$1 var
  var=LUNET_MEM_ENV_$(echo "$tag" | tr -c 'a-zA-Z0-9\n' '_')
  if [ -n "$env_from" ]; then
    cat "$env_from/rock-$tag.env"
  elif [ -n "${!var:-}" ]; then
    echo "${!var}"
  elif [[ "${LUA_CPATH:-}" == *"$root/.luarocks/$tag/"* ]]; then
    echo "export LUA_PATH='${LUA_PATH:-}' LUA_CPATH='$LUA_CPATH'"
  else
    bash scripts/rock.sh "$interp" 2>"$logs/rock-$tag.log"
  fi
}

# The failing test numbers of a LuaJIT test.lua log, space separated ("" when none failed).
luajit_failing() { sed -n 's/^to run just failing tests, pass command line arguments: //p' "$1" | tail -n 1; }
luajit_totals() { grep -aE '^[0-9]+ passed(, [0-9]+ failed)?$' "$1" | tail -n 1 || true; }
# luajit_test LOG N: test N's name and the first lines of its error, from a test.lua log.
luajit_test() {
  awk -v n="$2" '
    /^\[ *[0-9]+\/[0-9]+\] / { if (inside) exit; s = $0; sub(/^\[ */, "", s); sub(/\/.*/, "", s)
                              if (s + 0 == n) { inside = 1; print; next } }
    inside && shown < 6 { print "       " $0; shown++ }' "$1"
}

# conform_puc INTERP: all.lua and each of its files, bare and in each mode.
conform_puc() {
  local interp=$1 files f m log
  # The files all.lua runs, in its order: dofile('x.lua'), olddofile('x.lua'), loadfile('x.lua').
  mapfile -t files < <(grep -oE "(dofile|loadfile) *\( *['\"][A-Za-z0-9_]+\.lua" "$work/all.lua" \
    | grep -oE "[A-Za-z0-9_]+\.lua" | awk '!seen[$0]++')
  [ ${#files[@]} -gt 0 ] || { fail "$interp: no files found in all.lua"; return; }

  # The baseline, and the check that the driver runs the suite as its own command does.
  log=$logs/$tag-upstream-all.log
  run "$log" "$limit" "$interp" -e "_U=true" all.lua
  local upstream_all
  upstream_all=$(outcome "$log" "$rc" "final OK")
  log=$logs/$tag-bare-all.log
  run "$log" "$limit" "$interp" "$driver" bare puc-all
  local -A bare
  bare[all.lua]=$(outcome "$log" "$rc" "final OK")
  local bare_wrapped
  bare_wrapped=$(wrapped_in "$log")
  echo "     $interp bare all.lua: ${bare[all.lua]}, ${bare_wrapped:-no} files through the driver's wrapper ($(seconds "$took"))"
  if [ "${bare[all.lua]}" = ok ] && [ "${bare_wrapped:-0}" -eq 0 ]; then
    fail "$interp: the driver ran all.lua, but none of its files through its wrapper (fault of the driver)" "$log"
  elif [ "${bare[all.lua]}" = "$upstream_all" ]; then
    pass "$interp: the driver runs all.lua bare as \`$interp -e \"_U=true\" all.lua\` does ($upstream_all)"
  else
    fail "$interp: the driver's bare all.lua differs from the suite's own command (fault of the driver)" \
      "$log" "driver: ${bare[all.lua]}; \`$interp -e \"_U=true\" all.lua\`: $upstream_all"
  fi
  local bare_took=0 bare_failing=()
  for f in "${files[@]}"; do
    log=$logs/$tag-bare-$f.log
    run "$log" "$file_limit" "$interp" "$driver" bare puc-file "$f"
    bare[$f]=$(outcome "$log" "$rc")
    bare_took=$((bare_took + took))
    [ "${bare[$f]}" = ok ] || bare_failing+=("$f")
  done
  echo "     $interp bare, file by file: ${#files[@]} files, ${#bare_failing[@]} failing" \
    "${bare_failing[*]:+(${bare_failing[*]}) }($(seconds "$bare_took"))"

  for m in "${modes[@]}"; do
    local mode_took=0 mode_passed=0 mode_failed=0 got what
    for f in all.lua "${files[@]}"; do
      log=$logs/$tag-$m-$f.log
      if [ "$f" = all.lua ]; then
        run "$log" "$limit" "$interp" "$driver" "$m" puc-all
        got=$(outcome "$log" "$rc" "final OK")
        if [ "$got" = ok ] && [ "$(wrapped_in "$log")" != "$bare_wrapped" ]; then
          got="ran $(wrapped_in "$log") files in the mode, bare $bare_wrapped (fault of the driver)"
        fi
      else
        run "$log" "$file_limit" "$interp" "$driver" "$m" puc-file "$f"
        got=$(outcome "$log" "$rc")
        if [ "$got" = ok ] && [ "$(wrapped_in "$log")" != 1 ]; then
          got="did not run the file in the mode (fault of the driver)"
        fi
      fi
      mode_took=$((mode_took + took))
      what="$interp $m $f"
      [ "$f" = all.lua ] || what="$what (alone)"
      if [ "$got" = "${bare[$f]}" ]; then
        pass "" && mode_passed=$((mode_passed + 1))
      else
        mode_failed=$((mode_failed + 1))
        fail "$what" "$log" "with lunet.mem: $got; bare: ${bare[$f]}"
      fi
    done
    echo "$([ "$mode_failed" -eq 0 ] && echo "ok  " || echo "--  ") $interp $m: all.lua and" \
      "${#files[@]} files, $mode_passed as bare, $mode_failed differ ($(seconds "$mode_took"))"
  done
}

# luajit_suite LOG CMD...: runs test.lua (CMD: the interpreter and its arguments up to the
# test.lua arguments) in parts: after a crash, the next part runs the tests after the one that
# crashed, so a crash hides nothing. Sets lj_failing (the failing test numbers, a crash
# included, sorted), lj_crashed, lj_run (tests run), lj_wrapped (tests the driver ran in the
# mode, from the parts that finished), lj_unfinished (a part that ended without a summary and
# without a crash to resume from: a time-out), lj_end_checks (the driver's checks at the end
# that failed: "conformance: FAIL" lines), took (ms, all parts); LOG gets every part's log.
luajit_suite() {
  local log=$1 part=0 total_took=0 last n total passed_ failed_ numbers=()
  shift
  lj_failing=() lj_crashed=() lj_run=0 lj_wrapped=0 lj_unfinished= lj_end_checks=
  : >"$log"
  while :; do
    part=$((part + 1))
    run "$log.$part" "$limit" "$@" "${numbers[@]}"
    total_took=$((total_took + took))
    cat "$log.$part" >>"$log"
    read -r passed_ failed_ < <(luajit_totals "$log.$part" | awk '{print $1, ($3 == "" ? 0 : $3)}') || true
    if [ -n "${passed_:-}" ]; then
      lj_run=$((lj_run + passed_ + failed_))
      n=$(wrapped_in "$log.$part")
      lj_wrapped=$((lj_wrapped + ${n:-0}))
      # (test.lua lists the failing numbers unless every test failed)
      if [ "$failed_" -gt 0 ] && [ -z "$(luajit_failing "$log.$part")" ]; then
        # shellcheck disable=SC2207
        lj_failing+=($(luajit_failed_before_crash "$log.$part"))
      else
        # shellcheck disable=SC2207
        lj_failing+=($(luajit_failing "$log.$part"))
      fi
      break
    fi
    # No summary: the last test announced is the one that did not finish.
    last=$(grep -aoE '^\[ *[0-9]+/[0-9]+\]' "$log.$part" | tail -n 1 | tr -d '[] ')
    if [ "$rc" -le 128 ] || [ "$rc" -eq 137 ] || [ -z "$last" ]; then
      lj_unfinished=$(outcome "$log.$part" "$rc")
      break
    fi
    n=${last%/*} total=${last#*/}
    lj_crashed+=("$n")
    lj_failing+=("$n")
    # The tests it ran before the crash: every one announced in this part but the last.
    lj_run=$((lj_run + $(grep -acE '^\[ *[0-9]+/[0-9]+\]' "$log.$part")))
    # shellcheck disable=SC2207
    lj_failing+=($(luajit_failed_before_crash "$log.$part"))
    [ "$n" -lt "$total" ] || break
    mapfile -t numbers < <(seq $((n + 1)) "$total")
  done
  # shellcheck disable=SC2207
  lj_failing=($(printf '%s\n' "${lj_failing[@]}" | sort -n | uniq))
  lj_end_checks=$(grep -a '^conformance: FAIL' "$log" | head -n 3 || true)
  took=$total_took
}

# The tests that failed, from the log of a part that has no list of them (it crashed, or all
# its tests failed): a test announced and followed by its error, before the next one.
luajit_failed_before_crash() {
  awk '/^\[ *[0-9]+\/[0-9]+\] / { if (n != "" && extra) print n; s = $0; sub(/^\[ */, "", s); sub(/\/.*/, "", s)
                                   n = s; extra = 0; next }
       /^[0-9]+ passed/ { if (n != "" && extra) print n; n = ""; next }
       /^conformance: (FAIL|[0-9]+ run in mode)/ { next }
       { extra = 1 }' "$1"
}

# conform_luajit INTERP: test.lua, bare and in each mode; the failing tests must be the same.
conform_luajit() {
  local interp=$1 log m n
  log=$logs/$tag-upstream.log
  run "$log" "$limit" "$interp" test.lua
  local upstream="$(luajit_totals "$log"), failing: $(luajit_failing "$log")"
  log=$logs/$tag-bare.log
  luajit_suite "$log" "$interp" "$driver" bare luajit
  local bare_failing="${lj_failing[*]}" bare_run=$lj_run
  local bare="$((lj_run - ${#lj_failing[@]})) passed, ${#lj_failing[@]} failed, failing: $bare_failing"
  [ ${#lj_failing[@]} -gt 0 ] || bare="$lj_run passed, failing: "
  echo "     $interp bare test.lua: $bare ($(seconds "$took"))"
  if [ -n "$lj_unfinished" ] || [ ${#lj_crashed[@]} -gt 0 ]; then
    fail "$interp: the driver's bare test.lua did not finish" "$log" "${lj_unfinished:-crashed in ${lj_crashed[*]}}"
    return
  elif [ "$lj_wrapped" -ne "$lj_run" ]; then
    fail "$interp: the driver ran $lj_wrapped of $lj_run tests through its wrapper (fault of the driver)" "$log"
    return
  elif [ "$bare" = "$upstream" ]; then
    pass "$interp: the driver runs test.lua bare as \`$interp test.lua\` does (${bare%%, failing*})"
  else
    fail "$interp: the driver's bare test.lua differs from \`$interp test.lua\` (fault of the driver)" \
      "$log" "driver: $bare; upstream: $upstream"
  fi

  for m in "${modes[@]}"; do
    log=$logs/$tag-$m.log
    luajit_suite "$log" "$interp" "$driver" "$m" luajit
    local failing="${lj_failing[*]}" totals="$lj_run run, ${#lj_failing[@]} failed"
    [ ${#lj_crashed[@]} -eq 0 ] || totals="$totals (crashed in ${lj_crashed[*]}: the run went on after each)"
    if [ -n "$lj_unfinished" ]; then
      fail "$interp $m test.lua" "$log" "with lunet.mem: $lj_unfinished ($(seconds "$took"))"
    elif [ "$failing" = "$bare_failing" ] && [ "$lj_run" -eq "$bare_run" ] && [ ${#lj_crashed[@]} -eq 0 ]; then
      if [ -n "$lj_end_checks" ]; then
        fail "$interp $m test.lua" "$log" "at the end of the run: $lj_end_checks"
      elif [ "$lj_wrapped" -eq "$lj_run" ]; then
        pass "$interp $m: test.lua: $totals, the same failing tests as bare ($(seconds "$took"))"
      else
        fail "$interp $m test.lua" "$log" "the driver ran $lj_wrapped of $lj_run tests in the mode (fault of the driver)"
      fi
    else
      fail "$interp $m test.lua" "" "with lunet.mem: $totals; bare: $bare_run run, failing: $bare_failing ($(seconds "$took"); log: $log)"
      local shown=0 differing
      differing=$(comm -3 <(tr ' ' '\n' <<<"$failing" | sort) <(tr ' ' '\n' <<<"$bare_failing" | sort) | tr -d '\t' | sort -n)
      for n in $differing; do
        shown=$((shown + 1))
        if [ "$shown" -gt 20 ]; then
          echo "     ... and $(( $(wc -w <<<"$differing") - 20 )) more tests (log: $log)"
          break
        fi
        if [[ " $failing " == *" $n "* ]]; then
          if [[ " ${lj_crashed[*]} " == *" $n "* ]]; then echo "     crashes with lunet.mem only:"
          else echo "     fails with lunet.mem only:"; fi
          luajit_test "$log" "$n" | sed 's/^\[/       [/'
        else
          echo "     fails bare only: $(luajit_test "$logs/$tag-bare.log" "$n" | head -n 1)"
        fi
      done
    fi
  done
}

echo "conformance: suites in $suites; modes: ${modes[*]}; logs in $logs"
# (an interpreter with no suite is skipped, so that a caller can loop over all it supports)
for w in "${wanted[@]}"; do
  is_one_of "$w" "${SUITES[@]%% *}" || echo "skip $w: no upstream suite for it in SUITES ($0)"
done
for line in "${SUITES[@]}"; do
  read -r interp kind folder <<<"$line"
  tag=$(basename "$interp") # in file names
  if [ ${#wanted[@]} -gt 0 ] && ! is_one_of "$interp" "${wanted[@]}"; then continue; fi
  if ! command -v "$interp" >/dev/null; then
    if [ ${#wanted[@]} -gt 0 ]; then fail "$interp: not installed"; else echo "skip $interp: not installed"; fi
    continue
  fi
  if [ ! -d "$suites/$folder" ]; then
    echo "skip $interp: no $folder in $suites"
    continue
  fi
  ran_any=1
  echo "== $interp: $folder"
  # A copy of the suite: the upstream folder stays untouched (it may be read-only, and a test
  # may write next to itself).
  work=$logs/suite-$tag
  cp -R "$suites/$folder" "$work"
  chmod -R u+w "$work"
  # The rock's paths for this interpreter only; the bare runs get them too, so that the only
  # difference between the runs is the module being loaded.
  unset LUA_INIT LUA_INIT_5_1 LUA_INIT_5_2 LUA_INIT_5_3 LUA_INIT_5_4 LUA_INIT_5_5
  if ! env_line=$(rock_env "$interp"); then
    fail "$interp: no rock (scripts/rock.sh $interp)" "$logs/rock-$tag.log"
    continue
  fi
  unset LUA_PATH LUA_CPATH LUA_PATH_5_5 LUA_CPATH_5_5
  eval "$env_line"
  export LUA_PATH LUA_CPATH
  # The module must load (the rock may be being rebuilt: a few tries).
  loads=0
  for try in 1 2 3; do
    if loaded_from=$("$interp" -e 'require "lunet.mem"
      local find = package.searchpath or function() end
      io.write(find("lunet.mem", package.cpath) or find("lunet.mem", package.path) or "?")' 2>&1); then
      loads=1
      break
    fi
    if [ "$try" -lt 3 ]; then sleep 5; fi
  done
  if [ "$loads" -eq 0 ]; then
    fail "$interp: require \"lunet.mem\" fails" "" "$loaded_from"
    continue
  fi
  echo "     lunet.mem: $loaded_from"
  case "$kind" in
    puc) conform_puc "$interp" ;;
    luajit) conform_luajit "$interp" ;;
    *) fail "$interp: unknown suite kind $kind" ;;
  esac
done

echo
if [ "$ran_any" -eq 0 ] && [ "$failed" -eq 0 ]; then
  echo "SKIPPED: conformance: no interpreter with its suite in $suites"
fi
if [ ${#failures[@]} -gt 0 ]; then
  printf 'differs: %s\n' "${failures[@]}"
  echo "logs kept in $logs"
elif [ "$keep_logs" -eq 1 ]; then
  echo "logs kept in $logs"
else
  rm -rf "$logs"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
