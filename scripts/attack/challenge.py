"""Attack 6: amplification through challenges (the source address of a UDP request can be
spoofed, so what we send back is aimed at a victim).

200 small INVITEs to the provider route (auth = true), each with its own Call-ID and branch,
from one UDP socket on 127.0.0.10 at ~100/s, never ACKing; then 4 s of listening (a 407 sent
in a server transaction would be retransmitted at 0.5, 1.5 and 3.5 s). Defended: at most one
407 per INVITE (a challenge is one datagram, no retransmission; rate limiting may drop some),
bytes out <= 3x bytes in, and nothing reaches the provider's next hop.
"""

import socket
import time

import sipattack as sa

COUNT = 200
WINDOW = 4.0


def main():
    ap = sa.common_args(__doc__)
    ap.add_argument("--provider-port", type=int, required=True)
    a = ap.parse_args()
    c = sa.Checks("challenge")
    server = sa.parse_addr(a.server)
    us = f"{server[0]}:{server[1]}"
    provider = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    provider.bind(("127.0.0.9", a.provider_port))
    provider.setblocking(False)

    ua = sa.UA("127.0.0.10", server)
    ua.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    bytes_in = 0
    start = time.monotonic()
    for i in range(COUNT):
        msg = sa.request("INVITE", f"sip:15551234567@{us}", via=ua.addr,
                         from_uri="sip:alice@127.0.0.1", to_uri=f"sip:15551234567@{us}",
                         call_id=f"amp{i}-{sa.rand_hex(8)}")
        bytes_in += ua.send(msg)
        time.sleep(max(0.0, start + (i + 1) * 0.01 - time.monotonic()))
    got = ua.drain(WINDOW)
    per_call = {}
    statuses = {}
    bytes_out = 0
    for data, _src in got:
        m = sa.Msg(data)
        bytes_out += len(data)
        statuses[m.status] = statuses.get(m.status, 0) + 1
        per_call.setdefault(m.call_id(), []).append(m.status)
    to_provider = 0
    while True:
        try:
            to_provider += len(provider.recv(65535))
        except (BlockingIOError, ConnectionRefusedError):
            break
    challenged = sum(1 for v in per_call.values() if 407 in v)
    most = max((v.count(407) for v in per_call.values()), default=0)
    c.check("one 407 per INVITE, no retransmission", most <= 1 and challenged > 0,
            f"{COUNT} INVITEs, {challenged} answered 407, at most {most} 407s for one INVITE; "
            f"responses by status {statuses}")
    ratio = bytes_out / bytes_in
    c.check("bytes out <= 3x bytes in", ratio <= 3.0,
            f"{bytes_out} B out for {bytes_in} B in within {WINDOW:.0f} s of the last INVITE: "
            f"{ratio:.2f}x")
    c.check("nothing reaches the provider route without proxy auth", to_provider == 0,
            f"provider's next hop got {to_provider} B")
    alive = sa.alive(a.pid)
    c.check("process alive", alive, f"pid {a.pid} {'alive' if alive else 'GONE'}")
    c.done()


if __name__ == "__main__":
    main()
