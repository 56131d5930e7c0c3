//! TCP and TLS: the accept loops, the connector (connections we open on demand), and one
//! task per connection, whichever side opened it. Messages are cut out of the stream by
//! [`super::framing`]; answers go back on the same connection (RFC 3261 §18.2.2), which is
//! registered under its transport and the peer's address so that later messages to that
//! flow reuse it (a phone registered over TLS is called over its own connection).
//!
//! What one peer can hold is bounded (`[limits]`): connections in total and per source IP,
//! the time a message may take to arrive (slowloris), the bytes queued for a peer that does
//! not read and the time a write may take. Writes never block the sender: they go into the
//! connection's queue, and the connection's own writer task drains it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, debug_span, warn};

use super::framing::{Frame, FrameError, StreamFramer};
use super::send::{Conn, Job};
use super::{Limits, Proto, Receiver, Source, Transmit, Transports, tls};
use crate::sip::{Framing, Message, reply};

/// What the accept loops, the connector and every connection share.
pub(super) struct Ctx {
    pub(super) receiver: Arc<dyn Receiver>,
    pub(super) transports: Arc<Transports>,
    pub(super) limits: Limits,
}

/// Open connections, in total and per peer IP.
#[derive(Debug, Default)]
pub(super) struct ConnCount {
    total: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
}

/// One admitted connection; releases its place when dropped.
pub(super) struct Admitted {
    count: Arc<ConnCount>,
    ip: IpAddr,
}

impl ConnCount {
    /// Takes a place for a connection from (or to) `ip`, unless a limit is reached.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Option<Admitted> {
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

/// Accepts on one `tcp:` or `tls:` listener (`acceptor` set) until shutdown.
pub(super) async fn accept_loop(
    listener: Arc<TcpListener>,
    acceptor: Option<TlsAcceptor>,
    ctx: Arc<Ctx>,
    shutdown: watch::Receiver<bool>,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(error) => {
            warn!(%error, "TCP listener has no local address; not accepting");
            return;
        }
    };
    let proto = if acceptor.is_some() {
        Proto::Tls
    } else {
        Proto::Tcp
    };
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, remote)) => {
                // A banned source gets no connection at all (its frames would be dropped).
                if !ctx.receiver.admit(remote.ip()) {
                    continue;
                }
                let Some(place) = ctx.transports.conns.admit(remote.ip(), &ctx.limits) else {
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
                    proto,
                    remote,
                    local: stream.local_addr().unwrap_or(local),
                };
                let span = debug_span!("conn", peer.addr = %remote, local.addr = %local, transport = proto.as_str());
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(
                    async move {
                        tune(&stream, ctx.limits.tcp_write_timeout);
                        match acceptor {
                            None => accepted_conn(stream, source, &ctx, shutdown).await,
                            Some(acceptor) => {
                                let timeout = ctx
                                    .transports
                                    .tls
                                    .as_ref()
                                    .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
                                let stats = ctx.transports.stats();
                                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                                    Ok(Ok(tls)) => {
                                        stats.tls_handshake_ok.fetch_add(1, Relaxed);
                                        accepted_conn(tls, source, &ctx, shutdown).await;
                                    }
                                    Ok(Err(error)) => {
                                        stats.tls_handshake_failed.fetch_add(1, Relaxed);
                                        debug!(%error, "TLS handshake failed");
                                    }
                                    Err(_) => {
                                        stats.tls_handshake_failed.fetch_add(1, Relaxed);
                                        debug!("TLS handshake timed out");
                                    }
                                }
                            }
                        }
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

/// Registers an accepted connection under its peer, then serves it.
async fn accepted_conn<S>(stream: S, source: Source, ctx: &Ctx, shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (conn, rx) = Conn::new();
    ctx.transports
        .register((source.proto, source.remote), conn.clone());
    serve(stream, source, ctx, conn, rx, shutdown).await;
}

/// Runs the connector: starts every connection [`Transports::send`] asks for, and reports
/// the messages that could not be sent. Each job runs in a task of its own, so a slow
/// connect or a panicking report holds up nothing else.
pub(super) async fn connector(
    mut jobs: mpsc::Receiver<Job>,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let job = tokio::select! {
            _ = shutdown.changed() => break,
            j = jobs.recv() => match j {
                Some(j) => j,
                None => break,
            },
        };
        match job {
            Job::Connect {
                proto,
                dest,
                conn,
                rx,
                place,
            } => {
                let span = debug_span!("conn", peer.addr = %dest, transport = proto.as_str(), outgoing = true);
                let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
                tokio::spawn(
                    async move {
                        outgoing(proto, dest, conn, rx, &ctx, shutdown).await;
                        drop(place);
                    }
                    .instrument(span),
                );
            }
            Job::Failed {
                proto,
                dest,
                unsent,
            } => {
                let ctx = ctx.clone();
                tokio::spawn(
                    async move { ctx.receiver.transport_failed(proto, dest, unsent) }
                        .in_current_span(),
                );
            }
        }
    }
}

/// Releases a place in `limits.tcp_connects` when the connect is over, however it ends.
struct Connecting<'a>(&'a Transports);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0.connect_done();
    }
}

