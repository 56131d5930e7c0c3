"""Attack 7: memory and file descriptors an outsider can make sipedge hold.

  (a) 1,500 REGISTERs of ~57 KB (50 Via headers of 1.1 KB, echoed in every response) in ~5 s
      from 150 source IPs (127.0.4.1-150, 10 each: per-source rate limits alone do not decide
      the outcome): RSS 10 s later <= RSS before the flood + --bound-mb (40);
  (b) the same with 1,500 INVITEs to the provider route (auth: each draws a 407), from
      127.0.5.1-150;
  (e) the same with 1,500 INVITEs to a route without auth (3000) whose next hop (127.0.0.8)
      takes them and never answers, from 127.0.6.1-150;
  (c) 2,000 idle TCP connections from 127.0.0.12: sipedge holds at most
      limits.tcp_connections_per_ip (32 when the config has no such key) of them, its fd count
      stays within idle + that + 16, and a TCP client from 127.0.0.13 is still answered.
  (d) the fd soft limit (1024 when the driver starts sipedge) is raised to the hard limit.
RSS is VmRSS of /proc/PID/status; the peak is sampled every 100 ms.
"""

import errno
import resource
import socket
import threading
import time

import sipattack as sa

COUNT = 1500
SOURCES = 150
FLOOD_SECONDS = 5.0
SETTLE = 10.0
TCP_CONNS = 2000


class Sampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.stop = False

    def run(self):
        while not self.stop:
            try:
                self.peak = max(self.peak, sa.rss_mb(self.pid))
            except OSError:
                return
            time.sleep(0.1)


def padded(method, ruri, ua, *, to_uri, register):
    vias = [f"Via: SIP/2.0/UDP 127.0.0.9:{5000 + i};branch=z9hG4bK{sa.rand_hex(16)}"
            f";x-pad={'p' * 1040}" for i in range(50)]
    aor = to_uri if register else "sip:alice@127.0.0.1"
    return sa.request(method, ruri, via=ua.addr, from_uri=aor, to_uri=to_uri,
                      call_id=sa.rand_hex(24) + "@" + ua.ip, extra=vias,
                      contact=f"sip:alice@{ua.ip}:{ua.port}")


def flood(c, a, server, label, net, build):
    """COUNT requests from SOURCES addresses 127.0.NET.x over FLOOD_SECONDS; then RSS."""
    uas = [sa.UA(f"127.0.{net}.{i + 1}", server, rcvbuf=1 << 16) for i in range(SOURCES)]
    msgs = [build(uas[i % SOURCES]) for i in range(COUNT)]
    size = sum(len(m) for m in msgs) // COUNT
    idle = sa.rss_mb(a.pid)
    samp = Sampler(a.pid)
    samp.start()
    start = time.monotonic()
    for i, m in enumerate(msgs):
        uas[i % SOURCES].send(m)
        time.sleep(max(0.0, start + (i + 1) * FLOOD_SECONDS / COUNT - time.monotonic()))
    secs = time.monotonic() - start
    answers = []  # what came back, as far as 64 KB receive buffers hold it
    for ua in uas:
        answers += ua.drain(0.01)
    time.sleep(SETTLE)
    for ua in uas:
        answers += ua.drain(0.001)
        ua.close()
    statuses = {}
    for data, _src in answers:
        st = sa.Msg(data).status
        statuses[st] = statuses.get(st, 0) + 1
    avg = sum(len(d) for d, _s in answers) // max(1, len(answers))
    samp.stop = True
    samp.join(1)
    after = sa.rss_mb(a.pid)
    c.check(f"({label}) RSS {SETTLE:.0f} s after the flood <= before + {a.bound_mb:.0f} MB",
            after <= idle + a.bound_mb,
            f"{COUNT} x {size} B in {secs:.1f} s from {SOURCES} IPs; responses read {statuses} "
            f"of {avg} B on average; RSS before {idle:.1f} MB, peak {samp.peak:.1f} MB, "
            f"after {after:.1f} MB (+{after - idle:.1f} MB)")
    return idle


