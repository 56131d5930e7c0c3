//! TCP and TLS towards peers (issue #13 item 4), over real sockets on loopback with test
//! certificates made here (rcgen): a phone registered over TLS is called over its own
//! connection; providers on TCP and TLS that nobody connected to first are reached by
//! connecting on demand (TLS: the certificate checked against the hop's name, SNI sent); a
//! certificate for another name, a closed port and a `sips:` URI toward a plain listener
//! end the call at once with a final, and nothing is ever sent in clear for `sips:`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use md5::{Digest, Md5};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sipedge::sip::{Framing, HeaderName, Message, reply};
use sipedge::store::Subscriber;
use sipedge::transport::framing::{Frame, StreamFramer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector, rustls};

use crate::harness::{TestServer, Ua, WAIT, request};

#[allow(deprecated)] // the ring provider, as sipedge uses (no post-quantum key exchange)
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test CA and the files it signs, in a directory of their own.
struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
    ca_pem: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sipedge-e2e-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "sipedge test CA");
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, cert.pem()).unwrap();
        Self {
            dir,
            ca: Issuer::new(params, key),
            ca_pem,
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by the CA: (cert, key).
    fn leaf(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A TLS server (a provider stand-in) presenting `cert`.
    fn acceptor(&self, (cert, key): &(PathBuf, PathBuf)) -> TlsAcceptor {
        let certs = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        TlsAcceptor::from(Arc::new(cfg))
    }

    /// A TLS client (a phone) trusting the test CA.
    fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca_pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(cfg))
    }

    /// A `[tls]` table: sipedge's certificate (if any) and the test CA as `ca_file`.
    fn table(&self, ours: Option<&(PathBuf, PathBuf)>) -> String {
        let mut t = format!(
            "[tls]\nca_file = \"{}\"\nhandshake_timeout = 2\n",
            self.ca_pem.display()
        );
        if let Some((c, k)) = ours {
            t.push_str(&format!(
                "certificate = \"{}\"\nprivate_key = \"{}\"\n",
                c.display(),
                k.display()
            ));
        }
        t
    }
}

/// One end of a TCP or TLS connection speaking framed SIP.
struct Peer<S> {
    io: S,
    framer: StreamFramer,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Peer<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            framer: StreamFramer::new(65535),
        }
    }

    async fn send(&mut self, text: &str) {
        self.io.write_all(text.as_bytes()).await.unwrap();
        self.io.flush().await.unwrap();
    }

    /// The next message, skipping 100 Trying.
    async fn recv(&mut self) -> Message {
        let mut buf = [0u8; 8192];
        loop {
            while let Some(frame) = self.framer.next_frame().unwrap() {
                if let Frame::Message(m) = frame {
                    let m = Message::parse(&m, Framing::Stream).unwrap();
                    if m.status() != Some(100) {
                        return m;
                    }
                }
            }
            let n = tokio::time::timeout(WAIT, self.io.read(&mut buf))
                .await
                .expect("nothing received in time")
                .unwrap();
            assert!(n > 0, "connection closed");
            self.framer.extend(&buf[..n]);
        }
    }
}

/// A UAS's answer to `req` (Record-Route copied, a Contact, a To-tag).
fn answer(req: &Message, status: u16, contact: &str) -> String {
    let contact = format!("<{contact}>");
    let mut extra: Vec<(&str, &str)> = req
        .headers_named(HeaderName::RecordRoute)
        .map(|h| ("Record-Route", req.str_at(h.value.clone()).unwrap()))
        .collect();
    extra.push(("Contact", &contact));
    let bytes = reply::response(
        req,
        "127.0.0.1:5060".parse().unwrap(),
        status,
        "Answer",
        &extra,
    );
    String::from_utf8(bytes).unwrap()
}

fn top_via(m: &Message) -> String {
    m.header_str(HeaderName::Via).unwrap().to_owned()
}

