//! The `sipedge` command line (DESIGN §2). Exit codes: 0 ok, 1 runtime error, 2 usage or
//! configuration error.

use std::path::{Path, PathBuf};
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
    /// "sipedge=debug"). Default: info, or `server.log_level` for `serve`; given here, it
    /// wins over the configuration. RUST_LOG, when set, takes precedence. sqlx stays at warn
    /// unless the filter names it or is "trace".
    #[arg(long, global = true)]
    log_level: Option<String>,

    /// Log line format: "text" (human-readable) or "json" (one object per line).
    #[arg(
        long,
        global = true,
        env = "SIPEDGE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: cmd::LogFormat,

    #[command(flatten)]
    cfg: ConfigArg,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file. Default: config/sipedge.toml if it exists (a source checkout),
    /// else /etc/sipedge/sipedge.toml (a package install).
    #[arg(short, long, global = true, env = "SIPEDGE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy until SIGINT or SIGTERM; SIGHUP reloads the configuration.
    Serve,
    /// Make the running server reload its configuration (SIGHUP to the pid in
    /// `server.pid_file`, or to --pid). The file is validated first.
    Reload {
        /// The server's process id, instead of `server.pid_file`.
        #[arg(long)]
        pid: Option<i32>,
    },
    /// Validate the configuration and print the effective values; exit 2 if it is invalid.
    CheckConfig,
    /// Manage subscribers (stored as HA1 hashes, never in plaintext).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Database maintenance.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
    /// Live state of the running server, from its control endpoint ([control] listen).
    Show {
        what: cmd::show::What,
        /// Print the endpoint's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The control endpoint's address (default: control.listen of the configuration).
        #[arg(long)]
        control: Option<std::net::SocketAddr>,
    },
    /// Call records (one per call).
    Cdr {
        #[command(subcommand)]
        action: CdrAction,
    },
}

#[derive(Debug, Subcommand)]
enum CdrAction {
    /// Print the call records to standard output, oldest first.
    Export {
        /// Only the calls that started at or after this time: unix seconds or RFC 3339
        /// (2026-12-05T07:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// csv (a header line, then one line per call) or json (one object per line).
        #[arg(long, value_enum, default_value = "csv")]
        format: cmd::cdr::Format,
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
        /// The number asserted for this subscriber on routes with `identity`
        /// (P-Asserted-Identity / Remote-Party-ID); default: the username.
        #[arg(long)]
        caller_id: Option<String>,
    },
    /// Change a subscriber's settings.
    Set {
        user: String,
        /// The number asserted on routes with `identity`; "" clears it (the username is
        /// asserted then).
        #[arg(long)]
        caller_id: String,
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
    /// Add or update many subscribers: from a file ("-" = standard input), one
    /// `USER[@DOMAIN];PASSWORD[;caller_id=NUM]` per line (the SIPp injection format); or,
    /// without plaintext,
    /// from a Kamailio/OpenSER `subscriber` table (--kamailio URL) or an export of it
    /// (--kamailio-dump FILE).
    #[command(group(clap::ArgGroup::new("source").required(true).args(["file", "kamailio", "kamailio_dump"])))]
    Import {
        file: Option<PathBuf>,
        /// A Kamailio database: sqlite://PATH, postgres://USER:PW@HOST/DB or
        /// mysql://USER:PW@HOST/DB; its `subscriber` table's username, domain and ha1 are read.
        #[arg(long, value_name = "URL")]
        kamailio: Option<String>,
        /// An export of Kamailio's `subscriber` table: a header line naming the columns
        /// (username, domain, ha1; others are ignored), fields separated by tabs (mysql -B) or
        /// commas (psql --csv, sqlite3 -csv -header).
        #[arg(long, value_name = "FILE")]
        kamailio_dump: Option<PathBuf>,
        /// The realm Kamailio hashed with, when it was not each subscriber's domain (kamctl and
        /// the default kamailio.cfg use the domain).
        #[arg(long, value_name = "REALM")]
        kamailio_realm: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DbAction {
    /// Create or upgrade the schema (serve does this on start too).
    Migrate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = cmd::init_tracing(cli.log_level.as_deref(), cli.log_format);
    let result =
        cmd::config_path(cli.cfg.config.as_deref()).and_then(|config| run(cli.command, &config));
    // Every line logged is out before the process ends (or prints its error).
    log.sync();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sipedge: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(command: Command, config: &Path) -> Result<(), cmd::CmdError> {
    match command {
        Command::Serve => cmd::serve::run(config),
        Command::CheckConfig => cmd::check_config::run(config),
        Command::Reload { pid } => cmd::reload::run(config, pid),
        Command::User { action } => match action {
            UserAction::Add {
                user,
                password,
                caller_id,
            } => cmd::user::add(config, &user, password, caller_id),
            UserAction::Set { user, caller_id } => cmd::user::set(config, &user, &caller_id),
            UserAction::Del { user } => cmd::user::del(config, &user),
            UserAction::Passwd { user, password } => cmd::user::passwd(config, &user, password),
            UserAction::List => cmd::user::list(config),
            UserAction::Import {
                file,
                kamailio,
                kamailio_dump,
                kamailio_realm,
            } => match (file, kamailio, kamailio_dump) {
                (Some(file), _, _) => cmd::user::import(config, &file),
                (None, Some(url), _) => cmd::user::import_kamailio(
                    config,
                    cmd::user::KamailioSource::Database(url),
                    kamailio_realm.as_deref(),
                ),
                (None, None, Some(dump)) => cmd::user::import_kamailio(
                    config,
                    cmd::user::KamailioSource::Dump(dump),
                    kamailio_realm.as_deref(),
                ),
                (None, None, None) => Err(cmd::CmdError::Usage(anyhow::anyhow!(
                    "user import: give a FILE, --kamailio URL or --kamailio-dump FILE"
                ))),
            },
        },
        Command::Db { action } => match action {
            DbAction::Migrate => cmd::db::migrate(config),
        },
        Command::Show {
            what,
            json,
            control,
        } => cmd::show::run(config, what, json, control),
        Command::Cdr { action } => match action {
            CdrAction::Export { since, format } => {
                cmd::cdr::export(config, since.as_deref(), format)
            }
        },
    }
}
