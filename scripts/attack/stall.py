"""Attack 3: one TCP peer that never reads, with a full send queue, must not stall anyone else.

127.0.0.3 opens a TCP connection with a small receive buffer, pipelines 5,000 OPTIONS and
5,000 REGISTERs (each drawing a response it never reads) for at most 10 s. Meanwhile another
client (127.0.0.5, UDP) sends an OPTIONS and a digest REGISTER every 500 ms; 2 s into the
flood, 127.0.0.2 sends 8 stray UDP 200s whose second Via names the non-reading connection. Defended: every
one of its requests is answered within 1 s, and sipedge closes the non-reading connection
(write timeout or queue full) within limits.tcp_write_timeout + 10 s.
"""

import multiprocessing
import socket
import time

import sipattack as sa

FLOOD_OPTIONS = 5000
FLOOD_REGISTERS = 5000
FLOOD_SECONDS = 10.0
AFTER_SECONDS = 5.0  # the honest client keeps going this long after the flood


def honest(server, stop_at, out):
    """OPTIONS + digest REGISTER (two transactions) every 500 ms until stop_at; sends the
    latencies (None = no answer within 2 s) through `out`."""
    ua = sa.UA("127.0.0.5", server)
    lat = {"OPTIONS": [], "REGISTER 401": [], "REGISTER 200": []}
    statuses = []
    n = 0
    us = f"{server[0]}:{server[1]}"
    while time.monotonic() < stop_at:
        n += 1
        t0 = time.monotonic()
        msg = sa.request("OPTIONS", f"sip:{us}", via=ua.addr, from_uri="sip:carol@127.0.0.1",
                         to_uri=f"sip:{us}", call_id=f"opt{n}-{sa.rand_hex()}@127.0.0.5")
        r, secs, _ = ua.transact(msg, 2.0)
        lat["OPTIONS"].append(secs if r is not None else None)
        if r is not None and r.status != 200:
            statuses.append(f"OPTIONS {r.status}")
        cid = f"reg{n}-{sa.rand_hex()}@127.0.0.5"
        aor = "sip:carol@127.0.0.1"

        def reg(cseq, extra=()):
            return sa.request("REGISTER", "sip:127.0.0.1", via=ua.addr, from_uri=aor, to_uri=aor,
                              from_tag="ft" + str(n), call_id=cid, cseq=cseq,
                              contact=f"sip:carol@127.0.0.5:{ua.port}",
                              extra=["Expires: 60", *extra])
        r, secs, _ = ua.transact(reg(1), 2.0)
        lat["REGISTER 401"].append(secs if r is not None else None)
        if r is not None and r.status == 401:
            chal = sa.parse_challenge(r.get("www-authenticate", ""))
            auth = sa.digest_header(chal, "carol", "carol-pw-3", "REGISTER", "sip:127.0.0.1")
            r, secs, _ = ua.transact(reg(2, [f"Authorization: {auth}"]), 2.0)
            lat["REGISTER 200"].append(secs if r is not None and r.status == 200 else None)
            if r is not None and r.status != 200:
                statuses.append(f"REGISTER {r.status}")
        else:
            lat["REGISTER 200"].append(None)
            if r is not None:
                statuses.append(f"REGISTER {r.status}")
        time.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))
    out.send((lat, statuses))
    out.close()


