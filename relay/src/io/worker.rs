//! One relay worker: an OS thread that owns the sockets of the sessions assigned to it, a
//! [`Relay`] core and one receive batch. It only moves bytes: every decision is the core's.
//!
//! The thread blocks in its own level-triggered epoll instance, which holds every socket of the
//! worker (port as the event data) and an eventfd on which the control thread or a handle rings
//! after queueing a request. A wakeup serves the queued requests, drains each ready socket in
//! batches (recvmmsg), asks the core for a verdict per datagram and sends each group of
//! datagrams bound for the same outgoing socket with one sendmmsg, straight from the receive
//! buffer; then it serves what was queued meanwhile and, when the core's next deadline has
//! passed, closes the sessions that timed out. The epoll timeout is that deadline, and at most
//! [`LATER`] while the worker has sessions: requests about a live session that nobody waits
//! for at once (an answer's SDP, a BYE's delete) are queued without a ring
//! ([`WorkerTx::send_later`]) and served at the next wake-up, before its datagrams. Under dense traffic the thread then sleeps until
//! `batch_wait` after its wake-up before polling again, so that the next wake-up carries
//! that interval's packets ([`Pace`]). No async runtime: at RTP rates a wakeup carries a few
//! packets, and a runtime's own polling (its epoll, the nested one, a yield, timer checks)
//! cost more per wakeup than the forwarding (measured with `scripts/bench/media.sh`: the same
//! loop as the harness' C forwarder). Each socket gets at most [`MAX_BATCHES`] batches per
//! round, so one flooded socket cannot starve the others (rtpengine `max_recv_iters`, quinn
//! `WorkLimiter`).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::pace::Pace;
use super::sys::{BATCH, BatchIo, EVENTS, Epoll, EventFd, Transmit};
use crate::forward::{DropReason, Relay, Timeouts, Verdict};
use crate::ports::PortPool;
use crate::{
    Allocation, Closed, Endpoint, IoMode, PortPair, RelayError, SessionId, SessionStats, Side,
    StreamPorts,
};

/// Batches handled per ready socket and round before yielding to the other tasks.
const MAX_BATCHES: usize = 4;
/// At most one warning per kind this often; the rest are counted into the next one.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How long a request queued without a ring ([`WorkerTx::send_later`]) waits at most: a
/// worker with sessions waits in epoll no longer than this. It reads its queue before it
/// looks at its sockets, so such a request takes effect before the next datagram is
/// forwarded, and within this time when none comes.
pub(crate) const LATER: Duration = Duration::from_millis(20);

/// The two bound sockets of one leg.
#[derive(Debug)]
pub(crate) struct LegSockets {
    pub(crate) ports: PortPair,
    pub(crate) rtp: std::net::UdpSocket,
    pub(crate) rtcp: std::net::UdpSocket,
}

/// One side's SDP as the core takes it: the first one rides with a new session
/// ([`crate::RelayHandle::open`]), later ones come as updates.
#[derive(Debug)]
pub(crate) struct SideSdp {
    pub(crate) side: Side,
    pub(crate) streams: Vec<Option<Endpoint>>,
    pub(crate) sources: Vec<std::net::IpAddr>,
    pub(crate) answered: bool,
}

impl SideSdp {
    /// Sets it on session `id` of `relay` ([`Relay::update`]).
    fn apply(&self, relay: &mut Relay, id: SessionId) -> Result<(), RelayError> {
        relay.update(
            Instant::now(),
            id,
            self.side,
            &self.streams,
            &self.sources,
            self.answered,
        )
    }
}

