//! Per-leg receiver statistics: packet and byte counters, the extended highest sequence
//! number and cumulative loss (RFC 3550 A.1 and A.3), and interarrival jitter (RFC 3550 A.8,
//! §6.4.1).
//!
//! Owned by one worker as plain integers, fed only with packets the latch accepted, and read
//! as [`LegStats`] snapshots. Pure: the arrival time comes in as a [`Duration`] since the
//! session started.

use std::time::Duration;

use crate::LegStats;

/// RFC 3550 A.1: a jump of fewer than this many sequence numbers is a gap, not a restart.
const MAX_DROPOUT: u16 = 3000;
/// RFC 3550 A.1: a packet up to this many sequence numbers behind is late, not a restart.
const MAX_MISORDER: u16 = 100;
const SEQ_MOD: u64 = 1 << 16;
/// Clock rate used when the SDP gave none (G.711 and most narrowband codecs).
pub(crate) const DEFAULT_CLOCK_RATE: u32 = 8000;

/// RFC 3550 A.1 `source` without probation: the latch has already validated the sender.
#[derive(Debug, Clone)]
struct Source {
    ssrc: u32,
    clock_rate: u32,
    base_seq: u16,
    max_seq: u16,
    /// Shifted count of sequence number wraps (A.1 `cycles`).
    cycles: u64,
    /// The sequence number after a large jump; a packet with it restarts the sequence.
    bad_seq: Option<u16>,
    received: u64,
    /// Relative transit time of the previous packet (A.8), in timestamp units.
    transit: Option<u32>,
    /// A.8 interarrival jitter, in timestamp units.
    jitter: f64,
}

impl Source {
    fn new(ssrc: u32, seq: u16, clock_rate: u32) -> Self {
        Self {
            ssrc,
            clock_rate,
            base_seq: seq,
            max_seq: seq,
            cycles: 0,
            bad_seq: None,
            received: 0,
            transit: None,
            jitter: 0.0,
        }
    }

    /// RFC 3550 A.1 `init_seq`, for the sequence restart case.
    fn restart(&mut self, seq: u16) {
        *self = Self::new(self.ssrc, seq, self.clock_rate);
    }

    /// RFC 3550 A.3: extended highest sequence number received minus the first, plus one.
    fn expected(&self) -> u64 {
        (self.cycles + u64::from(self.max_seq)) - u64::from(self.base_seq) + 1
    }

    /// RFC 3550 A.3 cumulative loss. Duplicates count as received there, so it can go
    /// negative; a negative loss is reported as none.
    fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// RFC 3550 A.1 `update_seq`. Returns false for a packet that is not counted (the first
    /// packet after a large jump, until the next one confirms the new sequence).
    fn update_seq(&mut self, seq: u16) -> Restart {
        let udelta = seq.wrapping_sub(self.max_seq);
        if udelta < MAX_DROPOUT {
            // In order, with a permissible gap; a smaller value means the 16 bits wrapped.
            if seq < self.max_seq {
                self.cycles += SEQ_MOD;
            }
            self.max_seq = seq;
        } else if u64::from(udelta) <= SEQ_MOD - u64::from(MAX_MISORDER) {
            // A very large jump: the sender restarted, or this is a stray packet.
            if self.bad_seq == Some(seq) {
                return Restart::Yes;
            }
            self.bad_seq = Some(seq.wrapping_add(1));
            return Restart::Ignore;
        }
        // Otherwise a duplicate or a reordered packet: counted, no change to max_seq.
        self.received += 1;
        Restart::No
    }

    /// RFC 3550 A.8: `arrival` and `timestamp` in the same clock units.
    fn update_jitter(&mut self, arrival: u32, timestamp: u32) {
        let transit = arrival.wrapping_sub(timestamp);
        if let Some(prev) = self.transit {
            // Reinterpreting as signed is A.8's `int d`: the difference of two wrapping values.
            let d = (transit.wrapping_sub(prev) as i32).unsigned_abs();
            self.jitter += (f64::from(d) - self.jitter) / 16.0;
        }
        self.transit = Some(transit);
    }
}

enum Restart {
    No,
    Yes,
    Ignore,
}

/// RTP receiver state for one leg of one stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct RtpReceiver {
    source: Option<Source>,
    /// Loss of earlier SSRCs and of sequences before a restart, kept across resets.
    lost_before: u64,
}

