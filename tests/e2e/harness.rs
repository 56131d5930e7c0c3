//! Starts a sipedge server in-process on 127.0.0.1 ephemeral ports (mini-redis
//! `start_server`), and small SIP client helpers over real sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sipedge::clock::SystemClock;
use sipedge::config::Config;
use sipedge::registrar::location::{Binding, WriteThrough};
use sipedge::sip::{Framing, HeaderName, Message, reply};
use sipedge::store::Store;
use sipedge::transport::Proto;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a test waits for an expected packet.
pub(crate) const WAIT: Duration = Duration::from_secs(5);

pub(crate) struct TestServer {
    pub(crate) udp: SocketAddr,
    pub(crate) tcp: SocketAddr,
    /// The `tls:` listener, when the server was started with one ([`TestServer::start_tls`]).
    pub(crate) tls: Option<SocketAddr>,
    pub(crate) store: Store,
    pub(crate) location: Arc<WriteThrough>,
    pub(crate) proxy: Arc<sipedge::proxy::stateful::Proxy>,
    pub(crate) media: Arc<sipedge::media::session::Media>,
    pub(crate) security: Arc<sipedge::security::Security>,
    pub(crate) metrics: Arc<sipedge::metrics::Registry>,
    /// The control endpoint's address.
    pub(crate) control: SocketAddr,
    /// The database URL, to restart on the same store.
    pub(crate) db_url: String,
    /// Applies a new configuration, as SIGHUP does in `serve`.
    pub(crate) reloader: sipedge::app::Reloader,
    /// The `server.listen` UDP entry the server started with (a reload writes it again).
    listen_udp: String,
    /// More `server.listen` entries (quoted, comma-separated), after the UDP and TCP ones.
    listen_extra: String,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server listening on UDP and TCP on 127.0.0.1 with a fresh SQLite database;
    /// `server_extra` goes into `[server]`, `extra` after it (other tables).
    pub(crate) async fn start(server_extra: &str, extra: &str) -> Self {
        Self::start_on(&fresh_db(), "127.0.0.1:0", server_extra, extra).await
    }

    /// Starts a server like [`TestServer::start`], with a `tls:127.0.0.1:0` listener too
    /// (`extra` must then hold a `[tls]` table with its certificate).
    pub(crate) async fn start_tls(server_extra: &str, extra: &str) -> Self {
        Self::start_with(
            &fresh_db(),
            "127.0.0.1:0",
            ", \"tls:127.0.0.1:0\"",
            server_extra,
            extra,
        )
        .await
    }

    /// Starts a server on a given database and UDP address (to restart on the same ones).
    pub(crate) async fn start_on(db_url: &str, udp: &str, server_extra: &str, extra: &str) -> Self {
        Self::start_with(db_url, udp, "", server_extra, extra).await
    }

    async fn start_with(
        db_url: &str,
        udp: &str,
        listen_extra: &str,
        server_extra: &str,
        extra: &str,
    ) -> Self {
        // RUST_LOG=sipedge=debug shows the server's log in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let listen_udp = udp.to_owned();
        let text = config_text(udp, listen_extra, db_url, server_extra, extra);
        let cfg = Config::from_toml(&text, || "127.0.0.1".parse().unwrap()).unwrap();
        let app = sipedge::app::build(Arc::new(cfg), Arc::new(SystemClock))
            .await
            .unwrap();
        let addr = |p: Proto| {
            app.server
                .local_addrs()
                .iter()
                .find(|(proto, _)| *proto == p)
                .map(|(_, a)| *a)
                .unwrap()
        };
        let (udp, tcp) = (addr(Proto::Udp), addr(Proto::Tcp));
        let tls = app
            .server
            .local_addrs()
            .iter()
            .find(|(proto, _)| *proto == Proto::Tls)
            .map(|(_, a)| *a);
        let (stop, rx) = watch::channel(false);
        let control = app
            .control
            .expect("the harness turns the control endpoint on");
        let control_addr = control.local_addr().unwrap();
        tokio::spawn(control.run(rx.clone()));
        let task = tokio::spawn(app.server.run(rx));
        Self {
            udp,
            tcp,
            tls,
            store: app.store,
            location: app.location,
            proxy: app.proxy,
            media: app.media,
            security: app.security,
            metrics: app.metrics,
            control: control_addr,
            db_url: db_url.to_owned(),
            reloader: app.reloader,
            listen_udp,
            listen_extra: listen_extra.to_owned(),
            stop,
            task: Some(task),
        }
    }

    /// Reloads from a configuration file written like [`TestServer::start`]'s (same sockets
    /// and database), through the path SIGHUP takes.
    pub(crate) async fn reload(
        &self,
        server_extra: &str,
        extra: &str,
    ) -> Result<sipedge::app::Reloaded, sipedge::config::ConfigError> {
        let text = config_text(
            &self.listen_udp,
            &self.listen_extra,
            &self.db_url,
            server_extra,
            extra,
        );
        self.reload_text(&text).await
    }

    /// Reloads from a configuration file with exactly `text`.
    pub(crate) async fn reload_text(
        &self,
        text: &str,
    ) -> Result<sipedge::app::Reloaded, sipedge::config::ConfigError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("sipedge-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("reload{}.toml", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, text).unwrap();
        self.reloader.reload_file(&path).await
    }

    /// Waits (bounded) until the table of finished transactions holds `(server, client)`
    /// entries: their tasks handed them over (src/proxy/linger.rs).
    pub(crate) async fn finished_are(&self, want: (usize, usize)) {
        for _ in 0..100 {
            if self.proxy.linger().len() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            self.proxy.linger().len(),
            want,
            "finished transactions handed over"
        );
    }