/// Requests from the control thread (`Add`) and from the handles (the others): each answers
/// its requester directly, so that a request costs one hand-over each way.
#[derive(Debug)]
pub(crate) enum WorkerCmd {
    /// A new session on sockets the control thread bound; `alloc` is the answer on success.
    /// On failure the worker closes the sockets and frees their ports itself.
    Add {
        id: SessionId,
        label: String,
        /// Per stream: the caller-facing leg, then the callee-facing leg.
        streams: Vec<[LegSockets; 2]>,
        first: Option<SideSdp>,
        alloc: Allocation,
        reply: oneshot::Sender<Result<Allocation, RelayError>>,
    },
    Update {
        id: SessionId,
        sdp: SideSdp,
        /// `None`: nobody waits for the outcome ([`crate::RelayHandle::update_later`]).
        reply: Option<oneshot::Sender<Result<(), RelayError>>>,
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
    /// Wake-up coalescing ([`Pace`]).
    pub(crate) batch_wait: Duration,
}

/// What the workers share with the control thread: the port pool (the control thread takes
/// the pairs of a new session, the worker that closes a session frees its pairs after closing
/// their sockets) and each worker's session count (for the choice of worker).
///
/// The pool's lock is the standard library's, by exception to clippy.toml: the workers are
/// plain threads, and it is held for one take or release of a few pairs, never across an
/// await.
#[derive(Debug)]
pub(crate) struct PortsShared {
    #[allow(clippy::disallowed_types)] // see above: never held across an await
    pub(crate) pool: std::sync::Mutex<PortPool>,
    pub(crate) load: Vec<AtomicUsize>,
}

impl PortsShared {
    /// The pool, locked (a panic while it was held left it consistent: every change is one
    /// push or pop).
    #[allow(clippy::disallowed_types)] // see above: never held across an await
    pub(crate) fn pool(&self) -> std::sync::MutexGuard<'_, PortPool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives `pairs` back to the pool (their sockets are closed).
    pub(crate) fn release(&self, pairs: impl IntoIterator<Item = PortPair>) {
        let mut pool = self.pool();
        for p in pairs {
            if !pool.release(p) {
                tracing::error!(port = p.rtp, "media port pair released twice");
            }
        }
    }
}

/// The control thread's side of a worker.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    pub(crate) tx: WorkerTx,
    pub(crate) thread: Option<std::thread::JoinHandle<()>>,
}

/// A worker's doorbell: an eventfd in its epoll set, rung only while the worker waits there
/// (or is about to). A worker that is forwarding or pacing reads its queue after the round
/// anyway, so a request then costs no `write` and no wake-up. A request queued with
/// [`WorkerTx::send_later`] rings only a worker that waits without a deadline: one whose wait
/// is bounded (by [`LATER`]) serves it when it wakes.
///
/// The handshake (Dekker's): the worker sets its state (waiting, bounded or not), then looks
/// at the queue and waits only if it is empty; a sender queues, then reads the state and rings
/// if the worker waits (for a quiet request: waits without bound), clearing the state so that
/// one ring serves every request until the worker wakes. With a sequentially consistent fence
/// on each side between the two steps, either the worker sees the request or the sender sees
/// the worker waiting.
#[derive(Debug)]
pub(crate) struct Doorbell {
    fd: EventFd,
    state: AtomicU8,
}

/// [`Doorbell::state`]: the worker is not waiting.
const BUSY: u8 = 0;
/// It waits in epoll with a timeout of at most [`LATER`].
const WAITS_BOUNDED: u8 = 1;
/// It waits without a timeout, or a longer one.
const WAITS: u8 = 2;

impl Doorbell {
    fn new() -> io::Result<Self> {
        Ok(Self {
            fd: EventFd::new()?,
            state: AtomicU8::new(BUSY),
        })
    }

    /// After queueing a request: wakes the worker if it waits.
    fn ring_if_waiting(&self) {
        fence(Ordering::SeqCst);
        if self.state.swap(BUSY, Ordering::SeqCst) != BUSY {
            self.fd.ring();
        }
    }

    /// After queueing a quiet request: wakes the worker only if it would not wake by itself
    /// within [`LATER`].
    fn ring_if_waiting_unbounded(&self) {
        fence(Ordering::SeqCst);
        if self
            .state
            .compare_exchange(WAITS, BUSY, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.fd.ring();
        }
    }

