//! Binding the listeners of `server.listen`, running their loops, and the send path shared by
//! every loop.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use dashmap::DashMap;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Outbound, Proto, tcp, udp};
use crate::auth::mac::RouteKey;
use crate::auth::service::Authenticator;
use crate::clock::Clock;
use crate::config::Config;
use crate::log::LogLimit;
use crate::nat::keepalive::Pinger;
use crate::proxy::pipeline::{Core, Dispatch, Routed};
use crate::proxy::stateful::Proxy;
use crate::registrar::location::Location;
use crate::registrar::service::Registrar;
use crate::security::Security;

/// Receive buffer asked of the kernel for each UDP socket: a registration storm after a
/// router reboot must not overflow the default ~200 KiB.
const UDP_RCVBUF: usize = 4 << 20;

/// The send side of every socket: UDP sockets by local address, TCP connections by peer.
///
/// Sending never waits: a datagram the kernel cannot take now is dropped (UDP is lossy and
/// the transaction layer retransmits), and a TCP peer whose queue is full is disconnected.
/// Nothing that serves many peers (the receive loops, the registrar shards, the transaction
/// tasks) can be held up by one peer that does not read.
#[derive(Debug, Default)]
pub struct Transports {
    udp: HashMap<SocketAddr, Arc<UdpSocket>>,
    tcp: DashMap<SocketAddr, Conn>,
    /// Bytes queued per TCP connection at most (`limits.tcp_send_queue`).
    send_queue: usize,
    stats: TransportStats,
}

/// The send side of one TCP connection.
#[derive(Debug, Clone)]
pub(super) struct Conn {
    pub(super) tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes queued and not yet written; the writer subtracts what it wrote.
    pub(super) queued: Arc<AtomicUsize>,
    /// Told when the connection must close (its queue overflowed).
    pub(super) close: Arc<Notify>,
}

/// Counters of the transport layer.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Datagrams dropped because the socket buffer was full or the send failed.
    pub udp_send_dropped: AtomicU64,
    /// Messages for a TCP peer with no connection (any more).
    pub tcp_no_connection: AtomicU64,
    /// TCP connections closed because their send queue overflowed.
    pub tcp_queue_overflow: AtomicU64,
    /// TCP connections refused by `limits.tcp_connections(_per_ip)`.
    pub tcp_refused: AtomicU64,
    /// TCP connections closed for a message that did not complete in time, or a write that
    /// did not drain in time.
    pub tcp_timed_out: AtomicU64,
}

impl Transports {
    /// Sends one message without waiting. Failures are counted and logged at debug: a lost
    /// datagram or a closed connection is the peer's loss, never a reason to stop serving
    /// others.
    pub fn send(&self, out: Outbound) {
        match out.proto {
            Proto::Udp => {
                let Some(sock) = self.udp.get(&out.local) else {
                    warn!(local = %out.local, "no UDP socket for this local address");
                    return;
                };
                // The syscall itself, on the non-blocking socket: tokio's `try_send_to` would
                // answer WouldBlock whenever its reactor has not yet seen the socket writable.
                let sent =
                    socket2::SockRef::from(sock.as_ref()).send_to(&out.bytes, &out.dest.into());
                if let Err(error) = sent {
                    self.stats.udp_send_dropped.fetch_add(1, Relaxed);
                    debug!(%error, dest = %out.dest, "UDP send failed");
                }
            }
            Proto::Tcp => {
                let Some(conn) = self.tcp.get(&out.dest).map(|c| c.value().clone()) else {
                    self.stats.tcp_no_connection.fetch_add(1, Relaxed);
                    debug!(dest = %out.dest, "no TCP connection to this peer");
                    return;
                };
                let len = out.bytes.len();
                let queued = conn.queued.fetch_add(len, Relaxed) + len;
                if queued > self.send_queue {
                    conn.queued.fetch_sub(len, Relaxed);
                    self.stats.tcp_queue_overflow.fetch_add(1, Relaxed);
                    crate::security_event!(
                        "tcp_queue_full",
                        out.dest,
                        queued,
                        limit = "limits.tcp_send_queue"
                    );
                    self.tcp
                        .remove_if(&out.dest, |_, c| c.tx.same_channel(&conn.tx));
                    conn.close.notify_one();
                    return;
                }
                if conn.tx.send(out.bytes).is_err() {
                    conn.queued.fetch_sub(len, Relaxed);
                    self.stats.tcp_no_connection.fetch_add(1, Relaxed);
                    debug!(dest = %out.dest, "TCP connection closed before send");
                }
            }
        }
    }

