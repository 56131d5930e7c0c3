#!/usr/bin/env bash
# Soak test: many relayed calls with RTP at a steady rate, sipedge sampled all along; does it
# come back to zero, and does its memory stay flat?
#
#   scripts/soak.sh                                   # 100,000 calls at 100/s (~17 min + 40 s idle)
#   CALLS=6000 RATE=100 SAMPLE_S=2 scripts/soak.sh    # short mode for CI (~110 s)
#   SIPEDGE_BIN=target/release/sipedge scripts/soak.sh   # use this binary, build nothing
#
# Load (SIPp, UDP, loopback only): CALLS calls at RATE calls/s in four groups running at once,
# each a SIPp caller -> sipedge (a [[route]] with media = "always" per group) -> a SIPp callee:
#   caller-bye 55 %  answered; the caller plays /usr/share/sip-tester/g711a.pcap (G.711, 50
#                    packets/s) through the relay, the callee echoes it back (-rtp_echo); the
#                    caller hangs up after HOLD_MS   (media_uac_rtp.xml + media_uas_echo.xml)
#   callee-bye 20 %  answered; the callee hangs up after HOLD_MS (media_uac_callee_bye.xml +
#                    media_uas_bye.xml)
#   cancel     15 %  the callee rings; the caller CANCELs (media_uac_cancel.xml + media_uas_ring.xml)
#   busy       10 %  the callee answers 486 (media_uac_busy.xml + media_uas_busy.xml)
# Every call offers SDP, so every call takes relay ports (the cancelled and rejected ones give
# them back at the final response). About RATE x HOLD_MS/1000 x 0.75 answered calls are up at once.
#
# Sampled every SAMPLE_S s (scripts/soak_report.py sample): sipedge's RSS and PSS
# (/proc/PID/smaps_rollup), open fds (/proc/PID/fd), CPU, and from its control endpoint
# (/api/stats): relay sessions (media_sessions), relay ports in use (relay_ports_in_use),
# relayed calls (media_calls), transactions (proxy_transactions, server + client), packets
# forwarded; calls done from the SIPp callers' -trace_stat files. When the callers are done,
# IDLE_S s more of samples (>= 34: RFC 3261 Timer D/J/K/L/M keep UDP transactions 32 s), then
# SIGTERM and the shutdown lines.
#
# Pass criteria (last line "soak: PASS|FAIL (...)"; exit status 1 on FAIL):
#   - RSS flat after warm-up: the load-phase samples after the warm-up -- the first WARMUP_PCT %
#     (20) of the load phase, at least WARMUP_MIN_S (32 + HOLD + 5 s: finished UDP transactions
#     are kept 32 s, so the transaction table fills for that long before its steady state) --
#     all lie within +-RSS_TOL % (5) of their mean (max(max - mean, mean - min) / mean <=
#     RSS_TOL / 100); the spread and the slope (kB per 1000 calls) are printed too
#   - after IDLE_S s idle: 0 relay sessions, 0 relay ports, 0 relayed calls, 0 transactions
#     (control endpoint), and the shutdown lines say the same ("media relay stopping
#     media.calls=0 relay.sessions=0 relay.ports=0", "listeners stopped transactions.server=0
#     transactions.client=0")
#   - every SIPp caller and callee: 0 failed calls, every planned call successful
#   - RTP flowed: the relay forwarded > 0 packets (and the count per caller-bye call is printed)
#   - open fds at the end <= before the calls + FD_SLACK (16); no panic, sipedge alive until SIGTERM
# Output: $WORK/soak.csv (t_s, calls_done, rss_kb, pss_kb, fds, sessions, ports, transactions,
# media_calls, packets, cpu_s, phase), $WORK/soak.svg (the curves), sipedge.log, SIPp files.
#
# Knobs (env): CALLS=100000 RATE=100 (calls/s, all groups) HOLD_MS=3000 SAMPLE_S=10 IDLE_S=40
#   WARMUP_PCT=20 WARMUP_MIN_S=auto (32 + HOLD_MS/1000 + 5) RSS_TOL=5 FD_SLACK=16 HARD_LIMIT=auto (s for the load phase: 2 x CALLS/RATE +
#   HOLD + 120; then the callers are stopped and the run FAILS) BASE_PORT=15200 (sipedge SIP on
#   BASE, callees BASE+1.., callers BASE+11.., SIPp media BASE+100.., control BASE+99)
#   MEDIA_PORTS=20000-27999 WORK=/tmp/sipedge-soak SIPEDGE_BIN= (unset: cargo build --release,
#   under flock $CARGO_LOCK (/tmp/sipedge-cargo.lock) unless this script already runs under it)
# Needs: sipp built with pcap play (Debian sip-tester), python3, curl; root (SIPp plays pcaps
# through a raw socket). Installs nothing: a missing tool is an error naming the package.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

