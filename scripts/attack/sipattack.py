"""Shared code of the attack suite (scripts/attack-test.sh): SIP messages, a UDP user agent
with RFC 3261 retransmissions and digest authentication, the checks' PASS/FAIL lines, and what
/proc tells about the sipedge process (RSS, file descriptors, sockets it holds).

python3's standard library only. Every wait here is bounded by an explicit deadline.
"""

import argparse
import hashlib
import os
import random
import socket
import sys
import threading
import time
import tomllib

T1 = 0.5

COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact",
           "l": "content-length", "c": "content-type", "k": "supported", "s": "subject"}


# ---------------------------------------------------------------------------------------------
# Results

class Checks:
    """Prints one `PASS|FAIL group: name: detail` line per check and remembers failures."""

    def __init__(self, group):
        self.group = group
        self.failed = 0
        self.passed = 0

    def check(self, name, ok, detail):
        word = "PASS" if ok else "FAIL"
        print(f"{word}  {self.group}: {name}: {detail}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        return ok

    def note(self, text):
        print(f"      {self.group}: {text}", flush=True)

    def done(self):
        sys.exit(1 if self.failed or not self.passed else 0)


def common_args(description):
    """The arguments every attack script takes from the driver."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--server", required=True, help="sipedge's SIP address, IP:PORT (UDP and TCP)")
    ap.add_argument("--pid", type=int, required=True, help="sipedge's process id")
    ap.add_argument("--config", required=True, help="the config file sipedge runs with")
    ap.add_argument("--log", required=True, help="sipedge's log file")
    return ap


def parse_addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def load_config(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


def cfg_get(cfg, dotted, default):
    """A key of the config sipedge runs with, or the default the issue states for it."""
    cur = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


# ---------------------------------------------------------------------------------------------
# SIP messages

def rand_hex(n=16):
    return "%0*x" % (n, random.getrandbits(4 * n))


def branch():
    return "z9hG4bK" + rand_hex(16)


def request(method, ruri, *, via, from_uri, to_uri, call_id, cseq=1, from_tag=None,
            to_tag=None, transport="UDP", branch_id=None, extra=(), body=b"",
            content_type="application/sdp", max_forwards=70, contact=None, cseq_method=None):
    """One SIP request as bytes. `via` is (host, port) of the top Via (the sender)."""
    body = body.encode() if isinstance(body, str) else body
    lines = [f"{method} {ruri} SIP/2.0",
             f"Via: SIP/2.0/{transport} {via[0]}:{via[1]};branch={branch_id or branch()};rport",
             f"Max-Forwards: {max_forwards}",
             f"From: <{from_uri}>;tag={from_tag or rand_hex(8)}",
             f"To: <{to_uri}>" + (f";tag={to_tag}" if to_tag else ""),
             f"Call-ID: {call_id}",
             f"CSeq: {cseq} {cseq_method or method}"]
    if contact:
        lines.append(f"Contact: <{contact}>")
    lines.extend(extra)
    if body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def response_to(req, status, reason, *, to_tag=None, extra=(), body=b"",
                content_type="application/sdp"):
    """A response to the parsed request `req` (a Msg), as a UAS writes it."""
    body = body.encode() if isinstance(body, str) else body
    lines = [f"SIP/2.0 {status} {reason}"]
    for name, value in req.headers:
        if name in ("via", "record-route", "from", "call-id", "cseq"):
            lines.append(f"{name.title()}: {value}")
        elif name == "to":
            if to_tag and ";tag=" not in value:
                value += f";tag={to_tag}"
            lines.append(f"To: {value}")
    lines.extend(extra)
    if body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def sdp(ip, ports, session="attack"):
    """An SDP offer/answer with one PCMU audio stream per port (port 0 = disabled stream)."""
    out = ["v=0", f"o=- {random.randint(1, 1 << 30)} 1 IN IP4 {ip}", f"s={session}",
           f"c=IN IP4 {ip}", "t=0 0"]
    for p in ports:
        out += [f"m=audio {p} RTP/AVP 0", "a=rtpmap:0 PCMU/8000"]
    return "\r\n".join(out) + "\r\n"


class Msg:
    """A received SIP message: start line, headers (lower-case full names, in order), body."""

    def __init__(self, data):
        self.raw = data
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("utf-8", "replace").split("\r\n")
        self.first = lines[0]
        self.headers = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and self.headers:
                n, v = self.headers[-1]
                self.headers[-1] = (n, v + " " + line.strip())
                continue
            name, _, value = line.partition(":")
            name = name.strip().lower()
            self.headers.append((COMPACT.get(name, name), value.strip()))
        parts = self.first.split(" ", 2)
        self.status = int(parts[1]) if parts[0] == "SIP/2.0" and len(parts) > 1 and parts[1].isdigit() else None
        self.method = None if self.status is not None else parts[0]
        self.ruri = parts[1] if self.status is None and len(parts) > 1 else None

    def get(self, name, default=None):
        for n, v in self.headers:
            if n == name:
                return v
        return default

    def all(self, name):
        return [v for n, v in self.headers if n == name]

    def call_id(self):
        return self.get("call-id", "")

    def cseq(self):
        num, _, method = self.get("cseq", "0 X").partition(" ")
        return int(num) if num.isdigit() else 0, method.strip()

    def to_tag(self):
        return tag_of(self.get("to", ""))

    def route_set(self):
        """The Record-Route values in order, each one Route value."""
        out = []
        for v in self.all("record-route"):
            out.extend(x.strip() for x in split_commas(v))
        return out

    def top_branch(self):
        for p in self.get("via", "").split(";")[1:]:
            k, _, v = p.strip().partition("=")
            if k.lower() == "branch":
                return v
        return None

    def contact_uri(self):
        c = self.get("contact", "")
        if "<" in c:
            return c[c.index("<") + 1:c.index(">")]
        return c.split(";")[0].strip()

    def sdp_media(self):
        """(connection address, [m= ports]) of the body."""
        text = self.body.decode("utf-8", "replace")
        addr, ports = None, []
        for line in text.splitlines():
            if line.startswith("c=IN IP4 ") and addr is None:
                addr = line.split()[2]
            elif line.startswith("m="):
                f = line[2:].split()
                ports.append(int(f[1].split("/")[0]))
        return addr, ports


def tag_of(value):
    for p in value.split(";")[1:]:
        k, _, v = p.strip().partition("=")
        if k.lower() == "tag":
            return v
    return None


def split_commas(value):
    out, depth, cur, quoted = [], 0, "", False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif ch == "<" and not quoted:
            depth += 1
        elif ch == ">" and not quoted:
            depth -= 1
        if ch == "," and depth == 0 and not quoted:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


# ---------------------------------------------------------------------------------------------
# Digest (RFC 2617 / 7616), computed here

def parse_challenge(value):
    scheme, _, rest = value.partition(" ")
    params = {}
    for part in split_commas(rest):
        k, _, v = part.strip().partition("=")
        params[k.strip().lower()] = v.strip().strip('"')
    params["scheme"] = scheme
    return params


def digest_header(chal, user, password, method, uri, *, realm=None, algorithm=None, nc=1,
                  cnonce=None, ha1_user=None):
    """The Authorization/Proxy-Authorization value answering `chal` (a parse_challenge dict)."""
    algorithm = algorithm or chal.get("algorithm", "MD5")
    h = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}[algorithm.upper()]
    realm = chal.get("realm", "") if realm is None else realm

    def H(s):
        return h(s.encode()).hexdigest()

    ha1 = H(f"{ha1_user or user}:{realm}:{password}")
    ha2 = H(f"{method}:{uri}")
    nonce = chal["nonce"]
    qops = [q.strip() for q in chal.get("qop", "").split(",") if q.strip()]
    parts = [f'username="{user}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"']
    if "auth" in qops:
        cnonce = cnonce or rand_hex(16)
        ncs = "%08x" % nc
        resp = H(f"{ha1}:{nonce}:{ncs}:{cnonce}:auth:{ha2}")
        parts += ["qop=auth", f"nc={ncs}", f'cnonce="{cnonce}"']
    else:
        resp = H(f"{ha1}:{nonce}:{ha2}")
    parts.append(f'response="{resp}"')
    parts.append(f"algorithm={algorithm}")
    if "opaque" in chal:
        parts.append(f'opaque="{chal["opaque"]}"')
    return "Digest " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# A UDP user agent

class UA:
    """A UDP socket on a loopback address that sends requests to sipedge and waits for their
    final responses, retransmitting like an RFC 3261 client transaction (T1 doubling)."""

    def __init__(self, ip, server, port=0, rcvbuf=None):
        self.ip = ip
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((ip, port))
        self.port = self.sock.getsockname()[1]
        self.addr = (ip, self.port)
        self.stash = []  # requests and unmatched responses received while waiting
        self.bytes_in = 0
        self.packets_in = 0

    def close(self):
        self.sock.close()

    def send(self, data, dest=None):
        self.sock.sendto(data, dest or self.server)
        return len(data)

    def recv(self, deadline):
        """One datagram or None at the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None, None
        self.sock.settimeout(left)
        try:
            data, src = self.sock.recvfrom(65535)
        except (socket.timeout, BlockingIOError):
            return None, None
        except ConnectionRefusedError:  # an ICMP error from an earlier send
            return None, None
        self.bytes_in += len(data)
        self.packets_in += 1
        return data, src

    def transact(self, data, timeout=4.0, retransmit=True, dest=None):
        """Sends a request; returns (final response Msg or None, seconds to it, [1xx Msgs])."""
        req = Msg(data)
        cid, (num, method) = req.call_id(), req.cseq()
        start = time.monotonic()
        deadline = start + timeout
        interval = T1
        next_tx = start + interval
        self.send(data, dest)
        prov = []
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None, now - start, prov
            wait_until = min(deadline, next_tx) if retransmit and not prov else deadline
            got, _src = self.recv(wait_until)
            if got is None:
                if retransmit and not prov and time.monotonic() >= next_tx and method != "ACK":
                    self.send(data, dest)
                    interval = min(interval * 2, 4.0)
                    next_tx = time.monotonic() + interval
                continue
            m = Msg(got)
            if m.status is not None and m.call_id() == cid and m.cseq() == (num, method):
                if m.status < 200:
                    prov.append(m)
                    continue
                return m, time.monotonic() - start, prov
            self.stash.append(m)

    def drain(self, seconds):
        """Everything received for `seconds`: [(bytes, source)]."""
        out = []
        deadline = time.monotonic() + seconds
        while True:
            data, src = self.recv(deadline)
            if data is None:
                return out
            out.append((data, src))


def in_dialog(ua, invite, final, method, cseq):
    """A request of the caller's dialog (ACK, BYE) after the 2xx `final` to `invite` (a Msg or
    bytes): Request-URI the callee's Contact, Route the Record-Route in reverse, From and
    Call-ID of the INVITE, To of the 2xx."""
    invite = invite if isinstance(invite, Msg) else Msg(invite)
    lines = [f"{method} {final.contact_uri()} SIP/2.0",
             f"Via: SIP/2.0/UDP {ua.ip}:{ua.port};branch={branch()};rport",
             "Max-Forwards: 70", f"From: {invite.get('from')}", f"To: {final.get('to')}",
             f"Call-ID: {invite.call_id()}", f"CSeq: {cseq} {method}"]
    lines += [f"Route: {r}" for r in reversed(final.route_set())]
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def end_call(ua, invite, final, timeout=4.0):
    """ACK the 2xx and send BYE; returns the BYE's final status or None."""
    invite = invite if isinstance(invite, Msg) else Msg(invite)
    ua.send(in_dialog(ua, invite, final, "ACK", invite.cseq()[0]))
    r, _, _ = ua.transact(in_dialog(ua, invite, final, "BYE", invite.cseq()[0] + 1), timeout)
    return r.status if r is not None else None


class Uas:
    """A callee on a loopback address, in a thread: answers 100 to every INVITE, then whatever
    `answer(msg)` returns ([(status, reason, sdp body or "")] or [] for silence); 200 to BYE,
    CANCEL (plus 487 to the INVITE), OPTIONS. Records each INVITE it got (Call-ID -> Msg)."""

    def __init__(self, ip, server, port, answer):
        self.ua = UA(ip, server, port)
        self.answer = answer
        self.invites = {}
        self.byes = 0
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        contact = f"Contact: <sip:uas@{self.ua.ip}:{self.ua.port}>"
        while not self.stop:
            data, src = self.ua.recv(time.monotonic() + 0.2)
            if data is None:
                continue
            m = Msg(data)
            if m.method == "INVITE":
                first = m.call_id() not in self.invites
                self.invites.setdefault(m.call_id(), m)
                self.ua.send(response_to(m, 100, "Trying"), src)
                if first:
                    tag = rand_hex(8)
                    for status, reason, body in self.answer(m):
                        self.ua.send(response_to(m, status, reason, to_tag=tag, body=body,
                                                 extra=[contact]), src)
            elif m.method in ("BYE", "CANCEL", "OPTIONS"):
                self.byes += m.method == "BYE"
                self.ua.send(response_to(m, 200, "OK"), src)
                inv = self.invites.get(m.call_id())
                if m.method == "CANCEL" and inv is not None:
                    self.ua.send(response_to(inv, 487, "Request Terminated", to_tag=rand_hex(8)), src)

    def close(self):
        self.stop = True
        self.thread.join(1)
        self.ua.close()


def register(ua, user, password, domain, *, expires=60, call_id=None, cseq=1, timeout=4.0,
             contact_user=None, algorithm=None, uri_override=None):
    """A full digest REGISTER (REGISTER, 401, REGISTER with credentials).
    Returns (final status or None, seconds for the whole exchange, last response Msg)."""
    call_id = call_id or rand_hex(20) + "@" + ua.ip
    ruri = f"sip:{domain}"
    aor = f"sip:{user}@{domain}"
    ftag = rand_hex(8)
    contact = f"sip:{contact_user or user}@{ua.ip}:{ua.port}"

    def req(cs, extra=()):
        return request("REGISTER", ruri, via=ua.addr, from_uri=aor, to_uri=aor, from_tag=ftag,
                       call_id=call_id, cseq=cs, contact=contact,
                       extra=[f"Expires: {expires}", *extra])

    start = time.monotonic()
    first, _, _ = ua.transact(req(cseq), timeout)
    if first is None or first.status != 401:
        return (first.status if first else None), time.monotonic() - start, first
    chal = parse_challenge(first.get("www-authenticate", ""))
    auth = digest_header(chal, user, password, "REGISTER", uri_override or ruri, algorithm=algorithm)
    second, _, _ = ua.transact(req(cseq + 1, [f"Authorization: {auth}"]), timeout)
    return (second.status if second else None), time.monotonic() - start, second


# ---------------------------------------------------------------------------------------------
# The sipedge process, seen through /proc

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inodes(pid):
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _hex_addr(text):
    ip_hex, port_hex = text.split(":")
    ip = socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1])
    return ip, int(port_hex, 16)


