//! The driver: the one place where the layers meet. It receives every message from the
//! transport ([`Receiver`]), asks the sans-IO routing core what it is
//! ([`Core::handle`], [`Core::route`]) and hands it to the service that owns it: the
//! stateful proxy, the registrar, the keepalive pinger. It also runs the server's lifecycle.
//!
//! Built by [`crate::app`] with everything it needs; nothing is set afterwards.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::service::Authenticator;
use crate::clock::Clock;
use crate::config::{Config, LiveConfig};
use crate::log::LogLimit;
use crate::metrics::{Kind, Registry};
use crate::proxy::pipeline::{Core, Dispatch, Routed};
use crate::proxy::stateful::Proxy;
use crate::registrar::keepalive::Pinger;
use crate::registrar::service::Registrar;
use crate::transport::{Listeners, Proto, Receiver, Source, Transports};
use crate::trunk::Trunks;

/// Request methods counted by name; others count as `other`.
const METHODS: [&str; 14] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "REGISTER",
    "OPTIONS",
    "PRACK",
    "UPDATE",
    "INFO",
    "SUBSCRIBE",
    "NOTIFY",
    "MESSAGE",
    "REFER",
    "other",
];

/// What the driver counts (Kamailio's `core:rcv_requests_*`, `core:rcv_replies_*xx`).
#[derive(Debug, Default)]
pub struct SipCounters {
    /// Requests received (well-formed, not dropped by the flood gate), by [`METHODS`].
    requests: [AtomicU64; METHODS.len()],
    /// Responses received, by class 1xx..6xx.
    responses: [AtomicU64; 6],
    /// REGISTERs answered 503 because the registrar's queue was full.
    registrar_overload: AtomicU64,
}

impl SipCounters {
    fn request(&self, method: &str) {
        let i = METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or(METHODS.len() - 1);
        self.requests[i].fetch_add(1, Relaxed);
    }

    fn response(&self, status: u16) {
        if let Some(c) = self
            .responses
            .get(usize::from(status / 100).wrapping_sub(1))
        {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Registers the requests by method, responses by class and registrar overloads.
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        for (i, method) in METHODS.iter().enumerate() {
            let c = Arc::downgrade(self);
            m.labelled(
                "sip_requests_received",
                "SIP requests received, by method.",
                Kind::Counter,
                &[("method", method)],
                move || c.upgrade().map_or(0, |c| c.requests[i].load(Relaxed)),
            );
        }
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx", "6xx"]
            .iter()
            .enumerate()
        {
            let c = Arc::downgrade(self);
            m.labelled(
                "sip_responses_received",
                "SIP responses received, by status class.",
                Kind::Counter,
                &[("class", class)],
                move || c.upgrade().map_or(0, |c| c.responses[i].load(Relaxed)),
            );
        }
        let c = Arc::downgrade(self);
        m.counter(
            "registrar_overload",
            "REGISTERs answered 503 because the registrar's queue was full.",
            move || {
                c.upgrade()
                    .map_or(0, |c| c.registrar_overload.load(Relaxed))
            },
        );
    }
}

/// Every service a received message can go to.
pub struct Driver {
    /// Loaded once per received message: everything done for it uses that snapshot.
    pub config: Arc<LiveConfig>,
    pub core: Core,
    pub transports: Arc<Transports>,
    pub registrar: Registrar,
    pub proxy: Arc<Proxy>,
    pub auth: Arc<Authenticator>,
    pub pinger: Arc<Pinger>,
    /// The trunks' REGISTER clients (their responses are theirs).
    pub trunks: Arc<Trunks>,
    pub clock: Arc<dyn Clock>,
    pub counters: Arc<SipCounters>,
}

impl Receiver for Driver {
    fn receive(&self, bytes: &[u8], source: Source) {
        let cfg = self.config.load();
        let d = self.core.handle(&cfg, bytes, source);
        self.execute(cfg, d);
    }

    fn admit(&self, ip: IpAddr) -> bool {
        !self.core.security().is_banned(ip, self.clock.now())
    }

