#!/usr/bin/env bash
# NAT traversal test with real NAT routers: Linux network namespaces, veth pairs and iptables
# MASQUERADE, SIPp phones on private addresses behind two routers, sipedge on a "public" net.
#
#   se-pub     198.51.100.1   sipedge (udp+tcp :5060), a bridge to both routers
#   se-nat1    198.51.100.11 / 10.0.1.1      router (MASQUERADE)  --  se-phone1 10.0.1.2    alice
#   se-nat2    198.51.100.12 / 192.168.2.1   router (MASQUERADE)  --  se-phone2 192.168.2.2 bob
#
# The public side has no route to the private nets: a phone is reachable only through the
# mapping its router made for the phone's own packets. Every step runs twice: plain MASQUERADE
# (the router keeps port 5060 when it can) and MASQUERADE --random-fully (symmetric NAT, a
# random public port). Checked, per variant:
#   1. both phones register with digest auth; the store keeps the private Contact and the
#      router's public address and mapped port as `received`;
#   2. calls through the NAT bindings, in the four combinations (alice→bob and bob→alice, the
#      caller or the callee hangs up), 0 failed calls in SIPp's statistics;
#   2b. two-way audio through sipedge's media relay, alice→bob and bob→alice: each phone writes
#      its PRIVATE address in its SDP and, from that port (scripts/nat/rtp_phone.py in its
#      namespace), talks like a phone with symmetric RTP: g711a.pcap's 236 RTP packets to the
#      address of the SDP it got. Checked: the SDP each phone got says c=198.51.100.1 and a relay
#      port (SIPp <ereg>s, and no private c=); each phone received the other's packets from
#      exactly that relay address and port (only possible through its router's mapping) — all
#      but those the other sent before this phone's first packet (until then the relay has only
#      the private SDP address, README "Forwarding"), -1 %; the call's `media session closed`
#      line says reason=bye, caller_pkts and callee_pkts = what each phone sent (±1 %); its cdr
#      row has the same counts; the relay's `latched` lines name each router's public address;
#   3. keepalives every nat.ping_interval: well-formed OPTIONS answered by the phone, then
#      (after a restart with ping_method = "crlf") CRLF datagrams; >= 3 pings with intervals
#      within ±30 % of the interval;
#   2c. a contact registered by a third party: se-third (198.51.100.21, public, no NAT)
#      registers carol with Contact sip:carol@198.51.100.22:5060 (se-contact, public). The store
#      says received=198.51.100.21:5060, nated=0; alice (NATed) calls carol: the INVITE reaches
#      se-contact at the Contact (public_uas.xml checks its Request-URI), the call completes, and
#      se-third gets nothing (README "Which address a contact is reached at"). Calls to the
#      NATed phones in step 2 still go through their routers' mappings;
#   4. a phone that stops answering OPTIONS: after nat.ping_failures pings a WARN line names its
#      binding, which stays (ping_remove = false); after a restart with ping_remove = true the
#      binding is removed from the store (and logged); the phone that answers keeps its binding.
#
#   scripts/nat-test.sh                  build (release) and run both variants
#   SIPEDGE_BIN=path scripts/nat-test.sh use this binary, do not build
#   KEEP_WORK=1 scripts/nat-test.sh      keep the logs, SIPp traces and databases
#   NAT_VARIANTS=symmetric scripts/nat-test.sh   one variant only
#
# Needs root, iproute2 (ip, ss), iptables with the nat table, SIPp (sip-tester, also for its
# g711a.pcap), python3.
# Exits non-zero if a check fails or a tool is missing; never skips silently. Every wait is
# bounded; the namespaces (and with them the veths and iptables rules) are removed on exit
# and, at start, left-overs of a killed run are removed. Runs take about three minutes.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

. "$root/scripts/nat/lib.sh"

die() { echo "nat-test: $*" >&2; exit 1; }

nat_require_tools sipp
nat_lock

work=$(mktemp -d /tmp/sipedge-nat.XXXXXX)
bg_pids=()

