# Helpers shared by tests/server.sh and bench/server.sh (sourced; bash).

# start_server LUA MODE OUT ERR SECONDS: runs examples/server.lua on a free port of 127.0.0.1,
# bounded to SECONDS, with its stdout in OUT and stderr in ERR; sets `server_pid`, and `port`
# (empty if the server did not say "listening on <port>").
start_server() {
  timeout "$5" "$1" examples/server.lua 0 "$2" >"$3" 2>"$4" &
  server_pid=$!
  port=
  for _ in $(seq 1 200); do
    port=$(sed -n 's/^listening on \([0-9][0-9]*\)$/\1/p' "$3" | head -n 1)
    [ -n "$port" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
}

# get PATH: one request on a connection of its own (bash's /dev/tcp), the response on stdout.
get() {
  timeout 20 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" "$2" >&3
    cat <&3' _ "$port" "$1"
}
