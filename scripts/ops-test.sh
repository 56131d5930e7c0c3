#!/usr/bin/env bash
# Operations test with real peers (issue #12): a release sipedge on loopback, a SIPp phone that
# registers with digest authentication and answers a call whose media goes through the relay,
# and, while the call is up:
#   - `sipedge show registrations` lists the phone (AOR, contact, NAT binding, transport);
#   - `sipedge show calls` lists the call, confirmed, with its relay ports and packets;
#   - /metrics (OpenMetrics text) has the metric names, and the values moved;
#   - the web page, loaded in headless Chromium, shows the call and the registration
#     (the DOM after its scripts ran), and a screenshot is taken;
# then the call ends and the `cdr` table and /api/cdr have its record.
#
#   scripts/ops-test.sh              build (release) and run (about 40 s)
#   SIPEDGE_BIN=path scripts/ops-test.sh   use this binary
#   OPS_SCREENSHOT=file.png          where the page's screenshot goes (default: the work dir,
#                                    printed; kept with KEEP_WORK=1)
#
# Needs root (SIPp plays the pcap through a raw socket), SIPp (sip-tester), python3, and
# Chromium (Debian: apt-get install -y chromium). Never skips: a missing tool is an error that
# names the package. Only 127.0.0.1 is used; every wait is bounded.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

die() { echo "ops-test: $*" >&2; exit 1; }

command -v sipp >/dev/null 2>&1 || die "sipp not found; install it with: apt-get install -y sip-tester"
command -v python3 >/dev/null 2>&1 || die "python3 not found; install it with: apt-get install -y python3"
chromium=$(command -v chromium || command -v chromium-browser || true)
[ -n "$chromium" ] || die "chromium not found; install it with: apt-get install -y chromium"
[ -r /usr/share/sip-tester/g711a.pcap ] || die "g711a.pcap not found; install sip-tester"
[ "$(id -u)" = 0 ] || die "must run as root: SIPp plays pcaps through a raw socket"

work=$(mktemp -d /tmp/sipedge-ops.XXXXXX)
server_pid=""
bg_pids=()
cleanup() {
    local p
    for p in "${bg_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "ops-test: work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${SIPEDGE_BIN:-}" ]; then
    bin=$SIPEDGE_BIN
else
    cargo build --release --quiet --bin sipedge
    bin="$root/target/release/sipedge"
fi

failed=0
ok() { echo "ok    $*"; }
fail() { echo "FAIL  $*"; failed=1; }

port=$(( 20000 + RANDOM % 20000 ))
control=$((port + 1)); phone_port=$((port + 2)); caller_port=$((port + 3))
media_lo=$(( 30000 + (RANDOM % 100) * 100 )); media_hi=$((media_lo + 99))
phone_rtp=$((port + 10)); caller_rtp=$((port + 20))
cat > "$work/sipedge.toml" <<TOML
[server]
listen = ["udp:127.0.0.1:$port"]
domains = ["127.0.0.1"]
fr_inv_timer = 10
[database]
url = "sqlite://$work/sipedge.db"
[nat]
ping_interval = 0
[media]
ports = "$media_lo-$media_hi"
mode = "always"
cdr_spool = "$work/cdr.spool"
[control]
listen = "127.0.0.1:$control"
TOML
"$bin" check-config -c "$work/sipedge.toml" >/dev/null

users="$work/users.csv"
{ echo SEQUENTIAL; echo "300000;pw300000"; } > "$users"
"$bin" user import -c "$work/sipedge.toml" "$users" >/dev/null

log="$work/sipedge.log"
"$bin" --log-level info serve -c "$work/sipedge.toml" 2>"$log" &
server_pid=$!
for _ in $(seq 1 100); do
    grep -q "sipedge started" "$log" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; die "sipedge did not start"; }
    sleep 0.1
done
grep -q "control endpoint listening" "$log" || fail "no 'control endpoint listening' line"
show() { "$bin" show "$@" -c "$work/sipedge.toml"; }
http() { python3 - "$1" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    sys.stdout.write(r.read().decode())
PY
}

# The phone registers from the port it then answers on (its flow), then waits for the call.
timeout 30 sipp -sf "$root/scripts/sipp/register_auth.xml" -inf "$users" -i 127.0.0.1 \
    -p "$phone_port" -m 1 -nostdin "127.0.0.1:$port" >"$work/register.out" 2>&1 \
    || fail "the phone did not register"
timeout 60 sipp -sf "$root/scripts/sipp/media_uas_echo.xml" -i 127.0.0.1 -p "$phone_port" \
    -mp "$phone_rtp" -rtp_echo -m 1 -nostdin -bg >/dev/null 2>&1 &
