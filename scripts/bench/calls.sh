#!/usr/bin/env bash
# Proxied calls per second and CPU-seconds per call: sipedge and Kamailio 5.6 (running the
# OpenSER-seed logic of the shared reference bench), side by side in one run on this machine,
# with the same load generator, search and accounting -- plus the acceptance check of the
# stateful proxy: "a 20 s SIPp call run at the highest rate found ends with 0 failed calls and
# no transaction left in the table afterwards".
#
#   scripts/bench/calls.sh                    # ~6-8 min on the 2-core box (idle machine)
#   SIPEDGE_REV=HEAD scripts/bench/calls.sh   # measure the last commit (tree does not build)
#   SCENARIO=call_media scripts/bench/calls.sh      # same with the media relay (no RTP sent)
#   SCENARIO=call_media_rtp scripts/bench/calls.sh  # same with RTP flowing through the relay
#
# SCENARIO (default call):
#   call            as below: no media relay (sipedge routes media="never", Kamailio -A NO_MEDIA_RELAY)
#   call_media      the SDP of every call goes through the relay: sipedge with media="always"
#                   routes (in-process relay, sipedge_start.sh MEDIA=1) vs Kamailio + rtpengine
#                   (run.sh MEDIA=1 RTPE=1: rtpengine_offer/answer/delete over the ng protocol);
#                   no RTP is sent (the harness' own call_media)
#   call_media_rtp  call_media with RTP: the UAC is sipp/uac_invite_rtp.xml (after the ACK it
#                   plays /usr/share/sip-tester/g711a.pcap, G.711 at 50 packets/s, to the relay
#                   port of the 200's SDP, until its BYE); the /tmp/refbench COPY of
#                   tools/bench.py is edited to run that file instead of uac_invite.xml
#   With media, CPU and memory are those of the whole media path: Kamailio's process tree PLUS
#   rtpengine's (bench.py --media-pidfile: the "media" group), sipedge's one process (the relay
#   is in-process). After each measured run (search confirmation, same-load run) the relay
#   counters are read while the proxy still runs -- sipedge's /api/stats (relay_forwarded_packets,
#   media_sessions, relay_ports_in_use), rtpengine's CLI `list totals` / `list numsessions` --
#   into relay.jsonl; call_media_rtp FAILS (verdict line) when a measured run relayed no packet.
#   The acceptance check also requires 0 relay sessions, 0 ports and 0 relayed calls left in
#   sipedge after ACCEPT_WAIT (/api/stats, and the shutdown line "media relay stopping ...").
#
# What is measured, for each proxy (fresh proxy at the start; the harness restarts the proxy
# after every failed step and before the confirmation run):
#   the harness' "call" scenario over UDP on 127.0.0.1: SIPp sipp/uac_invite.xml (UAC on :5062)
#   -> proxy :5060 -> SIPp sipp/uas.xml on :5070 standing in for the PBX; INVITE (SDP) -> 100
#   -> 180 -> 200 -> ACK -> HOLD_MS pause -> BYE -> 200 to extension 2000 (route ^[0-9]{3,4}$),
#   record-routed, no media relay (MEDIA=0, no rtpengine); concurrent calls ~ rate x hold.
#   1. rate search by the harness' tools/bench.py (probe ramp x1.6 from START_RATE, two
#      bisections, then a CONFIRM_DUR s confirmation run; a run passes only with 0 failed
#      calls on the UAC and the UAS, 0 retransmissions, the generator keeping the rate).
#   2. one run at the same rate for both (COMMON_RATE, default 80 % of the lower maximum),
#      so that CPU per call is compared at equal load.
#   3. acceptance check (sipedge only): fresh sipedge with RUST_LOG=$ACCEPT_LOG (info), one
#      ACCEPT_DUR s run at sipedge's maximum (ACCEPT_RATE=auto), then ACCEPT_WAIT s idle
#      (>= 34: RFC 3261 Timer D/J/L/M keep UDP transactions 32 s after their final
#      response; the default 45 also leaves the heap trimmer, every 10 s, one look at the
#      freed memory, so the idle memory figure shows what is returned), then SIGTERM; sipedge logs "listeners stopped transactions.server=N
#      transactions.client=M" at shutdown. PASS = 0 failed calls (UAC and UAS), every call
#      successful, sipedge alive until the stop, N = M = 0.
#   CPU = utime+stime of the proxy's process tree (/proc/PID/stat) over the SIPp UAC run
#   (calls set up, held and torn down); CPU-s per 1000 calls = CPU% / 100 * run seconds /
#   calls * 1000. Work after the run (transactions expiring) is not in it, for either proxy.
#   Memory = PSS and RSS of the proxy's process tree right after the run (transactions of
#   the run still held; Kamailio also its shm peak), and sipedge's after ACCEPT_WAIT idle.
#
# Kamailio: the harness' kamailio/kamailio.cfg and run.sh with MEDIA=0 (-A NO_MEDIA_RELAY),
# KAM_CHILDREN UDP workers, 2048 MB shm. sipedge: target/release/sipedge through
# scripts/bench/sipedge_start.sh / sipedge_stop.sh (the harness' PROXY_START/PROXY_STOP hooks;
# its [[route]] "pbx" ^[0-9]{3,4}$ -> 127.0.0.1:5070 is the route under test), RUST_LOG=warn
# for the measurements.
#
# This script installs nothing: it checks the prerequisites and names the Debian packages to
# apt-get install. It builds sipedge (cargo build --release), copies the reference harness
# from $REFBENCH_SRC (default: ../shared/bench next to the repo) to /tmp/refbench and runs it
# from there; runtime files go to $RUNDIR (default /tmp/sipbench), nothing into the repo.
# Output: the table, the acceptance verdict (last line: "acceptance: PASS|FAIL ..."), plus
# $RUNDIR/calls-<stamp>/{results.jsonl,bench.log,report.txt,sipedge.log,runs/...}.
# Exit status 0 even when the acceptance check fails (the verdict is in the output); 1 on
# missing prerequisites, a failed build or a busy port.
#
# Knobs (env): START_RATE=1000 PROBE_DUR=4 CONFIRM_DUR=20 BUDGET=40 (s of probes per search)
#   HOLD_MS=1000 COMMON_RATE=auto|0|N (0 = skip) COMMON_DUR=20
#   ACCEPT_RATE=auto|0|N (0 = skip the acceptance check; auto = sipedge's maximum)
#   ACCEPT_DUR=20 ACCEPT_WAIT=45 ACCEPT_LOG=info
#   QUIET_TIMEOUT=10 (s to wait for an idle machine before a step) SEARCH_TIMEOUT=240 (hard
#   wall-clock limit per search) SIPEDGE_WORKERS=0 (0 = half the cores, at least one) KAM_CHILDREN=4
#   RUNDIR=/tmp/sipbench REFBENCH_SRC=<repo>/../shared/bench SKIP_BUILD=1 (use the binary
#   already built) SIPEDGE_REV= (empty: the working tree; HEAD|<commit>: that commit, exported
#   with `git archive` to $SIPEDGE_BUILD_DIR (default /tmp/sipedge-bench-build) and built there
#   with its own CARGO_TARGET_DIR, as in registrations.sh).
# Bounds: every SIPp has -m COUNT and a hard timeout (bench.py); each search is killed after
# SEARCH_TIMEOUT s, each single run after 3 x its duration + 60 s.
set -euo pipefail

