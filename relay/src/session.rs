//! The session table of one worker: sessions, their streams and legs, and the index from a
//! local port to the leg that owns it.
//!
//! A session is one call branch; it has one stream per SDP m= line (RFC 4566 §5.14), and each
//! stream two legs, one facing the caller and one facing the callee. A leg owns a local RTP
//! port P and RTCP port P+1. The hot path finds a leg by indexing `slots[(port - port_min) / 2]`
//! (no hashing, like rtpengine's `free_ports[port - min]`); the control plane finds a session
//! by its id. Pure.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::latch::{Allowed, PeerLatch};
use crate::stats::LegCounters;
use crate::{Direction, Endpoint, LegStats, PortPair, SessionId, SessionStats, Side, StreamPorts};

/// What the SDP of the side a leg faces says about this stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Sdp {
    /// No SDP from that side yet (the answer has not come).
    Unknown,
    /// Port 0: the side disabled this stream (RFC 3264 §6).
    Disabled,
    /// The side's connection address, ports and attributes.
    Known(Endpoint),
}

impl Sdp {
    pub(crate) fn endpoint(&self) -> Option<&Endpoint> {
        match self {
            Self::Known(e) => Some(e),
            Self::Unknown | Self::Disabled => None,
        }
    }

    /// Whether this side sends and receives media on the stream, as far as we know.
    fn active(&self) -> bool {
        match self {
            Self::Unknown => true,
            Self::Disabled => false,
            Self::Known(e) => e.direction == Direction::SendRecv,
        }
    }
}

/// One leg: local ports, the peer it faces and what was received from it.
#[derive(Debug, Clone)]
pub(crate) struct Leg {
    pub(crate) ports: PortPair,
    pub(crate) sdp: Sdp,
    pub(crate) rtp: PeerLatch,
    pub(crate) rtcp: PeerLatch,
    /// The source IPs the side this leg faces signalled (SDP and SIP): the only ones it may
    /// latch to. Empty until that side's first SDP.
    pub(crate) allowed: Allowed,
    pub(crate) counters: LegCounters,
}

impl Leg {
    fn new(ports: PortPair) -> Self {
        Self {
            ports,
            sdp: Sdp::Unknown,
            rtp: PeerLatch::default(),
            rtcp: PeerLatch::default(),
            allowed: Allowed::default(),
            counters: LegCounters::default(),
        }
    }

    /// RFC 5761: the side multiplexes RTCP on its RTP port.
    pub(crate) fn rtcp_mux(&self) -> bool {
        self.sdp.endpoint().is_some_and(|e| e.rtcp_mux)
    }
}

/// One m= line: the caller-facing and the callee-facing leg, indexed by [`Side`].
#[derive(Debug, Clone)]
pub(crate) struct Stream {
    pub(crate) legs: [Leg; 2],
}

impl Stream {
    /// The leg facing `side` and the other one, both mutable.
    pub(crate) fn split(&mut self, side: Side) -> (&mut Leg, &mut Leg) {
        let [caller, callee] = &mut self.legs;
        match side {
            Side::Caller => (caller, callee),
            Side::Callee => (callee, caller),
        }
    }
}

/// One call branch.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) id: SessionId,
    pub(crate) label: String,
    pub(crate) created: Instant,
    /// An answer was seen: the idle and hold timeouts apply instead of the offer timeout.
    pub(crate) answered: bool,
    /// Last accepted packet from either side, or last SDP.
    pub(crate) last_activity: Instant,
    /// The key this session has in the expiry index.
    pub(crate) deadline: Instant,
    pub(crate) streams: Vec<Stream>,
}

impl Session {
    pub(crate) fn new(id: SessionId, label: String, now: Instant, ports: &[StreamPorts]) -> Self {
        Self {
            id,
            label,
            created: now,
            answered: false,
            last_activity: now,
            deadline: now,
            streams: ports
                .iter()
                .map(|p| Stream {
                    legs: [Leg::new(p.caller), Leg::new(p.callee)],
                })
                .collect(),
        }
    }

