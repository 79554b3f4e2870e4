#!/usr/bin/env bash
# The exported C symbols match include/lunet_mem.h: every function the header declares is
# exported by the Lua module's library, which exports nothing else but its Lua loader and its
# allocation hooks; the Lua-free library (crates/lunet-mem-c) exports exactly the header's
# functions that take no lua_State. Run by scripts/c-tests.sh (plain and symbols):
#   bash tests/c/exports.sh target/.../liblunet_mem.so target/.../liblunet_mem_c.so
set -euo pipefail
cd "$(dirname "$0")/../.."
module_so=$1
c_only_so=$2

# The module's exports that the header does not declare: what `require` calls, and the
# allocators it installs on a state (exported so that each has one address, see src/hook.rs).
module_extras="luaopen_lunet_mem
lunet_mem_alloc_host
lunet_mem_alloc_host_traced
lunet_mem_alloc_mimalloc
lunet_mem_alloc_mimalloc_traced"

# The header's declarations, one a line (the preprocessor drops comments and macros; the system
# headers' declarations are filtered out by name), then the functions they declare.
declarations=$(gcc -E -P -DLUNET_TRACE -Iinclude include/lunet_mem.h | tr '\n' ' ' | tr ';' '\n' |
  grep -E '\blunet_[A-Za-z0-9_]+ *\(')
functions_of() { grep -oE '\blunet_[A-Za-z0-9_]+ *\(' | tr -d ' (' | sort -u; }
declared=$(functions_of <<<"$declarations")
declared_c_only=$(grep -v 'lua_State' <<<"$declarations" | functions_of)
exported() { nm -D --defined-only "$1" | awk '{print $3}' | sort -u; }

status=0
# compare WHAT EXPECTED ACTUAL: one line per symbol missing or extra.
compare() {
  local what=$1 expected=$2 actual=$3 missing extra
  missing=$(comm -23 <(echo "$expected") <(echo "$actual"))
  extra=$(comm -13 <(echo "$expected") <(echo "$actual"))
  if [ -n "$missing$extra" ]; then
    [ -z "$missing" ] || echo "$what: not exported: $(echo $missing)"
    [ -z "$extra" ] || echo "$what: exported but not expected: $(echo $extra)"
    status=1
  else
    echo "$what: exports the $(wc -l <<<"$actual") expected symbols"
  fi
}
compare "$module_so" "$(printf '%s\n%s\n' "$declared" "$module_extras" | sort -u)" "$(exported "$module_so")"
compare "$c_only_so" "$declared_c_only" "$(exported "$c_only_so")"
exit "$status"
