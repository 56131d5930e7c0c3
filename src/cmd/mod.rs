//! The subcommands. `anyhow` is used here and in `main.rs` only.

pub(crate) mod cdr;
pub(crate) mod check_config;
pub(crate) mod db;
pub(crate) mod log_sink;
pub(crate) mod reload;
pub(crate) mod serve;
pub(crate) mod show;
pub(crate) mod user;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use sipedge::app::LogLevelHook;
use sipedge::config::{CONFIG_SEARCH_PATH, Config, ConfigError, find_config};
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
            Self::Usage(e) | Self::Runtime(e) => f.write_str(&error_chain(e)),
        }
    }
}

/// Loads the configuration; every failure is a usage error naming the file. A database URL
/// this build cannot open is refused here, before any command runs.
pub(crate) fn load_config(path: &Path) -> Result<Config, CmdError> {
    let cfg = Config::load(path).map_err(|e| match e {
        // The io error's text only: `ConfigError::Io` writes its source into its own message
        // too, and the path is already said once.
        ConfigError::Io { source, .. } => CmdError::Usage(anyhow::anyhow!(
            "cannot read the configuration file {}: {source}",
            path.display()
        )),
        e => CmdError::Usage(
            anyhow::Error::new(e).context(format!("configuration {}", path.display())),
        ),
    })?;
    check_database_scheme(&cfg.database_url, cfg!(feature = "postgres")).map_err(|reason| {
        CmdError::Usage(anyhow::anyhow!(
            "configuration {}: database.url: {reason}",
            path.display()
        ))
    })?;
    Ok(cfg)
}

/// Refuses a `database.url` whose scheme this build has no driver for: `postgres://` needs the
/// `postgres` cargo feature. Said at `check-config` time rather than when `serve` first opens
/// the store. The reason never repeats the URL (it may hold a password).
pub(crate) fn check_database_scheme(url: &str, postgres_built: bool) -> Result<(), String> {
    let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if postgres && !postgres_built {
        return Err(
            "this sipedge was built without PostgreSQL support; build it with \
                    `cargo build --release --features postgres`, or use sqlite://PATH"
                .to_owned(),
        );
    }
    Ok(())
}

/// The file to load: `-c`/`SIPEDGE_CONFIG` when given, else the first that exists of
/// [`CONFIG_SEARCH_PATH`] (`config/sipedge.toml`, then `/etc/sipedge/sipedge.toml`).
pub(crate) fn config_path(given: Option<&Path>) -> Result<PathBuf, CmdError> {
    find_config(given, Path::exists).ok_or_else(|| {
        CmdError::Usage(anyhow::anyhow!(
            "no configuration file: none of {} exists; name one with -c FILE or SIPEDGE_CONFIG",
            CONFIG_SEARCH_PATH.join(", ")
        ))
    })
}

/// The error and its causes, `: `-separated, each cause written once: a cause whose text its
/// parent already carries (thiserror's `#[error("reading {path}: {source}")]` with a `source`
/// field, sqlx's errors) is not repeated.
pub(crate) fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut parent = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parent.is_empty() && parent.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        parent = text;
    }
    out
}

/// A small runtime for the one-shot commands.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CmdError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CmdError::Runtime(anyhow::Error::new(e).context("starting the runtime")))
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// tracing's human-readable lines (what fail2ban's filter reads).
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with `message`),
    /// and `span`/`spans` for the spans the line happened in.
    Json,
}

/// The filter directives for a `--log-level`/`RUST_LOG` value: sqlx logs every statement at
/// debug, so it is held at `warn` unless the filter names sqlx itself or asks for `trace`
/// everywhere.
pub(crate) fn filter_directives(level: &str) -> String {
    let level = level.trim();
    if level.eq_ignore_ascii_case("trace") || level.contains("sqlx") {
        level.to_owned()
    } else if level.is_empty() {
        "sqlx=warn".to_owned()
    } else {
        format!("{level},sqlx=warn")
    }
}

/// How the log filter of this process may be changed after start.
struct LogControl {
    /// Replaces the filter.
    set: LogLevelHook,
    /// `--log-level` or `RUST_LOG` chose the filter: `server.log_level` does not apply.
    pinned: bool,
}

static LOG_CONTROL: OnceLock<LogControl> = OnceLock::new();

/// The filter for a `--log-level`/`RUST_LOG`/`server.log_level` value.
fn env_filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(filter_directives(level)).map_err(|e| e.to_string())
}

/// The hook that sets the log filter from the configuration's `server.log_level`, or `None`
/// when the command line (`--log-level`) or `RUST_LOG` chose the filter: they win.
pub(crate) fn config_log_level() -> Option<LogLevelHook> {
    LOG_CONTROL
        .get()
        .filter(|c| !c.pinned)
        .map(|c| c.set.clone())
}

/// Installs the subscriber. `level` is `--log-level` when given; `RUST_LOG`, when set, wins
/// over it, and either one wins over the configuration's `server.log_level`.
/// Lines go out through [`log_sink`]; keep the guard until the process ends.
pub(crate) fn init_tracing(level: Option<&str>, format: LogFormat) -> log_sink::LogGuard {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|env| !env.trim().is_empty())
        .and_then(|env| env_filter(&env).ok());
    let pinned = from_env.is_some() || level.is_some();
    let filter = from_env
        .or_else(|| env_filter(level.unwrap_or("info")).ok())
        .unwrap_or_else(|| EnvFilter::new(filter_directives("info")));
    let (sink, guard) = log_sink::start(std::io::stderr());
    sink.publish();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink);
    let set: LogLevelHook = match format {
        LogFormat::Text => {
            let builder = builder
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |level: &str| -> Result<(), String> {
                handle.reload(env_filter(level)?).map_err(|e| e.to_string())
            })
        }
        LogFormat::Json => {
            let builder = builder.json().with_ansi(false).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |level: &str| -> Result<(), String> {
                handle.reload(env_filter(level)?).map_err(|e| e.to_string())
            })
        }
    };
    let _ = LOG_CONTROL.set(LogControl { set, pinned });
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
    guard
}
