#!/usr/bin/env bash
# Interop tests with real peers: SIPp scenarios against a freshly started sipedge on loopback.
# Needs SIPp (Debian package sip-tester). Every run is bounded in calls and time.
#
#   scripts/interop.sh            # build (release), start sipedge on 127.0.0.1, run every scenario
#
# Exits non-zero if a scenario fails or a tool is missing; never skips silently.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

if ! command -v sipp >/dev/null 2>&1; then
    echo "interop: sipp not found; install it with: apt-get install -y sip-tester" >&2
    exit 1
fi

work=$(mktemp -d /tmp/sipedge-interop.XXXXXX)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --quiet
bin="$root/target/release/sipedge"

# Pick free ports in a high range (loopback only).
port=$(( 20000 + RANDOM % 20000 ))
cat > "$work/sipedge.toml" <<TOML
[server]
listen = ["udp:127.0.0.1:$port", "tcp:127.0.0.1:$port"]
domains = ["127.0.0.1"]
[database]
url = "sqlite://$work/sipedge.db"
TOML

"$bin" check-config -c "$work/sipedge.toml" >/dev/null 2>&1
RUST_LOG=info "$bin" serve -c "$work/sipedge.toml" 2>"$work/sipedge.log" &
server_pid=$!

# Wait (bounded) until the server answers.
for _ in $(seq 1 50); do
    if grep -q "sipedge started" "$work/sipedge.log" 2>/dev/null; then break; fi
    sleep 0.1
done
grep -q "sipedge started" "$work/sipedge.log" || { cat "$work/sipedge.log" >&2; echo "interop: server did not start" >&2; exit 1; }

failed=0
# run NAME TRANSPORT SCENARIO CALLS RATE
run() {
    local name=$1 transport=$2 scenario=$3 calls=$4 rate=$5
    local sipp_log="$work/$name"
    if timeout 60 sipp -sf "$root/scripts/sipp/$scenario" -t "$transport" \
        -i 127.0.0.1 -p 0 -m "$calls" -r "$rate" -l 50 \
        -timeout 30s -timeout_error -max_recv_loops 1000 \
        -trace_stat -stf "$sipp_log.csv" -trace_err -error_file "$sipp_log.err" \
        -nostdin "127.0.0.1:$port" >"$sipp_log.out" 2>&1; then
        echo "ok    $name ($calls calls over $transport)"
    else
        echo "FAIL  $name (sipp exit $?)"
        tail -n 20 "$sipp_log.out" "$sipp_log.err" 2>/dev/null || true
        failed=1
    fi
}

run options-udp  u1 options.xml    200 100
run options-tcp  t1 options.xml    200 100
run invite-404   u1 invite_404.xml 100 50

if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "FAIL  sipedge exited during the run" >&2
    cat "$work/sipedge.log" >&2
    failed=1
fi
if grep -q "panicked" "$work/sipedge.log"; then
    echo "FAIL  sipedge panicked" >&2
    failed=1
fi
exit $failed