cleanup() {
    local p
    stop_server
    for p in "${bg_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    remove_namespaces
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "nat-test: work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

remove_namespaces  # left-overs of a killed run

if [ -n "${SIPEDGE_BIN:-}" ]; then
    bin=$SIPEDGE_BIN
else
    cargo build --release --quiet --bin sipedge
    bin="$root/target/release/sipedge"
fi
[ -x "$bin" ] || die "no sipedge binary at $bin"

sipp_dir="$root/scripts/sipp"
helpers="$root/scripts/nat"
# sipedge's log, with the relay's `latched` lines (which public address each relay port learned)
SERVER_LOG=sipedge=debug,sipedge_relay=debug
PCAP=/usr/share/sip-tester/g711a.pcap
[ -r "$PCAP" ] || die "$PCAP not found; it comes with SIPp: apt-get install -y sip-tester"

# ---------------------------------------------------------------------------------------------
# Checks

failed=0
results=()
ok() { echo "ok    $*"; results+=("ok    $*"); }
fail() { echo "FAIL  $*"; results+=("FAIL  $*"); failed=1; variant_failed=1; }

# sipp_stat CSV COLUMN: the cumulative counter from SIPp's -trace_stat file (last line).
sipp_stat() {
    python3 - "$1" "$2" <<'PY' 2>/dev/null || echo "?"
import sys
rows = [l.rstrip("\n").split(";") for l in open(sys.argv[1]) if l.strip()]
print(rows[-1][rows[0].index(sys.argv[2])])
PY
}

show_sipp_failure() {  # $1 = name (files $vwork/$1.*)
    tail -n 12 "$vwork/$1.out" 2>/dev/null | sed 's/^/      /' || true
    tail -c 2000 "$vwork/$1.err" 2>/dev/null | sed 's/^/      /' || true
}

# sipp_phone I NAME SCENARIO [args...]: SIPp in phone I's namespace on its port 5060 (the
# port it registered from, so its NAT mapping is reused), bounded. Prints nothing; returns
# SIPp's exit status.
sipp_phone() {
    local i=$1
    shift
    sipp_at "${PHONE_NS[$i]}" "${PHONE_IP[$i]}" "$@"
}

# sipp_at NAMESPACE IP NAME SCENARIO [args...]: the same on any host of the topology.
sipp_at() {
    local ns=$1 addr=$2 name=$3 scenario=$4
    shift 4
    ip netns exec "$ns" timeout 60 sipp -sf "$sipp_dir/$scenario" \
        -i "$addr" -p "$SIP" -t u1 -aa -timeout 40s -timeout_error \
        -trace_stat -stf "$vwork/$name.csv" -trace_err -error_file "$vwork/$name.err" \
        -trace_msg -message_file "$vwork/$name.msg" -trace_logs -log_file "$vwork/$name.log" \
        -nostdin "$@" >"$vwork/$name.out" 2>&1
}

wait_port_bound() {  # $1 = phone index: until something listens on its UDP 5060 (bounded)
    wait_ns_bound "${PHONE_NS[$1]}"
}

wait_ns_bound() {  # $1 = namespace: until something listens on its UDP 5060 (bounded)
    for _ in $(seq 1 50); do
        if [ -n "$(ip netns exec "$1" ss -Hlun "sport = :$SIP" 2>/dev/null)" ]; then return 0; fi
        sleep 0.1
    done
    return 1
}

register() {  # $1 = phone index
    local i=$1 name="register-${PHONE_USER[$1]}"
    if sipp_phone "$i" "$name" nat_register.xml -m 1 -s "${PHONE_USER[$i]}" -au "${PHONE_USER[$i]}" \
        -ap "${PHONE_PASS[$i]}" "$SERVER_IP:$SIP"; then
        ok "$variant: ${PHONE_USER[$i]} registered from ${PHONE_IP[$i]}:$SIP behind ${ROUTER_NS[$i]} (401, digest, 200)"
    else
        fail "$variant: ${PHONE_USER[$i]} registration (sipp exit $?)"
        show_sipp_failure "$name"
    fi
}

# check_binding I: the store's location row of phone I: private Contact, received = router.
declare -A mapped_port
check_binding() {
    local i=$1 aor="${PHONE_USER[$1]}@$SERVER_IP" rows contact received transport
    rows=$(python3 "$helpers/location.py" "$vwork/sipedge.db" "$aor" 2>&1) || rows="(store not readable: $rows)"
    if [ "$(printf '%s\n' "$rows" | grep -c .)" != 1 ]; then
        fail "$variant: location of $aor: expected one row, got: ${rows:-none}"
        return
    fi
    IFS='|' read -r _ contact received transport <<<"$rows"
    mapped_port[$i]=${received##*:}
    echo "      NAT mapping ${PHONE_USER[$i]}: ${PHONE_IP[$i]}:$SIP -> $received (router ${ROUTER_NS[$i]}), contact $contact"
    if [ "$contact" = "sip:${PHONE_USER[$i]}@${PHONE_IP[$i]}:$SIP" ] && [ "${received%:*}" = "${ROUTER_PUB[$i]}" ] \
        && [ "$transport" = UDP ]; then
        ok "$variant: location $aor contact=$contact received=$received transport=$transport"
    else
        fail "$variant: location $aor contact=$contact received=$received transport=$transport" \
            "(expected contact sip:${PHONE_USER[$i]}@${PHONE_IP[$i]}:$SIP, received ${ROUTER_PUB[$i]}:PORT, UDP)"
    fi
}

calls_total=0
calls_failed=0
# call CALLER CALLEE HANGUP(caller|callee): the callee's SIPp waits on its registered port, the
# caller dials sip:CALLEE@server from its registered port.
call() {
    local a=$1 b=$2 hangup=$3
    local name="call-${PHONE_USER[$a]}-${PHONE_USER[$b]}-$hangup-hangs-up" uac uas uas_pid rc_uac=0 rc_uas=0
    if [ "$hangup" = caller ]; then uac=nat_uac.xml; uas=nat_uas.xml; else uac=nat_uac_callee_bye.xml; uas=nat_uas_bye.xml; fi
    sipp_phone "$b" "$name.uas" "$uas" -s "${PHONE_USER[$b]}" &
    uas_pid=$!
    bg_pids+=("$uas_pid")
    if ! wait_port_bound "$b"; then
        fail "$variant: $name: the callee's SIPp did not bind ${PHONE_IP[$b]}:$SIP"
        kill -TERM "$uas_pid" 2>/dev/null || true; wait "$uas_pid" 2>/dev/null || true
        return
    fi
    sipp_phone "$a" "$name.uac" "$uac" -m 1 -s "${PHONE_USER[$b]}" -key me "${PHONE_USER[$a]}" "$SERVER_IP:$SIP" || rc_uac=$?
    wait "$uas_pid" || rc_uas=$?
    local succ fail_c ka fail_s
    succ=$(sipp_stat "$vwork/$name.uac.csv" "SuccessfulCall(C)")
    fail_c=$(sipp_stat "$vwork/$name.uac.csv" "FailedCall(C)")
    ka=$(sipp_stat "$vwork/$name.uas.csv" "SuccessfulCall(C)")
    fail_s=$(sipp_stat "$vwork/$name.uas.csv" "FailedCall(C)")
    [[ $ka =~ ^[0-9]+$ ]] && ka=$((ka - 1))
    calls_total=$((calls_total + 1))
    if [ "$rc_uac" = 0 ] && [ "$rc_uas" = 0 ]; then
        ok "$variant: ${PHONE_USER[$a]} calls ${PHONE_USER[$b]}, $hangup hangs up: INVITE/180/200/ACK/BYE/200 through both NATs" \
            "(caller: $succ successful, $fail_c failed; callee: $fail_s failed, $ka keepalive OPTIONS answered meanwhile)"
    else
        calls_failed=$((calls_failed + 1))
        fail "$variant: ${PHONE_USER[$a]} calls ${PHONE_USER[$b]}, $hangup hangs up (caller sipp exit $rc_uac, callee sipp exit $rc_uas;" \
            "caller $succ successful, $fail_c failed; callee $fail_s failed)"
        echo "      caller:"; show_sipp_failure "$name.uac"
        echo "      callee:"; show_sipp_failure "$name.uas"
    fi
}

# media_call CALLER CALLEE: a call with two-way audio through sipedge's relay. Each phone writes
# its PRIVATE address and RTP_PORT in its SDP; rtp_phone.py, bound there in the phone's
# namespace, starts talking (g711a.pcap's RTP, symmetric RTP) to the address of the SDP it
# received once its SIPp has answered (callee) or acknowledged (caller), and counts what
# arrives by source. The scenarios check that SDP names the relay (c=SERVER_IP, no private c=);
# media_check.py checks that each phone got the other's audio from the relay port of its SDP
# (only possible through its router's mapping), the call's stats line and its cdr row.
RTP_PORT=16000
media_calls=0
media_numbers=()
media_call() {
    local a=$1 b=$2
    local name="media-${PHONE_USER[$a]}-${PHONE_USER[$b]}" uas_pid pa pb rc_uac=0 rc_uas=0 rc line
    local ctl_a="$vwork/$name.ctl-caller" ctl_b="$vwork/$name.ctl-callee"
    : >"$ctl_a"; : >"$ctl_b"
    media_calls=$((media_calls + 1))
    # the phones' audio, ready before the call (bounded: 40 s whatever happens)
    ip netns exec "${PHONE_NS[$b]}" timeout 45 python3 "$helpers/rtp_phone.py" --bind "${PHONE_IP[$b]}:$RTP_PORT" \
        --ctl "$ctl_b" --out "$vwork/$name.rtp-callee.json" --pcap "$PCAP" --max-time 40 >"$vwork/$name.rtp-callee.out" 2>&1 &
    pb=$!; bg_pids+=("$pb")
    ip netns exec "${PHONE_NS[$a]}" timeout 45 python3 "$helpers/rtp_phone.py" --bind "${PHONE_IP[$a]}:$RTP_PORT" \
        --ctl "$ctl_a" --out "$vwork/$name.rtp-caller.json" --pcap "$PCAP" --max-time 40 >"$vwork/$name.rtp-caller.out" 2>&1 &
    pa=$!; bg_pids+=("$pa")
    for _ in $(seq 1 50); do
        if grep -q '^ready' "$vwork/$name.rtp-callee.out" 2>/dev/null && grep -q '^ready' "$vwork/$name.rtp-caller.out" 2>/dev/null; then break; fi
        sleep 0.1
    done
    sipp_phone "$b" "$name.uas" nat_uas_media.xml -s "${PHONE_USER[$b]}" -key rtp_port "$RTP_PORT" -key ctl "$ctl_b" &
    uas_pid=$!
    bg_pids+=("$uas_pid")
    if ! wait_port_bound "$b"; then
        fail "$variant: $name: the callee's SIPp did not bind ${PHONE_IP[$b]}:$SIP"
        kill -TERM "$uas_pid" "$pa" "$pb" 2>/dev/null || true; wait "$uas_pid" "$pa" "$pb" 2>/dev/null || true
        return
    fi
    # the pcap lasts ~7 s: BYE 8.5 s after the ACK, when both phones are done talking
    sipp_phone "$a" "$name.uac" nat_uac_media.xml -m 1 -d 8500 -s "${PHONE_USER[$b]}" -key me "${PHONE_USER[$a]}" \
        -key rtp_port "$RTP_PORT" -key ctl "$ctl_a" "$SERVER_IP:$SIP" || rc_uac=$?
    wait "$uas_pid" || rc_uas=$?
    # a phone whose SIPp failed before it wrote its ctl line: stop its audio now (it writes
    # what it got), rather than at its --max-time
    [ -s "$ctl_a" ] || kill -TERM "$pa" 2>/dev/null || true
    [ -s "$ctl_b" ] || kill -TERM "$pb" 2>/dev/null || true
    wait "$pa" || true
    wait "$pb" || true
    if [ "$rc_uac" = 0 ] && [ "$rc_uas" = 0 ]; then
        ok "$variant: ${PHONE_USER[$a]} calls ${PHONE_USER[$b]} with audio: both SIPp scenarios passed (the SDP each got names $SERVER_IP, no private c=)"
    else
        fail "$variant: ${PHONE_USER[$a]} calls ${PHONE_USER[$b]} with audio (caller sipp exit $rc_uac, callee sipp exit $rc_uas)"
        echo "      caller:"; show_sipp_failure "$name.uac"
        echo "      callee:"; show_sipp_failure "$name.uas"
    fi
    rc=0
    python3 "$helpers/media_check.py" --caller "$vwork/$name.rtp-caller.json" --callee "$vwork/$name.rtp-callee.json" \
        --log "$vwork/sipedge.options.log" --db "$vwork/sipedge.db" --relay-ip "$SERVER_IP" --ports "$MEDIA_PORTS" \
        --caller-router "${ROUTER_PUB[$a]}" --callee-router "${ROUTER_PUB[$b]}" >"$vwork/$name.check" 2>&1 || rc=$?
    while IFS= read -r line; do
        case $line in
            "ok "*) ok "$variant: ${PHONE_USER[$a]}→${PHONE_USER[$b]} ${line#ok }" ;;
            "FAIL "*) fail "$variant: ${PHONE_USER[$a]}→${PHONE_USER[$b]} ${line#FAIL }" ;;
            "numbers "*) media_numbers+=("$variant ${PHONE_USER[$a]}→${PHONE_USER[$b]}: ${line#numbers }") ;;
            *) echo "      $line" ;;
        esac
    done <"$vwork/$name.check"
    if [ "$rc" != 0 ] && ! grep -q '^FAIL ' "$vwork/$name.check"; then
        fail "$variant: ${PHONE_USER[$a]}→${PHONE_USER[$b]} media check exited $rc"
    fi
    if [ "$rc" != 0 ]; then
        for line in caller callee; do
            echo "      $line's RTP endpoint: $(tail -n 3 "$vwork/$name.rtp-$line.out" 2>/dev/null | tr '\n' ' ' | cut -c1-400)"
        done
    fi
}

