#!/usr/bin/env bash
# Two sipedge instances sharing one PostgreSQL (README "Several instances"), with a phone
# behind a real NAT router: Linux network namespaces, veth pairs and iptables MASQUERADE.
#
#   mi-pub    198.51.100.1  instance A (udp :5060)       a bridge to the router;
#             198.51.100.2  instance B (udp :5060)       PostgreSQL (a throwaway cluster) on
#             198.51.100.3  the caller (SIPp, :5070)     127.0.0.1:5433 of this namespace
#   mi-nat    198.51.100.11 / 10.0.1.1  router (MASQUERADE)  --  mi-phone 10.0.1.2  alice
#
# The public side has no route to 10.0.1.0/24: the phone is reachable only through the mapping
# its router made for its REGISTER to A, and only from A's address (a reply from B's address
# matches no conntrack entry). Checked:
#   1. alice registers at A (digest, 200);
#   2. A's registration is in B's memory without a restart (`sipedge show registrations`
#      against B's control endpoint), owned by A;
#   3. a call arriving at B reaches alice through A and completes: INVITE/180/200/ACK/BYE/200,
#      both SIPp scenarios pass; B's log shows the forwarding to A; the CDR row of the call
#      carries B's instance id;
#   4. a forged inter-instance Route sent to A from outside (a made-up MAC) gets 403, and the
#      phone hears nothing;
#   5. alice de-registers at A; B answers an INVITE for her with 404 within a second.
#
#   scripts/multi-test.sh                    build (release, --features postgres) and run
#   SIPEDGE_BIN=path scripts/multi-test.sh   use this binary (built with --features postgres)
#   KEEP_WORK=1 scripts/multi-test.sh        keep the logs, SIPp traces and the cluster
#
# Needs root, iproute2, iptables with the nat table, SIPp (sip-tester), python3, PostgreSQL
# (postgresql: initdb, pg_ctl, psql). Exits non-zero if a check fails or a tool is missing;
# never skips silently. Every wait is bounded; the namespaces and the cluster are removed on
# exit, left-overs of a killed run at start.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

die() { echo "multi-test: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, iptables)"
for tool in ip iptables python3 timeout flock runuser sipp; do
    command -v "$tool" >/dev/null 2>&1 && continue
    case $tool in
        sipp) die "sipp not found; install it with: apt-get install -y sip-tester" ;;
        ip) die "ip not found; install it with: apt-get install -y iproute2" ;;
        iptables) die "iptables not found; install it with: apt-get install -y iptables" ;;
        python3) die "python3 not found; install it with: apt-get install -y python3" ;;
        *) die "$tool not found; install it with: apt-get install -y coreutils util-linux" ;;
    esac
done
pgbin=$(find /usr/lib/postgresql -maxdepth 2 -type d -name bin 2>/dev/null | sort -V | tail -1)
[ -n "$pgbin" ] && [ -x "$pgbin/initdb" ] && [ -x "$pgbin/pg_ctl" ] \
    || die "PostgreSQL not found; install it with: apt-get install -y postgresql"
id postgres >/dev/null 2>&1 || die "no postgres user; install it with: apt-get install -y postgresql"

mkdir -p /run/lock
exec 9>/run/lock/sipedge-multi-test.lock
flock -w 300 9 || die "another multi-test has held /run/lock/sipedge-multi-test.lock for 300 s"

NS_PUB=mi-pub NS_NAT=mi-nat NS_PHONE=mi-phone
NS_ALL=("$NS_PUB" "$NS_NAT" "$NS_PHONE")
A_IP=198.51.100.1 B_IP=198.51.100.2 CALLER_IP=198.51.100.3
ROUTER_PUB=198.51.100.11 ROUTER_LAN=10.0.1.1 PHONE_IP=10.0.1.2
SIP=5060 CALLER_PORT=5070 PG_PORT=5433
DOMAIN=example.com USER=alice PASS=alice-multi-secret-1

work=$(mktemp -d /tmp/sipedge-multi.XXXXXX)
chmod 755 "$work"
pids=()
pg_up=0

