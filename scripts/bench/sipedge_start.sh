#!/usr/bin/env bash
# PROXY_START adapter: runs sipedge where the shared SIPp harness (bench/run_bench.sh,
# tools/bench.py) expects "our Rust proxy", so the harness measures it exactly like Kamailio.
#
# What it does (every file in a run dir, never in the repo):
#   - writes $SIPEDGE_RUNDIR/sipedge.toml: udp+tcp 127.0.0.1:5060, domains ["127.0.0.1"],
#     SQLite DB in the run dir, registrar max_expires 3600, relay_foreign "deny" (Kamailio bench
#     config answers 403 for foreign domains), [[route]] pbx ^[0-9]{3,4}$ -> 127.0.0.1:5070 and
#     provider ^1[0-9]{10}$ (auth) -> 127.0.0.1:5080 (the harness' UAS ports)
#   - imports subscribers SUBSCRIBER_FIRST..SUBSCRIBER_LAST (1000..1999) with password pw<id>
#     (the harness' sipp/users.csv format, `sipedge user import`; idempotent)
#   - starts `target/release/sipedge serve` in the background with RUST_LOG=$SIPEDGE_LOG
#     (default warn), stderr appended to $SIPEDGE_RUNDIR/sipedge.log, PID in $SIPEDGE_PIDFILE
#     (= the harness' PROXY_PIDFILE)
#   - waits (at most ~15 s) until an OPTIONS over UDP to 127.0.0.1:5060 gets 200
#
#   MEDIA=0|1 (set by the harness): 1 = routes with media "always", 0 = media "never"
#   SIPEDGE_MEDIA_PORTS=20000-59999 (media.ports: rtpengine's range in the harness' run.sh)
#   SIPEDGE_MAX_SESSIONS=10000 (media.max_sessions and max_sessions_per_caller: every SIPp call
#   comes from 127.0.0.1; rtpengine has no such limit; 10000 = half the port pairs of the range)
#   SIPEDGE_CONTROL=127.0.0.1:8060 (control endpoint: `sipedge show`, /api/stats, /metrics)
#   SIPEDGE_NOFILE=65536 (ulimit -n for sipedge: the relay holds 4 sockets per relayed call)
#   RUNDIR=/tmp/sipbench  SIPEDGE_RUNDIR=$RUNDIR/sipedge  SIPEDGE_PIDFILE=$SIPEDGE_RUNDIR/sipedge.pid
#   SIPEDGE_BIN=<repo>/target/release/sipedge  SIPEDGE_WORKERS=0 (0 = half the cores, at least one)
#   SIPEDGE_LOG=warn (RUST_LOG of the server; info logs e.g. the transaction counts at shutdown)
#
# Run by hand:  scripts/bench/sipedge_start.sh && scripts/bench/sipedge_stop.sh
# Exit: 0 when sipedge answers, 1 otherwise (with the tail of its log).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
RUNDIR=${RUNDIR:-/tmp/sipbench}
SIPEDGE_RUNDIR=${SIPEDGE_RUNDIR:-$RUNDIR/sipedge}
SIPEDGE_PIDFILE=${SIPEDGE_PIDFILE:-$SIPEDGE_RUNDIR/sipedge.pid}
SIPEDGE_BIN=${SIPEDGE_BIN:-$root/target/release/sipedge}
SIPEDGE_WORKERS=${SIPEDGE_WORKERS:-0}
SUBSCRIBER_FIRST=${SUBSCRIBER_FIRST:-1000}
SUBSCRIBER_LAST=${SUBSCRIBER_LAST:-1999}
MEDIA=${MEDIA:-0}
SIPEDGE_LOG=${SIPEDGE_LOG:-warn}
SIPEDGE_MEDIA_PORTS=${SIPEDGE_MEDIA_PORTS:-20000-59999}
SIPEDGE_MAX_SESSIONS=${SIPEDGE_MAX_SESSIONS:-10000}
SIPEDGE_CONTROL=${SIPEDGE_CONTROL:-127.0.0.1:8060}
SIPEDGE_NOFILE=${SIPEDGE_NOFILE:-65536}

cfg=$SIPEDGE_RUNDIR/sipedge.toml
log=$SIPEDGE_RUNDIR/sipedge.log
mkdir -p "$SIPEDGE_RUNDIR"

if [ ! -x "$SIPEDGE_BIN" ]; then
    echo "sipedge_start: $SIPEDGE_BIN not found; run: cargo build --release" >&2
    exit 1
fi
if [ -f "$SIPEDGE_PIDFILE" ] && kill -0 "$(cat "$SIPEDGE_PIDFILE")" 2>/dev/null; then
    echo "sipedge already running pid $(cat "$SIPEDGE_PIDFILE")"
    exit 0
fi

