//! The send path shared by every loop and every layer above: UDP sockets by local address,
//! TCP and TLS connections by peer, opened on demand.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use dashmap::DashMap;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, warn};

use super::tcp::{Admitted, ConnCount};
use super::tls::Tls;
use super::{Limits, Proto, Transmit};
use crate::metrics::Registry;

/// Jobs waiting for the connector task (connects to start, failures to report); beyond
/// it a send fails at once and is counted.
const JOBS: usize = 1024;
/// Destinations whose TLS server name is remembered ([`Transports::set_tls_name`]).
const TLS_NAMES: usize = 4096;

/// The send side of every socket: UDP sockets by local address, TCP and TLS connections by
/// transport and peer.
///
/// Sending never waits: a datagram the kernel cannot take now is dropped (UDP is lossy and
/// the transaction layer retransmits), and a TCP peer whose queue is full is disconnected.
/// A message for a TCP/TLS peer without a connection opens one (in a task of its own): the
/// message waits in the new connection's queue, bounded like any other. Nothing that serves
/// many peers (the receive loops, the registrar shards, the transaction tasks) can be held
/// up by one peer that does not read, or does not answer a connect.
#[derive(Debug)]
pub struct Transports {
    pub(super) udp: HashMap<SocketAddr, Arc<UdpSocket>>,
    streams: DashMap<(Proto, SocketAddr), Conn>,
    pub(super) limits: Limits,
    /// Open connections, in and out, in total and per peer IP (`limits.tcp_connections*`).
    pub(super) conns: Arc<ConnCount>,
    /// Connections being opened (`limits.tcp_connects`).
    connecting: AtomicUsize,
    jobs: mpsc::Sender<Job>,
    pub(super) tls: Option<Tls>,
    /// The name a TLS connection to an address is verified against (the hop's host).
    tls_names: DashMap<SocketAddr, Arc<str>>,
    stats: TransportStats,
}

/// The send side of one TCP or TLS connection.
#[derive(Debug, Clone)]
pub(super) struct Conn {
    pub(super) tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes queued and not yet written; the writer subtracts what it wrote.
    pub(super) queued: Arc<AtomicUsize>,
    /// Told when the connection must close (its queue overflowed).
    pub(super) close: Arc<Notify>,
}

impl Conn {
    /// A connection's send side and the queue its writer drains.
    pub(super) fn new() -> (Self, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Self {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            close: Arc::new(Notify::new()),
        };
        (conn, rx)
    }
}

/// Work for the connector task ([`super::tcp::connector`]).
pub(super) enum Job {
    /// Open this connection; `rx` holds what waits for it.
    Connect {
        proto: Proto,
        dest: SocketAddr,
        conn: Conn,
        rx: mpsc::UnboundedReceiver<Vec<u8>>,
        place: Admitted,
    },
    /// Report these messages as unsendable ([`super::Receiver::transport_failed`]).
    Failed {
        proto: Proto,
        dest: SocketAddr,
        unsent: Vec<Vec<u8>>,
    },
}

/// Counters of the transport layer.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Datagrams dropped because the socket buffer was full or the send failed.
    pub udp_send_dropped: AtomicU64,
    /// Messages for a TCP peer whose connection closed as they were queued.
    pub tcp_no_connection: AtomicU64,
    /// TCP connections closed because their send queue overflowed.
    pub tcp_queue_overflow: AtomicU64,
    /// TCP connections refused by `limits.tcp_connections(_per_ip)`.
    pub tcp_refused: AtomicU64,
    /// TCP connections closed for a message that did not complete in time, or a write that
    /// did not drain in time.
    pub tcp_timed_out: AtomicU64,
    /// Connections we opened (TLS: handshake included).
    pub connect_ok: AtomicU64,
    /// Connections we could not open: refused, timed out, TLS failed, or a limit.
    pub connect_failed: AtomicU64,
    /// TLS handshakes completed, either side.
    pub tls_handshake_ok: AtomicU64,
    /// TLS handshakes failed or timed out, either side (certificate errors included).
    pub tls_handshake_failed: AtomicU64,
    /// TLS server names forgotten to keep the table within its bound (`TLS_NAMES`).
    pub tls_names_evicted: AtomicU64,
    /// Second UDP receive loops started because the first was behind (`super::udp`).
    pub udp_receive_helpers: AtomicU64,
    /// Of those, running now (at most one per UDP socket).
    pub udp_receive_helpers_running: AtomicU64,
}

