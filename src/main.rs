//! The `sipedge` command line (DESIGN §2). Exit codes: 0 ok, 1 runtime error, 2 usage or
//! configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Debug, Parser)]
#[command(
    name = "sipedge",
    version,
    about = "SIP edge proxy, registrar and RTP media relay"
)]
struct Cli {
    /// Log filter: error, warn, info, debug, trace (or a tracing filter such as
    /// "sipedge=debug"). RUST_LOG, when set, takes precedence.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file.
    #[arg(
        short,
        long,
        env = "SIPEDGE_CONFIG",
        default_value = "config/sipedge.toml"
    )]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy until SIGINT or SIGTERM.
    Serve(ConfigArg),
    /// Validate the configuration and print the effective values; exit 2 if it is invalid.
    CheckConfig(ConfigArg),
    /// Manage subscribers (stored as HA1 hashes, never in plaintext).
    User {
        #[command(flatten)]
        cfg: ConfigArg,
        #[command(subcommand)]
        action: UserAction,
    },
    /// Database maintenance.
    Db {
        #[command(flatten)]
        cfg: ConfigArg,
        #[command(subcommand)]
        action: DbAction,
    },
}

#[derive(Debug, Subcommand)]
enum UserAction {
    /// Add a subscriber; the password is read from standard input when --password is absent.
    Add {
        /// USER or USER@DOMAIN (DOMAIN defaults to the first of server.domains).
        user: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// Delete a subscriber and their registrations.
    Del { user: String },
    /// Change a subscriber's password.
    Passwd {
        user: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// List subscribers.
    List,
}

#[derive(Debug, Subcommand)]
enum DbAction {
    /// Create or upgrade the schema (serve does this on start too).
    Migrate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmd::init_tracing(&cli.log_level);
    let result = match cli.command {
        Command::Serve(a) => cmd::serve::run(&a.config),
        Command::CheckConfig(a) => cmd::check_config::run(&a.config),
        Command::User { cfg, action } => match action {
            UserAction::Add { user, password } => cmd::user::add(&cfg.config, &user, password),
            UserAction::Del { user } => cmd::user::del(&cfg.config, &user),
            UserAction::Passwd { user, password } => {
                cmd::user::passwd(&cfg.config, &user, password)
            }
            UserAction::List => cmd::user::list(&cfg.config),
        },
        Command::Db { cfg, action } => match action {
            DbAction::Migrate => cmd::db::migrate(&cfg.config),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sipedge: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}
