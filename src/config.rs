//! The configuration file (TOML, DESIGN §3): [`RawConfig`] is what serde reads, with every
//! default written once; [`Config`] is the validated, typed form the server runs on.
//!
//! Every error names the dotted key at fault (`media.ports: ...`), so `check-config` can tell
//! the operator exactly what to fix.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::security::Cidr;
pub use crate::security::SecurityConfig;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type.
    #[error("{key}: {message}")]
    Syntax { key: String, message: String },
    /// A value of the right type that sipedge cannot use.
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl ConfigError {
    /// The dotted key at fault, or `None` when the file could not be read.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Io { .. } => None,
            Self::Syntax { key, .. } => Some(key),
            Self::Invalid { key, .. } => Some(key),
        }
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written.

/// The whole file. Every table is optional; absent keys take the defaults documented below.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub registrar: RawRegistrar,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub nat: RawNat,
    #[serde(default)]
    pub media: RawMedia,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub security: RawSecurity,
    #[serde(default)]
    pub control: RawControl,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub dns: RawDns,
    /// Routing rules, first match wins.
    #[serde(default)]
    pub route: Vec<RawRoute>,
    /// Provider accounts (`[[trunk]]`) that routes reference by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trunk: Vec<RawTrunk>,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// `transport:address:port` sockets to listen on. Default `["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]`.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// The address written in Via and Record-Route. Default: the first listen address that is
    /// not a wildcard, else the host's primary address (the source of its default route).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Domains served here ("myself"). Default: `[advertise]`.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Largest message accepted, in bytes; larger → 513. Default 65535.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// Max-Forwards written when absent and the cap on larger values. Default 10.
    #[serde(default = "default_max_forwards")]
    pub max_forwards: u8,
    /// SIP worker threads; 0 = half the cores, at least one. Default 0.
    #[serde(default)]
    pub workers: usize,
    /// Name of this instance in a shared location store. Default: `advertise:port`.
    #[serde(default)]
    pub instance_id: String,
    /// Out-of-dialog requests for other domains: "authenticated" | "deny" | "open".
    /// Default "authenticated".
    #[serde(default = "default_relay_foreign")]
    pub relay_foreign: RelayForeign,
    /// Seconds a TCP connection may stay without traffic before it is closed. Default 600.
    #[serde(default = "default_tcp_idle_timeout")]
    pub tcp_idle_timeout: u64,
    /// Seconds a forwarded non-INVITE waits for a final response (Kamailio `fr_timer`,
    /// Timer F). Default 30.
    #[serde(default = "default_fr_timer")]
    pub fr_timer: u64,
    /// Seconds a forwarded INVITE waits for a final response after each provisional
    /// (Kamailio `fr_inv_timer`, Timer C). Default 120.
    #[serde(default = "default_fr_inv_timer")]
    pub fr_inv_timer: u64,
    /// Log filter (`error` … `trace`, or a tracing filter such as "sipedge=debug"); a reload
    /// applies it. `--log-level` and `RUST_LOG` win over it. Default: unset (`info`).
    #[serde(default)]
    pub log_level: Option<String>,
    /// File `serve` writes its process id to (and removes at stop), for `sipedge reload`.
    /// Default: unset (no file).
    #[serde(default)]
    pub pid_file: Option<String>,
}

/// `[limits]`: what one peer (or all of them) can make the server hold. The defaults suit a
/// public host with a few thousand phones; every limit hit is answered (503 + Retry-After)
/// or dropped, counted, and logged as a security event.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Open TCP connections in total; beyond it new ones are closed at once. Default 4096.
    pub tcp_connections: usize,
    /// Open TCP connections per source IP. Default 32.
    pub tcp_connections_per_ip: usize,
    /// Seconds a message on a TCP connection may take from its first byte to its last
    /// (slowloris); the connection is closed after it. Default 10.
    pub tcp_message_timeout: u64,
    /// Seconds a write to a TCP peer may stay undelivered (also TCP_USER_TIMEOUT) before the
    /// connection is closed. Default 10.
    pub tcp_write_timeout: u64,
    /// Bytes queued for one TCP connection at most; a peer that does not read is
    /// disconnected when its queue is full, and nobody else waits for it. Default 262144.
    pub tcp_send_queue: usize,
    /// Seconds a connection we open (to a next hop or a contact) may take to be established
    /// (TLS: before the handshake); the messages waiting for it then fail. Default 5.
    pub tcp_connect_timeout: u64,
    /// Connections being opened at once, at most; beyond it a send fails at once. Default 256.
    pub tcp_connects: usize,
    /// Proxy transactions alive in total (pending, or waiting out their RFC 3261 timers after
    /// the final response); beyond it new requests get 503. Default 50000.
    pub transactions: usize,
    /// Proxy transactions pending (no final response yet) per source IP. Default 2000.
    pub transactions_per_ip: usize,
    /// Bytes that transactions may hold for messages larger than 4 KiB (the excess, three
    /// copies each); beyond it such requests get 503. Default 16777216 (16 MiB).
    pub transaction_memory: usize,
    /// REGISTER responses kept for retransmissions (entries, all shards). Default 20000.
    pub registrar_cache: usize,
    /// ... and their bytes at most. Default 16777216 (16 MiB).
    pub registrar_cache_bytes: usize,
    /// Answered calls (not relayed) waiting for their BYE to complete their CDR row; beyond
    /// it the oldest is written with reason "evicted" (and counted). Default 100000.
    pub dialogs: usize,
    /// Seconds an answered call (not relayed) may wait for its BYE; then its CDR row is
    /// written with reason "timeout". Default 14400 (4 h).
    pub dialog_max_age: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            tcp_connections: 4096,
            tcp_connections_per_ip: 32,
            tcp_message_timeout: 10,
            tcp_write_timeout: 10,
            tcp_send_queue: 256 * 1024,
            tcp_connect_timeout: 5,
            tcp_connects: 256,
            transactions: 50_000,
            transactions_per_ip: 2000,
            transaction_memory: 16 << 20,
            registrar_cache: 20_000,
            registrar_cache_bytes: 16 << 20,
            dialogs: 100_000,
            dialog_max_age: 4 * 3600,
        }
    }
}

/// `[tls]`: certificates for `tls:` listeners and for the TLS connections we open.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Our certificate chain, PEM, leaf first. Required when `server.listen` has a `tls:`
    /// socket; also offered to servers that ask for a client certificate. Default: unset.
    #[serde(default)]
    pub certificate: Option<String>,
    /// The certificate's private key, PEM. Required with `certificate`. Default: unset.
    #[serde(default)]
    pub private_key: Option<String>,
    /// CA certificates (PEM) the servers we connect to are verified against. Default:
    /// unset (the system's roots).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Verify the certificate (chain and name) of the servers we connect to. Default true.
    #[serde(default = "default_true")]
    pub verify_server: bool,
    /// Seconds a TLS handshake (either side) may take. Default 5.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: u64,
}

fn default_true() -> bool {
    true
}
fn default_handshake_timeout() -> u64 {
    5
}

/// `[control]`: the loopback HTTP endpoint of `sipedge show`, `/metrics` and the web page.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    /// A loopback `IP:PORT`, or `""` to turn the endpoint off. Default `127.0.0.1:8060`.
    #[serde(default = "default_control_listen")]
    pub listen: String,
}

impl Default for RawControl {
    fn default() -> Self {
        Self {
            listen: default_control_listen(),
        }
    }
}

fn default_control_listen() -> String {
    "127.0.0.1:8060".into()
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    /// `sqlite://path` (created if missing) or `postgres://user:pw@host/db`.
    /// Default `sqlite://data/sipedge.db`.
    #[serde(default = "default_db_url")]
    pub url: String,
}

/// `[registrar]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistrar {
    /// Seconds granted when the REGISTER names none. Default 60.
    #[serde(default = "default_default_expires")]
    pub default_expires: u32,
    /// Shorter requested expiry → 423 Interval Too Brief. Default 30.
    #[serde(default = "default_min_expires")]
    pub min_expires: u32,
    /// Longer requested expiry is cut to this. Default 3600.
    #[serde(default = "default_max_expires")]
    pub max_expires: u32,
    /// Contacts per address-of-record. Default 10.
    #[serde(default = "default_max_contacts")]
    pub max_contacts: usize,
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Digest realm; empty = the domain of the request. Default "".
    #[serde(default)]
    pub realm: String,
    /// Seconds a nonce is valid; after it, `stale=true`. Default 300.
    #[serde(default = "default_nonce_ttl")]
    pub nonce_ttl: u64,
    /// Digest algorithms offered, in challenge order: "MD5", "SHA-256". Default `["MD5"]`.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
}

/// `[nat]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNat {
    /// Seconds between keepalives to NATed contacts; 0 = off. Default 30.
    #[serde(default = "default_ping_interval")]
    pub ping_interval: u64,
    /// "OPTIONS" or "crlf". Default "OPTIONS".
    #[serde(default = "default_ping_method")]
    pub ping_method: PingMethod,
    /// Consecutive unanswered OPTIONS pings after which a binding is reported (and removed
    /// when `ping_remove`). Default 3.
    #[serde(default = "default_ping_failures")]
    pub ping_failures: u32,
    /// Remove a binding whose pings went unanswered `ping_failures` times. Default false.
    #[serde(default)]
    pub ping_remove: bool,
}

/// `[media]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMedia {
    /// Address written into SDP. Default: `server.advertise`.
    #[serde(default)]
    pub address: Option<String>,
    /// `MIN-MAX` UDP ports for relayed media; MIN even; RTP on even ports, RTCP on RTP+1.
    /// Default "30000-40000".
    #[serde(default = "default_ports")]
    pub ports: String,
    /// When calls to registered users are relayed: "always" | "nat" | "never". Default "nat".
    #[serde(default = "default_media_mode")]
    pub mode: MediaMode,
    /// Relay threads; 0 = one per core. Default 0.
    #[serde(default)]
    pub workers: usize,
    /// Seconds without packets before a session is closed. Default 60.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: u64,
    /// Seconds an unanswered offer keeps its ports. Default 120.
    #[serde(default = "default_offer_timeout")]
    pub offer_timeout: u64,
    /// Idle limit while a side is on hold (sendonly/inactive). Default 3600.
    #[serde(default = "default_hold_timeout")]
    pub hold_timeout: u64,
    /// Microseconds a relay worker receiving dense traffic waits after a wake-up so that one
    /// wake-up carries the interval's packets (adds at most this much latency per packet);
    /// 0 = off. At most 20000. Default 1000.
    #[serde(default = "default_batch_wait_us")]
    pub batch_wait_us: u64,
    /// At most this many m= lines with a non-zero port (streams that take ports) in one SDP;
    /// an offer with more is refused with 488. Port-0 streams take no ports and do not count.
    /// Default 8.
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// Relay sessions (one per relayed branch of a call) at once, for everyone; more are
    /// refused with 503 + Retry-After. Also bounded by the port range (a session needs at
    /// least two port pairs). Default 2000.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Relay sessions at once per caller: the authenticated user, else the source IP. More
    /// are refused with 486 Busy Here. Default 20.
    #[serde(default = "default_max_sessions_per_caller")]
    pub max_sessions_per_caller: usize,
    /// CDRs the database refused (after retries) are appended here as JSON lines and loaded
    /// into the database at the next start. Default: `sipedge-cdr.spool` next to the SQLite
    /// file, or in the working directory for other databases.
    #[serde(default)]
    pub cdr_spool: Option<String>,
}

