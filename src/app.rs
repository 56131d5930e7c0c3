//! Assembling a running server from a configuration: store (migrated), nonce secret,
//! location service loaded from the store, listeners, registrar. Used by `sipedge serve` and
//! by the end-to-end tests, so both run the same wiring.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tracing::{Instrument, info, info_span, warn};

use crate::auth::mac::RouteKey;
use crate::auth::nonce::NonceKey;
use crate::auth::service::Authenticator;
use crate::clock::Clock;
use crate::config::{Config, ConfigError, LiveConfig, MediaConfig};
use crate::control::{self, Control};
use crate::driver::{Driver, Server, SipCounters};
use crate::media::cdr::CdrWriter;
use crate::media::session::{self, Media};
use crate::metrics::Registry;
use crate::proxy::accounting::Accounting;
use crate::proxy::pipeline::Core;
use crate::proxy::stateful::Proxy;
use crate::registrar::keepalive::Pinger;
use crate::registrar::location::LocationService;
use crate::registrar::location::WriteThrough;
use crate::registrar::service::{Context, Registrar};
use crate::security::Security;
use crate::store::{Store, StoreError};
use crate::transport::{Limits, Listeners, Proto};
use crate::trunk::Trunks;
use sipedge_relay::{IoMode, RelayConfig};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened, migrated or read.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// A `server.listen` socket could not be bound.
    #[error("{0}")]
    Bind(std::io::Error),
    /// No randomness for the nonce secret.
    #[error("reading /dev/urandom: {0}")]
    Random(std::io::Error),
    /// The media relay could not start (its threads or sockets).
    #[error("media relay: {0}")]
    Relay(std::io::Error),
    /// The control endpoint could not bind `control.listen`.
    #[error("control.listen {0}: {1}")]
    Control(std::net::SocketAddr, std::io::Error),
    /// The `[tls]` files could not be used (read again at start).
    #[error("{0}")]
    Tls(#[from] crate::transport::tls::TlsSetupError),
    /// The stored nonce secret is not 64 hex digits.
    #[error("meta.nonce_secret in the database is not 64 hex digits")]
    Secret,
    /// The DNS resolver could not be set up (`[dns]`, /etc/resolv.conf).
    #[error("dns: {0}")]
    Dns(#[from] crate::dns::DnsError),
}

/// A server ready to run, and its store (to close on shutdown).
pub struct App {
    pub server: Server,
    pub proxy: Arc<Proxy>,
    pub store: Store,
    pub location: Arc<WriteThrough>,
    pub media: Arc<Media>,
    /// Flood and brute-force state (its counters, for tests and `show`).
    pub security: Arc<Security>,
    /// Every layer's counters: the shutdown line, `show`, `/metrics`.
    pub metrics: Arc<Registry>,
    /// The loopback control endpoint, bound (`None` when `control.listen = ""`).
    pub control: Option<Control>,
    /// Applies a new configuration to the running server (SIGHUP, `sipedge reload`).
    pub reloader: Reloader,
}

/// Opens and migrates the store, loads the location service, binds the listeners and
/// starts the registrar.
pub async fn build(cfg: Arc<Config>, clock: Arc<dyn Clock>) -> Result<App, StartError> {
    let store = Store::connect(&cfg.database_url)
        .await?
        .with_instance(&cfg.server.instance_id);
    let applied = store.migrate().await?;
    if applied > 0 {
        info!(applied, "database schema migrated");
    }
    let key = nonce_key(&store).await?;
    // CDRs a previous run could not write (issue #10 item 7).
    match crate::media::cdr::load_spool(&store, &cfg.media.cdr_spool).await {
        Ok(l) if l == Default::default() => {}
        Ok(l) => info!(
            written = l.written,
            kept = l.kept,
            spool = %cfg.media.cdr_spool.display(),
            "CDR spool loaded"
        ),
        Err(error) => warn!(
            %error,
            spool = %cfg.media.cdr_spool.display(),
            "cannot read the CDR spool; it is left for the next start"
        ),
    }

    let live = Arc::new(LiveConfig::new(cfg.clone()));
    let route_key = RouteKey::derive(&key);
    let security = Arc::new(Security::new(cfg.security.clone(), clock.now()));
    let listen: Vec<_> = cfg
        .server
        .listen
        .iter()
        .map(|l| (l.proto, l.addr))
        .collect();
    // The files were checked with the configuration; they are read again here (a reload
    // does not change them: restart-only).
    let tls = cfg.tls.build(crate::transport::tls::system_roots)?;
    let listeners = Listeners::bind(&listen, transport_limits(&cfg), Some(tls))
        .await
        .map_err(StartError::Bind)?;
    let local = listeners.local_addrs().to_vec();
    // Where the other instances on a shared store reach us: the advertised address and our
    // (first) UDP port.
    let sip_address = SocketAddr::new(
        cfg.server.advertise,
        local
            .iter()
            .find(|(p, _)| *p == Proto::Udp)
            .or(local.first())
            .map_or(5060, |(_, a)| a.port()),
    );
    let location = Arc::new(
        WriteThrough::load_shared(
            store.clone(),
            clock.unix(),
            &cfg.server.instance_id,
            sip_address,
        )
        .await?,
    );
    info!(
        bindings = location.binding_count(),
        shared = location.is_shared(),
        instance = %cfg.server.instance_id,
        "location service loaded"
    );
    tokio::spawn(
        WriteThrough::expire(Arc::downgrade(&location), clock.clone())
            .instrument(info_span!("registrar_expiry")),
    );
    if location.is_shared() {
        tokio::spawn(
            WriteThrough::follow(Arc::downgrade(&location), clock.clone())
                .instrument(info_span!("location_follow")),
        );
    }
    let transports = listeners.transports();
    let auth = Arc::new(Authenticator::new(
        cfg.auth.clone(),
        store.clone(),
        key,
        security.clone(),
        clock.clone(),
    ));
    let pinger = Arc::new(Pinger::new(
        live.clone(),
        location.clone(),
        transports.clone(),
        clock.clone(),
        &local,
    ));
    let trunks = Trunks::new(&cfg, &local, transports.clone(), clock.clone());
    // Shards are tasks, not threads: enough of them that the REGISTERs of different AORs
    // wait for the store together and share its commits (group commit, src/store/writer.rs),
    // while one AOR's REGISTERs stay in order in its shard.
    let shards = std::thread::available_parallelism().map_or(32, |n| (n.get() * 16).max(32));
    let registrar = Registrar::start(
        Arc::new(Context {
            cfg: live.clone(),
            location: location.clone(),
            transports: transports.clone(),
            auth: auth.clone(),
            clock: clock.clone(),
            store_failures: std::sync::atomic::AtomicU64::new(0),
        }),
        shards,
    );
    // One CDR writer (retries, then the spool) for every call: relayed ones are written by
    // the media side, the others by accounting (README "Accounting").
    let cdr = Arc::new(CdrWriter::new(store.clone(), cfg.media.cdr_spool.clone()));
    let media = start_media(&cfg.media, cdr.clone(), clock.clone())?;
    let acc = Arc::new(Accounting::new(
        cdr,
        clock.clone(),
        cfg.limits.dialogs,
        cfg.limits.dialog_max_age,
    ));
    tokio::spawn(Accounting::sweep(Arc::downgrade(&acc)).instrument(info_span!("acc_sweep")));
    let dns = Arc::new(crate::dns::Resolver::new(&cfg.dns)?);
    let prober = Arc::new(crate::proxy::probe::Prober::new(
        live.clone(),
        dns,
        transports.clone(),
        &local,
        cfg.server.advertise,
    ));
    let proxy = Arc::new(Proxy::new(
        &cfg,
        transports.clone(),
        local.clone(),
        route_key.clone(),
        Some(media.clone()),
        acc,
        prober,
    ));
    tokio::spawn(
        crate::proxy::linger::Linger::sweep(Arc::downgrade(proxy.linger()))
            .instrument(info_span!("txn_sweep")),
    );
    let core = Core::new(
        &cfg,
        local,
        Some(location.clone()),
        clock.clone(),
        route_key,
        security.clone(),
    );
    let metrics = Arc::new(Registry::new());
    transports.register_metrics(&metrics);
    security.register_metrics(&metrics);
    location.register_metrics(&metrics);
    registrar.register_metrics(&metrics);
    pinger.register_metrics(&metrics);
    trunks.register_metrics(&metrics);
    proxy.register_metrics(&metrics);
    media.register_metrics(&metrics);
    let counters = Arc::new(SipCounters::default());
    counters.register_metrics(&metrics);
    let heap = Arc::new(crate::heap::Stats::default());
    heap.register_metrics(&metrics);
    tokio::spawn(crate::heap::run(Arc::downgrade(&heap)).instrument(info_span!("heap_trim")));
    metrics.labelled(
        "build_info",
        "The running version.",
        crate::metrics::Kind::Gauge,
        &[("version", env!("CARGO_PKG_VERSION"))],
        || 1,
    );
    let control = match cfg.control {
        Some(addr) => Some(
            Control::bind(
                addr,
                control::State {
                    location: location.clone(),
                    media: media.clone(),
                    proxy: proxy.clone(),
                    metrics: metrics.clone(),
                    store: store.clone(),
                    clock: clock.clone(),
                    instance: cfg.server.instance_id.clone(),
                    started: clock.unix(),
                },
            )
            .await
            .map_err(|e| StartError::Control(addr, e))?,
        ),
        None => None,
    };
    let reloader = Reloader {
        serial: Arc::default(),
        config: live.clone(),
        security: security.clone(),
        log_level: None,
    };
    let driver = Arc::new(Driver {
        config: live,
        core,
        transports,
        registrar,
        proxy: proxy.clone(),
        auth,
        pinger,
        trunks,
        clock,
        counters,
    });
    Ok(App {
        media,
        proxy,
        server: Server { listeners, driver },
        store,
        location,
        security,
        metrics,
        control,
        reloader,
    })
}

/// Sets the log filter (from `server.log_level`); `Err` says why the filter was not taken.
pub type LogLevelHook = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys now in effect ([`crate::config::LIVE_KEYS`]).
    pub live: Vec<String>,
    /// Changed keys that wait for a restart (their running values are kept).
    pub restart: Vec<String>,
}

