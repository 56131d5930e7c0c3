//! Symmetric RTP latching (RFC 4961; the "comedia" behaviour RFC 4145 §4 names) with strict
//! sources: which source address a leg accepts packets from, and where packets for that side go.
//!
//! Policy: a leg latches only to a packet whose source IP is one its side signalled — the
//! `c=`/`a=rtcp` address of its SDP or the address its SIP came from ([`Allowed`]); the port
//! may be anything, because a NAT rewrites it. The SIP source beats the SDP address for a NATed
//! phone that writes its private address into SDP. Once latched, packets from any other
//! source are dropped (rtpengine's `strict-source`), except inside a short window after new SDP
//! from that side (re-INVITE, UPDATE, a port change), when a packet from the latched IP or from
//! a newly signalled one re-latches. A host that never signalled can neither take a leg nor
//! receive its media. RTP and RTCP latch independently. Pure: `now` is a parameter.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

/// How long after new SDP from a side a new source may take over its leg. rtpengine waits
/// 3 s after signalling; 2 s covers a phone that changes its port on unhold while keeping the
/// window short (and only signalled IPs may use it).
pub(crate) const RELATCH_WINDOW: Duration = Duration::from_secs(2);

/// How many source IPs a leg accepts: the SDP RTP and RTCP addresses and up to two SIP sources.
const MAX_ALLOWED: usize = 4;

/// The source IPs a side signalled for a stream: where its packets may come from.
/// Unspecified addresses (`0.0.0.0`, RFC 2543 hold) are never allowed. Copy, no allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Allowed {
    ips: [Option<IpAddr>; MAX_ALLOWED],
}

impl Allowed {
    /// The set of `ips`, without unspecified addresses and duplicates; beyond
    /// [`MAX_ALLOWED`] distinct addresses the rest are ignored (the media layer passes at most
    /// four: SDP RTP, SDP RTCP, SIP source).
    pub(crate) fn new(ips: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut out = Self::default();
        let mut n = 0;
        for ip in ips {
            let ip = canonical(ip);
            if ip.is_unspecified() || out.contains(ip) || n == MAX_ALLOWED {
                continue;
            }
            out.ips[n] = Some(ip);
            n += 1;
        }
        out
    }

    /// Whether `ip` was signalled.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.ips.iter().flatten().any(|a| *a == ip)
    }
}

/// An IPv4-mapped IPv6 address (a dual-stack socket) compares as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The latch decision for one valid packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Latch {
    /// From the latched source: accept.
    Keep,
    /// Accept and latch to this source from now on.
    Learn(SocketAddr),
    /// From a stranger: an IP the side never signalled, or another source than the latched
    /// one outside the re-latch window. Drop.
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

