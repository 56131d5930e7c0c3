#!/usr/bin/env bash
# PROXY_STOP adapter for the shared SIPp harness: stops the sipedge started by
# scripts/bench/sipedge_start.sh -- only the PID in its PID file (SIGTERM, up to 10 s for the
# clean shutdown, then SIGKILL).
#
# If that PID is no longer running, sipedge died on its own (a crash under load): this is
# written to stderr and to $SIPEDGE_RUNDIR/sipedge.log ("SIPEDGE NOT RUNNING AT STOP"), which
# scripts/bench/registrations.sh reports.
#
#   RUNDIR=/tmp/sipbench  SIPEDGE_RUNDIR=$RUNDIR/sipedge  SIPEDGE_PIDFILE=$SIPEDGE_RUNDIR/sipedge.pid
#
# Run by hand:  scripts/bench/sipedge_stop.sh
set -euo pipefail

RUNDIR=${RUNDIR:-/tmp/sipbench}
SIPEDGE_RUNDIR=${SIPEDGE_RUNDIR:-$RUNDIR/sipedge}
SIPEDGE_PIDFILE=${SIPEDGE_PIDFILE:-$SIPEDGE_RUNDIR/sipedge.pid}
log=$SIPEDGE_RUNDIR/sipedge.log

[ -f "$SIPEDGE_PIDFILE" ] || exit 0
pid=$(cat "$SIPEDGE_PIDFILE")
rm -f "$SIPEDGE_PIDFILE"
case "$pid" in '' | *[!0-9]*)
    echo "sipedge_stop: bad PID file content: $pid" >&2
    exit 1
    ;;
esac
# The PID must still be our sipedge, not a recycled number.
if ! kill -0 "$pid" 2>/dev/null || ! grep -q sipedge "/proc/$pid/cmdline" 2>/dev/null; then
    msg="SIPEDGE NOT RUNNING AT STOP: pid $pid had exited before sipedge_stop ($(date -Is))"
    echo "$msg" >>"$log"
    echo "sipedge_stop: $msg" >&2
    exit 0
fi
kill -TERM "$pid"
for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$pid" 2>/dev/null; then
    echo "sipedge_stop: pid $pid did not exit 10 s after SIGTERM, sending SIGKILL ($(date -Is))" | tee -a "$log" >&2
    kill -KILL "$pid" 2>/dev/null || true
fi
echo "stopped sipedge pid $pid"
