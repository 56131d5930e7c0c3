//! sipedge: a SIP edge proxy, registrar and RTP media relay in one process.
//!
//! # Layout
//!
//! - [`config`]: the TOML file → a validated [`config::Config`]; every error names its key.
//! - [`sip`]: messages as received bytes plus an index; typed views of the headers a proxy
//!   needs; targeted rewrites; locally generated responses. Pure.
//! - [`proxy`]: the request pipeline (sanity, local replies, routing) as a sans-IO core.
//! - [`transport`]: UDP and TCP sockets, stream framing, the send path. Only moves bytes.
//! - [`registrar`]: REGISTER processing (pure decision), the location service, the async
//!   service that authenticates, writes through to the store and answers.
//! - [`nat`]: far-end NAT detection (nathelper's tests, pure) and keepalives to NATed bindings.
//! - [`media`]: SDP offer/answer rewrite (pure) and the media session of each relayed dialog,
//!   driving the in-process relay engine (the `sipedge-relay` crate) through its channel API.
//! - [`acc`]: accounting: one `cdr` row per call (which calls, the dialogs waiting for their
//!   BYE); relayed calls are written by [`media`] with their media figures.
//! - [`dns`]: next hops by name (RFC 3263: NAPTR, SRV with priority and weight, A/AAAA)
//!   through hickory-resolver's TTL cache; the selection rules are pure ([`dns::select`]).
//! - [`store`]: sqlx on SQLite (default) or PostgreSQL: subscribers, location, CDRs.
//! - [`auth`]: digest authentication (RFC 7616/8760) and stateless nonces. Pure.
//! - [`security`]: per-source rate limit and bans, failed-authentication bans and user locks,
//!   the security event log lines. Pure.
//! - [`clock`]: the only reader of clocks.
//! - [`log`]: security events (one stable, rate-limited `warn` line each, for fail2ban).
//! - [`heap`]: returns freed heap to the system once a burst is over (glibc `malloc_trim`).
//! - [`app`]: the wiring of a running server (store, location, listeners, registrar, relay).
//!
//! Protocol logic never reads a socket or a clock: the transport layer feeds bytes to
//! [`proxy::pipeline::Core::handle`] and sends what it returns.

pub mod acc;
pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
pub mod control;
pub mod dns;
pub mod driver;
/// Entry points for the fuzz targets (`fuzz/`) into crate-private pure code. Not a stable API.
#[doc(hidden)]
pub mod fuzzing;
pub mod heap;
pub mod log;
pub mod media;
pub mod metrics;
pub mod nat;
pub mod proxy;
pub mod registrar;
pub mod security;
pub mod sip;
pub mod store;
pub mod transaction;
pub mod transport;
pub mod trunk;
