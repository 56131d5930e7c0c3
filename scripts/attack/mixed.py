"""Attack 9: a mixed run. One source (127.0.0.6) floods OPTIONS and INVITEs (to a user that
does not exist: 404) at up to --rate requests/s for --seconds s from --procs processes (the
real rate is reported: python may not reach the target). Meanwhile another source
(127.0.0.5) registers carol (digest) about once a second and makes calls about twice a second
to the route's callee on 127.0.0.8 (INVITE, 200, ACK, BYE, 200). Defended: 0 failures (every
transaction gets its final within 4 s, retransmitting like an RFC 3261 client); its latencies
are reported. The flood may put the UDP receive loop behind: then a second loop helps, at most
one per socket (the gauge transport_udp_receive_helpers_running, sampled twice a second), and
it ends once the flood is over. The paced flood may not outrun one loop, so a burst of
20,000 OPTIONS sent as fast as one process can follows it: that one does.
"""

import multiprocessing
import re
import socket
import threading
import time
import urllib.request

import sipattack as sa


def flooder(server, rate, seconds, out):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind(("127.0.0.6", 0))
    s.setblocking(False)
    port = s.getsockname()[1]
    us = f"{server[0]}:{server[1]}"
    pool = []
    for i in range(2000):
        if i % 2:
            pool.append(sa.request("OPTIONS", f"sip:{us}", via=("127.0.0.6", port),
                                   from_uri="sip:flood@127.0.0.6", to_uri=f"sip:{us}",
                                   call_id=f"fo{i}-{sa.rand_hex(8)}"))
        else:
            pool.append(sa.request("INVITE", f"sip:nobody{i}@{us}", via=("127.0.0.6", port),
                                   from_uri="sip:flood@127.0.0.6", to_uri=f"sip:nobody{i}@{us}",
                                   call_id=f"fi{i}-{sa.rand_hex(8)}"))
    sent = 0
    limit = int(rate * seconds)
    start = time.monotonic()
    end = start + seconds
    n = len(pool)
    while sent < limit:
        now = time.monotonic()
        if now >= end:
            break
        due = min(limit, int((now - start) * rate) + 1)
        while sent < due:
            try:
                s.sendto(pool[sent % n], server)
            except (BlockingIOError, ConnectionRefusedError):
                pass
            sent += 1
        if sent >= due:
            time.sleep(0.0005)
    out.send((sent, time.monotonic() - start))
    out.close()


def uas_process(server, port, seconds, stop):
    uas = sa.Uas("127.0.0.8", server, port,
                 lambda m: [(200, "OK", sa.sdp("127.0.0.8", [44000]))])
    stop.wait(seconds)
    uas.close()


