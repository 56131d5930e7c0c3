#!/usr/bin/env python3
"""Checks one relayed call of the NAT media step of scripts/nat-test.sh and prints one line
per check, "ok ..." or "FAIL ...", then a line "numbers ..." with the figures.

Usage: media_check.py --caller JSON --callee JSON --log SIPEDGE_LOG --db SQLITE \
           --relay-ip IP --ports LO-HI --caller-router IP --callee-router IP [--tol 0.01]

JSON are the --out files of rtp_phone.py (caller and callee). Checked:
  sdp      each phone got c=RELAY-IP and a relay port from media.ports in the SDP it received
           (the ports facing caller and callee differ);
  audio    each phone sent the whole pcap and received the other's packets FROM exactly
           RELAY-IP:<the port in its SDP> (they can only get there through the phone's NAT
           mapping), and nothing from elsewhere: all the other sent (-tol), except those sent
           before this phone's own first packet (the relay had only its private SDP address);
  stats    one `media session closed` line for the Call-ID: reason=bye, caller_pkts and
           callee_pkts within ±tol of what caller and callee sent;
  cdr      one cdr row for the Call-ID with reason bye and the stats line's counts;
  latch    if the relay's debug `latched` lines are in the log: the relay ports facing caller
           and callee latched to the caller's and the callee's router (public address).
"""
import argparse
import json
import re
import sqlite3
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caller", required=True)
    ap.add_argument("--callee", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--relay-ip", required=True)
    ap.add_argument("--ports", required=True)
    ap.add_argument("--caller-router", required=True)
    ap.add_argument("--callee-router", required=True)
    ap.add_argument("--tol", type=float, default=0.01)
    a = ap.parse_args()
    lo, hi = (int(x) for x in a.ports.split("-"))
    failed = False

    def ok(msg):
        print("ok " + msg)

    def fail(msg):
        nonlocal failed
        failed = True
        print("FAIL " + msg)

    def load(path, role):
        try:
            return json.load(open(path))
        except (OSError, ValueError) as e:
            fail(f"{role}'s RTP endpoint left no result ({e})")
            return None

    er, ee = load(a.caller, "caller"), load(a.callee, "callee")
    if er is None or ee is None:
        return 1
    if not er.get("to") or not ee.get("to"):
        fail(f"a phone never learned where to send (caller to={er.get('to')}, callee to={ee.get('to')}):"
             " its SIPp did not get past the SDP checks")
        return 1
    call_id = er["call_id"]
    if ee["call_id"] != call_id:
        fail(f"caller and callee saw different Call-IDs: {call_id} / {ee['call_id']}")

    # sdp: the relay's address and two relay ports
    def relay_port(e):
        ip, port = e["to"].rsplit(":", 1)
        return ip, int(port)
    (ip_r, p_r), (ip_e, p_e) = relay_port(er), relay_port(ee)
    if ip_r == ip_e == a.relay_ip and lo <= p_r <= hi and lo <= p_e <= hi and p_r != p_e \
            and p_r % 2 == 0 and p_e % 2 == 0:
        ok(f"SDP: the caller's 200 says c={ip_r} m=audio {p_r}, the callee's INVITE c={ip_e} m=audio {p_e}"
           f" (relay ports from {a.ports}, not the peer's private {ee['bind']} / {er['bind']})")
    else:
        fail(f"SDP: caller got {er['to']}, callee got {ee['to']}; expected {a.relay_ip}, two different"
             f" even ports in {a.ports}")

    # audio: received from exactly the relay port in the phone's SDP
    # Until a phone's first packet reaches the relay, the relay sends the other side's packets
    # to the private address of its SDP (README, "Forwarding"): they cannot arrive. `early`
    # counts them (the peer's packets sent before this phone's first); the rest must arrive.
    for me, peer, who, src in ((er, ee, "caller", er["to"]), (ee, er, "callee", ee["to"])):
        got, peer_sent = me["recv_from_to"], peer["sent"]
        start = me["sent_at"][0] if me["sent_at"] else float("inf")
        early = sum(1 for t in peer["sent_at"] if t < start)
        others = {k: v for k, v in me["recv"].items() if k != src}
        if me["sent"] != me["frames"]:
            fail(f"{who} sent {me['sent']} of the pcap's {me['frames']} RTP packets")
        need = (peer_sent - early) - peer_sent * a.tol
        if got > 0 and got >= need and got <= peer_sent and early <= peer_sent * 0.1 and not others:
            ok(f"audio to the {who}: {got} of the {peer_sent} packets the other phone sent arrived"
               f" at {me['bind']} from {src}, first after {me['first_recv_ms']} ms ({early} sent"
               f" before the {who}'s first packet, when the relay only knew its private address)")
        else:
            fail(f"audio to the {who}: {got} packets from {src} at {me['bind']}; the other phone sent"
                 f" {peer_sent}, {early} of them before the {who}'s first packet (need >= {need:.1f},"
                 f" at most 10 % early); other sources: {others or 'none'}")
        me["early"] = early

    # stats line
    lines = []
    latched = []
    for raw in open(a.log, errors="replace"):
        line = ANSI.sub("", raw)
        if "media session closed" in line and f"call_id={call_id} " in line + " ":
            lines.append(line.strip())
        if " latched" in line:
            latched.append(line.strip())
    stats = {}
    if len(lines) != 1:
        fail(f"{len(lines)} `media session closed` lines for call_id={call_id}, expected 1")
        for l in lines:
            print("  " + l[:300])
    if lines:
        stats = {k: v.strip('"') for k, v in re.findall(r"(\w+)=(\S+)", lines[-1])}
        try:
            cp, ep = int(stats["caller_pkts"]), int(stats["callee_pkts"])
        except (KeyError, ValueError):
            fail(f"stats line without caller_pkts/callee_pkts: {lines[-1][:300]}")
            cp = ep = -1
        good = stats.get("reason") == "bye" and ep > 0 and cp > 0 \
            and abs(cp - er["sent"]) <= er["sent"] * a.tol and abs(ep - ee["sent"]) <= ee["sent"] * a.tol
        msg = (f"stats line: reason={stats.get('reason')} caller_pkts={cp} (caller sent {er['sent']})"
               f" callee_pkts={ep} (callee sent {ee['sent']}) caller_lost={stats.get('caller_lost')}"
               f" callee_lost={stats.get('callee_lost')} duration_ms={stats.get('duration_ms')}")
        (ok if good else fail)(msg + ("" if good else f" — expected reason=bye, both within ±{a.tol:.0%}"))

    # cdr row
    try:
        db = sqlite3.connect(f"file:{a.db}?mode=ro", uri=True, timeout=5)
        rows = db.execute("SELECT reason, status, caller_pkts, callee_pkts, caller_bytes, callee_bytes"
                          " FROM cdr WHERE call_id = ?", (call_id,)).fetchall()
    except sqlite3.Error as e:
        rows = None
        fail(f"cdr: store not readable ({e})")
    if rows is not None:
        if len(rows) == 1 and rows[0][0] == "bye" and stats \
                and str(rows[0][2]) == stats.get("caller_pkts") and str(rows[0][3]) == stats.get("callee_pkts") \
                and str(rows[0][4]) == stats.get("caller_bytes") and str(rows[0][5]) == stats.get("callee_bytes"):
            ok(f"cdr: reason={rows[0][0]} status={rows[0][1]} caller_pkts={rows[0][2]} callee_pkts={rows[0][3]}"
               " (= the stats line)")
        else:
            fail(f"cdr rows for {call_id}: {rows} (reason, status, caller_pkts, callee_pkts, caller_bytes,"
                 f" callee_bytes); expected one, reason bye, the stats line's counts")

    # latch (debug lines of the relay, when enabled): the last RTP latch of each relay port
    latch = {}
    for l in latched:
        f = {k: v.strip('"') for k, v in re.findall(r"([\w.]+)=(\S+)", l)}
        if f.get("rtcp") == "false" and f.get("local.port", "").isdigit():
            latch[int(f["local.port"])] = f.get("peer.addr")
    lr, le = latch.get(p_r), latch.get(p_e)
    if latched:
        if lr and le and lr.rsplit(":", 1)[0] == a.caller_router and le.rsplit(":", 1)[0] == a.callee_router:
            ok(f"latch: relay port {p_r} latched to the caller's router {lr}, port {p_e} to the callee's"
               f" router {le} (the phones wrote {er['bind']} / {ee['bind']})")
        else:
            fail(f"latch: relay port {p_r} -> {lr}, {p_e} -> {le}; expected {a.caller_router}:*"
                 f" and {a.callee_router}:*")

    print("numbers " + " ".join([
        f"call_id={call_id}",
        f"caller_sent={er['sent']}", f"callee_received={ee['recv_from_to']}",
        f"callee_sent={ee['sent']}", f"caller_received={er['recv_from_to']}",
        f"callee_pkts_before_caller_started={er.get('early')}", f"caller_pkts_before_callee_started={ee.get('early')}",
        f"stats_caller_pkts={stats.get('caller_pkts')}", f"stats_callee_pkts={stats.get('callee_pkts')}",
        f"relay_port_caller={p_r}", f"relay_port_callee={p_e}",
        f"caller_mapped={lr}", f"callee_mapped={le}",
    ]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
