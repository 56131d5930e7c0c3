#!/usr/bin/env bash
# Attack suite (issue #10 item 8): what one unauthenticated host can try against a sipedge on a
# public address, scripted against a release sipedge on loopback, each asserting the defended
# outcome. One sipedge per attack (fresh config, SQLite db and counters); attackers, victims
# and honest peers are python3 processes on distinct loopback addresses (127.0.0.2 ...).
#
#   crash      81 KB of \n\rX on TCP, a 1 MB never-ending header, a slowloris header: the
#              connection closed (or 4xx/5xx), the process alive and answering UDP OPTIONS
#   relay      requests forged to make us relay (our Route + foreign R-URI, foreign Route,
#              ACK without To tag, forged flow tokens fc=u~/fe=t~, in-dialog INVITE to the
#              provider route, stray 200 OK): victim listeners on 127.0.0.9 receive 0 bytes;
#              bytes sent anywhere <= 3x bytes in
#   stall      a TCP peer that never reads, 5,000 OPTIONS + REGISTERs queued: others' UDP
#              OPTIONS and digest REGISTERs answered within 1 s; the connection closed
#   media      INVITE with 250 m= lines to a media="always" route: 488 or <= max_streams
#              streams; relay ports held small; port-0 streams take none; per-caller
#              sessions bounded; another caller still gets relay ports
#   hijack     a sprayer hitting every relay port every 50 ms during a call: it receives
#              nothing, each party receives only the other's packets
#   challenge  200 INVITEs to the provider route (auth): one 407 per INVITE, no
#              retransmission, bytes out <= 3x bytes in
#   memory     1,500 REGISTERs of ~57 KB, 1,500 INVITEs of ~57 KB drawing 407, 1,500 INVITEs
#              of ~57 KB to a route without auth that never answers: RSS 10 s later <= RSS
#              before + MEMORY_BOUND_MB (40); 2,000 idle TCP connections from one IP: connections
#              held <= limits.tcp_connections_per_ip, fd count bounded, others still served;
#              sipedge (started with a soft fd limit of 1024) raised it to the hard limit
#   bruteforce digest: a response for another uri and an unoffered algorithm refused; 60 wrong
#              passwords from 127.0.0.4: the source banned, 127.0.0.5 registers fine
#   mixed      127.0.0.6 floods OPTIONS/INVITEs (target 20,000/s, 30 s) while 127.0.0.5
#              registers and makes calls to a UAS: 0 failures; its latencies reported; at most
#              one second UDP receive loop at a time, ended within 15 s of the flood's end
#
#   scripts/attack-test.sh                  build (release) and run every attack (~4 min)
#   SIPEDGE_BIN=path scripts/attack-test.sh use this binary, do not build
#   ATTACKS="crash relay" scripts/attack-test.sh   only these (the run says which it left out)
#   KEEP_WORK=1 scripts/attack-test.sh      keep the configs and sipedge logs
#   MIXED_SECONDS=30 MIXED_RATE=20000       the flood of the mixed run
#
# Prints one PASS/FAIL line per check with what it measured; exits non-zero if any check fails
# or a tool is missing (never skips silently). Needs python3 >= 3.11 (tomllib); no root, no
# network namespace: every address is in 127.0.0.0/8. Every loop and wait is bounded.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

ALL_ATTACKS="crash relay stall media hijack challenge memory bruteforce mixed"
ATTACKS=${ATTACKS:-$ALL_ATTACKS}
MEMORY_BOUND_MB=${MEMORY_BOUND_MB:-40}
MIXED_SECONDS=${MIXED_SECONDS:-30}
MIXED_RATE=${MIXED_RATE:-20000}

die() { echo "attack-test: $*" >&2; exit 1; }

command -v python3 >/dev/null 2>&1 || die "python3 not found; install it with: apt-get install -y python3"
python3 -c 'import sys, tomllib; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "python3 >= 3.11 needed (tomllib); install it with: apt-get install -y python3"
command -v timeout >/dev/null 2>&1 || die "timeout not found; install it with: apt-get install -y coreutils"
for a in $ATTACKS; do
    [[ " $ALL_ATTACKS " == *" $a "* ]] || die "unknown attack '$a' (known: $ALL_ATTACKS)"
done

if [ -n "${SIPEDGE_BIN:-}" ]; then
    bin=$SIPEDGE_BIN
else
    command -v flock >/dev/null 2>&1 || die "flock not found; install it with: apt-get install -y util-linux"
    flock /tmp/sipedge-cargo.lock cargo build --release --quiet --bin sipedge
    bin="$root/target/release/sipedge"
