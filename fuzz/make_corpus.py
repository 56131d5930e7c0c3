#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target under fuzz/corpus/<target>/.

Seeds are small real inputs: the SIP and SDP fixtures of tests/data, digest Authorization
values, RTP/RTCP packets. Inputs that once crashed a target are kept there too (named
`regress-*`): this script never deletes a file. Run from anywhere: python3 fuzz/make_corpus.py
"""
import pathlib
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# sip: every fixture message (the parser reads the whole input; the framer uses the first byte
# as its chunk/limit selector and the rest as the stream), plus a two-message stream with pings.
for f in sorted((ROOT / "tests" / "data" / "sip").glob("*.sip")):
    write("sip", f.name, f.read_bytes())
msg = b"MESSAGE sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nl: 5\r\n\r\nhello"
write("sip", "stream-pings", b"\x61" + msg + b"\r\n\r\n" + msg + b"\n\rX\r\n\r\n")
write("sip", "stream-lf-cr", b"\x23" + b"\n\rX" * 40 + b"\r\n\r\n")

# sdp: every fixture body.
for f in sorted((ROOT / "tests" / "data" / "sdp").glob("*.sdp")):
    write("sdp", f.name, f.read_bytes())

# digest: Authorization / Proxy-Authorization values.
digests = {
    "md5-qop": 'Digest username="alice", realm="example.com", nonce="ea9c8e88df84f1cec4341ae6cbe5a359", opaque="", uri="sip:example.com", response="dfe56131d1958046689d83306477ecc7", algorithm=MD5, cnonce="0a4f113b", qop=auth, nc=0000000a',
    "md5-rfc2069": 'Digest username="bob",realm="biloxi.com",nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",uri="sip:bob@biloxi.com",response="6629fae49393a05397450978507c4ef1"',
    "sha256": 'Digest username="carol", realm="example.org", nonce="AAAAAGlc3f8AAAAAAAAAKnhjgqpWf1BuCyD-AxU58HyH6ZNRnD6bY2uMAxpvO_rM", uri="sip:example.org", response="8d1f9f5e1d9b3a6a4c2e0b7d5f3a1c9e8b7d6f5a4c3b2a1908f7e6d5c4b3a291", algorithm=SHA-256, qop="auth", nc=00000001, cnonce="xyz"',
    "escapes": 'digest  username = "a\\"b" ,\r\n realm="r\\\\", nonce=n, uri="sip:x", response="00000000000000000000000000000000", opaque="o"',
    "basic": "Basic YWxhZGRpbjpvcGVuc2VzYW1l",
    "unknown-params": 'Digest username="u", realm="r", nonce="n", uri="sip:r", response="0123456789abcdef0123456789ABCDEF", foo=bar, baz="q"',
}
for name, value in digests.items():
    write("digest", name, value.encode())

# rtp: the first byte selects the relay mode (rtcp-mux, clock rates) and the views see the
# whole input; then records of [selector, length, packet] (see fuzz/src/lib.rs `rtp`).
def rtp(seq, ts, ssrc, payload=160, pt=0, marker=False):
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq, ts, ssrc) + b"\xd5" * payload

def rtcp_rr(ssrc):
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)

def rtcp_sr(ssrc):
    return struct.pack("!BBHIIIIII", 0x80, 200, 6, ssrc, 0xE0000000, 0, 160, 10, 1600)

def rec(sel, pkt):
    assert len(pkt) < 256
    return bytes([sel, len(pkt)]) + pkt

write("rtp", "rtp-pcmu", rtp(1, 160, 0x1234)[:172])
write("rtp", "rtcp-rr", rtcp_rr(0x1234))
write("rtp", "rtcp-sr", rtcp_sr(0x1234))
# A call: caller (host 1 -> port+0) sends, answer (0xff), callee (host 2 -> port+2) sends,
# RTCP on the RTCP ports, a stranger, a new SSRC, a sequence jump.
call = bytearray([0x80])
for i in range(4):
    call += rec(0x24, rtp(100 + i, 160 * i, 0xAAAA, payload=20))
call += rec(0xFF, rtp(104, 640, 0xAAAA, payload=20))
for i in range(4):
    call += rec(0x22, rtp(7 + i, 160 * i, 0xBBBB, payload=20))
call += rec(0x25, rtcp_rr(0xAAAA))
call += rec(0x23, rtcp_sr(0xBBBB))
call += rec(0x38, rtp(1, 0, 0xCCCC, payload=20))
call += rec(0x24, rtp(40000, 99999, 0xAAAB, payload=20))
call += rec(0x24, rtp(40001, 100159, 0xAAAB, payload=20, marker=True))
write("rtp", "call", bytes(call))
# rtcp-mux on both sides (mode bits 0 and 2), RTCP on the RTP ports; padding and extensions.
mux = bytearray([0x85])
mux += rec(0x24, rtp(1, 0, 1, payload=20))
mux += rec(0xFF, rtcp_rr(1))
mux += rec(0x22, rtcp_sr(2))
ext = bytearray(rtp(2, 160, 1, payload=0))
ext[0] = 0x90 | 0x20
ext += struct.pack("!HH", 0xBEDE, 1) + b"\x10\x01\x00\x00" + b"\x00\x00\x00\x04"
mux += rec(0x24, bytes(ext))
write("rtp", "mux-ext-padding", bytes(mux))