# third_party: se-third registers carol's contact on se-contact (both public, no NAT); alice
# (behind NAT) calls carol, who must be reached at her Contact on se-contact, while se-third,
# where the REGISTER came from, gets nothing.
third_party() {
    local name="third-party" rows contact received transport nated stop="$vwork/third-party.stop"
    local lpid uas_pid rc_uac=0 rc_uas=0 seen
    if sipp_at "$THIRD_NS" "$THIRD_IP" "$name-register" third_party_register.xml -m 1 -s "$THIRD_USER" \
        -au "$THIRD_USER" -ap "$THIRD_PASS" -key contact "$CONTACT_IP:$SIP" "$SERVER_IP:$SIP"; then
        ok "$variant: $THIRD_IP registered $THIRD_USER with Contact sip:$THIRD_USER@$CONTACT_IP:$SIP (401, digest, 200)"
    else
        fail "$variant: third-party registration of $THIRD_USER from $THIRD_IP (sipp exit $?)"
        show_sipp_failure "$name-register"
        return
    fi
    rows=$(python3 "$helpers/location.py" --nated "$vwork/sipedge.db" "$THIRD_USER@$SERVER_IP" 2>&1) || rows="(store not readable: $rows)"
    IFS='|' read -r _ contact received transport nated <<<"$rows"
    if [ "$contact" = "sip:$THIRD_USER@$CONTACT_IP:$SIP" ] && [ "$received" = "$THIRD_IP:$SIP" ] && [ "$nated" = 0 ]; then
        ok "$variant: location $THIRD_USER@$SERVER_IP contact=$contact received=$received nated=$nated (not NATed: reached at the Contact)"
    else
        fail "$variant: location $THIRD_USER@$SERVER_IP: ${rows:-none}" \
            "(expected contact sip:$THIRD_USER@$CONTACT_IP:$SIP, received $THIRD_IP:$SIP, nated 0)"
    fi
    # What reaches the registering host meanwhile (it must be nothing).
    rm -f "$stop"
    ip netns exec "$THIRD_NS" timeout 60 python3 - "$THIRD_IP" "$SIP" "$stop" >"$vwork/$name.listener" 2>&1 <<'PY' &
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.2)
print("ready", flush=True)
got = []
while not os.path.exists(sys.argv[3]):
    try:
        data, _ = s.recvfrom(65535)
    except socket.timeout:
        continue
    got.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