/// Applies a new configuration to a running server, all of it at once: every request loads
/// one snapshot of the configuration ([`LiveConfig`]), so it sees the old settings or the new
/// ones. What a reload cannot change (sockets, sizes fixed at start: see
/// [`crate::config::LIVE_KEYS`]) keeps its running value and is named in a warning. Calls up
/// and transactions under way are not touched. SIGHUP and `sipedge reload` end here.
#[derive(Clone)]
pub struct Reloader {
    /// One reload at a time (a signal and the control endpoint may ask together): each one
    /// starts from what the previous one stored.
    serial: Arc<tokio::sync::Mutex<()>>,
    config: Arc<LiveConfig>,
    security: Arc<Security>,
    /// `None`: the log filter is not the configuration's to set (tests; `--log-level` given).
    log_level: Option<LogLevelHook>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("log_level", &self.log_level.is_some())
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Lets reloads set the log filter from `server.log_level`.
    pub fn with_log_level(mut self, hook: LogLevelHook) -> Self {
        self.log_level = Some(hook);
        self
    }

    /// The configuration in force.
    pub fn current(&self) -> Arc<Config> {
        self.config.load()
    }

    /// Reads and validates `path`, then [`Reloader::reload`]s. A file that cannot be read or
    /// is invalid is refused with a warning naming the key; the running configuration stays.
    pub async fn reload_file(&self, path: &Path) -> Result<Reloaded, ConfigError> {
        match Config::load(path) {
            Ok(new) => self.reload(new).await,
            Err(error) => {
                warn!(
                    config = %path.display(),
                    key = error.key().unwrap_or("(file)"),
                    %error,
                    "configuration not reloaded: the file is invalid; the running configuration is kept"
                );
                Err(error)
            }
        }
    }