    /// Before the worker's wait (`bounded`: its timeout is at most [`LATER`]): true when it
    /// may wait (nothing is queued).
    fn may_wait(&self, bounded: bool, queue_empty: impl FnOnce() -> bool) -> bool {
        let state = if bounded { WAITS_BOUNDED } else { WAITS };
        self.state.store(state, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        queue_empty()
    }

    /// After the worker's wait.
    fn awake(&self) {
        self.state.store(BUSY, Ordering::Relaxed);
    }
}

/// Queues requests for a worker and rings its doorbell. Dropping it rings once more, so the
/// worker sees the closed queue and ends.
#[derive(Debug)]
pub(crate) struct WorkerTx {
    tx: Option<mpsc::UnboundedSender<WorkerCmd>>,
    bell: Arc<Doorbell>,
}

impl WorkerTx {
    /// Queues `cmd` and wakes the worker if it waits; gives `cmd` back if the worker is gone
    /// (so that its sockets are closed before their ports are freed; a large value, on a path
    /// taken only after a shutdown).
    #[allow(clippy::result_large_err)]
    pub(crate) fn send(&self, cmd: WorkerCmd) -> Result<(), WorkerCmd> {
        self.push(cmd, Doorbell::ring_if_waiting)
    }

    /// [`Self::send`] without waking the worker unless it waits without bound: `cmd` is
    /// served before the worker next forwards a datagram, and within [`LATER`] otherwise.
    /// For requests whose requester can wait that long: a wake-up of an idle worker costs
    /// more than the request itself.
    #[allow(clippy::result_large_err)]
    pub(crate) fn send_later(&self, cmd: WorkerCmd) -> Result<(), WorkerCmd> {
        self.push(cmd, Doorbell::ring_if_waiting_unbounded)
    }

    #[allow(clippy::result_large_err)]
    fn push(&self, cmd: WorkerCmd, ring: fn(&Doorbell)) -> Result<(), WorkerCmd> {
        let Some(tx) = &self.tx else {
            return Err(cmd);
        };
        tx.send(cmd).map_err(|e| e.0)?;
        ring(&self.bell);
        Ok(())
    }
}

impl Drop for WorkerTx {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.bell.fd.ring();
    }
}

/// Relay-wide totals since start, shared by every worker: each worker adds what it counted
/// once per wakeup, not per packet or batch.
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

/// A worker's counts since its last [`Totals`] update.
#[derive(Debug, Default)]
struct Local {
    strangers: u64,
    forwarded: u64,
    bytes: u64,
    dropped: u64,
}

/// The epoll token of the worker's doorbell; sockets use their port (< 2^16).
const BELL: u64 = 1 << 32;

