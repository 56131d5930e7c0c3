//! The send path shared by every loop and every layer above: UDP sockets by local address,
//! TCP connections by peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use dashmap::DashMap;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, warn};

use super::{Proto, Transmit};
use crate::metrics::Registry;

/// The send side of every socket: UDP sockets by local address, TCP connections by peer.
///
/// Sending never waits: a datagram the kernel cannot take now is dropped (UDP is lossy and
/// the transaction layer retransmits), and a TCP peer whose queue is full is disconnected.
/// Nothing that serves many peers (the receive loops, the registrar shards, the transaction
/// tasks) can be held up by one peer that does not read.
#[derive(Debug, Default)]
pub struct Transports {
    pub(super) udp: HashMap<SocketAddr, Arc<UdpSocket>>,
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
    /// No sockets yet; `send_queue` bounds each TCP connection's queue in bytes.
    pub(super) fn new(send_queue: usize) -> Self {
        Self {
            send_queue,
            ..Self::default()
        }
    }

    /// Sends one message without waiting. Failures are counted and logged at debug: a lost
    /// datagram or a closed connection is the peer's loss, never a reason to stop serving
    /// others.
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

    /// Registers the transport's counters and its open connections.
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        type Field = fn(&TransportStats) -> &AtomicU64;
        let counters: [(&str, &str, Field); 5] = [
            (
                "transport_udp_send_dropped",
                "Datagrams dropped because the socket buffer was full or the send failed.",
                |s| &s.udp_send_dropped,
            ),
            (
                "transport_tcp_no_connection",
                "Messages for a TCP peer with no connection (any more).",
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
            "Open TCP connections.",
            move || t.upgrade().map_or(0, |t| t.tcp_connections() as u64),
        );
    }
}
