//! When a worker waits a little before looking for more packets: wake-up coalescing.
//!
//! At moderate rates a wake-up carries one or two packets, and the wake-up costs more than
//! the forwarding: the epoll return, the context switch, and — paid by the sender on the
//! local path — waking the receiver of every datagram sent (`perf` at 50,000 packets/s, 100
//! calls: a quarter of the relay's CPU in `sock_def_readable` waking the peer). A worker that
//! sees two packets or more arriving per `wait` sleeps until `wait` after its wake-up before
//! polling again: the packets of that interval come in one round, and each socket's are sent
//! in one `sendmmsg`. Sparse traffic (a few calls) never waits, and neither does a worker
//! near its limit (busy more than a quarter of the time). The cost is latency: at most
//! `wait` per relayed packet, a fraction of a jitter buffer (20-60 ms). Measured with
//! `scripts/bench/media.sh`, 100 calls at 50 kpps: 9.84 → 7.50 µs per packet, median latency
//! 0.1 → 0.9 ms (README "Benchmarks"). Pure: time is a parameter.

use std::time::Duration;

use tokio::time::Instant;

/// Packets a round must promise per `wait` (at the rate of the last round) before a wait
/// pays: the wait itself is one wake-up (the timer's), so it must save more than one.
const WORTH: u64 = 2;

/// A worker busy for more than one part in this many of the time between its wake-ups does
/// not wait. The round's own time leaves out what the kernel does for the worker outside it
/// (its epoll wait, the wake-ups, the interrupts), about as much again near the limit.
const BUSY_SHARE: u32 = 4;

/// The coalescing decision of one worker.
#[derive(Debug)]
pub(crate) struct Pace {
    /// Zero: never wait.
    wait: Duration,
    /// The previous round's wake-up.
    last: Option<Instant>,
}

impl Pace {
    pub(crate) fn new(wait: Duration) -> Self {
        Self { wait, last: None }
    }

    /// A round woke at `woke`, received `packets` and was done with them at `done`: until
    /// when to sleep before polling again, or `None` to poll at once. Waits when
    /// - the packets of this round, over the time since the previous wake-up, come at
    ///   [`WORTH`] or more per `wait` (fewer: the wait would cost more wake-ups than it saves);
    /// - and the worker's round took at most a [`BUSY_SHARE`]th of that time. Near its limit
    ///   a worker's rounds batch by themselves, and every microsecond it sleeps with packets
    ///   waiting grows its queues and their latency (measured: at 250,000 packets/s a 1 ms
    ///   wait with no such limit took the median latency from 0.2 to 1.9 ms and saved no
    ///   CPU; with half of the time as the limit, still 1.7 → 2.5 ms at 164,000/s).
    pub(crate) fn after_round(
        &mut self,
        woke: Instant,
        done: Instant,
        packets: u64,
    ) -> Option<Instant> {
        let last = self.last.replace(woke);
        if self.wait.is_zero() || packets == 0 {
            return None;
        }
        let gap = woke.saturating_duration_since(last?);
        // packets / gap >= WORTH / wait, in integer nanoseconds (no overflow below 2^64 ns).
        let dense =
            u128::from(packets) * self.wait.as_nanos() >= u128::from(WORTH) * gap.as_nanos();
        let busy = done.saturating_duration_since(woke);
        (dense && busy * BUSY_SHARE <= gap).then_some(woke + self.wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// A round of `packets` at `at` that took 10 us.
    fn round(p: &mut Pace, at: Instant, packets: u64) -> Option<Instant> {
        p.after_round(at, at + us(10), packets)
    }

    #[test]
    fn dense_traffic_waits_until_the_interval_after_the_wake_up() {
        let t0 = Instant::now();
        let mut p = Pace::new(us(250));
        // The first round has no rate to go by.
        assert_eq!(round(&mut p, t0, 3), None);
        // 3 packets in 40 us: 18 per 250 us.
        let woke = t0 + us(40);
        assert_eq!(round(&mut p, woke, 3), Some(woke + us(250)));
        // After the wait: 12 packets in 260 us keeps it waiting.
        let woke = woke + us(260);
        assert_eq!(round(&mut p, woke, 12), Some(woke + us(250)));
    }

    #[test]
    fn sparse_traffic_never_waits() {
        let t0 = Instant::now();
        let mut p = Pace::new(us(250));
        round(&mut p, t0, 1);
        // One packet per 20 ms (one call's stream).
        assert_eq!(round(&mut p, t0 + Duration::from_millis(20), 1), None);
        // One packet per 200 us: 1.25 per wait, below what a wait costs.
        round(&mut p, t0 + us(20_200), 1);
        assert_eq!(round(&mut p, t0 + us(20_400), 1), None);
        // Exactly two per wait waits.
        assert!(round(&mut p, t0 + us(20_650), 2).is_some());
    }

    #[test]
    fn a_busy_worker_never_waits() {
        let t0 = Instant::now();
        let mut p = Pace::new(us(1000));
        p.after_round(t0, t0 + us(50), 40);
        // 40 packets 200 us after the previous wake-up, 51 us of work: over a quarter busy.
        let woke = t0 + us(200);
        assert_eq!(p.after_round(woke, woke + us(51), 40), None);
        // A quarter busy still waits.
        let woke = woke + us(200);
        assert_eq!(
            p.after_round(woke, woke + us(50), 40),
            Some(woke + us(1000))
        );
    }

    #[test]
    fn an_empty_round_or_a_zero_wait_never_waits() {
        let t0 = Instant::now();
        let mut p = Pace::new(us(250));
        round(&mut p, t0, 5);
        // A round woken by the doorbell or a timeout, no packet.
        assert_eq!(round(&mut p, t0 + us(10), 0), None);
        let mut off = Pace::new(Duration::ZERO);
        round(&mut off, t0, 50);
        assert_eq!(round(&mut off, t0 + us(10), 50), None);
    }
}