/// Starts worker `index`. Closed sessions are reported on `closed`; relay-wide counts go to
/// `totals` (shared by every worker).
pub(crate) fn spawn(
    index: usize,
    cfg: WorkerConfig,
    closed: mpsc::UnboundedSender<Closed>,
    totals: Arc<Totals>,
    ports: Arc<PortsShared>,
) -> io::Result<WorkerHandle> {
    let (tx, rx) = mpsc::unbounded_channel();
    let bell = Arc::new(Doorbell::new()?);
    let worker_bell = bell.clone();
    // The worker is built on its thread (its batch buffers hold raw pointers), which reports
    // back once.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("relay-worker-{index}"))
        .spawn(move || {
            let span = tracing::info_span!("relay_worker", worker = index);
            let _entered = span.enter();
            let worker = Worker::new(cfg, totals, ports, index).and_then(|w| {
                w.epoll.add(worker_bell.fd.as_fd(), BELL)?;
                Ok(w)
            });
            match worker {
                Ok(w) => {
                    let _ = ready_tx.send(Ok(()));
                    run(w, rx, &worker_bell, &closed);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
    ready_rx
        .recv()
        .map_err(|_| io::Error::other("relay worker thread died at start"))??;
    Ok(WorkerHandle {
        tx: WorkerTx { tx: Some(tx), bell },
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
    /// Per session: its port pairs (two sockets each).
    session_ports: HashMap<SessionId, Vec<PortPair>>,
    /// The pool the ports go back to, and this worker's session count in it.
    ports: Arc<PortsShared>,
    index: usize,
    /// Every socket of this worker, by port.
    epoll: Epoll,
    io: BatchIo,
    pending: Vec<Pending>,
    send_list: Vec<Transmit>,
    send: SendCounters,
    /// Relay-wide totals, and what this worker counted since it last added to them.
    totals: Arc<Totals>,
    local: Local,
    recv_warn: RateLimit,
    send_warn: RateLimit,
    /// Datagrams received in the current round (for [`Pace`]).
    received: u64,
    pace: Pace,
}

impl Worker {
    fn new(
        cfg: WorkerConfig,
        totals: Arc<Totals>,
        ports_shared: Arc<PortsShared>,
        index: usize,
    ) -> io::Result<Self> {
        let ports = usize::from(cfg.port_max - cfg.port_min) + 1;
        Ok(Self {
            relay: Relay::new(cfg.port_min, cfg.pairs, cfg.timeouts),
            port_min: cfg.port_min,
            v6: cfg.v6,
            sockets: (0..ports).map(|_| None).collect(),
            session_ports: HashMap::new(),
            ports: ports_shared,
            index,
            epoll: Epoll::new()?,
            io: BatchIo::new(cfg.io == IoMode::Batched),
            pending: Vec::with_capacity(BATCH),
            send_list: Vec::with_capacity(BATCH),
            send: SendCounters::default(),
            totals,
            local: Local::default(),
            recv_warn: RateLimit::default(),
            send_warn: RateLimit::default(),
            received: 0,
            pace: Pace::new(cfg.batch_wait),
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
        self.received += n as u64;
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
        let l = &mut self.local;
        l.forwarded += self.pending.len() as u64;
        l.bytes += bytes;
        l.dropped += dropped;
        l.strangers += strangers;
        self.send_grouped(now);
        Ok(Batch { drained })
    }

    /// Adds what this worker counted to the relay-wide totals (once per wakeup).
    fn publish(&mut self) {
        let l = std::mem::take(&mut self.local);
        let t = &self.totals;
        if l.forwarded > 0 {
            t.forwarded.fetch_add(l.forwarded, Ordering::Relaxed);
            t.bytes.fetch_add(l.bytes, Ordering::Relaxed);
        }
        if l.dropped > 0 {
            t.dropped.fetch_add(l.dropped, Ordering::Relaxed);
            t.strangers.fetch_add(l.strangers, Ordering::Relaxed);
        }
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

/// What a request asks of the loop.
enum Next {
    Continue,
    Stop,
}

/// The worker thread's loop: waits in epoll until a socket has data, a request is queued or
/// the core's next deadline passes; ends on shutdown or when the control side is gone.
fn run(
    mut w: Worker,
    mut rx: mpsc::UnboundedReceiver<WorkerCmd>,
    bell: &Doorbell,
    closed: &mpsc::UnboundedSender<Closed>,
) {
    let mut ready: Vec<u64> = Vec::with_capacity(EVENTS);
    loop {
        // With sessions, quiet requests about them may come: wait at most LATER. Without,
        // wait for the core's deadline only (a quiet request then rings).
        let now = Instant::now();
        let deadline = w.relay.poll_timeout();
        let bounded = !w.session_ports.is_empty();
        let until = match (deadline, bounded) {
            (Some(d), true) => Some(d.min(now + LATER)),
            (None, true) => Some(now + LATER),
            (d, false) => d,
        };
        let bounded = until.is_some_and(|t| t <= now + LATER);
        let timeout = if !bell.may_wait(bounded, || rx.is_empty()) {
            // A request is queued: look at the sockets without waiting, then serve it.
            0
        } else {
            until.map_or(-1, |t| {
                // Rounded up: waking before the deadline would only wait again.
                let ms = t.saturating_duration_since(now).as_micros().div_ceil(1000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            })
        };
        let waited = w.epoll.wait(timeout, &mut ready);
        bell.awake();
        match waited {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                // Only a programming error (EBADF, EINVAL, EFAULT) gets here.
                tracing::error!(%error, "relay worker: epoll_wait failed; closing its sessions");
                close_all(&mut w);
                return;
            }
        }
        let woke = Instant::now();
        // Requests first: one queued without a ring (an answer's SDP) must take effect before
        // the datagrams that woke the worker are forwarded.
        if let Next::Stop = serve(&mut w, &mut rx) {
            return;
        }
        let mut rung = false;
        for &token in &ready {
            match u16::try_from(token) {
                Ok(port) => w.drain(port),
                Err(_) => rung = true,
            }
        }
        w.publish();
        if rung {
            let _ = bell.fd.clear();
        }
        // And after the round: requests queued while the worker was busy did not ring.
        if let Next::Stop = serve(&mut w, &mut rx) {
            return;
        }
        let now = Instant::now();
        if w.relay.poll_timeout().is_some_and(|t| t <= now) {
            expire(&mut w, now, closed);
        }
        // Dense traffic: let the next packets gather instead of waking for each (a request
        // queued meanwhile waits at most `batch_wait` too).
        let received = std::mem::take(&mut w.received);
        if let Some(until) = w.pace.after_round(woke, now, received) {
            let left = until.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                std::thread::sleep(left);
            }
        }
    }
}

/// Serves the queued requests.
fn serve(w: &mut Worker, rx: &mut mpsc::UnboundedReceiver<WorkerCmd>) -> Next {
    loop {
        match rx.try_recv() {
            Ok(cmd) => {
                if let Next::Stop = handle(w, cmd) {
                    return Next::Stop;
                }
            }
            Err(TryRecvError::Empty) => return Next::Continue,
            Err(TryRecvError::Disconnected) => {
                // Every sender is gone without a shutdown: close quietly.
                close_all(w);
                return Next::Stop;
            }
        }
    }
}

/// Serves one request.
fn handle(w: &mut Worker, cmd: WorkerCmd) -> Next {
    match cmd {
        WorkerCmd::Add {
            id,
            label,
            streams,
            first,
            alloc,
            reply,
        } => {
            let _ = reply.send(add(w, id, label, streams, first).map(|()| alloc));
        }
        WorkerCmd::Update { id, sdp, reply } => {
            let r = sdp.apply(&mut w.relay, id);
            match reply {
                Some(reply) => {
                    let _ = reply.send(r);
                }
                None => {
                    if let Err(error) = r {
                        // Only a session that closed meanwhile (timed out) gets here: the SIP
                        // side hears of that on the event channel.
                        tracing::debug!(%error, session = %id, "media update not applied");
                    }
                }
            }
        }
        WorkerCmd::Remove { id, reply } => {
            let stats = w.relay.remove(Instant::now(), id);
            if stats.is_some() {
                close_io(w, id);
            }
            let _ = reply.send(stats);
        }
        WorkerCmd::Query { id, reply } => {
            let _ = reply.send(w.relay.query(Instant::now(), id));
        }
        WorkerCmd::Shutdown { reply } => {
            let all = close_all(w);
            let _ = reply.send(all);
            return Next::Stop;
        }
    }
    Next::Continue
}

/// Closes the sessions whose deadline has passed and reports them to the control thread.
fn expire(w: &mut Worker, now: Instant, closed: &mpsc::UnboundedSender<Closed>) {
    for c in w.relay.on_tick(now) {
        close_io(w, c.id);
        tracing::debug!(session = %c.id, call_id = %c.label, reason = ?c.reason, "media session timed out");
        // The control thread tells the SIP core; if it is gone, the relay is shutting down
        // anyway.
        let _ = closed.send(c);
    }
}

fn close_all(w: &mut Worker) -> Vec<Closed> {
    let all = w.relay.close_all(Instant::now());
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

/// Registers a session's sockets with the core and the worker's epoll instance and sets the
/// first SDP. On failure nothing of it is left: its sockets are closed and its ports freed.
fn add(
    st: &mut Worker,
    id: SessionId,
    label: String,
    streams: Vec<[LegSockets; 2]>,
    first: Option<SideSdp>,
) -> Result<(), RelayError> {
    let ports: Vec<StreamPorts> = streams
        .iter()
        .map(|[caller, callee]| StreamPorts {
            caller: caller.ports,
            callee: callee.ports,
        })
        .collect();
    let pairs: Vec<PortPair> = ports.iter().flat_map(|p| [p.caller, p.callee]).collect();
    if let Err(e) = st.relay.add_session(Instant::now(), id, label, &ports) {
        drop(streams); // the sockets close before their ports go back
        st.ports.release(pairs);
        // Counted by the control thread at the hand-over.
        st.ports.load[st.index].fetch_sub(1, Ordering::Relaxed);
        return Err(e);
    }
    let mut failed = None;
    for leg in streams.into_iter().flatten() {
        for (port, sock) in [(leg.ports.rtp, leg.rtp), (leg.ports.rtcp, leg.rtcp)] {
            if failed.is_none()
                && let Err(e) = st.epoll.add(sock.as_fd(), u64::from(port))
            {
                failed = Some(RelayError::Io(e));
            }
            let off = usize::from(port - st.port_min);
            st.sockets[off] = Some(sock);
        }
    }
    // From here on `close_io` undoes it all, the count included.
    st.session_ports.insert(id, pairs);
    if failed.is_none()
        && let Some(f) = first
        && let Err(e) = f.apply(&mut st.relay, id)
    {
        failed = Some(e);
    }
    if let Some(e) = failed {
        let _ = st.relay.remove(Instant::now(), id);
        close_io(st, id);
        return Err(e);
    }
    Ok(())
}

/// Closes a removed session's sockets and gives its ports back to the pool.
fn close_io(st: &mut Worker, id: SessionId) {
    let Some(pairs) = st.session_ports.remove(&id) else {
        return;
    };
    for pair in &pairs {
        for port in [pair.rtp, pair.rtcp] {
            let off = usize::from(port - st.port_min);
            // Closing the socket takes it out of the epoll set (its only descriptor: the
            // sockets are never duplicated), so no EPOLL_CTL_DEL: four syscalls less per call.
            drop(st.sockets[off].take());
        }
    }
    // The sockets are closed: the ports can be bound again.
    st.ports.release(pairs);
    st.ports.load[st.index].fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_doorbell_rings_only_for_a_waiting_worker() {
        let bell = Doorbell::new().unwrap();
        // A busy worker (not waiting): a request makes no write.
        bell.ring_if_waiting();
        assert!(!bell.fd.clear(), "rung for a busy worker");
        // A queued request keeps the worker from waiting at all.
        assert!(!bell.may_wait(false, || false));
        bell.awake();
        // A waiting worker is rung once, however many requests follow before it wakes.
        assert!(bell.may_wait(false, || true));
        bell.ring_if_waiting();
        bell.ring_if_waiting();
        assert!(bell.fd.clear(), "a waiting worker was not rung");
        assert!(!bell.fd.clear());
        bell.awake();
        bell.ring_if_waiting();
        assert!(!bell.fd.clear(), "rung after the worker woke");
    }

    /// A quiet request rings only a worker that waits without bound; an ordinary request
    /// rings a bounded wait too.
    #[test]
    fn a_quiet_request_rings_only_an_unbounded_wait() {
        let bell = Doorbell::new().unwrap();
        assert!(bell.may_wait(true, || true));
        bell.ring_if_waiting_unbounded();
        assert!(
            !bell.fd.clear(),
            "rung a worker that wakes within LATER anyway"
        );
        bell.ring_if_waiting();
        assert!(bell.fd.clear(), "an ordinary request rings a bounded wait");
        bell.awake();
        assert!(bell.may_wait(false, || true));
        bell.ring_if_waiting_unbounded();
        bell.ring_if_waiting_unbounded();
        assert!(
            bell.fd.clear(),
            "a worker waiting without bound was not rung"
        );
        assert!(!bell.fd.clear(), "rung twice");
        bell.awake();
        bell.ring_if_waiting_unbounded();
        assert!(!bell.fd.clear(), "rung a busy worker");
    }
}
