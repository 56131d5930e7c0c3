#!/usr/bin/env bash
# Media relay test with real peers (issue #6): SIPp callers and callees on loopback, calls
# through a [[route]] with media = "always", checked against sipedge's per-call stats lines,
# its cdr table and its shutdown counters.
#
#   1. Media both ways, stats that match:
#      a. MEDIA_CALLS (20) SIPp calls, MEDIA_CONCURRENT (10) at a time: the caller plays
#         /usr/share/sip-tester/g711a.pcap (play_pcap_audio), the callee echoes it (-rtp_echo).
#         Per call: caller_pkts and callee_pkts within ±1 % of the pcap's RTP packet count
#         (counted here by reading the pcap); the SDP each side got names the relay.
#      b. PY_CALLS (10) SIPp calls whose media is a python3 RTP endpoint on both sides: the
#         caller's plays the pcap's RTP to the address of the 200's SDP and counts what comes
#         back, the callee's echoes. Per call: the caller received the callee's packets from
#         exactly the relay address and port of its 200's SDP, the callee received the
#         caller's from the address and port of its INVITE's SDP, and caller_pkts / callee_pkts
#         match what each endpoint sent (±1 %).
#      Every call: exactly one `media session closed` line, one cdr row with the same figures.
#   2. MIX_CALLS (1000) calls of mixed endings at ~MIX_RATE (70) calls/s: answered + RTP + BYE
#      from the caller; answered + BYE from the callee; CANCEL while ringing; 486; answered,
#      a burst of RTP and then silence with no BYE (media.idle_timeout); an offer never
#      answered (media.offer_timeout, then 408 after server.fr_inv_timer). Then SIGTERM:
#      one stats line per call with the reason its ending calls for (bye, cancel, failed,
#      timeout), `media relay stopping media.calls=0 relay.sessions=0 relay.ports=0`, and
#      `listeners stopped transactions.server=0`.
#
#   scripts/media-test.sh                 build (release) and run everything (about 1.5 min)
#   SIPEDGE_BIN=path scripts/media-test.sh   use this binary, do not build
#   KEEP_WORK=1 scripts/media-test.sh     keep the logs, SIPp traces and the database
#   MIX_CALLS=200 scripts/media-test.sh   a shorter mixed run (the split keeps its proportions)
#
# Needs root (SIPp plays pcaps through a raw socket), SIPp with pcap play (Debian package
# sip-tester, which also ships g711a.pcap) and python3. Exits non-zero if a check fails or a
# tool is missing; never skips silently. Every run and wait is bounded; only 127.0.0.1 is used.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

MEDIA_CALLS=${MEDIA_CALLS:-20}
MEDIA_CONCURRENT=${MEDIA_CONCURRENT:-10}
PY_CALLS=${PY_CALLS:-10}
MIX_CALLS=${MIX_CALLS:-1000}
MIX_RATE=${MIX_RATE:-70}
IDLE_TIMEOUT=3   # media.idle_timeout
OFFER_TIMEOUT=2  # media.offer_timeout, shorter than fr_inv_timer: the offer times out first
FR_INV_TIMER=5   # server.fr_inv_timer
PCAP=/usr/share/sip-tester/g711a.pcap
SHORT_PKTS=20    # the burst of the mixed run: the pcap's first 20 packets (0.6 s)

die() { echo "media-test: $*" >&2; exit 1; }

command -v sipp >/dev/null 2>&1 || die "sipp not found; install it with: apt-get install -y sip-tester"
command -v python3 >/dev/null 2>&1 || die "python3 not found; install it with: apt-get install -y python3"
[ -r "$PCAP" ] || die "$PCAP not found; it comes with SIPp: apt-get install -y sip-tester"
sipp_version=$(sipp -v 2>&1 || true)
[[ $sipp_version == *PCAP* ]] || die "this sipp is built without pcap play (play_pcap_audio); install Debian's sip-tester"
[ "$(id -u)" = 0 ] || die "must run as root: SIPp plays pcaps through a raw socket"