bg_pids+=($!)
sleep 0.3
# The caller holds the call 15 s (-d), playing the pcap, then hangs up.
timeout 60 sipp -sf "$root/scripts/sipp/media_uac_rtp.xml" -s 300000 -i 127.0.0.1 \
    -p "$caller_port" -mp "$caller_rtp" -d 15000 -m 1 -nostdin \
    -trace_err -error_file "$work/caller.err" "127.0.0.1:$port" >"$work/caller.out" 2>&1 &
caller_pid=$!
bg_pids+=($caller_pid)

# While the call is up.
calls=""
for _ in $(seq 1 100); do
    calls=$(show calls 2>&1 || true)
    [[ $calls == *confirmed* ]] && break
    sleep 0.1
done
sleep 2  # some RTP through the relay
regs=$(show registrations)
calls=$(show calls)
echo "--- sipedge show registrations"; echo "$regs"
echo "--- sipedge show calls"; echo "$calls"
if [[ $regs == *"300000@127.0.0.1"* && $regs == *"127.0.0.1:$phone_port"* && $regs == *udp* ]]; then
    ok "show registrations lists the phone and its flow"
else
    fail "show registrations: $regs"
fi
if [[ $calls == *confirmed* ]] && grep -qE "[0-9]+/[0-9]+" <<<"$calls" \
    && ! grep -qE "  0/0/" <<<"$calls"; then
    ok "show calls lists the call, confirmed, with relay ports and packets"
else
    fail "show calls: $calls"
fi
call_id=$(show calls --json | python3 -c 'import json,sys; c=json.load(sys.stdin); print(c[0]["call_id"] if c else "")')
[ -n "$call_id" ] || fail "show calls --json has no call"

metrics=$(http "http://127.0.0.1:$control/metrics")
missing=""
for name in sipedge_build_info sipedge_sip_requests_received_total sipedge_sip_responses_received_total \
    sipedge_registrar_bindings sipedge_proxy_transactions sipedge_security_auth_failures_total \
    sipedge_security_bans_active sipedge_media_calls sipedge_relay_ports_in_use \
    sipedge_relay_forwarded_packets_total sipedge_relay_forwarded_bytes_total \
    sipedge_nat_bindings_unreachable_total sipedge_cdr_write_failures_total \
    sipedge_heap_arena_bytes sipedge_heap_free_bytes sipedge_heap_trims_total; do
    grep -q "^$name" <<<"$metrics" || missing="$missing $name"
done
[ -z "$missing" ] && ok "/metrics has every expected name" || fail "/metrics lacks:$missing"
value() { awk -v n="$1" '$1 == n { print $2 }' <<<"$metrics"; }
if [ "$(value sipedge_registrar_bindings)" = 1 ] && [ "$(value sipedge_media_calls)" = 1 ] \
    && [ "$(value 'sipedge_sip_requests_received_total{method="INVITE"}')" -ge 1 ] \
    && [ "$(value sipedge_relay_forwarded_packets_total)" -gt 0 ] \
    && [ "$(value sipedge_heap_arena_bytes)" -gt 0 ]; then
    ok "/metrics values moved: 1 binding, 1 call, INVITEs received, packets forwarded, heap counted"
else
    fail "/metrics values: $(grep -E 'bindings|media_calls|method="INVITE"|forwarded_packets|heap_arena' <<<"$metrics")"
fi

# The web page in a real browser: its scripts fetch the API and fill the tables.
shot=${OPS_SCREENSHOT:-$work/page.png}
browser=(timeout 60 "$chromium" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage
    --user-data-dir="$work/chromium" --virtual-time-budget=4000)
dom=$("${browser[@]}" --dump-dom "http://127.0.0.1:$control/" 2>"$work/chromium.err" || true)
if [[ $dom == *"$call_id"* && $dom == *"300000@127.0.0.1"* && $dom == *confirmed* ]]; then
    ok "the web page in headless Chromium shows the call and the registration"
else
    fail "the page's DOM lacks the call or the registration (chromium: $(tail -3 "$work/chromium.err"))"
fi
"${browser[@]}" --window-size=1500,800 --screenshot="$shot" "http://127.0.0.1:$control/" \
    >/dev/null 2>>"$work/chromium.err" || true
[ -s "$shot" ] && ok "screenshot: $shot" || fail "no screenshot"

# The call ends: its record is in the table and served.
wait "$caller_pid" 2>/dev/null || fail "the caller's call failed ($(tail -c 400 "$work/caller.err" 2>/dev/null))"
cdr=""
for _ in $(seq 1 50); do
    cdr=$(http "http://127.0.0.1:$control/api/cdr?limit=5")
    [[ $cdr == *"$call_id"* ]] && break
    sleep 0.1
done
[[ $cdr == *"$call_id"* ]] && ok "/api/cdr has the call's record" || fail "/api/cdr: $cdr"

kill -TERM "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
grep -q "sipedge stopped" "$log" && ok "stopped cleanly" || fail "no 'sipedge stopped' line"
if grep -q panicked "$log"; then fail "sipedge panicked"; fi
exit $failed