impl RtpReceiver {
    /// Feeds one accepted RTP packet. `arrival` is the time since the session started.
    pub(crate) fn record(
        &mut self,
        seq: u16,
        timestamp: u32,
        ssrc: u32,
        arrival: Duration,
        clock_rate: u32,
    ) {
        let clock_rate = if clock_rate == 0 {
            DEFAULT_CLOCK_RATE
        } else {
            clock_rate
        };
        let src = match &mut self.source {
            Some(s) if s.ssrc == ssrc => s,
            other => {
                // RFC 3550 A.1: a new SSRC is a new source; keep what the old one lost.
                if let Some(old) = other.take() {
                    self.lost_before += old.lost();
                }
                other.insert(Source::new(ssrc, seq, clock_rate))
            }
        };
        if src.clock_rate != clock_rate {
            // A codec change after a re-INVITE: transit times in the old units are meaningless.
            src.clock_rate = clock_rate;
            src.transit = None;
            src.jitter = 0.0;
        }
        match src.update_seq(seq) {
            Restart::No => {}
            Restart::Ignore => return,
            Restart::Yes => {
                self.lost_before += src.lost();
                src.restart(seq);
                src.received = 1;
            }
        }
        src.update_jitter(arrival_units(arrival, clock_rate), timestamp);
    }

    /// Cumulative packets lost (RFC 3550 A.3), over every SSRC seen on this leg.
    pub(crate) fn lost(&self) -> u64 {
        self.lost_before + self.source.as_ref().map_or(0, Source::lost)
    }

    /// Current interarrival jitter of the current source, in milliseconds.
    pub(crate) fn jitter_ms(&self) -> f64 {
        self.source
            .as_ref()
            .map_or(0.0, |s| s.jitter * 1000.0 / f64::from(s.clock_rate))
    }
}

/// A time since the session start in RTP timestamp units, wrapping like a timestamp does.
fn arrival_units(t: Duration, clock_rate: u32) -> u32 {
    let rate = u64::from(clock_rate);
    let whole = t.as_secs().wrapping_mul(rate);
    let frac = u64::from(t.subsec_nanos()) * rate / 1_000_000_000;
    // Truncation is the point: timestamps are modulo 2^32.
    whole.wrapping_add(frac) as u32
}

/// Everything counted for one leg of one stream: packets received from the side it faces.
#[derive(Debug, Clone, Default)]
pub(crate) struct LegCounters {
    pub(crate) pkts: u64,
    pub(crate) bytes: u64,
    pub(crate) rtcp_pkts: u64,
    pub(crate) rtcp_bytes: u64,
    pub(crate) dropped: u64,
    /// Of `dropped`: from a source the side never signalled (a sprayer, a hijack attempt).
    pub(crate) strangers: u64,
    pub(crate) rtp: RtpReceiver,
}

