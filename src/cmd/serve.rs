//! `sipedge serve`: bind, run until SIGINT/SIGTERM, shut down cleanly.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sipedge::clock::{Clock, SystemClock};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{CmdError, load_config};

/// How long the loops get to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(5);
/// How long closing the media sessions may take (CDR writes, spooling what fails).
const MEDIA_DRAIN: Duration = Duration::from_secs(15);

pub(crate) fn run(path: &Path) -> Result<(), CmdError> {
    let cfg = Arc::new(load_config(path)?);
    // Before any socket: the configured limits, not the default 1024 files, bound what
    // clients can open.
    match sipedge_relay::raise_fd_limit() {
        Ok((before, now)) if before != now => {
            info!(before, now, "raised the open-file limit to the hard limit");
        }
        Ok(_) => {}
        Err(error) => warn!(%error, "cannot raise the open-file limit"),
    }
    let threads = match cfg.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the runtime")
        .map_err(CmdError::Runtime)?;
    rt.block_on(async move {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let app = sipedge::app::build(cfg.clone(), clock)
            .await
            .context("starting")
            .map_err(CmdError::Runtime)?;
        let (server, store, media) = (app.server, app.store, app.media);
        info!(
            version = env!("CARGO_PKG_VERSION"),
            advertise = %cfg.server.advertise,
            domains = ?cfg.server.domains,
            "sipedge started"
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let serving = tokio::spawn(server.run(stop_rx));
        let signal = wait_for_signal().await;
        info!(signal, "shutting down");
        let _ = stop_tx.send(true);
        if tokio::time::timeout(DRAIN, serving).await.is_err() {
            warn!("listeners did not stop within {DRAIN:?}");
        }
        // Always, even when the listeners did not stop: every call's stats line and CDR.
        if tokio::time::timeout(MEDIA_DRAIN, sipedge::app::shutdown_media(&media))
            .await
            .is_err()
        {
            warn!("media sessions not all closed within {MEDIA_DRAIN:?}");
        }
        store.close().await;
        info!("sipedge stopped");
        Ok(())
    })
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            warn!(%error, "cannot watch SIGTERM; only SIGINT stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
