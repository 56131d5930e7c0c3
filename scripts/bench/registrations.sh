#!/usr/bin/env bash
# Authenticated registrations per second and CPU-seconds per registration: sipedge and
# Kamailio 5.6 (running the OpenSER-seed logic of the shared reference bench), side by side in
# one run on this machine, with the same load generator, search and accounting.
#
#   scripts/bench/registrations.sh                 # ~5-7 min on the 2-core box
#   ROUNDS=3 scripts/bench/registrations.sh        # medians of 3 rounds (~15-20 min)
#
# What is measured, for each proxy (fresh proxy and fresh DB at the start; the harness restarts
# the proxy after every failed step and before the confirmation run):
#   SIPp sipp/reg_auth.xml of the shared harness over UDP on 127.0.0.1: REGISTER -> 401 ->
#   REGISTER with digest (MD5, users 1000..1999 / pw<id>, sequential) -> 200, Expires 3600.
#   1. rate search by the harness' tools/bench.py (probe ramp x1.6 from START_RATE, two
#      bisections, then a CONFIRM_DUR s confirmation run; a run passes only with 0 failed
#      registrations, 0 retransmissions, the generator keeping the rate).
#   2. one run at the same rate for both (COMMON_RATE, default 80 % of the lower maximum),
#      so that CPU per registration is compared at equal load.
#   CPU = utime+stime of the proxy's process tree (/proc/PID/stat) over the SIPp run;
#   CPU-s per 1000 registrations = CPU% / 100 * run seconds / registrations * 1000.
#   Memory = PSS and RSS of the proxy's process tree after the run (+ Kamailio's shm peak).
#
# Kamailio: the harness' kamailio/kamailio.cfg and run.sh with MEDIA=0 (no rtpengine), 4 UDP
# workers, SQLite subscriber table, usrloc write-back. sipedge: target/release/sipedge through
# scripts/bench/sipedge_start.sh / sipedge_stop.sh (the harness' PROXY_START/PROXY_STOP hooks),
# SQLite in the run dir, write-through location store, RUST_LOG=warn.
#
# This script installs nothing: it checks the prerequisites and names the Debian packages to
# apt-get install. It builds sipedge (cargo build --release), copies the reference harness
# from $REFBENCH_SRC (default: ../shared/bench next to the repo) to /tmp/refbench and runs it
# from there; runtime files go to $RUNDIR (default /tmp/sipbench), nothing into the repo.
# Output: the table below, plus $RUNDIR/registrations-<stamp>/{results.jsonl,bench.log,...}.
#
# Knobs (env): START_RATE=1000 PROBE_DUR=4 CONFIRM_DUR=20 BUDGET=45 (s of probes per search)
#   COMMON_RATE=auto|0|N (0 = skip) COMMON_DUR=20 ROUNDS=1 QUIET_TIMEOUT=15 (s to wait for an
#   idle machine before a step) SEARCH_TIMEOUT=420 (hard wall-clock limit per bench.py call)
#   SIPEDGE_WORKERS=0 (0 = half the cores, at least one) KAM_CHILDREN=4 RUNDIR=/tmp/sipbench
#   REFBENCH_SRC=<repo>/../shared/bench SKIP_BUILD=1 (use the binary already built)
#   SIPEDGE_REV= (empty: build and measure the working tree, `cargo build --release` in the repo)
#   SIPEDGE_REV=HEAD|<commit>: measure that commit instead, exported with `git archive` to
#     $SIPEDGE_BUILD_DIR/src-<sha> (default /tmp/sipedge-bench-build) and built there with its own
#     CARGO_TARGET_DIR (the first such build compiles every dependency once). Use it when the
#     working tree holds unfinished changes or to benchmark a fixed version.
#
# The adapters also work with the harness' own driver (start rate fixed at 4000/s there):
#   PROXY_START=$PWD/scripts/bench/sipedge_start.sh PROXY_STOP=$PWD/scripts/bench/sipedge_stop.sh \
#   PROXY_PIDFILE=/tmp/sipbench/sipedge/sipedge.pid MEDIA_PIDFILE="" PROXY_MEM_CMD="" \
#   SCENARIOS=reg MEDIA_BENCH=0 /tmp/refbench/run_bench.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

