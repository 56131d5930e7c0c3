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
import select
import signal
import socket
import struct
import sys
import time


def pcap_payloads(path):
    """The UDP payloads of a pcap (Ethernet, Linux cooked or raw IP) and their times (s)."""
    d = open(path, "rb").read()
    magic = struct.unpack("<I", d[:4])[0]
    if magic in (0xA1B2C3D4, 0xA1B23C4D):
        e = "<"
    elif magic in (0xD4C3B2A1, 0x4D3CB2A1):
        e = ">"
    else:
        sys.exit(f"{path}: not a pcap file")
    nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
    linktype = struct.unpack(e + "I", d[20:24])[0]
    out, off = [], 24
    while off + 16 <= len(d):
        sec, frac, incl, _ = struct.unpack(e + "IIII", d[off:off + 16])
        pkt = d[off + 16:off + 16 + incl]
        off += 16 + incl
        if linktype == 1:
            et, o = struct.unpack(">H", pkt[12:14])[0], 14
            while et == 0x8100:
                et, o = struct.unpack(">H", pkt[o + 2:o + 4])[0], o + 4
        elif linktype == 113:
            et, o = struct.unpack(">H", pkt[14:16])[0], 16
        elif linktype in (12, 101):
            et, o = (0x0800 if pkt[0] >> 4 == 4 else 0x86DD), 0
        else:
            sys.exit(f"pcap link type {linktype} not handled")
        if et == 0x0800 and pkt[o + 9] == 17:
            o += (pkt[o] & 15) * 4
        elif et == 0x86DD and pkt[o + 6] == 17:
            o += 40
        else:
            continue
        ulen = struct.unpack(">H", pkt[o + 4:o + 6])[0]
        out.append((sec + frac / (1e9 if nano else 1e6), pkt[o + 8:o + ulen]))
    t0 = out[0][0]
    return [(t - t0, p) for t, p in out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True, help="ADDR:PORT")
    ap.add_argument("--ctl", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pcap", required=True)
    ap.add_argument("--linger", type=float, default=1.0)
    ap.add_argument("--max-time", type=float, default=40)
    a = ap.parse_args()

    frames = pcap_payloads(a.pcap)
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
