"""Attack 8: digest weaknesses and password guessing.

  Digest, from 127.0.0.14 (first a correct REGISTER as the control):
    - a response computed with the right password for another uri than the Request-URI is
      refused (RFC 7616 3.4.6);
    - a SHA-256 response when only MD5 was offered is refused;
  Brute force: 60 REGISTERs for alice with wrong passwords from 127.0.0.4 (one every 100 ms,
  each on the nonce of the last 401): the source gets banned (its last 10 attempts and a later
  OPTIONS get no answer), the failures are logged as security events naming 127.0.0.4, and
  127.0.0.5 then registers bob with the right password (200 within 1 s per transaction).
"""

import time

import sipattack as sa

ATTEMPTS = 60


def main():
    ap = sa.common_args(__doc__)
    a = ap.parse_args()
    c = sa.Checks("bruteforce")
    server = sa.parse_addr(a.server)
    us = f"{server[0]}:{server[1]}"
    cfg = sa.load_config(a.config)
    offered = sa.cfg_get(cfg, "auth.algorithms", ["MD5"])

    # Digest checks.
    ua = sa.UA("127.0.0.14", server)
    status, secs, _ = sa.register(ua, "carol", "carol-pw-3", "127.0.0.1")
    c.check("digest control: the right password registers", status == 200,
            f"{status} in {secs * 1000:.0f} ms")
    status, _, _ = sa.register(ua, "carol", "carol-pw-3", "127.0.0.1",
                               uri_override="sip:elsewhere.example.net")
    c.check("digest: a valid response for another uri is refused", status not in (200, None),
            f"answered {status}")
    if "SHA-256" not in offered:
        status, _, _ = sa.register(ua, "carol", "carol-pw-3", "127.0.0.1", algorithm="SHA-256")
        c.check("digest: a SHA-256 response when only MD5 was offered is refused",
                status not in (200, None), f"answered {status} (offered {offered})")
    ua.close()

    # Brute force from 127.0.0.4.
    ua = sa.UA("127.0.0.4", server)
    aor = "sip:alice@127.0.0.1"
    cid = sa.rand_hex(20) + "@127.0.0.4"

    def reg(cseq, extra=()):
        return sa.request("REGISTER", "sip:127.0.0.1", via=ua.addr, from_uri=aor, to_uri=aor,
                          from_tag="bf", call_id=cid, cseq=cseq,
                          contact=f"sip:alice@127.0.0.4:{ua.port}", extra=["Expires: 60", *extra])

    first, _, _ = ua.transact(reg(1), 2.0)
    if first is None or first.status != 401:
        c.check("brute force: source banned", False,
                f"no 401 to start from (got {first.status if first else 'nothing'})")
        c.done()
    chal = sa.parse_challenge(first.get("www-authenticate", ""))
    answered = {}  # attempt number -> status
    start = time.monotonic()
    for i in range(1, ATTEMPTS + 1):
        auth = sa.digest_header(chal, "alice", f"guess{i:04d}", "REGISTER", "sip:127.0.0.1", nc=i)
        ua.send(reg(i + 1, [f"Authorization: {auth}"]))
        until = start + i * 0.1
        while True:
            data, _ = ua.recv(until)
            if data is None:
                break
            m = sa.Msg(data)
            if m.call_id() == cid and m.status:
                answered[m.cseq()[0] - 1] = m.status
                if m.status == 401 and m.get("www-authenticate"):
                    chal = sa.parse_challenge(m.get("www-authenticate"))
    for data, _ in ua.drain(1.0):
        m = sa.Msg(data)
        if m.call_id() == cid and m.status:
            answered[m.cseq()[0] - 1] = m.status
    last = max(answered, default=0)
    tail = [n for n in answered if n > ATTEMPTS - 10]
    probe = sa.options_ok(server, "127.0.0.4", 1.0)
    ok200 = [n for n, s in answered.items() if s == 200]
    c.check("brute force: 60 wrong passwords from 127.0.0.4 get the source banned",
            not tail and probe is None and not ok200,
            f"{len(answered)} of {ATTEMPTS} attempts answered "
            f"({sorted(set(answered.values()))}), last answered #{last}, "
            f"{len(tail)} of the last 10 answered; a later OPTIONS from 127.0.0.4 "
            + ("got no answer" if probe is None else f"answered in {probe * 1000:.0f} ms"))
    lines = [l for l in sa.log_grep(a.log, "127.0.0.4") if "security" in l]
    c.check("brute force: failures logged as security events naming 127.0.0.4", bool(lines),
            f"{len(lines)} log lines; first: {lines[0][:200] if lines else '-'}")
    ua.close()

    # Another source with the right password.
    ua = sa.UA("127.0.0.5", server)
    status, secs, _ = sa.register(ua, "bob", "bob-pw-2", "127.0.0.1", timeout=1.0)
    c.check("127.0.0.5 registers bob with the right password meanwhile", status == 200,
            f"{status} after {secs * 1000:.0f} ms (REGISTER, 401, REGISTER)")
    alive = sa.alive(a.pid)
    c.check("process alive", alive, f"pid {a.pid} {'alive' if alive else 'GONE'}")
    c.done()


if __name__ == "__main__":
    main()
