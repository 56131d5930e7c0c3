//! TCP: the accept loop and one task per connection. Messages are cut out of the stream by
//! [`super::framing`]; answers go back on the same connection (RFC 3261 §18.2.2), which is
//! registered under the peer's address so that later requests to that flow reuse it.
//!
//! What one peer can hold is bounded (`[limits]`): connections in total and per source IP,
//! the time a message may take to arrive (slowloris), the bytes queued for a peer that does
//! not read and the time a write may take. Writes never block the sender: they go into the
//! connection's queue, and the connection's own writer task drains it.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use dashmap::DashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, warn};

use super::framing::{Frame, FrameError, StreamFramer};
use super::send::Conn;
use super::{Limits, Proto, Receiver, Source, Transmit, Transports};
use crate::sip::{Framing, Message, reply};

/// What an accept loop and its connections share.
pub(super) struct Ctx {
    pub(super) listener: TcpListener,
    pub(super) receiver: Arc<dyn Receiver>,
    pub(super) transports: Arc<Transports>,
    pub(super) limits: Limits,
    pub(super) conns: Arc<ConnCount>,
}

/// Open connections, in total and per source IP.
#[derive(Debug, Default)]
pub(super) struct ConnCount {
    total: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
}

/// One admitted connection; releases its place when dropped.
struct Admitted {
    count: Arc<ConnCount>,
    ip: IpAddr,
}

