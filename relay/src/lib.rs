//! sipedge-relay: an in-process RTP/RTCP relay (symmetric RTP, RFC 4961; rtcp-mux, RFC 5761).
//!
//! The SIP core asks it, through a [`RelayHandle`], for port pairs for a call branch, tells it
//! each side's SDP endpoints and the addresses its SIP came from, and gets per-leg statistics
//! back when the session is deleted or times out. The relay binds one RTP and one RTCP socket
//! per leg, latches each side to the first valid packet from a source IP that side signalled
//! (strict source: anyone else is dropped and counted) and forwards packets between the legs
//! with recvmmsg/sendmmsg batches.
//!
//! # Layout
//!
//! - `ports`: the port-pair pool (shuffled once, head out, tail in). Pure.
//! - `session`: the session table of one worker; legs indexed by `port - port_min`. Pure.
//! - `latch`: the strict-source latch policy with its re-latch window after new SDP. Pure.
//! - `forward`: the relay core, `on_packet(now, port, src, bytes) -> Verdict` and
//!   `on_tick(now)` for timeouts. Pure.
//! - `rtp`: checked zero-copy RTP/RTCP views (RFC 3550 §5.1, §6.4). Pure.
//! - `stats`: RFC 3550 A.1/A.3 loss and A.8 jitter. Pure.
//! - `io::sys`: recvmmsg/sendmmsg and their per-packet fallback; the only `unsafe` code.
//! - `io::worker`: one OS thread per worker, blocking in its own epoll (no runtime); moves bytes
//!   between its sockets and its `forward::Relay`.
//! - `io::control`: starting the relay; the control thread (binds a new session's sockets and
//!   hands them to the least loaded worker; counts, shutdown, timeouts turned into [`Closed`]
//!   events); the worker senders the handles use for everything else about a session. The
//!   worker answers every request itself.
//!
//! Pure modules take `now` as a parameter and never touch a socket; the I/O modules read
//! `tokio::time::Instant::now()`.

mod forward;
mod io;
mod latch;
mod ports;
mod rtp;
mod session;
mod stats;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// The sans-IO core and the packet views, for benchmarks and fuzzers. Not a stable API.
#[doc(hidden)]
pub mod sans_io {
    pub use crate::forward::{DropReason, Relay, Timeouts, Verdict};
    pub use crate::rtp::{
        Malformed, RtcpView, RtpView, build_rtcp_rr, build_rtp, is_misdirected_rtcp,
        looks_like_rtcp,
    };
}

/// How the workers receive and send datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// recvmmsg/sendmmsg batches; falls back to per-packet calls if the kernel says ENOSYS.
    #[default]
    Batched,
    /// One recvfrom/sendto per datagram (tests of the fallback path).
    PerPacket,
}

/// Relay settings (the `[media]` table, DESIGN §3).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Local address the media sockets bind to (e.g. 0.0.0.0 or 127.0.0.1).
    pub bind: IpAddr,
    /// First port of the range, even: RTP on even ports, RTCP on RTP + 1.
    pub port_min: u16,
    /// Last port of the range, inclusive.
    pub port_max: u16,
    /// Worker threads; 0 = one per core.
    pub workers: usize,
    /// An answered session with no packet from either side for this long is closed.
    pub idle_timeout: Duration,
    /// A session never answered for this long is closed.
    pub offer_timeout: Duration,
    /// The idle limit while the call is on hold (sendonly/recvonly/inactive or port 0).
    pub hold_timeout: Duration,
    /// Batched syscalls (default) or the per-packet fallback.
    pub io: IoMode,
    /// Wake-up coalescing: a worker receiving packets faster than two per this interval
    /// sleeps until this long after each wake-up before polling again, so that one wake-up
    /// carries the interval's packets (`io/pace.rs`). Adds at most this much latency per
    /// relayed packet; zero turns it off.
    pub batch_wait: Duration,
}

impl Default for RelayConfig {
    /// The DESIGN §3 defaults: 0.0.0.0, ports 30000-40000, 60 s idle, 120 s offer, 3600 s hold.
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port_min: 30000,
            port_max: 40000,
            workers: 0,
            idle_timeout: Duration::from_secs(60),
            offer_timeout: Duration::from_secs(120),
            hold_timeout: Duration::from_secs(3600),
            io: IoMode::Batched,
            batch_wait: DEFAULT_BATCH_WAIT,
        }
    }
}