    /// Applies the live keys of `new` (already validated) and logs one line: `configuration
    /// reloaded` with the changed keys, plus a warning naming the changed keys that need a
    /// restart. Refused (with a warning, nothing applied) when the new live values do not
    /// fit the running restart-only ones.
    pub async fn reload(&self, new: Config) -> Result<Reloaded, ConfigError> {
        let _one_at_a_time = self.serial.lock().await;
        let running = self.config.load();
        let plan = match running.reload(&new) {
            Ok(plan) => plan,
            Err(error) => {
                warn!(
                    key = error.key().unwrap_or("(file)"),
                    %error,
                    "configuration not reloaded: it does not fit the settings that need a restart; the running configuration is kept"
                );
                return Err(error);
            }
        };
        let cfg = Arc::new(plan.config);
        let changed = |key: &str| plan.live.iter().any(|k| k == key);
        // The log filter first, so that a level raised to info shows the lines below.
        if changed("server.log_level") {
            let level = cfg.server.log_level.as_deref().unwrap_or("info");
            match &self.log_level {
                Some(set) => {
                    if let Err(error) = set(level) {
                        warn!(%error, level, "server.log_level not applied");
                    }
                }
                None => info!(
                    level,
                    "server.log_level not applied: --log-level or RUST_LOG sets the log filter"
                ),
            }
        }
        if plan.live.iter().any(|k| k.starts_with("security.")) {
            self.security.set_config(cfg.security.clone());
        }
        self.config.store(cfg);
        let list = |keys: &[String]| {
            if keys.is_empty() {
                "none".to_owned()
            } else {
                keys.join(",")
            }
        };
        info!(changed = %list(&plan.live), "configuration reloaded");
        if !plan.restart.is_empty() {
            warn!(
                keys = %list(&plan.restart),
                "configuration changes not applied: these keys need a restart"
            );
        }
        Ok(Reloaded {
            live: plan.live,
            restart: plan.restart,
        })
    }
}

