//! The only place that reads clocks. Protocol code takes `now` as a parameter; the I/O side
//! gets it from a [`Clock`], so tests can use a fixed one.

use std::time::{SystemTime, UNIX_EPOCH};

/// Time sources for the I/O side.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time (tokio's, so that tests can pause it).
    fn now(&self) -> tokio::time::Instant;
    /// Wall time, for Expires in the store, nonce stamps and CDRs.
    fn wall(&self) -> SystemTime;

    /// Wall time as unix seconds.
    fn unix(&self) -> u64 {
        self.wall()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// The real clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }

    #[allow(clippy::disallowed_methods)] // this is the one sanctioned reader of wall time
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}
