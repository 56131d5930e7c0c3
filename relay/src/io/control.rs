//! The control thread: serves [`RelayHandle`] requests one at a time. It owns the port pool,
//! binds each session's sockets (skipping ports another process holds), picks the worker with
//! the fewest sessions, and frees ports only after the worker has closed the sockets, so a
//! freed port can always be bound again. Sessions a worker closes on a timeout come back here
//! and go out on the event channel.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::worker::{self, LegSockets, Totals, WorkerCmd, WorkerConfig, WorkerHandle};
use crate::forward::Timeouts;
use crate::ports::PortPool;
use crate::{
    Allocation, Closed, Command, Counts, Endpoint, Open, PortPair, RelayConfig, RelayError,
    RelayHandle, SessionId, SessionStats, Side, StreamPorts,
};

/// What the control thread knows about a session.
#[derive(Debug)]
struct Owned {
    worker: usize,
    pairs: Vec<PortPair>,
    streams: usize,
}

/// A reserved pair with its sockets bound.
#[derive(Debug)]
struct Bound {
    pair: PortPair,
    rtp: std::net::UdpSocket,
    rtcp: std::net::UdpSocket,
}

struct Control {
    bind: IpAddr,
    pool: PortPool,
    workers: Vec<WorkerHandle>,
    load: Vec<usize>,
    sessions: HashMap<SessionId, Owned>,
    next_id: u64,
    events: mpsc::UnboundedSender<Closed>,
    /// What the workers forwarded and dropped.
    totals: Arc<Totals>,
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
    let mut workers = Vec::with_capacity(n);
    for i in 0..n {
        // On error the workers started so far see their channel close and exit.
        workers.push(worker::spawn(i, wcfg, closed_tx.clone(), totals.clone())?);
    }
    drop(closed_tx);

    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let control = Control {
        bind: cfg.bind,
        pool,
        load: vec![0; n],
        workers,
        sessions: HashMap::new(),
        next_id: 1,
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
    Ok((RelayHandle { tx: cmd_tx }, events_rx))
}

/// One UDP socket on `ip:port`, non-blocking, without SO_REUSEADDR so that a port held by
/// another process fails with EADDRINUSE.
fn bind_udp(ip: IpAddr, port: u16) -> io::Result<std::net::UdpSocket> {
    let addr = SocketAddr::new(ip, port);
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
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
                // Timeouts first: they free ports that the next allocation may need.
                biased;
                Some(c) = closed.recv() => self.on_closed(c, true),
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
            } => {
                let _ = reply.send(self.allocate(label, streams).await);
            }
            Command::Update {
                id,
                side,
                streams,
                sources,
                answered,
                reply,
            } => {
                let r = self.update(id, side, streams, sources, answered).await;
                let _ = reply.send(r);
            }
            Command::Open { open, reply } => {
                let _ = reply.send(self.open(open).await);
            }
            Command::Delete { id, reply } => {
                let _ = reply.send(self.delete(id).await);
            }
            Command::Query { id, reply } => {
                let r = match self.sessions.get(&id) {
                    None => Err(RelayError::NoSuchSession),
                    Some(o) => {
                        let w = o.worker;
                        self.ask(w, |reply| WorkerCmd::Query { id, reply })
                            .await
                            .and_then(|s| s.ok_or(RelayError::NoSuchSession))
                    }
                };
                let _ = reply.send(r);
            }
            Command::Counts { reply } => {
                let _ = reply.send(Counts {
                    sessions: self.sessions.len(),
                    ports_in_use: self.pool.in_use() * 2,
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
        let w = self.workers.get(worker).ok_or(RelayError::Stopped)?;
        w.tx.send(make(tx)).map_err(|_| RelayError::Stopped)?;
        rx.await.map_err(|_| RelayError::Stopped)
    }

    async fn update(
        &self,
        id: SessionId,
        side: Side,
        streams: Vec<Option<Endpoint>>,
        sources: Vec<IpAddr>,
        answered: bool,
    ) -> Result<(), RelayError> {
        match self.sessions.get(&id) {
            None => Err(RelayError::NoSuchSession),
            Some(o) if o.streams != streams.len() => Err(RelayError::StreamCount),
            Some(o) => {
                let w = o.worker;
                self.ask(w, |reply| WorkerCmd::Update {
                    id,
                    side,
                    streams,
                    sources,
                    answered,
                    reply,
                })
                .await
                .and_then(|r| r)
            }
        }
    }

    /// Allocate + update in one request (closing `replace` first); a session whose first
    /// update fails is closed again, so an error leaves no new session behind.
    async fn open(&mut self, open: Open) -> Result<Allocation, RelayError> {
        if let Some(old) = open.replace {
            // Gone already (a timeout) is fine: its report frees the ports.
            let _ = self.delete(old).await;
        }
        let alloc = self.allocate(open.label, open.streams.len()).await?;
        let r = self
            .update(
                alloc.id,
                open.side,
                open.streams,
                open.sources,
                open.answered,
            )
            .await;
        match r {
            Ok(()) => Ok(alloc),
            Err(e) => {
                let _ = self.delete(alloc.id).await;
                Err(e)
            }
        }
    }

    async fn allocate(&mut self, label: String, streams: usize) -> Result<Allocation, RelayError> {
        if streams == 0 {
            return Err(RelayError::StreamCount);
        }
        let bound = self.acquire(streams * 2)?;
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
        let worker = (0..self.load.len())
            .min_by_key(|&i| self.load[i])
            .unwrap_or(0);
        let id = SessionId(self.next_id);
        self.next_id += 1;
        let r = self
            .ask(worker, |reply| WorkerCmd::Add {
                id,
                label,
                streams: sockets,
                reply,
            })
            .await
            .and_then(|r| r);
        if let Err(e) = r {
            // The sockets were dropped with the request or by the worker.
            self.release(&pairs);
            return Err(e);
        }
        self.load[worker] += 1;
        let streams_ports = pairs
            .chunks_exact(2)
            .map(|c| StreamPorts {
                caller: c[0],
                callee: c[1],
            })
            .collect();
        self.sessions.insert(
            id,
            Owned {
                worker,
                pairs,
                streams,
            },
        );
        Ok(Allocation {
            id,
            streams: streams_ports,
        })
    }

    /// Takes `need` pairs and binds their sockets. A pair whose port another process holds is
    /// put back at the tail and the next one is tried; each free pair is tried at most once.
    fn acquire(&mut self, need: usize) -> Result<Vec<Bound>, RelayError> {
        let mut got: Vec<Bound> = Vec::with_capacity(need);
        let mut tries = self.pool.free();
        while got.len() < need && tries > 0 && self.pool.free() + got.len() >= need {
            tries -= 1;
            let Some(pair) = self.pool.take() else { break };
            let bound = bind_udp(self.bind, pair.rtp)
                .and_then(|rtp| Ok((rtp, bind_udp(self.bind, pair.rtcp)?)));
            match bound {
                Ok((rtp, rtcp)) => got.push(Bound { pair, rtp, rtcp }),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    tracing::debug!(port = pair.rtp, "media port in use elsewhere, skipped");
                    self.pool.release(pair);
                }
                Err(e) => {
                    self.pool.release(pair);
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

    fn release_bound(&mut self, bound: Vec<Bound>) {
        for b in bound {
            let pair = b.pair;
            drop(b); // close the sockets first
            self.pool.release(pair);
        }
    }

    fn release(&mut self, pairs: &[PortPair]) {
        for &p in pairs {
            if !self.pool.release(p) {
                tracing::error!(port = p.rtp, "media port pair released twice");
            }
        }
    }

    async fn delete(&mut self, id: SessionId) -> Result<SessionStats, RelayError> {
        let w = self
            .sessions
            .get(&id)
            .ok_or(RelayError::NoSuchSession)?
            .worker;
        match self.ask(w, |reply| WorkerCmd::Remove { id, reply }).await? {
            Some(stats) => {
                self.forget(id);
                Ok(stats)
            }
            // The worker timed it out just now; its report (on its way) frees the ports.
            None => Err(RelayError::NoSuchSession),
        }
    }

    /// Frees a closed session's ports and worker slot.
    fn forget(&mut self, id: SessionId) {
        if let Some(o) = self.sessions.remove(&id) {
            self.release(&o.pairs);
            if let Some(l) = self.load.get_mut(o.worker) {
                *l = l.saturating_sub(1);
            }
        }
    }

    fn on_closed(&mut self, c: Closed, report: bool) {
        self.forget(c.id);
        if report {
            // The SIP core may have dropped the receiver; nothing to do then.
            let _ = self.events.send(c);
        }
    }

    /// Closes every session, stops and joins the workers, and returns what they closed.
    async fn stop(&mut self, closed: &mut mpsc::UnboundedReceiver<Closed>) -> Vec<Closed> {
        let mut all = Vec::new();
        for w in 0..self.workers.len() {
            if let Ok(mut c) = self.ask(w, |reply| WorkerCmd::Shutdown { reply }).await {
                all.append(&mut c);
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                if t.join().is_err() {
                    tracing::error!("a media relay worker panicked");
                }
            }
        }
        // Timeouts reported before the shutdown still go out as events.
        while let Ok(c) = closed.try_recv() {
            self.on_closed(c, true);
        }
        for c in &all {
            self.forget(c.id);
        }
        // Sessions of a worker that died: their sockets died with it.
        let left: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in left {
            self.forget(id);
        }
        all
    }
}