print("received %d" % len(got))
for line in got:
    print(line)
PY
    lpid=$!
    bg_pids+=("$lpid")
    sipp_at "$CONTACT_NS" "$CONTACT_IP" "$name.uas" public_uas.xml -s "$THIRD_USER" &
    uas_pid=$!
    bg_pids+=("$uas_pid")
    if ! wait_ns_bound "$CONTACT_NS" || ! wait_ns_bound "$THIRD_NS"; then
        fail "$variant: $name: the callee's SIPp or the listener did not bind"
        touch "$stop"
        kill -TERM "$uas_pid" 2>/dev/null || true; wait "$uas_pid" "$lpid" 2>/dev/null || true
        return
    fi
    sipp_phone 1 "$name.uac" nat_uac.xml -m 1 -s "$THIRD_USER" -key me "${PHONE_USER[1]}" "$SERVER_IP:$SIP" || rc_uac=$?
    wait "$uas_pid" || rc_uas=$?
    touch "$stop"
    wait "$lpid" || true
    calls_total=$((calls_total + 1))
    if [ "$rc_uac" = 0 ] && [ "$rc_uas" = 0 ]; then
        ok "$variant: ${PHONE_USER[1]} calls $THIRD_USER: INVITE reached $CONTACT_IP:$SIP addressed to the registered Contact, INVITE/180/200/ACK/BYE/200 complete"
    else
        calls_failed=$((calls_failed + 1))
        fail "$variant: ${PHONE_USER[1]} calls $THIRD_USER at $CONTACT_IP (caller sipp exit $rc_uac, callee sipp exit $rc_uas)"
        echo "      caller:"; show_sipp_failure "$name.uac"
        echo "      callee:"; show_sipp_failure "$name.uas"
    fi
    seen=$(grep '^received ' "$vwork/$name.listener" || echo "received ?")
    if [ "$seen" = "received 0" ]; then
        ok "$variant: $THIRD_IP, where the REGISTER came from, received nothing during the call"
    else
        fail "$variant: $THIRD_IP, where the REGISTER came from, $seen: $(grep -v '^received\|^ready' "$vwork/$name.listener" | head -n 3 | tr '\n' ' ')"
    fi
}

