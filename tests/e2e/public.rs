//! Running on a public host (issue #10): what an unauthenticated outsider sends never makes
//! sipedge send to an address of their choosing, a peer that does not read stalls nobody,
//! and what one peer can hold is bounded. Each test plays the attacker over real sockets and
//! asserts what the victim (or everyone else) sees on the wire.

use std::net::SocketAddr;
use std::time::Duration;

use sipedge::sip::{Framing, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

use crate::harness::{TestServer, Ua, request, udp_exchange};

/// An in-dialog request (To tag) from `attacker` to `ruri`, with `route` (may be empty).
fn in_dialog(method: &str, ruri: &str, attacker: SocketAddr, route: &str, id: &str) -> String {
    let route = if route.is_empty() {
        String::new()
    } else {
        format!("Route: {route}\r\n")
    };
    format!(
        "{method} {ruri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {attacker};branch=z9hG4bK-{id};rport\r\n\
Max-Forwards: 70\r\n\
{route}From: <sip:mallory@example.com>;tag=m-{id}\r\n\
To: <{ruri}>;tag=v-{id}\r\n\
Call-ID: {id}\r\n\
CSeq: 1 {method}\r\n\
Content-Length: 0\r\n\r\n"
    )
}

/// The seed's provider route (proxy authentication) to `hop`.
fn provider_route(hop: SocketAddr) -> String {
    format!(
        "[[route]]\nname = \"provider\"\nuser = '^1[0-9]{{10}}$'\nnext_hop = \"{hop}\"\nauth = true\n"
    )
}

/// The seed's PBX route (3-4 digits) to `hop`, without media.
fn pbx_route(hop: SocketAddr) -> String {
    format!(
        "[[route]]\nname = \"pbx\"\nuser = '^[0-9]{{3,4}}$'\nnext_hop = \"{hop}\"\nmedia = \"never\"\n"
    )
}

#[tokio::test]
async fn forged_routes_flow_tokens_acks_and_stray_responses_reach_nobody() {
    let victim = Ua::new().await;
    let provider = Ua::new().await;
    let srv = TestServer::start("", &provider_route(provider.addr)).await;
    let mallory = Ua::new().await;
    let us = format!("sip:127.0.0.1:{}", srv.udp.port());
    let v = victim.addr;
    let status = |m: &Message| m.status();

    // 1. A Route naming us without our MAC, and a foreign Request-URI.
    let bye = in_dialog(
        "BYE",
        &format!("sip:x@{v}"),
        mallory.addr,
        &format!("<{us};lr>"),
        "r1",
    );
    assert_eq!(
        status(&udp_exchange(&mallory.sock, srv.udp, bye.as_bytes()).await),
        Some(403)
    );
    // 2. A forged flow token pointing at the victim.
    let forged = format!(
        "<{us};lr;fc=u~{}~{};fe=u~{}~{};m=0123456789abcdef>",
        v.ip(),
        v.port(),
        v.ip(),
        v.port()
    );
    let bye = in_dialog("BYE", "sip:x@192.0.2.1", mallory.addr, &forged, "r2");
    assert_eq!(
        status(&udp_exchange(&mallory.sock, srv.udp, bye.as_bytes()).await),
        Some(403)
    );
    // 3. A foreign Route alone.
    let bye = in_dialog(
        "BYE",
        "sip:x@192.0.2.1",
        mallory.addr,
        &format!("<sip:{v};lr>"),
        "r3",
    );
    assert_eq!(
        status(&udp_exchange(&mallory.sock, srv.udp, bye.as_bytes()).await),
        Some(403)
    );
    // 4. An in-dialog INVITE to a provider number with a Route of ours it did not get from us:
    //    no way around the provider route's proxy authentication.
    let inv = in_dialog(
        "INVITE",
        "sip:15551234567@example.com",
        mallory.addr,
        &format!("<{us};lr>"),
        "r4",
    );
    assert_eq!(
        status(&udp_exchange(&mallory.sock, srv.udp, inv.as_bytes()).await),
        Some(403)
    );
    // 5. ACKs without a dialog of ours: with no To tag, or with a Route we did not sign. No
    //    answer either way.
    mallory
        .send(
            srv.udp,
            &request("ACK", &format!("sip:x@{v}"), mallory.addr, "r5", ""),
        )
        .await;
    mallory
        .send(
            srv.udp,
            &in_dialog(
                "ACK",
                &format!("sip:x@{v}"),
                mallory.addr,
                &format!("<{us};lr>"),
                "r6",
            ),
        )
        .await;
    // 6. A stray 200 with a top Via that looks like ours but carries no valid MAC, and the
    //    victim as the next Via.
    let stray = format!(
        "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bK-se-00000000-0000000000000000-000000000000\r\n\
Via: SIP/2.0/UDP {v};branch=z9hG4bK-victim;rport\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n\
Call-ID: stray\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        srv.udp.port()
    );
    mallory.send(srv.udp, &stray).await;

    victim.silent().await;
    provider.silent().await;
    mallory.silent().await;
    srv.stop().await;
}

#[tokio::test]
async fn a_challenge_is_one_datagram() {
    let provider = Ua::new().await;
    let srv = TestServer::start("", &provider_route(provider.addr)).await;
    let caller = Ua::new().await;
    let inv = request(
        "INVITE",
        "sip:15551234567@example.com",
        caller.addr,
        "ch1",
        "",
    );
    caller.send(srv.udp, &inv).await;
    let (first, _) = caller.recv().await;
    assert_eq!(first.status(), Some(407));
    // An INVITE server transaction would retransmit a 407 after T1 (500 ms), 1 s, 2 s...
    let mut buf = vec![0u8; 65536];
    let more =
        tokio::time::timeout(Duration::from_millis(1300), caller.sock.recv_from(&mut buf)).await;
    assert!(more.is_err(), "the challenge was retransmitted");
    // The INVITE retransmitted by the caller draws one more 407, no more.
    caller.send(srv.udp, &inv).await;
    let (again, _) = caller.recv().await;
    assert_eq!(again.status(), Some(407));
    caller.silent().await;
    provider.silent().await;
    srv.stop().await;
}

#[tokio::test]
async fn natted_register_without_rport_is_answered_at_its_source_port() {
    let srv = TestServer::start("", "").await;
    let phone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // The phone writes its private address and port in Via, without rport (an old phone
    // behind NAT); the router maps it to the socket above.
    let text = "REGISTER sip:example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK-nr1\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=nr1\r\nTo: <sip:alice@example.com>\r\n\
Call-ID: nr1\r\nCSeq: 1 REGISTER\r\nContact: <sip:alice@10.0.0.2:5060>\r\n\
Content-Length: 0\r\n\r\n";
    let answer = udp_exchange(&phone, srv.udp, text.as_bytes()).await;
    assert_eq!(answer.status(), Some(401));
    srv.stop().await;
}

/// OPTIONS to the server itself over UDP, answered within a second.
async fn ping_within_a_second(srv: &TestServer, sock: &UdpSocket, n: usize) -> Duration {
    let start = Instant::now();
    let text = request(
        "OPTIONS",
        &format!("sip:127.0.0.1:{}", srv.udp.port()),
        sock.local_addr().unwrap(),
        &format!("p{n}"),
        "",
    );
    sock.send_to(text.as_bytes(), srv.udp).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let (len, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf))
        .await
        .expect("UDP OPTIONS not answered within 1 s")
        .unwrap();
    let m = Message::parse(&buf[..len], Framing::Datagram).unwrap();
    assert_eq!(m.status(), Some(200));
    start.elapsed()
}