/// `[security]`: flood limits (Kamailio pike) and bans after failed authentication.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecurity {
    /// Messages (requests and responses) one source IP may send per `pike_window` before it
    /// is banned; 0 = no rate limit. Default 200.
    #[serde(default = "default_pike_requests")]
    pub pike_requests: u32,
    /// Seconds over which `pike_requests` is counted. Default 2.
    #[serde(default = "default_pike_window")]
    pub pike_window: u64,
    /// Seconds a banned source IP is ignored (its packets dropped unanswered), and a locked
    /// user refused. Default 300.
    #[serde(default = "default_ban_time")]
    pub ban_time: u64,
    /// Failed authentications from one source IP within `auth_window` after which it is
    /// banned; 0 = never. Default 10.
    #[serde(default = "default_auth_failures")]
    pub auth_failures: u32,
    /// Failed authentications of one user (from any source) within `auth_window` after which
    /// the user is locked for `ban_time` (403); 0 = never. Default 20.
    #[serde(default = "default_auth_failures_user")]
    pub auth_failures_user: u32,
    /// Seconds over which failed authentications are counted. Default 60.
    #[serde(default = "default_auth_window")]
    pub auth_window: u64,
    /// Networks never rate limited, banned or locked (`ADDRESS/PREFIX`), e.g. the PBX and the
    /// provider. Default `["127.0.0.0/8", "::1/128"]`.
    #[serde(default = "default_trusted")]
    pub trusted: Vec<String>,
    /// Source IPs (IPv6: /64s) and users tracked at most, each; when full, idle entries are
    /// evicted, and sources beyond the bound are let through untracked (counted). Default 100000.
    #[serde(default = "default_max_tracked")]
    pub max_tracked: usize,
}

/// `[[route]]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Name used in logs.
    pub name: String,
    /// Regular expression matched against the Request-URI user part.
    pub user: String,
    /// The next hop: `host`, `host:port` or a `sip:` URI (with `;transport=`), or a list of
    /// them tried in order (failover). A name without a port is resolved per RFC 3263
    /// (NAPTR, SRV, then A/AAAA on 5060).
    pub next_hop: RawNextHops,
    /// Milliseconds a next hop may stay silent (not even a 100) before the next one in the
    /// list (or the next SRV target) is tried; only when one remains. Default 2000.
    #[serde(default = "default_failover_timeout_ms")]
    pub failover_timeout_ms: u64,
    /// Seconds between OPTIONS probes to each place of the next hops; a place that leaves a
    /// probe unanswered or answers 503 is skipped until it answers again. 0 = off. Default 0.
    #[serde(default)]
    pub probe_interval: u64,
    /// Require proxy authentication and From user = authenticated user. Default false.
    #[serde(default)]
    pub auth: bool,
    /// "always" | "nat" | "never". Default "nat".
    #[serde(default = "default_media_mode")]
    pub media: MediaMode,
    /// The caller identity asserted towards this next hop on an initial INVITE from an
    /// authenticated subscriber (needs `auth = true`): "pai" (`P-Asserted-Identity`, RFC 3325),
    /// "rpid" (`Remote-Party-ID`) or "none". Default "none".
    #[serde(default)]
    pub identity: Identity,
    /// The `[[trunk]]` (by name) whose credentials answer the next hop's 401/407. Default
    /// none: challenges are relayed to the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk: Option<String>,
}

/// How a route asserts the caller's identity (`[[route]] identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// `P-Asserted-Identity: <sip:CALLER_ID@DOMAIN>` (RFC 3325 §9.1).
    Pai,
    /// `Remote-Party-ID: <sip:CALLER_ID@DOMAIN>;party=calling;id-type=subscriber;screen=yes`
    /// (draft-ietf-sip-privacy-04, the seed's `rpid_suffix`).
    Rpid,
    /// Nothing asserted.
    #[default]
    None,
}

/// `[[route]].next_hop`: one next hop or a list (serde untagged).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawNextHops {
    One(String),
    List(Vec<String>),
}

impl RawNextHops {
    fn items(&self) -> &[String] {
        match self {
            Self::One(s) => std::slice::from_ref(s),
            Self::List(v) => v,
        }
    }
}

/// `[dns]`: the resolver of next hops (RFC 3263).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// Name servers, `ip` or `ip:port` (port 53). Default: empty = the system's
    /// (/etc/resolv.conf).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Milliseconds a query waits for an answer before it is tried again. Default 2000.
    #[serde(default = "default_dns_timeout_ms")]
    pub timeout_ms: u64,
    /// Tries per query and server. Default 2.
    #[serde(default = "default_dns_attempts")]
    pub attempts: usize,
    /// Answers kept in the cache (each for its TTL). Default 1024.
    #[serde(default = "default_dns_cache_size")]
    pub cache_size: u64,
}

fn default_failover_timeout_ms() -> u64 {
    2000
}
fn default_dns_timeout_ms() -> u64 {
    2000
}
fn default_dns_attempts() -> usize {
    2
}
fn default_dns_cache_size() -> u64 {
    1024
}

/// `[[trunk]]`: an account at a provider (Kamailio `uac`: `uac_auth()` credentials and a
/// `uac_reg` registration).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrunk {
    /// Referenced by `[[route]].trunk`; used in logs and metrics.
    pub name: String,
    /// The account: the user part of the registered AOR and the digest username.
    pub username: String,
    /// The password; exactly one of `password` and `password_file` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A file holding the password (first line, trailing newline removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Answer only challenges of this realm. Default "" = any realm.
    #[serde(default)]
    pub realm: String,
    /// The digest username when it differs from `username`. Default: `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_username: Option<String>,
    /// REGISTER to the provider and keep the registration fresh. Default false.
    #[serde(default)]
    pub register: bool,
    /// The Expires asked for, seconds. Default 600.
    #[serde(default = "default_register_expires")]
    pub register_expires: u64,
    /// `host[:port]` of the registrar (also the AOR's domain). Default: the next hop of the
    /// first `[[route]]` that uses this trunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registrar: Option<String>,
    /// The user part of the Contact we register. Default: `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_user: Option<String>,
}

fn default_register_expires() -> u64 {
    600
}

/// Policy for out-of-dialog requests to domains that are not ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayForeign {
    /// Only for callers who pass proxy authentication as a local subscriber.
    Authenticated,
    /// 403 Forbidden.
    Deny,
    /// Relay anything (the seed's behaviour; an open relay).
    Open,
}

/// Keepalive method towards NATed contacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PingMethod {
    #[serde(rename = "OPTIONS")]
    Options,
    #[serde(rename = "crlf")]
    Crlf,
}

/// When media goes through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaMode {
    Always,
    /// Only when an endpoint is behind NAT.
    Nat,
    Never,
}

fn default_listen() -> Vec<String> {
    vec!["udp:0.0.0.0:5060".into(), "tcp:0.0.0.0:5060".into()]
}
fn default_max_message_size() -> usize {
    65535
}
fn default_max_forwards() -> u8 {
    10
}
fn default_relay_foreign() -> RelayForeign {
    RelayForeign::Authenticated
}
fn default_tcp_idle_timeout() -> u64 {
    600
}
fn default_fr_timer() -> u64 {
    30
}
fn default_fr_inv_timer() -> u64 {
    120
}
/// The `[[trunk]]` tables: unique names, one password source, a registrar when registering
/// (given, or the next hop of the first route that uses the trunk).
fn validate_trunks(raw: &RawConfig) -> Result<Vec<Arc<Trunk>>, ConfigError> {
    let mut out: Vec<Arc<Trunk>> = Vec::with_capacity(raw.trunk.len());
    for (i, t) in raw.trunk.iter().enumerate() {
        if t.name.is_empty() {
            return Err(invalid(
                "trunk.name",
                format!("trunk #{} has an empty name", i + 1),
            ));
        }
        if out.iter().any(|o| o.name == t.name) {
            return Err(invalid("trunk.name", format!("{:?} is used twice", t.name)));
        }
        let token = |s: &str| !s.is_empty() && s.bytes().all(crate::sip::scan::is_token);
        if !token(&t.username) {
            return Err(invalid(
                "trunk.username",
                format!(
                    "trunk {:?}: {:?} is not a SIP user token",
                    t.name, t.username
                ),
            ));
        }
        let password = match (&t.password, &t.password_file) {
            (Some(p), None) => p.clone(),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    invalid(
                        "trunk.password_file",
                        format!("trunk {:?}: reading {file}: {e}", t.name),
                    )
                })?;
                text.lines().next().unwrap_or_default().to_owned()
            }
            _ => {
                return Err(invalid(
                    "trunk.password",
                    format!(
                        "trunk {:?}: set exactly one of password and password_file",
                        t.name
                    ),
                ));
            }
        };
        let registration = if t.register {
            if !(30..=86_400).contains(&t.register_expires) {
                return Err(invalid(
                    "trunk.register_expires",
                    format!("trunk {:?}: must be 30..86400 seconds", t.name),
                ));
            }
            let target = match &t.registrar {
                Some(r) => r.clone(),
                None => raw
                    .route
                    .iter()
                    .find(|r| r.trunk.as_deref() == Some(t.name.as_str()))
                    .and_then(|r| r.next_hop.items().first().cloned())
                    .ok_or_else(|| {
                        invalid(
                            "trunk.registrar",
                            format!(
                                "trunk {:?}: register = true needs a registrar or a [[route]] using the trunk",
                                t.name
                            ),
                        )
                    })?,
            };
            // `host[:port]` or a `sip:` URI, like a next hop (the first of a route's list).
            let hop = NextHop::parse(&target)
                .map_err(|e| invalid("trunk.registrar", format!("trunk {:?}: {e}", t.name)))?;
            let port = hop
                .port
                .unwrap_or(hop.transport.map_or(5060, Proto::default_port));
            let host = hop.host;
            let contact_user = t.contact_user.clone().unwrap_or_else(|| t.username.clone());
            if !token(&contact_user) {
                return Err(invalid(
                    "trunk.contact_user",
                    format!(
                        "trunk {:?}: {contact_user:?} is not a SIP user token",
                        t.name
                    ),
                ));
            }
            Some(Registration {
                host,
                port,
                expires: Duration::from_secs(t.register_expires),
                contact_user,
            })
        } else {
            None
        };
        out.push(Arc::new(Trunk {
            name: t.name.clone(),
            username: t.username.clone(),
            auth_username: t
                .auth_username
                .clone()
                .unwrap_or_else(|| t.username.clone()),
            password,
            realm: (!t.realm.is_empty()).then(|| t.realm.clone()),
            registration,
        }));
    }
    Ok(out)
}

/// The control endpoint answers anyone who can connect, without credentials: it must not be
/// reachable from the network, so only loopback addresses are accepted.
fn validate_control(c: &RawControl) -> Result<Option<SocketAddr>, ConfigError> {
    if c.listen.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = c.listen.parse().map_err(|_| {
        invalid(
            "control.listen",
            format!(
                "{:?} is not IP:PORT (e.g. \"127.0.0.1:8060\"; \"\" turns it off)",
                c.listen
            ),
        )
    })?;
    if !addr.ip().is_loopback() {
        return Err(invalid(
            "control.listen",
            format!(
                "{addr} is not a loopback address: the endpoint has no authentication, so it \
                 listens on 127.0.0.1 or ::1 only (reach it remotely through an SSH tunnel)"
            ),
        ));
    }
    Ok(Some(addr))
}

fn default_db_url() -> String {
    "sqlite://data/sipedge.db".into()
}
fn default_default_expires() -> u32 {
    60
}
fn default_min_expires() -> u32 {
    30
}
fn default_max_expires() -> u32 {
    3600
}
fn default_max_contacts() -> usize {
    10
}
fn default_nonce_ttl() -> u64 {
    300
}
fn default_algorithms() -> Vec<String> {
    vec!["MD5".into()]
}
fn default_ping_interval() -> u64 {
    30
}
fn default_ping_method() -> PingMethod {
    PingMethod::Options
}
fn default_ping_failures() -> u32 {
    3
}
fn default_ports() -> String {
    "30000-40000".into()
}
fn default_media_mode() -> MediaMode {
    MediaMode::Nat
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_offer_timeout() -> u64 {
    120
}
fn default_hold_timeout() -> u64 {
    3600
}
fn default_batch_wait_us() -> u64 {
    sipedge_relay::DEFAULT_BATCH_WAIT_US
}
fn default_max_streams() -> usize {
    8
}
fn default_max_sessions() -> usize {
    2000
}
fn default_max_sessions_per_caller() -> usize {
    20
}

/// `media.cdr_spool` when unset: next to a SQLite database file, else in the working directory.
fn default_cdr_spool(database_url: &str) -> PathBuf {
    const NAME: &str = "sipedge-cdr.spool";
    let path = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or_default());
    match path.map(Path::new).and_then(Path::parent) {
        Some(dir) => dir.join(NAME),
        None => PathBuf::from(NAME),
    }
}
fn default_pike_requests() -> u32 {
    200
}
fn default_pike_window() -> u64 {
    2
}
fn default_ban_time() -> u64 {
    300
}
fn default_auth_failures() -> u32 {
    10
}
fn default_auth_failures_user() -> u32 {
    20
}
fn default_auth_window() -> u64 {
    60
}
fn default_trusted() -> Vec<String> {
    vec!["127.0.0.0/8".into(), "::1/128".into()]
}
fn default_max_tracked() -> usize {
    100_000
}