work=$(mktemp -d /tmp/sipedge-media.XXXXXX)
server_pid=""
bg_pids=()
cleanup() {
    local p
    for p in "${bg_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "media-test: work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t_start=$SECONDS
if [ -n "${SIPEDGE_BIN:-}" ]; then
    bin=$SIPEDGE_BIN
else
    cargo build --release --quiet --bin sipedge
    bin="$root/target/release/sipedge"
fi
[ -x "$bin" ] || die "no sipedge binary at $bin"
t_built=$SECONDS
sipp_dir="$root/scripts/sipp"

failed=0
results=()
ok() { echo "ok    $*"; results+=("ok    $*"); }
fail() { echo "FAIL  $*"; results+=("FAIL  $*"); failed=1; }

# ---------------------------------------------------------------------------------------------
# Python helpers (written to the work dir; python3's standard library only).

# scripts/pcap_udp.py reads the pcap (count, cut, payloads).
pcap_udp="$root/scripts/pcap_udp.py"

# rtp_endpoint.py: the python3 RTP endpoints of step 1b, in one process.
#   caller side: one socket per port of --callers (the port each call's SDP offer names); a
#     line "caller CALL-ID PORT RELAY-IP RELAY-PORT" in --ctl (written by media_uac_py.xml
#     after its ACK) starts playing the pcap's RTP payloads, with the capture's timing, from
#     PORT to the relay; every packet that reaches PORT is counted by source address.
#   callee side: one socket on --echo sends every packet back to where it came from, and
#     counts by source; "callee CALL-ID RELAY-IP RELAY-PORT" lines (media_uas_py.xml) name the
#     relay port of each call's INVITE SDP.
#   Runs until a line "stop" in --ctl (or --max-time), then writes --out (JSON).
cat >"$work/rtp_endpoint.py" <<'PY'
import argparse, json, os, select, socket, sys, time
sys.path.insert(0, os.environ["PCAP_UDP_DIR"])
import pcap_udp

ap = argparse.ArgumentParser()
ap.add_argument("--pcap", required=True)
ap.add_argument("--ctl", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--callers", required=True, help="comma-separated ports")
ap.add_argument("--echo", type=int, required=True)
ap.add_argument("--ip", default="127.0.0.1")
ap.add_argument("--max-time", type=float, default=120)
a = ap.parse_args()

# The pcap's UDP payloads and their offsets in time.
frames = pcap_udp.payloads(a.pcap)

def bind(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((a.ip, port))
    s.setblocking(False)
    return s

callers = {int(p): bind(int(p)) for p in a.callers.split(",")}
echo = bind(a.echo)
by_fd = {s.fileno(): (p, s) for p, s in callers.items()}
recv = {p: {} for p in callers}   # caller port -> {source: packets}
echoed = {}                       # source -> packets echoed
calls, callee = {}, {}            # call-id -> what the ctl lines said
plays = []                        # [sock, dest, start, next index, port]
sent = {}
print("ready", flush=True)

ctl = open(a.ctl, "a+")
ctl.seek(0)
pending = ""
stop = None
t_end = time.monotonic() + a.max_time
while True:
    now = time.monotonic()
    if now > t_end:
        print("max-time reached", file=sys.stderr)
        break
    if stop is not None and now > stop:
        break
    pending += ctl.read()
    while "\n" in pending:
        line, pending = pending.split("\n", 1)
        f = line.split()
        if f[:1] == ["stop"]:
            stop = now + 0.5  # what is still in flight
        elif f[:1] == ["caller"] and len(f) == 5:
            port = int(f[2])
            calls[f[1]] = {"port": port, "relay": f"{f[3]}:{f[4]}"}
            plays.append([callers[port], (f[3], int(f[4])), now, 0, port])
            sent[port] = 0
        elif f[:1] == ["callee"] and len(f) == 4:
            callee[f[1]] = f"{f[2]}:{f[3]}"
    due = now + 0.01
    for pl in plays:
        sock, dest, start, i, port = pl
        while i < len(frames) and start + frames[i][0] <= now:
            sock.sendto(frames[i][1], dest)
            sent[port] += 1
            i += 1
        pl[3] = i
        if i < len(frames):
            due = min(due, start + frames[i][0])
    plays = [pl for pl in plays if pl[3] < len(frames)]
    r, _, _ = select.select([echo] + list(callers.values()), [], [], max(0.0, due - time.monotonic()))
    for s in r:
        while True:
            try:
                data, addr = s.recvfrom(2048)
            except BlockingIOError:
                break
            key = f"{addr[0]}:{addr[1]}"
            if s is echo:
                s.sendto(data, addr)
                echoed[key] = echoed.get(key, 0) + 1
            else:
                port = by_fd[s.fileno()][0]
                recv[port][key] = recv[port].get(key, 0) + 1

out = {"frames": len(frames), "calls": {}, "callee": callee, "echoed": echoed,
       "stray": {str(p): c for p, c in recv.items() if c and p not in [v["port"] for v in calls.values()]}}
for cid, v in calls.items():
    out["calls"][cid] = {"port": v["port"], "relay": v["relay"], "sent": sent.get(v["port"], 0),
                         "recv": recv[v["port"]]}
json.dump(out, open(a.out, "w"), indent=1)
PY

# ---------------------------------------------------------------------------------------------
# Ports: sipedge, the SIPp callees and callers, SIPp media ports, the python3 endpoints, all
# on 127.0.0.1 near a random base; the relay's range below the kernel's ephemeral ports.

base=$(( (10000 + RANDOM % 7000) / 2 * 2 ))
sip_port=$base
media_min=$(( 20000 + 2 * (RANDOM % 1000) ))
media_max=$(( media_min + 3999 ))
py_echo=$((base + 300))
py_callers=()
for i in $(seq 1 "$PY_CALLS"); do py_callers+=($((base + 300 + 2 * i))); done

cat >"$work/sipedge.toml" <<TOML
[server]
listen = ["udp:127.0.0.1:$sip_port"]
domains = ["127.0.0.1"]
fr_inv_timer = $FR_INV_TIMER
[database]
url = "sqlite://$work/sipedge.db"
[media]
address = "127.0.0.1"
ports = "$media_min-$media_max"
idle_timeout = $IDLE_TIMEOUT
offer_timeout = $OFFER_TIMEOUT
# Every SIPp caller is 127.0.0.1: one caller for media.max_sessions_per_caller.
max_sessions_per_caller = 2000
TOML
# One route per callee kind, all relayed: 2xxx → callee N (base + N).
routes=(echo py echo2 bye ring busy nobye noanswer)
for i in "${!routes[@]}"; do
    cat >>"$work/sipedge.toml" <<TOML
[[route]]
name = "${routes[$i]}"
user = '^2$i[0-9]{2}\$'
next_hop = "127.0.0.1:$((base + 1 + i))"
media = "always"
TOML
done
cc=$("$bin" check-config -c "$work/sipedge.toml" 2>&1) || die "check-config rejected $work/sipedge.toml: $cc"

python3 "$pcap_udp" cut "$PCAP" "$SHORT_PKTS" "$work/media_short.pcap"
pcap_pkts=$(python3 "$pcap_udp" count "$PCAP")
short_pkts=$(python3 "$pcap_udp" count "$work/media_short.pcap")
[ "$pcap_pkts" -gt 0 ] && [ "$short_pkts" = "$SHORT_PKTS" ] || die "cannot read $PCAP ($pcap_pkts packets, cut $short_pkts)"
echo "media-test: $PCAP has $pcap_pkts RTP packets; sipedge on 127.0.0.1:$sip_port, relay ports $media_min-$media_max"

log="$work/sipedge.log"
"$bin" serve -c "$work/sipedge.toml" --log-level info 2>"$log" &
server_pid=$!
for _ in $(seq 1 100); do
    grep -q "sipedge started" "$log" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; die "sipedge exited at start"; }
    sleep 0.1
done
grep -q "sipedge started" "$log" || { cat "$log" >&2; die "sipedge did not start in 10 s"; }

# ---------------------------------------------------------------------------------------------
# SIPp runs. Every call-id starts with its group's name (-cid_str), which is how the log lines
# and cdr rows are told apart. SIPp runs in the work dir (media_short.pcap is found there).

declare -A group_calls group_pids group_uas_pids group_start group_end
sipp_common=(-i 127.0.0.1 -t u1 -nostdin -max_recv_loops 1000 -timeout 120s -timeout_error)

# callee GROUP INDEX SCENARIO CALLS [sipp args...]: a SIPp callee in the background on base+1+INDEX.
callee() {
    local g=$1 idx=$2 scenario=$3 calls=$4
    shift 4
    (cd "$work" && exec timeout 150 sipp -sf "$sipp_dir/$scenario" "${sipp_common[@]}" -p $((base + 1 + idx)) \
        -mp $((base + 100 + 10 * idx)) -m "$calls" -trace_err -error_file "$work/$g.uas.err" \
        -trace_stat -stf "$work/$g.uas.csv" "$@" >"$work/$g.uas.out" 2>&1) &
    group_uas_pids[$g]=$!
    bg_pids+=("$!")
}

# caller GROUP INDEX SCENARIO CALLS RATE [sipp args...]: a SIPp caller in the background,
# dialling 2<INDEX>00 (the route to callee INDEX), from base+11+INDEX.
caller() {
    local g=$1 idx=$2 scenario=$3 calls=$4 rate=$5
    shift 5
    group_calls[$g]=$calls
    group_start[$g]=$SECONDS
    (cd "$work" && exec timeout 150 sipp -sf "$sipp_dir/$scenario" "${sipp_common[@]}" -p $((base + 11 + idx)) \
        -mp $((base + 200 + 10 * idx)) -m "$calls" -r "$rate" -s "2${idx}00" -cid_str "$g-%u-%p@%s" \
        -trace_err -error_file "$work/$g.uac.err" -trace_stat -stf "$work/$g.uac.csv" "$@" \
        "127.0.0.1:$sip_port" >"$work/$g.uac.out" 2>&1) &
    group_pids[$g]=$!
    bg_pids+=("$!")
}

wait_port_bound() {  # PORT: until a UDP socket is bound to 127.0.0.1:PORT (bounded)
    local hex
    hex=$(printf '0100007F:%04X' "$1")
    for _ in $(seq 1 50); do
        grep -q " $hex " /proc/net/udp && return 0
        sleep 0.1
    done
    return 1
}

# finish GROUP: waits for the group's caller and callee; a SIPp failure fails the group.
finish() {
    local g=$1 rc_uac=0 rc_uas=0
    wait "${group_pids[$g]}" || rc_uac=$?
    group_end[$g]=$SECONDS
    # The callee counts its calls done once the proxy's last messages arrived (bounded).
    wait "${group_uas_pids[$g]}" || rc_uas=$?
    if [ "$rc_uac" = 0 ] && [ "$rc_uas" = 0 ]; then
        ok "sipp $g: ${group_calls[$g]} calls, 0 failed on either side ($((group_end[$g] - group_start[$g])) s)"
    else
        fail "sipp $g: caller exit $rc_uac, callee exit $rc_uas"
        tail -n 6 "$work/$g.uac.out" 2>/dev/null | sed 's/^/      /' || true
        tail -c 1500 "$work/$g.uac.err" 2>/dev/null | sed 's/^/      /' || true
        tail -c 1500 "$work/$g.uas.err" 2>/dev/null | sed 's/^/      /' || true
    fi
}

# ---------------------------------------------------------------------------------------------
# 1. Media both ways.
echo "== 1. media both ways: $MEDIA_CALLS SIPp calls (pcap + echo), $PY_CALLS python3-endpoint calls"
t1=$SECONDS
ctl="$work/endpoint.ctl"
: >"$ctl"
{ echo SEQUENTIAL; for p in "${py_callers[@]}"; do echo "$p"; done; } >"$work/py_ports.csv"
PCAP_UDP_DIR="$root/scripts" timeout 150 python3 "$work/rtp_endpoint.py" --pcap "$PCAP" --ctl "$ctl" --out "$work/endpoint.json" \
    --callers "$(IFS=,; echo "${py_callers[*]}")" --echo "$py_echo" --max-time 140 \
    >"$work/endpoint.out" 2>&1 &
endpoint_pid=$!
bg_pids+=("$endpoint_pid")

callee pcap 0 media_uas_echo.xml "$MEDIA_CALLS" -rtp_echo -trace_msg -message_file "$work/pcap.uas.msg"
callee py 1 media_uas_py.xml "$PY_CALLS" -key ctl "$ctl" -key echo_port "$py_echo"
wait_port_bound $((base + 1)) && wait_port_bound $((base + 2)) || die "the SIPp callees did not bind their ports"
for _ in $(seq 1 50); do grep -q ready "$work/endpoint.out" 2>/dev/null && break; sleep 0.1; done
grep -q ready "$work/endpoint.out" || { cat "$work/endpoint.out" >&2; die "the python3 RTP endpoint did not start"; }

# Hold 8 s: the pcap lasts 7 s. MEDIA_CONCURRENT calls at a time.
caller pcap 0 media_uac_rtp.xml "$MEDIA_CALLS" "$MEDIA_CONCURRENT" -l "$MEDIA_CONCURRENT" -d 8000 \
    -trace_msg -message_file "$work/pcap.uac.msg"
caller py 1 media_uac_py.xml "$PY_CALLS" "$PY_CALLS" -d 8000 -inf "$work/py_ports.csv" -key ctl "$ctl"
finish pcap
finish py
echo stop >>"$ctl"
wait "$endpoint_pid" || fail "the python3 RTP endpoint exited with $?: $(tail -n 3 "$work/endpoint.out")"
echo "   ($((SECONDS - t1)) s)"

# ---------------------------------------------------------------------------------------------
# 2. Mixed endings. Shares of MIX_CALLS and their rates, all six at once.
echo "== 2. $MIX_CALLS calls of mixed endings at ~$MIX_RATE calls/s"
t2=$SECONDS
mix_groups=(caller-bye callee-bye cancel busy idle noanswer)
declare -A share=([caller-bye]=30 [callee-bye]=20 [cancel]=15 [busy]=15 [idle]=10 [noanswer]=10)
declare -A mix_n mix_r
for g in "${mix_groups[@]}"; do
    mix_n[$g]=$(( MIX_CALLS * ${share[$g]} / 100 ))
    mix_r[$g]=$(( MIX_RATE * ${share[$g]} / 100 )); [ "${mix_r[$g]}" -ge 1 ] || mix_r[$g]=1
done
# The rounding goes to the first group.
mix_n[caller-bye]=$(( MIX_CALLS - ${mix_n[callee-bye]} - ${mix_n[cancel]} - ${mix_n[busy]} - ${mix_n[idle]} \
    - ${mix_n[noanswer]} ))

callee caller-bye 2 media_uas_echo.xml "${mix_n[caller-bye]}" -rtp_echo
callee callee-bye 3 media_uas_bye.xml "${mix_n[callee-bye]}" -d 300
callee cancel 4 media_uas_ring.xml "${mix_n[cancel]}"
callee busy 5 media_uas_busy.xml "${mix_n[busy]}"
callee idle 6 media_uas_nobye.xml "${mix_n[idle]}" -rtp_echo
callee noanswer 7 media_uas_ring.xml "${mix_n[noanswer]}"
for i in 3 4 5 6 7 8; do wait_port_bound $((base + i)) || die "the SIPp callee on $((base + i)) did not bind"; done

caller caller-bye 2 media_uac_rtp_short.xml "${mix_n[caller-bye]}" "${mix_r[caller-bye]}" -l 500 -d 1000
caller callee-bye 3 media_uac_callee_bye.xml "${mix_n[callee-bye]}" "${mix_r[callee-bye]}" -l 500
caller cancel 4 media_uac_cancel.xml "${mix_n[cancel]}" "${mix_r[cancel]}" -l 500
caller busy 5 media_uac_busy.xml "${mix_n[busy]}" "${mix_r[busy]}" -l 500
caller idle 6 media_uac_rtp_nobye.xml "${mix_n[idle]}" "${mix_r[idle]}" -l 500 -d 1000
caller noanswer 7 media_uac_noanswer.xml "${mix_n[noanswer]}" "${mix_r[noanswer]}" -l 500
for g in "${mix_groups[@]}"; do finish "$g"; done
echo "   ($((SECONDS - t2)) s)"

# Every relay session must be gone by now or within the timeouts; every server transaction
# after Timer J (32 s on UDP) from the last BYE/CANCEL. Then SIGTERM.
last=0
for g in caller-bye callee-bye cancel; do
    if [ "${group_end[$g]}" -gt "$last" ]; then last=${group_end[$g]}; fi
done
settle=$(( last + 33 - SECONDS ))
min_settle=$(( IDLE_TIMEOUT + 2 ))
[ "$settle" -ge "$min_settle" ] || settle=$min_settle
echo "== waiting ${settle} s (idle/offer timeouts, server transactions' Timer J), then SIGTERM"
sleep "$settle"
kill -TERM "$server_pid" 2>/dev/null || fail "sipedge was no longer running before SIGTERM"
for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$server_pid" 2>/dev/null; then
    fail "sipedge did not stop within 10 s of SIGTERM"
    kill -KILL "$server_pid" 2>/dev/null || true
fi
rc=0; wait "$server_pid" || rc=$?
server_pid=""
[ "$rc" = 0 ] || fail "sipedge exited with $rc after SIGTERM"

# ---------------------------------------------------------------------------------------------
# Checks on the log, the cdr table, the SIPp traces and the endpoint's counts.

groups_arg=""
for g in pcap py "${mix_groups[@]}"; do groups_arg+="$g=${group_calls[$g]},"; done
an_rc=0
python3 - "$log" "$work/sipedge.db" "$work/endpoint.json" "$work" "${groups_arg%,}" "$pcap_pkts" "$short_pkts" \
    "$media_min" "$media_max" "$base" "$IDLE_TIMEOUT" "$OFFER_TIMEOUT" >"$work/checks.out" 2>&1 <<'PY' || an_rc=$?
import json, re, sqlite3, sys
from collections import Counter, defaultdict

log, db, endpoint, work, groups_arg, pcap_pkts, short_pkts, mmin, mmax, base, idle_to, offer_to = sys.argv[1:]
pcap_pkts, short_pkts, mmin, mmax, base = int(pcap_pkts), int(short_pkts), int(mmin), int(mmax), int(base)
idle_to, offer_to = float(idle_to), float(offer_to)
groups = {k: int(v) for k, v in (x.split("=") for x in groups_arg.split(","))}
failed = False
def ok(m): print("ok    " + m)
def fail(m):
    global failed
    failed = True
    print("FAIL  " + m)

ansi = re.compile(r"\x1b\[[0-9;]*m")
field = re.compile(r'([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|\S+)')
def fields(s):
    return {k: v.strip('"') for k, v in field.findall(s)}

lines = [ansi.sub("", l.rstrip("\n")) for l in open(log, errors="replace")]
stats = defaultdict(list)
stopping = listeners = None
for l in lines:
    if " media session closed " in l + " ":
        f = fields(l.split("media session closed", 1)[1])
        stats[f.get("call_id", "?")].append(f)
    elif "media relay stopping" in l:
        stopping = fields(l.split("media relay stopping", 1)[1])
    elif "listeners stopped" in l:
        listeners = fields(l.split("listeners stopped", 1)[1])

def group_of(cid):
    g = cid.rsplit("-", 2)[0] if cid.count("-") >= 2 else "?"
    return g if g in groups else "?"

# --- one stats line per call --------------------------------------------------------------
per_group = defaultdict(dict)
for cid, fl in stats.items():
    per_group[group_of(cid)][cid] = fl
dups = {cid: len(fl) for cid, fl in stats.items() if len(fl) != 1}
total_lines = sum(len(fl) for fl in stats.values())
expected_total = sum(groups.values())
if dups:
    fail(f"call-ids with more than one stats line: {len(dups)} (e.g. {list(dups.items())[:3]})")
if per_group.get("?"):
    fail(f"stats lines of unknown calls: {list(per_group['?'])[:3]}")
if total_lines == expected_total and not dups:
    ok(f"{total_lines} 'media session closed' lines for {expected_total} calls, one per call-id")
else:
    fail(f"{total_lines} 'media session closed' lines ({len(stats)} call-ids) for {expected_total} calls")

# --- the cdr table ------------------------------------------------------------------------
cols = ["call_id", "reason", "status", "caller_pkts", "caller_bytes", "caller_lost", "caller_jitter_ms",
        "callee_pkts", "callee_bytes", "callee_lost", "callee_jitter_ms", "start_ts", "answer_ts", "end_ts"]
con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
rows = defaultdict(list)
for r in con.execute(f"select {', '.join(cols)} from cdr"):
    rows[r[0]].append(dict(zip(cols, r)))
cdr_mismatch = []
for cid, fl in stats.items():
    rs = rows.get(cid, [])
    if len(rs) != 1:
        cdr_mismatch.append(f"{cid}: {len(rs)} cdr rows")
        continue
    r, f = rs[0], fl[0]
    for k in cols[1:2] + cols[3:11]:
        a, b = r[k], f.get(k)
        if a is None or b is None:
            cdr_mismatch.append(f"{cid}: {k} cdr={a} log={b}")
            continue
        same = (abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))) if k.endswith("jitter_ms") else str(a) == str(b)
        if not same:
            cdr_mismatch.append(f"{cid}: {k} cdr={a} log={b}")
