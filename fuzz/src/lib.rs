//! The fuzz targets' bodies, one function per target; `fuzz_targets/*.rs` wrap each in
//! `afl::fuzz!`. Every function must return normally whatever its input: a panic (including an
//! arithmetic overflow or a failed property assertion below) is a crash for AFL.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use sipedge::auth::digest;
use sipedge::auth::nonce::{self, NonceKey};
use sipedge::sip::{ContactValue, Framing, HeaderName, Message, Rewrite, SipUri, reply};
use sipedge::transport::framing::{Frame, FrameError, StreamFramer};

/// Target `sip`: the message parser in both framings, every typed view the proxy reads, the
/// rewrites and local replies built from a parsed message, and the TCP framer fed in chunks.
///
/// The first byte picks the framer's chunk size (1 to 32 bytes) and limit (64 bytes to
/// 8 KiB); the rest is the stream.
pub fn sip(data: &[u8]) {
    for framing in [Framing::Datagram, Framing::Stream] {
        if let Ok(msg) = Message::parse(data, framing) {
            message_views(&msg);
        }
    }
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(ctl & 0x1f) + 1;
    let max = 64 << (ctl >> 5);
    framer(stream, chunk, max);
}

/// Frames `stream` fed `chunk` bytes at a time, then all at once, and checks both give the same
/// frames and the same error kind, every frame within the limit. Frames are parsed as stream
/// messages.
fn framer(stream: &[u8], chunk: usize, max: usize) {
    let chunked = frame_all(stream.chunks(chunk), max);
    let whole = frame_all([stream], max);
    assert_eq!(chunked, whole, "chunked ({chunk}) and whole framing differ");
    for frame in &chunked.0 {
        if let Frame::Message(m) = frame {
            assert!(
                m.len() <= max,
                "frame of {} bytes over the limit {max}",
                m.len()
            );
            if let Ok(msg) = Message::parse(m, Framing::Stream) {
                message_views(&msg);
            }
        }
    }
}

/// The error kind, without the sizes that depend on how the bytes arrived.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    TooLarge,
    BadContentLength,
}

fn frame_all<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    max: usize,
) -> (Vec<Frame>, Option<Stop>) {
    let mut f = StreamFramer::new(max);
    let mut frames = Vec::new();
    for c in chunks {
        f.extend(c);
        loop {
            match f.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(FrameError::TooLarge { max: m, .. }) => {
                    assert_eq!(m, max);
                    let head = f.take_head();
                    assert!(head.len() <= max, "head of {} kept over {max}", head.len());
                    let _ = Message::parse(&head, Framing::Stream);
                    return (frames, Some(Stop::TooLarge));
                }
                Err(FrameError::BadContentLength) => {
                    return (frames, Some(Stop::BadContentLength));
                }
            }
        }
        // Never more than a limit's worth plus one read buffered without a frame.
        assert!(f.pending() <= max + c.len(), "{} buffered", f.pending());
    }
    (frames, None)
}

const SOURCE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40000);
const SOURCE6: SocketAddr = SocketAddr::new(
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
    5062,
);

/// Reads every view of a parsed message and builds what the proxy builds from it.
fn message_views(msg: &Message) {
    let _ = (msg.defect(), msg.is_request(), msg.method(), msg.status());
    let _ = (msg.eol(), msg.body().len(), msg.headers_end());
    if let Some(u) = msg.request_uri() {
        uri(u);
    }
    if let Some(r) = msg.request_uri_span() {
        let _ = msg.str_at(r);
    }
    for h in msg.headers() {
        let _ = msg.str_at(h.value.clone());
        let _ = msg.bytes_at(h.line.clone());
    }
    if let Ok(vias) = msg.vias() {
        for v in &vias {
            let _ = (
                v.branch(),
                v.param("rport"),
                v.param("received"),
                v.is_reliable(),
            );
            let _ = reply::response_target(v, SOURCE);
            let _ = reply::response_target(v, SOURCE6);
        }
    }
    for name in [HeaderName::From, HeaderName::To] {
        if let Ok(na) = msg.name_addr(name) {
            let _ = na.tag();
            uri(na.uri);
        }
    }
    let _ = (msg.call_id(), msg.cseq(), msg.max_forwards());
    if let Ok(contacts) = msg.contacts() {
        for c in contacts {
            if let ContactValue::Addr(na) = c {
                let _ = (na.param("expires"), na.param("q"));
                uri(na.uri);
            }
        }
    }
    for name in [HeaderName::Route, HeaderName::RecordRoute, HeaderName::Path] {
        if let Ok(set) = msg.route_set(name) {
            for na in set {
                let _ = na.param("lr");
                uri(na.uri);
            }
        }
    }
    for name in [HeaderName::Authorization, HeaderName::ProxyAuthorization] {
        for h in msg.headers_named(name) {
            if let Some(v) = msg.str_at(h.value.clone()) {
                let _ = digest::parse_credentials(v);
            }
        }
    }
    let _ = reply::local_tag(msg);
    if msg.top_via().is_ok() {
        let r = reply::response(msg, SOURCE, 400, "Bad Request", &[("Warning", "399 x")]);
        assert!(
            Message::parse(&r, Framing::Datagram).is_ok(),
            "our 400 does not parse"
        );
    }
    rewrites(msg);
}

