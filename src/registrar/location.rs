//! The location service (Kamailio `usrloc` in WRITE_THROUGH mode): bindings by
//! address-of-record in memory for lookups, an expiry index so that expired bindings are
//! purged at their deadline (no periodic scans), and the store behind it.

use std::collections::BTreeSet;
use std::sync::Arc;

use dashmap::DashMap;

use crate::metrics::Registry;

pub use crate::store::Binding;

/// In-memory bindings plus their expiry index.
#[derive(Debug, Default)]
pub struct Location {
    by_aor: DashMap<String, Vec<Binding>>,
    /// (expires, aor, contact); entries may be stale (a refreshed binding leaves its old
    /// deadline here), which the purge checks against the live binding.
    expiry: tokio::sync::Mutex<BTreeSet<(u64, String, String)>>,
    /// Wakes the purge task when a deadline earlier than the one it sleeps on appears.
    pub(crate) changed: tokio::sync::Notify,
}

impl Location {
    pub fn new() -> Self {
        Self::default()
    }

    /// The live bindings of an AOR at `now`, highest q first.
    pub fn lookup(&self, aor: &str, now: u64) -> Vec<Binding> {
        let mut v: Vec<Binding> = self
            .by_aor
            .get(aor)
            .map(|b| b.iter().filter(|b| b.expires > now).cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|b| std::cmp::Reverse(b.q));
        v
    }

    /// Replaces the bindings of one AOR (after the store accepted the change).
    pub async fn set(&self, aor: &str, bindings: Vec<Binding>) {
        let old = self.by_aor.get(aor).map(|v| v.clone()).unwrap_or_default();
        let wake = {
            let mut idx = self.expiry.lock().await;
            let first_before = idx.first().map(|(t, _, _)| *t);
            for b in &old {
                idx.remove(&(b.expires, b.aor.clone(), b.contact.clone()));
            }
            for b in &bindings {
                idx.insert((b.expires, b.aor.clone(), b.contact.clone()));
            }
            // The purge task only needs waking when the earliest deadline moved earlier.
            let first_after = idx.first().map(|(t, _, _)| *t);
            matches!((first_before, first_after), (None, Some(_)))
                || matches!((first_before, first_after), (Some(b), Some(a)) if a < b)
        };
        if bindings.is_empty() {
            self.by_aor.remove(aor);
        } else {
            self.by_aor.insert(aor.to_owned(), bindings);
        }
        if wake {
            self.changed.notify_one();
        }
    }

    /// Loads bindings read from the store at start.
    pub async fn load(&self, bindings: Vec<Binding>) {
        let mut by: std::collections::HashMap<String, Vec<Binding>> = Default::default();
        for b in bindings {
            by.entry(b.aor.clone()).or_default().push(b);
        }
        for (aor, v) in by {
            self.set(&aor, v).await;
        }
    }

    /// The earliest deadline in the index.
    pub async fn next_deadline(&self) -> Option<u64> {
        self.expiry.lock().await.first().map(|(t, _, _)| *t)
    }

    /// Removes every binding whose deadline is at or before `now` from memory and returns
    /// them (for logging and for the store).
    pub async fn purge(&self, now: u64) -> Vec<Binding> {
        let mut due = Vec::new();
        {
            let mut idx = self.expiry.lock().await;
            while let Some(first) = idx.first() {
                if first.0 > now {
                    break;
                }
                if let Some(e) = idx.pop_first() {
                    due.push(e);
                }
            }
        }
        let mut expired = Vec::new();
        for (t, aor, contact) in due {
            let mut now_empty = false;
            if let Some(mut list) = self.by_aor.get_mut(&aor) {
                // Only if the live binding still has this deadline (not refreshed since).
                if let Some(pos) = list
                    .iter()
                    .position(|b| b.contact == contact && b.expires == t)
                {
                    expired.push(list.remove(pos));
                }
                now_empty = list.is_empty();
            }
            if now_empty {
                self.by_aor.remove_if(&aor, |_, v| v.is_empty());
            }
        }
        expired
    }

    /// A copy of every binding (for the keepalive pinger, which walks them all once per
    /// interval).
    pub fn snapshot(&self) -> Vec<Binding> {
        self.by_aor.iter().flat_map(|e| e.value().clone()).collect()
    }

    /// Removes one binding from memory if it is still the one refreshed at `updated` (a
    /// REGISTER that refreshed it meanwhile wins). True when it was removed.
    pub fn remove_if_unchanged(&self, aor: &str, contact: &str, updated: u64) -> bool {
        let mut removed = false;
        let mut now_empty = false;
        if let Some(mut list) = self.by_aor.get_mut(aor) {
            if let Some(pos) = list
                .iter()
                .position(|b| b.contact == contact && b.updated == updated)
            {
                list.remove(pos);
                removed = true;
            }
            now_empty = list.is_empty();
        }
        if now_empty {
            self.by_aor.remove_if(aor, |_, v| v.is_empty());
        }
        // The expiry index keeps the old deadline; purge skips entries with no live binding.
        removed
    }

    /// Number of AORs with at least one binding.
    pub fn aor_count(&self) -> usize {
        self.by_aor.len()
    }

    /// Number of bindings.
    pub fn binding_count(&self) -> usize {
        self.by_aor.iter().map(|e| e.value().len()).sum()
    }

    /// Registers the binding and address-of-record gauges (walks the map at each read).
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        let l = Arc::downgrade(self);
        m.gauge("registrar_bindings", "Registered contacts.", move || {
            l.upgrade().map_or(0, |l| l.binding_count() as u64)
        });
        let l = Arc::downgrade(self);
        m.gauge(
            "registrar_aors",
            "Addresses-of-record with a contact.",
            move || l.upgrade().map_or(0, |l| l.by_aor.len() as u64),
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::transport::Proto;

    pub(crate) fn binding(aor: &str, contact: &str, expires: u64, q: u16) -> Binding {
        Binding {
            aor: aor.into(),
            contact: contact.into(),
            received: "192.0.2.1:5060".parse().unwrap(),
            transport: Proto::Udp,
            local_socket: "127.0.0.1:5060".parse().unwrap(),
            instance: "i".into(),
            expires,
            q,
            call_id: "c".into(),
            cseq: 1,
            user_agent: String::new(),
            path: String::new(),
            instance_urn: String::new(),
            updated: 0,
        }
    }

    #[tokio::test]
    async fn lookup_orders_by_q_and_purge_respects_refresh() {
        let loc = Location::new();
        loc.set(
            "a@x",
            vec![
                binding("a@x", "sip:1@h", 100, 500),
                binding("a@x", "sip:2@h", 200, 900),
            ],
        )
        .await;
        let l = loc.lookup("a@x", 50);
        assert_eq!(l[0].contact, "sip:2@h");
        assert_eq!(loc.next_deadline().await, Some(100));
        // Refresh contact 1 to 300: its old deadline (100) must not remove it.
        loc.set(
            "a@x",
            vec![
                binding("a@x", "sip:1@h", 300, 500),
                binding("a@x", "sip:2@h", 200, 900),
            ],
        )
        .await;
        assert!(loc.purge(150).await.is_empty());
        let gone = loc.purge(250).await;
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].contact, "sip:2@h");
        assert_eq!(loc.binding_count(), 1);
        assert_eq!(loc.purge(300).await.len(), 1);
        assert_eq!(loc.aor_count(), 0);
        assert_eq!(loc.next_deadline().await, None);
    }
}