START_RATE=${START_RATE:-1000}
PROBE_DUR=${PROBE_DUR:-4}
CONFIRM_DUR=${CONFIRM_DUR:-20}
BUDGET=${BUDGET:-45}
COMMON_RATE=${COMMON_RATE:-auto}
COMMON_DUR=${COMMON_DUR:-20}
ROUNDS=${ROUNDS:-1}
QUIET_TIMEOUT=${QUIET_TIMEOUT:-15}
SEARCH_TIMEOUT=${SEARCH_TIMEOUT:-420}
REFBENCH_SRC=${REFBENCH_SRC:-$root/../shared/bench}
REFBENCH=/tmp/refbench
SIPEDGE_REV=${SIPEDGE_REV:-}
SIPEDGE_BUILD_DIR=${SIPEDGE_BUILD_DIR:-/tmp/sipedge-bench-build}
export RUNDIR=${RUNDIR:-/tmp/sipbench}
export SIPEDGE_RUNDIR=$RUNDIR/sipedge
export SIPEDGE_PIDFILE=$SIPEDGE_RUNDIR/sipedge.pid
export SIPEDGE_WORKERS=${SIPEDGE_WORKERS:-0}
export KAM_CHILDREN=${KAM_CHILDREN:-4}
KAM_PIDFILE=$RUNDIR/kamailio.pid

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
if [ "${#missing_pkgs[@]}" -gt 0 ]; then
    mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
    echo "registrations: missing prerequisites; install them with (as root):" >&2
    echo "    apt-get install -y ${missing_pkgs[*]}" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1 && [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "registrations: cargo not found (Rust toolchain, https://rustup.rs) -- or set SKIP_BUILD=1" >&2
    exit 1
fi
if [ ! -f "$REFBENCH_SRC/tools/bench.py" ] || [ ! -f "$REFBENCH_SRC/kamailio/run.sh" ]; then
    echo "registrations: reference harness not found at $REFBENCH_SRC (set REFBENCH_SRC)" >&2
    exit 1
fi

# ---- build, copy the harness, clean state ----
if [ -z "$SIPEDGE_REV" ]; then
    # the working tree, as it is
    export SIPEDGE_BIN=$root/target/release/sipedge
    if [ "${SKIP_BUILD:-0}" != 1 ]; then
        echo "=== cargo build --release (waits if another cargo holds the lock)"
        cargo build --release || {
            echo "registrations: the working tree does not build; SIPEDGE_REV=HEAD measures the last commit instead" >&2
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
[ -x "$SIPEDGE_BIN" ] || { echo "registrations: $SIPEDGE_BIN missing" >&2; exit 1; }

rm -rf "$REFBENCH"
cp -r "$REFBENCH_SRC" "$REFBENCH"
chmod -R u+w "$REFBENCH"

# Stop whatever an earlier run of this script left behind (by PID file only).
"$REFBENCH/stop.sh" >/dev/null 2>&1 || true
"$here/sipedge_stop.sh" >/dev/null 2>&1 || true
busy=$(ss -Hlnu 'sport = :5060 or sport = :5061' 2>/dev/null || true)
busy+=$(ss -Hlnt 'sport = :5060' 2>/dev/null || true)
if [ -n "$busy" ]; then
    echo "registrations: port 5060/5061 on this machine is in use by something else:" >&2
    ss -Hlnup 'sport = :5060 or sport = :5061' >&2 || true
    ss -Hlntp 'sport = :5060' >&2 || true
    exit 1
fi

STAMP=$(date +%Y%m%d-%H%M%S)
OUTDIR=$RUNDIR/registrations-$STAMP
mkdir -p "$OUTDIR"
OUT=$OUTDIR/results.jsonl
LOG=$OUTDIR/bench.log
rm -rf "$SIPEDGE_RUNDIR"
"$REFBENCH/kamailio/setup.sh" >"$OUTDIR/kamailio-setup.log"   # fresh Kamailio DB + sipp/users.csv
T0=$(date +%s)

cleanup() {
    "$REFBENCH/stop.sh" >/dev/null 2>&1 || true
    "$here/sipedge_stop.sh" >/dev/null 2>&1 || true
}
trap cleanup EXIT

{
    echo "date: $(date -Is)"
    echo "sipedge: $("$SIPEDGE_BIN" --version), $SIPEDGE_BIN, built from the $sipedge_src"
    echo "kamailio: $(kamailio -v 2>/dev/null | head -1)"
    echo "sipp: $(sipp -v 2>/dev/null | grep -m1 -o 'SIPp v[^ ]*')"
    echo "kernel: $(uname -r), cpus: $(nproc),$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "knobs: START_RATE=$START_RATE PROBE_DUR=$PROBE_DUR CONFIRM_DUR=$CONFIRM_DUR BUDGET=$BUDGET COMMON_RATE=$COMMON_RATE COMMON_DUR=$COMMON_DUR ROUNDS=$ROUNDS SIPEDGE_WORKERS=$SIPEDGE_WORKERS KAM_CHILDREN=$KAM_CHILDREN"
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
        ;;
    sipedge)
        start_cmd="$here/sipedge_start.sh"
        stop_cmd="$here/sipedge_stop.sh"
        pidfile=$SIPEDGE_PIDFILE
        mem_cmd=""
        ;;
    esac
}

# bench NAME LABEL [bench.py args...]: fresh proxy, one tools/bench.py call (bounded), proxy stopped.
bench() {
    local name=$1 label=$2
    shift 2
    proxy_cmds "$name"
    echo "=== $label (t+$(($(date +%s) - T0)) s)" | tee -a "$LOG"
    $stop_cmd >/dev/null 2>&1 || true
    MEDIA=0 RTPE=0 $start_cmd 2>&1 | tee -a "$LOG"
    sleep 1
    local rc=0
    (cd "$REFBENCH" && timeout --kill-after=10 "$SEARCH_TIMEOUT" \
        python3 tools/bench.py --scenario reg --label "$label" --hold-ms 1000 \
        --probe-dur "$PROBE_DUR" --confirm-dur "$CONFIRM_DUR" --budget "$BUDGET" \
        --quiet-timeout "$QUIET_TIMEOUT" --users "$REFBENCH/sipp/users.csv" \
        --proxy-pidfile "$pidfile" --workdir "$OUTDIR/runs/$label" --out "$OUT" \
        --restart-cmd "$stop_cmd >/dev/null 2>&1; MEDIA=0 RTPE=0 $start_cmd >/dev/null" \
        --mem-cmd "$mem_cmd" "$@") 2>&1 | tee -a "$LOG" || rc=$?
    [ "$rc" = 0 ] || echo "    ! bench.py for $label ended with status $rc (SEARCH_TIMEOUT=$SEARCH_TIMEOUT s?)" | tee -a "$LOG"
    $stop_cmd 2>&1 | tee -a "$LOG" || true
}

max_rate() { # label -> median max_pass_rate over the rounds, or empty
    python3 - "$OUT" "$1" <<'PY'
import json, statistics, sys
v = [r.get("max_pass_rate") for r in map(json.loads, filter(str.strip, open(sys.argv[1])))
     if r.get("label") == sys.argv[2]]
v = [x for x in v if x]
print(int(statistics.median(v)) if v else "")
PY
}

for round in $(seq 1 "$ROUNDS"); do
    echo "=== round $round of $ROUNDS" | tee -a "$LOG"
    for p in kamailio sipedge; do
        bench "$p" "$p" --start-rate "$START_RATE" --factor 1.6
    done
done

common=""
case "$COMMON_RATE" in
0) ;;
auto)
    k=$(max_rate kamailio)
    s=$(max_rate sipedge)
    if [ -n "$k" ] && [ -n "$s" ]; then
        low=$((k < s ? k : s))
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
        bench "$p" "$p@common" --fixed-rate "$common" --confirm-dur "$COMMON_DUR"
    done