CALLS=${CALLS:-100000}
RATE=${RATE:-100}
HOLD_MS=${HOLD_MS:-3000}
SAMPLE_S=${SAMPLE_S:-10}
IDLE_S=${IDLE_S:-40}
WARMUP_PCT=${WARMUP_PCT:-20}
RSS_TOL=${RSS_TOL:-5}
FD_SLACK=${FD_SLACK:-16}
BASE_PORT=${BASE_PORT:-15200}
MEDIA_PORTS=${MEDIA_PORTS:-20000-27999}
WORK=${WORK:-/tmp/sipedge-soak}
CARGO_LOCK=${CARGO_LOCK:-/tmp/sipedge-cargo.lock}
PCAP=/usr/share/sip-tester/g711a.pcap

die() {
    echo "soak: $*" >&2
    exit 1
}
for v in CALLS RATE HOLD_MS SAMPLE_S IDLE_S WARMUP_PCT RSS_TOL FD_SLACK BASE_PORT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v=${!v}: expected a whole number"
done
[ "$CALLS" -ge 100 ] || die "CALLS=$CALLS: at least 100"
[ "$RATE" -ge 1 ] && [ "$RATE" -le 2000 ] || die "RATE=$RATE: 1..2000 calls/s"
[ "$HOLD_MS" -ge 200 ] && [ "$HOLD_MS" -le 9000 ] || die "HOLD_MS=$HOLD_MS: 200..9000 (the callee-bye caller waits 10 s for the BYE)"
[ "$IDLE_S" -ge 34 ] || die "IDLE_S=$IDLE_S < 34: UDP transactions linger 32 s, the check would be meaningless"
[ "$SAMPLE_S" -ge 1 ] || die "SAMPLE_S must be >= 1"
WARMUP_MIN_S=${WARMUP_MIN_S:-$((32 + HOLD_MS / 1000 + 5))}
HARD_LIMIT=${HARD_LIMIT:-$((2 * CALLS / RATE + HOLD_MS / 1000 + 120))}

# ---- prerequisites (nothing is installed here) ----
command -v sipp >/dev/null 2>&1 || die "sipp not found; install it with: apt-get install -y sip-tester"
[[ $(sipp -v 2>&1 || true) == *PCAP* ]] || die "this sipp cannot play pcaps (play_pcap_audio); install Debian's sip-tester"
[ -r "$PCAP" ] || die "$PCAP not found; it comes with SIPp: apt-get install -y sip-tester"
command -v python3 >/dev/null 2>&1 || die "python3 not found; install it with: apt-get install -y python3"
command -v curl >/dev/null 2>&1 || die "curl not found; install it with: apt-get install -y curl"
[ "$(id -u)" = 0 ] || die "must run as root: SIPp plays pcaps through a raw socket"