    /// On hold for timeout purposes: no stream is enabled and sendrecv on both sides (RFC 3264
    /// §8.4 hold is sendonly/inactive; port 0 disables a stream). A disabled video stream next
    /// to a live audio stream is not a hold.
    pub(crate) fn on_hold(&self) -> bool {
        !self
            .streams
            .iter()
            .any(|s| s.legs.iter().all(|l| l.sdp.active()))
    }

    /// Per-side totals: counters summed over streams, jitter the maximum.
    pub(crate) fn stats(&self, now: Instant) -> SessionStats {
        let mut caller = LegStats::default();
        let mut callee = LegStats::default();
        for s in &self.streams {
            s.legs[Side::Caller.idx()].counters.add_to(&mut caller);
            s.legs[Side::Callee.idx()].counters.add_to(&mut callee);
        }
        SessionStats {
            duration: now.saturating_duration_since(self.created),
            caller,
            callee,
        }
    }

    /// Every port pair the session holds.
    pub(crate) fn pairs(&self) -> impl Iterator<Item = PortPair> + '_ {
        self.streams
            .iter()
            .flat_map(|s| s.legs.iter().map(|l| l.ports))
    }

    /// The time since the session started, the reference for jitter arrival times.
    pub(crate) fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.created)
    }
}

/// Which leg a port pair belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) session: u32,
    pub(crate) stream: u16,
    pub(crate) side: Side,
}

/// A port pair outside the range or already owned: the pool handed it out twice (a bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("port {0} is outside the range or owned by another session")]
pub(crate) struct SlotTaken(pub(crate) u16);

/// The sessions of one worker.
#[derive(Debug)]
pub(crate) struct Table {
    port_min: u16,
    /// Per pair offset `(port - port_min) / 2`: the leg using it.
    slots: Vec<Option<Slot>>,
    sessions: Vec<Option<Session>>,
    vacant: Vec<u32>,
    by_id: HashMap<SessionId, u32>,
}

impl Table {
    pub(crate) fn new(port_min: u16, pairs: u16) -> Self {
        Self {
            port_min,
            slots: vec![None; usize::from(pairs)],
            sessions: Vec::new(),
            vacant: Vec::new(),
            by_id: HashMap::new(),
        }
    }

    fn slot_index(&self, rtp: u16) -> Option<usize> {
        let off = rtp.checked_sub(self.port_min)?;
        let i = usize::from(off / 2);
        (off % 2 == 0 && i < self.slots.len()).then_some(i)
    }

    /// The leg owning `port`, and whether `port` is its RTCP port.
    pub(crate) fn lookup(&self, port: u16) -> Option<(Slot, bool)> {
        let off = port.checked_sub(self.port_min)?;
        let slot = (*self.slots.get(usize::from(off / 2))?)?;
        Some((slot, off % 2 == 1))
    }

    pub(crate) fn insert(&mut self, session: Session) -> Result<(), SlotTaken> {
        // Check every pair before touching anything.
        for pair in session.pairs() {
            match self.slot_index(pair.rtp) {
                Some(i) if self.slots[i].is_none() => {}
                _ => return Err(SlotTaken(pair.rtp)),
            }
        }
        let idx = match self.vacant.pop() {
            Some(i) => i,
            None => {
                self.sessions.push(None);
                // invariant: fewer sessions than port pairs, which are at most 32768.
                (self.sessions.len() - 1) as u32
            }
        };
        for (si, stream) in session.streams.iter().enumerate() {
            for side in [Side::Caller, Side::Callee] {
                if let Some(i) = self.slot_index(stream.legs[side.idx()].ports.rtp) {
                    self.slots[i] = Some(Slot {
                        session: idx,
                        // invariant: streams fit in u16 (each needs two of at most 32768 pairs).
                        stream: si as u16,
                        side,
                    });
                }
            }
        }
        self.by_id.insert(session.id, idx);
        self.sessions[idx as usize] = Some(session);
        Ok(())
    }

