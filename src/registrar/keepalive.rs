//! Keepalives to phones behind NAT (nathelper's `natping_interval`): every
//! `nat.ping_interval`, each UDP binding of this instance whose phone is behind NAT gets an
//! OPTIONS request or a CRLF datagram, sent from the socket its REGISTER arrived on to the
//! address it came from, so the router keeps the binding open for incoming calls.
//!
//! The pings of one interval are spread over it: a binding always falls in the same of
//! [`SLOTS`] slots (a hash of its contact), so each phone sees one ping every interval and
//! the server never sends ten thousand at once. OPTIONS pings are well-formed requests
//! (kamailio#1481, #1587: phones that validate From/To/Call-ID reply 400 or drop malformed
//! ones); their answers are matched by branch and reset the binding's failure count. A binding
//! that leaves `nat.ping_failures` pings in a row unanswered is logged, and removed when
//! `nat.ping_remove` is set. TCP bindings are not pinged: the phone keeps its connection open
//! and requests reuse it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use tokio::sync::watch;
use tracing::warn;

use crate::clock::Clock;
use crate::config::{LiveConfig, NatConfig, PingMethod};
use crate::metrics::Registry;
use crate::nat::detect::is_private;
use crate::registrar::location::{Binding, LocationService};
use crate::sip::{Message, SipUri};
use crate::transport::{Proto, Transmit, Transports};

/// How many parts an interval is cut into.
pub const SLOTS: u32 = 10;

/// Branch prefix of our pings (RFC 3261 magic cookie first), so that answers are recognised
/// before the proxy looks for a transaction.
pub const BRANCH_PREFIX: &str = "z9hG4bK-ka-";

/// True when `b` needs keepalives from this instance: a UDP binding registered here through
/// NAT ([`Binding::nated`], nathelper's `fix_nated_register` condition) whose Contact is
/// private or is not where the REGISTER came from. A binding reached at its Contact (a
/// public phone, a third-party registration) holds no NAT binding open.
pub fn needs_ping(b: &Binding, instance: &str) -> bool {
    if b.transport != Proto::Udp || b.instance != instance || !b.nated {
        return false;
    }
    let Ok(uri) = SipUri::parse(&b.contact) else {
        return false;
    };
    match uri.ip() {
        Some(ip) => is_private(ip) || SocketAddr::new(ip, uri.port.unwrap_or(5060)) != b.received,
        // A host name in Contact: the phone cannot be reached by it from here either.
        None => true,
    }
}

/// The slot (0..SLOTS) a binding is pinged in.
pub fn slot(b: &Binding) -> u32 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.aor.hash(&mut h);
    b.contact.hash(&mut h);
    // invariant: the remainder of a division by SLOTS fits in u32.
    u32::try_from(h.finish() % u64::from(SLOTS)).unwrap_or(0)
}

/// An OPTIONS keepalive for one binding (RFC 3261 §11: a request any UA answers).
pub fn options_request(b: &Binding, via: SocketAddr, seq: u64, salt: &str) -> Vec<u8> {
    let host = match via.ip() {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    };
    let port = via.port();
    format!(
        "OPTIONS {contact} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {host}:{port};branch={BRANCH_PREFIX}{seq:x}-{salt};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:sipedge@{host}>;tag=ka{seq:x}-{salt}\r\n\
         To: <{contact}>\r\n\
         Call-ID: ka{seq:x}-{salt}@{host}\r\n\
         CSeq: 1 OPTIONS\r\n\
         User-Agent: sipedge keepalive\r\n\
         Content-Length: 0\r\n\r\n",
        contact = b.contact,
    )
    .into_bytes()
}

/// Consecutive unanswered pings per binding (pure; the pinger feeds it).
#[derive(Debug, Default)]
pub struct Failures {
    /// (aor, contact) → (branch of the outstanding ping, misses so far).
    outstanding: HashMap<(String, String), (u64, u32)>,
}

impl Failures {
    /// A ping with sequence `seq` goes out; returns the misses counted so far (the previous
    /// ping counts as missed when it is still outstanding).
    pub fn on_sent(&mut self, aor: &str, contact: &str, seq: u64) -> u32 {
        let e = self
            .outstanding
            .entry((aor.to_owned(), contact.to_owned()))
            .or_insert((seq, 0));
        if e.0 != seq {
            e.1 += 1;
            e.0 = seq;
        }
        e.1
    }

    /// The answer to ping `seq` arrived: the binding is alive.
    pub fn on_answer(&mut self, seq: u64) {
        self.outstanding.retain(|_, (s, _)| *s != seq);
    }