remove_namespaces() {
    local ns p
    for ns in "${NS_ALL[@]}"; do
        [ -e "/run/netns/$ns" ] || continue
        p=$(ip netns pids "$ns" 2>/dev/null || true)
        # shellcheck disable=SC2086
        if [ -n "$p" ]; then kill -TERM $p 2>/dev/null || true; sleep 0.5; kill -KILL $p 2>/dev/null || true; fi
        ip netns del "$ns" 2>/dev/null || true
    done
}
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "$pg_up" = 1 ]; then
        ip netns exec "$NS_PUB" runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    remove_namespaces
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "multi-test: work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
remove_namespaces

if [ -n "${SIPEDGE_BIN:-}" ]; then
    bin=$SIPEDGE_BIN
else
    cargo build --release --quiet --features postgres --bin sipedge
    bin="$root/target/release/sipedge"
fi
[ -x "$bin" ] || die "no sipedge binary at $bin"

failed=0
ok() { echo "ok    $*"; }
fail() { echo "FAIL  $*"; failed=1; }

# ---------------------------------------------------------------------------------------------
# Topology
ip netns add "$NS_PUB"
ip netns add "$NS_NAT"
ip netns add "$NS_PHONE"
for ns in "${NS_ALL[@]}"; do ip -n "$ns" link set lo up; done
ip -n "$NS_PUB" link add br0 type bridge
for a in "$A_IP" "$B_IP" "$CALLER_IP"; do ip -n "$NS_PUB" addr add "$a/24" dev br0; done
ip -n "$NS_PUB" link set br0 up
ip -n "$NS_PUB" link add port1 type veth peer name wan0 netns "$NS_NAT"
ip -n "$NS_PUB" link set port1 master br0 up
ip -n "$NS_NAT" addr add "$ROUTER_PUB/24" dev wan0
ip -n "$NS_NAT" link set wan0 up
ip -n "$NS_NAT" link add lan0 type veth peer name eth0 netns "$NS_PHONE"
ip -n "$NS_NAT" addr add "$ROUTER_LAN/24" dev lan0
ip -n "$NS_NAT" link set lan0 up
ip -n "$NS_PHONE" addr add "$PHONE_IP/24" dev eth0
ip -n "$NS_PHONE" link set eth0 up
ip -n "$NS_PHONE" route add default via "$ROUTER_LAN"
ip netns exec "$NS_NAT" sysctl -qw net.ipv4.ip_forward=1
ip netns exec "$NS_NAT" iptables -t nat -A POSTROUTING -o wan0 -j MASQUERADE
if ip -n "$NS_PUB" route get "$PHONE_IP" >/dev/null 2>&1; then die "topology: $NS_PUB has a route to $PHONE_IP"; fi
up=0
for _ in $(seq 1 50); do
    if ip netns exec "$NS_PHONE" python3 - "$A_IP" <<'PY' 2>/dev/null; then up=1; break; fi
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(0.2)
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    sys.exit(0)
except OSError:
    sys.exit(1)
sys.exit(0)
PY
    sleep 0.1
done
[ "$up" = 1 ] || die "topology: $NS_PHONE cannot reach $A_IP through $NS_NAT"

# ---------------------------------------------------------------------------------------------
# A throwaway PostgreSQL cluster in mi-pub (trust authentication on its loopback only)
mkdir "$work/pg" && chown postgres: "$work/pg"
runuser -u postgres -- "$pgbin/initdb" -D "$work/pg" -A trust -U postgres >"$work/initdb.log" 2>&1 \
    || { tail -n 20 "$work/initdb.log" >&2; die "initdb failed"; }
ip netns exec "$NS_PUB" runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg" -l "$work/pg/server.log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $work/pg" start >/dev/null \
    || { tail -n 20 "$work/pg/server.log" >&2; die "PostgreSQL did not start"; }
pg_up=1
ip netns exec "$NS_PUB" runuser -u postgres -- "$pgbin/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres \
    -v ON_ERROR_STOP=1 -c "CREATE DATABASE sipedge" >/dev/null
