//! Starting the relay, and its control thread.
//!
//! A request about a session costs one hand-over to each thread it passes and one back to the
//! requester. A new session goes to the control thread, which takes port pairs from the shared
//! pool, binds the sockets (skipping ports another process holds; off the SIP threads, whose
//! single worker is the ceiling of the call rate), picks the worker with the fewest sessions
//! and hands the session to it. Updates, deletes and queries go from the handle to the owning
//! worker directly (the worker is part of the session id). The worker answers the requester,
//! and frees the ports of a session it closes after closing its sockets, so a freed port can
//! always be bound again. (With the control thread waiting in the middle of every request,
//! and a first SDP sent as a second request, a relayed call's offer, answer and BYE took 14
//! hand-overs instead of 7: a quarter of the CPU of a relayed call, issue #15.)
//!
//! The control thread also serves the counts and the shutdown, and sends the sessions
//! workers close on a timeout out on the event channel.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::worker::{
    self, LegSockets, PortsShared, SideSdp, Totals, WorkerCmd, WorkerConfig, WorkerTx,
};
use crate::forward::Timeouts;
use crate::ports::PortPool;
use crate::{
    Allocation, Closed, Command, Counts, PortPair, RelayConfig, RelayError, RelayHandle, SessionId,
    StreamPorts,
};

/// A reserved pair with its sockets bound.
#[derive(Debug)]
struct Bound {
    pair: PortPair,
    rtp: std::net::UdpSocket,
    rtcp: std::net::UdpSocket,
}

/// A sender to each worker, shared by the handles and the control thread.
#[derive(Debug)]
pub(crate) struct Workers {
    txs: Vec<WorkerTx>,
}

impl Workers {
    /// The worker that owns session `id` ([`Control::allocate`] numbers them so).
    pub(crate) fn of(&self, id: SessionId) -> Option<&WorkerTx> {
        let n = self.txs.len() as u64;
        if n == 0 {
            return None;
        }
        self.txs.get(usize::try_from(id.0 % n).ok()?)
    }
}

struct Control {
    bind: IpAddr,
    ports: Arc<PortsShared>,
    workers: Arc<Workers>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Sessions allocated so far; the id of the next one is this times the worker count plus
    /// its worker's index.
    allocated: u64,
    events: mpsc::UnboundedSender<Closed>,
    /// What the workers forwarded and dropped.
    totals: Arc<Totals>,
}