    pub(crate) fn remove(&mut self, id: SessionId) -> Option<Session> {
        let idx = self.by_id.remove(&id)?;
        let session = self.sessions.get_mut(idx as usize)?.take()?;
        for pair in session.pairs() {
            if let Some(i) = self.slot_index(pair.rtp) {
                self.slots[i] = None;
            }
        }
        self.vacant.push(idx);
        Some(session)
    }

    pub(crate) fn get(&self, id: SessionId) -> Option<&Session> {
        let idx = *self.by_id.get(&id)?;
        self.sessions.get(idx as usize)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        let idx = *self.by_id.get(&id)?;
        self.sessions.get_mut(idx as usize)?.as_mut()
    }

    /// The session a slot points at.
    pub(crate) fn by_slot(&mut self, slot: Slot) -> Option<&mut Session> {
        self.sessions.get_mut(slot.session as usize)?.as_mut()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn ids(&self) -> Vec<SessionId> {
        self.by_id.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(a: u16, b: u16) -> StreamPorts {
        StreamPorts {
            caller: PortPair {
                rtp: a,
                rtcp: a + 1,
            },
            callee: PortPair {
                rtp: b,
                rtcp: b + 1,
            },
        }
    }

    #[test]
    fn ports_index_legs_and_are_freed_on_remove() {
        let t0 = Instant::now();
        let mut t = Table::new(30000, 10);
        let s = Session::new(
            SessionId(1),
            "a".into(),
            t0,
            &[ports(30004, 30010), ports(30000, 30018)],
        );
        t.insert(s).unwrap();
        let (slot, rtcp) = t.lookup(30011).unwrap();
        assert!(rtcp);
        assert_eq!((slot.stream, slot.side), (0, Side::Callee));
        let (slot, rtcp) = t.lookup(30000).unwrap();
        assert!(!rtcp);
        assert_eq!((slot.stream, slot.side), (1, Side::Caller));
        assert_eq!(t.lookup(30002), None);
        assert_eq!(t.lookup(29999), None);
        assert_eq!(t.lookup(30020), None);
        // A second session on a taken pair is refused whole.
        let clash = Session::new(SessionId(2), "b".into(), t0, &[ports(30002, 30010)]);
        assert_eq!(t.insert(clash), Err(SlotTaken(30010)));
        assert_eq!(t.lookup(30002), None);
        assert_eq!(t.len(), 1);
        let s = t.remove(SessionId(1)).unwrap();
        assert_eq!(s.pairs().count(), 4);
        assert_eq!(t.lookup(30011), None);
        assert!(t.remove(SessionId(1)).is_none());
        // The slab slot is reused.
        let s = Session::new(SessionId(3), "c".into(), t0, &[ports(30002, 30010)]);
        t.insert(s).unwrap();
        assert_eq!(t.lookup(30002).unwrap().0.session, 0);
    }

    #[test]
    fn hold_means_no_stream_active_on_both_sides() {
        let t0 = Instant::now();
        let mut s = Session::new(
            SessionId(1),
            "a".into(),
            t0,
            &[ports(30000, 30002), ports(30004, 30006)],
        );
        assert!(!s.on_hold(), "unknown SDP is not a hold");
        let ep = |direction| Endpoint {
            rtp: "192.0.2.1:4000".parse().unwrap(),
            rtcp: "192.0.2.1:4001".parse().unwrap(),
            rtcp_mux: false,
            direction,
            clock_rate: 8000,
        };
        // Video disabled, audio sendrecv: not a hold.
        s.streams[1].legs[0].sdp = Sdp::Disabled;
        s.streams[0].legs[0].sdp = Sdp::Known(ep(Direction::SendRecv));
        s.streams[0].legs[1].sdp = Sdp::Known(ep(Direction::SendRecv));
        assert!(!s.on_hold());
        // Audio put on hold by the callee.
        s.streams[0].legs[1].sdp = Sdp::Known(ep(Direction::SendOnly));
        assert!(s.on_hold());
        s.streams[0].legs[1].sdp = Sdp::Known(ep(Direction::Inactive));
        assert!(s.on_hold());
        s.streams[0].legs[1].sdp = Sdp::Disabled;
        assert!(s.on_hold());
    }
}
