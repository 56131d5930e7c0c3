#!/usr/bin/env bash
# RTP relay throughput, CPU per packet and memory per call: sipedge's relay (the sipedge-relay
# crate) against rtpengine 10.5 userspace and the harness' raw C forwarder, side by side in ONE
# run on this machine, with the shared reference harness' generator, search and accounting.
# DESIGN §6: packets/s forwarded per core >= 2x rtpengine userspace, zero loss under the rate.
#
#   scripts/bench/media.sh                      # ~8-11 min on the 2-core box (idle machine)
#   CALLS="1000" TARGETS="rtpengine sipedge" scripts/bench/media.sh
#
# Targets (each measured by the harness' tools/media_bench.py search, one after the other):
#   direct     generator -> sink, no relay: the harness' own ceiling on one core
#   udpfwd     media/udpfwd: one thread, epoll + recvmmsg/sendmmsg (batch 64), the "physical limit"
#              (started with a 300 s lifetime: the harness' budget+60 s ends it mid-search)
#   rtpengine  rtpengine userspace, started by the harness' kamailio/run.sh (RTPE=1 KAM=0:
#              --table=-1, ng on 127.0.0.1:2223, 2 threads), calls set up over ng offer/answer;
#              restarted for each call count so that its memory figures start from scratch;
#              after a step that lost >= 1 % it is restarted and its calls set up again, as
#              the harness' SIP search restarts the proxy after a failed step (overloaded once,
#              rtpengine stopped forwarding for good here; see media_target.py step())
#   sipedge    relay/examples/bench_target.rs (RelayConfig bind 127.0.0.1, ports SIPEDGE_PORTS,
#              SIPEDGE_WORKERS worker threads (default 1: per core), IoMode::Batched, 1 h
#              timeouts), calls set up by scripts/bench/media_target.py over its stdin
# Per call i: endpoints A = 127.0.0.1:10000+2i and B = 10001+2i, two streams A -> RA -> B and
# B -> RB -> A (udpfwd: the same number of one-way legs). media/rtpblast sends 172-byte RTP
# packets (12 B header + 160 B PCMU) paced per stream and counts what comes back.
# Pinning (the harness'): the relay's whole process (taskset -a) on CPU1, generator + sink on CPU0.
# Search (the harness'): 4 s steps, x1.4 ramp from START_PPS for BUDGET s, 2 bisections, then 3
# confirmation runs of which 2 must pass (else -10 %). A step passes with loss < 0.1 %, p99
# one-way latency < 20 ms, the generator sending >= 97 % of the rate and no dead stream.
# Reported per target and call count:
#   max pps      highest passing rate ("≥": the generator failed first, or no step failed within BUDGET)
#   CPU-s/Mpkt   CPU of the relay's process tree (utime+stime of all threads, /proc/PID/stat)
#                per million packets forwarded (= us/packet), at the maximum (median of the
#                confirmation runs) and at REF_PPS (the same load for every target)
#   pps/core est. 1e6 / (CPU-s/Mpkt at the maximum): extrapolated, not measured
#   KB/call      (RSS and PSS of the relay's tree after setting up N calls - before) / N
#   loadavg      1-minute load average when the target started; noisy = steps in which other
#                processes used > 15 % CPU (re-run by the harness up to twice, then flagged)
#   and ratios sipedge/rtpengine and sipedge/udpfwd.
#
# This script installs nothing: it checks the prerequisites and names the Debian packages to
# apt-get install. It builds the example (cargo build --release -p sipedge-relay --example
# bench_target) and the harness' C tools, copies the reference harness from $REFBENCH_SRC
# (default: ../shared/bench next to the repo) to $REFBENCH (/tmp/refbench) and runs it from there;
# runtime files go to $RUNDIR (default /tmp/sipbench-media: its own rtpengine PID file, so the
# SIP benches' stop.sh never stops this rtpengine), nothing into the repo.
# Output: the table, plus $RUNDIR/media-<stamp>/{results.jsonl,bench.log,report.txt}.
#
# Load: other work on the machine distorts every number. Before each target the script waits
# (at most LOAD_WAIT s, LOAD_WAIT_TOTAL s over the run) for the 1-minute load average to drop
# below LOAD_MAX -- or for a 3 s sample showing the machine below IDLE_BUSY % CPU, because our
# own previous search leaves the load average at ~1-1.5 for minutes (it decays by e per minute)
# -- and logs load and busy % with the top CPU users; the harness also waits (<= QUIET_TIMEOUT s)
# for < 15 % CPU busy before each step and re-runs steps in which others used > 15 %.
#
# Knobs (env): CALLS="100 1000" TARGETS="direct udpfwd rtpengine sipedge" BUDGET=40 (s of ramp
#   per search) DUR=4 (s per step) REPS=3 START_PPS=50000 REF_PPS=50000 SIPEDGE_WORKERS=1
#   SIPEDGE_PORTS=40000-47999 LOAD_MAX=0.5 IDLE_BUSY=10 LOAD_WAIT=60 LOAD_WAIT_TOTAL=240 QUIET_TIMEOUT=30
#   SEARCH_TIMEOUT=300 (hard limit per target) RUNDIR=/tmp/sipbench-media REFBENCH=/tmp/refbench
#   REFBENCH_SRC=<repo>/../shared/bench SKIP_BUILD=1 (use the example already built)
#   SIPEDGE_BIN=<path> (another build of bench_target, e.g. a saved copy for an A/B run; implies SKIP_BUILD=1)
# Bounds: every rtpblast/udpfwd run stops by itself (harness), every search is killed after
# SEARCH_TIMEOUT s (bench_target then sees end of input and shuts down), every wait is capped.
# Exit: 0 after the report; 1 on missing prerequisites, a failed build or a busy port.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