if [ "$MEDIA" = 1 ]; then media=always; else media=never; fi
cat >"$cfg" <<TOML
# written by scripts/bench/sipedge_start.sh (benchmark run dir; not a deployment config)
[server]
listen = ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]
domains = ["127.0.0.1"]
relay_foreign = "deny"
workers = $SIPEDGE_WORKERS

[database]
url = "sqlite://$SIPEDGE_RUNDIR/sipedge.db"

[registrar]
max_expires = 3600

# Throughput, not flood protection, is measured here: finished UDP transactions are kept 32 s
# (RFC 3261 Timer J/K, RFC 6026 Timer L/M), so at N calls/s about 64·N of them are alive; the
# default limits.transactions (50,000) would refuse calls above ~780/s. Kamailio's bench config
# has no such cap (its tm lives in 2 GB of shm).
[limits]
transactions = 1000000
transactions_per_ip = 1000000

[media]
mode = "$media"
ports = "$SIPEDGE_MEDIA_PORTS"
max_sessions = $SIPEDGE_MAX_SESSIONS
max_sessions_per_caller = $SIPEDGE_MAX_SESSIONS

[control]
listen = "$SIPEDGE_CONTROL"

[[route]]
name = "pbx"
user = '^[0-9]{3,4}\$'
next_hop = "127.0.0.1:5070"
media = "$media"

[[route]]
name = "provider"
user = '^1[0-9]{10}\$'
next_hop = "127.0.0.1:5080"
auth = true
media = "$media"
TOML
"$SIPEDGE_BIN" check-config -c "$cfg" >"$SIPEDGE_RUNDIR/check-config.out" 2>&1 || {
    cat "$SIPEDGE_RUNDIR/check-config.out" >&2
    exit 1
}

users=$SIPEDGE_RUNDIR/users.csv
{
    echo SEQUENTIAL
    for i in $(seq "$SUBSCRIBER_FIRST" "$SUBSCRIBER_LAST"); do echo "$i;pw$i"; done
} >"$users"
"$SIPEDGE_BIN" --log-level warn user import -c "$cfg" "$users" >/dev/null

# Bounded readiness check: OPTIONS sip:127.0.0.1 over UDP must get "SIP/2.0 200".
probe() {
    python3 - <<'PY'
import socket, sys, uuid
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.settimeout(0.3)
port = s.getsockname()[1]
b = uuid.uuid4().hex
msg = ("OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n"
       "Via: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK%s;rport\r\n"
       "From: <sip:probe@127.0.0.1>;tag=%s\r\nTo: <sip:127.0.0.1>\r\n"
       "Call-ID: %s@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
       "Content-Length: 0\r\n\r\n") % (port, b, b[:8], b)
s.sendto(msg.encode(), ("127.0.0.1", 5060))
try:
    data = s.recv(65535)
except OSError:
    sys.exit(1)
sys.exit(0 if data.startswith(b"SIP/2.0 200") else 1)
PY
}
# Something else already answering on 5060 would pass the readiness check for a sipedge that
# cannot bind: refuse instead.
if probe; then
    echo "sipedge_start: something already answers SIP on 127.0.0.1:5060 (not started by this script)" >&2
    exit 1
fi

# The relay holds 4 sockets per relayed call (a caller-facing and a callee-facing RTP/RTCP
# pair): at 2,500 calls/s x 1 s hold that is 10,000 fds, far above the usual soft limit of
# 1024 (rtpengine and Kamailio raise their own). sipedge does not raise it itself.
ulimit -n "$SIPEDGE_NOFILE" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "=== sipedge_start $(date -Is) MEDIA=$MEDIA workers=$SIPEDGE_WORKERS RUST_LOG=$SIPEDGE_LOG" >>"$log"
# stdin/stdout/stderr detached from the caller: the harness may read our stdout through a pipe.
RUST_LOG=$SIPEDGE_LOG "$SIPEDGE_BIN" serve -c "$cfg" </dev/null >>"$log" 2>&1 &
pid=$!
echo "$pid" >"$SIPEDGE_PIDFILE"

for _ in $(seq 1 30); do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "sipedge_start: sipedge exited during start-up; log $log:" >&2
        tail -n 20 "$log" >&2
        rm -f "$SIPEDGE_PIDFILE"
        exit 1
    fi
    if probe && kill -0 "$pid" 2>/dev/null; then
        echo "sipedge pid $pid listening on 127.0.0.1:5060 (udp+tcp) media=$media cfg=$cfg"
        exit 0
    fi
    sleep 0.2
done
echo "sipedge_start: no 200 to OPTIONS on 127.0.0.1:5060 within ~15 s; log $log:" >&2
tail -n 20 "$log" >&2
kill -TERM "$pid" 2>/dev/null || true
rm -f "$SIPEDGE_PIDFILE"
exit 1
