#!/usr/bin/env python3
"""A phone's SIP port standing still, for the NAT keepalive check of scripts/nat-test.sh.

Binds ADDR:PORT (inside the phone's network namespace), records for DURATION seconds every
datagram that arrives, answers each OPTIONS with a 200 OK (Via, From, To + tag, Call-ID and
CSeq copied) unless --silent, and checks that each OPTIONS is a well-formed keepalive
(DESIGN §4, kamailio#1481/#1587):

    OPTIONS <contact> SIP/2.0, a Via with a z9hG4bK branch, From <sip:…@SERVER>;tag=…, To,
    Call-ID, CSeq "n OPTIONS", Max-Forwards, Content-Length 0

--expect options|crlf|any|none decides what counts as a ping; with --min N the run fails unless
at least N pings arrived and every interval between them is within ±TOL of INTERVAL seconds.
Prints one `summary` line (key=value) and the per-packet log; exits 0 when the expectation
holds, 1 otherwise. Bounded: returns after DURATION seconds whatever arrives.
"""
import argparse
import re
import socket
import sys
import time

COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "l": "content-length", "m": "contact"}


def parse(data):
    text = data.decode("utf-8", "replace")
    head = text.split("\r\n\r\n", 1)[0]
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded line
            continue
        if ":" not in line:
            continue
        name, value = line.split(":", 1)
        name = name.strip().lower()
        name = COMPACT.get(name, name)
        headers.setdefault(name, []).append(value.strip())
    return lines[0], headers, head


def check_options(start, headers, contact, server):
    problems = []
    m = re.fullmatch(r"OPTIONS (\S+) SIP/2\.0", start)
    if not m:
        problems.append(f"bad request line {start!r}")
    elif contact and m.group(1) != contact:
        problems.append(f"Request-URI {m.group(1)} is not the registered contact {contact}")
    via = headers.get("via", [""])[0]
    if not re.match(r"SIP/2\.0/UDP\s+\S+", via, re.I) or not re.search(r";\s*branch=z9hG4bK", via):
        problems.append(f"bad Via {via!r}")
    frm = headers.get("from", [""])[0]
    if not re.search(r";\s*tag=[^;\s]+", frm):
        problems.append(f"From without tag {frm!r}")
    if server and not re.search(r"sip:[^>@;]*@" + re.escape(server) + r"([:;>]|$)", frm):
        problems.append(f"From is not <sip:…@{server}> {frm!r}")
    if not headers.get("to"):
        problems.append("no To")
    if not headers.get("call-id") or not headers["call-id"][0]:
        problems.append("no Call-ID")
    cseq = headers.get("cseq", [""])[0]
    if not re.fullmatch(r"\d+\s+OPTIONS", cseq):
        problems.append(f"bad CSeq {cseq!r}")
    mf = headers.get("max-forwards", [""])[0]
    if not mf.isdigit():
        problems.append(f"bad Max-Forwards {mf!r}")
    cl = headers.get("content-length", [""])[0]
    if cl != "0":
        problems.append(f"Content-Length {cl!r}, expected 0")
    return problems


def answer(sock, src, headers):
    lines = ["SIP/2.0 200 OK"]
    for v in headers.get("via", []):
        lines.append("Via: " + v)
    lines.append("From: " + headers.get("from", [""])[0])
    to = headers.get("to", [""])[0]
    if not re.search(r";\s*tag=", to):
        to += ";tag=natphone%d" % int(time.time() * 1000)
    lines.append("To: " + to)
    lines.append("Call-ID: " + headers.get("call-id", [""])[0])
    lines.append("CSeq: " + headers.get("cseq", [""])[0])
    lines.append("Content-Length: 0")
    sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), src)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True, help="ADDR:PORT")
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--expect", choices=["options", "crlf", "any", "none"], default="options")
    ap.add_argument("--interval", type=float, default=0, help="expected seconds between pings")
    ap.add_argument("--tol", type=float, default=0.3, help="allowed relative deviation")
    ap.add_argument("--min", type=int, default=0, help="fewest pings for success")
    ap.add_argument("--contact", default="", help="expected Request-URI of OPTIONS")
    ap.add_argument("--server", default="", help="expected host of the From URI")
    ap.add_argument("--silent", action="store_true", help="never answer")
    ap.add_argument("--name", default="phone")
    a = ap.parse_args()

    host, port = a.bind.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, int(port)))
    t0 = time.monotonic()
    end = t0 + a.duration
    pings, problems, other = [], [], 0
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data, src = sock.recvfrom(65535)
        except socket.timeout:
            break
        t = time.monotonic() - t0
        if data.strip(b"\r\n") == b"":
            kind = "crlf"
            print(f"{a.name} {t:7.3f}s crlf {len(data)} bytes from {src[0]}:{src[1]}")
        else:
            start, headers, head = parse(data)
            if start.startswith("OPTIONS "):
                kind = "options"
                bad = check_options(start, headers, a.contact, a.server)
                print(f"{a.name} {t:7.3f}s {start} from {src[0]}:{src[1]} "
                      f"cseq={headers.get('cseq', ['?'])[0]!r} call-id={headers.get('call-id', ['?'])[0]!r}"
                      + (" (not answered)" if a.silent else ""))
                for p in bad:
                    print(f"{a.name}   malformed keepalive: {p}")
                if bad:
                    problems.append(bad[0])
                    print("\n".join(f"{a.name}   | {l}" for l in head.split("\r\n")))
                if not a.silent:
                    answer(sock, src, headers)
            else:
                kind = "other"
                other += 1
                print(f"{a.name} {t:7.3f}s unexpected: {start!r} from {src[0]}:{src[1]}")
        if a.expect in (kind, "any") or (a.expect == "none" and kind in ("options", "crlf")):
            pings.append(t)

    intervals = [b - a_ for a_, b in zip(pings, pings[1:])]
    ok = True
    reasons = []
    if a.expect == "none":
        ok = not pings
        if pings:
            reasons.append(f"{len(pings)} pings while none expected")
    else:
        if len(pings) < a.min:
            ok = False
            reasons.append(f"{len(pings)} {a.expect} pings in {a.duration:g} s, expected >= {a.min}")
        if a.interval > 0:
            lo, hi = a.interval * (1 - a.tol), a.interval * (1 + a.tol)
            off = [x for x in intervals if not lo <= x <= hi]
            if off:
                ok = False
                reasons.append("intervals outside %.2f-%.2f s: %s" % (lo, hi, " ".join("%.2f" % x for x in off)))
        if problems:
            ok = False
            reasons.append(f"{len(problems)} malformed OPTIONS")
    print(f"summary name={a.name} expect={a.expect} pings={len(pings)} other={other} "
          f"intervals={','.join('%.2f' % x for x in intervals) or '-'} "
          f"result={'ok' if ok else 'FAIL'}" + (" reason=" + "; ".join(reasons) if reasons else ""))
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
