#!/usr/bin/env bash
# Interop tests with real peers: SIPp scenarios against a freshly started sipedge on loopback.
# Needs SIPp (Debian package sip-tester). Every run is bounded in calls and time.
#
#   scripts/interop.sh              build (release), start sipedge on 127.0.0.1, run every scenario
#   REG_USERS=2000 scripts/interop.sh   fewer subscribers for the registration runs (default 10000)
#
# Exits non-zero if a scenario fails or a tool is missing; never skips silently.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
REG_USERS=${REG_USERS:-10000}
REG_RATE=${REG_RATE:-1000}

if ! command -v sipp >/dev/null 2>&1; then
    echo "interop: sipp not found; install it with: apt-get install -y sip-tester" >&2
    exit 1
fi

work=$(mktemp -d /tmp/sipedge-interop.XXXXXX)
server_pid=""
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
cleanup() {
    stop_server
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "interop: work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

cargo build --release --quiet
bin="$root/target/release/sipedge"

port=$(( 20000 + RANDOM % 20000 ))
pbx_port=$((port + 1)); provider_port=$((port + 2)); ring_port=$((port + 3)); phone_port=$((port + 4))
cat > "$work/sipedge.toml" <<TOML
[server]
listen = ["udp:127.0.0.1:$port", "tcp:127.0.0.1:$port"]
domains = ["127.0.0.1"]
fr_inv_timer = 2
[database]
url = "sqlite://$work/sipedge.db"
[registrar]
max_expires = 3600
[nat]
# The registered "phone" here is a SIPp scenario that expects only the INVITE: a keepalive
# OPTIONS to its loopback (private) contact would abort it. Keepalives are tested by
# nat-test.sh and the e2e tests.
ping_interval = 0
[[route]]
name = "ring"
user = '^9[0-9]{3}$'
next_hop = "127.0.0.1:$ring_port"
[[route]]
name = "pbx"
user = '^[0-9]{3,4}$'
next_hop = "127.0.0.1:$pbx_port"
[[route]]
name = "provider"
user = '^1[0-9]{10}$'
next_hop = "127.0.0.1:$provider_port"
auth = true
TOML
"$bin" check-config -c "$work/sipedge.toml" >/dev/null 2>&1

start_server() {
    local log="$work/sipedge.$1.log"
    RUST_LOG=info "$bin" serve -c "$work/sipedge.toml" 2>"$log" &
    server_pid=$!
    for _ in $(seq 1 100); do
        if grep -q "sipedge started" "$log" 2>/dev/null; then return 0; fi
        if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    cat "$log" >&2
    echo "interop: server did not start" >&2
    exit 1
}

failed=0
# Each SIPp caller gets its own port next to ours (SIPp's -p 0 would take 5060 and up, which
# another service on this host may be using).
next_port=$((port + 10))
# callee NAME PORT SCENARIO CALLS: a SIPp callee in the background, bounded in calls and time.
# A callee on a port an earlier one still holds (finishing its last ACK) would let the earlier
# one swallow the first INVITE without answering: wait for it to exit first, bounded.
callee() {
    local name=$1 cport=$2 scenario=$3 calls=$4
    for _ in $(seq 1 100); do
        pgrep -f -- "-p $cport -m" >/dev/null || break
        sleep 0.1
    done
    if pgrep -f -- "-p $cport -m" >/dev/null; then
        echo "FAIL  callee $name: port $cport still held by an earlier callee after 10 s"
        failed=1
    fi
    timeout 120 sipp -sf "$root/scripts/sipp/$scenario" -i 127.0.0.1 -p "$cport" -m "$calls" \
        -trace_err -error_file "$work/$name.err" -nostdin -bg >/dev/null 2>&1 &
    sleep 0.3
}

# run NAME TRANSPORT SCENARIO CALLS RATE [sipp args...]
run() {
    local name=$1 transport=$2 scenario=$3 calls=$4 rate=$5
    shift 5
    local out="$work/$name"
    local t0=$SECONDS
    next_port=$((next_port + 1))
    if timeout 120 sipp -sf "$root/scripts/sipp/$scenario" -t "$transport" \
        -i 127.0.0.1 -p "$next_port" -m "$calls" -r "$rate" -l 200 "$@" \
        -timeout 90s -timeout_error -max_recv_loops 1000 \
        -trace_stat -stf "$out.csv" -trace_err -error_file "$out.err" \
        -nostdin "127.0.0.1:$port" >"$out.out" 2>&1; then
        echo "ok    $name: $calls calls over $transport, 0 failed ($((SECONDS - t0)) s)"
    else
        echo "FAIL  $name (sipp exit $?)"
        tail -n 8 "$out.out" 2>/dev/null || true
        tail -c 1500 "$out.err" 2>/dev/null || true
        echo
        failed=1
    fi
}

# Subscribers in the SIPp injection format, imported through the CLI.
users="$work/users.csv"
{ echo SEQUENTIAL; for i in $(seq 100000 $((100000 + REG_USERS - 1))); do echo "$i;pw$i"; done; } > "$users"
tcp_users="$work/tcp_users.csv"
{ echo SEQUENTIAL; for i in $(seq 200000 200199); do echo "$i;pw$i"; done; } > "$tcp_users"
forbidden="$work/forbidden.csv"
{ echo SEQUENTIAL; echo "100000;pw100000;100001"; } > "$forbidden"
"$bin" user import -c "$work/sipedge.toml" "$users" >/dev/null
"$bin" user import -c "$work/sipedge.toml" "$tcp_users" >/dev/null

# No plaintext password anywhere in the database files.
if cat "$work"/sipedge.db* | grep -a -q "pw100000"; then
    echo "FAIL  a plaintext password is stored in the database"
    failed=1
else
    echo "ok    no plaintext password in the database"
fi

start_server 1
run options-udp        u1 options.xml                200 100
run options-tcp        t1 options.xml                200 100
run invite-404         u1 invite_404.xml             100 50
run register-auth      u1 register_auth.xml          "$REG_USERS" "$REG_RATE" -inf "$users"
run register-auth-tcp  t1 register_auth.xml          200 100 -inf "$tcp_users"
run wrong-password     u1 register_wrong_password.xml 50 50 -inf "$users"
run to-not-auth-user   u1 register_forbidden.xml     1 1 -inf "$forbidden"

# kill -9: nothing is acknowledged before it is in the store, so every binding survives.
kill -KILL "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
start_server 2
loaded=$(grep -o 'bindings=[0-9]*' "$work/sipedge.2.log" | head -1 | cut -d= -f2)
expected=$((REG_USERS + 200))  # UDP users and TCP users (the phone registers later)
if [ "${loaded:-0}" -eq "$expected" ]; then
    echo "ok    restart after kill -9: $loaded bindings loaded"
else
    echo "FAIL  restart after kill -9: ${loaded:-0} bindings loaded, expected $expected"
    failed=1
fi
run register-query     u1 register_query.xml         "$REG_USERS" "$REG_RATE" -inf "$users"

# Calls through the proxy, one route kind each; the callee runs first, bounded.
callee pbx "$pbx_port" uas.xml 200
run call-extension     u1 uac_call.xml               200 50 -s 1234
callee provider "$provider_port" uas.xml 100
# The digest uri must be the Request-URI (RFC 7616 §3.4.6); SIPp writes sip:host:port unless
# -auth_uri (to which it prepends "sip:") says otherwise.
run call-provider-auth u1 uac_call_auth.xml          100 50 -s 15551234567 -inf "$users" \
    -auth_uri "15551234567@127.0.0.1:$port"
# A registered phone: it registers from the port it then answers on (its flow).
one_user="$work/one_user.csv"; { echo SEQUENTIAL; echo "300000;pw300000"; } > "$one_user"
"$bin" user import -c "$work/sipedge.toml" "$one_user" >/dev/null
timeout 30 sipp -sf "$root/scripts/sipp/register_auth.xml" -inf "$one_user" -i 127.0.0.1 -p "$phone_port" \
    -m 1 -nostdin "127.0.0.1:$port" >/dev/null 2>&1 || { echo "FAIL  phone registration"; failed=1; }
callee phone "$phone_port" uas.xml 100
run call-registered    u1 uac_call.xml               100 50 -s 300000
callee ring "$ring_port" uas_ring.xml 50
run call-cancel        u1 uac_cancel.xml             50 25 -s 9001
callee ring2 "$ring_port" uas_ring.xml 20
run call-no-answer-408 u1 uac_noanswer.xml           20 20 -s 9002
callee lossy "$pbx_port" uas.xml 100
run call-10pct-loss    u1 uac_call.xml               100 20 -s 1234 -lost 10 -recv_timeout 30000
wait_callees() { for _ in $(seq 1 100); do pgrep -f "sipp -sf $root/scripts/sipp/uas" >/dev/null || return 0; sleep 0.1; done; }
wait_callees

# Reload (SIGHUP) on a running server: the ring route moves to a new next hop, the same process
# goes on serving, and the next calls ring there.
ring2_port=$((port + 5))
sed -i "s/127.0.0.1:$ring_port\"/127.0.0.1:$ring2_port\"/" "$work/sipedge.toml"
kill -HUP "$server_pid"
reloaded=""
for _ in $(seq 1 50); do
    reloaded=$(grep "configuration reloaded" "$work/sipedge.2.log" | tail -1 || true)
    [ -n "$reloaded" ] && break
    sleep 0.1
done
if kill -0 "$server_pid" 2>/dev/null && [[ "$reloaded" == *"changed=route"* ]]; then
    echo "ok    SIGHUP: configuration reloaded (route), same process"
else
    echo "FAIL  SIGHUP: ${reloaded:-no reload line}"
    failed=1
fi
run options-after-reload u1 options.xml              20 20
callee ring-reloaded "$ring2_port" uas_ring.xml 10
run call-cancel-reloaded u1 uac_cancel.xml           10 10 -s 9003
wait_callees

# Every transaction ends: server ones at once, client ones after Timer D (32 s on UDP).
sleep 34
stop_server
stopped=$(grep -o 'transactions.server=[0-9]* transactions.client=[0-9]*' "$work/sipedge.2.log" | tail -1)
if [ "$stopped" = "transactions.server=0 transactions.client=0" ]; then
    echo "ok    no transaction left after the calls"
else
    echo "FAIL  transactions left after the calls: ${stopped:-no shutdown line}"
    failed=1
fi
# Every response of the calls found its transaction (a response that beats the table entry of
# the request it answers is dropped as stray and costs the callee a retransmission).
strays=$(grep -o 'proxy_stray_responses_dropped=[0-9]*' "$work/sipedge.2.log" | tail -1 || true)
if [ -z "$strays" ] && grep -q "sipedge stopped" "$work/sipedge.2.log"; then
    echo "ok    no stray response dropped"
else
    echo "FAIL  responses dropped as stray: ${strays:-no shutdown line}"
    failed=1
fi

# A trunk (issue #13): sipedge registers to a provider stand-in (401, then 200 for a digest SIPp
# verifies) and answers its 407 to the INVITE with the trunk's credentials; the caller, a phone
# that authenticated to sipedge, completes its call and never sees the provider's 407. A second
# instance with its own configuration, so that its REGISTER reaches only this provider.
trunk_port=$((port + 6)); trunk_provider_port=$((port + 7)); trunk_caller_port=$((port + 8))
cat > "$work/trunk.toml" <<TOML
[server]
listen = ["udp:127.0.0.1:$trunk_port"]
domains = ["127.0.0.1"]
[database]
url = "sqlite://$work/trunk.db"
[control]
listen = ""
[nat]
ping_interval = 0
[[route]]
name = "trunk"
user = '^2[0-9]{10}\$'
next_hop = "127.0.0.1:$trunk_provider_port"
media = "never"
auth = true
trunk = "sippprov"
[[trunk]]
name = "sippprov"
username = "acct1"
password = "s3cret"
realm = "sipp.provider"
register = true
TOML
"$bin" check-config -c "$work/trunk.toml" >/dev/null 2>&1
"$bin" user import -c "$work/trunk.toml" "$one_user" >/dev/null
timeout 60 sipp -sf "$root/scripts/sipp/trunk_provider.xml" -i 127.0.0.1 -p "$trunk_provider_port" \
    -m 2 -timeout 50s -timeout_error -trace_err -error_file "$work/trunk-provider.err" -nostdin \
    >"$work/trunk-provider.out" 2>&1 &
provider_pid=$!
sleep 0.3
RUST_LOG=info "$bin" serve -c "$work/trunk.toml" 2>"$work/sipedge.trunk.log" &
server_pid=$!
registered=""
for _ in $(seq 1 100); do
    registered=$(grep "trunk registered" "$work/sipedge.trunk.log" || true)
    [ -n "$registered" ] && break
    sleep 0.1
done
if [[ "$registered" == *"trunk=sippprov"*"expires=600"* ]]; then
    echo "ok    trunk registered at the provider stand-in (401, then 200 for a verified digest)"
else
    echo "FAIL  trunk registration: ${registered:-no 'trunk registered' line}"
    grep -i trunk "$work/sipedge.trunk.log" | tail -n 5 || true
    failed=1
fi
if timeout 60 sipp -sf "$root/scripts/sipp/uac_call_auth.xml" -t u1 -i 127.0.0.1 -p "$trunk_caller_port" \
    -m 1 -s 25551234567 -inf "$one_user" -auth_uri "25551234567@127.0.0.1:$trunk_port" \
    -timeout 30s -timeout_error -trace_err -error_file "$work/trunk-call.err" \
    -nostdin "127.0.0.1:$trunk_port" >"$work/trunk-call.out" 2>&1 \
    && wait "$provider_pid"; then
    echo "ok    trunk-call: authenticated phone; provider's 407 answered with the trunk's credentials (CSeq + 1), ACK/BYE CSeq shifted, call completed"
else
    echo "FAIL  trunk-call (the caller's sipp, or the provider stand-in's checks)"
    tail -n 8 "$work/trunk-call.out" "$work/trunk-provider.out" 2>/dev/null || true
    tail -c 1500 "$work/trunk-call.err" "$work/trunk-provider.err" 2>/dev/null || true
    failed=1
fi
kill "$provider_pid" 2>/dev/null || true
stop_server


if grep -q "panicked" "$work"/sipedge.*.log; then
    echo "FAIL  sipedge panicked" >&2
    failed=1
fi
exit $failed
