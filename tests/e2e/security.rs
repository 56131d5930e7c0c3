//! Floods and password guessing over real UDP: a source guessing passwords is answered a
//! handful of times and then ignored, while another source registers as usual; a source
//! flooding OPTIONS is cut off at the rate limit, on UDP and TCP, while another is still
//! answered. The second source is 127.0.0.2 (Linux routes all of 127/8 to loopback), and the
//! test config trusts nothing (the default trusts loopback).

use std::net::SocketAddr;
use std::time::Duration;

use md5::{Digest, Md5};
use sipedge::sip::{HeaderName, Message};
use sipedge::store::Subscriber;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

use crate::harness::{TestServer, WAIT, request, udp_recv};

fn md5_hex(s: &str) -> String {
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn nonce_of(m: &Message) -> String {
    let ch = m.header_str(HeaderName::WwwAuthenticate).unwrap();
    let at = ch.find("nonce=\"").unwrap() + 7;
    ch[at..].split('"').next().unwrap().to_owned()
}

/// A phone registering alice from `ip`.
struct Phone {
    sock: UdpSocket,
    addr: SocketAddr,
    cseq: u32,
}

impl Phone {
    async fn on(ip: &str) -> Self {
        let sock = UdpSocket::bind((ip, 0)).await.unwrap();
        let addr = sock.local_addr().unwrap();
        Self {
            sock,
            addr,
            cseq: 0,
        }
    }

    fn register(&mut self, auth: &str) -> String {
        self.cseq += 1;
        let (addr, cseq) = (self.addr, self.cseq);
        format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP {addr};branch=z9hG4bK-r{cseq}-{port};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=t{cseq}\r\n\
To: <sip:alice@example.com>\r\n\
Call-ID: reg-{port}\r\n\
CSeq: {cseq} REGISTER\r\n\
Contact: <sip:alice@{addr}>\r\n\
{auth}Content-Length: 0\r\n\r\n",
            port = addr.port()
        )
    }

    /// Sends and returns the answer, or `None` after `wait`.
    async fn exchange(&self, srv: SocketAddr, text: &str, wait: Duration) -> Option<Message> {
        self.sock.send_to(text.as_bytes(), srv).await.unwrap();
        let mut buf = vec![0u8; 65536];
        let (n, _) = tokio::time::timeout(wait, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some(Message::parse(&buf[..n], sipedge::sip::Framing::Datagram).unwrap())
    }

    /// One full attempt: REGISTER, 401, REGISTER with credentials for `password`. Returns the
    /// status of the final answer, or `None` when the server did not answer within `wait`.
    async fn attempt(&mut self, srv: SocketAddr, password: &str, wait: Duration) -> Option<u16> {
        let first = self.register("");
        let ch = self.exchange(srv, &first, wait).await?;
        if ch.status() != Some(401) {
            return ch.status();
        }
        let nonce = nonce_of(&ch);
        let uri = "sip:example.com";
        let ha1 = md5_hex(&format!("alice:example.com:{password}"));
        let ha2 = md5_hex(&format!("REGISTER:{uri}"));
        let response = md5_hex(&format!("{ha1}:{nonce}:00000001:c0ffee:auth:{ha2}"));
        let auth = format!(
            "Authorization: Digest username=\"alice\", realm=\"example.com\", nonce=\"{nonce}\", \
uri=\"{uri}\", response=\"{response}\", algorithm=MD5, qop=auth, nc=00000001, cnonce=\"c0ffee\"\r\n"
        );
        let second = self.register(&auth);
        self.exchange(srv, &second, wait).await?.status()
    }
}

#[tokio::test]
async fn password_guessing_is_cut_off_while_others_register() {
    let srv = TestServer::start(
        "",
        "[security]\ntrusted = []\nauth_failures = 5\nauth_failures_user = 0\nban_time = 300\n",
    )
    .await;
    srv.store
        .add_subscriber(&Subscriber {
            username: "alice".into(),
            domain: "example.com".into(),
            ha1_md5: md5_hex("alice:example.com:4711"),
            ha1_sha256: Some("unused".into()),
            created: 0,
            caller_id: None,
        })
        .await
        .unwrap();

    // The guessing tool: four-digit PINs in order, from 127.0.0.2. The right one (4711)
    // would come after 4,700 guesses; it gets five.
    let mut attacker = Phone::on("127.0.0.2").await;
    // Answers are awaited patiently while they are expected, briefly once silence is.
    let silence = Duration::from_millis(300);
    let mut answers = Vec::new();
    for pin in 0..10 {
        let wait = if pin < 5 { WAIT } else { silence };
        answers.push(attacker.attempt(srv.udp, &format!("{pin:04}"), wait).await);
    }
    assert_eq!(
        answers[..5],
        [Some(401), Some(401), Some(401), Some(401), Some(403)],
        "four wrong guesses are challenged again, the fifth is refused without a challenge"
    );
    assert!(
        answers[5..].iter().all(Option::is_none),
        "then the source is ignored: {answers:?}"
    );
    // Even the right password from the banned source gets nothing.
    assert_eq!(attacker.attempt(srv.udp, "4711", silence).await, None);

    // The real phone, on another address, registers at once.
    let mut phone = Phone::on("127.0.0.1").await;
    assert_eq!(phone.attempt(srv.udp, "4711", WAIT).await, Some(200));
    assert_eq!(srv.store.load_bindings(0).await.unwrap().len(), 1);

    let stats = srv.security.stats(tokio::time::Instant::now());
    assert_eq!(stats.auth_failures, 5);
    assert_eq!(stats.bans_auth, 1);
    assert_eq!(stats.bans_active, 1);
    assert_eq!(stats.dropped, 6, "one REGISTER per silent attempt");
    srv.stop().await;
}

#[tokio::test]
async fn a_flooding_source_is_banned_while_others_are_answered() {
    let srv = TestServer::start(
        "",
        "[security]\ntrusted = []\npike_requests = 20\npike_window = 2\nban_time = 300\n",
    )
    .await;
    let flood = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let from = flood.local_addr().unwrap();
    for i in 0..100 {
        let m = request("OPTIONS", "sip:example.com", from, &format!("f{i}"), "");
        flood.send_to(m.as_bytes(), srv.udp).await.unwrap();
    }
    // Count the answers until the line goes quiet.
    let mut answered = 0;
    let mut buf = vec![0u8; 65536];
    while let Ok(r) =
        tokio::time::timeout(Duration::from_millis(500), flood.recv_from(&mut buf)).await
    {
        r.unwrap();
        answered += 1;
    }
    // 20 is the burst; a few more fit in if the server took a while to read them all (one more
    // per 100 ms: a slow, loaded machine).
    assert!((20..=40).contains(&answered), "{answered} answered");
    // Banned now: a polite request gets nothing.
    let m = request("OPTIONS", "sip:example.com", from, "late", "");
    flood.send_to(m.as_bytes(), srv.udp).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), flood.recv_from(&mut buf))
            .await
            .is_err()
    );
    // The ban holds on TCP too (one check for both transports): the connection is accepted
    // but nothing is answered.
    let tcp_options = |ip: &'static str| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        let mut conn = sock.connect(srv.tcp).await.unwrap();
        let from = conn.local_addr().unwrap();
        let m = request("OPTIONS", "sip:example.com", from, &format!("tcp-{ip}"), "")
            .replace("SIP/2.0/UDP", "SIP/2.0/TCP");
        conn.write_all(m.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => None,
        }
    };
    assert_eq!(tcp_options("127.0.0.2").await, None);
    let answer = tcp_options("127.0.0.1")
        .await
        .expect("another source is answered on TCP");
    assert!(answer.starts_with("SIP/2.0 200"), "{answer}");
    // Another source is answered.
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = other.local_addr().unwrap();
    let m = request("OPTIONS", "sip:example.com", addr, "other", "");
    other.send_to(m.as_bytes(), srv.udp).await.unwrap();
    assert_eq!(udp_recv(&other).await.status(), Some(200));
    let stats = srv.security.stats(tokio::time::Instant::now());
    assert_eq!(stats.bans_pike, 1);
    assert!(stats.dropped > 100 - answered, "{stats:?}");
    srv.stop().await;
}