macro_rules! default_via_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                // invariant: every field of the table has a serde default, so an empty table
                // always deserialises.
                toml::from_str("").expect("all fields have defaults")
            }
        }
    )*};
}
default_via_serde!(
    RawServer,
    RawDatabase,
    RawRegistrar,
    RawAuth,
    RawNat,
    RawMedia,
    RawSecurity,
    RawTls,
    RawDns
);

// ---------------------------------------------------------------------------------------------
// The validated form.

use crate::transport::Proto;
use crate::transport::tls::TlsSettings;

/// One `server.listen` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub proto: Proto,
    pub addr: SocketAddr,
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (proto, addr) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not transport:address:port"))?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "udp" => Proto::Udp,
            "tcp" => Proto::Tcp,
            "tls" => Proto::Tls,
            other => return Err(format!("transport {other:?} is not udp, tcp or tls")),
        };
        let addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not address:port (IPv6 as [addr]:port)"))?;
        Ok(Self { proto, addr })
    }
}

/// Open files sipedge holds besides the relay's sockets and the TCP/TLS connections: its
/// listeners, the store, the log, epoll instances and eventfds, with room to spare.
pub const FD_RESERVE: u64 = 256;

/// `media.ports`: an inclusive range starting on an even port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    /// Number of RTP/RTCP pairs in the range.
    pub fn pairs(self) -> usize {
        (usize::from(self.max) - usize::from(self.min)).div_ceil(2)
    }
}

/// A compiled `[[route]]`.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub user: Regex,
    /// At least one; tried in this order.
    pub next_hops: Vec<NextHop>,
    /// `failover_timeout_ms`: a silent next hop is left for the next one after this.
    pub failover_timeout: Duration,
    /// `probe_interval`, `None` = off.
    pub probe_interval: Option<Duration>,
    pub auth: bool,
    pub media: MediaMode,
    pub identity: Identity,
    /// `[[route]].trunk`: the credentials that answer the next hop's challenges.
    pub trunk: Option<Arc<Trunk>>,
}

/// One `[[route]].next_hop` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// A name or an IP address (IPv6 without brackets).
    pub host: String,
    /// `None`: RFC 3263 picks it (SRV for a name, 5060 for an address).
    pub port: Option<u16>,
    /// `;transport=` of a `sip:` URI; `None`: NAPTR/SRV pick it, else UDP.
    pub transport: Option<Proto>,
}

impl NextHop {
    /// Parses `host`, `host:port`, `[v6]:port` or `sip:host[:port][;transport=udp|tcp]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("sip:") || lower.starts_with("sips:") {
            let uri =
                crate::sip::SipUri::parse(s).map_err(|_| format!("{s:?} is not a SIP URI"))?;
            // A `sips:` next hop goes over TLS whatever transport it names (RFC 3261 §26.2.2).
            let transport = match uri.transport() {
                _ if uri.secure => Some(Proto::Tls),
                None => None,
                Some(t) if t.eq_ignore_ascii_case("udp") => Some(Proto::Udp),
                Some(t) if t.eq_ignore_ascii_case("tcp") => Some(Proto::Tcp),
                Some(t) if t.eq_ignore_ascii_case("tls") => Some(Proto::Tls),
                Some(t) => return Err(format!("{s:?}: transport {t:?} is not udp, tcp or tls")),
            };
            if uri.port == Some(0) {
                return Err(format!("{s:?}: 0 is not a port"));
            }
            let (host, _) = split_host_port(uri.host)?;
            return Ok(Self {
                host,
                port: uri.port,
                transport,
            });
        }
        let (host, port) = split_host_port(s)?;
        Ok(Self {
            host,
            port,
            transport: None,
        })
    }

    /// The IP address, when the host is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        if let Some(t) = self.transport {
            write!(f, ";transport={}", t.as_str().to_ascii_lowercase())?;
        }
        Ok(())
    }
}

/// `[dns]`, validated.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Empty: the system's name servers.
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub attempts: usize,
    pub cache_size: u64,
}

/// A validated `[[trunk]]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Trunk {
    pub name: String,
    pub username: String,
    /// The digest username (`auth_username`, else `username`).
    pub auth_username: String,
    pub password: String,
    /// Only challenges of this realm are answered; `None` = any.
    pub realm: Option<String>,
    /// `register = true`: where and how to register.
    pub registration: Option<Registration>,
}

impl std::fmt::Debug for Trunk {
    // The password never reaches a log line (plans are logged at debug level).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trunk")
            .field("name", &self.name)
            .field("username", &self.username)
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

/// The registration of a trunk (`register = true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The registrar's host (also the AOR's domain) and port.
    pub host: String,
    pub port: u16,
    /// `register_expires`.
    pub expires: Duration,
    /// The user part of our Contact.
    pub contact_user: String,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<Listen>,
    pub advertise: IpAddr,
    /// Lower-cased.
    pub domains: Vec<String>,
    pub max_message_size: usize,
    pub max_forwards: u8,
    pub workers: usize,
    pub instance_id: String,
    pub relay_foreign: RelayForeign,
    pub tcp_idle_timeout: Duration,
    pub fr_timer: Duration,
    pub fr_inv_timer: Duration,
    /// Tracing filter directives, checked.
    pub log_level: Option<String>,
    pub pid_file: Option<PathBuf>,
}

impl ServerConfig {
    /// The SIP runtime's threads on a host with `cores` cores: `workers`, or for 0 half the
    /// cores, at least one. One worker per core cost more CPU than one worker alone on 2
    /// cores: the runtime's work stealing wakes a parked worker for each task handed over
    /// (24 % more CPU per call at 1,800 calls/s, 13 % per registration at 7,600/s, the same
    /// maximum; README "Benchmarks"), and the relay's threads want cores of their own.
    pub fn worker_threads(&self, cores: usize) -> usize {
        match self.workers {
            0 => (cores / 2).max(1),
            n => n,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    pub default_expires: u32,
    pub min_expires: u32,
    pub max_expires: u32,
    pub max_contacts: usize,
}

/// Digest algorithm names accepted in `auth.algorithms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestAlgorithm {
    Md5,
    Sha256,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub realm: Option<String>,
    pub nonce_ttl: Duration,
    pub algorithms: Vec<DigestAlgorithm>,
}

#[derive(Debug, Clone)]
pub struct NatConfig {
    /// `None` = keepalives off.
    pub ping_interval: Option<Duration>,
    pub ping_method: PingMethod,
    /// Unanswered OPTIONS pings in a row before a binding is reported (≥ 1).
    pub ping_failures: u32,
    /// Remove such a binding from the location service.
    pub ping_remove: bool,
}

/// Largest `media.batch_wait_us`: 20 ms, one packet interval of most codecs.
pub const MAX_BATCH_WAIT_US: u64 = 20_000;

#[derive(Debug, Clone)]
pub struct MediaConfig {
    pub address: IpAddr,
    pub ports: PortRange,
    pub mode: MediaMode,
    pub workers: usize,
    pub idle_timeout: Duration,
    pub offer_timeout: Duration,
    pub hold_timeout: Duration,
    /// Relay wake-up coalescing (≤ [`MAX_BATCH_WAIT_US`]); zero: off.
    pub batch_wait: Duration,
    /// m= lines that take ports, per SDP (≥ 1).
    pub max_streams: usize,
    /// Relay sessions in total (≥ 1).
    pub max_sessions: usize,
    /// Relay sessions per caller (≥ 1).
    pub max_sessions_per_caller: usize,
    /// Where CDRs the database refused wait for the next start.
    pub cdr_spool: PathBuf,
}

/// `[limits]`, validated (every count ≥ 1, every duration ≥ 1 s).
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub tcp_connections: usize,
    pub tcp_connections_per_ip: usize,
    pub tcp_message_timeout: Duration,
    pub tcp_write_timeout: Duration,
    pub tcp_send_queue: usize,
    pub tcp_connect_timeout: Duration,
    pub tcp_connects: usize,
    pub transactions: usize,
    pub transactions_per_ip: usize,
    pub transaction_memory: usize,
    pub registrar_cache: usize,
    pub registrar_cache_bytes: usize,
    pub dialogs: usize,
    pub dialog_max_age: Duration,
}

impl LimitsConfig {
    fn validate(l: &RawLimits, max_message_size: usize) -> Result<Self, ConfigError> {
        for (key, v) in [
            ("limits.tcp_connections", l.tcp_connections),
            ("limits.tcp_connections_per_ip", l.tcp_connections_per_ip),
            ("limits.tcp_connects", l.tcp_connects),
            ("limits.transactions", l.transactions),
            ("limits.transactions_per_ip", l.transactions_per_ip),
            ("limits.registrar_cache", l.registrar_cache),
            ("limits.dialogs", l.dialogs),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        for (key, v) in [
            ("limits.tcp_message_timeout", l.tcp_message_timeout),
            ("limits.tcp_write_timeout", l.tcp_write_timeout),
            ("limits.tcp_connect_timeout", l.tcp_connect_timeout),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(key, "must be between 1 and 3600 seconds"));
            }
        }
        // A call longer than a week is not a call any more; a minute is shorter than some.
        if !(60..=7 * 86_400).contains(&l.dialog_max_age) {
            return Err(invalid(
                "limits.dialog_max_age",
                "must be between 60 and 604800 seconds",
            ));
        }
        if l.tcp_send_queue < max_message_size {
            return Err(invalid(
                "limits.tcp_send_queue",
                format!(
                    "must hold at least one message (server.max_message_size = {max_message_size})"
                ),
            ));
        }
        if l.transaction_memory < 3 * max_message_size {
            return Err(invalid(
                "limits.transaction_memory",
                format!(
                    "must hold at least one message's three copies (server.max_message_size = {max_message_size})"
                ),
            ));
        }
        if l.registrar_cache_bytes < max_message_size {
            return Err(invalid(
                "limits.registrar_cache_bytes",
                format!(
                    "must hold at least one message (server.max_message_size = {max_message_size})"
                ),
            ));
        }
        Ok(Self {
            tcp_connections: l.tcp_connections,
            tcp_connections_per_ip: l.tcp_connections_per_ip.min(l.tcp_connections),
            tcp_message_timeout: Duration::from_secs(l.tcp_message_timeout),
            tcp_write_timeout: Duration::from_secs(l.tcp_write_timeout),
            tcp_send_queue: l.tcp_send_queue,
            tcp_connect_timeout: Duration::from_secs(l.tcp_connect_timeout),
            tcp_connects: l.tcp_connects,
            transactions: l.transactions,
            transactions_per_ip: l.transactions_per_ip.min(l.transactions),
            transaction_memory: l.transaction_memory,
            registrar_cache: l.registrar_cache,
            registrar_cache_bytes: l.registrar_cache_bytes,
            dialogs: l.dialogs,
            dialog_max_age: Duration::from_secs(l.dialog_max_age),
        })
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub database_url: String,
    pub registrar: RegistrarConfig,
    pub auth: AuthConfig,
    pub nat: NatConfig,
    pub media: MediaConfig,
    pub limits: LimitsConfig,
    pub security: SecurityConfig,
    /// The control endpoint's address (loopback), `None` = off.
    pub control: Option<SocketAddr>,
    /// `[tls]`, its files checked (they are read again at start).
    pub tls: TlsSettings,
    pub dns: DnsConfig,
    pub routes: Vec<Route>,
    /// The `[[trunk]]` accounts, in file order.
    pub trunks: Vec<Arc<Trunk>>,
    /// Where `server.advertise` came from (for the startup warning).
    advertise_source: AdvertiseSource,
    /// The file with every default and derived value filled in (what `check-config` prints).
    effective: RawConfig,
}

