//! The relay core of one worker, sans I/O: for each datagram, where it goes (symmetric RTP,
//! RFC 4961; rtcp-mux, RFC 5761), and on each tick, which sessions have timed out.
//!
//! `on_packet(now, local_port, src, bytes)` validates the packet through the RTP/RTCP views,
//! applies the latch policy, counts it (RFC 3550 A.1/A.3/A.8) and returns a [`Verdict`]: send the
//! same bytes out of the other leg's socket of the same kind, to the other side's latched
//! address (or its SDP address until it has sent anything), or drop. Session deadlines live in
//! an expiry index that is updated lazily: a packet only moves `last_activity`, and `on_tick`
//! re-files a session whose real deadline has moved on (mini-redis `db.rs`).
//! Pure: no socket, no clock.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

use crate::latch::{self, Allowed, Latch};
use crate::rtp::{RtcpView, RtpView, is_misdirected_rtcp, looks_like_rtcp};
use crate::session::{Leg, Sdp, Session, Table};
use crate::{
    CloseReason, Closed, Endpoint, RelayError, SessionId, SessionStats, Side, StreamPorts,
};

/// The three session timeouts (see [`crate::RelayConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Answered session, no accepted packet from either side for this long.
    pub idle: Duration,
    /// Never answered for this long after allocation.
    pub offer: Duration,
    /// Like `idle`, while the call is on hold.
    pub hold: Duration,
}

/// Why a datagram was not forwarded. `Copy`, built per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No session owns the local port (a late packet of a finished call).
    UnknownPort,
    /// Not RTP v2 on an RTP port, or not RTCP on an RTCP port.
    Malformed,
    /// RTCP on the RTP port of a side that did not offer rtcp-mux.
    RtcpWithoutMux,
    /// Larger than the receive slot: never forwarded cut short.
    Truncated,
    /// The sender or the receiver set the stream's port to 0.
    Disabled,
    /// Not from the latched source, or from an IP the side never signalled (strict source).
    Stranger,
    /// The other side has neither sent anything nor given an address yet.
    NoDestination,
}

impl DropReason {
    /// A short name for logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownPort => "unknown port",
            Self::Malformed => "malformed",
            Self::RtcpWithoutMux => "rtcp without rtcp-mux",
            Self::Truncated => "truncated",
            Self::Disabled => "stream disabled",
            Self::Stranger => "stranger",
            Self::NoDestination => "no destination",
        }
    }
}

/// What to do with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the bytes unchanged out of the socket bound to `out_port`, to `dst`.
    Forward { out_port: u16, dst: SocketAddr },
    /// Drop it.
    Drop(DropReason),
}

/// What kind of packet arrived.
enum Kind {
    Rtp { seq: u16, timestamp: u32, ssrc: u32 },
    Rtcp,
}

/// The sessions of one worker and their timers.
#[derive(Debug)]
pub struct Relay {
    table: Table,
    timeouts: Timeouts,
    expiry: BTreeSet<(Instant, SessionId)>,
}

impl Relay {
    /// A relay for the `pairs` port pairs starting at `port_min`.
    pub fn new(port_min: u16, pairs: u16, timeouts: Timeouts) -> Self {
        Self {
            table: Table::new(port_min, pairs),
            timeouts,
            expiry: BTreeSet::new(),
        }
    }

    /// Adds a session on already reserved port pairs.
    pub fn add_session(
        &mut self,
        now: Instant,
        id: SessionId,
        label: String,
        ports: &[StreamPorts],
    ) -> Result<(), RelayError> {
        let mut session = Session::new(id, label, now, ports);
        session.deadline = deadline(&self.timeouts, &session);
        let key = (session.deadline, id);
        self.table
            .insert(session)
            .map_err(|e| RelayError::Io(std::io::Error::other(e)))?;
        self.expiry.insert(key);
        Ok(())
    }

