//! Trunk registration (Kamailio's `uac_reg`): every `[[trunk]]` with `register = true` keeps
//! its account registered at the provider. [`register`] is the sans-IO REGISTER client; this
//! module is its thin tokio shell: one task runs every trunk's client, sends what it asks for
//! over UDP from our first UDP socket, feeds it the responses the driver recognises by their
//! branch ([`register::BRANCH_PREFIX`]), sleeps until the earliest deadline, logs what happens
//! (`trunk registered` / `trunk registration failed`) and unregisters at shutdown.
//!
//! The credentials of calls through a trunk (the proxy answering a 401/407) are not here: they
//! are part of the proxied request ([`crate::proxy::txn`]).

pub mod register;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::{Kind, Registry};
use crate::sip::Message;
use crate::transaction::Timers;
use crate::transport::{Proto, Transmit, Transports};
use register::{RegClient, RegEvent, RegState};

/// Responses waiting for the task; more are dropped (and counted): a provider answers each
/// REGISTER once or a few times.
const QUEUE: usize = 64;

/// How long shutdown waits for the unregistrations to be answered.
const UNREGISTER_WAIT: Duration = Duration::from_secs(2);

/// The trunks' registration state, shared by the task, the driver and the metrics.
pub struct Trunks {
    tx: mpsc::Sender<Message>,
    /// Per trunk with a registration: its name and [`state_code`].
    states: Vec<(String, AtomicU64)>,
    /// Responses dropped because the queue was full.
    dropped: AtomicU64,
    runner: tokio::sync::Mutex<Option<Runner>>,
}

impl std::fmt::Debug for Trunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trunks")
            .field("trunks", &self.states.len())
            .finish_non_exhaustive()
    }
}

/// The task's side: the clients and where to send.
struct Runner {
    rx: mpsc::Receiver<Message>,
    clients: Vec<RegClient>,
    /// The registrar's address per client, once resolved.
    dests: Vec<Option<SocketAddr>>,
    transports: Arc<Transports>,
    local: SocketAddr,
    clock: Arc<dyn Clock>,
}

/// The gauge value of a state: 0 not registered (yet), 1 registered, 2 failed.
pub fn state_code(s: RegState) -> u64 {
    match s {
        RegState::Registering | RegState::Unregistered => 0,
        RegState::Registered => 1,
        RegState::Failed => 2,
    }
}

impl Trunks {
    /// The clients of every registering trunk of `cfg`, sending from `local` (our UDP sockets;
    /// none: nothing registers). Started by [`Trunks::run`].
    pub fn new(
        cfg: &Config,
        local: &[(Proto, SocketAddr)],
        transports: Arc<Transports>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let udp = local
            .iter()
            .find(|(p, _)| *p == Proto::Udp)
            .map(|(_, a)| *a);
        let now = clock.now();
        // Call-IDs and branches differ from the previous run's (its late answers are ignored).
        let salt = format!("{:x}", clock.unix());
        let mut clients = Vec::new();
        if let Some(local) = udp {
            let via = SocketAddr::new(cfg.server.advertise, local.port());
            for (idx, t) in cfg.trunks.iter().enumerate() {
                if let Some(c) = RegClient::new(t.clone(), idx, via, &salt, Timers::default(), now)
                {
                    clients.push(c);
                }
            }
        } else if cfg.trunks.iter().any(|t| t.registration.is_some()) {
            warn!("trunk registration needs a UDP listener; no trunk registers");
        }
        let states = clients
            .iter()
            .map(|c| (c.name().to_owned(), AtomicU64::new(0)))
            .collect();
        let runner = udp.map(|local| Runner {
            rx,
            dests: vec![None; clients.len()],
            clients,
            transports,
            local,
            clock,
        });
        Arc::new(Self {
            tx,
            states,
            dropped: AtomicU64::new(0),
            runner: tokio::sync::Mutex::new(runner),
        })
    }