SCENARIO=${SCENARIO:-call}
case "$SCENARIO" in
call) MEDIA=0 ;;
call_media | call_media_rtp) MEDIA=1 ;;
*)
    echo "calls: SCENARIO=$SCENARIO: expected call, call_media or call_media_rtp" >&2
    exit 1
    ;;
esac
export MEDIA
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

START_RATE=${START_RATE:-1000}
PROBE_DUR=${PROBE_DUR:-4}
CONFIRM_DUR=${CONFIRM_DUR:-20}
BUDGET=${BUDGET:-40}
HOLD_MS=${HOLD_MS:-1000}
COMMON_RATE=${COMMON_RATE:-auto}
COMMON_DUR=${COMMON_DUR:-20}
ACCEPT_RATE=${ACCEPT_RATE:-auto}
ACCEPT_DUR=${ACCEPT_DUR:-20}
ACCEPT_WAIT=${ACCEPT_WAIT:-45}
ACCEPT_LOG=${ACCEPT_LOG:-info}
QUIET_TIMEOUT=${QUIET_TIMEOUT:-10}
SEARCH_TIMEOUT=${SEARCH_TIMEOUT:-240}
REFBENCH_SRC=${REFBENCH_SRC:-$root/../shared/bench}
REFBENCH=/tmp/refbench
SIPEDGE_REV=${SIPEDGE_REV:-}
SIPEDGE_BUILD_DIR=${SIPEDGE_BUILD_DIR:-/tmp/sipedge-bench-build}
export RUNDIR=${RUNDIR:-/tmp/sipbench}
export SIPEDGE_RUNDIR=$RUNDIR/sipedge
export SIPEDGE_PIDFILE=$SIPEDGE_RUNDIR/sipedge.pid
export SIPEDGE_WORKERS=${SIPEDGE_WORKERS:-0}
export SIPEDGE_LOG=warn
export KAM_CHILDREN=${KAM_CHILDREN:-4}
KAM_PIDFILE=$RUNDIR/kamailio.pid
RTPE_PIDFILE=$RUNDIR/rtpengine.pid
export SIPEDGE_CONTROL=${SIPEDGE_CONTROL:-127.0.0.1:8060}
PCAP=/usr/share/sip-tester/g711a.pcap