DB_URL="postgres://postgres@127.0.0.1:$PG_PORT/sipedge"
psql_q() { ip netns exec "$NS_PUB" runuser -u postgres -- "$pgbin/psql" -qtA -h 127.0.0.1 -p "$PG_PORT" -U postgres -d sipedge -c "$1"; }

# ---------------------------------------------------------------------------------------------
# The instances
write_config() {  # $1 = name, $2 = address, $3 = control port, $4 = media ports
    cat > "$work/$1.toml" <<TOML
[server]
listen = ["udp:$2:$SIP"]
advertise = "$2"
domains = ["$DOMAIN"]
[database]
url = "$DB_URL"
[control]
listen = "127.0.0.1:$3"
[media]
address = "$2"
ports = "$4"
TOML
}
write_config a "$A_IP" 5081 30000-30999
write_config b "$B_IP" 5082 31000-31999
ip netns exec "$NS_PUB" "$bin" -c "$work/a.toml" db migrate >/dev/null
ip netns exec "$NS_PUB" "$bin" -c "$work/a.toml" user add "$USER@$DOMAIN" --password "$PASS" >/dev/null

start_instance() {  # $1 = name
    local log="$work/sipedge.$1.log" pid
    ip netns exec "$NS_PUB" env RUST_LOG=sipedge=debug "$bin" serve -c "$work/$1.toml" 2>"$log" &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 1 100); do
        if grep -q "sipedge started" "$log" 2>/dev/null; then return 0; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$log" >&2
    die "instance $1 did not start ($log)"
}
start_instance a
start_instance b
if grep -q "shared=true" "$work/sipedge.a.log" && grep -q "shared=true" "$work/sipedge.b.log"; then
    ok "A ($A_IP) and B ($B_IP) started on one PostgreSQL, both following the shared location"
else
    fail "the instances do not say shared=true in their start lines"
fi

sipp_in() {  # $1 = namespace, $2 = name, $3 = scenario, rest = SIPp arguments; bounded
    local ns=$1 name=$2 scenario=$3
    shift 3
    ip netns exec "$ns" timeout 60 sipp -sf "$root/scripts/sipp/$scenario" -t u1 -aa -timeout 40s -timeout_error \
        -trace_err -error_file "$work/$name.err" -trace_msg -message_file "$work/$name.msg" \
        -nostdin "$@" >"$work/$name.out" 2>&1
}
show_failure() {  # $1 = name
    tail -n 12 "$work/$1.out" 2>/dev/null | sed 's/^/      /' || true
    tail -c 2000 "$work/$1.err" 2>/dev/null | sed 's/^/      /' || true
}

# 1. Register at A
if sipp_in "$NS_PHONE" register multi_register.xml -i "$PHONE_IP" -p "$SIP" -m 1 -s "$USER" -au "$USER" -ap "$PASS" \
    -key domain "$DOMAIN" -key expires 600 "$A_IP:$SIP"; then
    ok "$USER registered at A from $PHONE_IP:$SIP behind $NS_NAT (401, digest, 200)"
else
    fail "$USER's registration at A"; show_failure register
fi
binding=$(psql_q "SELECT instance || ' ' || received FROM location WHERE aor = '$USER@$DOMAIN'")
if [[ $binding == "$A_IP:$SIP $ROUTER_PUB:"* ]]; then
    ok "the binding is owned by A ($binding)"
else
    fail "the binding: expected instance $A_IP:$SIP received $ROUTER_PUB:PORT, got '${binding}'"
fi

# 2. In B's memory, without a restart
seen=""
for _ in $(seq 1 20); do
    seen=$(ip netns exec "$NS_PUB" "$bin" -c "$work/b.toml" show registrations --json 2>/dev/null || true)
    if [[ $seen == *"\"$USER@$DOMAIN\""* ]]; then break; fi
    sleep 0.05
done
if [[ $seen == *"\"$USER@$DOMAIN\""* ]] && [[ $seen == *"\"$A_IP:$SIP\""* ]]; then
    ok "A's registration is in B's location (show registrations at B lists it, instance $A_IP:$SIP)"
else
    fail "B's show registrations does not list $USER@$DOMAIN owned by A: ${seen:-nothing}"
fi