    fn transport_failed(&self, proto: Proto, dest: SocketAddr, unsent: Vec<Vec<u8>>) {
        self.proxy.transport_failed(proto, dest, unsent);
    }
}

impl Driver {
    /// Carries out what the core decided. Never waits: slow work (authentication, name
    /// resolution, the registrar's store write) runs in tasks of its own.
    fn execute(&self, cfg: Arc<Config>, d: Dispatch) {
        match d {
            Dispatch::Nothing => {}
            Dispatch::Send(out) => self.transports.send(out),
            Dispatch::Response(msg, source) => {
                self.counters.response(msg.status().unwrap_or(0));
                if self.pinger.on_response(&msg)
                    || self.trunks.on_response(&msg)
                    || self.proxy.prober().on_response(&msg)
                {
                    return;
                }
                self.proxy.on_response(msg, source)
            }
            Dispatch::Request(msg, source) => {
                self.counters.request(msg.method().unwrap_or_default());
                if self.proxy.absorb(&msg, source) {
                    return;
                }
                match self.core.route(&cfg, &msg, source) {
                    Routed::Reply(out) => {
                        debug!(sip.status = %crate::sip::reply::status_of(&out.bytes), "answering locally");
                        self.transports.send(out);
                    }
                    Routed::Absorb => debug!("absorbed"),
                    Routed::NotFound(out) => {
                        debug!("not found: answered statefully, accounted");
                        self.proxy
                            .not_found(&cfg, msg, source, out, self.clock.unix());
                    }
                    Routed::Forward(plan) => {
                        debug!(?plan, "forward");
                        let now = self.clock.unix();
                        let Err((msg, plan)) = self.proxy.forward_now(&cfg, msg, source, plan, now)
                        else {
                            return;
                        };
                        let fut = self.proxy.clone().forward(
                            cfg,
                            *msg,
                            source,
                            *plan,
                            Some(self.auth.clone()),
                            now,
                        );
                        // Authentication and name resolution must not hold up the receive loop.
                        tokio::spawn(fut.in_current_span());
                    }
                }
            }
            Dispatch::Register(job) => {
                self.counters.request("REGISTER");
                if let Err(job) = self.registrar.submit(job) {
                    self.counters.registrar_overload.fetch_add(1, Relaxed);
                    // Overload: tell the phone when to retry instead of queueing without bound.
                    static LOG: LogLimit = LogLimit::new();
                    if let Some(suppressed) = LOG.allow() {
                        warn!(peer.addr = %job.source.remote, suppressed, "registrar queue full, answering 503");
                    }
                    let out = self.core.reply(
                        &job.msg,
                        job.source,
                        503,
                        "Service Unavailable",
                        &[("Retry-After", "5")],
                    );
                    self.transports.send(out);
                }
            }
        }
    }
}

/// Bound listeners and the driver, ready to run.
pub struct Server {
    pub(crate) listeners: Listeners,
    pub(crate) driver: Arc<Driver>,
}

impl Server {
    /// The bound addresses, in `server.listen` order (real ports when 0 was configured).
    pub fn local_addrs(&self) -> &[(Proto, std::net::SocketAddr)] {
        self.listeners.local_addrs()
    }

    /// Serves until `shutdown` becomes true, then waits for the loops to finish. The media
    /// sessions are closed by the caller ([`crate::app::shutdown_media`]), also when this
    /// does not finish in time.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let pinger = self.driver.pinger.clone();
        let keepalive = tokio::spawn(
            pinger
                .run(shutdown.clone())
                .instrument(info_span!("keepalive")),
        );
        let trunks = tokio::spawn(
            self.driver
                .trunks
                .clone()
                .run(shutdown.clone())
                .instrument(info_span!("trunk_registration")),
        );
        let proxy = self.driver.proxy.clone();
        let probing = tokio::spawn(
            proxy
                .prober()
                .clone()
                .run(shutdown.clone())
                .instrument(info_span!("probe")),
        );
        let receiver: Arc<dyn Receiver> = self.driver;
        self.listeners.run(receiver, shutdown).await;
        let _ = keepalive.await;
        let _ = trunks.await;
        let _ = probing.await;
        // The answered calls still waiting for their BYE get their rows (reason "shutdown");
        // the relayed ones are written by the media shutdown that follows.
        proxy.accounting().shutdown().await;
        let (servers, clients) = proxy.transaction_count();
        info!(
            transactions.server = servers,
            transactions.client = clients,
            "listeners stopped"
        );
    }
}
