//! `sipedge serve`: bind, run until SIGINT/SIGTERM, shut down cleanly; SIGHUP reloads the
//! configuration file ([`sipedge::app::Reloader`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sipedge::clock::{Clock, SystemClock};
use sipedge::config::Config;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{CmdError, load_config};

/// How long the loops get to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(5);
/// How long closing the media sessions may take (CDR writes, spooling what fails).
const MEDIA_DRAIN: Duration = Duration::from_secs(15);

pub(crate) fn run(path: &Path) -> Result<(), CmdError> {
    let cfg = Arc::new(load_config(path)?);
    // `server.log_level` unless the command line or RUST_LOG chose the filter.
    let log_level = super::config_log_level();
    if let (Some(set), Some(level)) = (&log_level, &cfg.server.log_level)
        && let Err(error) = set(level)
    {
        warn!(%error, level, "server.log_level not applied");
    }
    info!(config = %path.display(), "configuration loaded");
    warn_about(&cfg);
    // Before any socket: the configured limits, not the default 1024 files, bound what
    // clients can open.
    match sipedge_relay::raise_fd_limit() {
        Ok((before, now)) => {
            if before != now {
                info!(before, now, "raised the open-file limit to the hard limit");
            }
            if let Some(message) = cfg.fd_limit_warning(now) {
                warn!(limit = now, "{message}");
            }
        }
        Err(error) => warn!(%error, "cannot raise the open-file limit"),
    }
    let threads = cfg
        .server
        .worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    info!(threads, "SIP worker threads (server.workers)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the runtime")
        .map_err(CmdError::Runtime)?;
    rt.block_on(async move {
        // From here on SIGHUP reloads; its default action would end the process.
        let mut signals = Signals::new();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let app = sipedge::app::build(cfg.clone(), clock)
            .await
            .context("starting")
            .map_err(CmdError::Runtime)?;
        let (server, store, media, metrics) = (app.server, app.store, app.media, app.metrics);
        metrics.counter(
            "log_lines_dropped",
            "Log lines dropped because the log's queue was full (stderr too slow).",
            super::log_sink::dropped,
        );
        let control = app.control;
        let reloader = match log_level {
            Some(set) => app.reloader.with_log_level(set),
            None => app.reloader,
        };
        let pid_file = match &cfg.server.pid_file {
            Some(file) => Some(PidFile::write(file).map_err(CmdError::Runtime)?),
            None => None,
        };
        info!(
            version = env!("CARGO_PKG_VERSION"),
            advertise = %cfg.server.advertise,
            domains = ?cfg.server.domains,
            "sipedge started"
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let controlling = control.map(|c| tokio::spawn(c.run(stop_rx.clone())));
        let serving = tokio::spawn(server.run(stop_rx));
        let signal = loop {
            match signals.next().await {
                Signal::Stop(name) => break name,
                Signal::Reload => {
                    // One line either way: `configuration reloaded`, or why not.
                    if let Ok(reloaded) = reloader.reload_file(path).await
                        && reloaded.live.iter().any(|k| k == "route")
                    {
                        // The next hops may be new names: check them without holding up signals.
                        let cfg = reloader.current();
                        tokio::spawn(async move { warn_about_routes(&cfg).await });
                    }
                }
            }
        };
        info!(signal, "shutting down");
        // Read while every layer is still up (the registry holds them weakly).
        metrics.refresh().await;
        let counters = metrics.summary();
        let _ = stop_tx.send(true);
        if tokio::time::timeout(DRAIN, serving).await.is_err() {
            warn!("listeners did not stop within {DRAIN:?}");
        }
        if let Some(c) = controlling {
            let _ = tokio::time::timeout(DRAIN, c).await;
        }
        // Always, even when the listeners did not stop: every call's stats line and CDR.
        if tokio::time::timeout(MEDIA_DRAIN, sipedge::app::shutdown_media(&media))
            .await
            .is_err()
        {
            warn!("media sessions not all closed within {MEDIA_DRAIN:?}");
        }
        store.close().await;
        if let Some(p) = pid_file {
            p.remove();
        }
        info!(%counters, "sipedge stopped");
        Ok(())
    })
}

/// `server.pid_file` while the server runs.
struct PidFile(PathBuf);

impl PidFile {
    /// Writes this process's id (a failure stops the start: the operator asked for the file).
    fn write(path: &Path) -> anyhow::Result<Self> {
        std::fs::write(path, format!("{}\n", std::process::id())).with_context(|| {
            format!("writing the pid file {} (server.pid_file)", path.display())
        })?;
        Ok(Self(path.to_owned()))
    }

    /// Removes the file if it still holds our id (another server may have taken it over).
    fn remove(self) {
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|t| t.trim() == std::process::id().to_string());
        if ours && let Err(error) = std::fs::remove_file(&self.0) {
            warn!(%error, pid_file = %self.0.display(), "cannot remove the pid file");
        }
    }
}

