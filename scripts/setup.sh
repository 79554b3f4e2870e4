#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine: interpreters, headers, busted,
# luarocks, luacheck's dependencies, Go (its `go tool pprof` reads the heap profiles) and the
# Rust components. Safe to run again.
set -euo pipefail

pkgs=(luajit libluajit-5.1-dev lua5.1 liblua5.1-0-dev lua5.2 liblua5.2-dev lua5.3 liblua5.3-dev lua5.4 liblua5.4-dev
      lua-busted luarocks lua-check pkg-config gcc make valgrind libuv1-dev lua-luv wrk
      prometheus golang-go)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt || true