# listen I NAME SECONDS [listener args...]: phone I's port 5060 held by the keepalive listener.
listen() {
    local i=$1 name=$2 secs=$3
    shift 3
    ip netns exec "${PHONE_NS[$i]}" timeout $((${secs%.*} + 15)) python3 "$helpers/keepalive_listener.py" \
        --bind "${PHONE_IP[$i]}:$SIP" --duration "$secs" --name "${PHONE_USER[$i]}" \
        --contact "sip:${PHONE_USER[$i]}@${PHONE_IP[$i]}:$SIP" --server "$SERVER_IP" "$@" >"$vwork/$name.out" 2>&1
}

# keepalives MODE SECONDS: both phones listen; each must see >= 3 pings at the interval.
keepalives() {
    local mode=$1 secs=$2 i pids=() rc
    for i in 1 2; do
        listen "$i" "keepalive-$mode-${PHONE_USER[$i]}" "$secs" --expect "$mode" --interval "$PING_INTERVAL" \
            --tol 0.3 --min 3 &
        pids[i]=$!
        bg_pids+=("${pids[$i]}")
    done
    for i in 1 2; do
        rc=0; wait "${pids[$i]}" || rc=$?
        local out="$vwork/keepalive-$mode-${PHONE_USER[$i]}.out" summary
        summary=$(grep '^summary' "$out" | tail -1 | sed 's/^summary //')
        if [ "$rc" = 0 ]; then
            ok "$variant: keepalive $mode to ${PHONE_USER[$i]} via ${ROUTER_PUB[$i]}:${mapped_port[$i]:-?} every ${PING_INTERVAL}s ±30 %: $summary"
        else
            fail "$variant: keepalive $mode to ${PHONE_USER[$i]} via ${ROUTER_PUB[$i]}:${mapped_port[$i]:-?}: ${summary:-listener exit $rc}"
            grep -v '^summary' "$out" | head -n 30 | sed 's/^/      /' || true
        fi
    done
}

