"""Attack 2: make sipedge relay to an address the attacker chose (an open relay, and with our
client transaction's retransmissions an amplifier).

Every case comes from its own unauthenticated UDP socket (127.0.2.N, so a ban of one case's
source cannot hide another case) and names its own victim listener on 127.0.0.9. Defended:
every victim (and the provider route's next hop, and another client's TCP connection) receives
0 bytes, and the bytes sipedge sends anywhere (victims + attackers) are <= 3x the bytes in.
Cases: (a) in-dialog request through our Route to a foreign Request-URI, (b) with only a
foreign Route, (c) ACK without To tag, (d) forged flow tokens (fc=u~ / fe=t~ into another
client's TCP connection), (e) in-dialog INVITE to the provider route, (f) stray 200 OK,
(g) maddr in the Via.
"""

import select
import socket
import time

import sipattack as sa

WINDOW = 4.0  # seconds listened after the last attack: covers 4 sends of a retransmitted request


def main():
    ap = sa.common_args(__doc__)
    ap.add_argument("--victim-port", type=int, required=True)
    ap.add_argument("--provider-port", type=int, required=True)
    a = ap.parse_args()
    c = sa.Checks("relay")
    server = sa.parse_addr(a.server)
    us = f"{server[0]}:{server[1]}"
    vip = "127.0.0.9"

    victims = {}  # name -> socket

    def victim(name, port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((vip, port))
        victims[name] = s
        return port

    provider = victim("provider", a.provider_port)

    # Another client's TCP connection to sipedge (127.0.0.3), established by an OPTIONS.
    tcp = socket.create_connection(server, timeout=3, source_address=("127.0.0.3", 0))
    tport = tcp.getsockname()[1]
    tcp.sendall(sa.request("OPTIONS", f"sip:{us}", via=("127.0.0.3", tport), transport="TCP",
                           from_uri="sip:tcp-client@127.0.0.3", to_uri=f"sip:{us}",
                           call_id=sa.rand_hex() + "@127.0.0.3"))
    tcp.settimeout(2)
    first = tcp.recv(65535)
    c.check("setup: TCP client answered", first.startswith(b"SIP/2.0 200"),
            first.split(b"\r\n")[0].decode(errors="replace") or "no answer")
    tcp.setblocking(False)

    cases = []  # (label, attacker UA, bytes sent, [victim names], Call-ID)
    n = [0]

    def attacker():
        n[0] += 1
        return sa.UA(f"127.0.2.{n[0]}", server)

    def dialog_request(method, ruri, ua, *, routes=(), to_tag=True, from_user="alice", body=b""):
        cid = sa.rand_hex(20) + "@" + ua.ip
        extra = [f"Route: {r}" for r in routes]
        return sa.request(method, ruri, via=ua.addr, from_uri=f"sip:{from_user}@127.0.0.1",
                          to_uri=ruri.split(";")[0], call_id=cid,
                          to_tag=sa.rand_hex(8) if to_tag else None,
                          contact=f"sip:{from_user}@{ua.ip}:{ua.port}", extra=extra, body=body)

    def attack(label, build, victim_names):
        ua = attacker()
        msg = build(ua)
        ua.send(msg)
        cases.append((label, ua, len(msg), victim_names, sa.Msg(msg).call_id().encode()))

    vp = a.victim_port
    # (a) in-dialog BYE through our Route, Request-URI at the victim.
    v = victim("a", vp)
    attack("(a) BYE with To tag, Route <us;lr>, R-URI at the victim",
           lambda ua: dialog_request("BYE", f"sip:victim@{vip}:{v}", ua, routes=[f"<sip:{us};lr>"]),
           ["a"])
    # (b) in-dialog request with only a foreign Route.
    v = victim("b", vp + 1)
    attack("(b) BYE with To tag, only a foreign Route",
           lambda ua: dialog_request("BYE", f"sip:bob@{us}", ua, routes=[f"<sip:{vip}:{v};lr>"]),
           ["b"])
    # (c) ACK without To tag to a foreign Request-URI; (c2) with only a foreign Route.
    v = victim("c", vp + 2)
    attack("(c) ACK without To tag, R-URI at the victim",
           lambda ua: dialog_request("ACK", f"sip:victim@{vip}:{v}", ua, to_tag=False), ["c"])
    v2 = victim("c2", vp + 3)
    attack("(c2) ACK without To tag, only a foreign Route",
           lambda ua: dialog_request("ACK", f"sip:bob@{us}", ua, to_tag=False,
                                     routes=[f"<sip:{vip}:{v2};lr>"]), ["c2"])
    # (d) forged flow tokens in a Route of ours.
    v = victim("d", vp + 4)
    v2 = victim("d-ruri", vp + 5)
    attack("(d) BYE, Route <us;lr;fc=u~victim;fe=u~victim>",
           lambda ua: dialog_request("BYE", f"sip:bob@{vip}:{v2}", ua, routes=[
               f"<sip:{us};lr;fc=u~{vip}~{v};fe=u~{vip}~{v}>"]), ["d", "d-ruri"])
    v = victim("d2", vp + 6)
    attack("(d2) BYE, Route <us;lr;fc=u~attacker;fe=u~victim>",
           lambda ua: dialog_request("BYE", f"sip:bob@{vip}:{v}", ua, routes=[
               f"<sip:{us};lr;fc=u~{ua.ip}~{ua.port};fe=u~{vip}~{v}>"]), ["d2"])
    v = victim("d3", vp + 7)
    attack("(d3) BYE, Route <us;lr;fc=u~attacker;fe=t~another client's TCP connection>",
           lambda ua: dialog_request("BYE", f"sip:bob@{vip}:{v}", ua, routes=[
               f"<sip:{us};lr;fc=u~{ua.ip}~{ua.port};fe=t~127.0.0.3~{tport}>"]), ["d3", "tcp"])
    # (e) in-dialog INVITEs to a provider number: never to the provider without proxy auth.
    offer = sa.sdp("127.0.2.99", [40000])
    attack("(e1) INVITE with To tag to 15551234567@provider hop, Route <us;lr>",
           lambda ua: dialog_request("INVITE", f"sip:15551234567@{vip}:{provider}", ua,
                                     routes=[f"<sip:{us};lr>"], body=offer), ["provider"])
    attack("(e2) INVITE with To tag to 15551234567@us, Route <us;lr>,<provider hop;lr>",
           lambda ua: dialog_request("INVITE", f"sip:15551234567@{us}", ua, routes=[
               f"<sip:{us};lr>", f"<sip:{vip}:{provider};lr>"], body=offer), ["provider"])
    attack("(e3) INVITE with To tag to 15551234567@us, Route <us;lr>",
           lambda ua: dialog_request("INVITE", f"sip:15551234567@{us}", ua,
                                     routes=[f"<sip:{us};lr>"], body=offer), ["provider"])

    # (f) stray 200 OK whose second Via names the victim.
    def stray(top_via, vport):
        def build(ua):
            cid = sa.rand_hex(20) + "@" + ua.ip
            lines = ["SIP/2.0 200 OK", f"Via: {top_via(ua)}",
                     f"Via: SIP/2.0/UDP {vip}:{vport};branch={sa.branch()};rport",
                     f"From: <sip:alice@127.0.0.1>;tag={sa.rand_hex(8)}",
                     f"To: <sip:bob@127.0.0.1>;tag={sa.rand_hex(8)}", f"Call-ID: {cid}",
                     "CSeq: 1 INVITE", f"Contact: <sip:bob@{vip}:{vport}>", "Content-Length: 0"]
            return ("\r\n".join(lines) + "\r\n\r\n").encode()
        return build

    v = victim("f1", vp + 8)
    attack("(f1) stray 200 OK, top Via not ours, second Via the victim",
           stray(lambda ua: f"SIP/2.0/UDP {ua.ip}:{ua.port};branch={sa.branch()}", v), ["f1"])
    v = victim("f2", vp + 9)
    attack("(f2) stray 200 OK, top Via ours with a forged branch, second Via the victim",
           stray(lambda ua: f"SIP/2.0/UDP {us};branch={sa.branch()}", v), ["f2"])

    # (g) maddr in the top Via names the victim: the response goes to the source (rport).
    def maddr(method, ruri, vport):
        def build(ua):
            msg = sa.request(method, ruri, via=ua.addr, from_uri="sip:alice@127.0.0.1",
                             to_uri=ruri if method == "OPTIONS" else "sip:alice@127.0.0.1",
                             call_id=sa.rand_hex(20) + "@" + ua.ip,
                             contact=f"sip:alice@{ua.ip}:{ua.port}")
            return msg.replace(f"{ua.ip}:{ua.port};branch=".encode(),
                               f"{ua.ip}:{vport};maddr={vip};branch=".encode(), 1)
        return build

    v = victim("g1", vp + 10)
    attack("(g1) OPTIONS whose Via has maddr=victim", maddr("OPTIONS", f"sip:{us}", v), ["g1"])
    v = victim("g2", vp + 11)
    attack("(g2) REGISTER whose Via has maddr=victim", maddr("REGISTER", "sip:127.0.0.1", v),
           ["g2"])

    # Listen on everything for WINDOW seconds; what reaches a victim is attributed to the case
    # whose Call-ID it carries.
    got = []  # (victim name, datagram or TCP chunk)
    back = {id(ua): [] for _l, ua, _b, _v, _c in cases}  # what each attacker got back
    socks = {s.fileno(): ("victim", name, s) for name, s in victims.items()}
    for _l, ua, _b, _v, _c in cases:
        socks[ua.sock.fileno()] = ("attacker", ua, ua.sock)
    socks[tcp.fileno()] = ("victim", "tcp", tcp)
    deadline = time.monotonic() + WINDOW
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select(list(socks), [], [], left)
        for fd in ready:
            kind, key, s = socks[fd]
            try:
                data = s.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            except ConnectionResetError:
                data = b""
            if kind == "attacker":
                back[id(key)].append(data)
            elif data:
                got.append((key, data))
            else:
                del socks[fd]  # sipedge closed our TCP client: not what we measure here

    total_in = 0
    total_out = sum(len(d) for _n, d in got)
    worst = (0.0, "")
    for label, ua, sent, names, cid in cases:
        total_in += sent
        answers = back[id(ua)]
        total_out += sum(len(d) for d in answers)
        caused = sum(len(d) for _n, d in got if cid in d) + sum(len(d) for d in answers)
        worst = max(worst, (caused / sent, label.split(" ")[0]))
        hits = [(n, d) for n, d in got if n in names and cid in d]
        recv = sum(len(d) for _n, d in hits)
        pkts = sum(d.count(cid) for _n, d in hits)
        statuses = ",".join(str(sa.Msg(d).status or sa.Msg(d).method) for d in answers) or "none"
        c.check(label, recv == 0,
                f"victim got {pkts} messages / {recv} B; attacker sent {sent} B, got back "
                f"{len(answers)} ({statuses}, {sum(len(d) for d in answers)} B)")
    to_victims = sum(len(d) for _n, d in got)
    ratio = total_out / total_in if total_in else 0
    c.check("amplification: bytes sent anywhere <= 3x bytes in, in total and for each case",
            ratio <= 3.0 and worst[0] <= 3.0,
            f"{total_out} B out (victims {to_victims} B, attackers {total_out - to_victims} B) "
            f"for {total_in} B in within {WINDOW:.0f} s: {ratio:.2f}x; worst case {worst[1]} "
            f"{worst[0]:.2f}x")
    alive = sa.alive(a.pid)
    c.check("process alive", alive, f"pid {a.pid} {'alive' if alive else 'GONE'}")
    c.done()


if __name__ == "__main__":
    main()