/// Where `server.advertise` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdvertiseSource {
    /// Written in the file.
    Configured,
    /// The first `server.listen` address that is not 0.0.0.0/::.
    ListenAddress,
    /// The host's primary address ([`primary_address`]).
    PrimaryAddress,
}

/// What kind of address peers on the internet cannot reach `ip` as, or `None` for a public
/// (globally routable) one.
pub fn non_public_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_private() {
                Some("a private address (RFC 1918)")
            } else if a == 100 && (64..128).contains(&b) {
                Some("a carrier-grade NAT address (RFC 6598)")
            } else if v4.is_link_local() {
                Some("a link-local address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if let Some(v4) = v6.to_ipv4_mapped() {
                non_public_kind(IpAddr::V4(v4))
            } else if v6.is_loopback() {
                Some("a loopback address")
            } else if first & 0xfe00 == 0xfc00 {
                Some("a unique local address (RFC 4193)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else {
                None
            }
        }
    }
}

/// The configuration files tried, in this order, when neither `-c` nor `SIPEDGE_CONFIG`
/// names one: the seed file of a source checkout (relative to the working directory), then
/// the one a package installs.
pub const CONFIG_SEARCH_PATH: [&str; 2] = ["config/sipedge.toml", "/etc/sipedge/sipedge.toml"];

/// The configuration file to load: `given` (from `-c` or `SIPEDGE_CONFIG`) as is, even when it
/// does not exist (the error will name it); else the first of [`CONFIG_SEARCH_PATH`] for which
/// `exists` is true; `None` when there is none.
pub fn find_config(given: Option<&Path>, exists: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    match given {
        Some(p) => Some(p.to_owned()),
        None => CONFIG_SEARCH_PATH
            .iter()
            .map(Path::new)
            .find(|p| exists(p))
            .map(Path::to_owned),
    }
}

impl Config {
    /// Reads and validates a file; the host's primary address fills `server.advertise` when
    /// it is unset.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, primary_address)
    }

    /// Parses and validates TOML text. `primary` supplies the host's address when neither
    /// `server.advertise` nor a specific listen address gives one.
    pub fn from_toml(text: &str, primary: impl FnOnce() -> IpAddr) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        Self::validate(raw, primary)
    }

    fn validate(mut raw: RawConfig, primary: impl FnOnce() -> IpAddr) -> Result<Self, ConfigError> {
        let s = &raw.server;
        if s.listen.is_empty() {
            return Err(invalid("server.listen", "at least one socket is required"));
        }
        let listen = s
            .listen
            .iter()
            .map(|l| l.parse::<Listen>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|r| invalid("server.listen", r))?;
        for (i, a) in listen.iter().enumerate() {
            if listen[..i].contains(a) {
                return Err(invalid(
                    "server.listen",
                    format!("{}:{} is listed twice", a.proto.as_str(), a.addr),
                ));
            }
        }
        let (advertise, advertise_source) = match &s.advertise {
            Some(a) => (
                a.parse::<IpAddr>().map_err(|_| {
                    invalid(
                        "server.advertise",
                        format!("{a:?} is not an IP address (the public address of this host)"),
                    )
                })?,
                AdvertiseSource::Configured,
            ),
            None => match listen
                .iter()
                .map(|l| l.addr.ip())
                .find(|ip| !ip.is_unspecified())
            {
                Some(ip) => (ip, AdvertiseSource::ListenAddress),
                None => (primary(), AdvertiseSource::PrimaryAddress),
            },
        };
        if advertise.is_unspecified() {
            return Err(invalid(
                "server.advertise",
                "0.0.0.0/:: cannot be written in Via or Record-Route",
            ));
        }
        let mut domains: Vec<String> = s.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
        if domains.is_empty() {
            domains.push(advertise.to_string());
        }
        if let Some(d) = domains
            .iter()
            .find(|d| d.is_empty() || d.contains(|c: char| c.is_whitespace() || c == '@'))
        {
            return Err(invalid(
                "server.domains",
                format!("{d:?} is not a host name"),
            ));
        }
        if !(1024..=65535).contains(&s.max_message_size) {
            return Err(invalid(
                "server.max_message_size",
                "must be between 1024 and 65535 bytes",
            ));
        }
        if s.max_forwards == 0 {
            return Err(invalid("server.max_forwards", "must be at least 1"));
        }
        let first_port = listen[0].addr.port();
        let instance_id = if s.instance_id.is_empty() {
            format!("{advertise}:{first_port}")
        } else {
            s.instance_id.clone()
        };
        if s.tcp_idle_timeout == 0 {
            return Err(invalid(
                "server.tcp_idle_timeout",
                "must be at least 1 second",
            ));
        }
        for (key, v) in [
            ("server.fr_timer", s.fr_timer),
            ("server.fr_inv_timer", s.fr_inv_timer),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(key, "must be between 1 and 3600 seconds"));
            }
        }
        let log_level = match s.log_level.as_deref().map(str::trim) {
            None => None,
            Some("") => return Err(invalid("server.log_level", "must not be empty")),
            Some(l) => {
                tracing_subscriber::EnvFilter::try_new(l).map_err(|e| {
                    invalid(
                        "server.log_level",
                        format!("{l:?} is not a log filter: {e}"),
                    )
                })?;
                Some(l.to_owned())
            }
        };
        let pid_file = match s.pid_file.as_deref() {
            None => None,
            Some("") => return Err(invalid("server.pid_file", "must not be empty")),
            Some(p) => Some(PathBuf::from(p)),
        };
        let server = ServerConfig {
            listen,
            advertise,
            domains,
            max_message_size: s.max_message_size,
            max_forwards: s.max_forwards,
            workers: s.workers,
            instance_id,
            relay_foreign: s.relay_foreign,
            tcp_idle_timeout: Duration::from_secs(s.tcp_idle_timeout),
            fr_timer: Duration::from_secs(s.fr_timer),
            fr_inv_timer: Duration::from_secs(s.fr_inv_timer),
            log_level,
            pid_file,
        };

        let url = &raw.database.url;
        // (The same schemes as `store::Dialect::from_url`; a backend needs its cargo feature.)
        let feature = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(("postgres", cfg!(feature = "postgres")))
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Some(("mysql", cfg!(feature = "mysql")))
        } else if url.starts_with("sqlite:") {
            None
        } else {
            return Err(invalid(
                "database.url",
                format!(
                    "{url:?} is none of sqlite://PATH, postgres://USER@HOST/DB, \
                     mysql://USER@HOST/DB, mariadb://USER@HOST/DB"
                ),
            ));
        };
        if let Some((feature, false)) = feature {
            return Err(invalid(
                "database.url",
                format!(
                    "needs the `{feature}` cargo feature, which this sipedge was built without \
                     (cargo build --release --features {feature})"
                ),
            ));
        }

        let r = &raw.registrar;
        if r.min_expires > r.max_expires {
            return Err(invalid(
                "registrar.min_expires",
                "is larger than registrar.max_expires",
            ));
        }
        if !(r.min_expires..=r.max_expires).contains(&r.default_expires) {
            return Err(invalid(
                "registrar.default_expires",
                "must lie between registrar.min_expires and registrar.max_expires",
            ));
        }
        if r.max_contacts == 0 {
            return Err(invalid("registrar.max_contacts", "must be at least 1"));
        }
        let registrar = RegistrarConfig {
            default_expires: r.default_expires,
            min_expires: r.min_expires,
            max_expires: r.max_expires,
            max_contacts: r.max_contacts,
        };

        let a = &raw.auth;
        if a.nonce_ttl == 0 {
            return Err(invalid("auth.nonce_ttl", "must be at least 1 second"));
        }
        let mut algorithms = Vec::new();
        for name in &a.algorithms {
            let alg = match name.to_ascii_uppercase().as_str() {
                "MD5" => DigestAlgorithm::Md5,
                "SHA-256" => DigestAlgorithm::Sha256,
                _ => {
                    return Err(invalid(
                        "auth.algorithms",
                        format!("{name:?} is not \"MD5\" or \"SHA-256\""),
                    ));
                }
            };
            if algorithms.contains(&alg) {
                return Err(invalid(
                    "auth.algorithms",
                    format!("{name:?} is listed twice"),
                ));
            }
            algorithms.push(alg);
        }
        if algorithms.is_empty() {
            return Err(invalid(
                "auth.algorithms",
                "at least one algorithm is required",
            ));
        }
        let auth = AuthConfig {
            realm: (!a.realm.is_empty()).then(|| a.realm.clone()),
            nonce_ttl: Duration::from_secs(a.nonce_ttl),
            algorithms,
        };

        let nat = NatConfig {
            ping_interval: (raw.nat.ping_interval > 0)
                .then(|| Duration::from_secs(raw.nat.ping_interval)),
            ping_method: raw.nat.ping_method,
            ping_failures: raw.nat.ping_failures,
            ping_remove: raw.nat.ping_remove,
        };
        if raw.nat.ping_failures == 0 {
            return Err(invalid("nat.ping_failures", "must be at least 1"));
        }

        let m = &raw.media;
        let address = match &m.address {
            Some(a) => a
                .parse::<IpAddr>()
                .map_err(|_| invalid("media.address", format!("{a:?} is not an IP address")))?,
            None => advertise,
        };
        let ports = parse_port_range(&m.ports).map_err(|r| invalid("media.ports", r))?;
        for (key, v) in [
            ("media.idle_timeout", m.idle_timeout),
            ("media.offer_timeout", m.offer_timeout),
            ("media.hold_timeout", m.hold_timeout),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1 second"));
            }
        }
        if m.batch_wait_us > MAX_BATCH_WAIT_US {
            return Err(invalid(
                "media.batch_wait_us",
                format!("must be at most {MAX_BATCH_WAIT_US} (it delays every relayed packet)"),
            ));
        }
        for (key, v) in [
            ("media.max_streams", m.max_streams),
            ("media.max_sessions", m.max_sessions),
            ("media.max_sessions_per_caller", m.max_sessions_per_caller),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let cdr_spool = match m.cdr_spool.as_deref() {
            Some("") => return Err(invalid("media.cdr_spool", "must not be empty")),
            Some(p) => PathBuf::from(p),
            None => default_cdr_spool(&raw.database.url),
        };
        let media = MediaConfig {
            address,
            ports,
            mode: m.mode,
            workers: m.workers,
            idle_timeout: Duration::from_secs(m.idle_timeout),
            offer_timeout: Duration::from_secs(m.offer_timeout),
            hold_timeout: Duration::from_secs(m.hold_timeout),
            batch_wait: Duration::from_micros(m.batch_wait_us),
            max_streams: m.max_streams,
            max_sessions: m.max_sessions,
            max_sessions_per_caller: m.max_sessions_per_caller,
            cdr_spool,
        };

        let security = validate_security(&raw.security)?;

        let trunks = validate_trunks(&raw)?;
        let mut routes = Vec::with_capacity(raw.route.len());
        for (i, r) in raw.route.iter().enumerate() {
            if r.name.is_empty() {
                return Err(invalid(
                    "route.name",
                    format!("route #{} has an empty name", i + 1),
                ));
            }
            if raw.route[..i].iter().any(|o| o.name == r.name) {
                return Err(invalid("route.name", format!("{:?} is used twice", r.name)));
            }
            let user = Regex::new(&r.user).map_err(|e| {
                invalid("route.user", format!("route {:?}: bad regex: {e}", r.name))
            })?;
            let next_hops = r
                .next_hop
                .items()
                .iter()
                .map(|h| NextHop::parse(h))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("route.next_hop", format!("route {:?}: {e}", r.name)))?;
            if r.identity != Identity::None && !r.auth {
                return Err(invalid(
                    "route.identity",
                    format!(
                        "route {:?}: asserting the caller's identity needs auth = true (only an \
                         authenticated subscriber has a caller ID)",
                        r.name
                    ),
                ));
            }
            if next_hops.is_empty() {
                return Err(invalid(
                    "route.next_hop",
                    format!("route {:?}: the list is empty", r.name),
                ));
            }
            if r.failover_timeout_ms == 0 {
                return Err(invalid(
                    "route.failover_timeout_ms",
                    format!("route {:?}: must be at least 1", r.name),
                ));
            }
            let trunk = match &r.trunk {
                None => None,
                Some(name) => Some(
                    trunks
                        .iter()
                        .find(|t| &t.name == name)
                        .cloned()
                        .ok_or_else(|| {
                            invalid(
                                "route.trunk",
                                format!("route {:?}: no [[trunk]] named {name:?}", r.name),
                            )
                        })?,
                ),
            };
            routes.push(Route {
                name: r.name.clone(),
                user,
                next_hops,
                failover_timeout: Duration::from_millis(r.failover_timeout_ms),
                probe_interval: (r.probe_interval > 0)
                    .then(|| Duration::from_secs(r.probe_interval)),
                auth: r.auth,
                media: r.media,
                identity: r.identity,
                trunk,
            });
        }

        let limits = LimitsConfig::validate(&raw.limits, server.max_message_size)?;
        let control = validate_control(&raw.control)?;
        let tls = validate_tls(&raw.tls, &server.listen)?;
        let dns = validate_dns(&raw.dns)?;

        // Record the derived values so that `check-config` shows what will run.
        raw.server.advertise = Some(server.advertise.to_string());
        raw.server.domains = server.domains.clone();
        raw.server.instance_id = server.instance_id.clone();
        raw.media.address = Some(media.address.to_string());
        raw.media.cdr_spool = Some(media.cdr_spool.display().to_string());
        Ok(Self {
            server,
            database_url: raw.database.url.clone(),
            registrar,
            auth,
            nat,
            media,
            limits,
            security,
            control,
            tls,
            dns,
            routes,
            trunks,
            advertise_source,
            effective: raw,
        })
    }

    /// Where `server.advertise` came from.
    pub fn advertise_source(&self) -> AdvertiseSource {
        self.advertise_source
    }

    /// A warning for the operator when `server.advertise` was not written in the file and the
    /// address picked is one that peers on the internet cannot reach (private, shared, link-local
    /// or loopback): every Via and Record-Route would carry it and calls through NAT would fail.
    /// A loopback `listen` address is taken as deliberate (a test or local setup).
    pub fn advertise_warning(&self) -> Option<String> {
        let ip = self.server.advertise;
        let why = match self.advertise_source {
            AdvertiseSource::Configured => return None,
            AdvertiseSource::ListenAddress if ip.is_loopback() => return None,
            AdvertiseSource::ListenAddress => "the first specific listen address",
            AdvertiseSource::PrimaryAddress => "the host's primary address",
        };
        let kind = non_public_kind(ip)?;
        Some(format!(
            "server.advertise is unset, so {why} {ip} is advertised; it is {kind}, which phones \
             and peers outside this network cannot reach: on a public host set server.advertise \
             to the public address"
        ))
    }

    /// A warning for the operator when `limit` open files cannot hold what the configured
    /// limits let peers open: four sockets per relay session of one audio stream (RTP and RTCP
    /// on each side; `media.max_sessions`, or as many as `media.ports` holds), one per TCP/TLS
    /// connection (`limits.tcp_connections`), and [`FD_RESERVE`] for the rest. Past the limit
    /// new offers are answered 503 (`media socket: Too many open files`) and connections are
    /// refused: the protection holds, but below the configured limits.
    pub fn fd_limit_warning(&self, limit: u64) -> Option<String> {
        let sessions = self.media.max_sessions.min(self.media.ports.pairs() / 2);
        let need = 4 * sessions as u64 + self.limits.tcp_connections as u64 + FD_RESERVE;
        (need > limit).then(|| {
            let fit = limit.saturating_sub(self.limits.tcp_connections as u64 + FD_RESERVE) / 4;
            format!(
                "the open-file limit {limit} is below the {need} descriptors the limits allow \
                 ({sessions} relay sessions at 4 sockets each, media.max_sessions / media.ports; \
                 limits.tcp_connections {}; {FD_RESERVE} for the rest): about {fit} relayed \
                 calls fit, offers beyond are answered 503; raise LimitNOFILE (ulimit -n) or \
                 lower the limits",
                self.limits.tcp_connections
            )
        })
    }

    /// The effective configuration as TOML: every default and derived value written out,
    /// trunk passwords hidden (`check-config` output ends up in tickets and chats).
    pub fn effective_toml(&self) -> String {
        let mut shown = self.effective.clone();
        for t in &mut shown.trunk {
            if t.password.is_some() {
                t.password = Some("(hidden)".to_owned());
            }
        }
        // invariant: RawConfig holds only strings, numbers, bools, enums and arrays of tables,
        // all of which TOML can represent.
        toml::to_string_pretty(&shown).expect("RawConfig serialises to TOML")
    }

    /// True if `host` (a domain or address from a URI) names this server.
    pub fn is_local_domain(&self, host: &str) -> bool {
        self.server
            .domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(host))
    }
}