/// What the transport layer needs of the configuration.
pub(crate) fn transport_limits(cfg: &Config) -> Limits {
    let l = &cfg.limits;
    Limits {
        // One receive loop per UDP socket, whatever `server.workers` (the runtime's threads)
        // says: loops sharing a socket are all woken by each datagram and all but one find
        // nothing (issue #15: a second loop cost 16 % CPU per REGISTER at 2,000/s and 7 % per
        // call at 900 calls/s). A second one runs only while the first is behind
        // (`transport::udp`). The work a datagram starts runs on the runtime's threads.
        udp_workers: 1,
        max_message_size: cfg.server.max_message_size,
        tcp_idle_timeout: cfg.server.tcp_idle_timeout,
        tcp_connections: l.tcp_connections,
        tcp_connections_per_ip: l.tcp_connections_per_ip,
        tcp_message_timeout: l.tcp_message_timeout,
        tcp_write_timeout: l.tcp_write_timeout,
        tcp_send_queue: l.tcp_send_queue,
        tcp_connect_timeout: l.tcp_connect_timeout,
        tcp_connects: l.tcp_connects,
    }
}

/// Starts the relay engine and the task that turns its timeouts into closed calls.
fn start_media(
    m: &MediaConfig,
    cdr: Arc<CdrWriter>,
    clock: Arc<dyn Clock>,
) -> Result<Arc<Media>, StartError> {
    // Media sockets bind the advertised address when it is ours, else every address (a host
    // behind a 1:1 NAT advertises an address it does not have).
    let bind = match std::net::UdpSocket::bind((m.address, 0)) {
        Ok(_) => m.address,
        Err(_) if m.address.is_ipv4() => std::net::Ipv4Addr::UNSPECIFIED.into(),
        Err(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let (relay, mut closed) = sipedge_relay::start(RelayConfig {
        bind,
        port_min: m.ports.min,
        port_max: m.ports.max,
        workers: m.workers,
        idle_timeout: m.idle_timeout,
        offer_timeout: m.offer_timeout,
        hold_timeout: m.hold_timeout,
        io: IoMode::Batched,
        batch_wait: m.batch_wait,
    })
    .map_err(StartError::Relay)?;
    info!(%bind, ports = %format!("{}-{}", m.ports.min, m.ports.max), "media relay started");
    let limits = session::Limits {
        max_streams: m.max_streams,
        // A session needs at least two port pairs (one per side): the range bounds it too.
        max_sessions: m.max_sessions.min(m.ports.pairs() / 2).max(1),
        max_sessions_per_caller: m.max_sessions_per_caller,
    };
    let media = Arc::new(Media::new(relay, m.address, cdr, clock, limits));
    let on_closed = media.clone();
    tokio::spawn(async move {
        while let Some(c) = closed.recv().await {
            on_closed.on_relay_closed(c).await;
        }
    });
    Ok(media)
}

/// Closes every media session (each logs its stats line and writes its CDR, to the store or
/// the spool) and stops the relay. Runs after the listeners, whether or not they stopped in
/// time, so that nothing of a call is lost at shutdown (issue #10 item 7). Idempotent.
pub async fn shutdown_media(media: &Media) {
    // What is still allocated (0 and 0 after calls that all ended: nothing leaked).
    let c = media.relay().counts().await;
    let r = media.refusals();
    info!(
        media.calls = media.calls(),
        relay.sessions = c.sessions,
        relay.ports = c.ports_in_use,
        relay.strangers = c.strangers,
        media.refused_streams = r.too_many_streams,
        media.refused_busy = r.busy,
        media.refused_caller = r.caller_limit,
        media.relay_errors = r.relay_error,
        "media relay stopping"
    );
    // Every relayed call still up logs its stats line (reason "shutdown").
    media.shutdown().await;
    media.relay().shutdown().await;
}

/// The per-install nonce secret, generated on first start and kept in the store so that
/// nonces survive a restart and are shared by the instances on one database.
async fn nonce_key(store: &Store) -> Result<NonceKey, StartError> {
    let fresh = NonceKey::generate().map_err(StartError::Random)?;
    let hex: String = fresh
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stored = store.meta_get_or_insert("nonce_secret", &hex).await?;
    if stored.len() != 64 || !stored.is_ascii() {
        return Err(StartError::Secret);
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&stored[2 * i..2 * i + 2], 16).map_err(|_| StartError::Secret)?;
    }
    Ok(NonceKey::from_bytes(key))
}
