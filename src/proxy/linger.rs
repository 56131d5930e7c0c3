//! Finished transactions waiting out their RFC timers, in one table.
//!
//! Over UDP a transaction outlives its final response by 32 s (RFC 3261 Timer J, RFC 6026
//! Timers L and M, Timer D) to absorb retransmissions, and for all that time it owed the
//! network very little: the final again for a retransmitted non-INVITE request, the ACK again
//! for a retransmitted non-2xx final, a 2xx passed on. Once [`ProxyTxn::retire`] says only
//! that is left, the transaction's task ends and what it owes comes here: a few hundred bytes
//! per transaction instead of the task with the whole request state (issue #15: memory and
//! CPU per transaction; Kamailio's tm keeps its cells on a wait timer list the same way).
//!
//! The receive path asks this table after the live tables ([`super::stateful`]) and acts on
//! the answer at once; nothing here waits. One sweeper task ends the entries whose deadline
//! passed, a tick at a time ([`SWEEP`] late at most: the timers are the least time to absorb,
//! not the most).
//!
//! [`ProxyTxn::retire`]: super::txn::ProxyTxn::retire

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::txn::{ClientRest, Finished, ServerRest};
use crate::sip::Message;
use crate::transaction::TxnKey;
use crate::transport::Transmit;

/// How often the sweeper ends the entries whose deadline passed.
pub const SWEEP: Duration = Duration::from_millis(100);

/// What to do with a request that matched a finished server transaction.
#[derive(Debug, PartialEq, Eq)]
pub enum ForRequest {
    /// Nothing: a retransmitted INVITE or ACK.
    Absorb,
    /// Send the final again (a retransmitted non-INVITE request).
    Resend(Transmit),
}

/// What to do with a response that matched a finished client transaction.
#[derive(Debug, PartialEq, Eq)]
pub enum ForResponse {
    /// Nothing: a retransmission the transaction already handled.
    Absorb,
    /// Send this (our ACK again, or the rewritten 2xx again).
    Send(Transmit),
    /// A 2xx for the caller: forward it statelessly, as after the transaction.
    Pass,
    /// A 2xx the transaction cannot carry (another To-tag on a relayed branch): drop it,
    /// counted as stray.
    Stray,
}

/// Bytes of an outsized message counted against `limits.transaction_memory` while its
/// transaction lives (here too: a finished one keeps its final).
#[derive(Debug, Default)]
pub struct MemCharge {
    pub bytes: usize,
    pub held: Option<Arc<AtomicUsize>>,
}

impl Drop for MemCharge {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            held.fetch_sub(self.bytes, Relaxed);
        }
    }
}

#[derive(Debug)]
struct ServerEntry {
    rest: ServerRest,
    _charge: MemCharge,
}

/// An entry's deadline, in the sweeper's heap (ordered by `at` only).
#[derive(Debug)]
struct Due {
    at: Instant,
    server: bool,
    key: Arc<TxnKey>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.cmp(&other.at)
    }
}

/// The finished transactions, by key (shared with the deadlines' heap).
#[derive(Debug, Default)]
pub struct Linger {
    server: DashMap<Arc<TxnKey>, ServerEntry>,
    client: DashMap<Arc<TxnKey>, ClientRest>,
    /// Earliest deadline first. A standard lock, by the same exception to clippy.toml as the
    /// transaction inbox: taken for one push or a run of pops, in synchronous code only.
    #[allow(clippy::disallowed_types)] // see above: never held across an await
    due: std::sync::Mutex<BinaryHeap<Reverse<Due>>>,
}