/// The edits the proxy makes to a request or a response it forwards; a message that parsed
/// must still parse afterwards.
fn rewrites(msg: &Message) {
    let mut rw = Rewrite::new(msg);
    if msg.is_request() {
        if let Ok(via) = msg.top_via() {
            rw.force_via_rport(&via, SOURCE);
        }
        rw.push_via("SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bKfuzz");
        rw.set_max_forwards(69);
        if msg
            .route_set(HeaderName::Route)
            .is_ok_and(|r| !r.is_empty())
        {
            let _ = rw.pop_route();
        }
        rw.push_record_route("<sip:198.51.100.1;lr>");
        rw.remove_headers(HeaderName::ProxyAuthorization);
        if !msg.body().is_empty() {
            rw.replace_body(b"v=0\r\n".to_vec());
        }
    } else {
        let _ = rw.pop_via();
    }
    let out = rw.finish();
    let framing = Framing::Datagram;
    if msg.defect().is_none() {
        assert!(
            Message::parse(&out, framing).is_ok(),
            "rewritten message does not parse"
        );
    } else {
        let _ = Message::parse(&out, framing);
    }
}

fn uri(text: &str) {
    if let Ok(u) = SipUri::parse(text) {
        let _ = (
            u.param("transport"),
            u.param("lr"),
            u.params(),
            u.ip(),
            u.transport(),
        );
        let s = u.with_hostport("198.51.100.1", 5060);
        let _ = SipUri::parse(&s);
        let s = u.with_hostport("2001:db8::1", 5061);
        let _ = SipUri::parse(&s);
    }
}

/// Target `sdp`: inspect an SDP body and rewrite it as an offer (every stream relayed) and as
/// an answer (some streams relayed), to an IPv4 and an IPv6 relay address.
///
/// Properties: a body that inspects cleanly rewrites cleanly with one port per stream (the
/// contract of `sdp::inspect`), the rewrite inspects again with the same number of streams,
/// and every relayed stream then carries the relay's port.
pub fn sdp(data: &[u8]) {
    let Ok(streams) = sipedge::fuzzing::sdp_inspect(data) else {
        // Whatever the body, rewriting with any port list must not panic.
        let _ = sipedge::fuzzing::sdp_rewrite(data, IpAddr::V4(Ipv4Addr::LOCALHOST), &[]);
        let _ =
            sipedge::fuzzing::sdp_rewrite(data, IpAddr::V4(Ipv4Addr::LOCALHOST), &[Some(30000)]);
        return;
    };
    let v4 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5));
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 5));
    // Offer: every stream with a non-zero port relayed. Answer: every other one.
    let offer: Vec<Option<u16>> = (0..streams.len())
        .map(|i| Some(30000 + 2 * (i % 1000) as u16))
        .collect();
    let answer: Vec<Option<u16>> = (0..streams.len())
        .map(|i| (i % 2 == 0).then_some(40000 + 2 * (i % 1000) as u16))
        .collect();
    for (addr, ports) in [(v4, &offer), (v6, &answer), (v6, &offer), (v4, &answer)] {
        let out = match sipedge::fuzzing::sdp_rewrite(data, addr, ports) {
            Ok(out) => out,
            Err(e) => panic!("inspected cleanly but the rewrite failed: {e:?}"),
        };
        let again = match sipedge::fuzzing::sdp_inspect(&out) {
            Ok(s) => s,
            Err(e) => panic!("our rewrite does not inspect: {e:?}"),
        };
        assert_eq!(again.len(), streams.len(), "stream count changed");
        for ((before, after), port) in streams.iter().zip(&again).zip(ports.iter()) {
            match port {
                Some(p) if before.port != 0 => assert_eq!(after.port, *p, "relay port"),
                _ => assert_eq!(after.port, before.port, "untouched stream changed port"),
            }
        }
    }
    // A wrong port count is our bug, reported as internal, never a panic.
    let mut short = offer.clone();
    short.push(None);
    match sipedge::fuzzing::sdp_rewrite(data, v4, &short) {
        Err(e) => assert!(e.internal, "port count error not internal: {e:?}"),
        Ok(_) => panic!("rewrite accepted a wrong port count"),
    }
}