    pub(super) fn register_tcp(&self, remote: SocketAddr, conn: Conn) {
        self.tcp.insert(remote, conn);
    }

    /// Forgets the connection to `remote` if it is still the one owned by `tx`.
    pub(super) fn unregister_tcp(&self, remote: SocketAddr, tx: &mpsc::UnboundedSender<Vec<u8>>) {
        self.tcp.remove_if(&remote, |_, v| v.tx.same_channel(tx));
    }

    /// Open TCP connections.
    pub fn tcp_connections(&self) -> usize {
        self.tcp.len()
    }

    /// The transport counters.
    pub fn stats(&self) -> &TransportStats {
        &self.stats
    }
}

/// Executes what the core decided: sends replies, hands REGISTERs to the registrar,
/// requests and responses to the stateful proxy.
pub struct Dispatcher {
    pub core: Arc<Core>,
    pub transports: Arc<Transports>,
    registrar: Option<Registrar>,
    proxy: Arc<Proxy>,
    auth: Option<Arc<Authenticator>>,
    pinger: Option<Arc<Pinger>>,
    clock: Arc<dyn Clock>,
}

impl Dispatcher {
    pub async fn execute(&self, d: Dispatch) {
        match d {
            Dispatch::Nothing => {}
            Dispatch::Send(out) => self.transports.send(out),
            Dispatch::Response(msg, source) => {
                if let Some(p) = &self.pinger
                    && p.on_response(&msg).await
                {
                    return;
                }
                self.proxy.on_response(*msg, source)
            }
            Dispatch::Request(msg, source) => {
                if self.proxy.absorb(&msg, source) {
                    return;
                }
                match self.core.route(&msg, source) {
                    Routed::Reply(out) => {
                        debug!(status = ?out.bytes.get(8..11).map(String::from_utf8_lossy), "answering locally");
                        self.transports.send(out);
                    }
                    Routed::Absorb => debug!("absorbed"),
                    Routed::Forward(plan) => {
                        debug!(?plan, "forward");
                        let fut = self.proxy.clone().forward(
                            *msg,
                            source,
                            *plan,
                            self.auth.clone(),
                            self.clock.unix(),
                        );
                        // Authentication and name resolution must not hold up the receive loop.
                        tokio::spawn(fut.in_current_span());
                    }
                }
            }
            Dispatch::Register(job) => {
                let Some(registrar) = &self.registrar else {
                    let out =
                        self.core
                            .reply(&job.msg, job.source, 501, "Registrar Not Enabled", &[]);
                    return self.transports.send(out);
                };
                if let Err(job) = registrar.submit(job) {
                    // Overload: tell the phone when to retry instead of queueing without bound.
                    static LOG: LogLimit = LogLimit::new();
                    if let Some(suppressed) = LOG.allow() {
                        warn!(peer.addr = %job.source.remote, suppressed, "registrar queue full, answering 503");
                    }
                    let out = self.core.reply(
                        &job.msg,
                        job.source,
                        503,
                        "Service Unavailable",
                        &[("Retry-After", "5")],
                    );
                    self.transports.send(out);
                }
            }
        }
    }
}

/// Bound listeners, ready to run.
pub struct Server {
    core: Arc<Core>,
    transports: Arc<Transports>,
    udp: Vec<Arc<UdpSocket>>,
    tcp: Vec<TcpListener>,
    local: Vec<(Proto, SocketAddr)>,
    registrar: Option<Registrar>,
    proxy: Arc<Proxy>,
    auth: Option<Arc<Authenticator>>,
    pinger: Option<Arc<Pinger>>,
    clock: Arc<dyn Clock>,
}

