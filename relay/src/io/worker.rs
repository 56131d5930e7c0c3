//! One relay worker: an OS thread running a current-thread tokio runtime that owns the sockets
//! of the sessions assigned to it, a [`Relay`] core and one receive batch. It only moves bytes:
//! every decision is the core's.
//!
//! The worker's sockets are registered in its own level-triggered epoll instance (port as the
//! event data), and one task waits on that descriptor: a wakeup asks epoll which sockets have
//! data, drains each in batches (recvmmsg), asks the core for a verdict per datagram and sends
//! each group of datagrams bound for the same outgoing socket with one sendmmsg, straight from
//! the receive buffer. No task, waker or span per socket: at RTP rates each socket has one
//! packet per wakeup, and per-socket tasks cost more than the forwarding (measured with
//! `scripts/bench/media.sh`). Each socket gets at most [`MAX_BATCHES`] batches per round, then
//! the task yields, so one flooded socket cannot starve the others (rtpengine
//! `max_recv_iters`, quinn `WorkLimiter`). A timer task
//! sleeps until the core's next deadline and reports sessions that timed out. Everything is
//! on one thread: the state is an `Rc<RefCell<..>>` and no borrow is held across an await.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::LocalSet;
use tokio::time::Instant;
use tracing::Instrument;

use super::sys::{BATCH, BatchIo, EVENTS, Epoll, Transmit};
use crate::forward::{DropReason, Relay, Timeouts, Verdict};
use crate::{
    Closed, Endpoint, IoMode, PortPair, RelayError, SessionId, SessionStats, Side, StreamPorts,
};

/// Batches handled per ready socket and round before yielding to the other tasks.
const MAX_BATCHES: usize = 4;
/// At most one warning per kind this often; the rest are counted into the next one.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The two bound sockets of one leg.
#[derive(Debug)]
pub(crate) struct LegSockets {
    pub(crate) ports: PortPair,
    pub(crate) rtp: std::net::UdpSocket,
    pub(crate) rtcp: std::net::UdpSocket,
}

/// Requests from the control thread.
#[derive(Debug)]
pub(crate) enum WorkerCmd {
    Add {
        id: SessionId,
        label: String,
        /// Per stream: the caller-facing leg, then the callee-facing leg.
        streams: Vec<[LegSockets; 2]>,
        reply: oneshot::Sender<Result<(), RelayError>>,
    },
    Update {
        id: SessionId,
        side: Side,
        streams: Vec<Option<Endpoint>>,
        sources: Vec<std::net::IpAddr>,
        answered: bool,
        reply: oneshot::Sender<Result<(), RelayError>>,
    },
    /// Removes the session and closes its sockets before answering.
    Remove {
        id: SessionId,
        reply: oneshot::Sender<Option<SessionStats>>,
    },
    Query {
        id: SessionId,
        reply: oneshot::Sender<Option<SessionStats>>,
    },
    /// Closes everything, answers, and ends the thread.
    Shutdown { reply: oneshot::Sender<Vec<Closed>> },
}

/// What a worker needs to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerConfig {
    pub(crate) port_min: u16,
    pub(crate) port_max: u16,
    pub(crate) pairs: u16,
    pub(crate) timeouts: Timeouts,
    pub(crate) io: IoMode,
    /// Sockets are AF_INET6 (bound to an IPv6 address).
    pub(crate) v6: bool,
}

/// The control thread's side of a worker.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    pub(crate) tx: mpsc::UnboundedSender<WorkerCmd>,
    pub(crate) thread: Option<std::thread::JoinHandle<()>>,
}

/// Relay-wide totals since start, shared by every worker: one atomic add per batch, not per
/// packet.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    /// Datagrams dropped as strangers (strict-source latching).
    pub(crate) strangers: AtomicU64,
    /// Datagrams handed to the kernel to forward, and their payload bytes.
    pub(crate) forwarded: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Datagrams received and not forwarded (strangers, malformed, truncated, no destination
    /// yet).
    pub(crate) dropped: AtomicU64,
}

/// Starts worker `index`. Closed sessions are reported on `closed`; relay-wide counts go to
/// `totals` (shared by every worker).
pub(crate) fn spawn(
    index: usize,
    cfg: WorkerConfig,
    closed: mpsc::UnboundedSender<Closed>,
    totals: Arc<Totals>,
) -> io::Result<WorkerHandle> {
    let (tx, rx) = mpsc::unbounded_channel();
    // The runtime is built on the new thread (a runtime must not be dropped inside another
    // one, which could happen here if a later step failed), which reports back once.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("relay-worker-{index}"))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let rt = match rt {
                Ok(rt) => {
                    let _ = ready_tx.send(Ok(()));
                    rt
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let span = tracing::info_span!("relay_worker", worker = index);
            LocalSet::new().block_on(&rt, run(cfg, rx, closed, totals).instrument(span));
        })?;
    ready_rx
        .recv()
        .map_err(|_| io::Error::other("relay worker thread died at start"))??;
    Ok(WorkerHandle {
        tx,
        thread: Some(thread),
    })
}

