//! Keepalives to NATed bindings over real UDP: OPTIONS every `nat.ping_interval`, answered
//! ones keep the binding; a phone that stops answering is removed (`nat.ping_remove`); CRLF
//! mode sends bare CRLFs.

use sipedge::registrar::location::LocationService;
use std::time::Duration;

use sipedge::sip::{Framing, Message, reply};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::harness::{TestServer, WAIT, binding};

const NAT: &str = "[nat]\nping_interval = 1\nping_failures = 2\nping_remove = true\n";

/// The next datagram and when it arrived.
async fn recv(sock: &UdpSocket) -> (Vec<u8>, Instant) {
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("no keepalive in time")
        .unwrap();
    buf.truncate(n);
    (buf, Instant::now())
}

#[tokio::test]
async fn options_keepalives_every_interval_and_unanswered_binding_removed() {
    let srv = TestServer::start("instance_id = \"test\"", NAT).await;
    let phone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut b = binding(
        "alice@example.com",
        "sip:alice@10.0.0.2:5060".into(),
        phone.local_addr().unwrap(),
    );
    b.local_socket = srv.udp;
    srv.store
        .save_bindings(&b.aor, std::slice::from_ref(&b), &[])
        .await
        .unwrap();
    srv.set_bindings(&b.aor, vec![b.clone()]).await;

    // Answer three pings; they come one interval apart.
    let mut arrivals = Vec::new();
    for _ in 0..3 {
        let (bytes, at) = recv(&phone).await;
        let ping = Message::parse(&bytes, Framing::Datagram).unwrap();
        assert_eq!(ping.method(), Some("OPTIONS"));
        assert_eq!(ping.request_uri(), Some("sip:alice@10.0.0.2:5060"));
        assert!(ping.from().unwrap().tag().is_some() && ping.call_id().is_ok());
        arrivals.push(at);
        let ok = reply::response(&ping, srv.udp, 200, "OK", &[]);
        phone.send_to(&ok, srv.udp).await.unwrap();
    }
    for w in arrivals.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap > Duration::from_millis(600) && gap < Duration::from_millis(1600),
            "ping interval {gap:?}, configured 1 s"
        );
    }
    assert_eq!(srv.location.lookup(&b.aor, 0).len(), 1, "answered: kept");

    // Stop answering: after two misses the binding goes, from memory and from the store.
    let deadline = Instant::now() + Duration::from_secs(8);
    while !srv.location.lookup(&b.aor, 0).is_empty() {
        assert!(Instant::now() < deadline, "unanswered binding not removed");
        let _ = recv(&phone).await;
    }
    // The store follows right after memory.
    while !srv.store.load_bindings(0).await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "unanswered binding still in the store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn crlf_keepalives() {
    let srv = TestServer::start(
        "instance_id = \"test\"",
        "[nat]\nping_interval = 1\nping_method = \"crlf\"\n",
    )
    .await;
    let phone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut b = binding(
        "bob@example.com",
        "sip:bob@192.168.1.7".into(),
        phone.local_addr().unwrap(),
    );
    b.local_socket = srv.udp;
    srv.set_bindings(&b.aor, vec![b.clone()]).await;
    for _ in 0..2 {
        assert_eq!(recv(&phone).await.0, b"\r\n\r\n");
    }
    // CRLF gets no answer and is never counted as a miss.
    assert_eq!(srv.location.lookup(&b.aor, 0).len(), 1);
    srv.stop().await;
}
