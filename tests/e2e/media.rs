//! Relayed media over real UDP: a caller and a registered callee exchange SDP through sipedge,
//! then RTP through the relay. Asserts the SDP each side receives, that packets arrive from
//! the relay port advertised to the receiver with their payload unchanged, the CDR figures,
//! and that every way a call ends gives all of its ports back.

use std::net::SocketAddr;
use std::time::Duration;

use sipedge::sip::{HeaderName, Message, reply};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::harness::{TestServer, Ua, WAIT, binding};

fn media_config(ports: &str) -> String {
    format!(
        "[media]\nports = \"{ports}\"\nmode = \"always\"\nidle_timeout = 2\noffer_timeout = 2\n"
    )
}

pub(crate) fn sdp(rtp_port: u16) -> String {
    format!(
        "v=0\r\no=- 7 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
    )
}

/// (connection address, first m= port, o= version) of a message's SDP.
pub(crate) fn sdp_of(m: &Message) -> (String, u16, String) {
    let body = std::str::from_utf8(m.body()).unwrap();
    let line = |p: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(p))
            .unwrap_or_else(|| panic!("no {p} in {body}"))
            .to_owned()
    };
    let port = line("m=audio ").split(' ').next().unwrap().parse().unwrap();
    let version = line("o=").split(' ').nth(2).unwrap().to_owned();
    (line("c=IN IP4 "), port, version)
}

/// `text` (a message with `Content-Length: 0`) with an SDP body.
fn with_sdp(text: &str, body: &str) -> String {
    text.replacen(
        "Content-Length: 0\r\n\r\n",
        &format!(
            "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        1,
    )
}

pub(crate) fn invite(caller: SocketAddr, call_id: &str, rtp: u16) -> String {
    let text = format!(
        "INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{call_id};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=a-{call_id}\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@{caller}>\r\n\
Content-Length: 0\r\n\r\n"
    );
    with_sdp(&text, &sdp(rtp))
}

/// The callee's answer: Record-Route copied, a fixed To-tag, optional SDP.
pub(crate) fn answer(
    req: &Message,
    from: SocketAddr,
    callee: SocketAddr,
    status: u16,
    body: Option<&str>,
) -> Vec<u8> {
    let contact = format!("<sip:bob@{callee}>");
    let mut extra: Vec<(&str, &str)> = req
        .headers_named(HeaderName::RecordRoute)
        .map(|h| ("Record-Route", req.str_at(h.value.clone()).unwrap()))
        .collect();
    extra.push(("Contact", &contact));
    let text = String::from_utf8(reply::response(req, from, status, "Answer", &extra)).unwrap();
    let text = text.replace(&reply::local_tag(req), "b-tag");
    match body {
        Some(b) => with_sdp(&text, b),
        None => text,
    }
    .into_bytes()
}

/// A request from the caller inside the dialog, along the route set.
pub(crate) fn in_dialog(
    method: &str,
    cseq: u32,
    caller: SocketAddr,
    callee: SocketAddr,
    call_id: &str,
    routes: &[String],
) -> String {
    format!(
        "{method} sip:bob@{callee} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{method}-{call_id};rport\r\n\
Max-Forwards: 70\r\n\
Route: {}\r\n\
From: <sip:alice@example.com>;tag=a-{call_id}\r\n\
To: <sip:bob@example.com>;tag=b-tag\r\n\
Call-ID: {call_id}\r\n\
CSeq: {cseq} {method}\r\n\
Content-Length: 0\r\n\r\n",
        routes.join(", ")
    )
}

pub(crate) fn routes_of(m: &Message) -> Vec<String> {
    m.route_set(HeaderName::RecordRoute)
        .unwrap()
        .iter()
        .map(|r| format!("<{}>", r.uri))
        .collect()
}

/// A 172-byte RTP packet (PCMU, 20 ms).
pub(crate) fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend((0..160).map(|i| (i as u8) ^ (seq as u8)));
    p
}

/// Receives `n` datagrams; asserts each comes from `relay` and is one of the sent packets.
async fn expect_rtp(sock: &UdpSocket, relay: SocketAddr, n: usize, ssrc: u32) {
    let mut buf = [0u8; 2048];
    for _ in 0..n {
        let (len, from) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
            .await
            .expect("RTP did not arrive")
            .unwrap();
        assert_eq!(
            from, relay,
            "media comes from the port advertised to the receiver"
        );
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        assert_eq!(&buf[..len], rtp(seq, ssrc).as_slice(), "payload unchanged");
    }
}