fi
[ -x "$bin" ] || die "no sipedge binary at $bin"

work=$(mktemp -d /tmp/sipedge-attack.XXXXXX)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "attack-test: work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Ports: sipedge's SIP port, the victims' and UASs' ports next to it, and a media range
# below the kernel's ephemeral ports, all picked at random.
sip=$(( 20000 + RANDOM % 9000 ))
victim_port=$(( sip + 1 ))     # 127.0.0.9: the relay victims (+ more above)
provider_port=$(( sip + 50 ))  # 127.0.0.9: the provider route's next hop (a victim too)
uas_port=$(( sip + 60 ))       # 127.0.0.8: the callee of the media/hijack/mixed routes
media_lo=$(( 30000 + 2 * (RANDOM % 2000) ))

# Subscribers of every instance: USER;PASSWORD.
cat >"$work/users.csv" <<'CSV'
alice;alice-pw-1
bob;bob-pw-2
carol;carol-pw-3
dave;dave-pw-4
CSV
py="$root/scripts/attack"
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the repo

failed=0
summary=()

# base_config NAME MEDIA_PORTS: the [server], [database], [nat], [media] of every instance,
# the routes of $ROUTES appended.
base_config() {
    cat <<TOML
[server]
listen = ["udp:127.0.0.1:$sip", "tcp:127.0.0.1:$sip"]
domains = ["127.0.0.1"]
fr_inv_timer = 10
[database]
url = "sqlite://$work/$1.db"
[nat]
ping_interval = 0
[media]
address = "127.0.0.1"
ports = "$2"
offer_timeout = 60
TOML
    printf '%s\n' "${ROUTES:-}"
}

# start_server NAME MEDIA_PORTS [table.key=VALUE ...]: config (keys this sipedge does not know
# are named and left out), subscribers, `sipedge serve` until "sipedge started" (bounded).
start_server() {
    local name=$1 ports=$2
    shift 2
    cfg="$work/$name.toml"
    log="$work/$name.log"
    base_config "$name" "$ports" >"$work/$name.base.toml"
    python3 "$py/config.py" "$bin" "$work/$name.base.toml" "$cfg" "$@"
    local cc
    cc=$("$bin" check-config -c "$cfg" 2>&1) || die "check-config rejected $cfg: $cc"
    "$bin" --log-level warn user import -c "$cfg" "$work/users.csv" >/dev/null
    # NOFILE_SOFT: start it with this soft fd limit (sipedge must raise it to the hard limit).
    if [ -n "${NOFILE_SOFT:-}" ]; then
        (
            ulimit -Sn "$NOFILE_SOFT"
            exec "$bin" serve -c "$cfg" --log-level "${SERVER_LOG:-warn}" </dev/null >"$log" 2>&1
        ) &
    else
        "$bin" serve -c "$cfg" --log-level "${SERVER_LOG:-warn}" </dev/null >"$log" 2>&1 &
    fi
    server_pid=$!
    # Ready when an OPTIONS over UDP gets 200 (each probe waits 0.3 s; at most ~15 s).
    for _ in $(seq 1 40); do
        kill -0 "$server_pid" 2>/dev/null || break
        if PYTHONPATH="$py" python3 -c 'import sipattack as sa, sys
sys.exit(sa.options_ok(("127.0.0.1", int(sys.argv[1])), timeout=0.3) is None)' "$sip"; then
            return 0
        fi
        sleep 0.05
    done
    tail -n 20 "$log" >&2
    die "sipedge did not start ($log)"
}

stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

# run_attack NAME SCRIPT [ARGS]: the script's PASS/FAIL lines; a script that fails (or dies,
# or overruns its time) fails the run; so does a sipedge that died during the attack.
run_attack() {
    local name=$1 script=$2 rc=0
    shift 2
    local t0=$SECONDS
    set +e
    timeout -k 5 240 python3 "$py/$script" --server "127.0.0.1:$sip" --pid "$server_pid" \
        --config "$cfg" --log "$log" "$@" 2>&1 | tee "$work/$name.out"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "FAIL  $name: the attack script overran its 240 s bound"
        echo "FAIL  $name: overran" >>"$work/$name.out"
    fi
    if ! grep -q '^PASS\|^FAIL' "$work/$name.out"; then
        echo "FAIL  $name: the attack script printed no check (exit $rc)"
        echo "FAIL  $name: no check" >>"$work/$name.out"
        rc=1
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "FAIL  $name: sipedge died during the attack; its log ends:"
        tail -n 5 "$log" | sed 's/^/      /'
        echo "FAIL  $name: sipedge died" >>"$work/$name.out"
        rc=1
    fi
    [ "$rc" = 0 ] || failed=1
    summary+=("$name: $(grep -c '^PASS' "$work/$name.out" || true) passed, $(grep -c '^FAIL' "$work/$name.out" || true) failed, $((SECONDS - t0)) s")
    stop_server
}