def main():
    ap = sa.common_args(__doc__)
    ap.add_argument("--bound-mb", type=float, default=40.0)
    ap.add_argument("--uas-port", type=int, required=True, help="next hop of the 3xxx route")
    a = ap.parse_args()
    c = sa.Checks("memory")
    server = sa.parse_addr(a.server)
    us = f"{server[0]}:{server[1]}"
    cfg = sa.load_config(a.config)
    per_ip = sa.cfg_get(cfg, "limits.tcp_connections_per_ip", 32)

    flood(c, a, server, "a: 1,500 REGISTERs of ~57 KB", 4,
          lambda ua: padded("REGISTER", "sip:127.0.0.1", ua, to_uri="sip:bob@127.0.0.1",
                            register=True))
    flood(c, a, server, "b: 1,500 INVITEs of ~57 KB drawing 407", 5,
          lambda ua: padded("INVITE", f"sip:15551234567@{us}", ua,
                            to_uri=f"sip:15551234567@{us}", register=False))

    # (e) INVITEs to a route without auth whose next hop takes them and never answers: the
    # transactions live until their timers fire.
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sink.bind(("127.0.0.8", a.uas_port))
    flood(c, a, server, "e: 1,500 INVITEs of ~57 KB to a route without auth, never answered", 6,
          lambda ua: padded("INVITE", f"sip:3000@{us}", ua, to_uri=f"sip:3000@{us}",
                            register=False))
    sink.close()

    # The fd soft limit raised to the hard limit at start (the driver starts sipedge with 1024).
    limits = {}
    with open(f"/proc/{a.pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                limits = dict(zip(("soft", "hard"), line.split()[3:5]))
    c.check("fd soft limit raised to the hard limit at start",
            bool(limits) and limits["soft"] == limits["hard"],
            f"Max open files soft {limits.get('soft')}, hard {limits.get('hard')}")

    # (c) 2,000 idle TCP connections from one IP.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = TCP_CONNS + 200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            c.check("(c) 2,000 idle TCP connections", False,
                    f"cannot run: this shell's hard fd limit is {hard} (< {want}); raise it "
                    "(ulimit -Hn) to run the attack")
            c.done()
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    fds_idle = sa.fd_count(a.pid)
    conns = []
    refused = 0
    start = time.monotonic()
    for i in range(TCP_CONNS):
        if time.monotonic() - start > 20:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.12", 0))
        s.setblocking(False)
        err = s.connect_ex(server)
        if err in (0, errno.EINPROGRESS):
            conns.append(s)
        else:
            refused += 1
            s.close()
    opened = time.monotonic() - start
    time.sleep(3.0)
    held = len(sa.tcp_held(a.pid, server[1], "127.0.0.12"))
    fds = sa.fd_count(a.pid)
    closed = 0
    for s in conns:
        try:
            if s.recv(1, socket.MSG_DONTWAIT) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    c.check("(c) 2,000 idle TCP connections from one IP: held <= tcp_connections_per_ip",
            held <= per_ip,
            f"{len(conns)} connects in {opened:.1f} s ({refused} refused at once), sipedge "
            f"holds {held} (limit {per_ip}), {closed} closed by sipedge")
    c.check("(c) fd count bounded", fds <= fds_idle + per_ip + 16,
            f"sipedge fds {fds_idle} idle -> {fds} with the connections open "
            f"(bound {fds_idle + per_ip + 16})")
    # Another IP is still served over TCP while those are open.
    t0 = time.monotonic()
    answer = b""
    try:
        t = socket.create_connection(server, timeout=1.0, source_address=("127.0.0.13", 0))
        t.sendall(sa.request("OPTIONS", f"sip:{us}", via=("127.0.0.13", t.getsockname()[1]),
                             transport="TCP", from_uri="sip:probe@127.0.0.13",
                             to_uri=f"sip:{us}", call_id=sa.rand_hex() + "@127.0.0.13"))
        t.settimeout(max(0.05, 1.0 - (time.monotonic() - t0)))
        answer = t.recv(65535)
        t.close()
    except OSError as e:
        answer = str(e).encode()
    c.check("(c) another IP's TCP OPTIONS answered within 1 s meanwhile",
            answer.startswith(b"SIP/2.0 200"),
            f"{answer.split(chr(13).encode())[0].decode(errors='replace') or 'no answer'} in "
            f"{(time.monotonic() - t0) * 1000:.0f} ms")
    for s in conns:
        s.close()
    alive = sa.alive(a.pid)
    c.check("process alive", alive, f"pid {a.pid} {'alive' if alive else 'GONE'}")
    c.done()


if __name__ == "__main__":
    main()