# ---- the binary ----
under_lock() { # is an ancestor of this shell `flock <CARGO_LOCK> ...`? (then taking it again would deadlock)
    local p=$$ cmd
    while [ "$p" -gt 1 ]; do
        cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null || true)
        [[ $cmd == flock*"$CARGO_LOCK"* || $cmd == */flock*"$CARGO_LOCK"* ]] && return 0
        p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null || echo 1)
    done
    return 1
}
if [ -z "${SIPEDGE_BIN:-}" ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (Rust toolchain, https://rustup.rs) -- or set SIPEDGE_BIN"
    echo "soak: cargo build --release"
    if under_lock || ! command -v flock >/dev/null 2>&1; then
        (cd "$root" && cargo build --release) || die "build failed"
    else
        (cd "$root" && flock "$CARGO_LOCK" cargo build --release) || die "build failed"
    fi
    SIPEDGE_BIN=$root/target/release/sipedge
fi
[ -x "$SIPEDGE_BIN" ] || die "$SIPEDGE_BIN is not an executable"

# ---- ports, config ----
sip_port=$BASE_PORT
control=127.0.0.1:$((BASE_PORT + 99))
groups=(caller-bye callee-bye cancel busy)
shares=(55 20 15 10)
uas_sf=(media_uas_echo.xml media_uas_bye.xml media_uas_ring.xml media_uas_busy.xml)
uac_sf=(media_uac_rtp.xml media_uac_callee_bye.xml media_uac_cancel.xml media_uac_busy.xml)
ports_in_use=""
for p in $sip_port $((BASE_PORT + 1)) $((BASE_PORT + 2)) $((BASE_PORT + 3)) $((BASE_PORT + 4)) \
    $((BASE_PORT + 11)) $((BASE_PORT + 12)) $((BASE_PORT + 13)) $((BASE_PORT + 14)); do
    [ -z "$(ss -Hlnu "sport = :$p" 2>/dev/null)" ] || ports_in_use+=" udp:$p"
done
[ -z "$(ss -Hlnt "sport = :$((BASE_PORT + 99))" 2>/dev/null)" ] || ports_in_use+=" tcp:$((BASE_PORT + 99))"
[ -z "$ports_in_use" ] || die "ports in use by something else:$ports_in_use (set BASE_PORT)"

rm -rf "$WORK"
mkdir -p "$WORK"
cfg=$WORK/sipedge.toml
cat >"$cfg" <<TOML
# written by scripts/soak.sh (a test run dir; not a deployment config)
[server]
listen = ["udp:127.0.0.1:$sip_port"]
domains = ["127.0.0.1"]

[database]
url = "sqlite://$WORK/sipedge.db"

[control]
listen = "$control"

[media]
address = "127.0.0.1"
ports = "$MEDIA_PORTS"
# every SIPp caller is 127.0.0.1
max_sessions_per_caller = 2000
TOML
for i in "${!groups[@]}"; do
    cat >>"$cfg" <<TOML

[[route]]
name = "${groups[$i]}"
user = '^2${i}00\$'
next_hop = "127.0.0.1:$((BASE_PORT + 1 + i))"
media = "always"
TOML
done
"$SIPEDGE_BIN" check-config -c "$cfg" >"$WORK/check-config.out" 2>&1 ||
    die "check-config rejected $cfg: $(cat "$WORK/check-config.out")"

# ---- cleanup: only what this script started, by PID ----
pids=()
server_pid=""
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- sipedge ----
log=$WORK/sipedge.log
RUST_LOG="warn,sipedge::driver=info,sipedge::app=info" "$SIPEDGE_BIN" serve -c "$cfg" </dev/null >"$log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
    kill -0 "$server_pid" 2>/dev/null || die "sipedge exited at start: $(tail -n 20 "$log")"
    curl -sf -m 1 "http://$control/api/status" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf -m 1 "http://$control/api/status" >/dev/null 2>&1 || die "sipedge's control endpoint $control did not answer in 10 s"

# the baseline, before any call
read -r rss0 pss0 < <(awk '/^Rss:/ {r = $2} /^Pss:/ {p = $2} END {print r, p}' "/proc/$server_pid/smaps_rollup")
fds0=$(find "/proc/$server_pid/fd" -mindepth 1 -maxdepth 1 | wc -l)

# ---- SIPp ----
STAMP_T0=$(date +%s)
deadline=$((STAMP_T0 + HARD_LIMIT))
sipp_common=(-i 127.0.0.1 -t u1 -nostdin -max_recv_loops 1000 -timeout "$((HARD_LIMIT + 60))s" -timeout_error
    -trace_stat -fd 1)
declare -a n_calls r_calls uac_specs uas_specs sample_uacs
left=$CALLS
for i in "${!groups[@]}"; do
    if [ "$i" -lt $((${#groups[@]} - 1)) ]; then
        n_calls[i]=$((CALLS * shares[i] / 100))
    else
        n_calls[i]=$left
    fi
    left=$((left - n_calls[i]))
    # calls per 10 s (-rp 10000): 1 decimal of calls/s per group
    r_calls[i]=$((RATE * shares[i] / 10))
    [ "${r_calls[i]}" -ge 1 ] || r_calls[i]=1
done
# callees first, then the callers once their sockets are bound
for i in "${!groups[@]}"; do
    g=${groups[$i]}
    extra=()
    case "$g" in
    caller-bye) extra=(-rtp_echo) ;;
    callee-bye) extra=(-d "$HOLD_MS") ;;
    esac
    (cd "$WORK" && exec timeout "$((HARD_LIMIT + 90))" sipp -sf "$here/sipp/${uas_sf[$i]}" "${sipp_common[@]}" \
        -p $((BASE_PORT + 1 + i)) -mp $((BASE_PORT + 100 + 10 * i)) -m "${n_calls[$i]}" \
        -stf "$WORK/$g.uas.csv" -trace_err -error_file "$WORK/$g.uas.err" "${extra[@]}" >"$WORK/$g.uas.out" 2>&1) &
    pids+=("$!")
    uas_specs+=(--uas "$g:$WORK/$g.uas.csv")
done
for i in "${!groups[@]}"; do
    hex=$(printf '0100007F:%04X' $((BASE_PORT + 1 + i)))
    for _ in $(seq 1 50); do grep -q " $hex " /proc/net/udp && break; sleep 0.1; done
    grep -q " $hex " /proc/net/udp || die "the SIPp callee ${groups[$i]} did not bind 127.0.0.1:$((BASE_PORT + 1 + i)): $(tail -n 5 "$WORK/${groups[$i]}.uas.out")"
done
echo "soak: $CALLS calls at $RATE calls/s (hold ${HOLD_MS} ms) through sipedge pid $server_pid on 127.0.0.1:$sip_port," \
    "sampled every $SAMPLE_S s, hard limit $HARD_LIMIT s, then $IDLE_S s idle; work dir $WORK"
for i in "${!groups[@]}"; do
    g=${groups[$i]}
    extra=()
    case "$g" in
    caller-bye) extra=(-d "$HOLD_MS") ;;
    esac
    echo "  $g: ${n_calls[$i]} calls at $((r_calls[i] / 10)).$((r_calls[i] % 10))/s (${uac_sf[$i]} -> ${uas_sf[$i]})"
    (cd "$WORK" && exec timeout "$((HARD_LIMIT + 60))" sipp -sf "$here/sipp/${uac_sf[$i]}" "${sipp_common[@]}" \
        -p $((BASE_PORT + 11 + i)) -mp $((BASE_PORT + 150 + 10 * i)) -m "${n_calls[$i]}" \
        -r "${r_calls[$i]}" -rp 10000 -l 5000 -s "2${i}00" -stf "$WORK/$g.uac.csv" \
        -trace_err -error_file "$WORK/$g.uac.err" "${extra[@]}" "127.0.0.1:$sip_port" >"$WORK/$g.uac.out" 2>&1) &
    pids+=("$!")
    sample_uacs+=(--uac "$!:$WORK/$g.uac.csv")
    uac_specs+=(--uac "$g:${n_calls[$i]}:$WORK/$g.uac.csv")
done

python3 "$here/soak_report.py" sample --pid "$server_pid" --control "$control" --csv "$WORK/soak.csv" \
    --sample-s "$SAMPLE_S" --idle-s "$IDLE_S" --deadline "$deadline" "${sample_uacs[@]}"

# the callees end with their last call; give them a moment, then stop what is left
for p in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -TERM "$p" 2>/dev/null || true
done
wait "${pids[@]}" 2>/dev/null || true
pids=()

# ---- shutdown lines ----
extra_fail=()
if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    for _ in $(seq 1 150); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
        extra_fail+=(--extra-fail "sipedge did not stop within 15 s of SIGTERM")
    fi
else
    extra_fail+=(--extra-fail "sipedge was not running at the end (crash?)")
fi
wait "$server_pid" 2>/dev/null || true
server_pid=""
media_line=$(grep -o 'media relay stopping.*' "$log" | tail -n 1 || true)
txn_line=$(grep -o 'listeners stopped.*' "$log" | tail -n 1 || true)
echo
echo "shutdown: ${txn_line:-no 'listeners stopped' line}"
echo "shutdown: ${media_line:-no 'media relay stopping' line}"
grep -qE 'transactions\.server=0 transactions\.client=0$' <<<"$txn_line" ||
    extra_fail+=(--extra-fail "shutdown line: ${txn_line:-missing}")
grep -qE 'media\.calls=0 relay\.sessions=0 relay\.ports=0( |$)' <<<"$media_line" ||
    extra_fail+=(--extra-fail "shutdown line: ${media_line:-missing}")
! grep -q panicked "$log" || extra_fail+=(--extra-fail "panic in $log")
n_warn=$(grep -cE ' (WARN|ERROR) ' "$log" || true)
echo "sipedge log $log: $n_warn WARN/ERROR lines"
grep -E ' (WARN|ERROR) ' "$log" | sed -E 's/^[0-9T:.-]+Z +//; s/call_id=[^ ]+/call_id=…/g' | cut -c1-200 |
    sort | uniq -c | sort -rn | head -n 5 || true
over=()
[ ! -e "$WORK/soak.csv.over_time" ] || over=(--over-time)
rc=0
python3 "$here/soak_report.py" report --csv "$WORK/soak.csv" --svg "$WORK/soak.svg" --sample-s "$SAMPLE_S" \
    --idle-s "$IDLE_S" --warmup "$(awk "BEGIN { print $WARMUP_PCT / 100 }")" --warmup-min-s "$WARMUP_MIN_S" \
    --fds-before "$fds0" --rss-before "$rss0" --pss-before "$pss0" --rss-tol "$RSS_TOL" --fd-slack "$FD_SLACK" \
    "${uac_specs[@]}" "${uas_specs[@]}" "${over[@]}" "${extra_fail[@]}" || rc=$?
exit "$rc"