echo "attack-test: sipedge $bin on 127.0.0.1:$sip (udp+tcp); work dir $work"
for a in $ALL_ATTACKS; do
    [[ " $ATTACKS " == *" $a "* ]] || echo "attack-test: NOT RUN (ATTACKS): $a"
done

for attack in $ATTACKS; do
    echo "=== $attack"
    ROUTES=""
    case $attack in
    crash)
        # One sipedge per input: an input that kills it does not hide the others' outcome.
        for step in newline header slowloris; do
            start_server "crash-$step" "$media_lo-$((media_lo + 99))" limits.tcp_message_timeout=4
            run_attack "crash-$step" crash.py --step "$step"
        done
        ;;
    relay)
        ROUTES="[[route]]
name = \"provider\"
user = '^1[0-9]{10}\$'
next_hop = \"127.0.0.9:$provider_port\"
auth = true
media = \"never\""
        start_server relay "$media_lo-$((media_lo + 99))" 'security.trusted=[]'
        run_attack relay relay.py --victim-port "$victim_port" --provider-port "$provider_port"
        ;;
    stall)
        # No rate limit here: what must hold is the send queue, not a ban of the peer.
        start_server stall "$media_lo-$((media_lo + 99))" limits.tcp_write_timeout=3 \
            security.pike_requests=0 'security.trusted=[]'
        run_attack stall stall.py
        ;;
    media)
        ROUTES="[[route]]
name = \"pbx\"
user = '^2[0-9]{3}\$'
next_hop = \"127.0.0.8:$uas_port\"
media = \"always\""
        start_server media "$media_lo-$((media_lo + 999))" media.max_streams=8 \
            media.max_sessions_per_caller=4 'security.trusted=[]'
        run_attack media media.py --uas-port "$uas_port" --media "$media_lo-$((media_lo + 999))"
        ;;
    hijack)
        ROUTES="[[route]]
name = \"pbx\"
user = '^2[0-9]{3}\$'
next_hop = \"127.0.0.8:$uas_port\"
media = \"always\""
        start_server hijack "$media_lo-$((media_lo + 99))" 'security.trusted=[]'
        run_attack hijack hijack.py --uas-port "$uas_port" --media "$media_lo-$((media_lo + 99))"
        ;;
    challenge)
        ROUTES="[[route]]
name = \"provider\"
user = '^1[0-9]{10}\$'
next_hop = \"127.0.0.9:$provider_port\"
auth = true
media = \"never\""
        start_server challenge "$media_lo-$((media_lo + 99))" 'security.trusted=[]'
        run_attack challenge challenge.py --provider-port "$provider_port"
        ;;
    memory)
        ROUTES="[[route]]
name = \"provider\"
user = '^1[0-9]{10}\$'
next_hop = \"127.0.0.9:$provider_port\"
auth = true
media = \"never\"
[[route]]
name = \"pbx\"
user = '^3[0-9]{3}\$'
next_hop = \"127.0.0.8:$uas_port\"
media = \"never\""
        # Started with a soft fd limit of 1024, below the 2,000 connections of the attack.
        NOFILE_SOFT=1024 start_server memory "$media_lo-$((media_lo + 99))" \
            limits.tcp_connections_per_ip=32 'security.trusted=[]'
        run_attack memory memory.py --bound-mb "$MEMORY_BOUND_MB" --uas-port "$uas_port"
        ;;
    bruteforce)
        start_server bruteforce "$media_lo-$((media_lo + 99))" security.auth_failures=10 \
            security.ban_time=60 'security.trusted=[]'
        run_attack bruteforce bruteforce.py
        ;;
    mixed)
        ROUTES="[[route]]
name = \"pbx\"
user = '^3[0-9]{3}\$'
next_hop = \"127.0.0.8:$uas_port\"
media = \"never\""
        start_server mixed "$media_lo-$((media_lo + 99))" 'security.trusted=[]'
        run_attack mixed mixed.py --uas-port "$uas_port" --seconds "$MIXED_SECONDS" --rate "$MIXED_RATE"
        ;;
    esac
done

echo "=== summary"
printf '%s\n' "${summary[@]}"
cat "$work"/*.out | grep '^FAIL' || true
if [ "$failed" != 0 ]; then
    echo "attack-test: FAILED"
    exit 1
fi
echo "attack-test: all attacks defended"
