//! The subcommands. `anyhow` is used here and in `main.rs` only.

pub(crate) mod check_config;
pub(crate) mod db;
pub(crate) mod serve;
pub(crate) mod user;

use std::path::Path;

use sipedge::config::{Config, ConfigError};
use tracing_subscriber::EnvFilter;

/// An error with the exit code it deserves.
#[derive(Debug)]
pub(crate) enum CmdError {
    /// The configuration (or the command line) is wrong: exit 2.
    Usage(anyhow::Error),
    /// Something failed while running: exit 1.
    Runtime(anyhow::Error),
}

impl CmdError {
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Runtime(_) => 1,
        }
    }
}

impl std::fmt::Display for CmdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usage(e) | Self::Runtime(e) => write!(f, "{e:#}"),
        }
    }
}

/// Loads the configuration; every failure is a usage error naming the file.
pub(crate) fn load_config(path: &Path) -> Result<Config, CmdError> {
    Config::load(path).map_err(|e: ConfigError| {
        CmdError::Usage(anyhow::Error::new(e).context(format!("configuration {}", path.display())))
    })
}

/// A small runtime for the one-shot commands.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CmdError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CmdError::Runtime(anyhow::Error::new(e).context("starting the runtime")))
}

pub(crate) fn init_tracing(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A panic is a bug, not an outage: the task that panicked ends (its loop is restarted by
    // its supervisor) and the line says where, inside the span of the message being handled
    // (peer.addr, Call-ID).
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%location, panic = %payload, "task panicked");
    }));
}
