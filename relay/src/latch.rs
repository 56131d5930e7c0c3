//! Symmetric RTP latching (RFC 4961; the "comedia" behaviour RFC 4145 §4 names): which source
//! address a leg accepts packets from, and where packets for that side go.
//!
//! Policy: the first valid packet latches the leg to its source. The source beats the SDP
//! address, because a NATed phone writes its private address into SDP. Afterwards packets from
//! any other source are dropped (strict source, so a stranger cannot hijack the media), except
//! inside a short window after new SDP from that side (re-INVITE, UPDATE, a port change), when
//! the first valid packet from a new source re-latches. RTP and RTCP latch independently.
//! Pure: `now` is a parameter.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// How long after new SDP from a side a new source may take over its leg. rtpengine waits
/// 3 s after signalling; 2 s covers a phone that changes its port on unhold while keeping a
/// stranger's chance to inject media short.
pub(crate) const RELATCH_WINDOW: Duration = Duration::from_secs(2);

/// The latch decision for one valid packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Latch {
    /// From the latched source: accept.
    Keep,
    /// Accept and latch to this source from now on.
    Learn(SocketAddr),
    /// From a stranger outside the re-latch window: drop.
    Drop,
}

/// The learnt peer of one leg for one kind of packet (RTP or RTCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Latched {
    /// The peer's real source address.
    pub(crate) addr: SocketAddr,
    /// The local port it sent to: packets for it go out of that socket (with rtcp-mux, RTCP
    /// arrives on the RTP port and must be answered from there).
    pub(crate) via_port: u16,
}

/// Latch state of one leg for one kind of packet.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PeerLatch {
    pub(crate) peer: Option<Latched>,
    /// End of the re-latch window opened by the last SDP from this side.
    pub(crate) relatch_until: Option<Instant>,
}

/// Decides what to do with a valid packet from `src` given the leg's latch state.
pub(crate) fn decide(now: Instant, src: SocketAddr, latch: &PeerLatch) -> Latch {
    match latch.peer {
        None => Latch::Learn(src),
        Some(p) if p.addr == src => Latch::Keep,
        Some(_) if latch.relatch_until.is_some_and(|until| now < until) => Latch::Learn(src),
        Some(_) => Latch::Drop,
    }
}

impl PeerLatch {
    /// New SDP from this side: a new source may take over until `now + RELATCH_WINDOW`.
    pub(crate) fn open_window(&mut self, now: Instant) {
        self.relatch_until = Some(now + RELATCH_WINDOW);
    }

    /// Applies a decision. Learning closes the window: the new source is the one the new SDP
    /// announced, and a second newcomer is as suspect as any stranger.
    pub(crate) fn apply(&mut self, decision: Latch, via_port: u16) {
        if let Latch::Learn(addr) = decision {
            self.peer = Some(Latched { addr, via_port });
            self.relatch_until = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn step(now: Instant, src: &str, l: &mut PeerLatch) -> Latch {
        let d = decide(now, addr(src), l);
        l.apply(d, 30000);
        d
    }

    #[test]
    fn first_packet_latches_and_strangers_are_dropped() {
        let t0 = Instant::now();
        let mut l = PeerLatch::default();
        assert_eq!(
            step(t0, "198.51.100.7:4000", &mut l),
            Latch::Learn(addr("198.51.100.7:4000"))
        );
        assert_eq!(
            step(t0 + Duration::from_millis(20), "198.51.100.7:4000", &mut l),
            Latch::Keep
        );
        // Same host, other port: a stranger too.
        assert_eq!(
            step(t0 + Duration::from_millis(40), "198.51.100.7:4002", &mut l),
            Latch::Drop
        );
        assert_eq!(
            step(t0 + Duration::from_secs(60), "203.0.113.1:5000", &mut l),
            Latch::Drop
        );
        assert_eq!(l.peer.unwrap().addr, addr("198.51.100.7:4000"));
        assert_eq!(l.peer.unwrap().via_port, 30000);
    }

    #[test]
    fn relatch_window_after_update() {
        let t0 = Instant::now();
        let mut l = PeerLatch::default();
        step(t0, "198.51.100.7:4000", &mut l);
        // New SDP at t0+10s: within 2 s a new source takes over.
        let sig = t0 + Duration::from_secs(10);
        l.open_window(sig);
        // The old source is still fine inside the window and does not close it.
        assert_eq!(
            step(sig + Duration::from_millis(10), "198.51.100.7:4000", &mut l),
            Latch::Keep
        );
        assert_eq!(
            step(
                sig + Duration::from_millis(500),
                "198.51.100.7:6000",
                &mut l
            ),
            Latch::Learn(addr("198.51.100.7:6000"))
        );
        // The window closed with the re-latch: the old source is now a stranger,
        // and so is a second newcomer.
        assert_eq!(
            step(
                sig + Duration::from_millis(520),
                "198.51.100.7:4000",
                &mut l
            ),
            Latch::Drop
        );
        assert_eq!(
            step(sig + Duration::from_millis(540), "203.0.113.9:1", &mut l),
            Latch::Drop
        );
    }

    #[test]
    fn relatch_window_expires() {
        let t0 = Instant::now();
        let mut l = PeerLatch::default();
        step(t0, "198.51.100.7:4000", &mut l);
        l.open_window(t0);
        assert_eq!(
            step(t0 + RELATCH_WINDOW, "198.51.100.7:6000", &mut l),
            Latch::Drop
        );
        assert_eq!(
            step(
                t0 + RELATCH_WINDOW - Duration::from_millis(1),
                "198.51.100.7:6000",
                &mut l
            ),
            Latch::Learn(addr("198.51.100.7:6000"))
        );
    }

    #[test]
    fn rtp_and_rtcp_latch_independently() {
        let t0 = Instant::now();
        let (mut rtp, mut rtcp) = (PeerLatch::default(), PeerLatch::default());
        step(t0, "198.51.100.7:4000", &mut rtp);
        // RTCP from its own port latches its own peer, not rejected as a stranger to RTP.
        assert_eq!(
            step(t0, "198.51.100.7:4001", &mut rtcp),
            Latch::Learn(addr("198.51.100.7:4001"))
        );
        assert_eq!(rtp.peer.unwrap().addr, addr("198.51.100.7:4000"));
    }
}
