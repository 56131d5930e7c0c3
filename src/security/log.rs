//! The security event lines: one `warn!` each, target `sipedge::security`, message
//! `security event`, fields in a fixed order (`security.event`, `peer.ip`, `peer.addr`, then
//! the others), so that fail2ban and log pipelines can rely on them:
//!
//! ```text
//! WARN sipedge::security: security event security.event="auth_failed" peer.ip=192.0.2.7 peer.addr=192.0.2.7:5060 auth.user=alice auth.realm=example.com reason="password"
//! ```
//!
//! Repetitive kinds (`auth_failed`, `user_locked`, `nonce_replay`) are rate limited to one
//! line per second per kind; the next line written says how many were held back
//! (`suppressed`). `ban` lines are not limited: there is at most one per source and
//! `ban_time`, and fail2ban needs every one.

use std::fmt::Arguments;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{Level, event};

/// The rate-limited kinds.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    AuthFailed = 0,
    UserLocked = 1,
    NonceReplay = 2,
}

/// One line per second per kind, counting the rest.
#[derive(Debug)]
struct Throttle {
    /// Whole seconds since `EventLog::base` of the last line written, plus one (0 = never).
    second: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    const fn new() -> Self {
        Self {
            second: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be written in `second`.
    fn allow(&self, second: u64) -> Option<u64> {
        let stamp = second + 1;
        let prev = self.second.load(Relaxed);
        if prev != stamp
            && self
                .second
                .compare_exchange(prev, stamp, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

/// Writes the security event lines.
#[derive(Debug)]
pub(super) struct EventLog {
    base: Instant,
    throttles: [Throttle; 3],
    /// Lines held back since start.
    suppressed_total: AtomicU64,
}

impl EventLog {
    pub(super) fn new(base: Instant) -> Self {
        Self {
            base,
            throttles: [Throttle::new(), Throttle::new(), Throttle::new()],
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed)` when a line of `kind` may be written now.
    fn allow(&self, kind: Kind, now: Instant) -> Option<u64> {
        let second = now.saturating_duration_since(self.base).as_secs();
        let r = self.throttles[kind as usize].allow(second);
        if r.is_none() {
            self.suppressed_total.fetch_add(1, Relaxed);
        }
        r
    }

    pub(super) fn suppressed(&self) -> u64 {
        self.suppressed_total.load(Relaxed)
    }

    pub(super) fn ban(&self, peer: SocketAddr, reason: &str, ban: Duration, limit: &Arguments<'_>) {
        event!(
            target: "sipedge::security",
            Level::WARN,
            security.event = "ban",
            peer.ip = %peer.ip(),
            peer.addr = %peer,
            reason,
            ban_s = ban.as_secs(),
            limit = %limit,
            "security event"
        );
    }

    pub(super) fn auth_failed(
        &self,
        peer: SocketAddr,
        user: &str,
        realm: &str,
        reason: &str,
        now: Instant,
    ) {
        let Some(suppressed) = self.allow(Kind::AuthFailed, now) else {
            return;
        };
        event!(
            target: "sipedge::security",
            Level::WARN,
            security.event = "auth_failed",
            peer.ip = %peer.ip(),
            peer.addr = %peer,
            auth.user = %user,
            auth.realm = %realm,
            reason,
            suppressed,
            "security event"
        );
    }

    pub(super) fn user_locked(
        &self,
        peer: SocketAddr,
        user: &str,
        realm: &str,
        left_s: u64,
        now: Instant,
    ) {
        let Some(suppressed) = self.allow(Kind::UserLocked, now) else {
            return;
        };
        event!(
            target: "sipedge::security",
            Level::WARN,
            security.event = "user_locked",
            peer.ip = %peer.ip(),
            peer.addr = %peer,
            auth.user = %user,
            auth.realm = %realm,
            locked_s = left_s,
            suppressed,
            "security event"
        );
    }

    /// The line written when a user becomes locked (not rate limited: once per `ban_time`).
    pub(super) fn user_lock(
        &self,
        peer: SocketAddr,
        user: &str,
        realm: &str,
        ban: Duration,
        limit: u32,
        window: Duration,
    ) {
        event!(
            target: "sipedge::security",
            Level::WARN,
            security.event = "user_lock",
            peer.ip = %peer.ip(),
            peer.addr = %peer,
            auth.user = %user,
            auth.realm = %realm,
            locked_s = ban.as_secs(),
            limit = %format_args!("{limit} failed authentications in {} s", window.as_secs()),
            "security event"
        );
    }

    pub(super) fn nonce_replay(
        &self,
        peer: SocketAddr,
        user: &str,
        realm: &str,
        nc: u32,
        now: Instant,
    ) {
        let Some(suppressed) = self.allow(Kind::NonceReplay, now) else {
            return;
        };
        event!(
            target: "sipedge::security",
            Level::WARN,
            security.event = "nonce_replay",
            peer.ip = %peer.ip(),
            peer.addr = %peer,
            auth.user = %user,
            auth.realm = %realm,
            nc,
            suppressed,
            "security event"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn one_line_per_second_and_kind() {
        let t = Throttle::new();
        assert_eq!(t.allow(0), Some(0), "second 0 is a second like the others");
        assert_eq!(t.allow(0), None);
        assert_eq!(t.allow(0), None);
        assert_eq!(t.allow(1), Some(2), "reports what it held back");
        assert_eq!(t.allow(1), None);
        assert_eq!(t.allow(5), Some(1));
    }
}