/// Decides what to do with a valid packet from `src` given the leg's latch state and the
/// source IPs its side signalled.
pub(crate) fn decide(now: Instant, src: SocketAddr, latch: &PeerLatch, allowed: &Allowed) -> Latch {
    match latch.peer {
        Some(p) if p.addr == src => Latch::Keep,
        None if allowed.contains(src.ip()) => Latch::Learn(src),
        None => Latch::Drop,
        // RFC 3264 §8: new SDP may move the media; only to the same host or a signalled one.
        Some(p)
            if latch.relatch_until.is_some_and(|until| now < until)
                && (canonical(p.addr.ip()) == canonical(src.ip())
                    || allowed.contains(src.ip())) =>
        {
            Latch::Learn(src)
        }
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The phone signalled 198.51.100.7 (SDP) and its SIP came from 192.0.2.50 (its NAT).
    fn phone() -> Allowed {
        Allowed::new([ip("198.51.100.7"), ip("198.51.100.7"), ip("192.0.2.50")])
    }

    fn step(now: Instant, src: &str, l: &mut PeerLatch, allowed: &Allowed) -> Latch {
        let d = decide(now, addr(src), l, allowed);
        l.apply(d, 30000);
        d
    }

    #[test]
    fn allowed_set_skips_unspecified_and_duplicates() {
        let a = Allowed::new([
            ip("0.0.0.0"),
            ip("198.51.100.7"),
            ip("198.51.100.7"),
            ip("::"),
            ip("2001:db8::1"),
        ]);
        assert!(a.contains(ip("198.51.100.7")));
        assert!(a.contains(ip("2001:db8::1")));
        assert!(!a.contains(ip("0.0.0.0")), "hold address is no source");
        assert!(!a.contains(ip("198.51.100.8")));
        // A dual-stack socket reports IPv4 peers as mapped addresses.
        assert!(a.contains(ip("::ffff:198.51.100.7")));
        assert!(!Allowed::default().contains(ip("127.0.0.1")));
        // At most four distinct addresses.
        let many = Allowed::new((1..=6).map(|i| IpAddr::from([10, 0, 0, i])));
        assert!(many.contains(ip("10.0.0.4")));
        assert!(!many.contains(ip("10.0.0.5")));
    }

    #[test]
    fn first_packet_from_a_signalled_ip_latches_and_strangers_are_dropped() {
        let t0 = Instant::now();
        let mut l = PeerLatch::default();
        let a = phone();
        // A sprayer that never signalled cannot take the leg, before or after the phone.
        assert_eq!(step(t0, "203.0.113.66:4000", &mut l, &a), Latch::Drop);
        assert!(l.peer.is_none());
        assert_eq!(
            step(t0, "198.51.100.7:4000", &mut l, &a),
            Latch::Learn(addr("198.51.100.7:4000"))
        );
        assert_eq!(
            step(
                t0 + Duration::from_millis(20),
                "198.51.100.7:4000",
                &mut l,
                &a
            ),
            Latch::Keep
        );
        // Same host, other port: a stranger too once latched.
        assert_eq!(
            step(
                t0 + Duration::from_millis(40),
                "198.51.100.7:4002",
                &mut l,
                &a
            ),
            Latch::Drop
        );
        assert_eq!(
            step(t0 + Duration::from_secs(60), "203.0.113.1:5000", &mut l, &a),
            Latch::Drop
        );
        assert_eq!(l.peer.unwrap().addr, addr("198.51.100.7:4000"));
        assert_eq!(l.peer.unwrap().via_port, 30000);
    }

    #[test]
    fn the_sip_source_latches_a_natted_phone_on_any_port() {
        let t0 = Instant::now();
        let mut l = PeerLatch::default();
        // SDP says 10.0.0.5 (private); the packets come from the NAT's public address.
        let a = Allowed::new([ip("10.0.0.5"), ip("192.0.2.50")]);
        assert_eq!(
            step(t0, "192.0.2.50:61000", &mut l, &a),
            Latch::Learn(addr("192.0.2.50:61000"))
        );
    }

    #[test]
    fn nothing_latches_before_the_side_signalled() {
        let t0 = Instant::now();
        let mut l = PeerLatch::default();
        assert_eq!(
            step(t0, "198.51.100.7:4000", &mut l, &Allowed::default()),
            Latch::Drop
        );
    }

    #[test]
    fn relatch_window_after_update_accepts_only_the_same_or_a_signalled_ip() {
        let t0 = Instant::now();
        let mut l = PeerLatch::default();
        step(t0, "198.51.100.7:4000", &mut l, &phone());
        // New SDP at t0+10s moves the phone to 198.51.100.9.
        let sig = t0 + Duration::from_secs(10);
        let moved = Allowed::new([ip("198.51.100.9"), ip("192.0.2.50")]);
        l.open_window(sig);
        // The old source is still fine inside the window and does not close it.
        assert_eq!(
            step(
                sig + Duration::from_millis(10),
                "198.51.100.7:4000",
                &mut l,
                &moved
            ),
            Latch::Keep
        );
        // A stranger inside the window is still a stranger.
        assert_eq!(
            step(
                sig + Duration::from_millis(20),
                "203.0.113.66:4000",
                &mut l,
                &moved
            ),
            Latch::Drop
        );
        assert_eq!(
            step(
                sig + Duration::from_millis(500),
                "198.51.100.9:6000",
                &mut l,
                &moved
            ),
            Latch::Learn(addr("198.51.100.9:6000"))
        );
        // The window closed with the re-latch: the old source is now a stranger.
        assert_eq!(
            step(
                sig + Duration::from_millis(520),
                "198.51.100.7:4000",
                &mut l,
                &moved
            ),
            Latch::Drop
        );
    }

    #[test]
    fn relatch_from_the_same_ip_on_a_new_port() {
        let t0 = Instant::now();
        let mut l = PeerLatch::default();
        step(t0, "198.51.100.7:4000", &mut l, &phone());
        // Unhold from a new port; the SDP still names the same host.
        l.open_window(t0 + Duration::from_secs(5));
        assert_eq!(
            step(
                t0 + Duration::from_secs(6),
                "198.51.100.7:6000",
                &mut l,
                &phone()
            ),
            Latch::Learn(addr("198.51.100.7:6000"))
        );
    }

    #[test]
    fn relatch_window_expires() {
        let t0 = Instant::now();
        let mut l = PeerLatch::default();
        let a = phone();
        step(t0, "198.51.100.7:4000", &mut l, &a);
        l.open_window(t0);
        assert_eq!(
            step(t0 + RELATCH_WINDOW, "198.51.100.7:6000", &mut l, &a),
            Latch::Drop
        );
        assert_eq!(
            step(
                t0 + RELATCH_WINDOW - Duration::from_millis(1),
                "198.51.100.7:6000",
                &mut l,
                &a
            ),
            Latch::Learn(addr("198.51.100.7:6000"))
        );
    }

    #[test]
    fn rtp_and_rtcp_latch_independently() {
        let t0 = Instant::now();
        let (mut rtp, mut rtcp) = (PeerLatch::default(), PeerLatch::default());
        let a = phone();
        step(t0, "198.51.100.7:4000", &mut rtp, &a);
        // RTCP from its own port latches its own peer, not rejected as a stranger to RTP.
        assert_eq!(
            step(t0, "198.51.100.7:4001", &mut rtcp, &a),
            Latch::Learn(addr("198.51.100.7:4001"))
        );
        assert_eq!(rtp.peer.unwrap().addr, addr("198.51.100.7:4000"));
    }
}