# ---- prerequisites (nothing is installed here) ----
missing_pkgs=()
need() { # command package
    command -v "$1" >/dev/null 2>&1 || missing_pkgs+=("$2")
}
need sipp sip-tester
need kamailio kamailio
need kamcmd kamailio
need sqlite3 sqlite3
need python3 python3
need timeout coreutils
need ss iproute2
[ -r /usr/share/kamailio/db_sqlite/usrloc-create.sql ] || missing_pkgs+=(kamailio-sqlite-modules)
if [ "$MEDIA" = 1 ]; then
    need rtpengine rtpengine-daemon
    need curl curl
    [ -r /usr/lib/x86_64-linux-gnu/kamailio/modules/rtpengine.so ] || [ -n "$(find /usr/lib -path '*kamailio/modules/rtpengine.so' -print -quit 2>/dev/null)" ] ||
        missing_pkgs+=(kamailio-extra-modules)
fi
[ "$SCENARIO" != call_media_rtp ] || [ -r "$PCAP" ] || missing_pkgs+=(sip-tester)
if [ "${#missing_pkgs[@]}" -gt 0 ]; then
    mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
    echo "calls: missing prerequisites; install them with (as root):" >&2
    echo "    apt-get install -y ${missing_pkgs[*]}" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1 && [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "calls: cargo not found (Rust toolchain, https://rustup.rs) -- or set SKIP_BUILD=1" >&2
    exit 1
fi
if [ ! -f "$REFBENCH_SRC/tools/bench.py" ] || [ ! -f "$REFBENCH_SRC/sipp/uac_invite.xml" ] ||
    [ ! -f "$REFBENCH_SRC/kamailio/run.sh" ]; then
    echo "calls: reference harness not found at $REFBENCH_SRC (set REFBENCH_SRC)" >&2
    exit 1
fi
if [ "$ACCEPT_RATE" != 0 ] && [ "$ACCEPT_WAIT" -lt 34 ]; then
    echo "calls: ACCEPT_WAIT=$ACCEPT_WAIT < 34 s: UDP transactions linger 32 s (Timer D/J/L/M), the check would be meaningless" >&2
    exit 1
fi

# ---- build, copy the harness, clean state ----
if [ -z "$SIPEDGE_REV" ]; then
    # the working tree, as it is
    export SIPEDGE_BIN=$root/target/release/sipedge
    if [ "${SKIP_BUILD:-0}" != 1 ]; then
        echo "=== cargo build --release (waits if another cargo holds the lock)"
        cargo build --release || {
            echo "calls: the working tree does not build; SIPEDGE_REV=HEAD measures the last commit instead" >&2
            exit 1
        }
    fi
    sipedge_src="working tree at $(git rev-parse --short HEAD)"
    dirty=$(git status --porcelain -- src Cargo.toml Cargo.lock migrations | tr '\n' ' ')
    [ -z "$dirty" ] || sipedge_src+=" + uncommitted: $dirty"
else
    # a commit, exported with git archive (the working tree and its target/ are not touched)
    sha=$(git rev-parse --verify "$SIPEDGE_REV^{commit}")
    src=$SIPEDGE_BUILD_DIR/src-${sha:0:12}
    export SIPEDGE_BIN=$SIPEDGE_BUILD_DIR/target/release/sipedge
    if [ "${SKIP_BUILD:-0}" != 1 ]; then
        rm -rf "$src"
        mkdir -p "$src"
        git archive "$sha" | tar -x -C "$src"
        echo "=== cargo build --release --locked of $SIPEDGE_REV = ${sha:0:12} in $src"
        (cd "$src" && CARGO_TARGET_DIR=$SIPEDGE_BUILD_DIR/target cargo build --release --locked)
    fi
    sipedge_src="commit ${sha:0:12} ($SIPEDGE_REV), exported to $src"
fi
[ -x "$SIPEDGE_BIN" ] || { echo "calls: $SIPEDGE_BIN missing" >&2; exit 1; }

rm -rf "$REFBENCH"
cp -r "$REFBENCH_SRC" "$REFBENCH"
chmod -R u+w "$REFBENCH"
if [ "$SCENARIO" = call_media_rtp ]; then
    # tools/bench.py names its UAC file literally; in this COPY only, the call scenario plays RTP.
    n=$(grep -c '"uac_invite.xml"' "$REFBENCH/tools/bench.py" || true)
    if [ "$n" != 1 ] || [ ! -f "$REFBENCH/sipp/uac_invite_rtp.xml" ]; then
        echo "calls: cannot switch the harness to sipp/uac_invite_rtp.xml ($n occurrences of \"uac_invite.xml\" in tools/bench.py)" >&2
        exit 1
    fi
    sed -i 's/"uac_invite\.xml"/"uac_invite_rtp.xml"/' "$REFBENCH/tools/bench.py"
fi

# Stop whatever an earlier run of this script (or registrations.sh) left behind (by PID file only).
"$REFBENCH/stop.sh" >/dev/null 2>&1 || true
"$here/sipedge_stop.sh" >/dev/null 2>&1 || true
# 5060 proxy, 5062 SIPp UAC, 5070 SIPp UAS (the "PBX"); the control endpoint; rtpengine ng/cli
busy=$(ss -Hlnu 'sport = :5060 or sport = :5062 or sport = :5070' 2>/dev/null || true)
busy+=$(ss -Hlnt "sport = :5060 or sport = :${SIPEDGE_CONTROL##*:}" 2>/dev/null || true)
[ "$MEDIA" = 0 ] || busy+=$(ss -Hln 'sport = :2223 or sport = :9900' 2>/dev/null || true)
if [ -n "$busy" ]; then
    echo "calls: port 5060/5062/5070 on this machine is in use by something else:" >&2
    ss -Hlnup 'sport = :5060 or sport = :5062 or sport = :5070' >&2 || true
    ss -Hlntp "sport = :5060 or sport = :${SIPEDGE_CONTROL##*:}" >&2 || true
    [ "$MEDIA" = 0 ] || ss -Hlnp 'sport = :2223 or sport = :9900' >&2 || true
    exit 1
fi

STAMP=$(date +%Y%m%d-%H%M%S)
OUTDIR=$RUNDIR/calls-$STAMP
mkdir -p "$OUTDIR"
OUT=$OUTDIR/results.jsonl
RELAY=$OUTDIR/relay.jsonl
: >"$RELAY"
LOG=$OUTDIR/bench.log
rm -rf "$SIPEDGE_RUNDIR"
"$REFBENCH/kamailio/setup.sh" >"$OUTDIR/kamailio-setup.log" # fresh Kamailio DB + sipp/users.csv
# $RUNDIR/kamailio.log is appended to by every run: report only this run's part of it
kam_log_from=$(($(wc -l <"$RUNDIR/kamailio.log" 2>/dev/null || echo 0) + 1))
T0=$(date +%s)

cleanup() {
    "$REFBENCH/stop.sh" >/dev/null 2>&1 || true
    "$here/sipedge_stop.sh" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

{
    echo "date: $(date -Is)"
    echo "sipedge: $("$SIPEDGE_BIN" --version), $SIPEDGE_BIN, built from the $sipedge_src"
    echo "kamailio: $(kamailio -v 2>/dev/null | head -1)"
    echo "sipp: $(sipp -v 2>/dev/null | grep -m1 -o 'SIPp v[^ ]*')"
    echo "kernel: $(uname -r), cpus: $(nproc),$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "scenario: $SCENARIO (MEDIA=$MEDIA)"
    echo "knobs: START_RATE=$START_RATE PROBE_DUR=$PROBE_DUR CONFIRM_DUR=$CONFIRM_DUR BUDGET=$BUDGET HOLD_MS=$HOLD_MS COMMON_RATE=$COMMON_RATE COMMON_DUR=$COMMON_DUR ACCEPT_RATE=$ACCEPT_RATE ACCEPT_DUR=$ACCEPT_DUR ACCEPT_WAIT=$ACCEPT_WAIT SIPEDGE_WORKERS=$SIPEDGE_WORKERS KAM_CHILDREN=$KAM_CHILDREN QUIET_TIMEOUT=$QUIET_TIMEOUT"
    echo "results: $OUTDIR"
} | tee "$OUTDIR/versions.txt"

# proxy NAME -> start/stop commands, PID file, memory command (for tools/bench.py)
proxy_cmds() {
    case "$1" in
    kamailio)
        start_cmd="$REFBENCH/kamailio/run.sh"
        stop_cmd="$REFBENCH/stop.sh"
        pidfile=$KAM_PIDFILE
        mem_cmd="kamcmd -s unix:$RUNDIR/kamailio_ctl core.shmmem"
        media_pidfile=""
        [ "$MEDIA" = 0 ] || media_pidfile=$RTPE_PIDFILE
        ;;
    sipedge)
        start_cmd="$here/sipedge_start.sh"
        stop_cmd="$here/sipedge_stop.sh"
        pidfile=$SIPEDGE_PIDFILE
        mem_cmd=""
        media_pidfile=""
        ;;
    esac
}