/// [`RelayConfig::batch_wait`] unless configured, in microseconds (`media.batch_wait_us`):
/// see `io/pace.rs` and README "Benchmarks".
pub const DEFAULT_BATCH_WAIT_US: u64 = 1000;
/// [`DEFAULT_BATCH_WAIT_US`] as a duration.
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_micros(DEFAULT_BATCH_WAIT_US);

/// Starts the relay: the worker threads (each blocking in its own epoll instance) and the
/// control thread (a current-thread tokio runtime). Works from inside a tokio runtime and from
/// plain threads alike.
///
/// Returns the handle and the channel on which sessions closed by a timeout are reported.
/// Fails on an invalid port range or if a thread, an epoll instance or the runtime cannot be
/// created.
pub fn start(cfg: RelayConfig) -> std::io::Result<(RelayHandle, mpsc::UnboundedReceiver<Closed>)> {
    io::control::start(cfg)
}

/// A session: one call branch. Unique for the life of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The two parties of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The party that sent the INVITE.
    Caller,
    /// The party that answers it.
    Callee,
}

impl Side {
    pub(crate) fn idx(self) -> usize {
        match self {
            Self::Caller => 0,
            Self::Callee => 1,
        }
    }

    /// The other party.
    pub fn other(self) -> Self {
        match self {
            Self::Caller => Self::Callee,
            Self::Callee => Self::Caller,
        }
    }
}

/// The SDP direction attribute of a stream (RFC 3264 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    #[default]
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

/// One side's SDP for one m= line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Endpoint {
    /// c= address and m= port.
    pub rtp: SocketAddr,
    /// a=rtcp, or the RTP port + 1.
    pub rtcp: SocketAddr,
    /// a=rtcp-mux (RFC 5761): RTCP on the RTP port.
    pub rtcp_mux: bool,
    pub direction: Direction,
    /// Clock rate of the first codec (a=rtpmap); 0 = unknown, 8000 is assumed.
    pub clock_rate: u32,
}

/// A local RTP port and its RTCP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortPair {
    pub rtp: u16,
    pub rtcp: u16,
}

/// The local ports of one stream: `caller` is the leg facing the caller (advertised in the SDP
/// the caller receives), `callee` the one facing the callee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPorts {
    pub caller: PortPair,
    pub callee: PortPair,
}

/// A new session and its ports, one entry per m= line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub id: SessionId,
    pub streams: Vec<StreamPorts>,
}

/// What was received from one side, summed over streams.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LegStats {
    /// RTP packets accepted.
    pub pkts: u64,
    /// RTP bytes (UDP payload) accepted.
    pub bytes: u64,
    /// Cumulative loss (RFC 3550 A.3).
    pub lost: u64,
    /// Interarrival jitter (RFC 3550 A.8), in ms; the maximum over streams.
    pub jitter_ms: f64,
    /// RTCP packets accepted.
    pub rtcp_pkts: u64,
    /// RTCP bytes accepted.
    pub rtcp_bytes: u64,
    /// Datagrams received on this side's ports and not forwarded (malformed, truncated, from a
    /// stranger, or nowhere to send them).
    pub dropped: u64,
    /// Of `dropped`: datagrams from a source this side never signalled (strict-source
    /// latching refused them).
    pub strangers: u64,
}

/// Per-session statistics: `caller` is what was received from the caller.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionStats {
    pub duration: Duration,
    pub caller: LegStats,
    pub callee: LegStats,
}

/// Why the relay closed a session by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Answered, and no packet for `idle_timeout`.
    Idle,
    /// Never answered within `offer_timeout`.
    Offer,
    /// On hold, and no packet for `hold_timeout`.
    Hold,
    /// The relay shut down.
    Shutdown,
}

/// A session the relay closed; its ports are free again.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    pub id: SessionId,
    /// The label given at allocation (the Call-ID).
    pub label: String,
    pub reason: CloseReason,
    pub stats: SessionStats,
}

/// Sessions and ports in use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub sessions: usize,
    /// Ports, not pairs: each pair counts 2.
    pub ports_in_use: usize,
    /// Datagrams dropped since start because their source was not the latched or a signalled
    /// one (strict-source latching), over all sessions.
    pub strangers: u64,
    /// Datagrams forwarded since start (RTP and RTCP), and their payload bytes.
    pub forwarded: u64,
    pub forwarded_bytes: u64,
    /// Datagrams received and not forwarded since start (strangers included).
    pub dropped: u64,
}