    /// New SDP from `side`: replaces its endpoint per stream and the source IPs its legs may
    /// latch to (`sources`, the side's SIP sources, plus each stream's SDP addresses), opens
    /// its re-latch window, and with `answered` switches from the offer timeout to the
    /// idle/hold timeouts.
    pub fn update(
        &mut self,
        now: Instant,
        id: SessionId,
        side: Side,
        streams: &[Option<Endpoint>],
        sources: &[IpAddr],
        answered: bool,
    ) -> Result<(), RelayError> {
        let session = self.table.get_mut(id).ok_or(RelayError::NoSuchSession)?;
        if session.streams.len() != streams.len() {
            return Err(RelayError::StreamCount);
        }
        for (stream, ep) in session.streams.iter_mut().zip(streams) {
            let leg = &mut stream.legs[side.idx()];
            leg.sdp = ep.map_or(Sdp::Disabled, Sdp::Known);
            // Strict source: the side's SIP sources and this stream's SDP addresses.
            let sdp_ips = ep.iter().flat_map(|e| [e.rtp.ip(), e.rtcp.ip()]);
            leg.allowed = Allowed::new(sources.iter().copied().chain(sdp_ips));
            leg.rtp.open_window(now);
            leg.rtcp.open_window(now);
        }
        session.answered |= answered;
        session.last_activity = now;
        // The deadline may move earlier (answered: offer → idle), so re-file it now.
        let new = deadline(&self.timeouts, session);
        self.expiry.remove(&(session.deadline, id));
        session.deadline = new;
        self.expiry.insert((new, id));
        Ok(())
    }

    /// Removes a session; its final stats.
    pub fn remove(&mut self, now: Instant, id: SessionId) -> Option<SessionStats> {
        let session = self.table.remove(id)?;
        self.expiry.remove(&(session.deadline, id));
        Some(session.stats(now))
    }

    /// A snapshot of a session's stats.
    pub fn query(&self, now: Instant, id: SessionId) -> Option<SessionStats> {
        Some(self.table.get(id)?.stats(now))
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether there is no session.
    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
    }

    /// The verdict for one datagram received on `local_port` from `src`.
    pub fn on_packet(
        &mut self,
        now: Instant,
        local_port: u16,
        src: SocketAddr,
        data: &[u8],
    ) -> Verdict {
        let Some((slot, on_rtcp_port)) = self.table.lookup(local_port) else {
            return Verdict::Drop(DropReason::UnknownPort);
        };
        let Some(session) = self.table.by_slot(slot) else {
            return Verdict::Drop(DropReason::UnknownPort);
        };
        let elapsed = session.elapsed(now);
        let Some(stream) = session.streams.get_mut(usize::from(slot.stream)) else {
            return Verdict::Drop(DropReason::UnknownPort);
        };
        let (from, to) = stream.split(slot.side);
        match route(now, elapsed, local_port, on_rtcp_port, src, data, from, to) {
            Ok(verdict) => {
                session.last_activity = now;
                if let Verdict::Drop(_) = verdict {
                    from.counters.dropped += 1;
                }
                verdict
            }
            Err(reason) => {
                from.counters.dropped += 1;
                if reason == DropReason::Stranger {
                    from.counters.strangers += 1;
                }
                Verdict::Drop(reason)
            }
        }
    }

    /// Counts a datagram that did not fit the receive slot, against the leg it arrived on.
    pub fn on_truncated(&mut self, local_port: u16) {
        if let Some((slot, _)) = self.table.lookup(local_port) {
            if let Some(s) = self.table.by_slot(slot) {
                if let Some(st) = s.streams.get_mut(usize::from(slot.stream)) {
                    st.legs[slot.side.idx()].counters.dropped += 1;
                }
            }
        }
    }

    /// The earliest time `on_tick` may have something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.expiry.first().map(|&(t, _)| t)
    }

    /// Removes and returns the sessions whose timeout has passed.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Closed> {
        let mut closed = Vec::new();
        while let Some(&(t, id)) = self.expiry.first() {
            if t > now {
                break;
            }
            self.expiry.pop_first();
            let Some(session) = self.table.get_mut(id) else {
                continue;
            };
            let deadline = deadline(&self.timeouts, session);
            if deadline > now {
                // Packets came since it was filed: file it again at its real deadline.
                session.deadline = deadline;
                self.expiry.insert((deadline, id));
                continue;
            }
            let reason = if !session.answered {
                CloseReason::Offer
            } else if session.on_hold() {
                CloseReason::Hold
            } else {
                CloseReason::Idle
            };
            if let Some(session) = self.table.remove(id) {
                closed.push(Closed {
                    id,
                    stats: session.stats(now),
                    label: session.label,
                    reason,
                });
            }
        }
        closed
    }

    /// Removes every session (shutdown).
    pub fn close_all(&mut self, now: Instant) -> Vec<Closed> {
        let mut closed = Vec::new();
        for id in self.table.ids() {
            if let Some(session) = self.table.remove(id) {
                closed.push(Closed {
                    id,
                    stats: session.stats(now),
                    label: session.label,
                    reason: CloseReason::Shutdown,
                });
            }
        }
        self.expiry.clear();
        closed
    }
}

