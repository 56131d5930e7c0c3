//! Binding the listeners of `server.listen` and running their receive loops under a
//! supervisor.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, info, info_span};

use super::send::Job;
use super::tls::Tls;
use super::{Limits, Proto, Receiver, Transports, tcp, udp};

/// Receive buffer asked of the kernel for each UDP socket: a registration storm after a
/// router reboot must not overflow the default ~200 KiB.
const UDP_RCVBUF: usize = 4 << 20;

/// Bound sockets, ready to run.
pub struct Listeners {
    udp: Vec<Arc<UdpSocket>>,
    /// `tcp:` and `tls:` listeners.
    tcp: Vec<(Proto, TcpListener)>,
    local: Vec<(Proto, SocketAddr)>,
    transports: Arc<Transports>,
    /// The connector's work, from [`Transports::send`].
    jobs: mpsc::Receiver<Job>,
    limits: Limits,
}

impl Listeners {
    /// Binds every socket of `listen`. Errors name the socket. `tls` serves `tls:`
    /// listeners (one without a certificate is an error) and the connections we open over
    /// TLS; without it, TLS sends fail (and are reported).
    pub async fn bind(
        listen: &[(Proto, SocketAddr)],
        limits: Limits,
        tls: Option<Tls>,
    ) -> io::Result<Self> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut local = Vec::new();
        let has_acceptor = tls.as_ref().is_some_and(|t| t.acceptor.is_some());
        let (mut transports, jobs) = Transports::new(limits, tls);
        for &(proto, addr) in listen {
            let ctx = |e: io::Error| {
                let t = proto.as_str().to_lowercase();
                io::Error::new(e.kind(), format!("binding {t}:{addr}: {e}"))
            };
            match proto {
                Proto::Udp => {
                    let sock = Arc::new(bind_udp(addr).map_err(ctx)?);
                    let addr = sock.local_addr()?;
                    transports.udp.insert(addr, sock.clone());
                    udp.push(sock);
                    local.push((Proto::Udp, addr));
                }
                Proto::Tcp | Proto::Tls => {
                    if proto == Proto::Tls && !has_acceptor {
                        return Err(ctx(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "no TLS certificate (tls.certificate, tls.private_key)",
                        )));
                    }
                    let listener = TcpListener::bind(addr).await.map_err(ctx)?;
                    local.push((proto, listener.local_addr()?));
                    tcp.push((proto, listener));
                }
            }
        }
        Ok(Self {
            udp,
            tcp,
            local,
            transports: Arc::new(transports),
            jobs,
            limits,
        })
    }

    /// The send side of these sockets.
    pub fn transports(&self) -> Arc<Transports> {
        self.transports.clone()
    }

    /// The bound addresses, in `listen` order (real ports when 0 was asked for).
    pub fn local_addrs(&self) -> &[(Proto, SocketAddr)] {
        &self.local
    }

    /// Receives until `shutdown` becomes true, handing every message to `receiver`; returns
    /// when every loop has stopped.
    pub async fn run(self, receiver: Arc<dyn Receiver>, shutdown: watch::Receiver<bool>) {
        let workers = self.limits.udp_workers.max(1);
        let mut tasks = JoinSet::new();
        for sock in &self.udp {
            let addr = sock.local_addr().ok();
            info!(transport = "udp", addr = %fmt_addr(addr), workers, "listening");
            // Several receive loops on one socket: each datagram goes to exactly one of them.
            for _ in 0..workers {
                let span = info_span!("udp", local.addr = %fmt_addr(addr));
                let (sock, rx, stop) = (sock.clone(), receiver.clone(), shutdown.clone());
                let transports = self.transports.clone();
                tasks.spawn(supervise(
                    "udp",
                    move || udp::run(sock.clone(), rx.clone(), transports.clone(), stop.clone()),
                    span,
                    shutdown.clone(),
                ));
            }
        }
        let ctx = Arc::new(tcp::Ctx {
            receiver: receiver.clone(),
            transports: self.transports.clone(),
            limits: self.limits,
        });
        let acceptor = self
            .transports
            .tls
            .as_ref()
            .and_then(|t| t.acceptor.clone());
        for (proto, listener) in self.tcp {
            let addr = listener.local_addr().ok();
            let name = proto.as_str().to_lowercase();
            info!(transport = %name, addr = %fmt_addr(addr), "listening");
            let span = info_span!("tcp", local.addr = %fmt_addr(addr), transport = %name);
            let listener = Arc::new(listener);
            let acceptor = (proto == Proto::Tls).then(|| acceptor.clone()).flatten();
            let (ctx, stop) = (ctx.clone(), shutdown.clone());
            tasks.spawn(supervise(
                "tcp_accept",
                move || {
                    tcp::accept_loop(
                        listener.clone(),
                        acceptor.clone(),
                        ctx.clone(),
                        stop.clone(),
                    )
                },
                span,
                shutdown.clone(),
            ));
        }
        // The connector spawns a task per job: a panic in one cannot stop it.
        tasks.spawn(
            tcp::connector(self.jobs, ctx, shutdown.clone()).instrument(info_span!("connector")),
        );
        while tasks.join_next().await.is_some() {}
    }
}

/// An address for a log field (`-` when the socket could not tell).
fn fmt_addr(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

/// Runs a loop that serves many peers, and starts it again if it panics: no input can take
/// a listener down silently. The panic itself is logged by the panic hook (with the span of
/// the message being handled, so the peer's address is in the line).
async fn supervise<F, Fut>(
    name: &'static str,
    make: F,
    span: tracing::Span,
    shutdown: watch::Receiver<bool>,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(make().instrument(span.clone())).await {
            Ok(()) => return,
            Err(e) if e.is_panic() && !*shutdown.borrow() => {
                tracing::error!(task = name, "loop panicked; restarting it");
                // A panic on every message must not become a busy loop.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(_) => return,
        }
    }
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = sock.set_recv_buffer_size(UDP_RCVBUF);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}
