#!/usr/bin/env bash
# A real softphone behind NAT (optional, not in CI): baresip registers as alice from 10.0.1.2
# behind se-nat1, a SIPp phone registers as bob from 192.168.2.2 behind se-nat2 (the topology
# of scripts/nat-test.sh, scripts/nat/lib.sh), and they call each other through sipedge:
#   1. bob calls alice (baresip auto-answers), bob hangs up
#   2. bob calls alice, baresip hangs up
#   3. baresip calls bob, baresip hangs up
#   4. baresip calls bob, bob hangs up
# while sipedge sends OPTIONS keepalives every 2 s, which baresip must answer (no "does not
# answer keepalives" line for alice in sipedge's log).
#
#   scripts/nat-softphone.sh             symmetric NAT (MASQUERADE --random-fully)
#   NAT_MODE=masquerade scripts/nat-softphone.sh   port-preserving MASQUERADE
#   SIPEDGE_BIN=path, KEEP_WORK=1        as in scripts/nat-test.sh
#
# Needs root, iproute2, iptables, SIPp (sip-tester), python3 and baresip (apt-get install -y
# baresip; its g711, aubridge and ctrl_tcp modules: no sound card). baresip is driven through
# ctrl_tcp on 127.0.0.1:4444 inside alice's namespace and quits by itself after 120 s.
# Exits non-zero on any failure or a missing tool; every wait is bounded; the namespaces are
# removed on exit. Takes about 15 s.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

. "$root/scripts/nat/lib.sh"

die() { echo "nat-softphone: $*" >&2; exit 1; }

nat_require_tools sipp baresip
[ -f /usr/lib/baresip/modules/ctrl_tcp.so ] || die "baresip's ctrl_tcp module is missing (/usr/lib/baresip/modules/ctrl_tcp.so); install it with: apt-get install -y baresip"
nat_lock

work=$(mktemp -d /tmp/sipedge-natsoft.XXXXXX)
vwork=$work
bg_pids=()
cleanup() {
    local p
    stop_server
    for p in "${bg_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    remove_namespaces
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "nat-softphone: work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
remove_namespaces

if [ -n "${SIPEDGE_BIN:-}" ]; then
    bin=$SIPEDGE_BIN
else
    cargo build --release --quiet --bin sipedge
    bin="$root/target/release/sipedge"
fi
[ -x "$bin" ] || die "no sipedge binary at $bin"
sipp_dir="$root/scripts/sipp"
helpers="$root/scripts/nat"
CTRL=127.0.0.1:4444

failed=0
ok() { echo "ok    $*"; }
fail() { echo "FAIL  $*"; failed=1; }

case ${NAT_MODE:-symmetric} in
    symmetric) masq="--random-fully" ;;
    masquerade) masq="" ;;
    *) die "NAT_MODE must be symmetric or masquerade" ;;
esac
echo "== softphone behind ${NAT_MODE:-symmetric} NAT"
setup_topology "$masq"
write_config "$work/sipedge.toml" OPTIONS ""
cc=$("$bin" check-config -c "$work/sipedge.toml" 2>&1) || die "check-config: $cc"
for i in 1 2; do "$bin" user add "${PHONE_USER[$i]}" --password "${PHONE_PASS[$i]}" -c "$work/sipedge.toml" >/dev/null; done
start_server "$work/sipedge.toml" softphone

# baresip as alice, 10.0.1.2:5060, auto-answer, audio bridged to itself (no sound card).
mkdir -p "$work/baresip"
cat > "$work/baresip/config" <<EOF
poll_method		epoll
sip_listen		${PHONE_IP[1]}:$SIP
call_local_timeout	120
call_max_calls		4
audio_player		aubridge,nat
audio_source		aubridge,nat
audio_alert		aubridge,nat
module_path		/usr/lib/baresip/modules
module			g711.so
module			aubridge.so
module_tmp		uuid.so
module_tmp		account.so
module_app		menu.so
module_app		ctrl_tcp.so
ctrl_tcp_listen		$CTRL
rtp_ports		20000-20099
EOF
echo "<sip:${PHONE_USER[1]}@$SERVER_IP>;auth_pass=${PHONE_PASS[1]};answermode=auto;regint=60" > "$work/baresip/accounts"
ip netns exec "${PHONE_NS[1]}" timeout 130 baresip -f "$work/baresip" -s -t 120 >"$work/baresip.log" 2>&1 </dev/null &
bg_pids+=("$!")

ctrl() { ip netns exec "${PHONE_NS[1]}" python3 "$helpers/baresip_ctrl.py" "$CTRL" "$@" >>"$work/ctrl.log" 2>&1; }
# wait_log PATTERN SECONDS: until baresip's log has PATTERN (bounded)
wait_log() {
    local n=$(( $2 * 10 ))
    for _ in $(seq 1 "$n"); do grep -q -- "$1" "$work/baresip.log" 2>/dev/null && return 0; sleep 0.1; done
    return 1
}
count_log() { grep -c -- "$1" "$work/baresip.log" 2>/dev/null || true; }

# 1. baresip registers behind NAT
rows=""
for _ in $(seq 1 100); do
    rows=$(python3 "$helpers/location.py" "$work/sipedge.db" "alice@$SERVER_IP" 2>/dev/null || true)
    [ -n "$rows" ] && break
    sleep 0.1
done
if [ -n "$rows" ]; then
    IFS='|' read -r _ contact received transport <<<"$rows"
    if [[ $contact == "sip:alice"*"@${PHONE_IP[1]}:$SIP"* ]] && [ "${received%:*}" = "${ROUTER_PUB[1]}" ]; then
        ok "baresip registered: contact $contact received $received ($transport)"
    else
        fail "baresip registered with contact $contact received $received ($transport)"
    fi
