//! Which REGISTERs of a shard may be processed now: several at once, but one address-of-record's
//! in arrival order, one at a time.
//!
//! A REGISTER's decision (RFC 3261 §10.3 steps 6-8) reads the bindings the previous REGISTER
//! of the same AOR left in memory, and memory is updated only once the store has committed
//! them (write-through). So two REGISTERs of one AOR must not overlap; REGISTERs of different
//! AORs may, and must, or a shard spends its time waiting for one commit after another and its
//! rate is bounded by the commit latency instead of the CPU (issue #15: the registrar's search
//! ended on 503s from full shard queues with the cores half idle). Overlapping REGISTERs also
//! let the binding writer's group commit gather bigger batches.
//!
//! Pure and bounded: the caller stops taking new REGISTERs while [`Order::has_room`] is false,
//! so a shard holds at most `running + waiting` of them beyond its queue.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// The running and waiting REGISTERs of one shard, by AOR key.
#[derive(Debug)]
pub struct Order<T> {
    /// The AORs with a REGISTER running.
    busy: HashSet<Arc<str>>,
    /// Taken from the queue but not started: their AOR is busy, or `max_running` are running.
    waiting: VecDeque<(Arc<str>, T)>,
    max_running: usize,
    max_waiting: usize,
}

impl<T> Order<T> {
    pub fn new(max_running: usize, max_waiting: usize) -> Self {
        Self {
            busy: HashSet::new(),
            waiting: VecDeque::new(),
            max_running: max_running.max(1),
            max_waiting: max_waiting.max(1),
        }
    }

    /// Whether another REGISTER may be taken from the queue.
    pub fn has_room(&self) -> bool {
        self.waiting.len() < self.max_waiting
    }

    /// REGISTERs running (started and not yet [`Self::done`]).
    pub fn running(&self) -> usize {
        self.busy.len()
    }

    /// REGISTERs waiting to start.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// A REGISTER of `aor` arrives: returned when it may start now (the caller runs it and
    /// calls [`Self::done`] with its AOR when it ends), kept in order otherwise.
    ///
    /// Invariant kept by every method: either `max_running` are running or every waiting
    /// REGISTER's AOR is busy. So a new REGISTER whose AOR is not busy has no earlier one of
    /// its AOR waiting, and starting it at once keeps the AOR's order.
    pub fn arrive(&mut self, aor: Arc<str>, item: T) -> Option<(Arc<str>, T)> {
        if self.busy.len() < self.max_running && !self.busy.contains(&aor) {
            self.busy.insert(aor.clone());
            Some((aor, item))
        } else {
            self.waiting.push_back((aor, item));
            None
        }
    }

    /// The REGISTER of `aor` that was running has ended: the waiting ones that may start now,
    /// each AOR's oldest first.
    pub fn done(&mut self, aor: &str) -> Vec<(Arc<str>, T)> {
        self.busy.remove(aor);
        let mut start = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() && self.busy.len() < self.max_running {
            if self.busy.contains(&self.waiting[i].0) {
                i += 1;
                continue;
            }
            // invariant: i < waiting.len() (the loop condition).
            let (key, item) = self.waiting.remove(i).expect("index in range");
            self.busy.insert(key.clone());
            start.push((key, item));
        }
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Arc<str> {
        s.into()
    }

    fn started(v: Vec<(Arc<str>, u32)>) -> Vec<u32> {
        v.into_iter().map(|(_, n)| n).collect()
    }

    #[test]
    fn different_aors_run_together_one_aor_in_order() {
        let mut o = Order::new(4, 8);
        assert_eq!(o.arrive(k("a"), 1).map(|s| s.1), Some(1));
        assert_eq!(o.arrive(k("b"), 2).map(|s| s.1), Some(2));
        // a's second and third wait for the first, in order.
        assert!(o.arrive(k("a"), 3).is_none());
        assert!(o.arrive(k("a"), 4).is_none());
        assert_eq!(o.arrive(k("c"), 5).map(|s| s.1), Some(5));
        assert_eq!((o.running(), o.waiting()), (3, 2));
        // b ends: nothing of a may start yet.
        assert!(o.done("b").is_empty());
        assert_eq!(started(o.done("a")), vec![3]);
        assert_eq!(started(o.done("a")), vec![4]);
        assert!(o.done("a").is_empty());
        assert!(o.done("c").is_empty());
        assert_eq!((o.running(), o.waiting()), (0, 0));
    }

    #[test]
    fn the_running_limit_holds_and_frees_in_arrival_order() {
        let mut o = Order::new(2, 8);
        assert!(o.arrive(k("a"), 1).is_some());
        assert!(o.arrive(k("b"), 2).is_some());
        // Full: c, d and b's next wait, even though c and d are free.
        assert!(o.arrive(k("c"), 3).is_none());
        assert!(o.arrive(k("b"), 4).is_none());
        assert!(o.arrive(k("d"), 5).is_none());
        // a ends: one slot, the oldest startable (c).
        assert_eq!(started(o.done("a")), vec![3]);
        // b ends: its own next is the oldest startable.
        assert_eq!(started(o.done("b")), vec![4]);
        assert_eq!(started(o.done("c")), vec![5]);
        // A new REGISTER of a free AOR while nothing startable waits starts at once.
        assert!(o.arrive(k("e"), 6).is_none(), "two running: b and d");
        assert_eq!(started(o.done("d")), vec![6]);
    }

    #[test]
    fn a_newcomer_never_overtakes_its_own_aor() {
        // Running full with a waiting for its slot: when a slot frees, the waiting a goes
        // first, and an a that arrives while the first a runs waits behind it.
        let mut o = Order::new(1, 8);
        assert!(o.arrive(k("x"), 1).is_some());
        assert!(o.arrive(k("a"), 2).is_none());
        assert_eq!(started(o.done("x")), vec![2]);
        assert!(o.arrive(k("a"), 3).is_none());
        assert_eq!(started(o.done("a")), vec![3]);
    }

    #[test]
    fn room_is_bounded_by_the_waiting() {
        let mut o = Order::new(1, 2);
        assert!(o.arrive(k("a"), 1).is_some());
        assert!(o.has_room());
        assert!(o.arrive(k("a"), 2).is_none());
        assert!(o.arrive(k("b"), 3).is_none());
        assert!(!o.has_room());
        assert_eq!(started(o.done("a")), vec![2]);
        assert!(o.has_room());
    }
}