/// A datagram of the current batch and where it goes.
#[derive(Debug, Clone, Copy)]
struct Pending {
    slot: usize,
    out_port: u16,
    dst: std::net::SocketAddr,
}

/// Log at most once per [`WARN_EVERY`], counting what was suppressed.
#[derive(Debug, Default)]
struct RateLimit {
    next: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(suppressed since the last one)` when a warning may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|n| now < n) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + WARN_EVERY);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Per-worker counters of datagrams lost on the send side (the core counts the rest).
#[derive(Debug, Default)]
struct SendCounters {
    /// The outgoing socket's buffer was full.
    would_block: u64,
    /// The kernel refused the datagram (unreachable network, firewall, ...).
    errors: u64,
}

/// The state of one worker.
struct Worker {
    relay: Relay,
    port_min: u16,
    v6: bool,
    /// Per port offset `port - port_min`: the socket bound to that port (non-blocking).
    sockets: Vec<Option<std::net::UdpSocket>>,
    /// Per session: the ports of its sockets.
    session_ports: HashMap<SessionId, Vec<u16>>,
    /// Every socket of this worker, by port.
    epoll: Epoll,
    io: BatchIo,
    pending: Vec<Pending>,
    send_list: Vec<Transmit>,
    send: SendCounters,
    /// Relay-wide totals.
    totals: Arc<Totals>,
    recv_warn: RateLimit,
    send_warn: RateLimit,
}

impl Worker {
    fn new(cfg: WorkerConfig, totals: Arc<Totals>) -> io::Result<Self> {
        let ports = usize::from(cfg.port_max - cfg.port_min) + 1;
        Ok(Self {
            relay: Relay::new(cfg.port_min, cfg.pairs, cfg.timeouts),
            port_min: cfg.port_min,
            v6: cfg.v6,
            sockets: (0..ports).map(|_| None).collect(),
            session_ports: HashMap::new(),
            epoll: Epoll::new()?,
            io: BatchIo::new(cfg.io == IoMode::Batched),
            pending: Vec::with_capacity(BATCH),
            send_list: Vec::with_capacity(BATCH),
            send: SendCounters::default(),
            totals,
            recv_warn: RateLimit::default(),
            send_warn: RateLimit::default(),
        })
    }

    /// Receives one batch on `sock` (bound to `port`) and forwards what the core allows.
    /// `WouldBlock` when the socket is drained.
    fn forward_batch(&mut self, port: u16) -> io::Result<Batch> {
        let off = usize::from(port - self.port_min);
        let Some(sock) = self.sockets[off].as_ref() else {
            // Closed meanwhile (its session was removed in this round).
            return Ok(Batch { drained: true });
        };
        let n = self.io.recv(sock.as_fd())?;
        // A short batch means the queue was empty when the kernel stopped filling it: no
        // second recvmmsg just to hear EAGAIN. Epoll is level-triggered, so a datagram that
        // arrived since is reported again in the next round.
        let drained = n < BATCH;
        let now = Instant::now();
        self.pending.clear();
        let (mut bytes, mut dropped, mut strangers) = (0u64, 0u64, 0u64);
        for i in 0..n {
            let meta = self.io.meta(i);
            if meta.truncated {
                // A cut datagram is useless to the peer and would corrupt its stats.
                self.relay.on_truncated(port);
                dropped += 1;
                continue;
            }
            let Some(src) = meta.src else { continue };
            let payload = self.io.payload(i);
            match self.relay.on_packet(now, port, src, payload) {
                Verdict::Forward { out_port, dst } => {
                    bytes += payload.len() as u64;
                    self.pending.push(Pending {
                        slot: i,
                        out_port,
                        dst,
                    });
                }
                Verdict::Drop(DropReason::Stranger) => {
                    strangers += 1;
                    dropped += 1;
                }
                Verdict::Drop(_) => dropped += 1,
            }
        }
        let t = &self.totals;
        if !self.pending.is_empty() {
            t.forwarded
                .fetch_add(self.pending.len() as u64, Ordering::Relaxed);
            t.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if dropped > 0 {
            t.dropped.fetch_add(dropped, Ordering::Relaxed);
            t.strangers.fetch_add(strangers, Ordering::Relaxed);
        }
        self.send_grouped(now);
        Ok(Batch { drained })
    }

    /// Up to [`MAX_BATCHES`] batches from one ready socket.
    fn drain(&mut self, port: u16) {
        for _ in 0..MAX_BATCHES {
            match self.forward_batch(port) {
                Ok(Batch { drained: true }) => return,
                Ok(Batch { drained: false }) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    if let Some(suppressed) = self.recv_warn.allow(Instant::now()) {
                        tracing::warn!(%error, suppressed, "media receive failed");
                    }
                    return;
                }
            }
        }
    }

    /// Sends the pending datagrams with one sendmmsg per outgoing socket, each group in
    /// arrival order. A batch from one socket has one or two outgoing sockets, so the
    /// quadratic grouping costs nothing and allocates nothing.
    fn send_grouped(&mut self, now: Instant) {
        let mut done: u64 = 0;
        for i in 0..self.pending.len() {
            if done & (1 << i) != 0 {
                continue;
            }
            let out_port = self.pending[i].out_port;
            self.send_list.clear();
            for (j, p) in self.pending.iter().enumerate().skip(i) {
                if done & (1 << j) == 0 && p.out_port == out_port {
                    self.send_list.push(Transmit {
                        slot: p.slot,
                        dst: p.dst,
                    });
                    done |= 1 << j;
                }
            }
            self.send_group(now, out_port);
        }
    }

    fn send_group(&mut self, now: Instant, out_port: u16) {
        let off = usize::from(out_port.saturating_sub(self.port_min));
        let Some(sock) = self.sockets.get(off).and_then(Option::as_ref) else {
            // The core only names ports of live sessions of this worker.
            self.send.errors += self.send_list.len() as u64;
            return;
        };
        let mut sent = 0;
        while sent < self.send_list.len() {
            // Sends bypass tokio's readiness on purpose: a full socket buffer drops the packet
            // (RTP tolerates loss) instead of stalling every other stream of this worker.
            match self.io.send(sock.as_fd(), &self.send_list[sent..], self.v6) {
                Ok(0) => break,
                Ok(k) => sent += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.send.would_block += (self.send_list.len() - sent) as u64;
                    break;
                }
                Err(error) => {
                    // One datagram refused (e.g. EPERM from a firewall, ENETUNREACH): skip it
                    // and send the rest, like quinn skips per-datagram errors.
                    let dst = self.send_list[sent].dst;
                    self.send.errors += 1;
                    sent += 1;
                    // Unreachable is what a phone behind NAT causes before its first packet
                    // is latched: its SDP names a private address we cannot route to. Expected,
                    // so debug; anything else is worth a (rate-limited) warning.
                    let expected = matches!(
                        error.kind(),
                        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable
                    );
                    if expected {
                        tracing::debug!(%error, peer.addr = %dst, "media send failed: unreachable");
                    } else if let Some(suppressed) = self.send_warn.allow(now) {
                        tracing::warn!(
                            %error,
                            peer.addr = %dst,
                            local.port = out_port,
                            suppressed,
                            send_errors = self.send.errors,
                            send_buffer_full = self.send.would_block,
                            "media send failed"
                        );
                    }
                }
            }
        }
    }
}

/// The worker thread's main task: serves control requests until shutdown.
async fn run(
    cfg: WorkerConfig,
    mut rx: mpsc::UnboundedReceiver<WorkerCmd>,
    closed: mpsc::UnboundedSender<Closed>,
    totals: Arc<Totals>,
) {
    let worker = match Worker::new(cfg, totals) {
        Ok(w) => w,
        Err(error) => {
            tracing::error!(%error, "relay worker: no epoll instance; it serves nothing");
            return;
        }
    };
    let watch = worker.epoll.watch();
    let w = Rc::new(RefCell::new(worker));
    let notify = Rc::new(Notify::new());
    let timer =
        tokio::task::spawn_local(timer_task(w.clone(), notify.clone(), closed).in_current_span());
    let poller = match watch {
        Ok(afd) => tokio::task::spawn_local(poll_task(w.clone(), afd).in_current_span()),
        Err(error) => {
            tracing::error!(%error, "relay worker: cannot watch its epoll instance");
            timer.abort();
            return;
        }
    };
    while let Some(cmd) = rx.recv().await {
        match cmd {
            WorkerCmd::Add {
                id,
                label,
                streams,
                reply,
            } => {
                let r = add(&w, id, label, streams);
                notify.notify_one();
                let _ = reply.send(r);
            }
            WorkerCmd::Update {
                id,
                side,
                streams,
                sources,
                answered,
                reply,
            } => {
                let r = w.borrow_mut().relay.update(
                    Instant::now(),
                    id,
                    side,
                    &streams,
                    &sources,
                    answered,
                );
                notify.notify_one();
                let _ = reply.send(r);
            }
            WorkerCmd::Remove { id, reply } => {
                let stats = w.borrow_mut().relay.remove(Instant::now(), id);
                if stats.is_some() {
                    close_io(&w, id);
                }
                let _ = reply.send(stats);
            }
            WorkerCmd::Query { id, reply } => {
                let _ = reply.send(w.borrow().relay.query(Instant::now(), id));
            }
            WorkerCmd::Shutdown { reply } => {
                timer.abort();
                poller.abort();
                let all = close_all(&w);
                let _ = reply.send(all);
                return;
            }
        }
    }
    // The control thread is gone without a shutdown: close quietly.
    timer.abort();
    poller.abort();
    close_all(&w);
}

fn close_all(w: &Rc<RefCell<Worker>>) -> Vec<Closed> {
    let all = w.borrow_mut().relay.close_all(Instant::now());
    for c in &all {
        close_io(w, c.id);
    }
    all
}

/// What one receive did.
struct Batch {
    /// The socket's queue was empty when the batch ended.
    drained: bool,
}

/// Registers a session's sockets with the core and the worker's epoll instance.
fn add(
    w: &Rc<RefCell<Worker>>,
    id: SessionId,
    label: String,
    streams: Vec<[LegSockets; 2]>,
) -> Result<(), RelayError> {
    let ports: Vec<StreamPorts> = streams
        .iter()
        .map(|[caller, callee]| StreamPorts {
            caller: caller.ports,
            callee: callee.ports,
        })
        .collect();
    let mut st = w.borrow_mut();
    st.relay.add_session(Instant::now(), id, label, &ports)?;
    let mut session_ports = Vec::with_capacity(streams.len() * 4);
    let mut failed = None;
    for leg in streams.into_iter().flatten() {
        for (port, sock) in [(leg.ports.rtp, leg.rtp), (leg.ports.rtcp, leg.rtcp)] {
            if failed.is_none()
                && let Err(e) = st.epoll.add(sock.as_fd(), port)
            {
                failed = Some(e);
            }
            let off = usize::from(port - st.port_min);
            st.sockets[off] = Some(sock);
            session_ports.push(port);
        }
    }
    st.session_ports.insert(id, session_ports);
    drop(st);
    if let Some(e) = failed {
        // Undo: the control thread gets the error and frees the ports.
        let _ = w.borrow_mut().relay.remove(Instant::now(), id);
        close_io(w, id);
        return Err(RelayError::Io(e));
    }
    Ok(())
}

/// Closes a removed session's sockets. When this returns, the ports can be bound again.
fn close_io(w: &Rc<RefCell<Worker>>, id: SessionId) {
    let mut st = w.borrow_mut();
    let ports = st.session_ports.remove(&id).unwrap_or_default();
    for port in ports {
        let off = usize::from(port - st.port_min);
        if let Some(sock) = st.sockets[off].take() {
            st.epoll.remove(sock.as_fd());
        }
    }
}

/// Serves every socket of the worker: waits until its epoll instance has a ready socket,
/// drains each ready one, yields, repeats. Ends when aborted.
async fn poll_task(w: Rc<RefCell<Worker>>, afd: AsyncFd<std::os::fd::OwnedFd>) {
    let mut ready: Vec<u16> = Vec::with_capacity(EVENTS);
    loop {
        let mut guard = match afd.readable().await {
            Ok(g) => g,
            Err(error) => {
                tracing::error!(%error, "relay worker: waiting on epoll failed");
                return;
            }
        };
        let r = w.borrow_mut().epoll.ready(&mut ready);
        match r {
            Ok(()) if ready.is_empty() => {
                // Seen empty: only now may tokio forget the readiness (a datagram arriving
                // after this produces a new edge on the epoll descriptor).
                guard.clear_ready();
                continue;
            }
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                tracing::error!(%error, "relay worker: epoll_wait failed");
                return;
            }
        }
        drop(guard);
        {
            let mut st = w.borrow_mut();
            for &port in &ready {
                st.drain(port);
            }
        }
        // Let the timer and control requests in; the readiness is kept, so the next round
        // starts at once if there is more.
        tokio::task::yield_now().await;
    }
}

/// Sleeps until the core's next deadline and reports the sessions that timed out.
async fn timer_task(
    w: Rc<RefCell<Worker>>,
    notify: Rc<Notify>,
    closed: mpsc::UnboundedSender<Closed>,
) {
    loop {
        let next = w.borrow().relay.poll_timeout();
        match next {
            Some(t) => {
                tokio::select! {
                    () = tokio::time::sleep_until(t) => {}
                    () = notify.notified() => continue,
                }
            }
            None => {
                notify.notified().await;
                continue;
            }
        }
        let expired = w.borrow_mut().relay.on_tick(Instant::now());
        for c in expired {
            close_io(&w, c.id);
            tracing::debug!(session = %c.id, call_id = %c.label, reason = ?c.reason, "media session timed out");
            // The control thread frees the ports and tells the SIP core; if it is gone, the
            // relay is shutting down anyway.
            let _ = closed.send(c);
        }
    }
}