extra = [cid for cid in rows if cid not in stats]
if cdr_mismatch or extra:
    fail(f"cdr vs stats lines: {len(cdr_mismatch)} mismatches, {len(extra)} rows without a stats line: "
         + "; ".join((cdr_mismatch + extra)[:5]))
else:
    ok(f"cdr: {sum(len(v) for v in rows.values())} rows, one per call, same reason and figures as the stats lines")

# --- per group: reasons and packet counts -------------------------------------------------
expect = {"pcap": "bye", "py": "bye", "caller-bye": "bye", "callee-bye": "bye", "cancel": "cancel",
          "busy": "failed", "idle": "timeout", "noanswer": "timeout"}
want_status = {"pcap": 200, "py": 200, "caller-bye": 200, "callee-bye": 200, "cancel": 487, "busy": 486, "idle": 200,
               "noanswer": 408}
def near(x, ref, pct=1.0):
    return abs(x - ref) <= ref * pct / 100
def rng(vals):
    return f"{min(vals)}..{max(vals)}" if vals else "-"
table = []
for g, n in groups.items():
    calls = per_group.get(g, {})
    first = [fl[0] for fl in calls.values()]
    reasons = Counter(f.get("reason") for f in first)
    cp = [int(f["caller_pkts"]) for f in first]
    ep = [int(f["callee_pkts"]) for f in first]
    dur = [int(f["duration_ms"]) for f in first]
    status = Counter(r["status"] for cid in calls for r in rows.get(cid, [])[:1])
    table.append((g, n, len(calls), dict(reasons), rng(cp), rng(ep), rng(dur), dict(status)))
    if len(calls) != n:
        fail(f"{g}: {len(calls)} stats lines for {n} calls")
    if reasons != Counter({expect[g]: n}):
        fail(f"{g}: reasons {dict(reasons)}, expected {expect[g]} x {n}")
    if g in want_status and status != Counter({want_status[g]: len(calls)}):
        fail(f"{g}: cdr status {dict(status)}, expected {want_status[g]}")
    bad = []
    for cid, fl in calls.items():
        f = fl[0]
        c, e, d = int(f["caller_pkts"]), int(f["callee_pkts"]), int(f["duration_ms"])
        if g == "pcap" and not (near(c, pcap_pkts) and near(e, pcap_pkts)):
            bad.append(f"{cid} caller_pkts={c} callee_pkts={e} (pcap {pcap_pkts} ±1 %)")
        elif g in ("caller-bye", "idle") and not (near(c, short_pkts) and near(e, short_pkts)):
            bad.append(f"{cid} caller_pkts={c} callee_pkts={e} (burst {short_pkts})")
        elif g in ("callee-bye", "cancel", "busy", "noanswer") and (c or e):
            bad.append(f"{cid} caller_pkts={c} callee_pkts={e} (no media sent)")
        if g == "idle" and d < idle_to * 1000:
            bad.append(f"{cid} duration_ms={d} < idle_timeout")
        if g == "noanswer" and not (offer_to * 1000 <= d < (offer_to + 2) * 1000):
            bad.append(f"{cid} duration_ms={d}, offer_timeout is {offer_to:.0f} s")
    if bad:
        fail(f"{g}: {len(bad)} calls with unexpected figures: " + "; ".join(bad[:4]))
    elif calls:
        what = {"pcap": f"caller_pkts and callee_pkts within ±1 % of the pcap's {pcap_pkts}",
                "caller-bye": f"caller_pkts and callee_pkts = the burst's {short_pkts} (±1 %)",
                "idle": f"caller_pkts and callee_pkts = the burst's {short_pkts}, closed >= {idle_to:.0f} s after it",
                "noanswer": f"closed {offer_to:.0f}-{offer_to + 2:.0f} s after the offer (offer_timeout)",
                "py": "figures checked against both endpoints below"}.get(g, "no packets")
        ok(f"{g}: {n} calls, reason {expect[g]}, {what}")