// ---------------------------------------------------------------------------------------------
// Reload (SIGHUP, `sipedge reload`).

/// The keys a reload applies to a running server; every other key needs a restart. This list
/// is the one place that says so: [`Config::reload`] keeps the running value of every key
/// not listed, so a component that reads a restart-only key from the live configuration
/// still sees the value it was built with. A key belongs here only when everything that
/// reads it takes the live configuration per request or per round:
///
/// - `route` (all `[[route]]` rules), `server.relay_foreign`, `media.mode`: the routing core,
///   per request;
/// - `limits.transactions*`, `limits.transaction_memory`: the proxy, per request;
/// - `registrar.*`: the registrar, per REGISTER;
/// - `nat.*`: the keepalive pinger, per round (a new interval starts a new schedule);
/// - `security.*`: the flood and brute-force state takes the new thresholds as a whole
///   (bans and counts in progress are kept);
/// - `server.log_level`: the log filter (unless `--log-level` or `RUST_LOG` is given).
///
/// Restart-only, and why: the sockets and addresses (`server.listen`, `advertise`,
/// `instance_id`, `media.address`, `media.ports`), thread counts (`*.workers`), the store
/// (`database.url`, `media.cdr_spool`), sizes fixed at start (`server.max_message_size`,
/// `limits.tcp_*`, `limits.registrar_cache*`), the transaction timers and Max-Forwards
/// (`server.fr_timer`, `fr_inv_timer`, `max_forwards`, `tcp_idle_timeout`), `server.domains`
/// (subscribers and registrations are stored under their domain, and three components check
/// it), `[auth]` (the realm is part of every stored HA1; nonces in flight carry the TTL), the
/// relay's timeouts and session limits (`media.*_timeout`, `media.max_*`: the relay takes
/// them at start), `server.pid_file`, and `trunk` (the `[[trunk]]` accounts: their
/// registrations start with the server; a reload whose routes name a trunk the running
/// configuration does not have is refused, naming `route.trunk`).
pub const LIVE_KEYS: &[&str] = &[
    "route",
    "server.relay_foreign",
    "server.log_level",
    "media.mode",
    "limits.transactions",
    "limits.transactions_per_ip",
    "limits.transaction_memory",
    "registrar.default_expires",
    "registrar.min_expires",
    "registrar.max_expires",
    "registrar.max_contacts",
    "nat.ping_interval",
    "nat.ping_method",
    "nat.ping_failures",
    "nat.ping_remove",
    "security.pike_requests",
    "security.pike_window",
    "security.ban_time",
    "security.auth_failures",
    "security.auth_failures_user",
    "security.auth_window",
    "security.trusted",
    "security.max_tracked",
];

/// What a reload from one configuration to another does.
#[derive(Debug)]
pub struct Reload {
    /// The configuration to run on: the new file's live keys, the running values of the others.
    pub config: Config,
    /// Changed keys that take effect now (dotted, `route` for the `[[route]]` rules), sorted.
    pub live: Vec<String>,
    /// Changed keys that wait for a restart, sorted.
    pub restart: Vec<String>,
}

impl Config {
    /// The reload from `self` (running) to `new` (just read and validated): which keys changed,
    /// split by [`LIVE_KEYS`], and the configuration that applies the live ones only. The
    /// comparison is on the effective values, so a default written out is no change. `Err`
    /// when the mix is itself invalid (a live limit checked against a restart-only size).
    pub fn reload(&self, new: &Self) -> Result<Reload, ConfigError> {
        let old = self.effective_table();
        let mut merged = new.effective_table();
        let (mut live, mut restart) = (Vec::new(), Vec::new());
        for (table, key) in changed_keys(&old, &merged) {
            let dotted = match &key {
                Some(k) => format!("{table}.{k}"),
                None => table.clone(),
            };
            if LIVE_KEYS.contains(&dotted.as_str()) {
                live.push(dotted);
            } else {
                let running = value_at(&old, &table, key.as_deref()).cloned();
                set_value(&mut merged, &table, key.as_deref(), running);
                restart.push(dotted);
            }
        }
        let raw: RawConfig =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    key: "(reload)".into(),
                    message: e.message().to_owned(),
                })?;
        // Every derived value is written out in the effective form, so the primary address
        // is never asked for; the running one would be the answer anyway.
        let advertise = self.server.advertise;
        let config = Self::validate(raw, || advertise)?;
        Ok(Reload {
            config,
            live,
            restart,
        })
    }

    /// The effective configuration as a TOML table.
    fn effective_table(&self) -> toml::Table {
        // invariant: RawConfig serialises to a TOML table (see `effective_toml`).
        match toml::Value::try_from(&self.effective).expect("RawConfig serialises to TOML") {
            toml::Value::Table(t) => t,
            _ => toml::Table::new(),
        }
    }
}

/// The `(table, key)` pairs whose values differ, in table and key order; `key` is `None` for
/// a top-level value (`route`, the array of `[[route]]` tables).
fn changed_keys(a: &toml::Table, b: &toml::Table) -> Vec<(String, Option<String>)> {
    let mut tables: Vec<&String> = a.keys().chain(b.keys()).collect();
    tables.sort();
    tables.dedup();
    let mut out = Vec::new();
    for table in tables {
        match (a.get(table), b.get(table)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                out.extend(
                    keys.into_iter()
                        .filter(|k| x.get(*k) != y.get(*k))
                        .map(|k| (table.clone(), Some(k.clone()))),
                );
            }
            (x, y) if x != y => out.push((table.clone(), None)),
            _ => {}
        }
    }
    out
}

/// The value of `table.key` (or of `table` itself when `key` is `None`).
fn value_at<'a>(t: &'a toml::Table, table: &str, key: Option<&str>) -> Option<&'a toml::Value> {
    let top = t.get(table)?;
    match key {
        None => Some(top),
        Some(k) => top.as_table()?.get(k),
    }
}

/// Sets (or, for `None`, removes) the value of `table.key` (or of `table`).
fn set_value(t: &mut toml::Table, table: &str, key: Option<&str>, v: Option<toml::Value>) {
    let (slot, name) = match key {
        None => (t, table),
        Some(k) => {
            let entry = t
                .entry(table)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(inner) = entry.as_table_mut() else {
                return;
            };
            (inner, k)
        }
    };
    match v {
        Some(v) => slot.insert(name.to_owned(), v),
        None => slot.remove(name),
    };
}

/// The configuration a running server reads, swapped whole by a reload and read without a
/// lock. A reader takes one snapshot ([`LiveConfig::load`]) per request or per round and
/// uses only it, so a request sees the old settings or the new ones, never a mix.
#[derive(Debug)]
pub struct LiveConfig {
    current: arc_swap::ArcSwap<Config>,
    /// Bumped after each swap, for tasks that sleep on a setting (the keepalive interval).
    generation: tokio::sync::watch::Sender<u64>,
}

