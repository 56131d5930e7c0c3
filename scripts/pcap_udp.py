#!/usr/bin/env python3
"""The UDP packets of a pcap file, for the test scripts' RTP senders (python3 stdlib only).

    pcap_udp.py count FILE          number of UDP packets
    pcap_udp.py cut FILE N OUT      the first N records of FILE written to OUT

As a module: payloads(path) -> [(seconds since the first packet, UDP payload)].
Link types: Ethernet (VLAN tags too), Linux cooked, raw IP; micro- and nanosecond pcaps.
"""
import struct
import sys


def records(path):
    """(record bytes with header, time in s, link type, packet bytes) per record."""
    d = open(path, "rb").read()
    magic = struct.unpack("<I", d[:4])[0]
    if magic in (0xA1B2C3D4, 0xA1B23C4D):
        e = "<"
    elif magic in (0xD4C3B2A1, 0x4D3CB2A1):
        e = ">"
    else:
        sys.exit(f"{path}: not a pcap file")
    scale = 1e9 if magic in (0xA1B23C4D, 0x4D3CB2A1) else 1e6
    linktype = struct.unpack(e + "I", d[20:24])[0]
    off = 24
    while off + 16 <= len(d):
        sec, frac, incl, _ = struct.unpack(e + "IIII", d[off:off + 16])
        yield d[off:off + 16 + incl], sec + frac / scale, linktype, d[off + 16:off + 16 + incl]
        off += 16 + incl


def udp_payload(linktype, pkt):
    """The UDP payload of an IPv4/IPv6 packet, None for anything else."""
    if linktype == 1:  # Ethernet, maybe VLAN-tagged
        et, off = struct.unpack(">H", pkt[12:14])[0], 14
        while et == 0x8100:
            et, off = struct.unpack(">H", pkt[off + 2:off + 4])[0], off + 4
    elif linktype == 113:  # Linux cooked
        et, off = struct.unpack(">H", pkt[14:16])[0], 16
    elif linktype in (12, 101):  # raw IP
        et, off = (0x0800 if pkt[0] >> 4 == 4 else 0x86DD), 0
    else:
        sys.exit(f"pcap link type {linktype} not handled")
    if et == 0x0800 and pkt[off + 9] == 17:
        off += (pkt[off] & 15) * 4
    elif et == 0x86DD and pkt[off + 6] == 17:
        off += 40
    else:
        return None
    return pkt[off + 8:off + struct.unpack(">H", pkt[off + 4:off + 6])[0]]


def payloads(path):
    """[(seconds since the first UDP packet, payload)] of the pcap's UDP packets."""
    out = [(ts, udp_payload(lt, p)) for _, ts, lt, p in records(path)]
    out = [(ts, pl) for ts, pl in out if pl is not None]
    return [(ts - out[0][0], pl) for ts, pl in out]


if __name__ == "__main__":
    if sys.argv[1] == "count":
        print(sum(1 for _, _, lt, p in records(sys.argv[2]) if udp_payload(lt, p) is not None))
    elif sys.argv[1] == "cut":
        out = bytearray(open(sys.argv[2], "rb").read()[:24])
        for i, (rec, _, _, _) in enumerate(records(sys.argv[2])):
            if i == int(sys.argv[3]):
                break
            out += rec
        open(sys.argv[4], "wb").write(out)
    else:
        sys.exit(__doc__)