# ping_failure REMOVE(true|false): alice stops answering OPTIONS, bob answers. After
# nat.ping_failures unanswered pings alice's binding is reported in sipedge's log (a WARN line
# when it is kept) and, with nat.ping_remove = true, removed from the store; bob's stays.
ping_failure() {
    local remove=$1 log="$vwork/sipedge.ping-failure-$1.log" secs pa pb rc t0 gone="" rows
    if [ "$remove" = true ]; then secs=$(( (PING_FAILURES + 3) * PING_INTERVAL + 2 )); else secs=$(( (PING_FAILURES + 2) * PING_INTERVAL + 1 )); fi
    listen 1 "ping-failure-$remove-alice" "$secs" --expect options --silent &
    pa=$!; bg_pids+=("$pa")
    listen 2 "ping-failure-$remove-bob" "$secs" --expect options --interval "$PING_INTERVAL" --tol 0.3 --min 3 &
    pb=$!; bg_pids+=("$pb")
    t0=$SECONDS
    while kill -0 "$pa" 2>/dev/null; do
        rows=$(python3 "$helpers/location.py" "$vwork/sipedge.db" "alice@$SERVER_IP" 2>/dev/null || echo error)
        if [ -z "$rows" ] && [ -z "$gone" ]; then gone=$((SECONDS - t0)); fi
        sleep 0.5
    done
    wait "$pa" || true
    rc=0; wait "$pb" || rc=$?
    local n_alice line
    n_alice=$(grep -c ' OPTIONS ' "$vwork/ping-failure-$remove-alice.out" || true)
    line=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep 'keepalive' | grep "aor=alice@$SERVER_IP" | head -1 | cut -c1-260 || true)
    if [ "$remove" = true ]; then
        if [ -n "$gone" ]; then
            ok "$variant: ping_remove: alice's binding removed ~${gone}s after she stopped answering ($n_alice unanswered OPTIONS, ping_failures = $PING_FAILURES)"
        else
            fail "$variant: ping_remove: alice left $n_alice OPTIONS unanswered in ${secs}s but her binding is still in the store"
        fi
        if [ -n "$line" ]; then
            ok "$variant: ping_remove: logged: $line"
        else
            fail "$variant: ping_remove: no keepalive line naming aor=alice@$SERVER_IP in sipedge's log"
        fi
    else
        if [ -z "$gone" ] && [ "$n_alice" -gt "$PING_FAILURES" ]; then
            ok "$variant: alice left $n_alice OPTIONS unanswered; binding kept (ping_remove = false)"
        else
            fail "$variant: alice left $n_alice OPTIONS unanswered (ping_remove = false): binding ${gone:+removed after ${gone}s}${gone:-kept}, expected kept after more than $PING_FAILURES pings"
        fi
        if [[ $line == *" WARN "* ]]; then
            ok "$variant: WARN for the silent binding: $line"
        else
            fail "$variant: no WARN line naming aor=alice@$SERVER_IP after $n_alice unanswered pings (ping_failures = $PING_FAILURES)${line:+; found: $line}"
        fi
    fi
    rows=$(python3 "$helpers/location.py" "$vwork/sipedge.db" "bob@$SERVER_IP" 2>/dev/null || true)
    if [ -n "$rows" ] && [ "$rc" = 0 ]; then
        ok "$variant: bob, answering, kept his binding and his pings: $(grep '^summary' "$vwork/ping-failure-$remove-bob.out" | sed 's/^summary //')"
    else
        fail "$variant: bob answered his pings: binding ${rows:-gone}, $(grep '^summary' "$vwork/ping-failure-$remove-bob.out" 2>/dev/null || echo "listener exit $rc")"
    fi
}

