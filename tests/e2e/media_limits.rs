//! Media on a public host (issue #10 items 4, 7): an offer takes ports only for its m= lines
//! with a port, at most `media.max_streams` of them; relay sessions are bounded in total and
//! per caller; a CDR the database refuses ends up in the spool and in the database at the
//! next start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sipedge::sip::Message;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::harness::{TestServer, Ua, WAIT, binding, fresh_db};

/// An INVITE to bob from `caller` with this SDP body.
fn invite(caller: SocketAddr, call_id: &str, body: &str) -> String {
    format!(
        "INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{call_id};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=a-{call_id}\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@{caller}>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// An SDP with one m= line per entry of `ports` (0 = disabled).
fn sdp(ports: &[u16]) -> String {
    let mut s =
        String::from("v=0\r\no=- 7 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n");
    for p in ports {
        s.push_str(&format!("m=audio {p} RTP/AVP 0\r\n"));
    }
    s
}

/// The m= ports of a message's SDP, in order.
fn m_ports(m: &Message) -> Vec<u16> {
    std::str::from_utf8(m.body())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("m=audio "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// The next final response on `sock`, skipping 100 Trying.
async fn final_on(sock: &UdpSocket) -> Message {
    loop {
        let mut buf = vec![0u8; 65536];
        let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
            .await
            .expect("no answer in time")
            .unwrap();
        let m = Message::parse(&buf[..n], sipedge::sip::Framing::Datagram).unwrap();
        if m.status() != Some(100) {
            return m;
        }
    }
}

async fn server(ports: &str, media_extra: &str, bob: SocketAddr, db: &str) -> TestServer {
    let extra = format!("[media]\nports = \"{ports}\"\nmode = \"always\"\n{media_extra}");
    let srv = TestServer::start_on(db, "127.0.0.1:0", "", &extra).await;
    let b = binding("bob@example.com", format!("sip:bob@{bob}"), bob);
    srv.set_bindings(&b.aor, vec![b.clone()]).await;
    srv
}

#[tokio::test]
async fn an_offer_with_250_m_lines_is_refused_488_and_port_0_streams_take_no_ports() {
    let (alice, bob) = (Ua::new().await, Ua::new().await);
    let srv = server("42300-42399", "", bob.addr, &fresh_db()).await;

    // The attack of issue #10: 250 m= lines, every one with a port. Before: 1,000 ports held.
    let ports: Vec<u16> = (0..250).map(|i| 4000 + 2 * i).collect();
    alice
        .send(srv.udp, &invite(alice.addr, "many", &sdp(&ports)))
        .await;
    let (resp, _) = alice.recv().await;
    assert_eq!(resp.status(), Some(488), "Not Acceptable Here");
    let c = srv.media.relay().counts().await;
    assert_eq!((c.sessions, c.ports_in_use), (0, 0), "no port taken");
    assert_eq!(srv.media.refusals().too_many_streams, 1);
    assert_eq!(
        srv.media.calls(),
        0,
        "a refused offer leaves no call behind"
    );

    // One live audio line and nine disabled ones: ten m= lines, one stream to relay.
    let mut ports = vec![4000];
    ports.extend([0; 9]);
    alice
        .send(srv.udp, &invite(alice.addr, "zero", &sdp(&ports)))
        .await;
    let (inv, _) = bob.recv().await;
    assert_eq!(inv.method(), Some("INVITE"));
    let got = m_ports(&inv);
    assert_eq!(got.len(), 10, "every m= line is kept");
    assert!((42300..42400).contains(&got[0]), "audio relayed: {got:?}");
    assert!(got[1..].iter().all(|p| *p == 0), "disabled lines stay 0");
    let c = srv.media.relay().counts().await;
    assert_eq!(
        (c.sessions, c.ports_in_use),
        (1, 4),
        "one pair per side for the one live stream"
    );
    srv.stop().await;
}

/// Sends an INVITE with one audio stream from `s`.
async fn send(s: &UdpSocket, to: SocketAddr, call_id: &str) {
    let text = invite(s.local_addr().unwrap(), call_id, &sdp(&[4000]));
    s.send_to(text.as_bytes(), to).await.unwrap();
}

#[tokio::test]
async fn sessions_are_bounded_per_caller_486_and_in_total_503() {
    let bob = Ua::new().await;
    let srv = server(
        "42400-42499",
        "max_sessions = 3\nmax_sessions_per_caller = 2\n",
        bob.addr,
        &fresh_db(),
    )
    .await;
    let a1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Another caller: another source address (127.0.0.2 is on Linux's loopback).
    let a2 = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    // Two calls from the first caller reach bob; the third is refused 486.
    for id in ["c1", "c2"] {
        send(&a1, srv.udp, id).await;
        let (inv, _) = bob.recv().await;
        assert_eq!(inv.call_id().unwrap(), id);
    }
    send(&a1, srv.udp, "c3").await;
    let r = final_on(&a1).await;
    assert_eq!(r.status(), Some(486));
    // The second caller has its own allowance, up to the total of 3.
    send(&a2, srv.udp, "d1").await;
    let (inv, _) = bob.recv().await;
    assert_eq!(inv.call_id().unwrap(), "d1");
    send(&a2, srv.udp, "d2").await;
    let r = final_on(&a2).await;
    assert_eq!(r.status(), Some(503));
    let text = String::from_utf8_lossy(r.as_bytes()).into_owned();
    assert!(
        text.contains("\r\nRetry-After: 30\r\n"),
        "503 says when to come back: {text}"
    );
    assert_eq!(srv.media.sessions(), 3);
    assert_eq!(srv.media.relay().counts().await.sessions, 3);
    let refused = srv.media.refusals();
    assert_eq!((refused.caller_limit, refused.busy), (1, 1));
    srv.stop().await;
}

/// The relay cannot open a session (a socket error such as EMFILE when the process is out of
/// descriptors; here the relay has stopped under a running proxy, the same error path): the
/// offer of a `media = "always"` route is answered 503, never forwarded unrelayed.
#[tokio::test]
async fn a_relay_error_answers_503_and_forwards_nothing() {
    let (alice, bob) = (Ua::new().await, Ua::new().await);
    let srv = server("42550-42599", "", bob.addr, &fresh_db()).await;
    srv.media.relay().shutdown().await;
    alice
        .send(srv.udp, &invite(alice.addr, "nofd", &sdp(&[4000])))
        .await;
    let r = final_on(&alice.sock).await;
    assert_eq!(r.status(), Some(503));
    let refused = srv.media.refusals();
    assert_eq!((refused.relay_error, refused.busy), (1, 0));
    assert_eq!(srv.media.sessions(), 0, "the reservation is given back");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bob.recv())
            .await
            .is_err(),
        "nothing reached bob"
    );
    srv.stop().await;
}

/// A spool path of its own for a test.
fn spool(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sipedge-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

#[tokio::test]
async fn a_cdr_the_store_refuses_is_spooled_then_loaded_at_the_next_start() {
    let (alice, bob) = (Ua::new().await, Ua::new().await);
    let db = fresh_db();
    let path = spool("cdr-refused.spool");
    let extra = format!("cdr_spool = \"{}\"\n", path.display());
    let srv = server("42500-42549", &extra, bob.addr, &db).await;
    alice
        .send(srv.udp, &invite(alice.addr, "lost1", &sdp(&[4000])))
        .await;
    let (inv, _) = bob.recv().await;
    assert_eq!(inv.method(), Some("INVITE"));
    alice
        .send(srv.udp, &invite(alice.addr, "lost2", &sdp(&[4002])))
        .await;
    bob.recv().await;
    // The database goes away (the pool is shared: the media side's handle is closed too).
    srv.store.close().await;
    // The shutdown closes both calls: their CDRs cannot be written and go to the spool,
    // without waiting out the retry backoff.
    let t0 = Instant::now();
    sipedge::app::shutdown_media(&srv.media).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "shutdown not held by retries"
    );
    let (cdrs, bad) = sipedge::media::cdr::read(&path).unwrap();
    let mut ids: Vec<&str> = cdrs.iter().map(|c| c.call_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["lost1", "lost2"]);
    assert!(bad.is_empty());
    assert!(cdrs.iter().all(|c| c.reason == "shutdown"));
    srv.stop().await;

    // The next start writes them to the database and removes the spool.
    let srv = server("42500-42549", &extra, bob.addr, &db).await;
    for id in ["lost1", "lost2"] {
        let rows = srv.store.cdr_summary(id).await.unwrap();
        assert_eq!(rows.len(), 1, "{id} loaded once");
        assert_eq!(rows[0].0, "shutdown");
    }
    assert!(!path.exists(), "the spool is removed once loaded");
    srv.stop().await;
}
