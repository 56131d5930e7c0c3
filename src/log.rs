//! Security events: one `warn` line each, in a stable format that fail2ban (or any log
//! shipper) can match, rate-limited per call site so that a flood cannot flood the log too.
//!
//! Format (tracing's default formatter):
//!
//! ```text
//! 2026-12-04T15:50:00.123456Z  WARN sipedge::security: security event security.event=auth_failed peer.ip=203.0.113.7 peer.addr=203.0.113.7:5060 ...
//! ```
//!
//! `security.event` names the kind (snake case), `peer.ip` the source address; further fields
//! depend on the kind. `suppressed` counts the lines of that call site held back since the
//! last one that was written.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Lets one line per second through for one call site and counts the others.
#[derive(Debug, Default)]
pub struct LogLimit {
    second: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// A limiter (for a `static`).
    pub const fn new() -> Self {
        Self {
            second: AtomicU64::new(u64::MAX),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` when a line may be written in second `now`.
    pub fn allow_at(&self, now: u64) -> Option<u64> {
        let prev = self.second.load(Relaxed);
        if prev != now
            && self
                .second
                .compare_exchange(prev, now, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }

    /// [`LogLimit::allow_at`] with the current second of the process's monotonic clock
    /// (logging is I/O: it may read the clock; protocol code stays clock-free).
    pub fn allow(&self) -> Option<u64> {
        static START: OnceLock<tokio::time::Instant> = OnceLock::new();
        let start = *START.get_or_init(tokio::time::Instant::now);
        self.allow_at(start.elapsed().as_secs())
    }
}

/// Logs one security event: `security_event!("kind", peer_socket_addr, field = value, ...)`.
/// At most one line per second per call site; the rest are counted in `suppressed`.
#[macro_export]
macro_rules! security_event {
    ($kind:expr, $peer:expr $(, $($rest:tt)*)?) => {{
        static LIMIT: $crate::log::LogLimit = $crate::log::LogLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            let peer: ::std::net::SocketAddr = $peer;
            let ip = peer.ip();
            // No parent span: nothing a peer controls (a Call-ID in a span) comes before
            // `peer.ip` in the line, where fail2ban reads it.
            ::tracing::event!(
                target: "sipedge::security",
                parent: None,
                ::tracing::Level::WARN,
                {
                    security.event = $kind,
                    peer.ip = %ip,
                    peer.addr = %peer,
                    suppressed,
                    $($($rest)*)?
                },
                "security event"
            );
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::LogLimit;

    #[test]
    fn one_line_per_second_and_a_count_of_the_rest() {
        let l = LogLimit::new();
        assert_eq!(l.allow_at(100), Some(0));
        assert_eq!(l.allow_at(100), None);
        assert_eq!(l.allow_at(100), None);
        assert_eq!(l.allow_at(101), Some(2), "reports what it held back");
        assert_eq!(l.allow_at(101), None);
        assert_eq!(l.allow_at(105), Some(1));
        // Second 0 is a second like the others.
        let l = LogLimit::new();
        assert_eq!(l.allow_at(0), Some(0));
        assert_eq!(l.allow_at(0), None);
    }
}