# ---------------------------------------------------------------------------------------------
# One variant: fresh topology, fresh store, every check.

run_variant() {  # $1 = name, $2 = MASQUERADE options
    variant=$1
    variant_failed=0
    vwork="$work/$variant"
    mkdir -p "$vwork"
    local t0=$SECONDS i
    echo "== $variant: MASQUERADE ${2:-(port-preserving)}"
    setup_topology "$2"

    write_config "$vwork/options.toml" OPTIONS ""
    local cc
    cc=$("$bin" check-config -c "$vwork/options.toml" 2>&1) || die "check-config rejected $vwork/options.toml: $cc"
    for i in 1 2; do
        "$bin" user add "${PHONE_USER[$i]}" --password "${PHONE_PASS[$i]}" -c "$vwork/options.toml" >/dev/null
    done
    "$bin" user add "$THIRD_USER" --password "$THIRD_PASS" -c "$vwork/options.toml" >/dev/null
    start_server "$vwork/options.toml" options

    # 1. registration behind NAT, and the binding in the store
    for i in 1 2; do register "$i"; done
    for i in 1 2; do check_binding "$i"; done
    if [ "$variant" = symmetric ]; then
        for i in 1 2; do
            if [ -n "${mapped_port[$i]:-}" ] && [ "${mapped_port[$i]}" != "$SIP" ]; then
                ok "$variant: ${ROUTER_NS[$i]} mapped ${PHONE_IP[$i]}:$SIP to public port ${mapped_port[$i]} (not $SIP)"
            else
                fail "$variant: ${ROUTER_NS[$i]} mapped ${PHONE_IP[$i]}:$SIP to port ${mapped_port[$i]:-?}; --random-fully should pick another"
            fi
        done
    fi

    # 2. calls, all four combinations
    call 1 2 caller
    call 1 2 callee
    call 2 1 caller
    call 2 1 callee

    # 2c. a contact registered by a third party, on public-looking addresses: called at its Contact
    third_party

    # 2b. two-way audio through the relay, each way: SDP with private addresses, RTP through NATs
    media_call 1 2
    media_call 2 1

    # 3. keepalives: OPTIONS (answered), then CRLF after a restart (bindings come from the store)
    keepalives options 9
    stop_server
    write_config "$vwork/crlf.toml" crlf ""
    start_server "$vwork/crlf.toml" crlf
    keepalives crlf 9
    stop_server

    # 4. unanswered OPTIONS: a WARN and the binding kept; then, with ping_remove, removed
    local remove cc_err
    for remove in false true; do
        write_config "$vwork/ping-failure-$remove.toml" OPTIONS "ping_failures = $PING_FAILURES
ping_remove = $remove"
        if cc_err=$("$bin" check-config -c "$vwork/ping-failure-$remove.toml" 2>&1 >/dev/null); then
            start_server "$vwork/ping-failure-$remove.toml" "ping-failure-$remove"
            ping_failure "$remove"
            stop_server
        else
            fail "$variant: sipedge rejects nat.ping_failures/nat.ping_remove: $cc_err"
        fi
    done

    if grep -q "panicked" "$vwork"/sipedge.*.log; then fail "$variant: sipedge panicked"; fi
    local logf warns
    for logf in "$vwork"/sipedge.*.log; do
        warns=$(sed 's/\x1b\[[0-9;]*m//g' "$logf" | grep -E ' (WARN|ERROR) ' || true)
        [ -n "$warns" ] || continue
        echo "      $(basename "$logf"): $(printf '%s\n' "$warns" | wc -l) warn/error lines"
        case $logf in
            *options.log) echo "        (the call phase leaves a phone's port closed between SIPp runs: pings that fall there go unanswered;" \
                "a media call's first packets to the other side go to its private SDP address until it sends: media send failed)" ;;
            *ping-failure-false.log) echo "        (expected: alice stopped answering)" ;;
        esac
        printf '%s\n' "$warns" | head -n 5 | cut -c1-240 | sed 's/^/        /'
    done
    remove_namespaces
    if [ "$variant_failed" = 0 ]; then
        echo "== $variant: PASS ($((SECONDS - t0)) s)"
        results+=("== $variant: PASS")
    else
        echo "== $variant: FAIL ($((SECONDS - t0)) s)"
        results+=("== $variant: FAIL")
    fi
}

for v in ${NAT_VARIANTS:-masquerade symmetric}; do
    case $v in
        masquerade) run_variant masquerade "" ;;
        symmetric) run_variant symmetric "--random-fully" ;;
        *) die "unknown variant $v in NAT_VARIANTS (masquerade, symmetric)" ;;
    esac
done

echo
echo "nat-test summary: $calls_total calls, $calls_failed failed; $media_calls calls with audio"
if [ "${#media_numbers[@]}" -gt 0 ]; then printf '  %s\n' "${media_numbers[@]}"; fi
printf '%s\n' "${results[@]}" | grep '^==' || true
exit $failed