impl Control {
    /// Binds a new session's sockets and hands them to the least loaded worker, which adds
    /// the session, sets `first` and answers `reply` (and on failure closes the sockets and
    /// frees the ports). Errors before the hand-over are answered here.
    fn allocate(
        &mut self,
        label: String,
        streams: usize,
        first: Option<SideSdp>,
        reply: oneshot::Sender<Result<Allocation, RelayError>>,
    ) {
        if streams == 0 {
            let _ = reply.send(Err(RelayError::StreamCount));
            return;
        }
        let bound = match self.acquire(streams * 2) {
            Ok(b) => b,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let pairs: Vec<PortPair> = bound.iter().map(|b| b.pair).collect();
        let mut legs = bound.into_iter().map(|b| LegSockets {
            ports: b.pair,
            rtp: b.rtp,
            rtcp: b.rtcp,
        });
        let mut sockets = Vec::with_capacity(streams);
        while let (Some(caller), Some(callee)) = (legs.next(), legs.next()) {
            sockets.push([caller, callee]);
        }
        let txs = &self.workers.txs;
        let worker = (0..txs.len())
            .min_by_key(|&i| self.ports.load[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        // Unique, and names its worker: `of` finds it from the id alone.
        self.allocated += 1;
        let id = SessionId(self.allocated * txs.len() as u64 + worker as u64);
        let alloc = Allocation {
            id,
            streams: pairs
                .chunks_exact(2)
                .map(|c| StreamPorts {
                    caller: c[0],
                    callee: c[1],
                })
                .collect(),
        };
        let cmd = WorkerCmd::Add {
            id,
            label,
            streams: sockets,
            first,
            alloc,
            reply,
        };
        // Counted at the hand-over, not when the worker gets to it: the next allocation,
        // queued right behind, must see it (the worker uncounts a session it closes).
        self.ports.load[worker].fetch_add(1, Ordering::Relaxed);
        let sent = match txs.get(worker) {
            Some(w) => w.send(cmd),
            None => Err(cmd),
        };
        if let Err(WorkerCmd::Add { streams, reply, .. }) = sent {
            // The worker is gone (the relay stopped): close the sockets, then free the ports.
            self.ports.load[worker].fetch_sub(1, Ordering::Relaxed);
            drop(streams);
            self.ports.release(pairs);
            let _ = reply.send(Err(RelayError::Stopped));
        }
    }

    /// Takes `need` pairs and binds their sockets. A pair whose port another process holds is
    /// put back at the tail and the next one is tried; each free pair is tried at most once.
    fn acquire(&self, need: usize) -> Result<Vec<Bound>, RelayError> {
        let mut got: Vec<Bound> = Vec::with_capacity(need);
        let free = self.ports.pool().free();
        let mut tries = free;
        while got.len() < need && tries > 0 {
            tries -= 1;
            let pair = {
                let mut pool = self.ports.pool();
                if pool.free() + got.len() < need {
                    break;
                }
                pool.take()
            };
            let Some(pair) = pair else { break };
            let bound = bind_udp(self.bind, pair.rtp)
                .and_then(|rtp| Ok((rtp, bind_udp(self.bind, pair.rtcp)?)));
            match bound {
                Ok((rtp, rtcp)) => got.push(Bound { pair, rtp, rtcp }),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    tracing::debug!(port = pair.rtp, "media port in use elsewhere, skipped");
                    self.ports.release([pair]);
                }
                Err(e) => {
                    self.ports.release([pair]);
                    self.release_bound(got);
                    return Err(RelayError::Io(e));
                }
            }
        }
        if got.len() < need {
            self.release_bound(got);
            return Err(RelayError::PortsExhausted);
        }
        Ok(got)
    }

    fn release_bound(&self, bound: Vec<Bound>) {
        let pairs: Vec<PortPair> = bound.iter().map(|b| b.pair).collect();
        drop(bound); // close the sockets first
        self.ports.release(pairs);
    }
}

pub(crate) fn start(
    cfg: RelayConfig,
) -> io::Result<(RelayHandle, mpsc::UnboundedReceiver<Closed>)> {
    let invalid = |e: crate::ports::RangeError| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("media ports: {e}"))
    };
    let pairs = PortPool::pairs_in(cfg.port_min, cfg.port_max).map_err(invalid)?;
    // std's per-process random hash keys: a random shuffle without reading a clock.
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let pool = PortPool::new(cfg.port_min, cfg.port_max, seed).map_err(invalid)?;
    let n = if cfg.workers == 0 {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    } else {
        cfg.workers
    };
    let wcfg = WorkerConfig {
        port_min: cfg.port_min,
        port_max: cfg.port_max,
        pairs,
        timeouts: Timeouts {
            idle: cfg.idle_timeout,
            offer: cfg.offer_timeout,
            hold: cfg.hold_timeout,
        },
        io: cfg.io,
        v6: cfg.bind.is_ipv6(),
        batch_wait: cfg.batch_wait,
    };
    let (closed_tx, closed_rx) = mpsc::unbounded_channel();
    let totals = Arc::new(Totals::default());
    #[allow(clippy::disallowed_types)] // see `PortsShared`: never held across an await
    let ports = Arc::new(PortsShared {
        pool: std::sync::Mutex::new(pool),
        load: (0..n).map(|_| AtomicUsize::new(0)).collect(),
    });
    let mut workers = Vec::with_capacity(n);
    let mut threads = Vec::with_capacity(n);
    for i in 0..n {
        // On error the workers started so far see their channel close and exit.
        let w = worker::spawn(i, wcfg, closed_tx.clone(), totals.clone(), ports.clone())?;
        workers.push(w.tx);
        threads.extend(w.thread);
    }
    drop(closed_tx);
    let workers = Arc::new(Workers { txs: workers });

    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let control = Control {
        bind: cfg.bind,
        ports,
        workers: workers.clone(),
        threads,
        allocated: 0,
        events: events_tx,
        totals,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("relay-control".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread().build() {
                Ok(rt) => {
                    let _ = ready_tx.send(Ok(()));
                    rt.block_on(
                        control
                            .run(cmd_rx, closed_rx)
                            .instrument(tracing::info_span!("relay_control")),
                    );
                }
                // Dropping `control` ends the workers.
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
    ready_rx
        .recv()
        .map_err(|_| io::Error::other("relay control thread died at start"))??;
    // The embedding application logs the lifecycle at info.
    tracing::debug!(
        workers = n,
        ports = %format_args!("{}-{}", cfg.port_min, cfg.port_max),
        bind = %cfg.bind,
        "media relay started"
    );
    Ok((
        RelayHandle {
            tx: cmd_tx,
            workers,
        },
        events_rx,
    ))
}

/// One UDP socket on `ip:port`, non-blocking, without SO_REUSEADDR so that a port held by
/// another process fails with EADDRINUSE.
fn bind_udp(ip: IpAddr, port: u16) -> io::Result<std::net::UdpSocket> {
    let addr = SocketAddr::new(ip, port);
    // Non-blocking from the start: one syscall less per socket, four per relayed call.
    let s = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.nonblocking(),
        Some(Protocol::UDP),
    )?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

impl Control {
    async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<Command>,
        mut closed: mpsc::UnboundedReceiver<Closed>,
    ) {
        loop {
            tokio::select! {
                biased;
                Some(c) = closed.recv() => self.on_closed(c),
                cmd = cmds.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => {
                        let all = self.stop(&mut closed).await;
                        let _ = reply.send(all);
                        break;
                    }
                    Some(cmd) => self.handle(cmd).await,
                    // Every handle is gone.
                    None => {
                        self.stop(&mut closed).await;
                        break;
                    }
                },
            }
        }
        tracing::debug!("media relay stopped");
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Allocate {
                label,
                streams,
                reply,
            } => self.allocate(label, streams, None, reply),
            Command::Open { open, reply } => {
                if let Some(old) = open.replace {
                    // Waited for, so that its ports are back before the new ones are taken;
                    // gone already (a timeout) is fine: its worker freed them.
                    if let Some(w) = self.workers.of(old) {
                        let (tx, rx) = oneshot::channel();
                        if w.send(WorkerCmd::Remove { id: old, reply: tx }).is_ok() {
                            let _ = rx.await;
                        }
                    }
                }
                let streams = open.streams.len();
                let first = SideSdp {
                    side: open.side,
                    streams: open.streams,
                    sources: open.sources,
                    answered: open.answered,
                };
                self.allocate(open.label, streams, Some(first), reply);
            }
            Command::Counts { reply } => {
                let ports_in_use = self.ports.pool().in_use();
                let _ = reply.send(Counts {
                    sessions: self
                        .ports
                        .load
                        .iter()
                        .map(|l| l.load(Ordering::Relaxed))
                        .sum(),
                    ports_in_use: ports_in_use * 2,
                    strangers: self.totals.strangers.load(Ordering::Relaxed),
                    forwarded: self.totals.forwarded.load(Ordering::Relaxed),
                    forwarded_bytes: self.totals.bytes.load(Ordering::Relaxed),
                    dropped: self.totals.dropped.load(Ordering::Relaxed),
                });
            }
            // Handled by `run`.
            Command::Shutdown { reply } => {
                let _ = reply.send(Vec::new());
            }
        }
    }