# run_bench NAME LABEL LIMIT [bench.py args...]: one tools/bench.py call (at most LIMIT s) against
# the running proxy NAME; appends one JSON line to $OUT.
run_bench() {
    local name=$1 label=$2 limit=$3
    shift 3
    proxy_cmds "$name"
    local rc=0
    (cd "$REFBENCH" && timeout --kill-after=10 "$limit" \
        python3 tools/bench.py --scenario call --label "$label" --hold-ms "$HOLD_MS" \
        --probe-dur "$PROBE_DUR" --confirm-dur "$CONFIRM_DUR" --budget "$BUDGET" \
        --quiet-timeout "$QUIET_TIMEOUT" --extension 2000 \
        --proxy-pidfile "$pidfile" --workdir "$OUTDIR/runs/$label" --out "$OUT" \
        --restart-cmd "$stop_cmd >/dev/null 2>&1; MEDIA=$MEDIA RTPE=$MEDIA $start_cmd >/dev/null" \
        --media-pidfile "$media_pidfile" --mem-cmd "$mem_cmd" "$@") 2>&1 | tee -a "$LOG" || rc=$?
    [ "$rc" = 0 ] || echo "    ! bench.py for $label ended with status $rc (time limit $limit s?)" | tee -a "$LOG"
}

# sipedge_stats: the control endpoint's counters as one JSON object (empty when it does not answer)
sipedge_stats() {
    curl -s -m 5 "http://$SIPEDGE_CONTROL/api/stats" 2>/dev/null || true
}