impl LiveConfig {
    pub fn new(cfg: Arc<Config>) -> Self {
        Self {
            current: arc_swap::ArcSwap::new(cfg),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The configuration in force now.
    pub fn load(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Replaces the configuration; requests already under way keep the one they loaded.
    pub fn store(&self, cfg: Arc<Config>) {
        self.current.store(cfg);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes whenever the configuration is replaced.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// `[tls]`: a `tls:` listener needs a certificate and its key; every file given must be
/// readable PEM of the right kind (read now, so that `check-config` names the bad key).
fn validate_tls(t: &RawTls, listen: &[Listen]) -> Result<TlsSettings, ConfigError> {
    let path = |key: &'static str, v: &Option<String>| -> Result<Option<PathBuf>, ConfigError> {
        match v.as_deref() {
            None => Ok(None),
            Some("") => Err(invalid(key, "must not be empty")),
            Some(p) => Ok(Some(PathBuf::from(p))),
        }
    };
    let settings = TlsSettings {
        certificate: path("tls.certificate", &t.certificate)?,
        private_key: path("tls.private_key", &t.private_key)?,
        ca_file: path("tls.ca_file", &t.ca_file)?,
        verify_server: t.verify_server,
        handshake_timeout: Duration::from_secs(t.handshake_timeout),
    };
    if !(1..=60).contains(&t.handshake_timeout) {
        return Err(invalid(
            "tls.handshake_timeout",
            "must be between 1 and 60 seconds",
        ));
    }
    if let Some(l) = listen.iter().find(|l| l.proto == Proto::Tls) {
        for (key, v) in [
            ("tls.certificate", &settings.certificate),
            ("tls.private_key", &settings.private_key),
        ] {
            if v.is_none() {
                return Err(invalid(
                    key,
                    format!("is required by the listener tls:{}", l.addr),
                ));
            }
        }
    }
    settings
        .build(|| None)
        .map_err(|e| invalid(e.key, e.reason))?;
    Ok(settings)
}

fn validate_security(s: &RawSecurity) -> Result<SecurityConfig, ConfigError> {
    for (key, v) in [
        ("security.pike_window", s.pike_window),
        ("security.ban_time", s.ban_time),
        ("security.auth_window", s.auth_window),
    ] {
        if !(1..=86_400).contains(&v) {
            return Err(invalid(key, "must be between 1 and 86400 seconds"));
        }
    }
    if s.max_tracked == 0 {
        return Err(invalid("security.max_tracked", "must be at least 1"));
    }
    let trusted = s
        .trusted
        .iter()
        .map(|t| t.parse::<Cidr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|r| invalid("security.trusted", r))?;
    let on = |n: u32| (n > 0).then_some(n);
    Ok(SecurityConfig {
        pike_requests: on(s.pike_requests),
        pike_window: Duration::from_secs(s.pike_window),
        ban_time: Duration::from_secs(s.ban_time),
        auth_failures: on(s.auth_failures),
        auth_failures_user: on(s.auth_failures_user),
        auth_window: Duration::from_secs(s.auth_window),
        trusted,
        max_tracked: s.max_tracked,
    })
}

fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not MIN-MAX"))?;
    let min: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a port"))?;
    let max: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a port"))?;
    if min < 1024 {
        return Err(format!(
            "{min} is a privileged port; start at 1024 or above"
        ));
    }
    if min % 2 != 0 {
        return Err(format!(
            "{min} is odd; RTP uses even ports, so MIN must be even"
        ));
    }
    if max <= min {
        return Err(format!(
            "MAX {max} must be above MIN {min} (one RTP/RTCP pair at least)"
        ));
    }
    Ok(PortRange { min, max })
}

/// `[dns]` → [`DnsConfig`].
fn validate_dns(d: &RawDns) -> Result<DnsConfig, ConfigError> {
    let mut servers = Vec::with_capacity(d.servers.len());
    for s in &d.servers {
        let addr = match s.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, 53),
            Err(_) => s.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "dns.servers",
                    format!("{s:?} is not ip or ip:port (IPv6 as [addr]:port)"),
                )
            })?,
        };
        servers.push(addr);
    }
    if d.timeout_ms == 0 {
        return Err(invalid("dns.timeout_ms", "must be at least 1"));
    }
    if d.attempts == 0 {
        return Err(invalid("dns.attempts", "must be at least 1"));
    }
    Ok(DnsConfig {
        servers,
        timeout: Duration::from_millis(d.timeout_ms),
        attempts: d.attempts,
        cache_size: d.cache_size,
    })
}

/// `host`, `host:port` or `[v6]:port` with the port optional.
fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    if !s.starts_with('[') && s.matches(':').count() > 1 {
        // A bare IPv6 address (as SipUri gives it, brackets removed).
        return s
            .parse::<std::net::Ipv6Addr>()
            .map(|_| (s.to_owned(), None))
            .map_err(|_| format!("{s:?} is not host[:port]"));
    }
    let explicit = s.starts_with('[') && s.contains("]:") || !s.starts_with('[') && s.contains(':');
    let (host, port) = parse_host_port(s)?;
    Ok((host, explicit.then_some(port)))
}

fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, rest) = v6
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: unterminated IPv6 reference"))?;
        (h, rest.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port"))?,
        None => 5060,
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:".contains(c))
    {
        return Err(format!("{s:?} is not host[:port]"));
    }
    Ok((host.to_owned(), port))
}

/// Turns a TOML error into one that names the dotted key: the table header above the error
/// position plus the key at it.
fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_owned();
    let Some(span) = e.span() else {
        return ConfigError::Syntax {
            key: "(file)".into(),
            message,
        };
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |p| p + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    // The table the error is in: the nearest header line at or above the error.
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let key = if line.starts_with('[') {
        line.trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_owned()
    } else {
        let key_here = line
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
        match (table, key_here.is_empty()) {
            (Some(t), false) => format!("{t}.{key_here}"),
            (Some(t), true) => t,
            (None, false) => key_here.to_owned(),
            (None, true) => "(file)".to_owned(),
        }
    };
    ConfigError::Syntax {
        key,
        message: format!("{message} (line {line_no})"),
    }
}

