//! Floods and password guessing: a per-source rate limit with temporary bans (Kamailio's
//! `pike` + `htable` bans), failed authentications counted per source and per user with a
//! ban or lock after too many, and the security event log lines fail2ban reads.
//!
//! - [`cidr`]: `security.trusted` networks, and the per-source key (an IPv6 source counts as
//!   its /64).
//! - [`Security`]: the shared state: one bounded map of sources, one of users, counters.
//!
//! Pure: no socket, no clock. Every call takes `now` (tokio's `Instant`, so tests run on
//! virtual time); the maps are `DashMap`s (sharded locks), cheap enough for
//! [`Security::allow`] to run on every received message.
//!
//! Every security event is one `warn!` line with target `sipedge::security`, the message
//! `security event` and the fields `security.event`, `peer.ip`, `peer.addr`, then the
//! others (see [`log`]); the file `scripts/fail2ban/sipedge.conf` matches them.

pub mod cidr;
mod log;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

pub use cidr::Cidr;
use log::EventLog;

use crate::metrics::{Kind, Registry};

/// `[security]`, validated.
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// `None` = no per-source rate limit.
    pub pike_requests: Option<u32>,
    pub pike_window: Duration,
    pub ban_time: Duration,
    /// `None` = sources are never banned for failed authentication.
    pub auth_failures: Option<u32>,
    /// `None` = users are never locked.
    pub auth_failures_user: Option<u32>,
    pub auth_window: Duration,
    pub trusted: Vec<Cidr>,
    /// ≥ 1.
    pub max_tracked: usize,
}

impl SecurityConfig {
    /// `security.trusted` holds `ip`: never rate limited or banned, and inside our trust
    /// domain for identity headers (RFC 3325 §5, [`crate::proxy::forward::IdentityEdit`]).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }
}

/// Sweeps of a full map run at most this often, so a flood of new sources (spoofed UDP) does
/// not turn each packet into a scan of the whole map.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What is known about one source (an IPv4 address or an IPv6 /64).
#[derive(Debug, Clone, Copy)]
struct Source {
    /// Rate limit state (GCRA, the token bucket written as one time): the "theoretical
    /// arrival time" of the next message if the source sent at exactly the allowed rate.
    tat: Instant,
    /// Failed authentications counted since `fails_since`.
    fails: u32,
    fails_since: Instant,
    /// Banned until then: every packet dropped.
    banned_until: Option<Instant>,
}

impl Source {
    fn new(now: Instant) -> Self {
        Self {
            tat: now,
            fails: 0,
            fails_since: now,
            banned_until: None,
        }
    }

    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|u| now < u)
    }

    /// Nothing left to remember: not banned, rate budget full, no failure in the window.
    fn idle(&self, now: Instant, auth_window: Duration) -> bool {
        !self.banned(now)
            && self.tat <= now
            && (self.fails == 0 || now >= self.fails_since + auth_window)
    }
}

/// What is known about one user (`user@domain`).
#[derive(Debug, Clone, Copy)]
struct User {
    fails: u32,
    fails_since: Instant,
    locked_until: Option<Instant>,
}

impl User {
    fn locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|u| now < u)
    }

    fn idle(&self, now: Instant, auth_window: Duration) -> bool {
        !self.locked(now) && (self.fails == 0 || now >= self.fails_since + auth_window)
    }
}

/// A snapshot of the counters (for `show`, tests and the attack suite).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SecurityStats {
    /// Sources (IPv4 addresses, IPv6 /64s) tracked now.
    pub sources_tracked: usize,
    /// Sources banned now.
    pub bans_active: usize,
    /// Users locked now.
    pub users_locked: usize,
    /// Bans since start for exceeding the rate limit.
    pub bans_pike: u64,
    /// Bans since start for failed authentications.
    pub bans_auth: u64,
    /// Locks of a user since start.
    pub user_locks: u64,
    /// Messages dropped because their source was banned (the message that triggered a
    /// rate-limit ban included).
    pub dropped: u64,
    /// Failed authentications since start (trusted sources included).
    pub auth_failures: u64,
    /// Authentication attempts refused because the user was locked.
    pub auth_refused_locked: u64,
    /// New sources let through untracked because the source map was full of active ones.
    pub untracked: u64,
    /// Security event lines held back by the log rate limit.
    pub log_suppressed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    bans_pike: AtomicU64,
    bans_auth: AtomicU64,
    user_locks: AtomicU64,
    dropped: AtomicU64,
    auth_failures: AtomicU64,
    auth_refused_locked: AtomicU64,
    untracked: AtomicU64,
}