def proc_net(kind):
    """Rows of /proc/net/{tcp,udp}: (local (ip, port), remote (ip, port), state hex, inode)."""
    rows = []
    with open(f"/proc/net/{kind}") as f:
        next(f)
        for line in f:
            p = line.split()
            rows.append((_hex_addr(p[1]), _hex_addr(p[2]), p[3], int(p[9])))
    return rows


def tcp_held(pid, local_port, remote_ip=None):
    """TCP connections on local_port that the process holds open (its fds), optionally only those
    from remote_ip: [(remote ip, remote port)]. Listening sockets are not counted."""
    inodes = socket_inodes(pid)
    out = []
    for local, remote, state, inode in proc_net("tcp"):
        if inode in inodes and local[1] == local_port and state != "0A":
            if remote_ip is None or remote[0] == remote_ip:
                out.append(remote)
    return out


def udp_ports_held(pid, lo, hi):
    """How many UDP sockets the process holds with a local port in [lo, hi]."""
    inodes = socket_inodes(pid)
    return sum(1 for local, _r, _s, inode in proc_net("udp")
               if inode in inodes and lo <= local[1] <= hi)


def log_grep(path, needle):
    try:
        with open(path, "rb") as f:
            return [l.decode("utf-8", "replace").rstrip() for l in f if needle.encode() in l]
    except OSError:
        return []


def options_ok(server, ip="127.0.0.1", timeout=1.0):
    """Seconds an OPTIONS over UDP from `ip` took to get 200, or None."""
    ua = UA(ip, server)
    try:
        cid = rand_hex(16) + "@" + ip
        msg = request("OPTIONS", f"sip:{server[0]}:{server[1]}", via=ua.addr,
                      from_uri=f"sip:probe@{ip}", to_uri=f"sip:{server[0]}", call_id=cid)
        resp, secs, _ = ua.transact(msg, timeout)
        return secs if resp is not None and resp.status == 200 else None
    finally:
        ua.close()


def pct(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]