/// When a session times out if nothing else happens.
fn deadline(t: &Timeouts, s: &Session) -> Instant {
    if !s.answered {
        s.created + t.offer
    } else if s.on_hold() {
        s.last_activity + t.hold
    } else {
        s.last_activity + t.idle
    }
}

/// Validates, latches, counts and routes one packet that arrived on leg `from`.
/// `Ok(Drop)` is a packet accepted from the peer that still cannot be forwarded (it keeps the
/// session alive); `Err` is a packet not accepted at all.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
fn route(
    now: Instant,
    elapsed: Duration,
    local_port: u16,
    on_rtcp_port: bool,
    src: SocketAddr,
    data: &[u8],
    from: &mut Leg,
    to: &mut Leg,
) -> Result<Verdict, DropReason> {
    let kind = if on_rtcp_port {
        RtcpView::new_checked(data).map_err(|_| DropReason::Malformed)?;
        Kind::Rtcp
    } else if from.rtcp_mux() && looks_like_rtcp(data) {
        RtcpView::new_checked(data).map_err(|_| DropReason::Malformed)?;
        Kind::Rtcp
    } else if !from.rtcp_mux() && is_misdirected_rtcp(data) {
        // Counting it as RTP would corrupt the sequence and loss figures.
        return Err(DropReason::RtcpWithoutMux);
    } else {
        let v = RtpView::new_checked(data).map_err(|_| DropReason::Malformed)?;
        Kind::Rtp {
            seq: v.seq(),
            timestamp: v.timestamp(),
            ssrc: v.ssrc(),
        }
    };
    if from.sdp == Sdp::Disabled {
        return Err(DropReason::Disabled);
    }

    let peer = match kind {
        Kind::Rtp { .. } => &mut from.rtp,
        Kind::Rtcp => &mut from.rtcp,
    };
    let decision = latch::decide(now, src, peer, &from.allowed);
    match decision {
        Latch::Drop => return Err(DropReason::Stranger),
        Latch::Learn(addr) => {
            tracing::debug!(
                local.port = local_port,
                peer.addr = %addr,
                rtcp = matches!(kind, Kind::Rtcp),
                "latched"
            );
        }
        Latch::Keep => {}
    }
    peer.apply(decision, local_port);

    let len = data.len() as u64;
    match kind {
        Kind::Rtp {
            seq,
            timestamp,
            ssrc,
        } => {
            from.counters.pkts += 1;
            from.counters.bytes += len;
            let rate = from.sdp.endpoint().map_or(0, |e| e.clock_rate);
            from.counters
                .rtp
                .record(seq, timestamp, ssrc, elapsed, rate);
        }
        Kind::Rtcp => {
            from.counters.rtcp_pkts += 1;
            from.counters.rtcp_bytes += len;
        }
    }

    Ok(
        destination(&kind, to).map_or_else(Verdict::Drop, |(out_port, dst)| Verdict::Forward {
            out_port,
            dst,
        }),
    )
}