def main():
    ap = sa.common_args(__doc__)
    a = ap.parse_args()
    c = sa.Checks("stall")
    server = sa.parse_addr(a.server)
    cfg = sa.load_config(a.config)
    write_timeout = sa.cfg_get(cfg, "limits.tcp_write_timeout", None)
    us = f"{server[0]}:{server[1]}"

    # The non-reading peer.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind(("127.0.0.3", 0))
    s.settimeout(3)
    s.connect(server)
    cport = s.getsockname()[1]
    s.setblocking(False)
    msgs = []
    for i in range(FLOOD_OPTIONS):
        msgs.append(sa.request("OPTIONS", f"sip:{us}", via=("127.0.0.3", cport), transport="TCP",
                               from_uri="sip:stall@127.0.0.3", to_uri=f"sip:{us}",
                               call_id=f"stall-o{i}@127.0.0.3"))
    for i in range(FLOOD_REGISTERS):
        aor = "sip:dave@127.0.0.1"
        msgs.append(sa.request("REGISTER", "sip:127.0.0.1", via=("127.0.0.3", cport),
                               transport="TCP", from_uri=aor, to_uri=aor,
                               call_id=f"stall-r{i}@127.0.0.3",
                               contact=f"sip:dave@127.0.0.3:{cport};transport=tcp"))
    data = b"".join(msgs)

    rx, tx = multiprocessing.Pipe(duplex=False)
    stop_at = time.monotonic() + FLOOD_SECONDS + AFTER_SECONDS
    child = multiprocessing.Process(target=honest, args=(server, stop_at, tx))
    child.start()
    time.sleep(0.3)

    sent = 0
    closed = False
    t0 = time.monotonic()
    view = memoryview(data)
    while sent < len(data) and time.monotonic() - t0 < FLOOD_SECONDS:
        try:
            sent += s.send(view[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.005)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
    flood_secs = time.monotonic() - t0
    # Requests fully sent (the rest was cut by a full window or a close).
    fully = data[:sent].count(b"\r\n\r\n")
    c.note(f"non-reading peer 127.0.0.3:{cport} sent {sent} B ({fully} of {len(msgs)} requests) "
           f"in {flood_secs:.1f} s" + (", then sipedge closed it" if closed else ""))

    # Stray 200s whose second Via names the non-reading connection: a UDP loop that forwards
    # them must not wait on that connection's queue (8 sources: every UDP worker gets some).
    # Sent once sipedge has had 2 s to fill that queue.
    time.sleep(max(0.0, t0 + 2.0 - time.monotonic()))
    strays = []
    for i in range(8):
        ua = sa.UA("127.0.0.2", server)
        lines = ["SIP/2.0 200 OK", f"Via: SIP/2.0/UDP 127.0.0.2:{ua.port};branch={sa.branch()}",
                 f"Via: SIP/2.0/TCP 127.0.0.3:{cport};branch={sa.branch()}",
                 f"From: <sip:dave@127.0.0.1>;tag={sa.rand_hex(8)}",
                 f"To: <sip:dave@127.0.0.1>;tag={sa.rand_hex(8)}",
                 f"Call-ID: stray{i}@127.0.0.2", "CSeq: 1 INVITE", "Content-Length: 0"]
        ua.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        strays.append(ua)
    c.note("sent 8 stray UDP 200s whose second Via names the non-reading connection")

    got = rx.poll(FLOOD_SECONDS + AFTER_SECONDS + 30)
    lat, statuses = rx.recv() if got else ({}, ["honest client gave no result"])
    child.join(5)
    for kind, values in lat.items():
        answered = [v for v in values if v is not None]
        slow = [v for v in answered if v > 1.0]
        missing = len(values) - len(answered)
        c.check(f"other client's {kind} over UDP within 1 s during the stall",
                bool(values) and not slow and missing == 0,
                f"{len(values)} sent, {missing} unanswered or failed, {len(slow)} over 1 s; latency "
                f"p50 {sa.pct(answered, .5) * 1000:.1f} ms, max "
                f"{(max(answered) if answered else float('nan')) * 1000:.1f} ms")
    c.check("other client's answers are the right ones", not statuses,
            ", ".join(statuses[:5]) or "OPTIONS 200, REGISTER 401 then 200")

    # sipedge closes the non-reading connection.
    bound = (write_timeout if write_timeout is not None else 10) + 10
    start = time.monotonic()
    held = True
    while time.monotonic() - start < bound:
        held = bool(sa.tcp_held(a.pid, server[1], "127.0.0.3"))
        if not held:
            break
        time.sleep(0.2)
    c.check("the non-reading connection is closed by sipedge", not held,
            f"{'closed' if not held else 'still held'} {time.monotonic() - start:.1f} s after the "
            f"flood (limits.tcp_write_timeout {write_timeout if write_timeout is not None else 'unset'}, "
            f"bound {bound} s)")
    s.close()
    alive = sa.alive(a.pid)
    c.check("process alive", alive, f"pid {a.pid} {'alive' if alive else 'GONE'}")
    c.done()


if __name__ == "__main__":
    main()