/// A TCP socket with a small receive buffer (a peer that reads little or nothing).
async fn tcp_small_rcvbuf(to: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(to).await.unwrap()
}

/// An OPTIONS to the server over `s`, answered 200 within 2 s.
async fn tcp_options_ok(srv: &TestServer, s: &mut TcpStream, id: &str) {
    let t = request(
        "OPTIONS",
        &format!("sip:127.0.0.1:{}", srv.tcp.port()),
        s.local_addr().unwrap(),
        id,
        "",
    )
    .replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    s.write_all(t.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("no answer over TCP in time")
        .unwrap();
    assert!(buf[..n].starts_with(b"SIP/2.0 200"), "{id}");
}

/// Reads until the server closes the connection; `None` if it stays open past `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<usize> {
    let deadline = Instant::now() + limit;
    let mut total = 0;
    let mut buf = vec![0u8; 65536];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(total),
            Ok(Ok(n)) => total += n,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_stalls_nobody_and_is_disconnected() {
    let srv = TestServer::start(
        "",
        "[limits]\ntcp_send_queue = 65535\ntcp_write_timeout = 2\n",
    )
    .await;
    let mut lazy = tcp_small_rcvbuf(srv.tcp).await;
    let me = lazy.local_addr().unwrap();
    // 4,000 OPTIONS pipelined, never reading the answers (about 1.5 MB of them).
    let mut burst = Vec::new();
    for i in 0..4000 {
        let t = request(
            "OPTIONS",
            &format!("sip:127.0.0.1:{}", srv.tcp.port()),
            me,
            &format!("l{i}"),
            "",
        )
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP");
        burst.extend_from_slice(t.as_bytes());
    }
    let writer = tokio::spawn(async move {
        // The server may close before it read everything: a write error is expected then.
        let _ = lazy.write_all(&burst).await;
        lazy
    });
    // Meanwhile everyone else is served at once.
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut worst = Duration::ZERO;
    for n in 0..20 {
        worst = worst.max(ping_within_a_second(&srv, &other, n).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lazy = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the burst was not taken")
        .unwrap();
    assert!(
        closed_within(&mut lazy, Duration::from_secs(10))
            .await
            .is_some(),
        "the connection of a peer that does not read stays open"
    );
    assert!(worst < Duration::from_secs(1), "worst UDP answer {worst:?}");
    // The server still serves TCP to others.
    let mut fresh = TcpStream::connect(srv.tcp).await.unwrap();
    tcp_options_ok(&srv, &mut fresh, "fresh").await;
    srv.stop().await;
}

#[tokio::test]
async fn tcp_connections_per_ip_are_bounded_and_slow_messages_cut_off() {
    let srv = TestServer::start(
        "",
        "[limits]\ntcp_connections_per_ip = 2\ntcp_message_timeout = 1\n",
    )
    .await;
    let mut a = TcpStream::connect(srv.tcp).await.unwrap();
    let mut b = TcpStream::connect(srv.tcp).await.unwrap();
    let mut c = TcpStream::connect(srv.tcp).await.unwrap();
    // The third is closed without being read.
    assert!(
        closed_within(&mut c, Duration::from_secs(2))
            .await
            .is_some(),
        "third connection kept"
    );
    for (s, id) in [(&mut a, "a"), (&mut b, "b")] {
        tcp_options_ok(&srv, s, id).await;
    }
    // Slowloris: half a message, then nothing. Closed after limits.tcp_message_timeout.
    a.write_all(
        b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bK-s\r\n",
    )
    .await
    .unwrap();
    let start = Instant::now();
    assert!(
        closed_within(&mut a, Duration::from_secs(4))
            .await
            .is_some(),
        "slow message kept"
    );
    assert!(start.elapsed() >= Duration::from_millis(900));
    // Its place is free again.
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut d = TcpStream::connect(srv.tcp).await.unwrap();
    tcp_options_ok(&srv, &mut d, "d").await;
    srv.stop().await;
}

#[tokio::test]
async fn pending_transactions_per_source_are_bounded() {
    let pbx = Ua::new().await;
    let srv = TestServer::start(
        "",
        &format!("[limits]\ntransactions_per_ip = 2\n{}", pbx_route(pbx.addr)),
    )
    .await;
    let caller = Ua::new().await;
    let invite = |id: &str| request("INVITE", "sip:1234@example.com", caller.addr, id, "");
    // Two INVITEs ring at a PBX that never answers; the third is refused.
    for id in ["t1", "t2"] {
        caller.send(srv.udp, &invite(id)).await;
        let (fwd, _) = pbx.recv().await;
        assert_eq!(fwd.method(), Some("INVITE"));
    }
    caller.send(srv.udp, &invite("t3")).await;
    let (refused, _) = caller.recv().await;
    assert_eq!(refused.status(), Some(503));
    assert_eq!(refused.call_id().ok(), Some("t3"));
    // Another source is not affected.
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let text = request(
        "INVITE",
        "sip:1234@example.com",
        other.local_addr().unwrap(),
        "t4",
        "",
    );
    other.send_to(text.as_bytes(), srv.udp).await.unwrap();
    let (fwd, _) = pbx.recv().await;
    assert_eq!(fwd.call_id().ok(), Some("t4"));
    srv.stop().await;
}

#[tokio::test]
async fn outsized_requests_share_a_byte_budget() {
    let pbx = Ua::new().await;
    let srv = TestServer::start(
        "",
        &format!(
            "[limits]\ntransaction_memory = 200000\n{}",
            pbx_route(pbx.addr)
        ),
    )
    .await;
    let caller = Ua::new().await;
    // 40 KB of headers a real phone never sends; the next hop never answers.
    let padding = format!("X-Pad: {}\r\n", "p".repeat(40_000));
    let big = |id: &str| request("INVITE", "sip:1234@example.com", caller.addr, id, &padding);
    caller.send(srv.udp, &big("big1")).await;
    let (fwd, _) = pbx.recv().await;
    assert_eq!(fwd.call_id().ok(), Some("big1"));
    caller.send(srv.udp, &big("big2")).await;
    let (refused, _) = caller.recv().await;
    assert_eq!(
        refused.status(),
        Some(503),
        "over limits.transaction_memory"
    );
    // Requests of a normal size are not affected.
    caller
        .send(
            srv.udp,
            &request("INVITE", "sip:1234@example.com", caller.addr, "small", ""),
        )
        .await;
    let (fwd, _) = pbx.recv().await;
    assert_eq!(fwd.call_id().ok(), Some("small"));
    srv.stop().await;
}