/// How long the startup check waits for the next hops' names to resolve.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);

/// Startup warnings about a configuration that is valid but likely wrong: an advertised
/// address picked automatically that peers cannot reach, and `[[route]]` next hops that do not
/// resolve (their calls would get 503). Also run by `check-config`. Runs before the server's
/// runtime exists, on a small one of its own.
pub(crate) fn warn_about(cfg: &Config) {
    if let Some(message) = cfg.advertise_warning() {
        warn!(server.advertise = %cfg.server.advertise, "{message}");
    }
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(warn_about_routes(cfg)),
        Err(error) => warn!(%error, "cannot check the next hops"),
    }
}

/// The warnings about `[[route]]` next hops that do not resolve (at start and after a reload
/// that changed the routes). Takes up to [`RESOLVE_WAIT`].
async fn warn_about_routes(cfg: &Config) {
    for (route, next_hop, error) in unresolved_next_hops(cfg, RESOLVE_WAIT).await {
        warn!(
            route = %route,
            next_hop = %next_hop,
            %error,
            "the next hop of this route does not resolve: its calls will get 503 until it does"
        );
    }
}

/// The routes' next hops that do not resolve within `wait` through `[dns]` (RFC 3263:
/// NAPTR, SRV, A/AAAA), as (route, next hop, why). Each distinct next hop is looked up once,
/// all at the same time, so a slow resolver costs `wait` once. A route whose list has other
/// next hops that resolve still gets a line for the one that does not.
async fn unresolved_next_hops(cfg: &Config, wait: Duration) -> Vec<(String, String, String)> {
    let dns = match sipedge::dns::Resolver::new(&cfg.dns) {
        Ok(d) => Arc::new(d),
        Err(e) => return vec![("*".into(), "[dns]".into(), e.to_string())],
    };
    let mut hops: Vec<sipedge::config::NextHop> = Vec::new();
    for h in cfg.routes.iter().flat_map(|r| &r.next_hops) {
        if !hops.contains(h) {
            hops.push(h.clone());
        }
    }
    let mut set = tokio::task::JoinSet::new();
    for (i, h) in hops.iter().cloned().enumerate() {
        let dns = dns.clone();
        set.spawn(async move {
            let why =
                match tokio::time::timeout(wait, dns.resolve(&h.host, h.port, h.transport)).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!("no answer within {wait:?}")),
                };
            (i, why)
        });
    }
    let mut results: Vec<Option<String>> = vec![None; hops.len()];
    while let Some(done) = set.join_next().await {
        if let Ok((i, why)) = done {
            results[i] = why;
        }
    }
    let mut bad = Vec::new();
    for r in &cfg.routes {
        for h in &r.next_hops {
            let Some(i) = hops.iter().position(|x| x == h) else {
                continue;
            };
            if let Some(why) = &results[i] {
                bad.push((r.name.clone(), h.to_string(), why.clone()));
            }
        }
    }
    bad
}

/// What a signal asks of the server.
enum Signal {
    /// SIGINT or SIGTERM (named): shut down cleanly.
    Stop(&'static str),
    /// SIGHUP: reload the configuration.
    Reload,
}

/// The signals `serve` handles. Each is watched from creation on: a SIGHUP during startup is
/// taken (and served once running) instead of ending the process.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(error) => {
                warn!(%error, "cannot watch {name}");
                None
            }
        };
        Self {
            term: watch(SignalKind::terminate(), "SIGTERM"),
            int: watch(SignalKind::interrupt(), "SIGINT"),
            hup: watch(SignalKind::hangup(), "SIGHUP"),
        }
    }

    async fn next(&mut self) -> Signal {
        // A signal that cannot be watched is never received (its default action applies).
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            if let Some(s) = s
                && s.recv().await.is_some()
            {
                return;
            }
            std::future::pending::<()>().await
        }
        tokio::select! {
            _ = recv(&mut self.int) => Signal::Stop("SIGINT"),
            _ = recv(&mut self.term) => Signal::Stop("SIGTERM"),
            _ = recv(&mut self.hup) => Signal::Reload,
        }
    }
}
