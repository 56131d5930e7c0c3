//! The port-pair pool: RTP on an even port P, RTCP on P+1 (RFC 3550 §11; RFC 3605 lets SDP
//! say otherwise, but the pair convention keeps old phones working).
//!
//! Pairs are shuffled once at start (so a restart does not hand the same ports to the next
//! calls, and ports are hard to guess), taken from the head and returned to the tail, so a port
//! rests as long as possible before reuse and late packets of a finished call rarely reach a
//! new one. An owner flag per pair, indexed by offset, makes double issue and double release
//! impossible. Pure: binding the sockets is the caller's job.

use std::collections::VecDeque;

use crate::PortPair;

/// A small xorshift64* generator: enough for a shuffle, no dependency.
#[derive(Debug, Clone)]
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point.
        Self(seed | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n`; `n` must not be 0. The modulo bias is irrelevant for shuffling ports.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Why a port range is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RangeError {
    /// RTP goes on even ports.
    #[error("port_min must be even and not 0")]
    OddMin,
    /// The range must hold at least one RTP/RTCP pair.
    #[error("the port range holds no RTP/RTCP pair")]
    Empty,
}

/// The free list and owner flags of every pair in `port_min..=port_max`.
#[derive(Debug)]
pub(crate) struct PortPool {
    port_min: u16,
    /// Pair indices (`(rtp - port_min) / 2`), head = next to issue.
    free: VecDeque<u16>,
    owned: Vec<bool>,
}

impl PortPool {
    /// All pairs `(P, P+1)` with P even and both inside the range, shuffled with `seed`.
    pub(crate) fn new(port_min: u16, port_max: u16, seed: u64) -> Result<Self, RangeError> {
        let pairs = Self::pairs_in(port_min, port_max)?;
        let mut order: Vec<u16> = (0..pairs).collect();
        // Fisher-Yates, once.
        let mut rng = XorShift::new(seed);
        for i in (1..order.len()).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
        Ok(Self {
            port_min,
            free: order.into(),
            owned: vec![false; usize::from(pairs)],
        })
    }

    /// How many pairs `port_min..=port_max` holds.
    pub(crate) fn pairs_in(port_min: u16, port_max: u16) -> Result<u16, RangeError> {
        if port_min == 0 || port_min % 2 != 0 {
            return Err(RangeError::OddMin);
        }
        let pairs = (u32::from(port_max) + 1).saturating_sub(u32::from(port_min)) / 2;
        if pairs == 0 {
            return Err(RangeError::Empty);
        }
        // invariant: at most 32768 pairs fit in the u16 port space.
        Ok(pairs as u16)
    }

    fn pair(&self, idx: u16) -> PortPair {
        let rtp = self.port_min + 2 * idx;
        PortPair { rtp, rtcp: rtp + 1 }
    }

    fn index(&self, pair: PortPair) -> Option<usize> {
        let off = pair.rtp.checked_sub(self.port_min)?;
        let idx = usize::from(off / 2);
        (off % 2 == 0 && pair.rtcp == pair.rtp.wrapping_add(1) && idx < self.owned.len())
            .then_some(idx)
    }

    /// Issues the pair at the head of the free list.
    pub(crate) fn take(&mut self) -> Option<PortPair> {
        let idx = self.free.pop_front()?;
        let slot = &mut self.owned[usize::from(idx)];
        debug_assert!(!*slot, "a free pair is owned");
        *slot = true;
        Some(self.pair(idx))
    }

    /// Returns an issued pair to the tail. A pair that is not issued (a double release, or one
    /// from another range) is refused with `false` and changes nothing.
    pub(crate) fn release(&mut self, pair: PortPair) -> bool {
        let Some(idx) = self.index(pair) else {
            return false;
        };
        if !self.owned[idx] {
            return false;
        }
        self.owned[idx] = false;
        // invariant: idx < owned.len() <= 32768.
        self.free.push_back(idx as u16);
        true
    }

    /// Pairs that can be issued.
    pub(crate) fn free(&self) -> usize {
        self.free.len()
    }

    /// Pairs issued and not released.
    pub(crate) fn in_use(&self) -> usize {
        self.owned.len() - self.free.len()
    }

    /// Every pair in the range.
    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.owned.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn range_validation() {
        assert_eq!(PortPool::pairs_in(30000, 30001), Ok(1));
        assert_eq!(PortPool::pairs_in(30000, 30002), Ok(1));
        assert_eq!(PortPool::pairs_in(30000, 30003), Ok(2));
        assert_eq!(PortPool::pairs_in(30000, 30000), Err(RangeError::Empty));
        assert_eq!(PortPool::pairs_in(30000, 29000), Err(RangeError::Empty));
        assert_eq!(PortPool::pairs_in(30001, 30010), Err(RangeError::OddMin));
        assert_eq!(PortPool::pairs_in(0, 10), Err(RangeError::OddMin));
        assert_eq!(PortPool::pairs_in(2, 65535), Ok(32767));
    }

    #[test]
    fn shuffled_and_complete() {
        let mut p = PortPool::new(30000, 30999, 42).unwrap();
        let mut seen = Vec::new();
        while let Some(pair) = p.take() {
            seen.push(pair.rtp);
        }
        assert_eq!(seen.len(), 500);
        let sorted = {
            let mut s = seen.clone();
            s.sort_unstable();
            s
        };
        assert_eq!(sorted, (30000..31000).step_by(2).collect::<Vec<_>>());
        assert_ne!(seen, sorted, "the pool is shuffled");
    }

    #[test]
    fn released_pairs_go_to_the_tail() {
        let mut p = PortPool::new(40000, 40007, 1).unwrap();
        let a = p.take().unwrap();
        assert!(p.release(a));
        // Three other pairs come first.
        for _ in 0..3 {
            assert_ne!(p.take().unwrap(), a);
        }
        assert_eq!(p.take().unwrap(), a);
        assert_eq!(p.take(), None);
    }

    #[test]
    fn double_and_foreign_release_are_refused() {
        let mut p = PortPool::new(40000, 40009, 7).unwrap();
        let a = p.take().unwrap();
        assert!(p.release(a));
        assert!(!p.release(a));
        assert!(!p.release(PortPair {
            rtp: 50000,
            rtcp: 50001
        }));
        assert!(!p.release(PortPair {
            rtp: 40001,
            rtcp: 40002
        }));
        assert!(!p.release(PortPair {
            rtp: 40000,
            rtcp: 40003
        }));
        assert_eq!(p.free(), 5);
    }

    /// Property: over many random take/release sequences, no pair is ever issued twice while
    /// held, free + used always equals the range, RTP is even and RTCP = RTP + 1.
    #[test]
    fn property_never_two_owners() {
        let mut rng = XorShift::new(0x5eed);
        for round in 0..300 {
            let min = 20000 + 2 * (rng.below(500) as u16);
            let pairs = 1 + rng.below(40);
            let max = min + 2 * pairs as u16 - 1 + rng.below(2) as u16;
            let mut pool = PortPool::new(min, max, rng.next()).unwrap();
            assert_eq!(pool.total(), pairs, "round {round}");
            let mut held: Vec<PortPair> = Vec::new();
            let mut held_set = HashSet::new();
            for _ in 0..500 {
                if rng.below(3) != 0 {
                    match pool.take() {
                        Some(pair) => {
                            assert_eq!(pair.rtp % 2, 0);
                            assert_eq!(pair.rtcp, pair.rtp + 1);
                            assert!(pair.rtp >= min && pair.rtcp <= max);
                            assert!(held_set.insert(pair.rtp), "pair {pair:?} issued twice");
                            held.push(pair);
                        }
                        None => assert_eq!(held.len(), pairs),
                    }
                } else if !held.is_empty() {
                    let pair = held.swap_remove(rng.below(held.len()));
                    held_set.remove(&pair.rtp);
                    assert!(pool.release(pair));
                    // A second release of the same pair is refused.
                    assert!(!pool.release(pair));
                }
                assert_eq!(pool.free() + pool.in_use(), pool.total());
                assert_eq!(pool.in_use(), held.len());
            }
        }
    }
}
