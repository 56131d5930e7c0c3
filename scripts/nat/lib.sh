# Shared by scripts/nat-test.sh and scripts/nat-softphone.sh (sourced, not run): the
# namespaces, veths, bridge and NAT rules of the test topology, and sipedge started in se-pub.
# The caller defines die(), bin (the sipedge binary) and vwork (the work dir of this run).
# shellcheck shell=bash disable=SC2034,SC2154  # constants used and bin/vwork set by the caller

# Tools every NAT script needs; a missing one is an error naming the package, never a skip.
nat_require_tools() {
    local tool
    [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, iptables)"
    for tool in ip ss iptables python3 timeout flock "$@"; do
        command -v "$tool" >/dev/null 2>&1 && continue
        case $tool in
            sipp) die "sipp not found; install it with: apt-get install -y sip-tester" ;;
            ip | ss) die "$tool not found; install it with: apt-get install -y iproute2" ;;
            iptables) die "iptables not found; install it with: apt-get install -y iptables" ;;
            python3) die "python3 not found; install it with: apt-get install -y python3" ;;
            baresip) die "baresip not found; install it with: apt-get install -y baresip" ;;
            *) die "$tool not found; install it with: apt-get install -y coreutils util-linux" ;;
        esac
    done
}

# One run at a time (the namespace names are fixed); fd 9 holds the lock until exit.
nat_lock() {
    mkdir -p /run/lock
    exec 9>/run/lock/sipedge-nat-test.lock
    flock -w 300 9 || die "another NAT test has held /run/lock/sipedge-nat-test.lock for 300 s"
}

server_pid=""

NS_PUB=se-pub
NS_ALL=(se-pub se-nat1 se-nat2 se-phone1 se-phone2 se-third se-contact)
SERVER_IP=198.51.100.1
PING_INTERVAL=2
PING_FAILURES=3
SIP=5060
MEDIA_PORTS=30000-30999   # media.ports of the test config (media.address = SERVER_IP)
# phone i: namespace, router namespace, router public IP, router LAN IP, phone IP, user, password
PHONE_NS=(""  se-phone1    se-phone2)
ROUTER_NS=("" se-nat1      se-nat2)
ROUTER_PUB=("" 198.51.100.11 198.51.100.12)
ROUTER_LAN=("" 10.0.1.1     192.168.2.1)
PHONE_IP=(""  10.0.1.2     192.168.2.2)
PHONE_USER=("" alice        bob)
PHONE_PASS=("" alice-secret-1 bob-secret-2)
# Two public hosts on the server's net, no NAT: THIRD registers a contact that lives on CONTACT
# (a PBX or a provisioning tool registering a phone), as user THIRD_USER.
THIRD_NS=se-third
THIRD_IP=198.51.100.21
CONTACT_NS=se-contact
CONTACT_IP=198.51.100.22
THIRD_USER=carol
THIRD_PASS=carol-secret-3

# Kill what runs inside our namespaces (only this script starts processes there), then delete
# them: the veths, the bridge and the iptables rules live in them and go with them.
remove_namespaces() {
    local ns pids
    for ns in "${NS_ALL[@]}"; do
        [ -e "/run/netns/$ns" ] || continue
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
            for _ in $(seq 1 30); do
                pids=$(ip netns pids "$ns" 2>/dev/null || true)
                [ -z "$pids" ] && break
                sleep 0.1
            done
            # shellcheck disable=SC2086
            if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; fi
        fi
        ip netns del "$ns" 2>/dev/null || true
    done
}
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
# ---------------------------------------------------------------------------------------------
# Topology

