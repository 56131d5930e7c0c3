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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmd::init_tracing(&cli.log_level);
    let result = match cli.command {
        Command::Serve(a) => cmd::serve::run(&a.config),
        Command::CheckConfig(a) => cmd::check_config::run(&a.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sipedge: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}