# 3. A call arriving at B reaches alice through A
sipp_in "$NS_PHONE" callee nat_uas.xml -i "$PHONE_IP" -p "$SIP" -s "$USER" &
uas_pid=$!
pids+=("$uas_pid")
for _ in $(seq 1 50); do
    [ -n "$(ip netns exec "$NS_PHONE" ss -Hlun "sport = :$SIP" 2>/dev/null)" ] && break
    sleep 0.1
done
rc_uac=0 rc_uas=0
sipp_in "$NS_PUB" caller multi_uac.xml -i "$CALLER_IP" -p "$CALLER_PORT" -m 1 -s "$USER" -key me bob \
    -key domain "$DOMAIN" "$B_IP:$SIP" || rc_uac=$?
wait "$uas_pid" || rc_uas=$?
if [ "$rc_uac" = 0 ] && [ "$rc_uas" = 0 ]; then
    ok "a call to $USER arriving at B completes through A: INVITE/180/200/ACK/BYE/200 (both SIPp scenarios passed)"
else
    fail "the call at B (caller sipp exit $rc_uac, callee sipp exit $rc_uas)"
    echo "      caller:"; show_failure caller
    echo "      callee:"; show_failure callee
fi
# The phone heard the INVITE with A's Record-Route on top, the ACK and BYE came the same way.
if grep -q "Record-Route: <sip:$A_IP:$SIP;lr;fe=u~$ROUTER_PUB~" "$work/callee.msg" 2>/dev/null \
    && grep -q "Record-Route: .*<sip:$B_IP:$SIP;lr" "$work/callee.msg" 2>/dev/null; then
    ok "the phone's INVITE carries A's Record-Route (with its NAT binding) and B's"
else
    fail "the phone's INVITE lacks A's Record-Route with fe= or B's (see $work/callee.msg)"
fi
if grep -q "forwarded by the instance that found the binding" "$work/sipedge.a.log"; then
    ok "A forwarded B's request to the phone's NAT binding (A's log)"
else
    fail "A's log does not show B's request forwarded"
fi
cdr=""
for _ in $(seq 1 30); do
    cdr=$(psql_q "SELECT instance || ' ' || outcome FROM cdr WHERE to_uri LIKE '%$USER@$DOMAIN%' ORDER BY start_ts DESC LIMIT 1")
    [ -n "$cdr" ] && break
    sleep 0.1
done
if [ "$cdr" = "$B_IP:$SIP answered" ]; then
    ok "the call's CDR row was written by B (instance $B_IP:$SIP, answered)"
else
    fail "the call's CDR row: expected '$B_IP:$SIP answered', got '${cdr:-none}'"
fi

# 3b. The same with two-way audio through B's relay: the phone and the caller each play
# g711a.pcap's RTP (scripts/nat/rtp_phone.py, symmetric RTP) to the relay address of the SDP
# they got — B's — and count what comes back. The scenarios are nat-test's, with B's address
# as the relay and the shared domain in the caller's URIs.
PCAP=/usr/share/sip-tester/g711a.pcap
[ -r "$PCAP" ] || die "$PCAP not found; it comes with SIPp: apt-get install -y sip-tester"
sed 's/198\\\.51\\\.100\\\.1)/198\\.51\\.100\\.2)/' "$root/scripts/sipp/nat_uas_media.xml" >"$work/uas_media.xml"
sed -e 's/198\\\.51\\\.100\\\.1)/198\\.51\\.100\\.2)/' -e 's/sip:\[service\]@\[remote_ip\]/sip:[service]@[domain]/g' \
    -e 's/sip:\[me\]@\[remote_ip\]/sip:[me]@[domain]/g' "$root/scripts/sipp/nat_uac_media.xml" >"$work/uac_media.xml"
grep -q '198\\.51\\.100\\.2)' "$work/uas_media.xml" && grep -q '198\\.51\\.100\\.2)' "$work/uac_media.xml" \
    && grep -q 'sip:\[service\]@\[domain\]' "$work/uac_media.xml" || die "cannot derive the media scenarios from nat-test's"