impl Linger {
    fn due(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Reverse<Due>>> {
        // A poisoned lock only means a thread panicked holding it: the heap is intact.
        self.due.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes over a retired transaction: `key` is its server key.
    pub fn insert(&self, key: &TxnKey, fin: Finished, charge: MemCharge) {
        let mut due = Vec::with_capacity(1 + fin.clients.len());
        if let Some((at, rest)) = fin.server {
            let key = Arc::new(key.clone());
            self.server.insert(
                key.clone(),
                ServerEntry {
                    rest,
                    _charge: charge,
                },
            );
            due.push(Due {
                at,
                server: true,
                key,
            });
        }
        for (key, at, rest) in fin.clients {
            let key = Arc::new(key);
            self.client.insert(key.clone(), rest);
            due.push(Due {
                at,
                server: false,
                key,
            });
        }
        let mut heap = self.due();
        heap.extend(due.into_iter().map(Reverse));
    }

    /// A request with the key of a finished server transaction: what to do with it (`None`:
    /// not ours). `ack`: the request is an ACK (never answered).
    pub fn on_request(&self, key: &TxnKey, ack: bool) -> Option<ForRequest> {
        let e = self.server.get(key)?;
        Some(match &e.rest {
            ServerRest::Resend(out) if !ack => ForRequest::Resend(out.clone()),
            _ => ForRequest::Absorb,
        })
    }

    /// Whether `key` (an INVITE's, from a CANCEL) is a finished server transaction.
    pub fn has_server(&self, key: &TxnKey) -> bool {
        self.server.contains_key(key)
    }

    /// A response with the key of a finished client transaction: what to do with it
    /// (`None`: not ours).
    pub fn on_response(&self, key: &TxnKey, resp: &Message) -> Option<ForResponse> {
        let rest = self.client.get(key)?;
        let status = resp.status().unwrap_or(0);
        let ok = (200..300).contains(&status);
        Some(match &*rest {
            ClientRest::Ack(ack) if status >= 300 => ForResponse::Send(ack.clone()),
            ClientRest::Pass if ok => ForResponse::Pass,
            ClientRest::Answer { tag, up } if ok => {
                let same = resp.to().ok().and_then(|t| t.tag()) == Some(tag.as_str());
                if same {
                    ForResponse::Send(up.clone())
                } else {
                    ForResponse::Stray
                }
            }
            _ => ForResponse::Absorb,
        })
    }

    /// Ends the entries whose deadline is at or before `now`; how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut ended = Vec::new();
        {
            let mut heap = self.due();
            while heap.peek().is_some_and(|d| d.0.at <= now) {
                if let Some(Reverse(d)) = heap.pop() {
                    ended.push(d);
                }
            }
            if heap.is_empty() {
                // After a load: give the heap's room back (it held every finished transaction).
                heap.shrink_to_fit();
            }
        }
        // Outside the heap's lock: the maps have their own.
        for d in &ended {
            if d.server {
                self.server.remove(&*d.key);
            } else {
                self.client.remove(&*d.key);
            }
        }
        if self.server.is_empty() && self.client.is_empty() {
            self.server.shrink_to_fit();
            self.client.shrink_to_fit();
        }
        ended.len()
    }

    /// The sweeper: ends due entries every [`SWEEP`] while the table lives.
    pub async fn sweep(me: Weak<Self>) {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(me) = me.upgrade() else { return };
            me.expire(Instant::now());
        }
    }

    /// Finished server transactions held (they count in `limits.transactions`).
    pub fn server_len(&self) -> usize {
        self.server.len()
    }

    /// Finished transactions held: (server, client).
    pub fn len(&self) -> (usize, usize) {
        (self.server.len(), self.client.len())
    }