/// Errors of the relay's control API.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Every free port pair was tried and not enough could be bound.
    #[error("no free RTP/RTCP port pair")]
    PortsExhausted,
    /// The session id is unknown: never allocated, deleted, or closed by a timeout.
    #[error("no such media session")]
    NoSuchSession,
    /// The number of streams is 0 or differs from the allocation.
    #[error("stream count differs from the allocation")]
    StreamCount,
    /// The relay has shut down.
    #[error("media relay stopped")]
    Stopped,
    /// A socket could not be created, bound or registered.
    #[error("media socket: {0}")]
    Io(#[from] std::io::Error),
}

/// A new session with one side's SDP already set: [`RelayHandle::allocate`] then
/// [`RelayHandle::update`] in one request to the worker ([`RelayHandle::open`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Open {
    /// The label of the session (the Call-ID), as in [`RelayHandle::allocate`].
    pub label: String,
    /// A session closed first (its ports go back before the new ones are taken): the old
    /// session of a branch whose re-offer changed its m= lines. Unknown ids are ignored.
    pub replace: Option<SessionId>,
    /// The side whose SDP this is.
    pub side: Side,
    /// That side's endpoints, one per stream: their count is the number of streams.
    pub streams: Vec<Option<Endpoint>>,
    /// Where that side's signalling came from, as in [`RelayHandle::update`].
    pub sources: Vec<IpAddr>,
    /// As in [`RelayHandle::update`].
    pub answered: bool,
}

/// Requests from the handle to the control thread.
#[derive(Debug)]
pub(crate) enum Command {
    Allocate {
        label: String,
        streams: usize,
        reply: oneshot::Sender<Result<Allocation, RelayError>>,
    },
    Open {
        open: Open,
        reply: oneshot::Sender<Result<Allocation, RelayError>>,
    },
    Counts {
        reply: oneshot::Sender<Counts>,
    },
    Shutdown {
        reply: oneshot::Sender<Vec<Closed>>,
    },
}

/// The SIP core's handle on the relay. Cheap to clone. A new session is a message to the
/// control thread, which binds its sockets and hands it to a worker; everything else about a
/// session is a message to its worker. Either way the worker answers.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    pub(crate) tx: mpsc::UnboundedSender<Command>,
    pub(crate) workers: std::sync::Arc<io::control::Workers>,
}

impl RelayHandle {
    /// A request to the worker that owns session `id`, and its answer.
    async fn ask<T>(
        &self,
        id: SessionId,
        make: impl FnOnce(oneshot::Sender<T>) -> io::worker::WorkerCmd,
    ) -> Result<T, RelayError> {
        let (reply, rx) = oneshot::channel();
        self.queue(id, make(reply), false)?;
        rx.await.map_err(|_| RelayError::Stopped)
    }