    /// Replaces the bindings of `aor`, through the location service (store and memory).
    pub(crate) async fn set_bindings(&self, aor: &str, bindings: Vec<Binding>) {
        use sipedge::registrar::location::LocationService;
        let old: Vec<String> = self
            .location
            .lookup(aor, 0)
            .into_iter()
            .map(|b| b.contact.clone())
            .collect();
        let bindings: Vec<std::sync::Arc<_>> = bindings.into_iter().map(Into::into).collect();
        self.location
            .save(aor, bindings.clone(), old, bindings)
            .await
            .unwrap();
    }

    /// Stops the server and waits for its loops to end.
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
        }
        sipedge::app::shutdown_media(&self.media).await;
        self.store.close().await;
    }
}

/// The configuration file of a test server.
fn config_text(
    udp: &str,
    listen_extra: &str,
    db_url: &str,
    server_extra: &str,
    extra: &str,
) -> String {
    format!(
        "[server]\nlisten = [\"udp:{udp}\", \"tcp:127.0.0.1:0\"{listen_extra}]\n\
         domains = [\"example.com\"]\n{server_extra}\n[database]\nurl = \"{db_url}\"\n\
         [control]\nlisten = \"127.0.0.1:0\"\n{extra}"
    )
}

/// A new SQLite database URL in the temp directory.
pub(crate) fn fresh_db() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!("sipedge-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("db{}.sqlite", N.fetch_add(1, Ordering::Relaxed)));
    format!("sqlite://{}", path.display())
}

/// A request from a UA at `from` (Via sent-by) to `ruri`.
pub(crate) fn request(
    method: &str,
    ruri: &str,
    from: SocketAddr,
    call_id: &str,
    extra: &str,
) -> String {
    format!(
        "{method} {ruri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {from};branch=z9hG4bK-{call_id};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=a-{call_id}\r\n\
To: <{ruri}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 {method}\r\n\
{extra}Content-Length: 0\r\n\r\n"
    )
}

/// Sends `msg` and waits for the next datagram.
pub(crate) async fn udp_exchange(sock: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Message {
    sock.send_to(msg, to).await.unwrap();
    udp_recv(sock).await
}

/// Sends a request and returns its response, skipping requests that arrive meanwhile (a
/// keepalive OPTIONS to a registered phone's address; at most 8 of them).
pub(crate) async fn udp_request(sock: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Message {
    sock.send_to(msg, to).await.unwrap();
    for _ in 0..8 {
        let m = udp_recv(sock).await;
        if m.status().is_some() {
            return m;
        }
    }
    panic!("only requests arrived, no response");
}

/// The next datagram, parsed.
pub(crate) async fn udp_recv(sock: &UdpSocket) -> Message {
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("no answer in time")
        .unwrap();
    Message::parse(&buf[..n], Framing::Datagram).unwrap()
}

/// A registered UDP binding of this test instance (`server.instance_id = "test"`).
pub(crate) fn binding(aor: &str, contact: String, received: SocketAddr) -> Binding {
    Binding {
        aor: aor.into(),
        contact,
        received,
        nated: true,
        transport: Proto::Udp,
        local_socket: "127.0.0.1:5060".parse().unwrap(),
        instance: "test".into(),
        expires: u64::MAX / 2,
        q: 1000,
        call_id: "reg".into(),
        cseq: 1,
        user_agent: String::new(),
        path: String::new(),
        instance_urn: String::new(),
        updated: 0,
    }
}

/// A UA on a loopback socket.
pub(crate) struct Ua {
    pub(crate) sock: UdpSocket,
    pub(crate) addr: SocketAddr,
}

impl Ua {
    pub(crate) async fn new() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        Self { sock, addr }
    }

    pub(crate) async fn send(&self, to: SocketAddr, text: &str) {
        self.sock.send_to(text.as_bytes(), to).await.unwrap();
    }

    /// The next message, skipping 100 Trying.
    pub(crate) async fn recv(&self) -> (Message, SocketAddr) {
        loop {
            let mut buf = vec![0u8; 65536];
            let (n, from) = tokio::time::timeout(WAIT, self.sock.recv_from(&mut buf))
                .await
                .expect("nothing received in time")
                .unwrap();
            let m = Message::parse(&buf[..n], sipedge::sip::Framing::Datagram).unwrap();
            if m.status() != Some(100) {
                return (m, from);
            }
        }
    }

    /// Answers `req` (received from `from`) with `status`, To-tag `tag`.
    pub(crate) async fn answer(&self, req: &Message, from: SocketAddr, status: u16, tag: &str) {
        // A UAS copies Record-Route into its responses (RFC 3261 §12.1.1).
        let contact = format!("<sip:callee@{}>", self.addr);
        let mut extra: Vec<(&str, &str)> = req
            .headers_named(HeaderName::RecordRoute)
            .map(|h| ("Record-Route", req.str_at(h.value.clone()).unwrap()))
            .collect();
        extra.push(("Contact", &contact));
        let mut bytes = reply::response(req, from, status, "Answer", &extra);
        // A fixed To-tag (the same for 180 and 200, as a real UA does).
        let text = String::from_utf8(bytes.clone()).unwrap();
        let local = reply::local_tag(req);
        bytes = text.replace(&local, tag).into_bytes();
        self.sock.send_to(&bytes, from).await.unwrap();
    }

    /// Asserts nothing arrives for a short while.
    pub(crate) async fn silent(&self) {
        let mut buf = vec![0u8; 65536];
        let r =
            tokio::time::timeout(Duration::from_millis(300), self.sock.recv_from(&mut buf)).await;
        assert!(
            r.is_err(),
            "unexpected: {:?}",
            r.map(|x| x.map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned()))
        );
    }
}