def burst(server, count):
    """`count` OPTIONS from 127.0.0.6 as fast as this process sends them; returns the seconds."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.6", 0))
    port = s.getsockname()[1]
    us = f"{server[0]}:{server[1]}"
    msg = sa.request("OPTIONS", f"sip:{us}", via=("127.0.0.6", port),
                     from_uri="sip:burst@127.0.0.6", to_uri=f"sip:{us}",
                     call_id=f"burst-{sa.rand_hex(8)}")
    t0 = time.monotonic()
    for _ in range(count):
        try:
            s.sendto(msg, server)
        except OSError:
            pass
    secs = time.monotonic() - t0
    s.close()
    return secs


def metric(control, name):
    """One value of sipedge's /metrics (`sipedge_` prefix), or None when unreadable."""
    try:
        with urllib.request.urlopen(f"http://{control}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(rf"^sipedge_{name}(?:_total)? (\d+)", text, re.M)
    return int(m.group(1)) if m else None


def main():
    ap = sa.common_args(__doc__)
    ap.add_argument("--uas-port", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rate", type=float, default=20000)
    ap.add_argument("--procs", type=int, default=2)
    a = ap.parse_args()
    c = sa.Checks("mixed")
    server = sa.parse_addr(a.server)
    us = f"{server[0]}:{server[1]}"

    uas_stop = multiprocessing.Event()
    uas = multiprocessing.Process(target=uas_process,
                                  args=(server, a.uas_port, a.seconds + 15, uas_stop))
    uas.start()
    pipes = []
    procs = []
    for _ in range(a.procs):
        rx, tx = multiprocessing.Pipe(duplex=False)
        p = multiprocessing.Process(target=flooder, args=(server, a.rate / a.procs, a.seconds, tx))
        p.start()
        pipes.append(rx)
        procs.append(p)
    control = sa.cfg_get(sa.load_config(a.config), "control.listen", "127.0.0.1:8060")
    helpers = []  # samples of the running second receive loops
    sampling = threading.Event()

    def sample():
        while not sampling.wait(0.5):
            v = metric(control, "transport_udp_receive_helpers_running")
            if v is not None:
                helpers.append(v)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(1.0)  # the flood is on

    ua = sa.UA("127.0.0.5", server)
    lat = {"REGISTER": [], "INVITE": [], "BYE": []}
    fails = []
    calls = regs = 0
    end = time.monotonic() + a.seconds - 2
    next_reg = time.monotonic()
    while time.monotonic() < end:
        t0 = time.monotonic()
        if t0 >= next_reg:
            regs += 1
            status, secs, _ = sa.register(ua, "carol", "carol-pw-3", "127.0.0.1")
            if status == 200:
                lat["REGISTER"].append(secs)
            else:
                fails.append(f"REGISTER {status}")
            next_reg = t0 + 1.0
        calls += 1
        cid = f"call{calls}-{sa.rand_hex(8)}@127.0.0.5"
        invite = sa.request("INVITE", f"sip:3000@{us}", via=ua.addr,
                            from_uri="sip:carol@127.0.0.1", to_uri=f"sip:3000@{us}",
                            call_id=cid, contact=f"sip:carol@127.0.0.5:{ua.port}",
                            body=sa.sdp("127.0.0.5", [45000]))
        resp, secs, _ = ua.transact(invite, 4.0)
        if resp is None or resp.status != 200:
            fails.append(f"INVITE {resp.status if resp else 'timeout'}")
        else:
            lat["INVITE"].append(secs)
            ua.send(sa.in_dialog(ua, invite, resp, "ACK", 1))
            t1 = time.monotonic()
            r, _, _ = ua.transact(sa.in_dialog(ua, invite, resp, "BYE", 2), 4.0)
            if r is None or r.status != 200:
                fails.append(f"BYE {r.status if r else 'timeout'}")
            else:
                lat["BYE"].append(time.monotonic() - t1)
        time.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))

    sent = secs = 0.0
    for rx in pipes:
        if rx.poll(a.seconds + 10):
            s, d = rx.recv()
            sent += s
            secs = max(secs, d)
    for p in procs:
        p.join(5)
    uas_stop.set()
    uas.join(5)
    c.note(f"flood from 127.0.0.6: {int(sent)} requests in {secs:.1f} s = {sent / max(secs, 0.001):.0f}/s "
           f"(target {a.rate:.0f}/s, {a.procs} processes)")
    for kind, values in lat.items():
        c.note(f"127.0.0.5 {kind}: {len(values)} ok, latency p50 {sa.pct(values, .5) * 1000:.1f} ms, "
               f"p95 {sa.pct(values, .95) * 1000:.1f} ms, max "
               f"{(max(values) if values else float('nan')) * 1000:.1f} ms")
    c.check("registrations and calls from 127.0.0.5 during the flood: 0 failures",
            not fails and regs > 0 and calls > 0,
            f"{regs} registrations, {calls} calls, {len(fails)} failures "
            f"{', '.join(fails[:6])}{' ...' if len(fails) > 6 else ''}")
    secs = burst(server, 20000)
    c.note(f"burst from 127.0.0.6: 20000 OPTIONS in {secs:.2f} s")
    time.sleep(1.0)
    sampling.set()
    sampler.join(5)
    started = metric(control, "transport_udp_receive_helpers")
    c.check("the burst put the receive loop behind: a second loop helped",
            started is not None and started >= 1,
            f"transport_udp_receive_helpers: {started}")
    c.check("at most one second UDP receive loop at a time (one UDP socket)",
            bool(helpers) and max(helpers) <= 1,
            f"{len(helpers)} samples of transport_udp_receive_helpers_running, max "
            f"{max(helpers) if helpers else 'none read'}; started during the flood: {started}")
    deadline = time.monotonic() + 15
    running = metric(control, "transport_udp_receive_helpers_running")
    while running != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        running = metric(control, "transport_udp_receive_helpers_running")
    c.check("the second receive loop ends after the flood (within 15 s)", running == 0,
            f"running: {running}")
    alive = sa.alive(a.pid)
    c.check("process alive", alive, f"pid {a.pid} {'alive' if alive else 'GONE'}")
    c.done()


if __name__ == "__main__":
    main()