    /// Forgets bindings that are gone.
    pub fn forget(&mut self, aor: &str, contact: &str) {
        self.outstanding
            .remove(&(aor.to_owned(), contact.to_owned()));
    }

    /// Keeps only the bindings for which `live(aor, contact)` holds.
    pub fn retain(&mut self, live: impl Fn(&str, &str) -> bool) {
        self.outstanding
            .retain(|(aor, contact), _| live(aor, contact));
    }

    /// Bindings with a ping outstanding.
    pub fn len(&self) -> usize {
        self.outstanding.len()
    }

    /// True when no ping is outstanding.
    pub fn is_empty(&self) -> bool {
        self.outstanding.is_empty()
    }
}

/// The sequence number in one of our ping branches.
pub fn seq_of_branch(branch: &str) -> Option<u64> {
    let rest = branch.strip_prefix(BRANCH_PREFIX)?;
    u64::from_str_radix(rest.split('-').next()?, 16).ok()
}

/// Resolves at the next reload. The sender lives in the [`LiveConfig`] the pinger holds, so
/// it is never dropped while the pinger runs; if it were, this would wait forever (no more
/// reloads) instead of spinning.
async fn next_reload(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sends the pings and counts their answers.
pub struct Pinger {
    /// `[nat]` is live: loaded once per slot, and a new interval starts a new schedule.
    cfg: Arc<LiveConfig>,
    location: Arc<dyn LocationService>,
    transports: Arc<Transports>,
    clock: Arc<dyn Clock>,
    /// Our UDP sockets: local address → address written in Via.
    vias: HashMap<SocketAddr, SocketAddr>,
    salt: String,
    seq: AtomicU64,
    failures: tokio::sync::Mutex<Failures>,
    /// Answers received since the pinger last looked (the receive path records them here
    /// without waiting for the `failures` lock; bounded by `pending`).
    answers: DashMap<u64, ()>,
    /// Pings answered, for tests and the log.
    answered: AtomicU64,
    sent: AtomicU64,
    /// Bindings that reached `nat.ping_failures` unanswered pings in a row.
    unreachable_count: AtomicU64,
    /// Seq → binding, for answers (bounded: entries older than one interval are dropped).
    pending: DashMap<u64, ()>,
    /// The first sequence number of the previous interval (pending answers older than it
    /// are dropped).
    cycle_start: AtomicU64,
}

impl Pinger {
    pub fn new(
        cfg: Arc<LiveConfig>,
        location: Arc<dyn LocationService>,
        transports: Arc<Transports>,
        clock: Arc<dyn Clock>,
        local: &[(Proto, SocketAddr)],
    ) -> Self {
        // `server.advertise` needs a restart: read once.
        let advertise = cfg.load().server.advertise;
        let vias = local
            .iter()
            .filter(|(p, _)| *p == Proto::Udp)
            .map(|(_, a)| (*a, SocketAddr::new(advertise, a.port())))
            .collect();
        let salt = format!("{:x}", clock.unix() ^ u64::from(std::process::id()) << 32);
        Self {
            cfg,
            location,
            transports,
            clock,
            vias,
            salt,
            seq: AtomicU64::new(1),
            failures: tokio::sync::Mutex::new(Failures::default()),
            answers: DashMap::new(),
            answered: AtomicU64::new(0),
            unreachable_count: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            pending: DashMap::new(),
            cycle_start: AtomicU64::new(0),
        }
    }

    /// Registers the ping counters.
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        let p = Arc::downgrade(self);
        m.counter(
            "nat_pings_sent",
            "Keepalive pings sent to NATed bindings.",
            move || p.upgrade().map_or(0, |p| p.counts().0),
        );
        let p = Arc::downgrade(self);
        m.counter(
            "nat_pings_answered",
            "Keepalive OPTIONS pings answered.",
            move || p.upgrade().map_or(0, |p| p.counts().1),
        );
        let p = Arc::downgrade(self);
        m.counter(
            "nat_bindings_unreachable",
            "NATed bindings that left nat.ping_failures keepalives in a row unanswered.",
            move || {
                p.upgrade()
                    .map_or(0, |p| p.unreachable_count.load(Ordering::Relaxed))
            },
        );
    }

    /// (pings sent, pings answered) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed),
        )
    }

    /// True when `resp` answers one of our pings (and was consumed).
    pub fn on_response(&self, resp: &Message) -> bool {
        let Some(seq) = resp
            .top_via()
            .ok()
            .and_then(|v| v.branch())
            .and_then(seq_of_branch)
        else {
            return false;
        };
        if self.pending.remove(&seq).is_some() {
            self.answered.fetch_add(1, Ordering::Relaxed);
            self.answers.insert(seq, ());
        }
        true
    }

    /// The failure counts, with the answers received meanwhile applied.
    async fn failures(&self) -> tokio::sync::MutexGuard<'_, Failures> {
        let mut f = self.failures.lock().await;
        let answered: Vec<u64> = self.answers.iter().map(|e| *e.key()).collect();
        for seq in answered {
            self.answers.remove(&seq);
            f.on_answer(seq);
        }
        f
    }

    /// Pings until `shutdown`. `nat.ping_interval` is read again after each reload: a new
    /// interval starts a new schedule, 0 stops the pings until a reload sets one.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut reloaded = self.cfg.subscribe();
        loop {
            let interval = self.cfg.load().nat.ping_interval;
            let Some(interval) = interval else {
                tokio::select! {
                    _ = next_reload(&mut reloaded) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            };
            let mut tick = tokio::time::interval(interval / SLOTS);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut slot_now = 0u32;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                    _ = next_reload(&mut reloaded) => {
                        if self.cfg.load().nat.ping_interval == Some(interval) {
                            continue;
                        }
                        break;
                    }
                }
                self.ping_slot(slot_now).await;
                slot_now = (slot_now + 1) % SLOTS;
            }
        }
    }

    /// Pings every binding of one slot.
    async fn ping_slot(&self, which: u32) {
        let cfg = self.cfg.load();
        let nat = &cfg.nat;
        let now = self.clock.unix();
        let instance = &cfg.server.instance_id;
        if which == 0 {
            // Once per interval: answers older than the previous interval no longer count,
            // and bindings that are gone (unregistered, or expired and purged) are
            // forgotten (the table holds only bindings with a ping outstanding).
            let first = self
                .cycle_start
                .swap(self.seq.load(Ordering::Relaxed), Ordering::Relaxed);
            self.pending.retain(|s, _| *s >= first);
            let location = &self.location;
            self.failures().await.retain(|aor, contact| {
                location.lookup(aor, 0).iter().any(|b| b.contact == contact)
            });
        }
        let due = self
            .location
            .select(&|b: &Binding| b.expires > now && slot(b) == which && needs_ping(b, instance));
        for b in due {
            let Some(&via) = self.vias.get(&b.local_socket) else {
                continue;
            };
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let bytes = match nat.ping_method {
                PingMethod::Options => options_request(&b, via, seq, &self.salt),
                // RFC 5626 §4.4.1 uses CRLF over streams; over UDP phones ignore the bare CRLF,
                // which is all the router needs to see.
                PingMethod::Crlf => b"\r\n\r\n".to_vec(),
            };
            self.sent.fetch_add(1, Ordering::Relaxed);
            self.transports.send(Transmit {
                proto: Proto::Udp,
                local: b.local_socket,
                dest: b.received,
                bytes,
            });
            if nat.ping_method == PingMethod::Crlf {
                continue;
            }
            self.pending.insert(seq, ());
            let misses = self.failures().await.on_sent(&b.aor, &b.contact, seq);
            if misses >= nat.ping_failures {
                self.unreachable(nat, &b, misses).await;
            }
        }
    }

    /// A binding stopped answering.
    async fn unreachable(&self, nat: &NatConfig, b: &Binding, misses: u32) {
        if misses == nat.ping_failures {
            self.unreachable_count.fetch_add(1, Ordering::Relaxed);
        }
        if !nat.ping_remove {
            if misses == nat.ping_failures {
                warn!(aor = %b.aor, contact = %b.contact, peer.addr = %b.received, misses, "NATed contact does not answer keepalives");
            }
            return;
        }
        // Removed from memory first, so a store error still takes the binding out of service
        // (a restart would bring it back; its next missed pings remove it again).
        match self.location.remove_unreachable(b).await {
            Ok(false) => return,
            Ok(true) => {}
            Err(error) => {
                warn!(%error, aor = %b.aor, "removing an unreachable binding from the store");
            }
        }
        self.failures().await.forget(&b.aor, &b.contact);
        warn!(aor = %b.aor, contact = %b.contact, peer.addr = %b.received, misses, "binding removed: keepalives unanswered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Framing;

    fn binding(contact: &str, received: &str, transport: Proto) -> Binding {
        let mut b =
            crate::registrar::location::tests::binding("alice@example.com", contact, 100, 1000);
        b.received = received.parse().unwrap();
        b.transport = transport;
        b.instance = "i1".into();
        b
    }

    #[test]
    fn which_bindings_are_pinged() {
        // Private Contact: behind NAT.
        assert!(needs_ping(
            &binding("sip:a@192.168.1.2:5060", "203.0.113.9:40000", Proto::Udp),
            "i1"
        ));
        // Public Contact, but the REGISTER came from another port: a NAT kept the address.
        assert!(needs_ping(
            &binding("sip:a@203.0.113.9:5060", "203.0.113.9:40000", Proto::Udp),
            "i1"
        ));
        // A contact registered by a third party (not NATed): reached at its Contact, no ping.
        let mut third_party = binding("sip:a@198.51.100.7:5060", "203.0.113.9:5060", Proto::Udp);
        third_party.nated = false;
        assert!(!needs_ping(&third_party, "i1"));
        // Public Contact where the REGISTER came from: not NATed.
        assert!(!needs_ping(
            &binding("sip:a@203.0.113.9:5060", "203.0.113.9:5060", Proto::Udp),
            "i1"
        ));
        assert!(!needs_ping(
            &binding("sip:a@203.0.113.9", "203.0.113.9:5060", Proto::Udp),
            "i1"
        ));
        // TCP: the connection is the keepalive.
        assert!(!needs_ping(
            &binding("sip:a@192.168.1.2:5060", "203.0.113.9:40000", Proto::Tcp),
            "i1"
        ));
        // Registered through another instance: its owner pings it.
        assert!(!needs_ping(
            &binding("sip:a@192.168.1.2:5060", "203.0.113.9:40000", Proto::Udp),
            "i2"
        ));
    }

    #[test]
    fn options_ping_is_a_well_formed_request() {
        let b = binding(
            "sip:alice@10.0.0.2:5062;line=x",
            "203.0.113.9:40000",
            Proto::Udp,
        );
        let bytes = options_request(&b, "198.51.100.1:5060".parse().unwrap(), 0x2a, "s1");
        let msg = Message::parse(&bytes, Framing::Datagram).unwrap();
        assert!(
            msg.defect().is_none(),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(msg.method(), Some("OPTIONS"));
        assert_eq!(msg.request_uri(), Some("sip:alice@10.0.0.2:5062;line=x"));
        let via = msg.top_via().unwrap();
        assert_eq!((via.host, via.port), ("198.51.100.1", Some(5060)));
        assert_eq!(seq_of_branch(via.branch().unwrap()), Some(0x2a));
        assert!(msg.from().unwrap().tag().is_some());
        assert_eq!(msg.to().unwrap().uri, "sip:alice@10.0.0.2:5062;line=x");
        assert_eq!(msg.cseq().unwrap().method, "OPTIONS");
        assert_eq!(msg.max_forwards().unwrap(), Some(70));
        assert!(msg.call_id().unwrap().ends_with("@198.51.100.1"));
    }

    #[test]
    fn misses_count_until_answered() {
        let mut f = Failures::default();
        assert_eq!(f.on_sent("a", "c", 1), 0);
        assert_eq!(f.on_sent("a", "c", 2), 1);
        assert_eq!(f.on_sent("a", "c", 3), 2);
        f.on_answer(3);
        assert_eq!(f.on_sent("a", "c", 4), 0);
        // Other bindings are counted apart.
        assert_eq!(f.on_sent("b", "c", 5), 0);
        assert_eq!(f.on_sent("a", "c", 6), 1);
        // A binding that is gone is forgotten.
        f.retain(|aor, _| aor == "a");
        assert_eq!(f.len(), 1);
        assert_eq!(f.on_sent("b", "c", 7), 0);
    }

    #[test]
    fn slots_are_stable_and_spread() {
        let mut seen = [0u32; SLOTS as usize];
        for i in 0..1000 {
            let b = binding(
                &format!("sip:u{i}@10.0.0.2"),
                "203.0.113.9:40000",
                Proto::Udp,
            );
            assert_eq!(slot(&b), slot(&b.clone()));
            seen[slot(&b) as usize] += 1;
        }
        // Every slot gets a share (1000 bindings, 10 slots: far from empty).
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn branch_sequence_roundtrip() {
        assert_eq!(seq_of_branch("z9hG4bK-ka-ff-abc"), Some(255));
        assert_eq!(seq_of_branch("z9hG4bK-se-ff"), None);
        assert_eq!(seq_of_branch("z9hG4bK-ka-zz-1"), None);
    }
}