CALLS=${CALLS:-"100 1000"}
TARGETS=${TARGETS:-"direct udpfwd rtpengine sipedge"}
BUDGET=${BUDGET:-40}
DUR=${DUR:-4}
REPS=${REPS:-3}
START_PPS=${START_PPS:-50000}
REF_PPS=${REF_PPS:-50000}
SIPEDGE_WORKERS=${SIPEDGE_WORKERS:-1}
SIPEDGE_PORTS=${SIPEDGE_PORTS:-40000-47999}
LOAD_MAX=${LOAD_MAX:-0.5}
LOAD_WAIT=${LOAD_WAIT:-60}
IDLE_BUSY=${IDLE_BUSY:-10}
LOAD_WAIT_TOTAL=${LOAD_WAIT_TOTAL:-240}
QUIET_TIMEOUT=${QUIET_TIMEOUT:-30}
SEARCH_TIMEOUT=${SEARCH_TIMEOUT:-300}
REFBENCH_SRC=${REFBENCH_SRC:-$root/../shared/bench}
export REFBENCH=${REFBENCH:-/tmp/refbench}
export RUNDIR=${RUNDIR:-/tmp/sipbench-media}
BIN=${SIPEDGE_BIN:-$root/target/release/examples/bench_target}

# ---- prerequisites (nothing is installed here) ----
missing_pkgs=()
need() { # command package
    command -v "$1" >/dev/null 2>&1 || missing_pkgs+=("$2")
}
case " $TARGETS " in *" rtpengine "*) need rtpengine rtpengine-daemon ;; esac
need gcc gcc
need make make
need python3 python3
need taskset util-linux
need timeout coreutils
need ss iproute2
if [ "${#missing_pkgs[@]}" -gt 0 ]; then
    echo "media: missing prerequisites; install them with (as root):" >&2
    echo "    apt-get install -y ${missing_pkgs[*]}" >&2
    exit 1
fi
if [ "$(nproc)" -lt 2 ]; then
    echo "media: needs 2 CPUs (relay on CPU1, generator on CPU0); this machine has $(nproc)" >&2
    exit 1
