//! The registrar's completed server transactions (RFC 3261 §17.2.2): each final response is
//! sent through a non-INVITE [`ServerTxn`], which stays Completed for Timer J (64·T1 on UDP,
//! none on TCP) so that a retransmitted REGISTER gets the same answer from the same state
//! machine the proxy uses. Bounded in entries and bytes (the oldest go first when full) and
//! swept by time, so a flood of large REGISTERs cannot make the registrar hold more than
//! `limits.registrar_cache(_bytes)`. Pure: time is a parameter.

use std::collections::{HashMap, VecDeque};

use tokio::time::Instant;

use crate::transaction::{ServerAction, ServerState, ServerTxn};

/// Completed transactions by transaction key, oldest first.
#[derive(Debug)]
pub struct Completed {
    /// Transaction and the size of its response.
    map: HashMap<String, (ServerTxn, usize)>,
    /// Keys in insertion order. Timer J is the same for every UDP transaction and TCP ones are
    /// never kept, so insertion order is expiry order.
    order: VecDeque<String>,
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

    /// A retransmission of the request of `key`: what its transaction sends again (its final
    /// response), or `None` when no transaction of that key is Completed at `now`.
    pub fn retransmission(&mut self, key: &str, now: Instant) -> Option<Vec<u8>> {
        let (txn, _) = self.map.get_mut(key)?;
        txn.on_timer(now);
        txn.on_request_retransmission(now);
        let mut resend = None;
        while let Some(action) = txn.poll_action() {
            if let ServerAction::Send(bytes) = action {
                resend = Some(bytes);
            }
        }
        resend
    }

    /// Keeps a transaction that has sent its final response, while it is Completed (a reliable
    /// one is Terminated at once and not kept); makes room by dropping the oldest. One whose
    /// response is larger than the whole byte budget is not kept.
    pub fn insert(&mut self, key: String, txn: ServerTxn, bytes: usize) {
        if txn.state() != ServerState::Completed
            || bytes > self.max_bytes
            || self.map.contains_key(&key)
        {
            return;
        }
        while self.map.len() >= self.max_entries || self.bytes + bytes > self.max_bytes {
            if !self.pop_oldest() {
                break;
            }
            self.evicted += 1;
        }
        self.bytes += bytes;
        self.order.push_back(key.clone());
        self.map.insert(key, (txn, bytes));
    }

    /// Drops the transactions whose Timer J has fired by `now`.
    pub fn sweep(&mut self, now: Instant) {
        while let Some(key) = self.order.front() {
            let done = self.map.get_mut(key).is_none_or(|(txn, _)| {
                txn.on_timer(now);
                txn.state() == ServerState::Terminated
            });
            if !done {
                break;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) -> bool {
        let Some(key) = self.order.pop_front() else {
            return false;
        };
        if let Some((_, b)) = self.map.remove(&key) {
            self.bytes -= b;
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
    use crate::transaction::{Kind, Timers};

    /// A non-INVITE server transaction that answered `bytes` at `now`.
    fn answered(reliable: bool, bytes: Vec<u8>, now: Instant) -> ServerTxn {
        let mut t = ServerTxn::new(Kind::NonInvite, reliable, Timers::default(), now);
        t.respond(200, bytes, now);
        while t.poll_action().is_some() {}
        t
    }

    #[test]
    fn a_retransmission_gets_the_same_answer_until_timer_j() {
        let t0 = Instant::now();
        let mut c = Completed::new(10, 1000);
        c.insert("a".into(), answered(false, vec![1; 10], t0), 10);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(c.retransmission("a", at(1_000)), Some(vec![1; 10]));
        assert_eq!(c.retransmission("a", at(31_999)), Some(vec![1; 10]));
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
    }

    #[test]
    fn a_reliable_transaction_is_not_kept() {
        let t0 = Instant::now();
        let mut c = Completed::new(10, 1000);
        c.insert("tcp".into(), answered(true, vec![1; 10], t0), 10);
        assert!(c.is_empty(), "Timer J is 0 on TCP: terminated at once");
        assert_eq!(c.retransmission("tcp", t0), None);
    }

    #[test]
    fn bounded_in_entries_and_bytes() {
        let t0 = Instant::now();
        let mut c = Completed::new(3, 100);
        for i in 0..5 {
            c.insert(format!("k{i}"), answered(false, vec![0; 10], t0), 10);
        }
        assert_eq!(c.len(), 3, "entry limit");
        assert_eq!(c.retransmission("k0", t0), None, "oldest evicted first");
        assert!(c.retransmission("k4", t0).is_some());
        assert_eq!(c.evicted, 2);
        c.insert("big".into(), answered(false, vec![0; 95], t0), 95);
        assert_eq!(c.bytes(), 95, "byte limit: everything older made room");
        assert!(c.retransmission("big", t0).is_some());
        c.insert("huge".into(), answered(false, vec![0; 101], t0), 101);
        assert!(
            c.retransmission("huge", t0).is_none(),
            "larger than the budget: not kept"
        );
        // The first transaction of a key is kept; a second changes nothing.
        c.insert("big".into(), answered(false, vec![1; 5], t0), 5);
        assert_eq!(c.retransmission("big", t0).map(|b| b.len()), Some(95));
    }
}