    /// Up to `max` keys of each side, for `sipedge show transactions`.
    pub fn keys(&self, max: usize) -> (Vec<TxnKey>, Vec<TxnKey>) {
        let server = self.server.iter().take(max).map(|e| (**e.key()).clone());
        let client = self.client.iter().take(max).map(|e| (**e.key()).clone());
        (server.collect(), client.collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Framing;
    use crate::transport::Proto;

    fn key(branch: &str, method: &str) -> TxnKey {
        TxnKey::new(branch, "192.0.2.1:5060", method)
    }

    fn out(bytes: &[u8]) -> Transmit {
        Transmit {
            proto: Proto::Udp,
            local: "127.0.0.1:5060".parse().unwrap(),
            dest: "192.0.2.1:5060".parse().unwrap(),
            bytes: bytes.to_vec(),
        }
    }

    fn resp(status: u16, to_tag: &str) -> Message {
        let text = format!(
            "SIP/2.0 {status} X\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK-c\r\n\
From: <sip:a@x>;tag=f\r\nTo: <sip:b@x>;tag={to_tag}\r\nCall-ID: c\r\n\
CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(text.as_bytes(), Framing::Datagram).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn answers_for_the_finished_and_ends_them_at_their_deadlines() {
        let l = Linger::default();
        let now = Instant::now();
        let s = Duration::from_secs(1);
        l.insert(
            &key("bye", "BYE"),
            Finished {
                server: Some((now + 32 * s, ServerRest::Resend(out(b"200 BYE")))),
                clients: vec![(key("bye-c", "BYE"), now + 5 * s, ClientRest::Absorb)],
            },
            MemCharge::default(),
        );
        l.insert(
            &key("inv", "INVITE"),
            Finished {
                server: Some((now + 32 * s, ServerRest::Invite)),
                clients: vec![
                    (
                        key("inv-a", "INVITE"),
                        now + 32 * s,
                        ClientRest::Ack(out(b"ACK")),
                    ),
                    (
                        key("inv-b", "INVITE"),
                        now + 32 * s,
                        ClientRest::Answer {
                            tag: "t1".into(),
                            up: out(b"200 relayed"),
                        },
                    ),
                    (key("inv-c", "INVITE"), now + 32 * s, ClientRest::Pass),
                ],
            },
            MemCharge::default(),
        );
        assert_eq!(l.len(), (2, 4));
        // Server side: a retransmitted BYE gets its 200 again; INVITE and ACK are absorbed.
        let bye = key("bye", "BYE");
        assert_eq!(
            l.on_request(&bye, false),
            Some(ForRequest::Resend(out(b"200 BYE")))
        );
        let inv = key("inv", "INVITE");
        assert_eq!(l.on_request(&inv, false), Some(ForRequest::Absorb));
        assert_eq!(l.on_request(&inv, true), Some(ForRequest::Absorb));
        assert!(l.has_server(&inv));
        assert_eq!(l.on_request(&key("new", "INVITE"), false), None);
        // Client side.
        let a = key("inv-a", "INVITE");
        assert_eq!(
            l.on_response(&a, &resp(486, "x")),
            Some(ForResponse::Send(out(b"ACK")))
        );
        assert_eq!(
            l.on_response(&a, &resp(180, "x")),
            Some(ForResponse::Absorb)
        );
        let b = key("inv-b", "INVITE");
        assert_eq!(
            l.on_response(&b, &resp(200, "t1")),
            Some(ForResponse::Send(out(b"200 relayed")))
        );
        assert_eq!(
            l.on_response(&b, &resp(200, "t2")),
            Some(ForResponse::Stray)
        );
        assert_eq!(
            l.on_response(&b, &resp(183, "t1")),
            Some(ForResponse::Absorb)
        );
        let c = key("inv-c", "INVITE");
        assert_eq!(l.on_response(&c, &resp(200, "t9")), Some(ForResponse::Pass));
        assert_eq!(
            l.on_response(&key("bye-c", "BYE"), &resp(200, "t")),
            Some(ForResponse::Absorb)
        );
        assert_eq!(l.on_response(&key("other", "BYE"), &resp(200, "t")), None);
        // Deadlines: Timer K's entry first, then the rest.
        assert_eq!(l.expire(now + 4 * s), 0);
        assert_eq!(l.expire(now + 5 * s), 1);
        assert_eq!(l.on_response(&key("bye-c", "BYE"), &resp(200, "t")), None);
        assert_eq!(l.len(), (2, 3));
        assert_eq!(l.expire(now + 40 * s), 5);
        assert_eq!(l.len(), (0, 0));
        assert_eq!(l.on_request(&bye, false), None);
    }

    #[tokio::test(start_paused = true)]
    async fn its_share_of_the_memory_limit_goes_with_the_entry() {
        let l = Linger::default();
        let held = Arc::new(AtomicUsize::new(9000));
        let now = Instant::now();
        l.insert(
            &key("big", "MESSAGE"),
            Finished {
                server: Some((now, ServerRest::Resend(out(b"200")))),
                clients: Vec::new(),
            },
            MemCharge {
                bytes: 9000,
                held: Some(held.clone()),
            },
        );
        assert_eq!(held.load(Relaxed), 9000);
        l.expire(now);
        assert_eq!(held.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_ends_due_entries_and_stops_with_the_table() {
        let l = Arc::new(Linger::default());
        let now = Instant::now();
        l.insert(
            &key("x", "OPTIONS"),
            Finished {
                server: Some((now + Duration::from_secs(32), ServerRest::Invite)),
                clients: Vec::new(),
            },
            MemCharge::default(),
        );
        let sweeper = tokio::spawn(Linger::sweep(Arc::downgrade(&l)));
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(l.len(), (1, 0));
        tokio::time::sleep(Duration::from_secs(1) + 2 * SWEEP).await;
        assert_eq!(l.len(), (0, 0));
        drop(l);
        tokio::time::sleep(2 * SWEEP).await;
        assert!(sweeper.is_finished());
    }
}