    /// `trunk_registered{trunk="…"}`: 1 registered, 0 not (yet), 2 failed (retrying).
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        for (i, (name, _)) in self.states.iter().enumerate() {
            let me = Arc::downgrade(self);
            m.labelled(
                "trunk_registered",
                "Trunk registration state: 1 registered, 0 not yet, 2 failed (retrying).",
                Kind::Gauge,
                &[("trunk", name)],
                move || me.upgrade().map_or(0, |t| t.states[i].1.load(Relaxed)),
            );
        }
        let me = Arc::downgrade(self);
        m.counter(
            "trunk_responses_dropped",
            "REGISTER responses dropped because the trunk task was busy.",
            move || me.upgrade().map_or(0, |t| t.dropped.load(Relaxed)),
        );
    }

    /// Takes a response to one of our REGISTERs (true), or leaves it to the proxy (false).
    /// Never waits.
    pub fn on_response(&self, resp: &Message) -> bool {
        let ours = resp
            .top_via()
            .ok()
            .and_then(|v| v.branch())
            .is_some_and(|b| b.starts_with(register::BRANCH_PREFIX));
        if !ours {
            return false;
        }
        if self.tx.try_send(resp.clone()).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
        true
    }

    /// Runs the registrations until `shutdown`, then unregisters. Returns at once when there
    /// is nothing to register (or when already running).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(mut r) = self.runner.lock().await.take() else {
            return;
        };
        if r.clients.is_empty() {
            return;
        }
        loop {
            r.flush(&self).await;
            let next = r.clients.iter().filter_map(RegClient::poll_timeout).min();
            let sleep = async {
                match next {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(resp) = r.rx.recv() => r.deliver(resp),
                () = sleep => {
                    let now = r.clock.now();
                    for c in &mut r.clients {
                        if c.poll_timeout().is_some_and(|d| d <= now) {
                            c.handle_timeout(now);
                        }
                    }
                }
            }
        }
        // Best effort: one REGISTER with Expires: 0 each, answered or not within a moment.
        let now = r.clock.now();
        for c in &mut r.clients {
            c.unregister(now);
        }
        r.flush(&self).await;
        let deadline = now + UNREGISTER_WAIT;
        while r.clients.iter().any(|c| c.state() == RegState::Registered) {
            match tokio::time::timeout_at(deadline, r.rx.recv()).await {
                Ok(Some(resp)) => {
                    r.deliver(resp);
                    r.flush(&self).await;
                }
                _ => break,
            }
        }
    }
}

impl Runner {
    /// Hands a response to the client its branch names.
    fn deliver(&mut self, resp: Message) {
        let idx = resp
            .top_via()
            .ok()
            .and_then(|v| v.branch().and_then(RegClient::index_of_branch));
        let now = self.clock.now();
        // The branch carries the trunk's index in the configuration, not in `clients`.
        let name = idx.and_then(|i| self.clients.iter().position(|c| c.index() == i));
        if let Some(i) = name {
            self.clients[i].handle_response(now, resp);
        }
    }

    /// Sends what the clients ask for, logs their events and publishes their states.
    async fn flush(&mut self, shared: &Trunks) {
        for i in 0..self.clients.len() {
            while let Some(bytes) = self.clients[i].poll_transmit() {
                match self.dest(i).await {
                    Some(dest) => self.transports.send(Transmit {
                        proto: Proto::Udp,
                        local: self.local,
                        dest,
                        bytes,
                    }),
                    None => {
                        let now = self.clock.now();
                        self.clients[i].handle_send_error(now);
                    }
                }
            }
            let c = &mut self.clients[i];
            while let Some(e) = c.poll_event() {
                match e {
                    RegEvent::Registered { expires } => {
                        info!(trunk = %c.name(), expires, "trunk registered");
                    }
                    RegEvent::Failed { status } => {
                        warn!(trunk = %c.name(), status, "trunk registration failed");
                        // The next attempt resolves the name again.
                        self.dests[i] = None;
                    }
                    RegEvent::Unregistered => info!(trunk = %c.name(), "trunk unregistered"),
                }
            }
            if let Some((_, s)) = shared.states.get(i) {
                s.store(state_code(c.state()), Relaxed);
            }
        }
    }

    /// The registrar's address for client `i` (resolved once per attempt).
    async fn dest(&mut self, i: usize) -> Option<SocketAddr> {
        if let Some(d) = self.dests[i] {
            return Some(d);
        }
        let (host, port) = self.clients[i].registrar();
        let target = format!("{host}:{port}");
        let found = match tokio::net::lookup_host(&target).await {
            Ok(mut addrs) => addrs.next(),
            Err(error) => {
                warn!(trunk = %self.clients[i].name(), %error, registrar = %target, "cannot resolve the trunk's registrar");
                None
            }
        };
        self.dests[i] = found;
        found
    }
}