    /// Queues `cmd` for the worker that owns session `id`; `later`: without waking it
    /// ([`io::worker::WorkerTx::send_later`]).
    fn queue(
        &self,
        id: SessionId,
        cmd: io::worker::WorkerCmd,
        later: bool,
    ) -> Result<(), RelayError> {
        let w = self.workers.of(id).ok_or(RelayError::Stopped)?;
        let sent = if later {
            w.send_later(cmd)
        } else {
            w.send(cmd)
        };
        sent.map_err(|_| RelayError::Stopped)
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, RelayError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| RelayError::Stopped)?;
        rx.await.map_err(|_| RelayError::Stopped)
    }

    /// Reserves and binds one caller-facing and one callee-facing port pair per stream.
    pub async fn allocate(&self, label: String, streams: usize) -> Result<Allocation, RelayError> {
        self.call(|reply| Command::Allocate {
            label,
            streams,
            reply,
        })
        .await?
    }

    /// Sets `side`'s SDP endpoints (one per m= line, `None` = port 0) and opens its re-latch
    /// window; `answered` switches to the idle/hold timeouts.
    ///
    /// `sources` are the addresses `side`'s signalling came from (the SIP source of its
    /// request or response). A leg latches only to a packet whose source IP is one of those or
    /// the stream's SDP address (any port: NAT); packets from anyone else are dropped.
    pub async fn update(
        &self,
        id: SessionId,
        side: Side,
        streams: Vec<Option<Endpoint>>,
        sources: Vec<IpAddr>,
        answered: bool,
    ) -> Result<(), RelayError> {
        let sdp = io::worker::SideSdp {
            side,
            streams,
            sources,
            answered,
        };
        self.ask(id, |reply| io::worker::WorkerCmd::Update {
            id,
            sdp,
            reply: Some(reply),
        })
        .await?
    }

    /// [`Self::update`] without waiting and without waking the worker: the SDP takes effect
    /// before the worker forwards its next datagram, and within 20 ms when none comes (a
    /// worker with sessions waits no longer). For an answer whose ports the caller knows
    /// already: a session that closed meanwhile is not updated (its close is on the event
    /// channel), and the only error here is a stopped relay.
    pub fn update_later(
        &self,
        id: SessionId,
        side: Side,
        streams: Vec<Option<Endpoint>>,
        sources: Vec<IpAddr>,
        answered: bool,
    ) -> Result<(), RelayError> {
        let sdp = io::worker::SideSdp {
            side,
            streams,
            sources,
            answered,
        };
        let cmd = io::worker::WorkerCmd::Update {
            id,
            sdp,
            reply: None,
        };
        self.queue(id, cmd, true)
    }

    /// [`Self::delete`] without waking the worker, queued at once: the session is closed and
    /// its ports freed before the worker forwards its next datagram, and within 20 ms when
    /// none comes. The returned future gives its stats; dropping it still closes the session.
    pub fn delete_later(
        &self,
        id: SessionId,
    ) -> impl std::future::Future<Output = Result<SessionStats, RelayError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let queued = self.queue(id, io::worker::WorkerCmd::Remove { id, reply }, true);
        async move {
            queued?;
            rx.await
                .map_err(|_| RelayError::Stopped)?
                .ok_or(RelayError::NoSuchSession)
        }
    }

    /// Allocates a session and sets one side's SDP in a single round trip to a worker (the
    /// first SDP of a call branch); closes `open.replace` first when given. On an error no
    /// new session exists (the replaced one is closed all the same).
    pub async fn open(&self, open: Open) -> Result<Allocation, RelayError> {
        self.call(|reply| Command::Open { open, reply }).await?
    }

    /// Closes a session and frees its ports (its sockets are closed when this returns).
    pub async fn delete(&self, id: SessionId) -> Result<SessionStats, RelayError> {
        self.ask(id, |reply| io::worker::WorkerCmd::Remove { id, reply })
            .await?
            .ok_or(RelayError::NoSuchSession)
    }

    /// A snapshot of a session's stats.
    pub async fn query(&self, id: SessionId) -> Result<SessionStats, RelayError> {
        self.ask(id, |reply| io::worker::WorkerCmd::Query { id, reply })
            .await?
            .ok_or(RelayError::NoSuchSession)
    }

    /// Sessions and ports in use; zeros once the relay has stopped.
    pub async fn counts(&self) -> Counts {
        self.call(|reply| Command::Counts { reply })
            .await
            .unwrap_or_default()
    }

    /// Closes every session (reason `Shutdown`), stops and joins the worker threads, and
    /// returns the closed sessions (they are not also sent on the event channel, which then
    /// ends). Later calls return an empty list.
    pub async fn shutdown(&self) -> Vec<Closed> {
        self.call(|reply| Command::Shutdown { reply })
            .await
            .unwrap_or_default()
    }
}

/// Raises the process's open-file soft limit to its hard limit (at start, before any
/// socket is bound); returns the soft limit before and after.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    io::sys::raise_nofile_limit()
}

/// The process heap (glibc's allocator): how much it holds free, and giving that back.
///
/// glibc keeps freed memory in its arenas for reuse; after a burst (transactions held 32 s
/// by the RFC 3261 timers, then freed) the process keeps its high-water mark, scattered in
/// pages that stay partly used. [`trim`] returns the whole free pages (`malloc_trim(0)`).
/// Here because this crate holds the project's only `unsafe` code (the FFI calls).
pub mod heap {
    /// Bytes the allocator holds from the system, free or in use.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Info {
        /// Small allocations' arenas, all threads.
        pub arena: usize,
        /// Of `arena`, bytes in free chunks (held, not in use).
        pub free: usize,
        /// Large allocations mapped one by one.
        pub mmapped: usize,
    }

    /// The allocator's counters (`None` when the C library is not glibc).
    pub fn info() -> Option<Info> {
        crate::io::sys::heap_info().map(|h| Info {
            arena: h.arena,
            free: h.free,
            mmapped: h.mmapped,
        })
    }

    /// Returns the free pages of every arena to the system; `true` when some were. It
    /// holds each arena's lock while it walks it: call it when the load has dropped, not on
    /// a hot path.
    pub fn trim() -> bool {
        crate::io::sys::heap_trim()
    }
}