impl Server {
    /// Binds every `server.listen` socket. Errors name the socket. `security` is checked first
    /// for every received message.
    pub async fn bind(
        cfg: Arc<Config>,
        location: Option<Arc<Location>>,
        clock: Arc<dyn Clock>,
        key: RouteKey,
        security: Arc<Security>,
    ) -> io::Result<Self> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut local = Vec::new();
        let mut transports = Transports {
            send_queue: cfg.limits.tcp_send_queue,
            ..Transports::default()
        };
        for l in &cfg.server.listen {
            let ctx = |e: io::Error| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "binding {}:{}: {e}",
                        l.proto.as_str().to_lowercase(),
                        l.addr
                    ),
                )
            };
            match l.proto {
                Proto::Udp => {
                    let sock = bind_udp(l.addr).map_err(ctx)?;
                    let addr = sock.local_addr()?;
                    let sock = Arc::new(sock);
                    transports.udp.insert(addr, sock.clone());
                    udp.push(sock);
                    local.push((Proto::Udp, addr));
                }
                Proto::Tcp => {
                    let listener = TcpListener::bind(l.addr).await.map_err(ctx)?;
                    local.push((Proto::Tcp, listener.local_addr()?));
                    tcp.push(listener);
                }
            }
        }
        let core = Arc::new(Core::new(
            cfg.clone(),
            local.clone(),
            location,
            clock.clone(),
            key.clone(),
            security,
        ));
        let transports = Arc::new(transports);
        let proxy = Arc::new(Proxy::new(cfg, transports.clone(), local.clone(), key));
        Ok(Self {
            core,
            proxy,
            auth: None,
            pinger: None,
            clock,
            transports,
            udp,
            tcp,
            local,
            registrar: None,
        })
    }

    /// The send side, for services that answer asynchronously (the registrar).
    pub fn transports(&self) -> Arc<Transports> {
        self.transports.clone()
    }

    /// Enables REGISTER processing.
    pub fn set_registrar(&mut self, registrar: Registrar) {
        self.registrar = Some(registrar);
    }

    /// Enables proxy authentication (407) for routes and foreign relaying that need it.
    pub fn set_authenticator(&mut self, auth: Arc<Authenticator>) {
        self.auth = Some(auth);
    }

    /// Enables keepalives to NATed bindings (and recognises their answers).
    pub fn set_pinger(&mut self, pinger: Arc<Pinger>) {
        self.pinger = Some(pinger);
    }

    /// The stateful proxy (its transaction counts, for tests and `show`).
    pub fn proxy(&self) -> Arc<Proxy> {
        self.proxy.clone()
    }

    /// The bound addresses, in `server.listen` order (real ports when 0 was configured).
    pub fn local_addrs(&self) -> &[(Proto, SocketAddr)] {
        &self.local
    }

    /// Serves until `shutdown` becomes true, then waits for the loops to finish.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let dispatcher = Arc::new(Dispatcher {
            core: self.core.clone(),
            transports: self.transports.clone(),
            registrar: self.registrar.clone(),
            proxy: self.proxy.clone(),
            auth: self.auth.clone(),
            pinger: self.pinger.clone(),
            clock: self.clock.clone(),
        });
        let cfg = self.core.config();
        let workers = match cfg.server.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut tasks = JoinSet::new();
        for sock in &self.udp {
            let addr = sock.local_addr().ok();
            info!(transport = "udp", addr = ?addr, workers, "listening");
            // Several receive loops on one socket: each datagram goes to exactly one of them.
            for _ in 0..workers {
                let span = info_span!("udp", local.addr = ?addr);
                let (sock, dispatcher, stop) = (sock.clone(), dispatcher.clone(), shutdown.clone());
                tasks.spawn(supervise(
                    "udp",
                    move || udp::run(sock.clone(), dispatcher.clone(), stop.clone()),
                    span,
                    shutdown.clone(),
                ));
            }
        }
        let conns = Arc::new(tcp::ConnCount::default());
        for listener in self.tcp {
            let addr = listener.local_addr().ok();
            info!(transport = "tcp", addr = ?addr, "listening");
            let span = info_span!("tcp", local.addr = ?addr);
            let listener = Arc::new(listener);
            let (dispatcher, stop, conns) = (dispatcher.clone(), shutdown.clone(), conns.clone());
            tasks.spawn(supervise(
                "tcp_accept",
                move || {
                    tcp::accept_loop(
                        listener.clone(),
                        dispatcher.clone(),
                        stop.clone(),
                        conns.clone(),
                    )
                },
                span,
                shutdown.clone(),
            ));
        }
        if let Some(p) = &self.pinger {
            tasks.spawn(
                p.clone()
                    .run(shutdown.clone())
                    .instrument(info_span!("keepalive")),
            );
        }
        while tasks.join_next().await.is_some() {}
        // The media sessions are closed by the caller (`app::shutdown_media`), also when this
        // does not finish in time.
        let (servers, clients) = self.proxy.transaction_count();
        info!(
            transactions.server = servers,
            transactions.client = clients,
            "listeners stopped"
        );
    }
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