fi

echo "=== done in $(($(date +%s) - T0)) s (load runs); results in $OUTDIR" | tee -a "$LOG"
cp "$SIPEDGE_RUNDIR/sipedge.log" "$OUTDIR/sipedge.log" 2>/dev/null || true
cp "$RUNDIR/kamailio.log" "$OUTDIR/kamailio.log" 2>/dev/null || true
{
    cat "$OUTDIR/versions.txt"
    python3 "$here/report.py" "$OUT"

    echo
    echo "machine: steps re-run because other processes used > 15 % CPU: $(grep -c '\^ noisy' "$LOG" || true);" \
        "0.5 s waits for an idle machine: $(grep -c 'waiting for it to calm down' "$LOG" || true);" \
        "steps measured on a busy machine after QUIET_TIMEOUT: $(grep -c 'WARNING: machine still' "$LOG" || true)"
    grep '\^ noisy' "$LOG" | sed 's/^ */  /' | head -n 5 || true
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "sipedge log (RUST_LOG=warn, $OUTDIR/sipedge.log): lines by level and message"
    grep -v '^=== sipedge_start' "$OUTDIR/sipedge.log" |
        sed -E 's/^[0-9T:.-]+Z +//; s/(peer\.addr|user|nc)=[^ ]+/\1=…/g' |
        sort | uniq -c | sort -rn | head -n 15 || true
    n_panic=$(grep -c 'panicked' "$OUTDIR/sipedge.log" || true)
    n_gone=$(grep -c 'SIPEDGE NOT RUNNING AT STOP' "$OUTDIR/sipedge.log" || true)
    n_start=$(grep -c '^=== sipedge_start' "$OUTDIR/sipedge.log" || true)
    echo "sipedge starts: $n_start, panics: $n_panic, found dead at stop (crash): $n_gone"
    # Another process on the bench's fixed ports (5060 proxy, 5061 SIPp UAC) invalidates steps:
    # e.g. a SIPp started elsewhere with "-p 0" binds the first free port from 5060 upwards.
    n_bind=$(cat "$OUTDIR"/runs/*/*.err "$OUTDIR/sipedge.log" "$OUTDIR/kamailio.log" 2>/dev/null |
        grep -cE 'Unable to bind|Address already in use' || true)
    if [ "$n_bind" -gt 0 ]; then
        echo "WARNING: $n_bind port collision(s) (\"Address already in use\" / SIPp \"Unable to bind\"):" \
            "another process used 127.0.0.1:5060/5061 during the run; the affected steps failed for" \
            "that reason, not for load. Re-run on a machine where nothing else uses these ports."
    fi
    echo
    echo "Kamailio log ($OUTDIR/kamailio.log): ERROR/WARNING lines: $(grep -cE 'ERROR|WARNING' "$OUTDIR/kamailio.log" 2>/dev/null || true)"
    echo
    echo "SIPp error files of the runs (events by kind; what was received; the first abort):"
    for f in "$OUTDIR"/runs/*/*.err; do
        [ -s "$f" ] || continue
        echo "-- ${f#"$OUTDIR"/runs/}"
        grep -oE '[0-9]{10}\.[0-9]{6}: [A-Za-z]+ [a-z]+( on [a-z]+)?' "$f" | sed -E 's/^[^:]*: //' |
            sort | uniq -c | sort -rn | head -n 5 || true
        grep -oE "(while expecting '[0-9]+' \(index [0-9]+\)|\((aborted at index [0-9]+|successful)\)), received 'SIP/2.0 [0-9]{3} [A-Za-z ]+" "$f" |
            sort | uniq -c | sort -rn | head -n 5 || true
        grep -m1 -E 'Aborting call|aborting call' "$f" | cut -c1-240 || true
    done
} | tee "$OUTDIR/report.txt"
