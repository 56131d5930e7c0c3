#!/usr/bin/env python3
"""One phone's audio for the NAT media step of scripts/nat-test.sh, run in the phone's namespace.

Binds ADDR:PORT (the private address and port the phone writes in its SDP), prints "ready",
then waits for the first line "ROLE CALL-ID IP PORT" in --ctl (appended by the phone's SIPp
scenario: the callee's when it sends its 200, the caller's after its ACK; IP:PORT is the
media address of the SDP the phone received). From then on it talks like a real phone with
symmetric RTP: plays the RTP payloads of --pcap (g711a.pcap), with the capture's timing, from
its bound port to IP:PORT, and counts every datagram that reaches the port by source address.
--linger seconds after the last packet it writes --out (JSON) and a `summary` line:

    {"role", "call_id", "to": "IP:PORT", "sent", "sent_bytes", "recv": {"IP:PORT": n},
     "recv_from_to": n received from exactly IP:PORT, "first_recv_ms", "last_recv_ms",
     "sent_at": [time.monotonic() of each packet sent]}

Bounded: gives up --max-time seconds after start whatever happens, or at SIGTERM (exit 1
without a ctl line).
"""
import argparse
import json
import os
import select
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pcap_udp  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True, help="ADDR:PORT")
    ap.add_argument("--ctl", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pcap", required=True)
    ap.add_argument("--linger", type=float, default=1.0)
    ap.add_argument("--max-time", type=float, default=40)
    a = ap.parse_args()

    frames = pcap_udp.payloads(a.pcap)
    host, port = a.bind.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, int(port)))
    sock.setblocking(False)
    print("ready", flush=True)

    t_start = time.monotonic()
    deadline = t_start + a.max_time
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # finish now, with the result
    role = call_id = None
    dest = None
    play_t0 = None
    idx = 0
    sent = sent_bytes = 0
    sent_at = []  # time.monotonic() of each packet sent (one clock for every namespace)
    recv = {}
    first_recv = last_recv = None
    end = None
    ctl_pos = 0
    while True:
        now = time.monotonic()
        if now >= deadline or (end is not None and now >= end) or stop:
            break
        if dest is None:  # wait for the scenario's line
            try:
                with open(a.ctl) as f:
                    f.seek(ctl_pos)
                    line = f.readline()
                    if line.endswith("\n"):
                        ctl_pos = f.tell()
                        parts = line.split()
                        if len(parts) == 4:
                            role, call_id, ip, p = parts
                            dest = (ip, int(p))
                            play_t0 = time.monotonic()
            except FileNotFoundError:
                pass
        # send every frame that is due
        while dest is not None and idx < len(frames) and play_t0 + frames[idx][0] <= now:
            try:
                sock.sendto(frames[idx][1], dest)
                sent_at.append(round(time.monotonic(), 6))
                sent += 1
                sent_bytes += len(frames[idx][1])
            except OSError as e:
                print(f"send failed: {e}", file=sys.stderr)
            idx += 1
            if idx == len(frames):
                end = time.monotonic() + a.linger
        # wait for a datagram until the next frame is due (or 20 ms)
        if dest is not None and idx < len(frames):
            wait = max(0.0, play_t0 + frames[idx][0] - time.monotonic())
        else:
            wait = 0.02
        r, _, _ = select.select([sock], [], [], min(wait, 0.02))
        if r:
            while True:
                try:
                    data, src = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                t = time.monotonic()
                key = f"{src[0]}:{src[1]}"
                recv[key] = recv.get(key, 0) + 1
                if first_recv is None:
                    first_recv = t
                last_recv = t

    ms = lambda t: None if t is None or play_t0 is None else round((t - play_t0) * 1000)
    to = f"{dest[0]}:{dest[1]}" if dest else None
    res = {
        "role": role, "call_id": call_id, "bind": a.bind, "to": to, "frames": len(frames),
        "sent": sent, "sent_bytes": sent_bytes, "recv": recv,
        "recv_from_to": recv.get(to, 0) if to else 0,
        "first_recv_ms": ms(first_recv), "last_recv_ms": ms(last_recv),
        "sent_at": sent_at,
    }
    json.dump(res, open(a.out, "w"))
    print("summary " + " ".join(f"{k}={v}" for k, v in res.items() if k != "sent_at"), flush=True)
    return 0 if dest is not None else 1


if __name__ == "__main__":
    sys.exit(main())
