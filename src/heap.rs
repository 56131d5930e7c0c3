//! Giving freed heap back to the system after a burst (issue #15, "memory returned after the
//! load").
//!
//! glibc keeps what the process frees in its arenas for reuse. A call burst leaves the heap at
//! its high-water mark: every transaction is held 32 s by the RFC 3261/6026 timers and then
//! freed, but the freed chunks are scattered between survivors, so the top of each arena
//! rarely shrinks and the resident size stays where the burst left it. Every
//! [`CHECK_EVERY`] the trimmer reads the allocator's counters; when at least half the arena
//! bytes are free (the load has dropped) and more was freed since the last trim, it asks
//! glibc to return the free pages (`malloc_trim(0)`, `sipedge_relay::heap`).
//!
//! The decision ([`Policy`]) is pure; [`run`] is the thin periodic task around it. The check
//! is not made under a steady load: there the free share stays low, and trimming pages that
//! the next transactions fault back in would cost CPU for nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use sipedge_relay::heap::{self, Info};
use tracing::info;

use crate::metrics::Registry;

/// How often the allocator's counters are read.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// Free arena bytes below this are not worth a trim.
const MIN_FREE: usize = 8 << 20;
/// After a trim, this much more must be freed before the next one (a trim of an idle process
/// would find the same free chunks again: their pages are already returned).
const MIN_GROWTH: usize = 8 << 20;

/// When to trim: pure, fed with the allocator's counters at each check.
#[derive(Debug, Default)]
pub struct Policy {
    /// The fewest free bytes seen since the last trim (0 before the first): what was freed
    /// since is the growth over it.
    low: usize,
    /// Bytes in use at the last trim (`None` before the first).
    used: Option<usize>,
}

impl Policy {
    /// Whether to trim now: enough free bytes, at least half the arenas free (the load has
    /// dropped), and since the last trim either at least [`MIN_GROWTH`] more freed or the
    /// bytes in use halved. (The second catches a trim made while a burst was still being
    /// freed: the few survivors it found pinned whole pages of free chunks, and when they go
    /// later they free few bytes but unpin many pages.)
    pub fn due(&mut self, heap: Info) -> bool {
        self.low = self.low.min(heap.free);
        let used = heap.arena.saturating_sub(heap.free);
        heap.free >= MIN_FREE
            && heap.free.saturating_mul(2) >= heap.arena
            && (heap.free >= self.low.saturating_add(MIN_GROWTH)
                || self.used.is_some_and(|u| used.saturating_mul(2) <= u))
    }

    /// A trim was made with `heap` as counted before it: its free chunks are returned.
    pub fn trimmed(&mut self, heap: Info) {
        self.low = heap.free;
        self.used = Some(heap.arena.saturating_sub(heap.free));
    }
}

/// The trimmer's counters.
#[derive(Debug, Default)]
pub struct Stats {
    trims: AtomicU64,
    returned: AtomicU64,
}

impl Stats {
    /// `heap_*` gauges and counters (the allocator's own counters are read at each scrape).
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        m.gauge(
            "heap_arena_bytes",
            "Bytes the C allocator holds from the system for small allocations (all arenas).",
            || heap::info().map_or(0, |h| h.arena as u64),
        );
        m.gauge(
            "heap_free_bytes",
            "Of heap_arena_bytes, bytes free (kept by the allocator for reuse).",
            || heap::info().map_or(0, |h| h.free as u64),
        );
        // The registry holds the counters (strongly): the trimmer runs as long as it lives.
        let s = self.clone();
        m.counter(
            "heap_trims",
            "Times free heap pages were returned to the system after the load dropped.",
            move || s.trims.load(Relaxed),
        );
        let s = self.clone();
        m.counter(
            "heap_returned_bytes",
            "Resident bytes given back by those trims.",
            move || s.returned.load(Relaxed),
        );
    }
}

/// The periodic check, until `stats` is dropped with the server's metrics registry.
pub async fn run(stats: std::sync::Weak<Stats>) {
    let mut policy = Policy::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(stats) = stats.upgrade() else { return };
        let (Some(info), Some(before)) = (heap::info(), resident_bytes()) else {
            // Not glibc, or no /proc: nothing to read, nothing to trim.
            return;
        };
        if !policy.due(info) {
            continue;
        }
        // The walk holds each arena's lock for a few milliseconds: off the runtime's workers.
        let trimmed = tokio::task::spawn_blocking(heap::trim)
            .await
            .unwrap_or(false);
        let after = resident_bytes().unwrap_or(before);
        policy.trimmed(info);
        if trimmed {
            let returned = before.saturating_sub(after);
            stats.trims.fetch_add(1, Relaxed);
            stats.returned.fetch_add(returned, Relaxed);
            info!(
                rss_before_mb = before >> 20,
                rss_after_mb = after >> 20,
                heap_free_mb = info.free >> 20,
                "heap: free memory returned to the system"
            );
        }
    }
}

/// This process's resident set size (`VmRSS` in /proc/self/status).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    fn info(arena_mb: usize, free_mb: usize) -> Info {
        Info {
            arena: arena_mb * MB,
            free: free_mb * MB,
            mmapped: 0,
        }
    }

    #[test]
    fn trims_once_the_load_has_dropped() {
        let mut p = Policy::default();
        // Steady load: most of the arena in use.
        assert!(!p.due(info(400, 60)));
        // A small process with everything free: not worth it.
        assert!(!p.due(info(10, 6)));
        // The burst is ending: most of a large arena is free.
        assert!(p.due(info(400, 300)));
        p.trimmed(info(400, 300));
        // Idle afterwards: the same free chunks, already returned.
        assert!(!p.due(info(400, 305)));
        // The last transactions of the burst expire: freed since the trim.
        assert!(p.due(info(400, 390)));
        p.trimmed(info(400, 390));
        // A second burst takes the memory again, then frees it.
        assert!(!p.due(info(400, 100)));
        assert!(!p.due(info(400, 110)));
        assert!(p.due(info(400, 380)));
    }

    #[test]
    fn trims_again_when_the_survivors_of_a_burst_go() {
        let mut p = Policy::default();
        // Trimmed while the burst's last transactions still lived (11 MB in use).
        assert!(p.due(info(36, 25)));
        p.trimmed(info(36, 25));
        // They expire: few bytes freed (less than MIN_GROWTH), but the use fell to 2.5 MB.
        assert!(p.due(info(36, 33)));
        p.trimmed(info(36, 33));
        // Idle: nothing changes, no trim.
        assert!(!p.due(info(36, 33)));
        assert!(!p.due(info(36, 34)));
    }

    #[test]
    fn reads_its_own_resident_size() {
        let rss = resident_bytes().expect("Linux has /proc/self/status");
        assert!(rss > 1 << 20, "{rss}");
    }
}