else
    fail "baresip did not register within 10 s"
    sed -n '1,60p' "$work/baresip.log" | sed 's/^/      /'
fi

sipp_phone2() {  # NAME SCENARIO [args...]: SIPp as bob on 192.168.2.2:5060, bounded
    local name=$1 scenario=$2
    shift 2
    ip netns exec "${PHONE_NS[2]}" timeout 40 sipp -sf "$sipp_dir/$scenario" -i "${PHONE_IP[2]}" -p "$SIP" \
        -t u1 -aa -timeout 30s -timeout_error -trace_msg -message_file "$work/$name.msg" \
        -trace_err -error_file "$work/$name.err" -nostdin "$@" >"$work/$name.out" 2>&1
}
bob_bound() {
    for _ in $(seq 1 50); do
        [ -n "$(ip netns exec "${PHONE_NS[2]}" ss -Hlun "sport = :$SIP" 2>/dev/null)" ] && return 0
        sleep 0.1
    done
    return 1
}
report_sipp() {  # RC NAME TEXT
    if [ "$1" = 0 ]; then ok "$3"; else
        fail "$3 (sipp exit $1)"
        tail -c 1500 "$work/$2.err" 2>/dev/null | sed 's/^/      /' || true
    fi
}

rc=0; sipp_phone2 register-bob nat_register.xml -m 1 -s bob -au bob -ap "${PHONE_PASS[2]}" "$SERVER_IP:$SIP" || rc=$?
report_sipp "$rc" register-bob "SIPp bob registered behind ${ROUTER_NS[2]}"

# 2. bob calls alice, bob hangs up
est0=$(count_log "Call established")
rc=0; sipp_phone2 call1 nat_uac.xml -m 1 -s alice -key me bob "$SERVER_IP:$SIP" || rc=$?
report_sipp "$rc" call1 "bob (SIPp) calls alice (baresip, auto-answer), bob hangs up"

# 3. bob calls alice, baresip hangs up
sipp_phone2 call2 nat_uac_callee_bye.xml -m 1 -s alice -key me bob "$SERVER_IP:$SIP" &
p=$!; bg_pids+=("$p")
for _ in $(seq 1 50); do [ "$(count_log "Call established")" -gt "$((est0 + 1))" ] && break; sleep 0.1; done
sleep 0.5
ctrl hangup || true
rc=0; wait "$p" || rc=$?
report_sipp "$rc" call2 "bob (SIPp) calls alice (baresip), baresip hangs up"

# 4. alice (baresip) calls bob, baresip hangs up
sipp_phone2 call3 nat_uas.xml -s bob &
p=$!; bg_pids+=("$p")
bob_bound || fail "bob's SIPp did not bind"
est=$(count_log "Call established")
ctrl dial "sip:bob@$SERVER_IP" || fail "baresip ctrl dial"
for _ in $(seq 1 50); do [ "$(count_log "Call established")" -gt "$est" ] && break; sleep 0.1; done
sleep 0.5
ctrl hangup || true
rc=0; wait "$p" || rc=$?
report_sipp "$rc" call3 "alice (baresip) calls bob (SIPp), baresip hangs up"

# 5. alice (baresip) calls bob, bob hangs up
sipp_phone2 call4 nat_uas_bye.xml -s bob &
p=$!; bg_pids+=("$p")
bob_bound || fail "bob's SIPp did not bind"
closed=$(count_log "session closed")
ctrl dial "sip:bob@$SERVER_IP" || fail "baresip ctrl dial"
rc=0; wait "$p" || rc=$?
report_sipp "$rc" call4 "alice (baresip) calls bob (SIPp), bob hangs up"
for _ in $(seq 1 30); do [ "$(count_log "session closed")" -gt "$closed" ] && break; sleep 0.1; done
if [ "$(count_log "session closed")" -gt "$closed" ]; then
    ok "baresip saw bob's BYE: $(grep "session closed" "$work/baresip.log" | tail -1)"
else
    fail "baresip did not close the call after bob's BYE"
fi

# 6. keepalives answered by baresip all along
sleep $((PING_INTERVAL * 2))
n_opt=$(grep -c "^OPTIONS sip:alice" "$work/baresip.log" || true)
if grep -q "does not answer keepalives.*aor=alice" "$vwork/sipedge.softphone.log"; then
    fail "sipedge says baresip does not answer keepalives ($n_opt OPTIONS seen by baresip)"
elif [ "$n_opt" -ge 3 ]; then
    ok "baresip received and answered $n_opt keepalive OPTIONS; no unanswered-keepalive warning"
else
    fail "baresip saw only $n_opt keepalive OPTIONS"
fi

if grep -q "panicked" "$work"/sipedge.*.log; then fail "sipedge panicked"; fi
warns=$(sed 's/\x1b\[[0-9;]*m//g' "$work/sipedge.softphone.log" | grep -E ' (WARN|ERROR) ' || true)
[ -z "$warns" ] || { echo "      sipedge warn/error lines:"; printf '%s\n' "$warns" | head -n 10 | cut -c1-240 | sed 's/^/        /'; }
berr=$(sed 's/\x1b\[[0-9;]*m//g' "$work/baresip.log" | grep -iE "error|fail|refused|unreachable" | grep -v "ctrl_tcp: failed to send" | sort | uniq -c || true)
[ -z "$berr" ] || { echo "      baresip error-like lines:"; printf '%s\n' "$berr" | head -n 10 | sed 's/^/        /'; }
if [ "$failed" = 0 ]; then echo "== softphone: PASS"; else echo "== softphone: FAIL"; fi
exit $failed