    /// Sends a request to a worker and waits for its answer.
    async fn ask<T>(
        &self,
        worker: usize,
        make: impl FnOnce(oneshot::Sender<T>) -> WorkerCmd,
    ) -> Result<T, RelayError> {
        let (tx, rx) = oneshot::channel();
        let w = self.workers.txs.get(worker).ok_or(RelayError::Stopped)?;
        w.send(make(tx)).map_err(|_| RelayError::Stopped)?;
        rx.await.map_err(|_| RelayError::Stopped)
    }

    /// A session a worker closed on a timeout (its ports are free already): to the SIP core.
    fn on_closed(&mut self, c: Closed) {
        // The SIP core may have dropped the receiver; nothing to do then.
        let _ = self.events.send(c);
    }

    /// Closes every session, stops and joins the workers, and returns what they closed.
    async fn stop(&mut self, closed: &mut mpsc::UnboundedReceiver<Closed>) -> Vec<Closed> {
        let mut all = Vec::new();
        for w in 0..self.workers.txs.len() {
            if let Ok(mut c) = self.ask(w, |reply| WorkerCmd::Shutdown { reply }).await {
                all.append(&mut c);
            }
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a media relay worker panicked");
            }
        }
        // Timeouts reported before the shutdown still go out as events.
        while let Ok(c) = closed.try_recv() {
            self.on_closed(c);
        }
        all
    }
}
