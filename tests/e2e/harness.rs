//! Starts a sipedge server in-process on 127.0.0.1 ephemeral ports (mini-redis
//! `start_server`), and small SIP client helpers over real sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sipedge::config::{Config, Proto};
use sipedge::sip::{Framing, Message};
use sipedge::transport::server::Server;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a test waits for an expected packet.
pub(crate) const WAIT: Duration = Duration::from_secs(5);

pub(crate) struct TestServer {
    pub(crate) udp: SocketAddr,
    pub(crate) tcp: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server listening on UDP and TCP on 127.0.0.1; `extra` is appended to the
    /// config (tables other than `[server]`, or server keys via `server_extra`).
    pub(crate) async fn start(server_extra: &str, extra: &str) -> Self {
        let text = format!(
            "[server]\nlisten = [\"udp:127.0.0.1:0\", \"tcp:127.0.0.1:0\"]\n\
             domains = [\"example.com\"]\n{server_extra}\n{extra}"
        );
        let cfg = Config::from_toml(&text, || "127.0.0.1".parse().unwrap()).unwrap();
        let server = Server::bind(Arc::new(cfg)).await.unwrap();
        let addr = |p: Proto| {
            server
                .local_addrs()
                .iter()
                .find(|(proto, _)| *proto == p)
                .map(|(_, a)| *a)
                .unwrap()
        };
        let (udp, tcp) = (addr(Proto::Udp), addr(Proto::Tcp));
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(server.run(rx));
        Self {
            udp,
            tcp,
            stop,
            task: Some(task),
        }
    }

    /// Stops the server and waits for its loops to end.
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
        }
    }
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

/// The next datagram, parsed.
pub(crate) async fn udp_recv(sock: &UdpSocket) -> Message {
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("no answer in time")
        .unwrap();
    Message::parse(&buf[..n], Framing::Datagram).unwrap()
}
