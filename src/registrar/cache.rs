//! The responses a registrar shard sent, kept for Timer J (RFC 3261 §17.2.2: 64·T1 = 32 s) so
//! that a retransmitted REGISTER gets the same answer. Bounded in entries and bytes (the
//! oldest go first when full) and swept by time, so a flood of large REGISTERs cannot make
//! the registrar hold more than `limits.registrar_cache(_bytes)`. Pure: time is a parameter.

use std::collections::{HashMap, VecDeque};

/// Responses by transaction key, oldest first.
#[derive(Debug)]
pub struct ResponseCache {
    map: HashMap<String, (u64, Vec<u8>)>,
    /// (stored at, key) in insertion order; times never decrease.
    order: VecDeque<(u64, String)>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    ttl: u64,
    /// Entries dropped before their time because the cache was full.
    pub evicted: u64,
}

impl ResponseCache {
    pub fn new(max_entries: usize, max_bytes: usize, ttl: u64) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
            ttl,
            evicted: 0,
        }
    }

    /// The response sent for `key`, if it is still kept.
    pub fn get(&self, key: &str, now: u64) -> Option<&[u8]> {
        self.map
            .get(key)
            .filter(|(at, _)| at + self.ttl > now)
            .map(|(_, b)| b.as_slice())
    }

    /// Keeps a response; makes room by dropping the oldest. A response larger than the whole
    /// byte budget is not kept.
    pub fn insert(&mut self, key: String, now: u64, bytes: Vec<u8>) {
        if bytes.len() > self.max_bytes || self.map.contains_key(&key) {
            return;
        }
        while self.map.len() >= self.max_entries || self.bytes + bytes.len() > self.max_bytes {
            if !self.pop_oldest() {
                break;
            }
            self.evicted += 1;
        }
        self.bytes += bytes.len();
        self.order.push_back((now, key.clone()));
        self.map.insert(key, (now, bytes));
    }

    /// Drops what is older than the TTL.
    pub fn sweep(&mut self, now: u64) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| at + self.ttl <= now)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) -> bool {
        let Some((_, key)) = self.order.pop_front() else {
            return false;
        };
        if let Some((_, b)) = self.map.remove(&key) {
            self.bytes -= b.len();
        }
        true
    }

    /// Entries kept.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_for_the_ttl_then_swept() {
        let mut c = ResponseCache::new(10, 1000, 32);
        c.insert("a".into(), 100, vec![1; 10]);
        assert_eq!(c.get("a", 131), Some(&[1u8; 10][..]));
        assert_eq!(c.get("a", 132), None, "expired even before a sweep");
        c.sweep(131);
        assert_eq!(c.len(), 1);
        c.sweep(132);
        assert!(c.is_empty());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn bounded_in_entries_and_bytes() {
        let mut c = ResponseCache::new(3, 100, 32);
        for i in 0..5 {
            c.insert(format!("k{i}"), 100, vec![0; 10]);
        }
        assert_eq!(c.len(), 3, "entry limit");
        assert_eq!(c.get("k0", 100), None, "oldest evicted first");
        assert!(c.get("k4", 100).is_some());
        assert_eq!(c.evicted, 2);
        c.insert("big".into(), 101, vec![0; 95]);
        assert_eq!(c.bytes(), 95, "byte limit: everything older made room");
        assert!(c.get("big", 101).is_some());
        c.insert("huge".into(), 101, vec![0; 101]);
        assert!(
            c.get("huge", 101).is_none(),
            "larger than the budget: not kept"
        );
        // The first copy is kept; a second insert for the same key changes nothing.
        c.insert("big".into(), 102, vec![1; 5]);
        assert_eq!(c.get("big", 102).map(<[u8]>::len), Some(95));
    }
}