RTP_PORT=16000
: >"$work/ctl-caller"; : >"$work/ctl-callee"
ip netns exec "$NS_PHONE" timeout 45 python3 "$root/scripts/nat/rtp_phone.py" --bind "$PHONE_IP:$RTP_PORT" \
    --ctl "$work/ctl-callee" --out "$work/rtp-callee.json" --pcap "$PCAP" --max-time 40 >"$work/rtp-callee.out" 2>&1 &
pb=$!; pids+=("$pb")
ip netns exec "$NS_PUB" timeout 45 python3 "$root/scripts/nat/rtp_phone.py" --bind "$CALLER_IP:$RTP_PORT" \
    --ctl "$work/ctl-caller" --out "$work/rtp-caller.json" --pcap "$PCAP" --max-time 40 >"$work/rtp-caller.out" 2>&1 &
pa=$!; pids+=("$pa")
for _ in $(seq 1 50); do
    grep -q '^ready' "$work/rtp-callee.out" 2>/dev/null && grep -q '^ready' "$work/rtp-caller.out" 2>/dev/null && break
    sleep 0.1
done
ip netns exec "$NS_PHONE" timeout 60 sipp -sf "$work/uas_media.xml" -i "$PHONE_IP" -p "$SIP" -t u1 -aa -timeout 40s \
    -timeout_error -trace_err -error_file "$work/media-callee.err" -nostdin -s "$USER" \
    -key rtp_port "$RTP_PORT" -key ctl "$work/ctl-callee" >"$work/media-callee.out" 2>&1 &
uas_pid=$!
pids+=("$uas_pid")
for _ in $(seq 1 50); do
    [ -n "$(ip netns exec "$NS_PHONE" ss -Hlun "sport = :$SIP" 2>/dev/null)" ] && break
    sleep 0.1
done
rc_uac=0 rc_uas=0
ip netns exec "$NS_PUB" timeout 60 sipp -sf "$work/uac_media.xml" -i "$CALLER_IP" -p "$CALLER_PORT" -t u1 -aa \
    -timeout 40s -timeout_error -trace_err -error_file "$work/media-caller.err" -nostdin -m 1 -d 8500 \
    -s "$USER" -key me bob -key domain "$DOMAIN" -key rtp_port "$RTP_PORT" -key ctl "$work/ctl-caller" \
    "$B_IP:$SIP" >"$work/media-caller.out" 2>&1 || rc_uac=$?
wait "$uas_pid" || rc_uas=$?
[ -s "$work/ctl-caller" ] || kill -TERM "$pa" 2>/dev/null || true
[ -s "$work/ctl-callee" ] || kill -TERM "$pb" 2>/dev/null || true
wait "$pa" || true
wait "$pb" || true
if [ "$rc_uac" = 0 ] && [ "$rc_uas" = 0 ]; then
    ok "a call with audio arriving at B completes through A (the SDP each side got names B's relay $B_IP, no private c=)"
else
    fail "the call with audio at B (caller sipp exit $rc_uac, callee sipp exit $rc_uas)"
    echo "      caller:"; show_failure media-caller
    echo "      callee:"; show_failure media-callee
fi
media=$(python3 - "$work/rtp-caller.json" "$work/rtp-callee.json" "$B_IP" <<'PY'
import json, sys
try:
    caller, callee = (json.load(open(p)) for p in sys.argv[1:3])
except (OSError, ValueError) as e:
    print(f"FAIL no RTP results: {e}"); sys.exit(0)
relay = sys.argv[3]
for me, other, name in ((caller, callee, "caller"), (callee, caller, "phone")):
    to = me.get("to") or ""
    got, sent = me.get("recv_from_to", 0), other.get("sent", 0)
    # The relay forwards what one side sends once that side has latched and the other side's
    # address is known (its first packet): allow a tenth lost to that start.
    if to.startswith(relay + ":") and sent > 0 and got >= 0.9 * sent:
        print(f"ok the {name} got {got} of the {sent} RTP packets the other sent, from B's relay {to}")
    else:
        print(f"FAIL the {name} got {got} of {sent} RTP packets from {to or 'nowhere'} (relay {relay})")
PY
)
while IFS= read -r line; do
    case $line in
        "ok "*) ok "${line#ok }" ;;
        *) fail "${line#FAIL }" ;;
    esac