# --- SDP seen by the SIPp peers of step 1a: the relay's address, a port of media.ports ----
def sip_messages(path, direction):
    text = open(path, errors="replace").read()
    for chunk in re.split(r"\n-{20,}[^\n]*\n", "\n" + text):
        m = re.match(r"\s*UDP message (received|sent) \[\d+\] bytes\s*:\s*\n\n?(.*)", chunk, re.S)
        if m and m.group(1) == direction:
            yield m.group(2)
def sdp_addr(msg):
    c = re.search(r"^c=IN IP4 (\S+)", msg, re.M)
    m = re.search(r"^m=audio (\d+)", msg, re.M)
    return (c.group(1), int(m.group(1))) if c and m else None
def cid_of(msg):
    m = re.search(r"^Call-ID:\s*(\S+)", msg, re.M | re.I)
    return m.group(1) if m else "?"
sdp_bad, sdp_seen = [], Counter()
for path, first_line in ((f"{work}/pcap.uac.msg", "SIP/2.0 200"), (f"{work}/pcap.uas.msg", "INVITE ")):
    for msg in sip_messages(path, "received"):
        if not msg.startswith(first_line) or not re.search(r"^CSeq:\s*1 INVITE", msg, re.M):
            continue
        a = sdp_addr(msg)
        sdp_seen[first_line] += 1
        if not a or a[0] != "127.0.0.1" or not (mmin <= a[1] <= mmax) or a[1] % 2:
            sdp_bad.append(f"{cid_of(msg)} {first_line.strip()}: SDP {a}")