# rtpengine_cli COMMAND...: rtpengine's text CLI (run.sh: --listen-cli=127.0.0.1:9900), as
# rtpengine-ctl (rtpengine-utils) speaks it: one line in, the answer until the server closes.
rtpengine_cli() {
    python3 - "$*" <<'PY'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", 9900), timeout=5)
    s.sendall(sys.argv[1].encode() + b"\n")
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    print(out.decode(errors="replace"))
except OSError as e:
    print("rtpengine cli: %s" % e, file=sys.stderr)
PY
}

# relay_snapshot NAME LABEL: the relay's counters while the proxy still runs (after the last run
# of a bench.py call: since the restart before it, i.e. that run alone); one JSON line to $RELAY
# and a line to stdout.
relay_snapshot() {
    local name=$1 label=$2 raw=""
    local not_relayed=""
    if [ "$name" = sipedge ]; then
        raw=$(sipedge_stats)
        # calls forwarded unrelayed since this sipedge started (WARN "media relay: no session")
        not_relayed=$(awk '/^=== sipedge_start/ {n = 0} /media relay: no session/ {n++} END {print n + 0}' \
            "$SIPEDGE_RUNDIR/sipedge.log" 2>/dev/null || echo "")
    else
        raw=$( (rtpengine_cli list totals; rtpengine_cli list numsessions) 2>&1 || true)
    fi
    python3 - "$name" "$label" "$RELAY" "$raw" "$not_relayed" <<'PY'
import json, re, sys
name, label, out, raw, not_relayed = sys.argv[1:6]
r = {"label": label, "relay": "sipedge" if name == "sipedge" else "rtpengine"}
if name == "sipedge":
    try:
        st = json.loads(raw)
    except ValueError:
        st = {}
    r["ok"] = bool(st)
    r["packets"] = st.get("relay_forwarded_packets")
    r["bytes"] = st.get("relay_forwarded_bytes")
    r["dropped"] = st.get("relay_dropped_packets")
    r["strangers"] = st.get("relay_strangers_dropped")
    r["sessions_left"] = st.get("media_sessions")
    r["ports_left"] = st.get("relay_ports_in_use")
    r["calls_left"] = st.get("media_calls")
    r["refused"] = sum(v for k, v in st.items() if k.startswith("media_offers_refused"))
    r["not_relayed"] = int(not_relayed) if not_relayed.isdigit() else None
else:
    def num(pat):
        m = re.search(pat + r"\s*:\s*([0-9]+)", raw)
        return int(m.group(1)) if m else None
    r["packets"] = num(r"Total relayed packets")
    r["bytes"] = num(r"Total relayed bytes")
    r["errors"] = num(r"Total relayed packet errors")
    r["sessions_total"] = num(r"Total managed sessions")
    r["sessions_left"] = num(r"Current sessions own")
    r["ok"] = r["packets"] is not None
    if not r["ok"]:
        r["raw"] = raw[:500]
with open(out, "a") as f:
    f.write(json.dumps(r) + "\n")
print("    relay after %s: %s" % (label, " ".join("%s=%s" % kv for kv in r.items() if kv[0] not in ("label", "raw"))))
PY
}

# bench NAME LABEL LIMIT [bench.py args...]: fresh proxy, one bench.py call, proxy stopped.
bench() {
    local name=$1 label=$2
    proxy_cmds "$name"
    echo "=== $label (t+$(($(date +%s) - T0)) s)" | tee -a "$LOG"
    $stop_cmd >/dev/null 2>&1 || true
    MEDIA=$MEDIA RTPE=$MEDIA $start_cmd 2>&1 | tee -a "$LOG"
    sleep 1
    run_bench "$@"
    [ "$MEDIA" = 0 ] || relay_snapshot "$name" "$label" | tee -a "$LOG"
    $stop_cmd 2>&1 | tee -a "$LOG" || true
}

json_field() { # label python-expression-of-r (the last JSON line of that label) -> value or empty
    python3 - "$OUT" "$1" "$2" <<'PY'
import json, sys
rows = [r for r in map(json.loads, filter(str.strip, open(sys.argv[1]))) if r.get("label") == sys.argv[2]]
try:
    v = eval(sys.argv[3], {}, {"r": rows[-1]}) if rows else None
except (KeyError, IndexError, TypeError):
    v = None
print("" if v is None else v)
PY
}

# ---- 1. searches ----
for p in kamailio sipedge; do
    bench "$p" "$p" "$SEARCH_TIMEOUT" --start-rate "$START_RATE" --factor 1.6
done
k_max=$(json_field kamailio 'r["max_pass_rate"]')
s_max=$(json_field sipedge 'r["max_pass_rate"]')