/// Where a packet for leg `to` goes: out of which local port, to which address.
fn destination(kind: &Kind, to: &Leg) -> Result<(u16, SocketAddr), DropReason> {
    let sdp = match to.sdp {
        Sdp::Disabled => return Err(DropReason::Disabled),
        Sdp::Unknown => None,
        Sdp::Known(e) => Some(e),
    };
    let found = match kind {
        Kind::Rtp { .. } => to
            .rtp
            .peer
            .map(|p| p.addr)
            .or(sdp.map(|e| e.rtp))
            .map(|dst| (to.ports.rtp, dst)),
        // Answer RTCP from where the peer sends it (its RTP port with rtcp-mux).
        Kind::Rtcp => match (to.rtcp.peer, sdp) {
            (Some(p), _) => Some((p.via_port, p.addr)),
            (None, Some(e)) if e.rtcp_mux => {
                Some((to.ports.rtp, to.rtp.peer.map_or(e.rtp, |p| p.addr)))
            }
            (None, Some(e)) => Some((to.ports.rtcp, e.rtcp)),
            (None, None) => None,
        },
    };
    found.ok_or(DropReason::NoDestination)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtp::{build_rtcp_rr, build_rtp};
    use crate::{Direction, PortPair};

    const CALLER_LEG: u16 = 30000;
    const CALLEE_LEG: u16 = 30010;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ep(rtp: &str, mux: bool) -> Endpoint {
        let rtp = addr(rtp);
        Endpoint {
            rtp,
            rtcp: SocketAddr::new(rtp.ip(), rtp.port() + 1),
            rtcp_mux: mux,
            direction: Direction::SendRecv,
            clock_rate: 8000,
        }
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            idle: Duration::from_secs(60),
            offer: Duration::from_secs(120),
            hold: Duration::from_secs(3600),
        }
    }

    fn relay(t0: Instant) -> Relay {
        let mut r = Relay::new(30000, 20, timeouts());
        r.add_session(
            t0,
            SessionId(1),
            "call-1".into(),
            &[StreamPorts {
                caller: PortPair {
                    rtp: CALLER_LEG,
                    rtcp: CALLER_LEG + 1,
                },
                callee: PortPair {
                    rtp: CALLEE_LEG,
                    rtcp: CALLEE_LEG + 1,
                },
            }],
        )
        .unwrap();
        r
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Session 1 with both sides' SDP known: the caller at 192.0.2.1:4000 (its SIP from
    /// 198.51.100.1), the callee at 192.0.2.2:5000, answered.
    fn answered(t0: Instant) -> (Relay, SessionId) {
        let mut r = relay(t0);
        let id = SessionId(1);
        let caller = [Some(ep("192.0.2.1:4000", false))];
        r.update(t0, id, Side::Caller, &caller, &[ip("198.51.100.1")], false)
            .unwrap();
        let callee = [Some(ep("192.0.2.2:5000", false))];
        r.update(t0, id, Side::Callee, &callee, &[], true).unwrap();
        (r, id)
    }

    fn fwd(out_port: u16, dst: &str) -> Verdict {
        Verdict::Forward {
            out_port,
            dst: addr(dst),
        }
    }

    #[test]
    fn forwards_out_of_the_other_legs_port_to_sdp_then_latched_address() {
        let t0 = Instant::now();
        let mut r = relay(t0);
        let id = SessionId(1);
        r.update(
            t0,
            id,
            Side::Caller,
            &[Some(ep("10.0.0.5:4000", false))],
            &[ip("198.51.100.1")],
            false,
        )
        .unwrap();
        // Caller (NATed: its SDP says 10.0.0.5) sends before the callee is known: nowhere to go.
        let p = build_rtp(1, 160, 7, 160);
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(
            r.on_packet(ms(1), CALLER_LEG, addr("198.51.100.1:61000"), &p),
            Verdict::Drop(DropReason::NoDestination)
        );
        // The callee's answer: forwarded to its SDP address out of the callee-facing RTP port.
        r.update(
            ms(2),
            id,
            Side::Callee,
            &[Some(ep("203.0.113.9:5000", false))],
            &[],
            true,
        )
        .unwrap();
        assert_eq!(
            r.on_packet(ms(3), CALLER_LEG, addr("198.51.100.1:61000"), &p),
            fwd(CALLEE_LEG, "203.0.113.9:5000")
        );
        // The callee answers: it goes to the caller's latched source, not its private SDP address,
        // out of the caller-facing RTP port.
        assert_eq!(
            r.on_packet(ms(4), CALLEE_LEG, addr("203.0.113.9:5000"), &p),
            fwd(CALLER_LEG, "198.51.100.1:61000")
        );
        let s = r.query(ms(5), id).unwrap();
        assert_eq!(
            (s.caller.pkts, s.caller.bytes, s.caller.dropped),
            (2, 344, 1)
        );
        assert_eq!((s.callee.pkts, s.callee.bytes), (1, 172));
    }

    #[test]
    fn other_sources_are_dropped_until_an_update_opens_the_window() {
        let t0 = Instant::now();
        let (mut r, id) = answered(t0);
        let p = build_rtp(1, 160, 7, 20);
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(
            r.on_packet(at(3), CALLER_LEG, addr("192.0.2.1:4000"), &p),
            fwd(CALLEE_LEG, "192.0.2.2:5000")
        );
        assert_eq!(
            r.on_packet(at(4), CALLER_LEG, addr("192.0.2.66:4000"), &p),
            Verdict::Drop(DropReason::Stranger)
        );
        // Re-INVITE from the caller with a new port: the new source re-latches within 2 s.
        r.update(
            at(10),
            id,
            Side::Caller,
            &[Some(ep("192.0.2.1:4100", false))],
            &[],
            true,
        )
        .unwrap();
        assert_eq!(
            r.on_packet(at(11), CALLER_LEG, addr("192.0.2.1:4100"), &p),
            fwd(CALLEE_LEG, "192.0.2.2:5000")
        );
        assert_eq!(
            r.on_packet(at(11), CALLER_LEG, addr("192.0.2.1:4000"), &p),
            Verdict::Drop(DropReason::Stranger)
        );
        // The callee's latch was untouched by the caller's update; it now reaches the new port.
        assert_eq!(
            r.on_packet(at(12), CALLEE_LEG, addr("192.0.2.2:5000"), &p),
            fwd(CALLER_LEG, "192.0.2.1:4100")
        );
        // Window over: no new source.
        r.update(
            at(20),
            id,
            Side::Caller,
            &[Some(ep("192.0.2.1:4100", false))],
            &[],
            true,
        )
        .unwrap();
        assert_eq!(
            r.on_packet(at(23), CALLER_LEG, addr("192.0.2.1:4200"), &p),
            Verdict::Drop(DropReason::Stranger)
        );
    }

    #[test]
    fn a_sprayer_never_latches_nor_receives_and_is_counted() {
        let t0 = Instant::now();
        let (mut r, id) = answered(t0);
        let p = build_rtp(1, 160, 7, 20);
        let rr = build_rtcp_rr(7);
        let ms = |n| t0 + Duration::from_millis(n);
        // Before either side has sent: a host that never signalled takes neither leg.
        for (i, port) in [CALLER_LEG, CALLER_LEG + 1, CALLEE_LEG, CALLEE_LEG + 1]
            .into_iter()
            .enumerate()
        {
            let pkt: &[u8] = if port % 2 == 0 { &p } else { &rr };
            assert_eq!(
                r.on_packet(ms(i as u64), port, addr("203.0.113.66:9000"), pkt),
                Verdict::Drop(DropReason::Stranger)
            );
        }
        // The real parties latch and reach each other, not the sprayer.
        assert_eq!(
            r.on_packet(ms(10), CALLER_LEG, addr("198.51.100.1:61000"), &p),
            fwd(CALLEE_LEG, "192.0.2.2:5000")
        );
        assert_eq!(
            r.on_packet(ms(11), CALLEE_LEG, addr("192.0.2.2:5000"), &p),
            fwd(CALLER_LEG, "198.51.100.1:61000")
        );
        // Not even inside a re-latch window: new SDP does not make it a signalled source.
        r.update(
            ms(12),
            id,
            Side::Callee,
            &[Some(ep("192.0.2.2:5000", false))],
            &[],
            true,
        )
        .unwrap();
        assert_eq!(
            r.on_packet(ms(13), CALLEE_LEG, addr("203.0.113.66:9000"), &p),
            Verdict::Drop(DropReason::Stranger)
        );
        let s = r.query(ms(14), id).unwrap();
        assert_eq!(
            (s.caller.strangers, s.caller.dropped, s.caller.pkts),
            (2, 2, 1)
        );
        assert_eq!(
            (s.callee.strangers, s.callee.dropped, s.callee.pkts),
            (3, 3, 1)
        );
    }

    #[test]
    fn rtcp_latches_separately_and_uses_the_rtcp_ports() {
        let t0 = Instant::now();
        let (mut r, id) = answered(t0);
        let rtp = build_rtp(1, 160, 7, 20);
        let rr = build_rtcp_rr(7);
        r.on_packet(t0, CALLER_LEG, addr("198.51.100.1:7000"), &rtp);
        // RTCP from another port latches the RTCP peer; sent out of the callee-facing RTCP port
        // to the callee's SDP RTCP address.
        assert_eq!(
            r.on_packet(t0, CALLER_LEG + 1, addr("198.51.100.1:7001"), &rr),
            fwd(CALLEE_LEG + 1, "192.0.2.2:5001")
        );
        assert_eq!(
            r.on_packet(t0, CALLEE_LEG + 1, addr("192.0.2.2:5001"), &rr),
            fwd(CALLER_LEG + 1, "198.51.100.1:7001")
        );
        // RTP is not valid on the RTCP port, and RTCP not on the RTP port without rtcp-mux.
        assert_eq!(
            r.on_packet(t0, CALLER_LEG + 1, addr("198.51.100.1:7001"), &rtp),
            Verdict::Drop(DropReason::Malformed)
        );
        assert_eq!(
            r.on_packet(t0, CALLER_LEG, addr("198.51.100.1:7000"), &rr),
            Verdict::Drop(DropReason::RtcpWithoutMux)
        );
        let s = r.query(t0, id).unwrap();
        assert_eq!((s.caller.rtcp_pkts, s.caller.rtcp_bytes), (1, 8));
        assert_eq!((s.caller.pkts, s.caller.dropped), (1, 2));
    }

    #[test]
    fn rtcp_mux_on_one_side_only() {
        let t0 = Instant::now();
        let mut r = relay(t0);
        let id = SessionId(1);
        r.update(
            t0,
            id,
            Side::Caller,
            &[Some(ep("192.0.2.1:4000", true))],
            &[],
            false,
        )
        .unwrap();
        r.update(
            t0,
            id,
            Side::Callee,
            &[Some(ep("192.0.2.2:5000", false))],
            &[],
            true,
        )
        .unwrap();
        let rr = build_rtcp_rr(7);
        // Muxed RTCP from the caller on its RTP port goes to the callee's RTCP port.
        assert_eq!(
            r.on_packet(t0, CALLER_LEG, addr("192.0.2.1:4000"), &rr),
            fwd(CALLEE_LEG + 1, "192.0.2.2:5001")
        );
        // The callee's RTCP goes back out of the caller-facing RTP port, to where the caller's
        // RTCP came from.
        assert_eq!(
            r.on_packet(t0, CALLEE_LEG + 1, addr("192.0.2.2:5001"), &rr),
            fwd(CALLER_LEG, "192.0.2.1:4000")
        );
        // Without rtcp-mux, RTP with the marker bit and payload type 77 is RTP (second byte
        // 205), even though a muxing side would have to read it as RTCP.
        let mut odd = build_rtp(1, 0, 9, 20);
        odd[1] = 0x80 | 77;
        assert_eq!(
            r.on_packet(t0, CALLEE_LEG, addr("192.0.2.2:5000"), &odd),
            fwd(CALLER_LEG, "192.0.2.1:4000")
        );
        let s = r.query(t0, id).unwrap();
        assert_eq!((s.callee.pkts, s.callee.rtcp_pkts), (1, 1));
        assert_eq!((s.caller.pkts, s.caller.rtcp_pkts), (0, 1));
    }

    #[test]
    fn garbage_unknown_ports_and_disabled_streams_are_dropped() {
        let t0 = Instant::now();
        let mut r = relay(t0);
        let id = SessionId(1);
        let src = addr("192.0.2.1:4000");
        assert_eq!(
            r.on_packet(t0, 30002, src, &build_rtp(1, 1, 1, 1)),
            Verdict::Drop(DropReason::UnknownPort)
        );
        assert_eq!(
            r.on_packet(t0, 29000, src, &build_rtp(1, 1, 1, 1)),
            Verdict::Drop(DropReason::UnknownPort)
        );
        assert_eq!(
            r.on_packet(t0, CALLER_LEG, src, b"hello"),
            Verdict::Drop(DropReason::Malformed)
        );
        // Garbage does not latch: the signalled source's valid packet does, and then `src` is
        // a stranger. The callee disabled the stream, so nothing is forwarded.
        r.update(t0, id, Side::Callee, &[None], &[], true).unwrap();
        let real = addr("192.0.2.7:4000");
        r.update(
            t0,
            id,
            Side::Caller,
            &[Some(ep("192.0.2.7:4000", false))],
            &[],
            true,
        )
        .unwrap();
        assert_eq!(
            r.on_packet(t0, CALLER_LEG, real, &build_rtp(1, 1, 1, 1)),
            Verdict::Drop(DropReason::Disabled)
        );
        assert_eq!(
            r.on_packet(t0, CALLER_LEG, src, &build_rtp(1, 1, 1, 1)),
            Verdict::Drop(DropReason::Stranger)
        );
        // A sender that disabled the stream is dropped too.
        r.update(t0, id, Side::Caller, &[None], &[], true).unwrap();
        assert_eq!(
            r.on_packet(t0, CALLER_LEG, real, &build_rtp(2, 1, 1, 1)),
            Verdict::Drop(DropReason::Disabled)
        );
        assert!(matches!(
            r.update(t0, id, Side::Callee, &[None, None], &[], true),
            Err(RelayError::StreamCount)
        ));
        assert!(matches!(
            r.update(t0, SessionId(9), Side::Callee, &[None], &[], true),
            Err(RelayError::NoSuchSession)
        ));
    }

    #[test]
    fn timeouts_offer_idle_and_hold() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // Never answered: closed at t0 + offer, whatever the traffic.
        let mut r = relay(t0);
        assert_eq!(r.poll_timeout(), Some(t0 + s(120)));
        assert!(r.on_tick(t0 + s(119)).is_empty());
        let c = r.on_tick(t0 + s(120));
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].reason, c[0].label.as_str()),
            (CloseReason::Offer, "call-1")
        );
        assert!(r.is_empty());

        // Answered: the idle timeout runs from the last accepted packet.
        let mut r = relay(t0);
        let id = SessionId(1);
        r.update(
            t0,
            id,
            Side::Caller,
            &[Some(ep("192.0.2.1:4000", false))],
            &[],
            false,
        )
        .unwrap();
        r.update(
            t0 + s(1),
            id,
            Side::Callee,
            &[Some(ep("192.0.2.2:5000", false))],
            &[],
            true,
        )
        .unwrap();
        assert_eq!(r.poll_timeout(), Some(t0 + s(61)));
        let p = build_rtp(1, 160, 7, 20);
        r.on_packet(t0 + s(30), CALLER_LEG, addr("192.0.2.1:4000"), &p);
        // A stranger's packet does not keep the session alive.
        r.on_packet(t0 + s(50), CALLER_LEG, addr("192.0.2.9:4000"), &p);
        assert!(r.on_tick(t0 + s(61)).is_empty(), "re-filed at t0+90");
        assert_eq!(r.poll_timeout(), Some(t0 + s(90)));
        let c = r.on_tick(t0 + s(90));
        assert_eq!(c[0].reason, CloseReason::Idle);
        assert_eq!(c[0].stats.caller.pkts, 1);
        assert_eq!(c[0].stats.duration, s(90));

        // On hold (callee sendonly): the hold timeout applies.
        let mut r = relay(t0);
        r.update(
            t0,
            id,
            Side::Caller,
            &[Some(ep("192.0.2.1:4000", false))],
            &[],
            false,
        )
        .unwrap();
        let mut held = ep("192.0.2.2:5000", false);
        held.direction = Direction::SendOnly;
        r.update(t0, id, Side::Callee, &[Some(held)], &[], true)
            .unwrap();
        assert!(r.on_tick(t0 + s(61)).is_empty());
        let c = r.on_tick(t0 + s(3600));
        assert_eq!(c[0].reason, CloseReason::Hold);
    }

    #[test]
    fn remove_and_close_all() {
        let t0 = Instant::now();
        let mut r = relay(t0);
        assert!(r.remove(t0, SessionId(1)).is_some());
        assert!(r.remove(t0, SessionId(1)).is_none());
        assert_eq!(r.poll_timeout(), None);
        let mut r = relay(t0);
        let c = r.close_all(t0);
        assert_eq!(c[0].reason, CloseReason::Shutdown);
        assert!(r.is_empty());
        assert_eq!(r.poll_timeout(), None);
    }
}