done <<<"$media"

# 4. A forged inter-instance Route from outside
forged=$(ip netns exec "$NS_PUB" python3 - "$CALLER_IP" "$A_IP" "$SIP" "$ROUTER_PUB" "$binding" <<'PY'
import socket, sys
me, a, port, router, binding = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
mapped = binding.rsplit(":", 1)[-1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((me, 0)); s.settimeout(2)
lp = s.getsockname()[1]
msg = (f"INVITE sip:alice@10.0.1.2:5060 SIP/2.0\r\n"
       f"Via: SIP/2.0/UDP {me}:{lp};branch=z9hG4bK-forged-1;rport\r\n"
       f"Route: <sip:{a}:{port};lr;ob=u~{router}~{mapped};m=0123456789abcdef>\r\n"
       f"Max-Forwards: 70\r\nFrom: <sip:mallory@evil.example>;tag=f1\r\n"
       f"To: <sip:alice@example.com>\r\nCall-ID: forged-1\r\nCSeq: 1 INVITE\r\n"
       f"Contact: <sip:mallory@{me}:{lp}>\r\nContent-Length: 0\r\n\r\n")
s.sendto(msg.encode(), (a, port))
try:
    while True:
        data, _ = s.recvfrom(65535)
        status = data.split(b" ", 2)[1].decode()
        if status != "100":
            print(status); break
except socket.timeout:
    print("timeout")
PY
)
if [ "$forged" = 403 ]; then
    ok "a forged inter-instance Route sent to A from outside is refused (403)"
else
    fail "a forged inter-instance Route at A: expected 403, got ${forged:-nothing}"
fi
if grep -q "forged-1" "$work/callee.msg" 2>/dev/null; then fail "the forged INVITE reached the phone"; fi

# 5. De-register at A; B answers 404 within a second
if sipp_in "$NS_PHONE" unregister multi_register.xml -i "$PHONE_IP" -p "$SIP" -m 1 -s "$USER" -au "$USER" -ap "$PASS" \
    -key domain "$DOMAIN" -key expires 0 "$A_IP:$SIP"; then
    ok "$USER de-registered at A"
else
    fail "$USER's de-registration at A"; show_failure unregister
fi
after=$(ip netns exec "$NS_PUB" python3 - "$CALLER_IP" "$B_IP" "$SIP" <<'PY'
import socket, sys, time
me, b, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((me, 0)); s.settimeout(0.2)
lp = s.getsockname()[1]
t0 = time.monotonic()
n = 0
last = "nothing"
while time.monotonic() - t0 < 1.0:
    n += 1
    msg = (f"INVITE sip:alice@example.com SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP {me}:{lp};branch=z9hG4bK-after-{n};rport\r\n"
           f"Max-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=b{n}\r\n"
           f"To: <sip:alice@example.com>\r\nCall-ID: after-{n}\r\nCSeq: 1 INVITE\r\n"
           f"Contact: <sip:bob@{me}:{lp}>\r\nContent-Length: 0\r\n\r\n")
    s.sendto(msg.encode(), (b, port))
    try:
        while True:
            data, _ = s.recvfrom(65535)
            status = data.split(b" ", 2)[1].decode()
            if status == "100":
                continue
            last = status
            if status.startswith(("1", "2")):
                continue
            break
    except socket.timeout:
        pass
    if last == "404":
        print(f"404 {int((time.monotonic() - t0) * 1000)}")
        sys.exit(0)
    time.sleep(0.05)
print(f"{last} -")
PY
)
if [[ $after == "404 "* ]]; then
    ok "after the de-registration at A, B answers 404 (after ${after#404 } ms)"
else
    fail "B did not answer 404 within a second of the de-registration at A (last: $after)"
fi

echo
if [ "$failed" = 0 ]; then
    echo "multi-test: all checks passed"
else
    echo "multi-test: FAILED (logs: $work; KEEP_WORK=1 keeps them)"
    exit 1
fi
