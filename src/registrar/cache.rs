//! The registrar's completed server transactions (RFC 3261 §17.2.2): a non-INVITE server
//! transaction over UDP stays Completed for Timer J (64·T1) after its final response, and
//! answers every retransmission of its request with that response; over TCP it ends at once
//! (and is not kept here). A Completed transaction is nothing more than that, so this table
//! keeps exactly that: what the response needs beyond the retransmitted request (its
//! [`crate::sip::reply::Reply::kept`] part) and Timer J's deadline per transaction key (about
//! 0.3 KB each, where the whole response cost about 0.6 KB and a whole `ServerTxn` with its key
//! twice about 1.3 KB; issue #15, registrar memory). Bounded in entries and bytes (the oldest go first when full) and swept
//! by time, so a flood of large REGISTERs cannot make the registrar hold more than
//! `limits.registrar_cache(_bytes)`. Pure: time is a parameter.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

/// Below this many slots a table is not worth shrinking.
const SHRINK_FLOOR: usize = 256;

/// Completed transactions by transaction key, oldest first.
#[derive(Debug)]
pub struct Completed {
    /// The kept part of each transaction's final response and its Timer J deadline.
    map: HashMap<Arc<str>, (Box<[u8]>, Instant)>,
    /// Keys in insertion order: Timer J is the same for every UDP transaction, so insertion
    /// order is expiry order.
    order: VecDeque<Arc<str>>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    /// Transactions dropped before their Timer J because the table was full.
    pub evicted: u64,
}

impl Completed {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
            evicted: 0,
        }
    }

    /// A retransmission of the request of `key`: what was kept of the final response to send
    /// again, or `None` when no transaction of that key is Completed at `now` (Timer J has
    /// fired at its deadline, even if the sweep has not come yet).
    pub fn retransmission(&self, key: &str, now: Instant) -> Option<&[u8]> {
        let (response, until) = self.map.get(key)?;
        (now < *until).then_some(&response[..])
    }

    /// Keeps the final `response` (what of it the table keeps) of the transaction `key`,
    /// Completed until `until` (its Timer J); makes room by dropping the oldest. One larger
    /// than the whole byte budget is not kept, nor a second one for a key already kept.
    pub fn insert(&mut self, key: String, response: Box<[u8]>, until: Instant) {
        let bytes = response.len();
        if bytes > self.max_bytes || self.map.contains_key(key.as_str()) {
            return;
        }
        while self.map.len() >= self.max_entries || self.bytes + bytes > self.max_bytes {
            if !self.pop_oldest() {
                break;
            }
            self.evicted += 1;
        }
        self.bytes += bytes;
        let key: Arc<str> = key.into();
        self.order.push_back(key.clone());
        self.map.insert(key, (response, until));
    }

    /// Drops the transactions whose Timer J has fired by `now`.
    pub fn sweep(&mut self, now: Instant) {
        while let Some(key) = self.order.front() {
            if self.map.get(key).is_some_and(|(_, until)| now < *until) {
                break;
            }
            self.pop_oldest();
        }
        self.shrink();
    }

    /// Gives back the room a burst left: the tables keep their capacity when emptied, so after
    /// a registration storm they would hold their peak size (tens of MB at 20,000 entries)
    /// for good. Shrinks to twice what is kept once that is under a quarter of the capacity,
    /// so a steady load never rehashes back and forth.
    fn shrink(&mut self) {
        let keep = (self.map.len() * 2).max(SHRINK_FLOOR);
        if self.map.capacity() / 4 > keep / 2 {
            self.map.shrink_to(keep);
        }
        if self.order.capacity() / 4 > keep / 2 {
            self.order.shrink_to(keep);
        }
    }

    /// Slots each table may keep without a sweep shrinking it.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.map.capacity().max(self.order.capacity())
    }

    fn pop_oldest(&mut self) -> bool {
        let Some(key) = self.order.pop_front() else {
            return false;
        };
        if let Some((b, _)) = self.map.remove(&key) {
            self.bytes -= b.len();
        }
        true
    }

    /// Transactions kept.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Response bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transaction::Timers;

    /// `len` bytes of `value`, as the table keeps them.
    fn bytes(value: u8, len: usize) -> Box<[u8]> {
        vec![value; len].into()
    }

    /// Timer J of a UDP transaction answered at `now`.
    fn timer_j(now: Instant) -> Instant {
        now + Timers::default().t1_x64()
    }

    #[test]
    fn a_retransmission_gets_the_same_answer_until_timer_j() {
        let t0 = Instant::now();
        let mut c = Completed::new(10, 1000);
        c.insert("a".into(), bytes(1, 10), timer_j(t0));
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(c.retransmission("a", at(1_000)), Some(&[1; 10][..]));
        assert_eq!(c.retransmission("a", at(31_999)), Some(&[1; 10][..]));
        c.sweep(at(31_999));
        assert_eq!(c.len(), 1, "kept before Timer J");
        assert_eq!(
            c.retransmission("a", at(32_000)),
            None,
            "Timer J (64·T1) fired"
        );
        c.sweep(at(32_000));
        assert!(c.is_empty());
        assert_eq!(c.bytes(), 0);
        assert_eq!(c.retransmission("b", t0), None, "unknown key");
    }

    #[test]
    fn bounded_in_entries_and_bytes() {
        let t0 = Instant::now();
        let until = timer_j(t0);
        let mut c = Completed::new(3, 100);
        for i in 0..5 {
            c.insert(format!("k{i}"), bytes(0, 10), until);
        }
        assert_eq!(c.len(), 3, "entry limit");
        assert_eq!(c.retransmission("k0", t0), None, "oldest evicted first");
        assert!(c.retransmission("k4", t0).is_some());
        assert_eq!(c.evicted, 2);
        c.insert("big".into(), bytes(0, 95), until);
        assert_eq!(c.bytes(), 95, "byte limit: everything older made room");
        assert!(c.retransmission("big", t0).is_some());
        c.insert("huge".into(), bytes(0, 101), until);
        assert!(
            c.retransmission("huge", t0).is_none(),
            "larger than the budget: not kept"
        );
        // The first transaction of a key is kept; a second changes nothing.
        c.insert("big".into(), bytes(1, 5), until);
        assert_eq!(c.retransmission("big", t0).map(|b| b.len()), Some(95));
    }

    #[test]
    fn a_burst_leaves_no_room_behind() {
        let t0 = Instant::now();
        let mut c = Completed::new(20_000, 16 << 20);
        for i in 0..10_000 {
            c.insert(format!("burst{i}"), bytes(0, 10), timer_j(t0));
        }
        assert!(c.capacity() >= 10_000);
        // The next transactions, a second later, outlive the burst.
        let t1 = t0 + Duration::from_secs(1);
        for i in 0..10 {
            c.insert(format!("later{i}"), bytes(0, 10), timer_j(t1));
        }
        c.sweep(timer_j(t0));
        assert_eq!(c.len(), 10);
        assert!(c.capacity() <= 2 * SHRINK_FLOOR, "{}", c.capacity());
        assert!(c.retransmission("later9", t1).is_some());
        // Under a steady load (more than a quarter of the room in use) nothing is shrunk.
        for i in 0..400 {
            c.insert(format!("steady{i}"), bytes(0, 10), timer_j(t1));
        }
        let room = c.capacity();
        c.sweep(t1);
        assert_eq!(c.capacity(), room);
    }
}