/// Target `digest`: the `Authorization` value parser, then what the authenticator does with a
/// parsed value (check its nonce, verify its response), and the challenge built from it.
pub fn digest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = digest::parse_credentials(text) else {
        return;
    };
    let key = NonceKey::from_bytes([7; 32]);
    let _ = nonce::check(&key, &c.nonce, 1_800_000_000, 300, &c.realm);
    let ha1 = digest::ha1(c.algorithm, &c.username, &c.realm, "secret");
    for method in ["REGISTER", "INVITE"] {
        let expected = digest::expected_response(c.algorithm, &ha1, method, &c);
        // The right response verifies; this one only when the client sent exactly it.
        let mut right = c.clone();
        right.response = expected.clone().into();
        assert!(digest::verify(&ha1, method, &right), "own response refused");
        assert_eq!(
            digest::verify(&ha1, method, &c),
            c.response.eq_ignore_ascii_case(&expected)
        );
    }
    let opaque = c.opaque.as_deref().unwrap_or("");
    let ch = digest::challenge(c.algorithm, &c.realm, &c.nonce, opaque, true);
    let _ = digest::parse_credentials(&ch);
}

/// Target `rtp`: the RTP and RTCP views on the raw input, then the relay core fed a sequence
/// of datagrams cut from the input, which drives the latch policy and the receiver statistics.
///
/// Input layout for the relay part: records of `[selector, len, bytes...]`; the selector picks
/// the local port (caller/callee, RTP/RTCP), the source address, and how far the clock moves.
pub fn rtp(data: &[u8]) {
    use sipedge_relay::sans_io::{RtcpView, RtpView, is_misdirected_rtcp, looks_like_rtcp};
    let _ = (looks_like_rtcp(data), is_misdirected_rtcp(data));
    if let Ok(v) = RtpView::new_checked(data) {
        let _ = (
            v.marker(),
            v.payload_type(),
            v.seq(),
            v.timestamp(),
            v.ssrc(),
        );
        assert_eq!(v.as_bytes().len(), data.len());
    }
    if let Ok(v) = RtcpView::new_checked(data) {
        let _ = (v.packet_type(), v.sender_ssrc(), v.as_bytes());
    }
    relay(data);
}

fn relay(data: &[u8]) {
    use sipedge_relay::sans_io::{Relay, Timeouts, Verdict};
    use sipedge_relay::{Direction, Endpoint, PortPair, SessionId, Side, StreamPorts};
    use tokio::time::Instant;

    const PORT_MIN: u16 = 20000;
    let t0 = Instant::now();
    let mut relay = Relay::new(
        PORT_MIN,
        4,
        Timeouts {
            idle: Duration::from_secs(30),
            offer: Duration::from_secs(60),
            hold: Duration::from_secs(120),
        },
    );
    let id = SessionId(1);
    let ports = StreamPorts {
        caller: PortPair {
            rtp: PORT_MIN,
            rtcp: PORT_MIN + 1,
        },
        callee: PortPair {
            rtp: PORT_MIN + 2,
            rtcp: PORT_MIN + 3,
        },
    };
    // invariant: a fresh relay has room for one session on its first port pairs.
    relay
        .add_session(t0, id, "fuzz".to_owned(), &[ports])
        .expect("session on a fresh relay");
    let ep = |host: u8, mux: bool, rate: u32| Endpoint {
        rtp: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, host)), 4000),
        rtcp: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, host)), 4001),
        rtcp_mux: mux,
        direction: Direction::SendRecv,
        clock_rate: rate,
    };
    let mode = data.first().copied().unwrap_or(0);
    let caller = ep(1, mode & 1 != 0, if mode & 2 != 0 { 48000 } else { 8000 });
    let callee = ep(2, mode & 4 != 0, if mode & 8 != 0 { 0 } else { 8000 });
    relay
        .update(
            t0,
            id,
            Side::Caller,
            &[Some(caller)],
            &[caller.rtp.ip()],
            false,
        )
        .expect("update of a known session");
    let mut now = t0;
    let mut rest = data.get(1..).unwrap_or(&[]);
    while let &[sel, len, ref tail @ ..] = rest {
        let n = usize::from(len).min(tail.len());
        let (pkt, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_millis(u64::from(sel >> 5) * 20);
        let port = PORT_MIN + u16::from(sel & 3);
        let host = if sel & 4 != 0 { 1 } else { 2 + (sel >> 3 & 3) };
        let src = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, host)),
            4000 + u16::from(sel >> 3 & 1),
        );
        match relay.on_packet(now, port, src, pkt) {
            Verdict::Forward { out_port, dst } => {
                assert!((PORT_MIN..PORT_MIN + 4).contains(&out_port), "{out_port}");
                assert_ne!(out_port, port, "forwarded out of its own port");
                let _ = dst;
            }
            Verdict::Drop(reason) => {
                let _ = reason.as_str();
            }
        }
        if sel == 0xff {
            // An answer arrives mid-stream: new SDP, re-latch window.
            relay
                .update(
                    now,
                    id,
                    Side::Callee,
                    &[Some(callee)],
                    &[callee.rtp.ip()],
                    true,
                )
                .expect("update of a live session");
        }
        if sel == 0xfe {
            relay.on_truncated(port);
        }
        if let Some(s) = relay.query(now, id) {
            let _ = s;
        }
    }
    let _ = relay.poll_timeout();
    let _ = relay.on_tick(now + Duration::from_secs(300));
    let _ = relay.close_all(now + Duration::from_secs(301));
}