if sdp_bad:
    fail(f"pcap: SDP not rewritten to the relay: {'; '.join(sdp_bad[:4])}")
else:
    ok(f"pcap: SDP rewritten in {sdp_seen['INVITE ']} INVITEs and {sdp_seen['SIP/2.0 200']} 200s: c=127.0.0.1,"
       f" m= an even port of {mmin}-{mmax}, on both sides")

# --- step 1b: what the python3 endpoints sent and received -------------------------------
try:
    ep = json.load(open(endpoint))
except (OSError, ValueError) as e:
    fail(f"py: no results from the python3 RTP endpoint ({e})")
    ep = {"calls": {}, "callee": {}, "echoed": {}, "stray": {}}
py_calls = per_group.get("py", {})
bad, n_ok = [], 0
for cid in py_calls:
    f = py_calls[cid][0]
    c, e = int(f["caller_pkts"]), int(f["callee_pkts"])
    call = ep["calls"].get(cid)
    relay_callee = ep["callee"].get(cid)
    if not call or not relay_callee:
        bad.append(f"{cid}: no endpoint record (caller {bool(call)}, callee {bool(relay_callee)})")
        continue
    ip, port = call["relay"].split(":")
    at_caller = call["recv"]
    from_relay = at_caller.get(call["relay"], 0)
    at_callee = ep["echoed"].get(relay_callee, 0)
    problems = []
    if call["sent"] != pcap_pkts:
        problems.append(f"endpoint sent {call['sent']} of {pcap_pkts}")
    if not near(c, call["sent"]):
        problems.append(f"caller_pkts={c} but the caller sent {call['sent']}")
    if not near(at_callee, c):
        problems.append(f"callee got {at_callee} from the relay {relay_callee}, caller_pkts={c}")
    if not near(e, at_callee):
        problems.append(f"callee_pkts={e} but the callee echoed {at_callee}")
    if not near(from_relay, e) or from_relay == 0:
        problems.append(f"caller got {from_relay} from {call['relay']} (its 200's SDP), callee_pkts={e}")
    others = {k: v for k, v in at_caller.items() if k != call["relay"]}
    if others:
        problems.append(f"caller got packets from other sources: {others}")
    if ip != "127.0.0.1" or not (mmin <= int(port) <= mmax):
        problems.append(f"200's SDP {call['relay']} is not the relay")
    if problems:
        bad.append(f"{cid}: " + ", ".join(problems))
    else:
        n_ok += 1