/// The host's primary address: the local address the kernel picks for a route to the
/// internet. `connect` on a UDP socket sends nothing; it only consults the routing table.
pub fn primary_address() -> IpAddr {
    let probe = || -> std::io::Result<IpAddr> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect("192.0.2.1:9")?;
        Ok(s.local_addr()?.ip())
    };
    probe()
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, || "192.0.2.10".parse().unwrap())
    }

    fn err_key(text: &str) -> String {
        match parse(text).unwrap_err() {
            ConfigError::Syntax { key, .. } => key,
            ConfigError::Invalid { key, .. } => key.to_owned(),
            ConfigError::Io { .. } => unreachable!(),
        }
    }

    /// The seed file with its commented-out `[[route]]` examples switched on.
    fn seed_with_routes() -> String {
        let text = include_str!("../config/sipedge.toml");
        let start = text
            .find("# [[route]]")
            .expect("the seed file has route examples");
        let (head, examples) = text.split_at(start);
        let examples: String = examples
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        format!("{head}{examples}")
    }

    /// `password_file`: its first line; the realm "" means any; defaults filled in.
    #[test]
    fn trunk_password_file_and_defaults() {
        let dir = std::env::temp_dir().join(format!("sipedge-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("trunk.pass");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        let cfg = parse(&format!(
            "[[route]]\nname='p'\nuser='^1'\nnext_hop='192.0.2.80:5080'\ntrunk='t'\n\
             [[trunk]]\nname='t'\nusername='acct'\npassword_file='{}'\nregister=true\n",
            file.display()
        ))
        .unwrap();
        let t = &cfg.trunks[0];
        assert_eq!(t.password, "s3cret");
        assert_eq!(
            (t.auth_username.as_str(), t.realm.as_deref()),
            ("acct", None)
        );
        let reg = t.registration.as_ref().unwrap();
        assert_eq!((reg.host.as_str(), reg.port), ("192.0.2.80", 5080));
        assert_eq!(reg.contact_user, "acct");
        assert_eq!(reg.expires, Duration::from_secs(600));
        assert!(!format!("{t:?}").contains("s3cret"), "never in a log line");
        let inline = parse("[[trunk]]\nname='t'\nusername='acct'\npassword='s3cret'\n").unwrap();
        assert_eq!(inline.trunks[0].password, "s3cret");
        let shown = inline.effective_toml();
        assert!(
            shown.contains("[[trunk]]") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(std::sync::Arc::ptr_eq(
            cfg.routes[0].trunk.as_ref().unwrap(),
            t
        ));
    }

    #[test]
    fn sip_workers_default_to_half_the_cores() {
        let mut cfg = parse("").unwrap();
        assert_eq!(cfg.server.workers, 0);
        let threads = |cfg: &Config, cores| cfg.server.worker_threads(cores);
        assert_eq!([1, 2, 3, 4, 16].map(|c| threads(&cfg, c)), [1, 1, 1, 2, 8]);
        cfg.server.workers = 3;
        assert_eq!(threads(&cfg, 2), 3, "an explicit count is kept");
    }

    #[test]
    fn seed_file_is_valid() {
        let text = include_str!("../config/sipedge.toml");
        let cfg = parse(text).unwrap();
        assert_eq!(cfg.server.listen.len(), 2);
        // A first run: no rule catches the README's first subscriber, 1001.
        assert!(
            cfg.routes.is_empty(),
            "the seed routes are examples, commented out"
        );
        // The examples are valid once uncommented.
        let cfg = parse(&seed_with_routes()).unwrap();
        assert_eq!(cfg.routes.len(), 2);
        assert_eq!(cfg.trunks.len(), 1);
        let provider = cfg.routes.iter().find(|r| r.name == "provider").unwrap();
        let trunk = provider
            .trunk
            .as_ref()
            .expect("the provider route uses the trunk");
        let reg = trunk.registration.as_ref().expect("it registers");
        assert_eq!(
            (reg.host.as_str(), reg.port),
            ("sip.provider.example", 5060)
        );
        assert_eq!(reg.expires, Duration::from_secs(600));
        assert!(cfg.routes[0].user.is_match("1234"));
        assert!(!cfg.routes[0].user.is_match("12345"));
        assert!(cfg.routes[1].user.is_match("15551234567"));
        assert!(cfg.routes[1].auth);
        assert_eq!(cfg.routes[1].identity, Identity::Rpid);
        assert_eq!(cfg.routes[0].identity, Identity::None, "the default");
        // The effective config is itself a valid config file.
        let again = parse(&cfg.effective_toml()).unwrap();
        assert_eq!(again.server.advertise, cfg.server.advertise);
        assert_eq!(again.routes.len(), 2);
    }

    #[test]
    fn defaults() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.server.advertise.to_string(), "192.0.2.10");
        assert_eq!(cfg.server.domains, vec!["192.0.2.10".to_owned()]);
        assert_eq!(cfg.server.max_message_size, 65535);
        assert_eq!(cfg.server.instance_id, "192.0.2.10:5060");
        assert_eq!(cfg.media.address, cfg.server.advertise);
        assert_eq!(cfg.media.ports.pairs(), 5000);
        assert_eq!(
            (
                cfg.media.max_streams,
                cfg.media.max_sessions,
                cfg.media.max_sessions_per_caller
            ),
            (8, 2000, 20)
        );
        assert_eq!(cfg.media.batch_wait, Duration::from_millis(1));
        let off = parse("[media]\nbatch_wait_us = 0").unwrap();
        assert_eq!(off.media.batch_wait, Duration::ZERO);
        assert_eq!(
            cfg.media.cdr_spool,
            PathBuf::from("data/sipedge-cdr.spool"),
            "next to the default database"
        );
        if cfg!(feature = "postgres") {
            let pg = parse("[database]\nurl = \"postgres://u:p@db/sipedge\"").unwrap();
            assert_eq!(pg.media.cdr_spool, PathBuf::from("sipedge-cdr.spool"));
        }
        let set = parse("[media]\ncdr_spool = \"/var/spool/sipedge/cdr\"").unwrap();
        assert_eq!(set.media.cdr_spool, PathBuf::from("/var/spool/sipedge/cdr"));
        assert_eq!(cfg.auth.algorithms, vec![DigestAlgorithm::Md5]);
        assert_eq!(cfg.nat.ping_interval, Some(Duration::from_secs(30)));
        // A specific listen address is preferred over the primary address.
        let cfg = parse("[server]\nlisten = [\"udp:127.0.0.1:5070\"]").unwrap();
        assert_eq!(cfg.server.advertise.to_string(), "127.0.0.1");
    }

    #[test]
    fn security_defaults_and_switches() {
        let s = parse("").unwrap().security;
        assert_eq!(s.pike_requests, Some(200));
        assert_eq!(s.pike_window, Duration::from_secs(2));
        assert_eq!(s.ban_time, Duration::from_secs(300));
        assert_eq!(s.auth_failures, Some(10));
        assert_eq!(s.auth_failures_user, Some(20));
        assert_eq!(s.auth_window, Duration::from_secs(60));
        assert_eq!(s.max_tracked, 100_000);
        let trusted: Vec<String> = s.trusted.iter().map(ToString::to_string).collect();
        assert_eq!(trusted, ["127.0.0.0/8", "::1/128"]);

        let s = parse(
            "[security]\npike_requests = 0\nauth_failures = 0\nauth_failures_user = 0\n\
             trusted = [\"10.0.0.0/8\", \"2001:db8::1\"]",
        )
        .unwrap()
        .security;
        assert_eq!(s.pike_requests, None, "0 disables the rate limit");
        assert_eq!(s.auth_failures, None);
        assert_eq!(s.auth_failures_user, None);
        assert_eq!(s.trusted.len(), 2);
        assert!(s.trusted[1].contains("2001:db8::1".parse().unwrap()));
        assert!(
            parse("[security]\ntrusted = []")
                .unwrap()
                .security
                .trusted
                .is_empty()
        );
    }

    #[test]
    fn tls_listeners_need_a_certificate_and_its_key() {
        let dir = std::env::temp_dir().join(format!("sipedge-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["sip.example.net".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let (c, k) = (c.display(), k.display());
        let listen = "[server]\nlisten = [\"udp:0.0.0.0:5060\", \"tls:0.0.0.0:5061\"]\n";
        let ok = parse(&format!(
            "{listen}[tls]\ncertificate = \"{c}\"\nprivate_key = \"{k}\"\nca_file = \"{c}\"\n"
        ))
        .unwrap();
        assert_eq!(ok.server.listen[1].proto, Proto::Tls);
        assert!(ok.tls.verify_server, "verified by default");
        assert_eq!(ok.tls.handshake_timeout, Duration::from_secs(5));
        for (text, key) in [
            (listen.to_owned(), "tls.certificate"),
            (
                format!("{listen}[tls]\ncertificate = \"{c}\"\n"),
                "tls.private_key",
            ),
            (
                format!(
                    "{listen}[tls]\ncertificate = \"/nonexistent.pem\"\nprivate_key = \"{k}\"\n"
                ),
                "tls.certificate",
            ),
            // The files swapped: no certificate in the key file, no key in the certificate.
            (
                format!("{listen}[tls]\ncertificate = \"{k}\"\nprivate_key = \"{c}\"\n"),
                "tls.certificate",
            ),
            (
                format!("{listen}[tls]\ncertificate = \"{c}\"\nprivate_key = \"{c}\"\n"),
                "tls.private_key",
            ),
            (
                "[tls]\nca_file = \"/nonexistent.pem\"\n".to_owned(),
                "tls.ca_file",
            ),
            (format!("[tls]\nca_file = \"{k}\"\n"), "tls.ca_file"),
            ("[tls]\nca_file = \"\"\n".to_owned(), "tls.ca_file"),
            (
                "[tls]\nhandshake_timeout = 0\n".to_owned(),
                "tls.handshake_timeout",
            ),
            (
                "[limits]\ntcp_connects = 0\n".to_owned(),
                "limits.tcp_connects",
            ),
            (
                "[limits]\ntcp_connect_timeout = 0\n".to_owned(),
                "limits.tcp_connect_timeout",
            ),
        ] {
            assert_eq!(err_key(&text), key, "{text}");
        }
        // Without a tls: listener nothing is required: the client side uses the system roots.
        let plain = parse("[tls]\nverify_server = false\n").unwrap();
        assert!(!plain.tls.verify_server);
        assert!(plain.tls.certificate.is_none());
        assert_eq!(plain.limits.tcp_connect_timeout, Duration::from_secs(5));
        assert_eq!(plain.limits.tcp_connects, 256);
    }

    #[test]
    fn unknown_keys_are_rejected_in_every_table() {
        for table in [
            "server",
            "database",
            "registrar",
            "auth",
            "nat",
            "media",
            "limits",
            "security",
            "tls",
            "dns",
        ] {
            let text = format!("[{table}]\nbogus_key = 1\n");
            assert_eq!(err_key(&text), format!("{table}.bogus_key"), "{table}");
        }
        let text = "[[route]]\nname='a'\nuser='1'\nnext_hop='h'\nbogus_key=1\n";
        assert_eq!(err_key(text), "route.bogus_key");
        let text = "[[trunk]]\nname='t'\nusername='u'\npassword='p'\nbogus_key=1\n";
        assert_eq!(err_key(text), "trunk.bogus_key");
        assert_eq!(err_key("bogus_top = 1\n"), "bogus_top");
    }

    #[test]
    fn next_hops_parse_as_one_or_a_list() {
        let route = |hop: &str| {
            parse(&format!("[[route]]\nname='a'\nuser='1'\nnext_hop={hop}\n"))
                .unwrap()
                .routes
                .remove(0)
        };
        let r = route("'pbx.example.net'");
        assert_eq!(
            r.next_hops,
            [NextHop {
                host: "pbx.example.net".into(),
                port: None,
                transport: None
            }]
        );
        assert_eq!(r.failover_timeout, Duration::from_secs(2), "the default");
        let r = route(
            "['10.0.0.1:5070', 'sip:backup.example.net;transport=TCP', 'sip:[2001:db8::1]:5062', '[2001:db8::2]']",
        );
        let shown: Vec<String> = r.next_hops.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "10.0.0.1:5070",
                "backup.example.net;transport=tcp",
                "[2001:db8::1]:5062",
                "[2001:db8::2]"
            ]
        );
        assert_eq!(r.next_hops[0].ip(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(r.next_hops[1].transport, Some(Proto::Tcp));
        assert_eq!(r.next_hops[3].port, None);
    }

    #[test]
    fn dns_servers_default_to_port_53_and_the_system_when_empty() {
        let c = parse("[dns]\nservers = ['127.0.0.1', '[::1]:5353']\ntimeout_ms = 300\n").unwrap();
        assert_eq!(
            c.dns.servers,
            [
                "127.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[::1]:5353".parse().unwrap()
            ]
        );
        assert_eq!(c.dns.timeout, Duration::from_millis(300));
        let c = parse("").unwrap();
        assert!(c.dns.servers.is_empty());
        assert_eq!((c.dns.attempts, c.dns.cache_size), (2, 1024));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[media]\nports = \"30001-40000\"", "media.ports"),
            ("[media]\nports = \"40000-30000\"", "media.ports"),
            ("[media]\nports = \"abc\"", "media.ports"),
            ("[media]\nmode = \"sometimes\"", "media.mode"),
            ("[media]\nmax_streams = 0", "media.max_streams"),
            ("[media]\nmax_sessions = 0", "media.max_sessions"),
            (
                "[media]\nmax_sessions_per_caller = 0",
                "media.max_sessions_per_caller",
            ),
            ("[media]\ncdr_spool = \"\"", "media.cdr_spool"),
            ("[media]\nbatch_wait_us = 20001", "media.batch_wait_us"),
            (
                "[server]\nlisten = [\"sctp:1.2.3.4:5060\"]",
                "server.listen",
            ),
            ("[server]\nlisten = [\"udp:1.2.3.4\"]", "server.listen"),
            ("[server]\nadvertise = \"example.com\"", "server.advertise"),
            ("[server]\nmax_message_size = 10", "server.max_message_size"),
            ("[server]\nmax_forwards = 300", "server.max_forwards"),
            ("[server]\nlog_level = \"\"", "server.log_level"),
            (
                "[server]\nlog_level = \"info,sipedge=loud\"",
                "server.log_level",
            ),
            ("[server]\npid_file = \"\"", "server.pid_file"),
            (
                "[server]\nrelay_foreign = \"maybe\"",
                "server.relay_foreign",
            ),
            ("[registrar]\nmin_expires = 4000", "registrar.min_expires"),
            (
                "[registrar]\ndefault_expires = 10",
                "registrar.default_expires",
            ),
            ("[auth]\nalgorithms = [\"SHA-1\"]", "auth.algorithms"),
            ("[limits]\ntcp_connections = 0", "limits.tcp_connections"),
            (
                "[limits]\ntcp_write_timeout = 0",
                "limits.tcp_write_timeout",
            ),
            ("[limits]\ntcp_send_queue = 100", "limits.tcp_send_queue"),
            ("[limits]\ndialogs = 0", "limits.dialogs"),
            ("[limits]\ndialog_max_age = 10", "limits.dialog_max_age"),
            (
                "[limits]\ntransactions_per_ip = 0",
                "limits.transactions_per_ip",
            ),
            ("[auth]\nalgorithms = []", "auth.algorithms"),
            ("[database]\nurl = \"mysql://x\"", "database.url"),
            ("[security]\npike_window = 0", "security.pike_window"),
            ("[security]\nban_time = 0", "security.ban_time"),
            ("[security]\nauth_window = 100000", "security.auth_window"),
            ("[security]\nmax_tracked = 0", "security.max_tracked"),
            (
                "[security]\ntrusted = [\"10.0.0.0/40\"]",
                "security.trusted",
            ),
            (
                "[security]\ntrusted = [\"pbx.example\"]",
                "security.trusted",
            ),
            ("[security]\nauth_failures = -1", "security.auth_failures"),
            (
                "[[route]]\nname='a'\nuser='[0-9'\nnext_hop='h'",
                "route.user",
            ),
            (
                "[[route]]\nname='a'\nuser='1'\nnext_hop='h:0'",
                "route.next_hop",
            ),
            (
                "[[route]]\nname='a'\nuser='1'\nnext_hop=[]",
                "route.next_hop",
            ),
            (
                "[[route]]\nname='a'\nuser='1'\nnext_hop='sip:h;transport=sctp'",
                "route.next_hop",
            ),
            (
                "[[route]]\nname='a'\nuser='1'\nnext_hop=['h', 'bad host']",
                "route.next_hop",
            ),
            (
                "[[route]]\nname='a'\nuser='1'\nnext_hop='h'\nfailover_timeout_ms=0",
                "route.failover_timeout_ms",
            ),
            ("[dns]\nservers = ['resolver.example']", "dns.servers"),
            ("[dns]\ntimeout_ms = 0", "dns.timeout_ms"),
            ("[dns]\nattempts = 0", "dns.attempts"),
            (
                "[[route]]\nname='a'\nuser='1'\nnext_hop='h'\n[[route]]\nname='a'\nuser='1'\nnext_hop='h'",
                "route.name",
            ),
            (
                "[[route]]\nname='a'\nuser='1'\nnext_hop='h'\nidentity='pai'",
                "route.identity",
            ),
            (
                "[[route]]\nname='a'\nuser='1'\nnext_hop='h'\ntrunk='nope'",
                "route.trunk",
            ),
            ("[[trunk]]\nname='t'\nusername='u'", "trunk.password"),
            (
                "[[trunk]]\nname='t'\nusername='u'\npassword='p'\npassword_file='/x'",
                "trunk.password",
            ),
            (
                "[[trunk]]\nname='t'\nusername='u'\npassword='p'\nregister=true",
                "trunk.registrar",
            ),
            (
                "[[trunk]]\nname='t'\nusername='u'\npassword='p'\nregister=true\nregistrar='h'\nregister_expires=5",
                "trunk.register_expires",
            ),
            (
                "[[trunk]]\nname='t'\nusername='u'\npassword='p'\n[[trunk]]\nname='t'\nusername='u'\npassword='p'",
                "trunk.name",
            ),
            (
                "[[trunk]]\nname='t'\nusername='u'\npassword_file='/nonexistent/sipedge-pass'",
                "trunk.password_file",
            ),
        ] {
            assert_eq!(err_key(text), key, "{text}");
        }
    }

    /// The diff of two configurations: live keys take the new value, restart-only keys keep
    /// the running one and are reported; defaults written out are no change.
    #[test]
    fn reload_applies_live_keys_and_keeps_restart_keys() {
        let base = "[server]\nlisten = [\"udp:127.0.0.1:5060\"]\npid_file = \"/run/a.pid\"\n\
                    [[route]]\nname = 'pbx'\nuser = '^1'\nnext_hop = '10.0.0.1'\n";
        let old = parse(base).unwrap();
        let same = parse(&format!(
            "{base}[nat]\nping_interval = 30\n[limits]\ntransactions = 50000\n"
        ))
        .unwrap();
        let r = old.reload(&same).unwrap();
        assert!(r.live.is_empty() && r.restart.is_empty(), "{r:?}");

        let text = "[server]\nlisten = [\"udp:127.0.0.1:5070\"]\nrelay_foreign = \"deny\"\n\
                    log_level = \"debug\"\n[nat]\nping_interval = 10\n\
                    [limits]\ntransactions = 10\ntcp_connections = 5\n\
                    [media]\nidle_timeout = 5\nmode = \"always\"\n[security]\npike_requests = 5\n\
                    [registrar]\nmax_contacts = 2\n\
                    [[route]]\nname = 'pbx'\nuser = '^1'\nnext_hop = '10.0.0.2'\n";
        let new = parse(text).unwrap();
        let r = old.reload(&new).unwrap();
        assert_eq!(
            r.live,
            [
                "limits.transactions",
                "media.mode",
                "nat.ping_interval",
                "registrar.max_contacts",
                "route",
                "security.pike_requests",
                "server.log_level",
                "server.relay_foreign",
            ]
        );
        assert_eq!(
            r.restart,
            [
                "limits.tcp_connections",
                "media.idle_timeout",
                "server.instance_id",
                "server.listen",
                "server.pid_file",
            ]
        );
        let c = &r.config;
        // Live: the new values.
        assert_eq!(c.routes[0].next_hops[0].host, "10.0.0.2");
        assert_eq!(c.server.relay_foreign, RelayForeign::Deny);
        assert_eq!(c.server.log_level.as_deref(), Some("debug"));
        assert_eq!(c.nat.ping_interval, Some(Duration::from_secs(10)));
        assert_eq!(c.limits.transactions, 10);
        assert_eq!(c.media.mode, MediaMode::Always);
        assert_eq!(c.security.pike_requests, Some(5));
        assert_eq!(c.registrar.max_contacts, 2);
        // Restart-only: the running values, also for a key the new file removed.
        assert_eq!(c.server.listen, old.server.listen);
        assert_eq!(c.server.instance_id, "127.0.0.1:5060");
        assert_eq!(c.server.pid_file, Some(PathBuf::from("/run/a.pid")));
        assert_eq!(c.limits.tcp_connections, 4096);
        assert_eq!(c.media.idle_timeout, Duration::from_secs(60));
        // Reading the same file again: nothing more applies, the restart keys still wait.
        let again = r.config.reload(&new).unwrap();
        assert!(again.live.is_empty(), "{again:?}");
        assert_eq!(again.restart, r.restart);
        // Back to the first file: a removed live key returns to its default.
        let back = r.config.reload(&old).unwrap();
        assert!(
            back.live.contains(&"server.log_level".to_owned()),
            "{back:?}"
        );
        assert_eq!(back.config.server.log_level, None);
        assert!(back.restart.is_empty(), "{back:?}");
    }

    /// A live key checked against a restart-only one: the mix must be valid too.
    #[test]
    fn reload_refuses_an_invalid_mix() {
        let old = parse("").unwrap();
        let new = parse("[server]\nmax_message_size = 1024\n[limits]\ntransaction_memory = 3072\n")
            .unwrap();
        let e = old.reload(&new).unwrap_err();
        assert_eq!(e.key(), Some("limits.transaction_memory"), "{e}");
    }

    /// Every live key names a key of the file (a typo here would make a key restart-only).
    #[test]
    fn live_keys_exist() {
        let cfg = parse("[server]\nlog_level = \"info\"").unwrap();
        let table = cfg.effective_table();
        for key in LIVE_KEYS {
            let (t, k) = match key.split_once('.') {
                Some((t, k)) => (t, Some(k)),
                None => (*key, None),
            };
            assert!(value_at(&table, t, k).is_some(), "{key}");
        }
    }

    #[test]
    fn live_config_swaps_whole_and_tells_watchers() {
        let live = LiveConfig::new(Arc::new(parse("").unwrap()));
        let changed = live.subscribe();
        let before = live.load();
        live.store(Arc::new(
            parse("[server]\nrelay_foreign = \"open\"").unwrap(),
        ));
        assert!(changed.has_changed().unwrap());
        assert_eq!(live.load().server.relay_foreign, RelayForeign::Open);
        // A snapshot taken before is unchanged.
        assert_eq!(before.server.relay_foreign, RelayForeign::Authenticated);
    }

    #[test]
    fn log_level_and_pid_file() {
        let cfg = parse("[server]\nlog_level = \"sipedge=debug,info\"\npid_file = \"/run/s.pid\"")
            .unwrap();
        assert_eq!(cfg.server.log_level.as_deref(), Some("sipedge=debug,info"));
        assert_eq!(cfg.server.pid_file, Some(PathBuf::from("/run/s.pid")));
        let cfg = parse("").unwrap();
        assert_eq!((cfg.server.log_level, cfg.server.pid_file), (None, None));
    }

    #[test]
    fn host_port() {
        assert_eq!(
            parse_host_port("pbx.example.net").unwrap(),
            ("pbx.example.net".into(), 5060)
        );
        assert_eq!(
            parse_host_port("10.0.0.5:5080").unwrap(),
            ("10.0.0.5".into(), 5080)
        );
        assert_eq!(
            parse_host_port("[2001:db8::1]:5062").unwrap(),
            ("2001:db8::1".into(), 5062)
        );
        assert!(parse_host_port("bad host:5060").is_err());
    }

    /// `check-config` refuses a database scheme this build cannot open, naming the feature.
    #[test]
    fn database_url_schemes_need_their_feature() {
        assert!(parse("[database]\nurl = \"sqlite://x/y.db\"").is_ok());
        for (url, feature, compiled) in [
            ("postgres://u@h/d", "postgres", cfg!(feature = "postgres")),
            ("postgresql://u@h/d", "postgres", cfg!(feature = "postgres")),
            ("mysql://u@h/d", "mysql", cfg!(feature = "mysql")),
            ("mariadb://u@h/d", "mysql", cfg!(feature = "mysql")),
        ] {
            match parse(&format!("[database]\nurl = \"{url}\"")) {
                Ok(_) => assert!(compiled, "{url}"),
                Err(e) => {
                    assert!(!compiled, "{url}: {e}");
                    let msg = e.to_string();
                    assert!(msg.contains("database.url"), "{msg}");
                    assert!(msg.contains(&format!("--features {feature}")), "{msg}");
                }
            }
        }
        let e = parse("[database]\nurl = \"oracle://h/d\"").unwrap_err();
        assert!(e.to_string().contains("mysql://"), "{e}");
    }

    #[test]
    fn config_search_order() {
        let given = Path::new("/srv/my.toml");
        // -c / SIPEDGE_CONFIG win, even over existing files and when missing themselves.
        assert_eq!(find_config(Some(given), |_| true), Some(given.to_owned()));
        assert_eq!(find_config(Some(given), |_| false), Some(given.to_owned()));
        // Else the checkout's file first, then the package's.
        assert_eq!(
            find_config(None, |_| true),
            Some(PathBuf::from("config/sipedge.toml"))
        );
        assert_eq!(
            find_config(None, |p| p == Path::new("/etc/sipedge/sipedge.toml")),
            Some(PathBuf::from("/etc/sipedge/sipedge.toml"))
        );
        assert_eq!(find_config(None, |_| false), None);
    }

    #[test]
    fn advertise_warning_only_for_an_unreachable_address_picked_automatically() {
        let with_primary = |ip: &str, text: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            Config::from_toml(text, move || ip).unwrap()
        };
        // Picked from the default route: private, CGNAT, link-local and loopback warn.
        for ip in [
            "10.1.2.3",
            "172.16.0.9",
            "192.168.1.20",
            "100.64.0.1",
            "169.254.1.1",
            "127.0.0.1",
            "fd00::1",
            "fe80::1",
        ] {
            let cfg = with_primary(ip, "");
            assert_eq!(cfg.advertise_source(), AdvertiseSource::PrimaryAddress);
            let w = cfg
                .advertise_warning()
                .unwrap_or_else(|| panic!("{ip}: no warning"));
            assert!(w.contains(ip) && w.contains("server.advertise"), "{w}");
        }
        // A public primary address is fine.
        for ip in ["203.0.113.10", "2001:db8::10"] {
            assert_eq!(with_primary(ip, "").advertise_warning(), None, "{ip}");
        }
        // Written in the file: the operator's choice, even if private.
        let cfg = with_primary("10.1.2.3", "[server]\nadvertise = \"192.168.1.20\"");
        assert_eq!(cfg.advertise_source(), AdvertiseSource::Configured);
        assert_eq!(cfg.advertise_warning(), None);
        // From a specific listen address: private warns, loopback is a deliberate local setup.
        let cfg = with_primary("203.0.113.10", "[server]\nlisten = [\"udp:10.0.0.5:5060\"]");
        assert_eq!(cfg.advertise_source(), AdvertiseSource::ListenAddress);
        assert!(cfg.advertise_warning().unwrap().contains("10.0.0.5"));
        let cfg = with_primary(
            "203.0.113.10",
            "[server]\nlisten = [\"udp:127.0.0.1:5060\"]",
        );
        assert_eq!(cfg.advertise_warning(), None);
    }

    /// The open-file limit is checked against what the limits allow: 4 descriptors per relay
    /// session (bounded by media.max_sessions and by the port range), one per TCP connection.
    #[test]
    fn an_open_file_limit_below_the_limits_is_named() {
        let cfg = |text: &str| Config::from_toml(text, || IpAddr::from([203, 0, 113, 10])).unwrap();
        // Defaults: 2,000 sessions x 4 + 4,096 connections + the reserve.
        let defaults = cfg("");
        let need = 4 * 2000 + 4096 + FD_RESERVE;
        assert_eq!(defaults.fd_limit_warning(need), None);
        let w = defaults.fd_limit_warning(need - 1).expect("one short");
        assert!(w.contains(&format!("below the {need} descriptors")), "{w}");
        let w = defaults
            .fd_limit_warning(1024)
            .expect("the default soft limit");
        // (1024 - 4096 - reserve) saturates: nothing fits.
        assert!(w.contains("about 0 relayed calls fit"), "{w}");
        // The port range bounds the sessions: 100 ports hold 25 two-pair sessions.
        let small = cfg(
            "[media]\nports = \"40000-40099\"\nmax_sessions = 5000\n\n[limits]\ntcp_connections = 10",
        );
        assert_eq!(small.fd_limit_warning(4 * 25 + 10 + FD_RESERVE), None);
        let w = small
            .fd_limit_warning(4 * 25 + 10 + FD_RESERVE - 1)
            .expect("one short");
        assert!(
            w.contains("25 relay sessions") && w.contains("about 24 relayed calls"),
            "{w}"
        );
    }
}