fn record_routes(m: &Message) -> Vec<String> {
    m.headers_named(HeaderName::RecordRoute)
        .flat_map(|h| {
            m.str_at(h.value.clone())
                .unwrap()
                .split(',')
                .map(|s| s.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn md5_hex(s: &str) -> String {
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn challenge_param(ch: &str, name: &str) -> String {
    let at = ch.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
    ch[at..].split('"').next().unwrap().to_owned()
}

/// A final response for the caller; a 5xx is what a transport failure becomes (our 503 for
/// the branch, 500 upstream: RFC 3261 §16.7 step 6).
async fn expect_server_error(caller: &Ua, started: Instant, within: Duration) {
    let (m, _) = caller.recv().await;
    let status = m.status().unwrap();
    assert!((500..600).contains(&status), "a 5xx final, got {status}");
    assert!(
        started.elapsed() < within,
        "final after {:?}: the failure was not reported at once (Timer B is 32 s)",
        started.elapsed()
    );
}

#[tokio::test]
async fn phone_registered_over_tls_is_called_over_its_connection() {
    let pki = Pki::new("phone");
    let ours = pki.leaf("sipedge", &["127.0.0.1"]);
    let srv = TestServer::start_tls("", &pki.table(Some(&ours))).await;
    srv.store
        .add_subscriber(&Subscriber {
            username: "bob".into(),
            domain: "example.com".into(),
            ha1_md5: md5_hex("bob:example.com:pw"),
            ha1_sha256: Some("unused".into()),
            caller_id: None,
            created: 0,
        })
        .await
        .unwrap();
    let tcp = TcpStream::connect(srv.tls.unwrap()).await.unwrap();
    let me = tcp.local_addr().unwrap();
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let tls = pki.connector().connect(name, tcp).await.unwrap();
    let mut phone = Peer::new(tls);
    let register = |cseq: u32, auth: &str| {
        format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
Via: SIP/2.0/TLS {me};branch=z9hG4bK-reg{cseq};rport\r\nMax-Forwards: 70\r\n\
From: <sip:bob@example.com>;tag=r{cseq}\r\nTo: <sip:bob@example.com>\r\n\
Call-ID: tls-reg\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:bob@{me};transport=tls>\r\n\
{auth}Expires: 600\r\nContent-Length: 0\r\n\r\n"
        )
    };
    phone.send(&register(1, "")).await;
    let ch = phone.recv().await;
    assert_eq!(ch.status(), Some(401));
    let ch = ch
        .header_str(HeaderName::WwwAuthenticate)
        .unwrap()
        .to_owned();
    let nonce = challenge_param(&ch, "nonce");
    let ha1 = md5_hex("bob:example.com:pw");
    let ha2 = md5_hex("REGISTER:sip:example.com");
    let response = md5_hex(&format!("{ha1}:{nonce}:00000001:c0ffee:auth:{ha2}"));
    let auth = format!(
        "Authorization: Digest username=\"bob\", realm=\"example.com\", nonce=\"{nonce}\", \
uri=\"sip:example.com\", response=\"{response}\", algorithm=MD5, qop=auth, nc=00000001, \
cnonce=\"c0ffee\"\r\n"
    );
    phone.send(&register(2, &auth)).await;
    assert_eq!(
        phone.recv().await.status(),
        Some(200),
        "registered over TLS"
    );

    let caller = Ua::new().await;
    let invite = request("INVITE", "sip:bob@example.com", caller.addr, "tls-call", "");
    caller.send(srv.udp, &invite).await;
    let inv = phone.recv().await;
    assert_eq!(
        inv.method(),
        Some("INVITE"),
        "the call comes over the phone's connection"
    );
    assert!(
        top_via(&inv).starts_with("SIP/2.0/TLS "),
        "{}",
        top_via(&inv)
    );
    // UDP in, TLS out: two Record-Route entries, the one facing the phone says TLS.
    let rr = record_routes(&inv);
    assert_eq!(rr.len(), 2, "{rr:?}");
    assert!(rr[0].contains(";transport=tls"), "{rr:?}");
    assert!(!rr[1].contains("transport="), "{rr:?}");
    phone
        .send(&answer(&inv, 200, &format!("sip:bob@{me};transport=tls")))
        .await;
    let (ok, _) = caller.recv().await;
    assert_eq!(ok.status(), Some(200));
    assert!(srv.metrics.get("transport_tls_handshake_ok").unwrap() >= 1);
    assert_eq!(
        srv.metrics.get("transport_connect_ok"),
        Some(0),
        "no connection was opened: the phone's own was used"
    );
    srv.stop().await;
}

#[tokio::test]
async fn provider_on_tcp_is_connected_on_demand_and_the_connection_reused() {
    let srv = TestServer::start("relay_foreign = \"open\"", "").await;
    let provider = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = provider.local_addr().unwrap();
    let caller = Ua::new().await;
    let ruri = format!("sip:pstn@{p};transport=tcp");
    caller
        .send(srv.udp, &request("INVITE", &ruri, caller.addr, "tcp-1", ""))
        .await;
    let (stream, from) = tokio::time::timeout(WAIT, provider.accept())
        .await
        .expect("sipedge connects")
        .unwrap();
    assert_ne!(from, srv.tcp, "an outgoing connection, not the listener");
    let mut peer = Peer::new(stream);
    let inv = peer.recv().await;
    assert_eq!(inv.method(), Some("INVITE"));
    assert!(
        top_via(&inv).starts_with("SIP/2.0/TCP "),
        "{}",
        top_via(&inv)
    );
    let rr = record_routes(&inv);
    assert_eq!(rr.len(), 2, "UDP in, TCP out: {rr:?}");
    assert!(rr[0].contains(";transport=tcp"), "{rr:?}");
    peer.send(&answer(&inv, 200, &format!("sip:pstn@{p};transport=tcp")))
        .await;
    let (ok, _) = caller.recv().await;
    assert_eq!(
        ok.status(),
        Some(200),
        "the response came back on our connection"
    );

    // A second call reuses the connection.
    caller
        .send(srv.udp, &request("INVITE", &ruri, caller.addr, "tcp-2", ""))
        .await;
    let inv2 = peer.recv().await;
    assert_eq!(inv2.call_id().unwrap(), "tcp-2");
    let again = tokio::time::timeout(Duration::from_millis(300), provider.accept()).await;
    assert!(again.is_err(), "no second connection");
    peer.send(&answer(&inv2, 486, "sip:pstn@127.0.0.1")).await;
    assert_eq!(caller.recv().await.0.status(), Some(486));
    assert_eq!(srv.metrics.get("transport_connect_ok"), Some(1));
    srv.stop().await;
}

#[tokio::test]
async fn provider_on_tls_is_verified_by_name_with_sni() {
    let pki = Pki::new("provider");
    // The name resolves through the system (/etc/hosts): the provider listens where it
    // points first, as sipedge will connect there.
    let ip = tokio::net::lookup_host("localhost:0")
        .await
        .unwrap()
        .next()
        .unwrap()
        .ip();
    let cert = pki.leaf("provider", &["localhost"]);
    let acceptor = pki.acceptor(&cert);
    let provider = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let port = provider.local_addr().unwrap().port();
    let srv = TestServer::start("relay_foreign = \"open\"", &pki.table(None)).await;
    let caller = Ua::new().await;
    let ruri = format!("sip:pstn@localhost:{port};transport=tls");
    caller
        .send(
            srv.udp,
            &request("INVITE", &ruri, caller.addr, "tls-prov", ""),
        )
        .await;
    let (stream, _) = tokio::time::timeout(WAIT, provider.accept())
        .await
        .expect("sipedge connects")
        .unwrap();
    let tls = acceptor.accept(stream).await.unwrap();
    assert_eq!(tls.get_ref().1.server_name(), Some("localhost"), "SNI");
    let mut peer = Peer::new(tls);
    let inv = peer.recv().await;
    assert!(
        top_via(&inv).starts_with("SIP/2.0/TLS "),
        "{}",
        top_via(&inv)
    );
    peer.send(&answer(
        &inv,
        200,
        &format!("sip:pstn@localhost:{port};transport=tls"),
    ))
    .await;
    assert_eq!(caller.recv().await.0.status(), Some(200));
    assert_eq!(srv.metrics.get("transport_tls_handshake_ok"), Some(1));
    srv.stop().await;
}

#[tokio::test]
async fn provider_certificate_for_another_name_fails_the_call_at_once() {
    let pki = Pki::new("wrongname");
    let cert = pki.leaf("other", &["other.example"]);
    let acceptor = pki.acceptor(&cert);
    let provider = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = provider.local_addr().unwrap();
    // The provider stand-in answers the handshake; what it reads after it (nothing) is
    // checked below.
    let served = tokio::spawn(async move {
        let (stream, _) = provider.accept().await.unwrap();
        let mut received = Vec::new();
        if let Ok(mut tls) = acceptor.accept(stream).await {
            let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut received)).await;
        }
        received
    });
    let srv = TestServer::start("relay_foreign = \"open\"", &pki.table(None)).await;
    let caller = Ua::new().await;
    let started = Instant::now();
    let ruri = format!("sip:pstn@{p};transport=tls");
    caller
        .send(
            srv.udp,
            &request("INVITE", &ruri, caller.addr, "tls-bad", ""),
        )
        .await;
    expect_server_error(&caller, started, Duration::from_secs(4)).await;
    let received = tokio::time::timeout(WAIT, served).await.unwrap().unwrap();
    assert!(
        received.is_empty(),
        "nothing sent to a server we could not verify"
    );
    assert!(srv.metrics.get("transport_tls_handshake_failed").unwrap() >= 1);
    assert!(srv.metrics.get("transport_connect_failed").unwrap() >= 1);
    srv.stop().await;
}

#[tokio::test]
async fn sips_is_never_sent_in_clear() {
    let srv = TestServer::start("relay_foreign = \"open\"", "[tls]\nhandshake_timeout = 1\n").await;
    // A plain SIP peer on TCP and UDP, same port.
    let plain_tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = plain_tcp.local_addr().unwrap();
    let plain_udp = UdpSocket::bind(p).await.unwrap();
    let tcp_seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Ok((mut s, _))) =
            tokio::time::timeout(Duration::from_secs(3), plain_tcp.accept()).await
        {
            let mut buf = vec![0u8; 4096];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await
            {
                seen.push(buf[..n].to_vec());
            }
            // Closed: the handshake fails.
        }
        seen
    });
    let caller = Ua::new().await;
    for (i, ruri) in [
        format!("sips:pstn@{p}"),
        format!("sips:pstn@{p};transport=udp"),
        format!("sips:pstn@{p};transport=tcp"),
        format!("sip:pstn@{p};transport=tls"),
    ]
    .iter()
    .enumerate()
    {
        let started = Instant::now();
        caller
            .send(
                srv.udp,
                &request("INVITE", ruri, caller.addr, &format!("sips-{i}"), ""),
            )
            .await;
        expect_server_error(&caller, started, Duration::from_secs(4)).await;
    }
    let mut buf = [0u8; 4096];
    let udp = tokio::time::timeout(Duration::from_millis(300), plain_udp.recv_from(&mut buf)).await;
    assert!(udp.is_err(), "nothing on plain UDP");
    for bytes in tokio::time::timeout(WAIT, tcp_seen).await.unwrap().unwrap() {
        // What reached the plain listener is a TLS ClientHello (record type 22), no SIP.
        assert_eq!(
            bytes.first(),
            Some(&0x16),
            "{:?}",
            String::from_utf8_lossy(&bytes)
        );
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("INVITE") && !text.contains("SIP/2.0"),
            "{text}"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn connect_to_a_closed_port_fails_the_call_at_once() {
    let srv = TestServer::start("relay_foreign = \"open\"", "").await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let caller = Ua::new().await;
    let started = Instant::now();
    let ruri = format!("sip:pstn@{closed};transport=tcp");
    caller
        .send(
            srv.udp,
            &request("INVITE", &ruri, caller.addr, "closed", ""),
        )
        .await;
    expect_server_error(&caller, started, Duration::from_secs(2)).await;
    let failed = srv.metrics.get("transport_connect_failed").unwrap();
    assert!(failed >= 1);
    // The failed connection is forgotten: the next request tries again (and fails again).
    // (The transaction's ACK for the 503 tries too, so the count is not exact.)
    let started = Instant::now();
    caller
        .send(
            srv.udp,
            &request("INVITE", &ruri, caller.addr, "closed-2", ""),
        )
        .await;
    expect_server_error(&caller, started, Duration::from_secs(2)).await;
    assert!(srv.metrics.get("transport_connect_failed").unwrap() > failed);
    assert_eq!(srv.metrics.get("transport_connect_ok"), Some(0));
    srv.stop().await;
}