setup_topology() {  # $1 = extra MASQUERADE options ("" or "--random-fully")
    local i
    ip netns add "$NS_PUB"
    ip -n "$NS_PUB" link set lo up
    ip -n "$NS_PUB" link add br0 type bridge
    ip -n "$NS_PUB" addr add "$SERVER_IP/24" dev br0
    ip -n "$NS_PUB" link set br0 up
    for i in 1 2; do
        local nat=${ROUTER_NS[$i]} phone=${PHONE_NS[$i]}
        ip netns add "$nat"
        ip netns add "$phone"
        ip -n "$nat" link set lo up
        ip -n "$phone" link set lo up
        # public side: a veth from the bridge in se-pub to the router
        ip -n "$NS_PUB" link add "port$i" type veth peer name wan0 netns "$nat"
        ip -n "$NS_PUB" link set "port$i" master br0 up
        ip -n "$nat" addr add "${ROUTER_PUB[$i]}/24" dev wan0
        ip -n "$nat" link set wan0 up
        # private side: router LAN to the phone
        ip -n "$nat" link add lan0 type veth peer name eth0 netns "$phone"
        ip -n "$nat" addr add "${ROUTER_LAN[$i]}/24" dev lan0
        ip -n "$nat" link set lan0 up
        ip -n "$phone" addr add "${PHONE_IP[$i]}/24" dev eth0
        ip -n "$phone" link set eth0 up
        ip -n "$phone" route add default via "${ROUTER_LAN[$i]}"
        ip netns exec "$nat" sysctl -qw net.ipv4.ip_forward=1
        # shellcheck disable=SC2086
        ip netns exec "$nat" iptables -t nat -A POSTROUTING -o wan0 -j MASQUERADE $1
    done
    # The public hosts: straight on the bridge, nothing between them and the server.
    local ns addr n=0
    for ns in "$THIRD_NS" "$CONTACT_NS"; do
        n=$((n + 1))
        if [ "$ns" = "$THIRD_NS" ]; then addr=$THIRD_IP; else addr=$CONTACT_IP; fi
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip -n "$NS_PUB" link add "host$n" type veth peer name eth0 netns "$ns"
        ip -n "$NS_PUB" link set "host$n" master br0 up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
    # The public side cannot reach the private nets: only the routers' mappings lead there.
    for i in 1 2; do
        if ip -n "$NS_PUB" route get "${PHONE_IP[$i]}" >/dev/null 2>&1; then
            die "topology: $NS_PUB has a route to ${PHONE_IP[$i]}"
        fi
    done
    # Links up and the bridge forwarding: each router reaches the server (bounded).
    for i in 1 2; do
        local up=0
        for _ in $(seq 1 50); do
            if ip netns exec "${PHONE_NS[$i]}" python3 - "$SERVER_IP" <<'PY' 2>/dev/null; then up=1; break; fi
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(0.2)
try:
    s.connect((sys.argv[1], 9))  # closed port: RST (refused) proves the path both ways
except ConnectionRefusedError:
    sys.exit(0)
except OSError:
    sys.exit(1)
sys.exit(0)
PY
            sleep 0.1
        done
        [ "$up" = 1 ] || die "topology: ${PHONE_NS[$i]} cannot reach $SERVER_IP through ${ROUTER_NS[$i]}"
    done
}

# ---------------------------------------------------------------------------------------------
# sipedge in se-pub

write_config() {  # $1 = file, $2 = ping_method, $3 = extra [nat] lines
    cat > "$1" <<TOML
[server]
listen = ["udp:$SERVER_IP:$SIP", "tcp:$SERVER_IP:$SIP"]
advertise = "$SERVER_IP"
domains = ["$SERVER_IP"]
[database]
url = "sqlite://$vwork/sipedge.db"
[nat]
ping_interval = $PING_INTERVAL
ping_method = "$2"
$3
[media]
address = "$SERVER_IP"
ports = "$MEDIA_PORTS"
TOML
}

start_server() {  # $1 = config, $2 = log name; RUST_LOG from $SERVER_LOG (default sipedge=debug)
    local log="$vwork/sipedge.$2.log"
    ip netns exec "$NS_PUB" env RUST_LOG="${SERVER_LOG:-sipedge=debug}" "$bin" serve -c "$1" 2>"$log" &
    server_pid=$!
    for _ in $(seq 1 100); do
        if grep -q "sipedge started" "$log" 2>/dev/null; then return 0; fi
        if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    tail -n 20 "$log" >&2
    die "sipedge did not start ($log)"
}