# ---- 2. same load for both ----
common=""
case "$COMMON_RATE" in
0) ;;
auto)
    if [ -n "$k_max" ] && [ -n "$s_max" ]; then
        low=$((k_max < s_max ? k_max : s_max))
        common=$((low * 8 / 10 / 100 * 100))
        [ "$common" -ge 100 ] || common=$((low * 8 / 10))
    else
        echo "=== no common rate: a search found no passing rate" | tee -a "$LOG"
    fi
    ;;
*) common=$COMMON_RATE ;;
esac
if [ -n "$common" ] && [ "$common" -gt 0 ]; then
    for p in kamailio sipedge; do
        bench "$p" "$p@common" $((COMMON_DUR * 3 + 60)) --fixed-rate "$common" --confirm-dur "$COMMON_DUR"
    done
fi

# ---- 3. acceptance: ACCEPT_DUR s at sipedge's maximum, then no transaction left ----
accept_rate=""
case "$ACCEPT_RATE" in
0) ;;
auto) accept_rate=$s_max ;;
*) accept_rate=$ACCEPT_RATE ;;
esac
accept_verdict="not run (ACCEPT_RATE=0)"
accept_txn=""
accept_detail=""
accept_log=$OUTDIR/sipedge-accept.log
: >"$accept_log"
if [ "$ACCEPT_RATE" != 0 ] && [ -z "$accept_rate" ]; then
    accept_verdict="FAIL (no rate: the sipedge search found no passing rate)"
elif [ -n "$accept_rate" ]; then
    echo "=== sipedge@accept: $ACCEPT_DUR s at $accept_rate calls/s, RUST_LOG=$ACCEPT_LOG, then $ACCEPT_WAIT s idle and SIGTERM (t+$(($(date +%s) - T0)) s)" | tee -a "$LOG"
    "$here/sipedge_stop.sh" >/dev/null 2>&1 || true
    mkdir -p "$SIPEDGE_RUNDIR"
    log_from=$(($(wc -l <"$SIPEDGE_RUNDIR/sipedge.log" 2>/dev/null || echo 0) + 1))
    SIPEDGE_LOG=$ACCEPT_LOG MEDIA=$MEDIA "$here/sipedge_start.sh" 2>&1 | tee -a "$LOG"
    sleep 1
    CONFIRM_DUR=$ACCEPT_DUR run_bench sipedge sipedge@accept $((ACCEPT_DUR * 3 + 60)) \
        --fixed-rate "$accept_rate" --restart-cmd ""
    echo "    waiting $ACCEPT_WAIT s for the transactions to end (t+$(($(date +%s) - T0)) s)" | tee -a "$LOG"
    sleep "$ACCEPT_WAIT"
    [ "$MEDIA" = 0 ] || relay_snapshot sipedge sipedge@accept | tee -a "$LOG"
    idle_mem=""
    if [ -f "$SIPEDGE_PIDFILE" ] && spid=$(cat "$SIPEDGE_PIDFILE") && kill -0 "$spid" 2>/dev/null; then
        idle_mem=$(awk '/^(Pss|Rss):/ {printf "%s %.1f MB  ", $1, $2 / 1024}' "/proc/$spid/smaps_rollup" 2>/dev/null || true)
    fi
    "$here/sipedge_stop.sh" 2>&1 | tee -a "$LOG" || true
    tail -n +"$log_from" "$SIPEDGE_RUNDIR/sipedge.log" >"$accept_log" 2>/dev/null || true
    accept_txn=$(grep -o 'listeners stopped.*' "$accept_log" | tail -n 1 || true)
    run=$(json_field sipedge@accept \
        '"%d %d %d %d %s %s %s" % (s["count"], s.get("successful", 0), s.get("failed", -1), s.get("retrans", -1), s.get("uas_failed"), s["pass"], s["sipp_rc"]) if (s := r["steps"][-1]) else None')
    read -r a_count a_ok a_failed a_retr a_uas_failed a_pass a_rc <<<"${run:-0 0 -1 -1 None False None}"
    accept_detail="run: $a_ok/$a_count calls successful, failed UAC $a_failed, failed UAS $a_uas_failed, retransmissions $a_retr, SIPp exit $a_rc, harness verdict $([ "$a_pass" = True ] && echo PASS || echo FAIL); shutdown line: ${accept_txn:-none}; sipedge after ${ACCEPT_WAIT} s idle: ${idle_mem:-not running}"
    reasons=()
    [ -n "$run" ] || reasons+=("no result from the run (time limit?)")
    [ "$a_failed" = 0 ] || reasons+=("$a_failed failed calls (UAC)")
    [ "$a_uas_failed" = 0 ] || reasons+=("failed calls on the UAS: $a_uas_failed")
    [ "$a_ok" = "$a_count" ] || reasons+=("only $a_ok of $a_count calls successful")
    grep -q 'SIPEDGE NOT RUNNING AT STOP' "$accept_log" && reasons+=("sipedge was not running at the stop (crash)")
    grep -q 'panicked' "$accept_log" && reasons+=("panic in the log")
    if [ -z "$accept_txn" ]; then
        reasons+=("no 'listeners stopped' line in the log")
    elif ! grep -qE 'transactions\.server=0 transactions\.client=0$' <<<"$accept_txn"; then
        reasons+=("transactions left: ${accept_txn#listeners stopped }")
    fi
    if [ "$MEDIA" = 1 ]; then
        # ACCEPT_WAIT s after the last BYE: no relayed call, session or port may be left, by
        # the control endpoint then (the snapshot above) and by the shutdown line
        accept_media=$(grep -o 'media relay stopping.*' "$accept_log" | tail -n 1 || true)
        left=$(python3 - "$RELAY" <<'PY'
import json, sys
rows = [r for r in map(json.loads, filter(str.strip, open(sys.argv[1]))) if r["label"] == "sipedge@accept"]
r = rows[-1] if rows else {}
print("ok" if r.get("ok") else "none", r.get("calls_left"), r.get("sessions_left"), r.get("ports_left"), r.get("packets"))
PY
)
        read -r m_ok m_calls m_sessions m_ports m_packets <<<"$left"
        accept_detail+="; relay after ${ACCEPT_WAIT} s idle: calls $m_calls, sessions $m_sessions, ports $m_ports (packets relayed in the run: $m_packets); shutdown line: ${accept_media:-none}"
        if [ "$m_ok" != ok ]; then
            reasons+=("no answer from the control endpoint $SIPEDGE_CONTROL after the wait")
        elif [ "$m_calls" != 0 ] || [ "$m_sessions" != 0 ] || [ "$m_ports" != 0 ]; then
            reasons+=("relay left after ${ACCEPT_WAIT} s: calls $m_calls, sessions $m_sessions, ports $m_ports")
        fi
        if [ -z "$accept_media" ]; then
            reasons+=("no 'media relay stopping' line in the log")
        elif ! grep -qE 'media\.calls=0 relay\.sessions=0 relay\.ports=0( |$)' <<<"$accept_media"; then
            reasons+=("relay left at shutdown: ${accept_media#media relay stopping }")
        fi
        if [ "$SCENARIO" = call_media_rtp ] && ! [ "${m_packets:-0}" -gt 0 ] 2>/dev/null; then
            reasons+=("no RTP relayed in the run (relay_forwarded_packets=$m_packets)")
        fi
    fi
    if [ "${#reasons[@]}" = 0 ]; then
        accept_verdict="PASS"
    else
        joined=$(printf '%s; ' "${reasons[@]}")
        accept_verdict="FAIL (${joined%; })"
    fi