/// What [`Security::auth_failed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureVerdict {
    /// The source is now banned.
    pub source_banned: bool,
    /// The user is now locked.
    pub user_locked: bool,
}

/// The thresholds in force, swapped whole by a reload ([`Security::set_config`]).
#[derive(Debug)]
struct Params {
    cfg: SecurityConfig,
    /// GCRA emission interval: `pike_window / pike_requests`.
    interval: Duration,
    /// GCRA burst tolerance: `pike_window - interval` (a burst of `pike_requests` passes).
    tolerance: Duration,
}

impl Params {
    fn new(cfg: SecurityConfig) -> Self {
        let (interval, tolerance) = match cfg.pike_requests {
            Some(n) => {
                let interval = cfg.pike_window / n;
                (interval, cfg.pike_window.saturating_sub(interval))
            }
            None => (Duration::ZERO, Duration::ZERO),
        };
        Self {
            cfg,
            interval,
            tolerance,
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.cfg.is_trusted(ip)
    }

    /// GCRA: whether a message at `now` fits the rate; if so, charges it.
    fn conforms(&self, tat: &mut Instant, now: Instant) -> bool {
        let t = (*tat).max(now);
        if t - now > self.tolerance {
            return false;
        }
        *tat = t + self.interval;
        true
    }
}

/// The shared flood and brute-force state. One per server, shared by the transport entry
/// point (rate limit, bans) and the authenticator (failures, locks).
#[derive(Debug)]
pub struct Security {
    /// Each call reads one snapshot of them, without a lock.
    params: arc_swap::ArcSwap<Params>,
    /// The time `last_sweep_*` are counted from.
    base: Instant,
    sources: DashMap<IpAddr, Source>,
    /// Approximate `sources.len()` (exact after each sweep), read without locking shards.
    sources_len: AtomicUsize,
    last_sweep_sources: AtomicU64,
    users: DashMap<String, User>,
    users_len: AtomicUsize,
    last_sweep_users: AtomicU64,
    counters: Counters,
    log: EventLog,
}

impl Security {
    /// Empty state; `now` is any instant before the first call.
    pub fn new(cfg: SecurityConfig, now: Instant) -> Self {
        Self {
            params: arc_swap::ArcSwap::from_pointee(Params::new(cfg)),
            base: now,
            sources: DashMap::new(),
            sources_len: AtomicUsize::new(0),
            last_sweep_sources: AtomicU64::new(0),
            users: DashMap::new(),
            users_len: AtomicUsize::new(0),
            last_sweep_users: AtomicU64::new(0),
            counters: Counters::default(),
            log: EventLog::new(now),
        }
    }

    /// New thresholds (a reload): they apply from the next call on. What is under way is
    /// kept: bans and locks run to their end, counts go on against the new limits.
    pub fn set_config(&self, cfg: SecurityConfig) {
        self.params.store(Arc::new(Params::new(cfg)));
    }

    /// True when `ip` is in `security.trusted`.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.params.load().is_trusted(ip)
    }