impl LegCounters {
    /// Adds this leg into a per-session total: counters add up, jitter is the maximum.
    pub(crate) fn add_to(&self, total: &mut LegStats) {
        total.pkts += self.pkts;
        total.bytes += self.bytes;
        total.lost += self.rtp.lost();
        total.jitter_ms = total.jitter_ms.max(self.rtp.jitter_ms());
        total.rtcp_pkts += self.rtcp_pkts;
        total.rtcp_bytes += self.rtcp_bytes;
        total.dropped += self.dropped;
        total.strangers += self.strangers;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS20: Duration = Duration::from_millis(20);

    /// Feeds (seq, timestamp, arrival) triples with one SSRC at 8 kHz.
    fn feed(r: &mut RtpReceiver, pkts: &[(u16, u32, Duration)]) {
        for &(seq, ts, at) in pkts {
            r.record(seq, ts, 0x1234, at, 8000);
        }
    }

    /// A 20 ms / 160-sample stream with the given sequence numbers, each arriving on time.
    fn on_time(seqs: &[u16]) -> Vec<(u16, u32, Duration)> {
        seqs.iter()
            .map(|&s| (s, u32::from(s) * 160, MS20 * u32::from(s)))
            .collect()
    }

    #[test]
    fn in_order_stream_has_no_loss_and_no_jitter() {
        let mut r = RtpReceiver::default();
        feed(&mut r, &on_time(&(0..50).collect::<Vec<_>>()));
        assert_eq!(r.lost(), 0);
        assert_eq!(r.jitter_ms(), 0.0);
    }

    #[test]
    fn one_gap_counts_the_missing_packets() {
        let mut r = RtpReceiver::default();
        // 10, 11, [12, 13 lost], 14, 15
        feed(&mut r, &on_time(&[10, 11, 14, 15]));
        assert_eq!(r.lost(), 2);
    }

    #[test]
    fn reordering_is_not_loss() {
        let mut r = RtpReceiver::default();
        feed(&mut r, &on_time(&[1, 2, 4, 3, 5]));
        assert_eq!(r.lost(), 0);
        // Reordered and then lost for good: 7 never comes.
        feed(&mut r, &on_time(&[6, 8, 9]));
        assert_eq!(r.lost(), 1);
    }

    #[test]
    fn sequence_wrap_extends_the_sequence_number() {
        let mut r = RtpReceiver::default();
        // 65533, 65534, [65535 lost], 0, [1 lost], 2
        for (i, seq) in [65533u16, 65534, 0, 2].into_iter().enumerate() {
            r.record(seq, 0, 9, MS20 * i as u32, 8000);
        }
        let s = r.source.as_ref().unwrap();
        assert_eq!(s.cycles, SEQ_MOD);
        assert_eq!(s.expected(), 6);
        assert_eq!(r.lost(), 2);
    }

    #[test]
    fn duplicates_count_as_received_per_rfc_3550_a3() {
        let mut r = RtpReceiver::default();
        feed(&mut r, &on_time(&[1, 2, 2, 3]));
        // Expected 3, received 4: "negative loss" reported as 0.
        assert_eq!(r.lost(), 0);
        // A duplicate masks one real loss: expected 5, received 5.
        feed(&mut r, &on_time(&[5]));
        assert_eq!(r.lost(), 0);
        feed(&mut r, &on_time(&[7]));
        assert_eq!(r.lost(), 1);
    }

    #[test]
    fn ssrc_change_resets_the_sequence_but_keeps_past_loss() {
        let mut r = RtpReceiver::default();
        feed(&mut r, &on_time(&[1, 3])); // one lost
        r.record(40_000, 0, 0x9999, MS20 * 4, 8000);
        r.record(40_001, 160, 0x9999, MS20 * 5, 8000);
        assert_eq!(r.lost(), 1);
        r.record(40_003, 480, 0x9999, MS20 * 7, 8000);
        assert_eq!(r.lost(), 2);
    }

    #[test]
    fn large_jump_needs_two_packets_to_restart() {
        let mut r = RtpReceiver::default();
        feed(&mut r, &on_time(&[1, 2, 3]));
        // A stray packet far ahead is ignored: no loss of 19997 packets.
        r.record(20_000, 0, 0x1234, MS20 * 4, 8000);
        assert_eq!(r.lost(), 0);
        // Two in a row: the sender restarted its sequence.
        r.record(30_000, 0, 0x1234, MS20 * 5, 8000);
        r.record(30_001, 160, 0x1234, MS20 * 6, 8000);
        assert_eq!(r.lost(), 0);
        assert_eq!(r.source.as_ref().unwrap().base_seq, 30_001);
    }

    #[test]
    fn jitter_hand_worked_example() {
        let mut r = RtpReceiver::default();
        // 8 kHz, timestamps 160 apart; arrivals at 0, 20, 45, 60 ms.
        // Arrival units: 0, 160, 360, 480. Transit: 0, 0, 40, 0.
        // D: 0, 40, 40 → J = 0; 40/16 = 2.5; 2.5 + (40 - 2.5)/16 = 4.84375 units.
        feed(
            &mut r,
            &[
                (0, 0, Duration::ZERO),
                (1, 160, Duration::from_millis(20)),
                (2, 320, Duration::from_millis(45)),
                (3, 480, Duration::from_millis(60)),
            ],
        );
        let j = r.source.as_ref().unwrap().jitter;
        assert!((j - 4.843_75).abs() < 1e-9, "{j}");
        // 4.84375 units at 8000 Hz = 0.60546875 ms.
        assert!((r.jitter_ms() - 0.605_468_75).abs() < 1e-9);
    }

    #[test]
    fn jitter_uses_the_stream_clock_rate_and_default() {
        let mut r = RtpReceiver::default();
        // 48 kHz, 960 samples per 20 ms, one packet 10 ms late: D = 480 units.
        r.record(0, 0, 1, Duration::ZERO, 48_000);
        r.record(1, 960, 1, Duration::from_millis(30), 48_000);
        assert!((r.jitter_ms() - 480.0 / 16.0 / 48.0).abs() < 1e-9);
        // Clock rate 0 means 8000.
        let mut r = RtpReceiver::default();
        r.record(0, 0, 1, Duration::ZERO, 0);
        r.record(1, 160, 1, Duration::from_millis(30), 0);
        assert!((r.jitter_ms() - 80.0 / 16.0 / 8.0).abs() < 1e-9);
    }

    #[test]
    fn arrival_units_wrap_like_timestamps() {
        assert_eq!(arrival_units(Duration::from_millis(20), 8000), 160);
        assert_eq!(arrival_units(Duration::from_micros(62_500), 48_000), 3000);
        // 536871 s × 8000 = 2^32 + 704.
        let wrap = Duration::from_secs(536_871);
        assert_eq!(arrival_units(wrap, 8000), 704);
        // A stream across the wrap (88 ms before `wrap`) keeps zero jitter.
        let mut r = RtpReceiver::default();
        for i in 0..10u32 {
            let t = wrap - MS20 * 5 + MS20 * i;
            r.record(i as u16, 7 + i * 160, 1, t, 8000);
        }
        assert_eq!(r.jitter_ms(), 0.0);
    }
}