if ep.get("stray"):
    bad.append(f"packets on unused endpoint ports: {ep['stray']}")
if bad or n_ok != groups["py"]:
    fail(f"py: {n_ok}/{groups['py']} calls verified end to end: " + "; ".join(bad[:4]))
else:
    sent = [ep["calls"][c]["sent"] for c in py_calls]
    back = [ep["calls"][c]["recv"][ep["calls"][c]["relay"]] for c in py_calls]
    ok(f"py: {n_ok} calls: the caller endpoint sent {rng(sent)} packets = caller_pkts, the callee endpoint got them"
       f" from its INVITE's relay port and echoed them = callee_pkts, the caller got {rng(back)} back from"
       f" exactly its 200's relay address and port")

# --- shutdown counters --------------------------------------------------------------------
if stopping is None:
    fail("no 'media relay stopping' line")
elif (stopping.get("media.calls"), stopping.get("relay.sessions"), stopping.get("relay.ports")) == ("0", "0", "0"):
    ok("media relay stopping media.calls=0 relay.sessions=0 relay.ports=0")
else:
    fail("media relay stopping " + " ".join(f"{k}={v}" for k, v in stopping.items()))
if listeners is None:
    fail("no 'listeners stopped' line")
elif listeners.get("transactions.server") == "0":
    ok(f"listeners stopped transactions.server=0 (transactions.client={listeners.get('transactions.client')}, not required)")