impl ConnCount {
    /// Takes a place for a connection from `ip`, unless a limit is reached.
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Option<Admitted> {
        if self.total.fetch_add(1, Relaxed) >= limits.tcp_connections {
            self.total.fetch_sub(1, Relaxed);
            return None;
        }
        let mut n = self.per_ip.entry(ip).or_insert(0);
        if *n >= limits.tcp_connections_per_ip {
            drop(n);
            self.total.fetch_sub(1, Relaxed);
            return None;
        }
        *n += 1;
        Some(Admitted {
            count: self.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.count.total.fetch_sub(1, Relaxed);
        self.count.per_ip.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

pub(super) async fn accept_loop(ctx: Arc<Ctx>, shutdown: watch::Receiver<bool>) {
    let local = match ctx.listener.local_addr() {
        Ok(a) => a,
        Err(error) => {
            warn!(%error, "TCP listener has no local address; not accepting");
            return;
        }
    };
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            r = ctx.listener.accept() => r,
        };
        match accepted {
            Ok((stream, remote)) => {
                // A banned source gets no connection at all (its frames would be dropped).
                if !ctx.receiver.admit(remote.ip()) {
                    continue;
                }
                let Some(place) = ctx.conns.admit(remote.ip(), &ctx.limits) else {
                    // Closed at once (dropped): the peer sees a reset, nothing is read.
                    ctx.transports.stats().tcp_refused.fetch_add(1, Relaxed);
                    crate::security_event!(
                        "tcp_limit",
                        remote,
                        limit = "limits.tcp_connections(_per_ip)"
                    );
                    continue;
                };
                // The accepted socket knows which of our addresses the peer connected to,
                // even on a wildcard listener.
                let source = Source {
                    proto: Proto::Tcp,
                    remote,
                    local: stream.local_addr().unwrap_or(local),
                };
                let span = debug_span!("conn", peer.addr = %remote, local.addr = %local);
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(
                    async move {
                        connection(stream, source, &ctx, shutdown).await;
                        // The place is released when the connection is over (or its task
                        // panicked: the drop runs while unwinding).
                        drop(place);
                    }
                    .instrument(span),
                );
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                static LOG: crate::log::LogLimit = crate::log::LogLimit::new();
                if let Some(suppressed) = LOG.allow() {
                    warn!(%error, suppressed, "TCP accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Keepalive probes and a bound on unacknowledged data, so that a peer that vanished (or
/// stopped reading) is noticed by the kernel too.
fn tune(stream: &TcpStream, write_timeout: Duration) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(error) = sock.set_tcp_keepalive(&keepalive) {
        debug!(%error, "TCP keepalive not set");
    }
    if let Err(error) = sock.set_tcp_user_timeout(Some(write_timeout)) {
        debug!(%error, "TCP_USER_TIMEOUT not set");
    }
}

async fn connection(
    stream: TcpStream,
    source: Source,
    ctx: &Ctx,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = &ctx.limits;
    tune(&stream, limits.tcp_write_timeout);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let conn = Conn {
        tx: tx.clone(),
        queued: Arc::new(AtomicUsize::new(0)),
        close: Arc::new(Notify::new()),
    };
    let transports = &ctx.transports;
    transports.register_tcp(source.remote, conn.clone());
    debug!("connection open");

    let write_timeout = limits.tcp_write_timeout;
    let (queued, close) = (conn.queued.clone(), conn.close.clone());
    let stats = ctx.transports.clone();
    let writer = tokio::spawn(
        async move {
            while let Some(bytes) = rx.recv().await {
                let len = bytes.len();
                match tokio::time::timeout(write_timeout, wr.write_all(&bytes)).await {
                    Ok(Ok(())) => {
                        queued.fetch_sub(len, Relaxed);
                    }
                    Ok(Err(error)) => {
                        debug!(%error, "write failed");
                        break;
                    }
                    Err(_) => {
                        stats.stats().tcp_timed_out.fetch_add(1, Relaxed);
                        debug!(
                            timeout_s = write_timeout.as_secs(),
                            "peer does not read; closing"
                        );
                        break;
                    }
                }
            }
            // The reader stops too.
            close.notify_one();
            let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
        }
        .in_current_span(),
    );

    let idle = limits.tcp_idle_timeout;
    let message_timeout = limits.tcp_message_timeout;
    let mut framer = StreamFramer::new(limits.max_message_size);
    let mut buf = vec![0u8; 16 * 1024];
    // The idle timer restarts on every complete message, not on every byte; a message in
    // progress must complete within `limits.tcp_message_timeout` of its first byte.
    let mut idle_deadline = Instant::now() + idle;
    let mut message_deadline: Option<Instant> = None;
    'conn: loop {
        let deadline = message_deadline.map_or(idle_deadline, |m| m.min(idle_deadline));
        let read = tokio::select! {
            _ = shutdown.changed() => break,
            () = conn.close.notified() => {
                debug!("closing connection (send queue overflow or write timeout)");
                break;
            }
            r = tokio::time::timeout_at(deadline, rd.read(&mut buf)) => r,
        };
        let n = match read {
            Err(_) if message_deadline.is_some_and(|m| m <= Instant::now()) => {
                transports.stats().tcp_timed_out.fetch_add(1, Relaxed);
                crate::security_event!(
                    "tcp_slow_message",
                    source.remote,
                    pending = framer.pending(),
                    limit = "limits.tcp_message_timeout"
                );
                break;
            }
            Err(_) => {
                debug!(idle_s = idle.as_secs(), "closing idle connection");
                break;
            }
            Ok(Ok(0)) => {
                if framer.pending() > 0 {
                    debug!(bytes = framer.pending(), "peer closed mid-message");
                }
                break;
            }
            Ok(Ok(n)) => n,
            Ok(Err(error)) => {
                debug!(%error, "read failed");
                break;
            }
        };
        framer.extend(&buf[..n]);
        loop {
            match framer.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Ping)) => {
                    // RFC 5626 §4.4.1: answer a CRLFCRLF ping with a CRLF pong.
                    idle_deadline = Instant::now() + idle;
                    transports.send(Transmit {
                        proto: Proto::Tcp,
                        local: source.local,
                        dest: source.remote,
                        bytes: b"\r\n".to_vec(),
                    });
                }
                Ok(Some(Frame::Message(bytes))) => {
                    idle_deadline = Instant::now() + idle;
                    ctx.receiver.receive(&bytes, source);
                }
                Err(FrameError::TooLarge { size, max }) => {
                    // Answer 513 from the head if it is a request, then close: the rest of
                    // the stream cannot be trusted to resynchronise.
                    debug!(size, max, "message too large on stream");
                    let head = framer.take_head();
                    if let Ok(msg) = Message::parse(&head, Framing::Stream) {
                        if msg.is_request() && msg.top_via().is_ok() && msg.method() != Some("ACK")
                        {
                            let bytes =
                                reply::response(&msg, source.remote, 513, "Message Too Large", &[]);
                            transports.send(Transmit {
                                proto: Proto::Tcp,
                                local: source.local,
                                dest: source.remote,
                                bytes,
                            });
                        }
                    }
                    break 'conn;
                }
                Err(error @ FrameError::BadContentLength) => {
                    debug!(%error, "closing connection");
                    break 'conn;
                }
            }
        }
        // Bytes of an unfinished message start (or keep) its clock.
        message_deadline = match (framer.pending(), message_deadline) {
            (0, _) => None,
            (_, Some(d)) => Some(d),
            (_, None) => Some(Instant::now() + message_timeout),
        };
    }
    transports.unregister_tcp(source.remote, &tx);
    drop(tx);
    drop(conn);
    // The writer gets what was queued before the close (a 513, say), bounded by its timeout.
    let _ = writer.await;
    debug!("connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize) -> Limits {
        let secs = Duration::from_secs(10);
        Limits {
            udp_workers: 1,
            max_message_size: 65535,
            tcp_idle_timeout: secs,
            tcp_connections: total,
            tcp_connections_per_ip: per_ip,
            tcp_message_timeout: secs,
            tcp_write_timeout: secs,
            tcp_send_queue: 1 << 16,
        }
    }

    #[test]
    fn connections_are_bounded_in_total_and_per_ip() {
        let count = Arc::new(ConnCount::default());
        let l = limits(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = count.admit(a, &l).expect("first");
        let a2 = count.admit(a, &l).expect("second");
        assert!(count.admit(a, &l).is_none(), "per-IP limit");
        let b1 = count.admit(b, &l).expect("another IP");
        assert!(count.admit(b, &l).is_none(), "total limit");
        drop(a1);
        let b2 = count.admit(b, &l).expect("a place was released");
        drop((a2, b1, b2));
        assert_eq!(count.total.load(Relaxed), 0);
        assert!(count.per_ip.is_empty(), "no entry left for closed peers");
    }
}