/// Opens one connection (`limits.tcp_connect_timeout`; TLS: then the handshake, verifying
/// the server's certificate against the hop's name), then serves it like an accepted one.
/// On failure the queued messages are handed to [`Receiver::transport_failed`].
async fn outgoing(
    proto: Proto,
    dest: SocketAddr,
    conn: Conn,
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    ctx: &Ctx,
    shutdown: watch::Receiver<bool>,
) {
    let t = &ctx.transports;
    let connecting = Connecting(t);
    let connected =
        tokio::time::timeout(ctx.limits.tcp_connect_timeout, TcpStream::connect(dest)).await;
    let stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => return failed(ctx, proto, dest, &conn, rx, &error.to_string()),
        Err(_) => return failed(ctx, proto, dest, &conn, rx, "connect timed out"),
    };
    tune(&stream, ctx.limits.tcp_write_timeout);
    let source = Source {
        proto,
        remote: dest,
        local: stream.local_addr().unwrap_or(dest),
    };
    match (proto, &t.tls) {
        (Proto::Tls, Some(tls)) => {
            let name = t.tls_name(dest);
            let server_name = tls::server_name(name.as_deref(), dest);
            let hs = tokio::time::timeout(
                tls.handshake_timeout,
                tls.connector.connect(server_name, stream),
            )
            .await;
            let stream = match hs {
                Ok(Ok(s)) => s,
                Ok(Err(error)) => {
                    t.stats().tls_handshake_failed.fetch_add(1, Relaxed);
                    let reason = format!(
                        "TLS handshake with {}: {error}",
                        name.as_deref().unwrap_or("(no name: the IP address)")
                    );
                    return failed(ctx, proto, dest, &conn, rx, &reason);
                }
                Err(_) => {
                    t.stats().tls_handshake_failed.fetch_add(1, Relaxed);
                    return failed(ctx, proto, dest, &conn, rx, "TLS handshake timed out");
                }
            };
            t.stats().tls_handshake_ok.fetch_add(1, Relaxed);
            t.stats().connect_ok.fetch_add(1, Relaxed);
            drop(connecting);
            debug!(name = name.as_deref(), "TLS connection open");
            serve(stream, source, ctx, conn, rx, shutdown).await;
        }
        (Proto::Tls, None) => failed(ctx, proto, dest, &conn, rx, "TLS is not available"),
        (Proto::Tcp | Proto::Udp, _) => {
            t.stats().connect_ok.fetch_add(1, Relaxed);
            drop(connecting);
            serve(stream, source, ctx, conn, rx, shutdown).await;
        }
    }
}

/// A connection could not be opened: forget it, log once per second, and hand what waited
/// for it to the receiver.
fn failed(
    ctx: &Ctx,
    proto: Proto,
    dest: SocketAddr,
    conn: &Conn,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    reason: &str,
) {
    let t = &ctx.transports;
    t.stats().connect_failed.fetch_add(1, Relaxed);
    t.unregister((proto, dest), &conn.tx);
    rx.close();
    let mut unsent = Vec::new();
    while let Ok(bytes) = rx.try_recv() {
        unsent.push(bytes);
    }
    static LOG: crate::log::LogLimit = crate::log::LogLimit::new();
    if let Some(suppressed) = LOG.allow() {
        warn!(peer.addr = %dest, transport = proto.as_str(), reason, unsent = unsent.len(), suppressed, "connection failed");
    }
    ctx.receiver.transport_failed(proto, dest, unsent);
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

/// Serves one registered connection (TCP or TLS, accepted or opened) until it closes.
async fn serve<S>(
    stream: S,
    source: Source,
    ctx: &Ctx,
    conn: Conn,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let limits = &ctx.limits;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let tx = conn.tx.clone();
    let transports = &ctx.transports;
    let key = (source.proto, source.remote);
    debug!("connection open");

    let write_timeout = limits.tcp_write_timeout;
    let (queued, close) = (conn.queued.clone(), conn.close.clone());
    let stats = ctx.transports.clone();
    let writer = tokio::spawn(
        async move {
            while let Some(bytes) = rx.recv().await {
                let len = bytes.len();
                // TLS: the flush pushes the records out of the session's buffer.
                let write = async {
                    wr.write_all(&bytes).await?;
                    wr.flush().await
                };
                match tokio::time::timeout(write_timeout, write).await {
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
                        proto: source.proto,
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
                                proto: source.proto,
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
    transports.unregister(key, &tx);
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
            tcp_connect_timeout: secs,
            tcp_connects: 8,
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
