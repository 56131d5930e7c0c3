#!/usr/bin/env python3
"""Send one command to baresip's ctrl_tcp module (netstring-framed JSON) and print the reply.
Usage: baresip_ctrl.py HOST:PORT COMMAND [PARAMS]   e.g.  dial sip:bob@198.51.100.1 | hangup
Bounded: gives up after 5 s. Exits 0 when baresip answers "ok": true."""
import json
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
msg = {"command": sys.argv[2], "token": "nat%d" % int(time.time() * 1000)}
if len(sys.argv) > 3:
    msg["params"] = sys.argv[3]
data = json.dumps(msg).encode()
deadline = time.monotonic() + 5
while True:
    try:
        s = socket.create_connection((host, int(port)), timeout=1)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"baresip_ctrl: cannot connect to {sys.argv[1]}")
        time.sleep(0.2)
s.settimeout(max(0.1, deadline - time.monotonic()))
s.sendall(b"%d:%s," % (len(data), data))
buf = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        # netstrings: LEN:JSON, ; events may come first, look for our response
        while b":" in buf:
            n, rest = buf.split(b":", 1)
            if not n.isdigit() or len(rest) < int(n) + 1:
                break
            obj = json.loads(rest[: int(n)])
            buf = rest[int(n) + 1:]
            if obj.get("response"):
                print(json.dumps(obj))
                sys.exit(0 if obj.get("ok") else 1)
except socket.timeout:
    pass
sys.exit("baresip_ctrl: no response to " + sys.argv[2])
