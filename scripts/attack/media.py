"""Attack 4: media port exhaustion through a route with media = "always" (unauthenticated).

  (c) one INVITE with 250 m= lines (12 KB): answered 488 (or another final >= 400), or relayed
      with at most media.max_streams streams; relay ports held stay small;
  (d) then an honest caller (127.0.0.5) still gets a relayed call (200 whose SDP names a relay
      port); both calls are ended (CANCEL, BYE) to free the range;
  (a) 2 active + 6 disabled (port 0) streams: the disabled ones take no ports;
  (b) 20 INVITEs of one stream each from one caller IP: at most media.max_sessions_per_caller
      sessions get ports (10 when the config has no such key).
Ports are counted as the UDP sockets sipedge holds in the media range (/proc/PID/fd +
/proc/net/udp), before and 1.5 s after each step. An active stream may take 4 ports (RTP and
RTCP on each side).
"""

import time

import sipattack as sa

PORTS_PER_STREAM = 4
SETTLE = 1.5


def main():
    ap = sa.common_args(__doc__)
    ap.add_argument("--uas-port", type=int, required=True)
    ap.add_argument("--media", required=True, help="the media port range MIN-MAX")
    a = ap.parse_args()
    c = sa.Checks("media")
    server = sa.parse_addr(a.server)
    us = f"{server[0]}:{server[1]}"
    lo, hi = map(int, a.media.split("-"))
    cfg = sa.load_config(a.config)
    max_streams = sa.cfg_get(cfg, "media.max_streams", 8)
    per_caller = sa.cfg_get(cfg, "media.max_sessions_per_caller", 10)
    # The route's callee on 127.0.0.8: 200 with SDP for user 2001 (the honest call), silence
    # (after its 100) for the attacker's calls to 2000.
    uas = sa.Uas("127.0.0.8", server, a.uas_port,
                 lambda m: [(200, "OK", sa.sdp("127.0.0.8", [42000]))]
                 if m.ruri.startswith("sip:2001@") else [])

    def ports():
        return sa.udp_ports_held(a.pid, lo, hi)

    def invite(ua, user, body):
        cid = sa.rand_hex(20) + "@" + ua.ip
        msg = sa.request("INVITE", f"sip:{user}@{us}", via=ua.addr,
                         from_uri=f"sip:caller@{ua.ip}", to_uri=f"sip:{user}@{us}",
                         call_id=cid, contact=f"sip:caller@{ua.ip}:{ua.port}", body=body)
        ua.send(msg)
        return sa.Msg(msg), len(msg)

    def finals(ua, seconds):
        return [sa.Msg(d).status for d, _ in ua.drain(seconds) if (sa.Msg(d).status or 0) >= 200]

    idle = ports()
    c.note(f"relay ports held at idle: {idle} (range {lo}-{hi}, {hi - lo + 1} ports); "
           f"media.max_streams {max_streams}, media.max_sessions_per_caller {per_caller}")

    # (c) 250 m= lines, on a free range.
    ua = sa.UA("127.0.3.3", server)
    before = ports()
    body = sa.sdp("127.0.3.3", [40000 + 2 * i for i in range(250)])
    big, size = invite(ua, 2000, body)
    fin = finals(ua, SETTLE)
    taken = ports() - before
    fwd = uas.invites.get(big.call_id())
    fwd = fwd.sdp_media() if fwd is not None else None
    if fwd is None:
        relayed = "not forwarded"
        streams_ok = True
    else:
        active = [p for p in fwd[1] if p]
        outside = [p for p in active if not lo <= p <= hi]
        streams_ok = len(active) <= max_streams and not outside
        relayed = (f"forwarded with {len(fwd[1])} m= lines, {len(active)} active, "
                   f"{len(outside)} not on a relay port")
    refused = any(s >= 400 for s in fin)
    c.check("(c) INVITE with 250 m= lines: refused (488) or at most max_streams relayed",
            (refused or fwd is not None) and streams_ok,
            f"{size} B INVITE; caller got {fin or 'no final'}; {relayed}")
    c.check("(c) INVITE with 250 m= lines: relay ports held stay small",
            taken <= max_streams * PORTS_PER_STREAM,
            f"{taken} ports taken of {hi - lo + 1} (bound {max_streams * PORTS_PER_STREAM} = "
            f"{max_streams} streams x {PORTS_PER_STREAM})")

    # (d) an honest caller still gets relay ports.
    hon = sa.UA("127.0.0.5", server)
    cid = sa.rand_hex(20) + "@127.0.0.5"
    msg = sa.request("INVITE", f"sip:2001@{us}", via=hon.addr, from_uri="sip:alice@127.0.0.1",
                     to_uri=f"sip:2001@{us}", call_id=cid, from_tag="honest",
                     contact=f"sip:alice@127.0.0.5:{hon.port}", body=sa.sdp("127.0.0.5", [41000]))
    resp, secs, _ = hon.transact(msg, 4.0)
    if resp is not None and resp.status == 200:
        addr, mports = resp.sdp_media()
        ok = bool(mports) and lo <= mports[0] <= hi
        detail = f"200 in {secs * 1000:.0f} ms, SDP {addr}:{mports[0] if mports else '-'}"
    else:
        ok = False
        detail = f"got {resp.status if resp else 'no final'} in {secs:.1f} s"
    c.check("(d) an honest call still gets a relay port after (c)", ok,
            f"{detail}; relay ports held {ports()} of {hi - lo + 1}")
    # End both calls (CANCEL the big offer, ACK + BYE the honest one) to free the range.
    ua.send(sa.request("CANCEL", big.ruri, via=ua.addr, branch_id=big.top_branch(),
                       from_uri=f"sip:caller@{ua.ip}", from_tag=sa.tag_of(big.get("from")),
                       to_uri=big.ruri, call_id=big.call_id(), cseq=1))
    if resp is not None and resp.status == 200:
        sa.end_call(hon, msg, resp)
    time.sleep(SETTLE)
    c.note(f"after CANCEL and BYE: relay ports held {ports()}")

    # (a) disabled streams take no ports.
    ua = sa.UA("127.0.3.1", server)
    before = ports()
    invite(ua, 2000, sa.sdp("127.0.3.1", [40000, 0, 0, 40002, 0, 0, 0, 0]))
    fin = finals(ua, SETTLE)
    taken = ports() - before
    c.check("(a) 2 active + 6 port-0 streams: disabled streams take no ports",
            taken <= 2 * PORTS_PER_STREAM,
            f"{taken} ports taken (bound {2 * PORTS_PER_STREAM}); caller got {fin or 'no final'}")

    # (b) sessions per caller IP.
    ua = sa.UA("127.0.3.2", server)
    before = ports()
    for i in range(20):
        invite(ua, 2000, sa.sdp("127.0.3.2", [40000 + 2 * i]))
    fin = finals(ua, SETTLE)
    taken = ports() - before
    bound = per_caller * PORTS_PER_STREAM
    c.check("(b) 20 one-stream INVITEs from one caller IP: sessions per caller bounded",
            taken <= bound,
            f"{taken} ports taken (bound {bound} = {per_caller} sessions x {PORTS_PER_STREAM}); "
            f"finals to the caller: {dict((s, fin.count(s)) for s in set(fin)) or 'none'}")
    uas.close()
    alive = sa.alive(a.pid)
    c.check("process alive", alive, f"pid {a.pid} {'alive' if alive else 'GONE'}")
    c.done()


if __name__ == "__main__":
    main()