else:
    fail("listeners stopped " + " ".join(f"{k}={v}" for k, v in listeners.items()))
panics = [l for l in lines if "panicked" in l]
warns = [l for l in lines if re.search(r" (WARN|ERROR) ", l)]
if panics:
    fail(f"sipedge panicked: {panics[0][:200]}")
if warns:
    print(f"note  {len(warns)} WARN/ERROR lines in sipedge's log, e.g.: {warns[0][:220]}")

# --- summary table ------------------------------------------------------------------------
print()
print(f"{'group':<11} {'calls':>5} {'lines':>5}  {'reasons':<18} {'caller_pkts':>11} {'callee_pkts':>11} {'duration_ms':>13}  cdr status")
for g, n, nl, reasons, cp, ep_, dur, status in table:
    rs = ",".join(f"{k}:{v}" for k, v in reasons.items())
    st = ",".join(f"{k}:{v}" for k, v in status.items())
    print(f"{g:<11} {n:>5} {nl:>5}  {rs:<18} {cp:>11} {ep_:>11} {dur:>13}  {st}")
print(f"{'total':<11} {sum(groups.values()):>5} {total_lines:>5}")
sys.exit(1 if failed else 0)
PY
cat "$work/checks.out"
grep -q '^FAIL' "$work/checks.out" && failed=1
# A final response retransmitted after the caller's ACK (SIPp: "Dead call ... received") is
# worth a look, though not a media failure.
for g in pcap py "${mix_groups[@]}"; do
    n=$(grep -c "Dead call" "$work/$g.uac.err" 2>/dev/null || true)
    [ "${n:-0}" = 0 ] || echo "note  $g: the caller got $n messages for calls it had finished (see $g.uac.err)"
done
[ "$an_rc" = 0 ] || { failed=1; echo "FAIL  checks exited with $an_rc"; }

echo
echo "media-test: $(( SECONDS - t_built )) s of tests (build $(( t_built - t_start )) s); pcap $pcap_pkts RTP packets"
if [ "$failed" != 0 ]; then
    echo "media-test: FAIL"
    grep -h '^FAIL' "$work/checks.out" 2>/dev/null || true
    printf '%s\n' "${results[@]}" | grep '^FAIL' || true
    if [ "${KEEP_WORK:-0}" != 1 ]; then
        KEEP_WORK=1  # keep the evidence
    fi
    exit 1
fi
echo "media-test: PASS"