    /// Whether a message just received from `peer` is processed (`false`: drop it silently).
    /// Counts it against the source's rate; a source over `pike_requests` per `pike_window`
    /// is banned for `ban_time`. Called for every received message, before parsing.
    pub fn allow(&self, peer: SocketAddr, now: Instant) -> bool {
        let p = self.params.load();
        let ip = peer.ip();
        if p.is_trusted(ip) {
            return true;
        }
        let key = cidr::source_key(ip);
        let pike = p.cfg.pike_requests;
        match self.sources.get_mut(&key) {
            Some(mut s) => {
                if s.banned(now) {
                    self.counters.dropped.fetch_add(1, Relaxed);
                    return false;
                }
                if s.banned_until.take().is_some() {
                    // A ban that ended starts again with a full budget.
                    s.tat = now;
                }
                if pike.is_none() || p.conforms(&mut s.tat, now) {
                    return true;
                }
                s.banned_until = Some(now + p.cfg.ban_time);
            }
            None => {
                if pike.is_some() {
                    // The first message always conforms (pike_requests ≥ 1). Without a rate
                    // limit there is nothing to count: a source gets an entry with its first
                    // failed authentication.
                    let mut s = Source::new(now);
                    p.conforms(&mut s.tat, now);
                    self.insert_source(&p, key, s, now);
                }
                return true;
            }
        }
        self.counters.bans_pike.fetch_add(1, Relaxed);
        self.counters.dropped.fetch_add(1, Relaxed);
        let limit = format_args!(
            "{} messages per {} s",
            pike.unwrap_or_default(),
            p.cfg.pike_window.as_secs()
        );
        self.log.ban(peer, "pike", p.cfg.ban_time, &limit);
        false
    }

    /// Whether `ip` is banned now, without counting anything: for the TCP accept loop, to
    /// close a banned source's new connections at once.
    pub fn is_banned(&self, ip: IpAddr, now: Instant) -> bool {
        !self.params.load().is_trusted(ip)
            && self
                .sources
                .get(&cidr::source_key(ip))
                .is_some_and(|s| s.banned(now))
    }

    fn insert_source(&self, p: &Params, key: IpAddr, s: Source, now: Instant) -> bool {
        if self.sources_len.load(Relaxed) >= p.cfg.max_tracked {
            self.sweep_sources(p, now);
            if self.sources_len.load(Relaxed) >= p.cfg.max_tracked {
                self.counters.untracked.fetch_add(1, Relaxed);
                return false;
            }
        }
        if self.sources.insert(key, s).is_none() {
            self.sources_len.fetch_add(1, Relaxed);
        }
        true
    }

    /// Forgets idle sources, at most once per [`SWEEP_EVERY`].
    fn sweep_sources(&self, p: &Params, now: Instant) {
        if !self.sweep_due(&self.last_sweep_sources, now) {
            return;
        }
        let window = p.cfg.auth_window;
        self.sources.retain(|_, s| !s.idle(now, window));
        self.sources_len.store(self.sources.len(), Relaxed);
    }

    fn sweep_users(&self, p: &Params, now: Instant) {
        if !self.sweep_due(&self.last_sweep_users, now) {
            return;
        }
        let window = p.cfg.auth_window;
        self.users.retain(|_, u| !u.idle(now, window));
        self.users_len.store(self.users.len(), Relaxed);
    }

    /// True (and the sweep time set) when the last sweep is [`SWEEP_EVERY`] old.
    fn sweep_due(&self, last: &AtomicU64, now: Instant) -> bool {
        // Stored as milliseconds since `base` plus one, so that 0 means "never".
        let stamp = millis(now.saturating_duration_since(self.base)).saturating_add(1);
        let prev = last.load(Relaxed);
        (prev == 0 || stamp >= prev.saturating_add(millis(SWEEP_EVERY)))
            && last.compare_exchange(prev, stamp, Relaxed, Relaxed).is_ok()
    }