fi
[ -z "${SIPEDGE_BIN:-}" ] || SKIP_BUILD=1
if ! command -v cargo >/dev/null 2>&1 && [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "media: cargo not found (Rust toolchain, https://rustup.rs) -- or set SKIP_BUILD=1" >&2
    exit 1
fi
for f in tools/media_bench.py tools/procstat.py media/rtpblast.c media/udpfwd.c media/ng_setup.py kamailio/run.sh stop.sh; do
    [ -f "$REFBENCH_SRC/$f" ] || { echo "media: reference harness not found at $REFBENCH_SRC ($f; set REFBENCH_SRC)" >&2; exit 1; }
done
busy=$(ss -Hlnu 'sport = :2223 or sport = :9900' 2>/dev/null || true)
if [ -n "$busy" ]; then
    echo "media: 127.0.0.1:2223 (rtpengine ng) or :9900 (its cli) is in use -- another rtpengine? (its PID file would be in the other bench's RUNDIR)" >&2
    ss -Hlnup 'sport = :2223 or sport = :9900' >&2 || true
    exit 1
fi

# ---- build: our example, the harness' C tools (in the copy) ----
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "=== cargo build --release -p sipedge-relay --example bench_target (waits if another cargo holds the lock)"
    cargo build --release -p sipedge-relay --example bench_target || {
        echo "media: the relay crate does not build (someone's edit in progress? retry in a minute)" >&2
        exit 1
    }
fi
[ -x "$BIN" ] || { echo "media: $BIN missing" >&2; exit 1; }
rm -rf "$REFBENCH"
cp -r "$REFBENCH_SRC" "$REFBENCH"
chmod -R u+w "$REFBENCH"
make -s -C "$REFBENCH/media"

STAMP=$(date +%Y%m%d-%H%M%S)
OUTDIR=$RUNDIR/media-$STAMP
mkdir -p "$OUTDIR"
OUT=$OUTDIR/results.jsonl
LOG=$OUTDIR/bench.log
# kamailio/run.sh creates the Kamailio DB (needs kamailio + sqlite3) when it is missing; with
# KAM=0 it never opens it, so an empty file stands in for it.
[ -f "$RUNDIR/kamailio.db" ] || : >"$RUNDIR/kamailio.db"

cleanup() {
    # rtpengine by its PID file (the harness' stop.sh); bench_target and udpfwd are children of
    # media_target.py, which stops them, and they also stop by themselves (end of input / -d).
    "$REFBENCH/stop.sh" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
"$REFBENCH/stop.sh" >/dev/null 2>&1 || true  # a previous run's rtpengine, by PID file only
T0=$(date +%s)

{
    echo "date: $(date -Is)"
    echo "sipedge relay: $BIN (working tree at $(git rev-parse --short HEAD)$(git status --porcelain -- relay | grep -q . && echo ', relay/ has uncommitted changes'))"
    echo "rtpengine: $(dpkg-query -W -f='${Version}' rtpengine-daemon 2>/dev/null || rtpengine --version 2>&1 | head -1)"
    echo "kernel: $(uname -r), cpus: $(nproc),$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
    echo "net.core.rmem_default=$(cat /proc/sys/net/core/rmem_default) rmem_max=$(cat /proc/sys/net/core/rmem_max)"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "knobs: CALLS=\"$CALLS\" TARGETS=\"$TARGETS\" BUDGET=$BUDGET DUR=$DUR REPS=$REPS START_PPS=$START_PPS REF_PPS=$REF_PPS SIPEDGE_WORKERS=$SIPEDGE_WORKERS SIPEDGE_PORTS=$SIPEDGE_PORTS LOAD_MAX=$LOAD_MAX LOAD_WAIT=$LOAD_WAIT"
    echo "results: $OUTDIR"
} | tee "$OUTDIR/versions.txt"

load_waited=0
# wait_load LABEL: bounded wait until the 1-minute load average is below LOAD_MAX -- or, since
# our own previous target leaves it at ~1-1.5 for minutes, until a 3 s sample shows the whole
# machine below IDLE_BUSY % CPU (per-process accounting, like the harness' quiet check).
wait_load() {
    local waited=0 l sample="" busy
    while :; do
        l=$(cut -d' ' -f1 /proc/loadavg)
        awk -v l="$l" -v m="$LOAD_MAX" 'BEGIN { exit !(l < m) }' && break
        sample=$(python3 "$here/media_target.py" --idle-check 3 2>/dev/null || echo "999 top: ?")
        busy=${sample%% *}
        [ "$busy" -lt "$IDLE_BUSY" ] 2>/dev/null && break
        if [ "$waited" -ge "$LOAD_WAIT" ] || [ "$load_waited" -ge "$LOAD_WAIT_TOTAL" ]; then
            echo "    load average $l >= $LOAD_MAX and machine ${busy}% busy after waiting ${waited} s: measuring anyway" | tee -a "$LOG"
            break
        fi
        sleep 2
        waited=$((waited + 5))
        load_waited=$((load_waited + 5))
    done
    [ -n "$sample" ] || sample=$(python3 "$here/media_target.py" --idle-check 1 2>/dev/null || echo "? top: ?")
    echo "    $1: load average $(cut -d' ' -f1-3 /proc/loadavg), machine ${sample%% top:*}% busy (top: ${sample#* top: }), waited ${waited} s" | tee -a "$LOG"
}

for n in $CALLS; do
    for t in $TARGETS; do
        if [ "$t" = rtpengine ]; then
            # fresh rtpengine for each call count: its memory figures start from an idle process
            "$REFBENCH/stop.sh" >/dev/null 2>&1 || true
            RTPE=1 KAM=0 MEDIA=1 "$REFBENCH/kamailio/run.sh" 2>&1 | tee -a "$LOG"
            sleep 1
        fi
        echo "=== $t, $n calls (t+$(($(date +%s) - T0)) s)" | tee -a "$LOG"
        wait_load "$t/$n"
        rc=0
        timeout --kill-after=10 "$SEARCH_TIMEOUT" python3 "$here/media_target.py" \
            --sipedge-bin "$BIN" --sipedge-ports "$SIPEDGE_PORTS" --sipedge-workers "$SIPEDGE_WORKERS" \
            --targets "$t" --calls "$n" --budget "$BUDGET" --dur "$DUR" --reps "$REPS" \
            --start-pps "$START_PPS" --ref-pps "$REF_PPS" --quiet-timeout "$QUIET_TIMEOUT" \
            --rtpengine-pidfile "$RUNDIR/rtpengine.pid" \
            --rtpengine-restart "'$REFBENCH/stop.sh'; RTPE=1 KAM=0 MEDIA=1 '$REFBENCH/kamailio/run.sh'" \
            --workdir "$OUTDIR/work" --out "$OUT" 2>&1 | tee -a "$LOG" || rc=$?
        [ "$rc" = 0 ] || echo "    ! media_target.py for $t/$n ended with status $rc (time limit $SEARCH_TIMEOUT s?)" | tee -a "$LOG"
        [ "$t" != rtpengine ] || "$REFBENCH/stop.sh" 2>&1 | tee -a "$LOG" || true
    done
done

echo "=== done in $(($(date +%s) - T0)) s; results in $OUTDIR" | tee -a "$LOG"
{
    cat "$OUTDIR/versions.txt"
    echo
    python3 "$here/media_target.py" --report "$OUT"
    echo
    echo "machine: steps re-run because other processes used > 15 % CPU: $(grep -c '\^ noisy' "$LOG" || true);" \
        "0.5 s waits for an idle machine: $(grep -c 'waiting for it to calm down' "$LOG" || true);" \
        "steps measured on a busy machine after QUIET_TIMEOUT: $(grep -c 'WARNING: machine still' "$LOG" || true);" \
        "targets started on a busy machine after LOAD_WAIT: $(grep -c 'measuring anyway' "$LOG" || true)"
    grep -E ': load average |measuring anyway' "$LOG" | sed 's/^ */  /' || true
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUTDIR/report.txt"