fi

echo "=== done in $(($(date +%s) - T0)) s (load runs); results in $OUTDIR" | tee -a "$LOG"
if [ "$MEDIA" = 1 ]; then
    # a call the relay could not take (e.g. out of fds) is forwarded unrelayed, with a WARN:
    # then the sipedge numbers are not those of relayed calls
    # (counted per measured run in relay.jsonl; the search's failing probes do not count)
    n_norelay=$(python3 -c 'import json,sys; print(sum(r.get("not_relayed") or 0 for r in map(json.loads, filter(str.strip, open(sys.argv[1])))))' "$RELAY")
    n_all=$(grep -c 'media relay: no session' "$SIPEDGE_RUNDIR/sipedge.log" 2>/dev/null || true)
    [ "${n_all:-0}" = 0 ] || echo "=== sipedge forwarded ${n_all} calls unrelayed over the whole run ('media relay: no session'):" \
        "$(grep -o 'error=.*call_id' "$SIPEDGE_RUNDIR/sipedge.log" | sort | uniq -c | sort -rn | head -n 1)" | tee -a "$LOG"
    if [ "${n_norelay:-0}" -gt 0 ]; then
        echo "=== WARNING: $n_norelay calls of the measured runs were NOT relayed by sipedge" | tee -a "$LOG"
        case "$accept_verdict" in
        PASS) accept_verdict="FAIL ($n_norelay calls not relayed by sipedge)" ;;
        FAIL*) accept_verdict="${accept_verdict%)}; $n_norelay calls not relayed by sipedge)" ;;
        *) accept_verdict="FAIL ($n_norelay calls not relayed by sipedge; acceptance run: $accept_verdict)" ;;
        esac
    fi
fi
if [ "$SCENARIO" = call_media_rtp ]; then
    # a run where no RTP flowed through a relay must not pass silently
    rtp_line=$(python3 "$here/report.py" "$OUT" "$SCENARIO" "$RELAY" 2>&1 | grep '^rtp check:' || echo "rtp check: FAIL (no verdict from report.py)")
    case "$rtp_line" in
    "rtp check: PASS"*) ;;
    *)
        case "$accept_verdict" in
        PASS) accept_verdict="FAIL (${rtp_line#rtp check: })" ;;
        FAIL*) accept_verdict="${accept_verdict%)}; ${rtp_line#rtp check: })" ;;
        *) accept_verdict="FAIL (${rtp_line#rtp check: }; acceptance run: $accept_verdict)" ;;
        esac
        ;;
    esac