    /// Whether authentication as `user@domain` is refused now (the user is locked after too
    /// many failures). A refused attempt is logged (`user_locked`) and counted. Trusted
    /// sources are never refused.
    pub fn user_locked(
        &self,
        peer: SocketAddr,
        user: &str,
        domain: &str,
        realm: &str,
        now: Instant,
    ) -> bool {
        let p = self.params.load();
        if p.cfg.auth_failures_user.is_none() || p.is_trusted(peer.ip()) {
            return false;
        }
        let key = user_key(user, domain);
        let until = match self.users.get(&key) {
            Some(u) if u.locked(now) => u.locked_until,
            _ => return false,
        };
        self.counters.auth_refused_locked.fetch_add(1, Relaxed);
        let left = until.map_or(0, |u| u.saturating_duration_since(now).as_secs());
        self.log.user_locked(peer, user, realm, left, now);
        true
    }

    /// Records a failed authentication as `username` from `peer` and logs it (`auth_failed`,
    /// with `reason`). `known_domain` is the user's domain when the user exists: failures of
    /// unknown users are counted per source only, so that made-up names cannot fill the user
    /// map. Bans the source after `auth_failures` within `auth_window`, locks the user after
    /// `auth_failures_user`; either count starts again after its ban or lock. Trusted sources
    /// are logged, never counted.
    pub fn auth_failed(
        &self,
        peer: SocketAddr,
        username: &str,
        known_domain: Option<&str>,
        realm: &str,
        reason: &'static str,
        now: Instant,
    ) -> FailureVerdict {
        let p = self.params.load();
        self.counters.auth_failures.fetch_add(1, Relaxed);
        self.log.auth_failed(peer, username, realm, reason, now);
        let mut verdict = FailureVerdict::default();
        if p.is_trusted(peer.ip()) {
            return verdict;
        }
        let window = p.cfg.auth_window;
        if let Some(limit) = p.cfg.auth_failures {
            let key = cidr::source_key(peer.ip());
            let ban = {
                let mut fresh = None;
                let mut entry = self.sources.get_mut(&key);
                let s = match entry.as_deref_mut() {
                    Some(s) => s,
                    None => fresh.insert(Source::new(now)),
                };
                let ban = count_failure(&mut s.fails, &mut s.fails_since, limit, window, now)
                    && !s.banned(now);
                if ban {
                    s.banned_until = Some(now + p.cfg.ban_time);
                    s.fails = 0;
                }
                drop(entry);
                if let Some(s) = fresh {
                    self.insert_source(&p, key, s, now);
                }
                ban
            };
            if ban {
                verdict.source_banned = true;
                self.counters.bans_auth.fetch_add(1, Relaxed);
                let limit =
                    format_args!("{limit} failed authentications in {} s", window.as_secs());
                self.log.ban(peer, "auth", p.cfg.ban_time, &limit);
            }
        }
        if let (Some(limit), Some(domain)) = (p.cfg.auth_failures_user, known_domain) {
            let key = user_key(username, domain);
            let lock = {
                if !self.users.contains_key(&key)
                    && self.users_len.load(Relaxed) >= p.cfg.max_tracked
                {
                    self.sweep_users(&p, now);
                }
                if self.users_len.load(Relaxed) >= p.cfg.max_tracked
                    && !self.users.contains_key(&key)
                {
                    false
                } else {
                    let mut entry = self.users.entry(key).or_insert_with(|| {
                        self.users_len.fetch_add(1, Relaxed);
                        User {
                            fails: 0,
                            fails_since: now,
                            locked_until: None,
                        }
                    });
                    let u = &mut *entry;
                    let lock = count_failure(&mut u.fails, &mut u.fails_since, limit, window, now)
                        && !u.locked(now);
                    if lock {
                        u.locked_until = Some(now + p.cfg.ban_time);
                        u.fails = 0;
                    }
                    lock
                }
            };
            if lock {
                verdict.user_locked = true;
                self.counters.user_locks.fetch_add(1, Relaxed);
                self.log
                    .user_lock(peer, username, realm, p.cfg.ban_time, limit, window);
            }
        }
        verdict
    }

