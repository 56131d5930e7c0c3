//! Parse throughput: sipedge's indexer against rsip 0.4 on the same messages, in one run.
//!
//!   cargo bench --bench parse
//!
//! Prints messages/s for each parser and the ratio. "index" is what the proxy does per
//! message (parse + top Via + From/To tags + Call-ID + CSeq); rsip's `SipMessage::try_from`
//! parses every header into typed values up front, which is its only mode.

#![allow(clippy::disallowed_methods, clippy::unwrap_used)] // a benchmark reads the clock

use std::hint::black_box;
use std::time::{Duration, Instant};

use sipedge::sip::{Framing, Message};

const INVITE: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.example.com>\r\n\
Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, SUBSCRIBE, INFO\r\n\
Supported: replaces, timer\r\n\
User-Agent: Softphone/1.2.3\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 142\r\n\
\r\n\
v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 pc33.atlanta.example.com\r\n\
s=-\r\n\
c=IN IP4 192.0.2.101\r\n\
t=0 0\r\n\
m=audio 49172 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n";

const RESPONSE: &str = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP server10.biloxi.example.com;branch=z9hG4bKnashds8;received=192.0.2.3\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;received=192.0.2.1\r\n\
To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:bob@192.0.2.4>\r\n\
Content-Length: 0\r\n\
\r\n";

fn measure(name: &str, mut f: impl FnMut() -> bool) -> f64 {
    // Warm up, then run for a fixed wall time (bounded).
    for _ in 0..10_000 {
        assert!(f());
    }
    let budget = Duration::from_millis(1500);
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < budget {
        for _ in 0..1000 {
            assert!(black_box(f()));
        }
        n += 1000;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!("{name:<40} {rate:>12.0} msg/s");
    rate
}

fn ours_index(text: &str) -> bool {
    let m = Message::parse(black_box(text.as_bytes()), Framing::Datagram).unwrap();
    let via = m.top_via().unwrap();
    let ok = via.branch().is_some()
        && m.from().unwrap().tag().is_some()
        && m.call_id().is_ok()
        && m.cseq().is_ok();
    black_box(&m);
    ok
}

fn rsip_parse(text: &str) -> bool {
    let m = rsip::SipMessage::try_from(black_box(text)).unwrap();
    black_box(&m);
    true
}

/// How many of the corpus messages that sipedge accepts rsip also accepts, and which not.
fn corpus_acceptance() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sip");
    let manifest = std::fs::read_to_string(dir.join("corpus.toml")).unwrap();
    let table: toml::Table = manifest.parse().unwrap();
    let cases = table["case"].as_array().unwrap();
    let (mut ok, mut rsip_ok, mut rejected) = (0, 0, Vec::new());
    for case in cases {
        if case["verdict"].as_str() != Some("ok") {
            continue;
        }
        let file = case["file"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        ok += 1;
        match rsip::SipMessage::try_from(bytes.as_slice()) {
            Ok(_) => rsip_ok += 1,
            Err(_) => rejected.push(file.to_owned()),
        }
    }
    println!("corpus: sipedge accepts {ok} valid messages; rsip 0.4 accepts {rsip_ok}");
    println!("  rsip rejects: {}", rejected.join(", "));
}

fn main() {
    corpus_acceptance();
    // rsip must accept the messages for the comparison to be fair.
    assert!(rsip::SipMessage::try_from(INVITE).is_ok());
    assert!(rsip::SipMessage::try_from(RESPONSE).is_ok());
    for (label, text) in [("INVITE with SDP", INVITE), ("200 OK, two Vias", RESPONSE)] {
        println!("{label} ({} bytes)", text.len());
        let ours = measure("  sipedge Message::parse + typed reads", || {
            ours_index(text)
        });
        let theirs = measure("  rsip 0.4 SipMessage::try_from", || rsip_parse(text));
        println!("  ratio sipedge/rsip: {:.2}x", ours / theirs);
    }
}