fi
cp "$SIPEDGE_RUNDIR/sipedge.log" "$OUTDIR/sipedge.log" 2>/dev/null || touch "$OUTDIR/sipedge.log"
tail -n +"$kam_log_from" "$RUNDIR/kamailio.log" >"$OUTDIR/kamailio.log" 2>/dev/null || true
{
    cat "$OUTDIR/versions.txt"
    python3 "$here/report.py" "$OUT" "$SCENARIO" "$RELAY"

    echo
    echo "machine: steps re-run because other processes used > 15 % CPU: $(grep -c '\^ noisy' "$LOG" || true);" \
        "0.5 s waits for an idle machine: $(grep -c 'waiting for it to calm down' "$LOG" || true);" \
        "steps measured on a busy machine after QUIET_TIMEOUT: $(grep -c 'WARNING: machine still' "$LOG" || true)"
    grep '\^ noisy' "$LOG" | sed 's/^ */  /' | head -n 5 || true
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "sipedge log ($OUTDIR/sipedge.log; RUST_LOG=warn, $ACCEPT_LOG for the acceptance run): lines by level and message"
    grep -v '^=== sipedge_start' "$OUTDIR/sipedge.log" |
        sed -E 's/^[0-9T:.-]+Z +//; s/(peer\.addr|user|nc|addr|signal|version|advertise|domains|bindings|call_id|sip\.call_id|branch|sip\.branch)=[^ ]+/\1=…/g' |
        sort | uniq -c | sort -rn | head -n 15 || true
    n_panic=$(grep -c 'panicked' "$OUTDIR/sipedge.log" || true)
    n_gone=$(grep -c 'SIPEDGE NOT RUNNING AT STOP' "$OUTDIR/sipedge.log" || true)
    n_start=$(grep -c '^=== sipedge_start' "$OUTDIR/sipedge.log" || true)
    n_kill=$(grep -c 'did not exit 10 s after SIGTERM' "$OUTDIR/sipedge.log" || true)
    echo "sipedge starts: $n_start, panics: $n_panic, found dead at stop (crash): $n_gone, SIGKILLed at stop: $n_kill"
    # Another process on the bench's fixed ports (5060 proxy, 5062 UAC, 5070 UAS) invalidates steps.
    n_bind=$(cat "$OUTDIR"/runs/*/*.err "$OUTDIR"/runs/*/*.out "$OUTDIR/sipedge.log" "$OUTDIR/kamailio.log" 2>/dev/null |
        grep -cE 'Unable to bind|Address already in use' || true)
    if [ "$n_bind" -gt 0 ]; then
        echo "WARNING: $n_bind port collision(s) (\"Address already in use\" / SIPp \"Unable to bind\"):" \
            "another process used 127.0.0.1:5060/5062/5070 during the run; the affected steps failed for" \
            "that reason, not for load. Re-run on a machine where nothing else uses these ports."
    fi
    echo
    echo "Kamailio log ($OUTDIR/kamailio.log): ERROR/WARNING lines: $(grep -cE 'ERROR|WARNING' "$OUTDIR/kamailio.log" 2>/dev/null || true)"
    grep -E 'ERROR|WARNING' "$OUTDIR/kamailio.log" 2>/dev/null | sed -E 's/^[^:]*: //' | cut -c1-160 |
        sort | uniq -c | sort -rn | head -n 5 || true
    echo
    echo "SIPp error files of the runs (events by kind; what was received; the first abort):"
    for f in "$OUTDIR"/runs/*/*.err; do
        [ -s "$f" ] || continue
        echo "-- ${f#"$OUTDIR"/runs/}"
        grep -oE '[0-9]{10}\.[0-9]{6}: [A-Za-z]+ [a-z]+( on [a-z]+)?' "$f" | sed -E 's/^[^:]*: //' |
            sort | uniq -c | sort -rn | head -n 5 || true
        grep -oE "(while expecting '[0-9A-Z]+' \(index [0-9]+\)|\((aborted at index [0-9]+|successful)\)), received '(SIP/2.0 [0-9]{3} [A-Za-z ]+|[A-Z]+ sip:[^ ']*)" "$f" |
            sort | uniq -c | sort -rn | head -n 5 || true
        grep -m1 -E 'Aborting call|aborting call' "$f" | cut -c1-240 || true
    done
    echo
    echo "acceptance check: a ${ACCEPT_DUR} s SIPp call run at the highest rate found (sipedge: ${accept_rate:-none} calls/s)" \
        "ends with 0 failed calls and no transaction left ${ACCEPT_WAIT} s later"
    [ -z "$accept_detail" ] || echo "  $accept_detail"
    if [ -s "$accept_log" ]; then
        echo "  sipedge log of that run ($accept_log), WARN/ERROR lines:" \
            "$(grep -cE ' (WARN|ERROR) ' "$accept_log" || true)"
        grep -E ' (WARN|ERROR) |panicked|NOT RUNNING|SIGKILL|did not stop' "$accept_log" | head -n 5 | cut -c1-240 | sed 's/^/    /' || true
    fi
    echo "acceptance: $accept_verdict"
} | tee "$OUTDIR/report.txt"