    /// A successful authentication: the source's and the user's failure counts start again.
    pub fn auth_ok(&self, peer: SocketAddr, user: &str, domain: &str) {
        if let Some(mut s) = self.sources.get_mut(&cidr::source_key(peer.ip())) {
            s.fails = 0;
        }
        if self.params.load().cfg.auth_failures_user.is_some()
            && let Some(mut u) = self.users.get_mut(&user_key(user, domain))
        {
            u.fails = 0;
        }
    }

    /// Logs a digest nonce count seen twice (a captured request replayed).
    pub fn nonce_replay(&self, peer: SocketAddr, user: &str, realm: &str, nc: u32, now: Instant) {
        self.log.nonce_replay(peer, user, realm, nc, now);
    }

    /// Registers the security counters; the gauges walk the maps at each read.
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        type Field = fn(&SecurityStats) -> u64;
        let values: [(&str, &str, Kind, Field); 11] = [
            (
                "security_sources_tracked",
                "Sources (IPv4 addresses, IPv6 /64s) tracked.",
                Kind::Gauge,
                |s| s.sources_tracked as u64,
            ),
            (
                "security_bans_active",
                "Sources banned now.",
                Kind::Gauge,
                |s| s.bans_active as u64,
            ),
            (
                "security_users_locked",
                "Users locked now.",
                Kind::Gauge,
                |s| s.users_locked as u64,
            ),
            (
                "security_bans_pike",
                "Bans for exceeding the rate limit.",
                Kind::Counter,
                |s| s.bans_pike,
            ),
            (
                "security_bans_auth",
                "Bans for failed authentications.",
                Kind::Counter,
                |s| s.bans_auth,
            ),
            (
                "security_user_locks",
                "Locks of a user.",
                Kind::Counter,
                |s| s.user_locks,
            ),
            (
                "security_dropped",
                "Messages dropped because their source was banned.",
                Kind::Counter,
                |s| s.dropped,
            ),
            (
                "security_auth_failures",
                "Failed authentications.",
                Kind::Counter,
                |s| s.auth_failures,
            ),
            (
                "security_auth_refused_locked",
                "Authentications refused because the user was locked.",
                Kind::Counter,
                |s| s.auth_refused_locked,
            ),
            (
                "security_untracked",
                "New sources let through untracked because the map was full.",
                Kind::Counter,
                |s| s.untracked,
            ),
            (
                "security_log_suppressed",
                "Security event lines held back by the log rate limit.",
                Kind::Counter,
                |s| s.log_suppressed,
            ),
        ];
        for (name, help, kind, field) in values {
            let sec = Arc::downgrade(self);
            m.labelled(name, help, kind, &[], move || {
                sec.upgrade().map_or(0, |s| field(&s.stats(Instant::now())))
            });
        }
    }

    /// The counters now. Walks both maps: for `show` and tests, not for every packet.
    pub fn stats(&self, now: Instant) -> SecurityStats {
        let c = &self.counters;
        SecurityStats {
            sources_tracked: self.sources.len(),
            bans_active: self.sources.iter().filter(|s| s.banned(now)).count(),
            users_locked: self.users.iter().filter(|u| u.locked(now)).count(),
            bans_pike: c.bans_pike.load(Relaxed),
            bans_auth: c.bans_auth.load(Relaxed),
            user_locks: c.user_locks.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            auth_failures: c.auth_failures.load(Relaxed),
            auth_refused_locked: c.auth_refused_locked.load(Relaxed),
            untracked: c.untracked.load(Relaxed),
            log_suppressed: self.log.suppressed(),
        }
    }
}

/// Adds one failure to a fixed-window count; true when it reaches `limit`.
fn count_failure(
    fails: &mut u32,
    since: &mut Instant,
    limit: u32,
    window: Duration,
    now: Instant,
) -> bool {
    if now >= *since + window {
        *fails = 0;
        *since = now;
    }
    *fails = fails.saturating_add(1);
    *fails >= limit
}

fn user_key(user: &str, domain: &str) -> String {
    let mut k = String::with_capacity(user.len() + 1 + domain.len());
    k.push_str(user);
    k.push('@');
    k.push_str(&domain.to_ascii_lowercase());
    k
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