impl Transports {
    /// No sockets yet. The receiver takes the connector's jobs ([`super::Listeners::run`]).
    pub(super) fn new(limits: Limits, tls: Option<Tls>) -> (Self, mpsc::Receiver<Job>) {
        let (jobs, rx) = mpsc::channel(JOBS);
        let t = Self {
            udp: HashMap::new(),
            streams: DashMap::new(),
            limits,
            conns: Arc::new(ConnCount::default()),
            connecting: AtomicUsize::new(0),
            jobs,
            tls,
            tls_names: DashMap::new(),
            stats: TransportStats::default(),
        };
        (t, rx)
    }

    /// Sends one message without waiting. Failures are counted and logged at debug: a lost
    /// datagram or a closed connection is the peer's loss, never a reason to stop serving
    /// others. A message that cannot go out over a connection is reported to the
    /// [`super::Receiver`] (a connect that failed, or a limit).
    pub fn send(&self, out: Transmit) {
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
            Proto::Tcp | Proto::Tls => self.send_stream(out),
        }
    }

    fn send_stream(&self, out: Transmit) {
        let key = (out.proto, out.dest);
        let conn = match self.streams.get(&key).map(|c| c.value().clone()) {
            Some(c) => c,
            None => match self.open(out.proto, out.dest) {
                Ok(c) => c,
                Err(reason) => {
                    self.stats.connect_failed.fetch_add(1, Relaxed);
                    static LOG: crate::log::LogLimit = crate::log::LogLimit::new();
                    if let Some(suppressed) = LOG.allow() {
                        warn!(peer.addr = %out.dest, transport = out.proto.as_str(), reason, suppressed, "cannot open a connection");
                    }
                    self.fail(out.proto, out.dest, vec![out.bytes]);
                    return;
                }
            },
        };
        let len = out.bytes.len();
        let queued = conn.queued.fetch_add(len, Relaxed) + len;
        if queued > self.limits.tcp_send_queue {
            conn.queued.fetch_sub(len, Relaxed);
            self.stats.tcp_queue_overflow.fetch_add(1, Relaxed);
            crate::security_event!(
                "tcp_queue_full",
                out.dest,
                queued,
                limit = "limits.tcp_send_queue"
            );
            self.streams
                .remove_if(&key, |_, c| c.tx.same_channel(&conn.tx));
            conn.close.notify_one();
            return;
        }
        if let Err(mpsc::error::SendError(bytes)) = conn.tx.send(out.bytes) {
            conn.queued.fetch_sub(len, Relaxed);
            self.stats.tcp_no_connection.fetch_add(1, Relaxed);
            debug!(dest = %out.dest, "connection closed before send");
            self.fail(out.proto, out.dest, vec![bytes]);
        }
    }

    /// Starts opening a connection to `dest` (or finds the one another sender just
    /// started). `Err` names the reason it cannot be opened.
    fn open(&self, proto: Proto, dest: SocketAddr) -> Result<Conn, &'static str> {
        if proto == Proto::Tls && self.tls.is_none() {
            return Err("TLS is not available");
        }
        if dest.ip().is_unspecified() || dest.port() == 0 {
            return Err("not a destination address");
        }
        if self.connecting.fetch_add(1, Relaxed) >= self.limits.tcp_connects {
            self.connecting.fetch_sub(1, Relaxed);
            return Err("limits.tcp_connects");
        }
        let Some(place) = self.conns.admit(dest.ip(), &self.limits) else {
            self.connecting.fetch_sub(1, Relaxed);
            self.stats.tcp_refused.fetch_add(1, Relaxed);
            return Err("limits.tcp_connections(_per_ip)");
        };
        let (conn, rx) = Conn::new();
        match self.streams.entry((proto, dest)) {
            dashmap::Entry::Occupied(e) => {
                // Another sender won the race: its connection serves us both.
                self.connecting.fetch_sub(1, Relaxed);
                return Ok(e.get().clone());
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(conn.clone());
            }
        }
        let job = Job::Connect {
            proto,
            dest,
            conn: conn.clone(),
            rx,
            place,
        };
        if self.jobs.try_send(job).is_err() {
            self.unregister((proto, dest), &conn.tx);
            self.connecting.fetch_sub(1, Relaxed);
            return Err("too many connects queued");
        }
        Ok(conn)
    }

    /// An opening connection is established or has failed.
    pub(super) fn connect_done(&self) {
        self.connecting.fetch_sub(1, Relaxed);
    }

    /// Reports unsent messages upward, through the connector task.
    fn fail(&self, proto: Proto, dest: SocketAddr, unsent: Vec<Vec<u8>>) {
        if self
            .jobs
            .try_send(Job::Failed {
                proto,
                dest,
                unsent,
            })
            .is_err()
        {
            debug!(%dest, "failure not reported: connector busy");
        }
    }

    /// The TLS server name for connections to `dest` (RFC 5922 §4: the host of the hop,
    /// before resolution): set by whoever resolved the hop, before sending to it. Bounded:
    /// when full, an arbitrary old entry goes (its next connect checks the IP instead).
    pub fn set_tls_name(&self, dest: SocketAddr, name: &str) {
        if self.tls_names.get(&dest).is_some_and(|n| **n == *name) {
            return;
        }
        if self.tls_names.len() >= TLS_NAMES {
            // (The iterator's shard lock is released at the end of this statement.)
            let victim = self.tls_names.iter().next().map(|e| *e.key());
            if let Some(k) = victim {
                self.tls_names.remove(&k);
                self.stats.tls_names_evicted.fetch_add(1, Relaxed);
            }
        }
        self.tls_names.insert(dest, Arc::from(name));
    }

    /// The name set for `dest`, if any.
    pub(super) fn tls_name(&self, dest: SocketAddr) -> Option<Arc<str>> {
        self.tls_names.get(&dest).map(|n| n.value().clone())
    }

    pub(super) fn register(&self, key: (Proto, SocketAddr), conn: Conn) {
        self.streams.insert(key, conn);
    }

    /// Forgets the connection `key` if it is still the one owned by `tx`.
    pub(super) fn unregister(&self, key: (Proto, SocketAddr), tx: &mpsc::UnboundedSender<Vec<u8>>) {
        self.streams.remove_if(&key, |_, v| v.tx.same_channel(tx));
    }

    /// Open TCP and TLS connections (and those being opened).
    pub fn tcp_connections(&self) -> usize {
        self.streams.len()
    }

    /// The transport counters.
    pub fn stats(&self) -> &TransportStats {
        &self.stats
    }

    /// Registers the transport's counters and its open connections.
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        type Field = fn(&TransportStats) -> &AtomicU64;
        let counters: [(&str, &str, Field); 11] = [
            (
                "transport_udp_send_dropped",
                "Datagrams dropped because the socket buffer was full or the send failed.",
                |s| &s.udp_send_dropped,
            ),
            (
                "transport_tcp_no_connection",
                "Messages for a TCP peer whose connection closed as they were queued.",
                |s| &s.tcp_no_connection,
            ),
            (
                "transport_tcp_queue_overflow",
                "TCP connections closed because their send queue overflowed.",
                |s| &s.tcp_queue_overflow,
            ),
            (
                "transport_tcp_refused",
                "TCP connections refused by limits.tcp_connections(_per_ip).",
                |s| &s.tcp_refused,
            ),
            (
                "transport_tcp_timed_out",
                "TCP connections closed for a message or a write that did not complete in time.",
                |s| &s.tcp_timed_out,
            ),
            (
                "transport_connect_ok",
                "Outgoing TCP/TLS connections opened (TLS: handshake included).",
                |s| &s.connect_ok,
            ),
            (
                "transport_connect_failed",
                "Outgoing TCP/TLS connections that could not be opened (refused, timed out, TLS, limits).",
                |s| &s.connect_failed,
            ),
            (
                "transport_tls_handshake_ok",
                "TLS handshakes completed, inbound and outbound.",
                |s| &s.tls_handshake_ok,
            ),
            (
                "transport_tls_handshake_failed",
                "TLS handshakes failed or timed out, inbound and outbound.",
                |s| &s.tls_handshake_failed,
            ),
            (
                "transport_tls_names_evicted",
                "TLS server names of next hops forgotten to keep the table within 4096.",
                |s| &s.tls_names_evicted,
            ),
            (
                "transport_udp_receive_helpers",
                "Second UDP receive loops started because the first was behind (a socket at its limit).",
                |s| &s.udp_receive_helpers,
            ),
        ];
        for (name, help, field) in counters {
            let t = Arc::downgrade(self);
            m.counter(name, help, move || {
                t.upgrade().map_or(0, |t| field(&t.stats).load(Relaxed))
            });
        }
        let t = Arc::downgrade(self);
        m.gauge(
            "transport_tcp_connections",
            "Open TCP and TLS connections.",
            move || t.upgrade().map_or(0, |t| t.tcp_connections() as u64),
        );
        let t = Arc::downgrade(self);
        m.gauge(
            "transport_udp_receive_helpers_running",
            "Second UDP receive loops running now (at most one per UDP socket).",
            move || {
                t.upgrade()
                    .map_or(0, |t| t.stats.udp_receive_helpers_running.load(Relaxed))
            },
        );
    }
}