/// The server with one registered callee, bob, at `callee`.
pub(crate) async fn server(ports: &str, callee: SocketAddr) -> TestServer {
    let srv = TestServer::start("", &media_config(ports)).await;
    let b = binding("bob@example.com", format!("sip:bob@{callee}"), callee);
    srv.set_bindings(&b.aor, vec![b.clone()]).await;
    srv
}

/// Polls until the call has its CDR row; returns (reason, status, caller pkts, callee pkts).
async fn cdr(srv: &TestServer, call_id: &str) -> (String, i64, i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = srv.store.cdr_summary(call_id).await.unwrap();
        if let Some(r) = rows.first() {
            assert_eq!(rows.len(), 1, "one CDR per call");
            return r.clone();
        }
        assert!(Instant::now() < deadline, "no CDR for {call_id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until the relay holds no session and no port.
async fn relay_empty(srv: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = srv.media.relay().counts().await;
        if c.sessions == 0 && c.ports_in_use == 0 && srv.media.calls() == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left allocated: {c:?}, calls {}",
            srv.media.calls()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn call_with_media_both_ways_through_the_relay() {
    let (alice, bob) = (Ua::new().await, Ua::new().await);
    let (alice_rtp, bob_rtp) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    let a_port = alice_rtp.local_addr().unwrap().port();
    let b_port = bob_rtp.local_addr().unwrap().port();
    let srv = server("42000-42049", bob.addr).await;
    let in_range = |p: u16| (42000..=42049).contains(&p) && p % 2 == 0;

    alice.send(srv.udp, &invite(alice.addr, "m1", a_port)).await;
    let (inv, from) = bob.recv().await;
    let (c, to_bob, version) = sdp_of(&inv);
    assert_eq!(c, "127.0.0.1");
    assert!(
        in_range(to_bob),
        "offer rewritten to a relay port: {to_bob}"
    );
    assert_eq!(version, "2", "o= version bumped");
    bob.sock
        .send_to(&answer(&inv, from, bob.addr, 200, Some(&sdp(b_port))), from)
        .await
        .unwrap();
    let (ok, _) = alice.recv().await;
    assert_eq!(ok.status(), Some(200));
    let (c, to_alice, _) = sdp_of(&ok);
    assert_eq!(c, "127.0.0.1");
    assert!(
        in_range(to_alice) && to_alice != to_bob,
        "answer rewritten: {to_alice}"
    );
    // The INVITE's transaction is finished and handed to the shared table; Bob retransmits
    // his 200 (he has no ACK yet): Alice gets the relay's answer again, never Bob's own SDP.
    srv.finished_are((1, 1)).await;
    bob.sock
        .send_to(&answer(&inv, from, bob.addr, 200, Some(&sdp(b_port))), from)
        .await
        .unwrap();
    let (ok_again, _) = alice.recv().await;
    assert_eq!(ok_again.status(), Some(200));
    assert_eq!(sdp_of(&ok_again).1, to_alice, "the relay's answer again");
    let routes = routes_of(&ok);
    alice
        .send(
            srv.udp,
            &in_dialog("ACK", 1, alice.addr, bob.addr, "m1", &routes),
        )
        .await;
    let (ack, _) = bob.recv().await;
    assert_eq!(ack.method(), Some("ACK"));

    // Alice sends 49 packets (seq 25 is "lost"), Bob 40.
    let relay_a: SocketAddr = format!("127.0.0.1:{to_alice}").parse().unwrap();
    let relay_b: SocketAddr = format!("127.0.0.1:{to_bob}").parse().unwrap();
    for seq in (0..50u16).filter(|s| *s != 25) {
        alice_rtp
            .send_to(&rtp(seq, 0xa11ce), relay_a)
            .await
            .unwrap();
    }
    expect_rtp(&bob_rtp, relay_b, 49, 0xa11ce).await;
    for seq in 0..40u16 {
        bob_rtp.send_to(&rtp(seq, 0xb0b), relay_b).await.unwrap();
    }
    expect_rtp(&alice_rtp, relay_a, 40, 0xb0b).await;

    // Bob moves to another port with a re-INVITE (rtpproxy#47, rtpengine#1416): the relay
    // ports stay, Bob's new source is learnt in the re-latch window, his old one is refused.
    let bob_rtp2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b_port2 = bob_rtp2.local_addr().unwrap().port();
    let reinvite = format!(
        "INVITE sip:alice@{alice} SIP/2.0\r\n\
Via: SIP/2.0/UDP {bob};branch=z9hG4bK-re-m1;rport\r\n\
Max-Forwards: 70\r\n\
Route: {route}\r\n\
From: <sip:bob@example.com>;tag=b-tag\r\n\
To: <sip:alice@example.com>;tag=a-m1\r\n\
Call-ID: m1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:bob@{bob}>\r\n\
Content-Length: 0\r\n\r\n",
        alice = alice.addr,
        bob = bob.addr,
        route = routes_of(&inv).join(", "),
    );
    bob.send(srv.udp, &with_sdp(&reinvite, &sdp(b_port2))).await;
    let (re, re_from) = alice.recv().await;
    assert_eq!(re.method(), Some("INVITE"));
    let (_, port, version) = sdp_of(&re);
    assert_eq!(port, to_alice, "same relay port after the re-INVITE");
    assert_eq!(version, "2");
    let ok2 = answer(&re, re_from, alice.addr, 200, Some(&sdp(a_port)));
    alice.sock.send_to(&ok2, re_from).await.unwrap();
    let (re_ok, _) = bob.recv().await;
    assert_eq!(re_ok.status(), Some(200));
    assert_eq!(sdp_of(&re_ok).1, to_bob, "same relay port in the answer");
    for seq in 40..50u16 {
        bob_rtp2.send_to(&rtp(seq, 0xb0b), relay_b).await.unwrap();
    }
    expect_rtp(&alice_rtp, relay_a, 10, 0xb0b).await;
    // The old source is a stranger now.
    bob_rtp.send_to(&rtp(50, 0xb0b), relay_b).await.unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), alice_rtp.recv_from(&mut buf))
            .await
            .is_err(),
        "a packet from Bob's old port was forwarded"
    );

    alice
        .send(
            srv.udp,
            &in_dialog("BYE", 2, alice.addr, bob.addr, "m1", &routes),
        )
        .await;
    let (bye, from) = bob.recv().await;
    assert_eq!(bye.method(), Some("BYE"));
    bob.sock
        .send_to(&answer(&bye, from, bob.addr, 200, None), from)
        .await
        .unwrap();
    let (bye_ok, _) = alice.recv().await;
    assert_eq!(bye_ok.status(), Some(200));

    let (reason, status, caller_pkts, callee_pkts) = cdr(&srv, "m1").await;
    assert_eq!((reason.as_str(), status), ("bye", 200));
    assert_eq!((caller_pkts, callee_pkts), (49, 50));
    relay_empty(&srv).await;
    srv.stop().await;
}

#[tokio::test]
async fn every_ending_gives_the_ports_back() {
    let (alice, bob) = (Ua::new().await, Ua::new().await);
    // Short transaction timers: the never-answered offer's INVITE ends with a 408 in 3 s.
    let srv = TestServer::start(
        "fr_timer = 3\nfr_inv_timer = 3",
        &media_config("42100-42149"),
    )
    .await;
    let b = binding("bob@example.com", format!("sip:bob@{}", bob.addr), bob.addr);
    srv.set_bindings(&b.aor, vec![b.clone()]).await;

    // CANCEL while ringing.
    alice.send(srv.udp, &invite(alice.addr, "c1", 4000)).await;
    let (inv, from) = bob.recv().await;
    bob.sock
        .send_to(&answer(&inv, from, bob.addr, 180, None), from)
        .await
        .unwrap();
    let (ringing, _) = alice.recv().await;
    assert_eq!(ringing.status(), Some(180));
    let cancel = format!(
        "CANCEL sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bK-c1;rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a-c1\r\nTo: <sip:bob@example.com>\r\n\
         Call-ID: c1\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n",
        alice.addr
    );
    alice.send(srv.udp, &cancel).await;
    let (c, cfrom) = bob.recv().await;
    assert_eq!(c.method(), Some("CANCEL"));
    bob.sock
        .send_to(&answer(&c, cfrom, bob.addr, 200, None), cfrom)
        .await
        .unwrap();
    bob.sock
        .send_to(&answer(&inv, from, bob.addr, 487, None), from)
        .await
        .unwrap();
    assert_eq!(cdr(&srv, "c1").await.0, "cancel");

    // Busy.
    alice.send(srv.udp, &invite(alice.addr, "b1", 4002)).await;
    let (inv, from) = loop {
        let (m, f) = bob.recv().await;
        if m.method() == Some("INVITE") {
            break (m, f);
        }
    };
    bob.sock
        .send_to(&answer(&inv, from, bob.addr, 486, None), from)
        .await
        .unwrap();
    let (r, s) = (cdr(&srv, "b1").await, 486);
    assert_eq!((r.0.as_str(), r.1), ("failed", s));

    // Answered, then silence and no BYE: the idle timeout (2 s) ends it.
    alice.send(srv.udp, &invite(alice.addr, "t1", 4004)).await;
    let (inv, from) = loop {
        let (m, f) = bob.recv().await;
        if m.method() == Some("INVITE") {
            break (m, f);
        }
    };
    bob.sock
        .send_to(&answer(&inv, from, bob.addr, 200, Some(&sdp(4006))), from)
        .await
        .unwrap();
    assert_eq!(cdr(&srv, "t1").await.0, "timeout");

    // An offer never answered: the offer timeout (2 s) frees the ports at once; the call is
    // reported when its INVITE ends (408 after fr_timer), with that status.
    alice.send(srv.udp, &invite(alice.addr, "o1", 4008)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.media.relay().counts().await.sessions > 0 {
        assert!(
            Instant::now() < deadline,
            "offer timeout did not free the session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (reason, status, _, _) = cdr(&srv, "o1").await;
    assert_eq!((reason.as_str(), status), ("timeout", 408));

    relay_empty(&srv).await;
    srv.stop().await;
}

#[tokio::test]
async fn forked_early_media_and_the_winning_2xx() {
    let (alice, desk, mobile) = (Ua::new().await, Ua::new().await, Ua::new().await);
    let srv = TestServer::start("", &media_config("42200-42249")).await;
    srv.set_bindings(
        "bob@example.com",
        vec![
            binding(
                "bob@example.com",
                format!("sip:bob@{}", desk.addr),
                desk.addr,
            ),
            binding(
                "bob@example.com",
                format!("sip:bob@{}", mobile.addr),
                mobile.addr,
            ),
        ],
    )
    .await;
    let alice_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let a_port = alice_rtp.local_addr().unwrap().port();
    alice.send(srv.udp, &invite(alice.addr, "f1", a_port)).await;
    let (inv_d, from_d) = desk.recv().await;
    let (inv_m, from_m) = mobile.recv().await;
    // Each fork has its own session: different relay ports in each offer.
    assert_ne!(sdp_of(&inv_d).1, sdp_of(&inv_m).1);

    // Early media from the desk phone (183 with SDP), then the mobile answers.
    let mut r183 = answer(&inv_d, from_d, desk.addr, 183, Some(&sdp(5000)));
    r183 = String::from_utf8(r183)
        .unwrap()
        .replace("b-tag", "desk-tag")
        .into_bytes();
    desk.sock.send_to(&r183, from_d).await.unwrap();
    let (early, _) = alice.recv().await;
    assert_eq!(early.status(), Some(183));
    let early_port = sdp_of(&early).1;
    let mobile_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let m_port = mobile_rtp.local_addr().unwrap().port();
    mobile
        .sock
        .send_to(
            &answer(&inv_m, from_m, mobile.addr, 200, Some(&sdp(m_port))),
            from_m,
        )
        .await
        .unwrap();
    let (ok, _) = alice.recv().await;
    assert_eq!(ok.status(), Some(200));
    let to_alice = sdp_of(&ok).1;
    assert_ne!(
        to_alice, early_port,
        "the 2xx carries the winning fork's port"
    );

    // The desk phone is cancelled; its session gives its ports back, the winner's stays.
    let (cancel, cfrom) = desk.recv().await;
    assert_eq!(cancel.method(), Some("CANCEL"));
    desk.sock
        .send_to(&answer(&cancel, cfrom, desk.addr, 200, None), cfrom)
        .await
        .unwrap();
    desk.sock
        .send_to(&answer(&inv_d, from_d, desk.addr, 487, None), from_d)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = srv.media.relay().counts().await;
        if c.sessions == 1 {
            assert_eq!(c.ports_in_use, 4, "one stream: two pairs");
            break;
        }
        assert!(Instant::now() < deadline, "loser not released: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Media flows through the winner.
    let relay_a: SocketAddr = format!("127.0.0.1:{to_alice}").parse().unwrap();
    let relay_m: SocketAddr = format!("127.0.0.1:{}", sdp_of(&inv_m).1).parse().unwrap();
    for seq in 0..5u16 {
        mobile_rtp.send_to(&rtp(seq, 7), relay_m).await.unwrap();
    }
    expect_rtp(&alice_rtp, relay_a, 5, 7).await;

    let routes = routes_of(&ok);
    alice
        .send(
            srv.udp,
            &in_dialog("BYE", 2, alice.addr, mobile.addr, "f1", &routes),
        )
        .await;
    let (bye, from) = mobile.recv().await;
    assert_eq!(bye.method(), Some("BYE"));
    mobile
        .sock
        .send_to(&answer(&bye, from, mobile.addr, 200, None), from)
        .await
        .unwrap();
    let (reason, _, _, callee_pkts) = cdr(&srv, "f1").await;
    assert_eq!((reason.as_str(), callee_pkts), ("bye", 5));
    relay_empty(&srv).await;
    srv.stop().await;
}
