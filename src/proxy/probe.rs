//! OPTIONS probing of `[[route]]` next hops (Kamailio dispatcher's `ds_ping_interval`):
//! every `probe_interval` seconds, each place a route's next hops resolve to gets an OPTIONS
//! request; a place whose previous probe is still unanswered when the next goes out, or that
//! answers 503, is **down** (a `warn` line); any other answer brings it **up** again (an
//! `info` line). [`super::stateful::resolve`] skips places that are down, unless every place
//! of the branch is down (then all are tried: a probe may be wrong, a call is worth a try).
//!
//! The per-place state is pure ([`Health`]); this shell sends the probes and matches the
//! answers by their branch (prefix [`BRANCH_PREFIX`]) before the proxy looks for a
//! transaction. Only UDP places are probed: a TCP place would need a connection of its own.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::LiveConfig;
use crate::dns::Resolver;
use crate::metrics::Registry;
use crate::sip::Message;
use crate::transport::{Proto, Transmit, Transports};

/// Branch prefix of our probes (RFC 3261 magic cookie first).
pub const BRANCH_PREFIX: &str = "z9hG4bK-pr-";

/// How often the prober looks for routes whose probe is due.
const TICK: Duration = Duration::from_secs(1);

/// A change of a place's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Down,
    Up,
}

/// One probed place: up or down, and the probe it waits for (pure).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Health {
    down: bool,
    outstanding: Option<u64>,
}

impl Health {
    pub fn is_down(&self) -> bool {
        self.down
    }

    /// Probe `seq` goes out. The previous one still unanswered marks the place down; returns
    /// the probe it replaces (no longer awaited) and the change, if any.
    pub fn on_sent(&mut self, seq: u64) -> (Option<u64>, Option<Change>) {
        let missed = self.outstanding.replace(seq);
        let change = (missed.is_some() && !self.down).then(|| {
            self.down = true;
            Change::Down
        });
        (missed, change)
    }

    /// An answer to probe `seq` with `status`: a 503 marks the place down, anything else up.
    pub fn on_answer(&mut self, seq: u64, status: u16) -> Option<Change> {
        if self.outstanding != Some(seq) {
            return None;
        }
        self.outstanding = None;
        let down = status == 503;
        (down != self.down).then(|| {
            self.down = down;
            if down { Change::Down } else { Change::Up }
        })
    }
}

/// The prober: state per place, shared with the proxy's resolution.
pub struct Prober {
    cfg: Arc<LiveConfig>,
    dns: Arc<Resolver>,
    transports: Arc<Transports>,
    /// Our UDP socket, the sent-by of the probes' Via.
    local: SocketAddr,
    advertise: IpAddr,
    seq: AtomicU64,
    /// Bounded by the places of the configured routes (pruned after each round).
    health: DashMap<SocketAddr, Health>,
    /// Outstanding probe → its place (one per place at most).
    pending: DashMap<u64, SocketAddr>,
    sent: AtomicU64,
    changes: AtomicU64,
}

impl Prober {
    pub fn new(
        cfg: Arc<LiveConfig>,
        dns: Arc<Resolver>,
        transports: Arc<Transports>,
        local: &[(Proto, SocketAddr)],
        advertise: IpAddr,
    ) -> Self {
        let local = local
            .iter()
            .find(|(p, _)| *p == Proto::Udp)
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 5060)), |(_, a)| *a);
        Self {
            cfg,
            dns,
            transports,
            local,
            advertise,
            seq: AtomicU64::new(1),
            health: DashMap::new(),
            pending: DashMap::new(),
            sent: AtomicU64::new(0),
            changes: AtomicU64::new(0),
        }
    }

    /// The resolver the probes (and the proxy) use.
    pub fn dns(&self) -> &Arc<Resolver> {
        &self.dns
    }

    /// Whether probing marked `place` down.
    pub fn is_down(&self, place: SocketAddr) -> bool {
        self.health.get(&place).is_some_and(|h| h.is_down())
    }

    /// Registers `proxy_probes_sent`, `proxy_next_hop_changes` and `proxy_next_hops_down`.
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        let p = Arc::downgrade(self);
        m.counter(
            "proxy_probes_sent",
            "OPTIONS probes sent to route next hops (probe_interval).",
            move || p.upgrade().map_or(0, |p| p.sent.load(Relaxed)),
        );
        let p = Arc::downgrade(self);
        m.counter(
            "proxy_next_hop_changes",
            "Route next hops that went down or came back up, as probing saw them.",
            move || p.upgrade().map_or(0, |p| p.changes.load(Relaxed)),
        );
        let p = Arc::downgrade(self);
        m.gauge(
            "proxy_next_hops_down",
            "Probed route next hops that are down (skipped while another place is up).",
            move || {
                p.upgrade().map_or(0, |p| {
                    p.health.iter().filter(|h| h.is_down()).count() as u64
                })
            },
        );
    }

    /// True when `resp` answers one of our probes (and was consumed).
    pub fn on_response(&self, resp: &Message) -> bool {
        let Some(seq) = resp
            .top_via()
            .ok()
            .and_then(|v| v.branch())
            .and_then(|b| b.strip_prefix(BRANCH_PREFIX))
            .and_then(|s| u64::from_str_radix(s, 16).ok())
        else {
            return false;
        };
        let status = resp.status().unwrap_or(0);
        if status < 200 {
            return true;
        }
        if let Some((_, place)) = self.pending.remove(&seq)
            && let Some(mut h) = self.health.get_mut(&place)
            && let Some(change) = h.on_answer(seq, status)
        {
            self.log(place, change, status);
        }
        true
    }

    fn log(&self, place: SocketAddr, change: Change, status: u16) {
        self.changes.fetch_add(1, Relaxed);
        match change {
            Change::Down if status == 0 => {
                warn!(next_hop = %place, "next hop down: its probe went unanswered");
            }
            Change::Down => warn!(next_hop = %place, status, "next hop down"),
            Change::Up => info!(next_hop = %place, status, "next hop up"),
        }
    }

    /// Probes until `shutdown`; routes and their `probe_interval` are read at each tick (a
    /// reload applies).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last: HashMap<String, Instant> = HashMap::new();
        let mut places: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let cfg = self.cfg.load();
            let now = Instant::now();
            let probed: Vec<_> = cfg
                .routes
                .iter()
                .filter_map(|r| r.probe_interval.map(|i| (r, i)))
                .collect();
            let names: HashSet<&str> = probed.iter().map(|(r, _)| r.name.as_str()).collect();
            last.retain(|k, _| names.contains(k.as_str()));
            places.retain(|k, _| names.contains(k.as_str()));
            for (route, interval) in probed {
                if last.get(&route.name).is_some_and(|t| now < *t + interval) {
                    continue;
                }
                last.insert(route.name.clone(), now);
                let mut mine = Vec::new();
                for hop in &route.next_hops {
                    // Failures were logged by the resolver's caller before; a probe round
                    // keeps quiet about them.
                    if let Ok(found) = self.dns.resolve(&hop.host, hop.port, hop.transport).await {
                        mine.extend(
                            found
                                .into_iter()
                                .filter(|n| n.proto == Proto::Udp)
                                .map(|n| n.addr),
                        );
                    }
                }
                for place in &mine {
                    self.probe(*place, &route.next_hops[0].host);
                }
                places.insert(route.name.clone(), mine);
            }
            let live: HashSet<SocketAddr> = places.values().flatten().copied().collect();
            self.health.retain(|p, _| live.contains(p));
            self.pending.retain(|_, p| live.contains(p));
        }
    }

    /// Sends one OPTIONS to `place`.
    fn probe(&self, place: SocketAddr, host: &str) {
        let seq = self.seq.fetch_add(1, Relaxed);
        let (missed, change) = self.health.entry(place).or_default().on_sent(seq);
        if let Some(old) = missed {
            self.pending.remove(&old);
        }
        if let Some(change) = change {
            self.log(place, change, 0);
        }
        self.pending.insert(seq, place);
        let via_host = match self.advertise {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        let port = self.local.port();
        let target = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let bytes = format!(
            "OPTIONS sip:{target} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {via_host}:{port};branch={BRANCH_PREFIX}{seq:x};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:sipedge@{via_host}>;tag=pr{seq:x}\r\n\
             To: <sip:{target}>\r\n\
             Call-ID: pr{seq:x}@{via_host}\r\n\
             CSeq: 1 OPTIONS\r\n\
             User-Agent: sipedge probe\r\n\
             Content-Length: 0\r\n\r\n"
        )
        .into_bytes();
        self.sent.fetch_add(1, Relaxed);
        self.transports.send(Transmit {
            proto: Proto::Udp,
            local: self.local,
            dest: place,
            bytes,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_unanswered_by_the_next_marks_the_place_down() {
        let mut h = Health::default();
        assert_eq!(h.on_sent(1), (None, None));
        assert_eq!(h.on_sent(2), (Some(1), Some(Change::Down)));
        assert!(h.is_down());
        // Still down: no second line.
        assert_eq!(h.on_sent(3), (Some(2), None));
        // A late answer to a replaced probe changes nothing; the awaited one brings it up.
        assert_eq!(h.on_answer(2, 200), None);
        assert_eq!(h.on_answer(3, 200), Some(Change::Up));
        assert!(!h.is_down());
    }

    #[test]
    fn any_answer_but_503_is_up() {
        let mut h = Health::default();
        h.on_sent(1);
        assert_eq!(h.on_answer(1, 404), None, "up already: no change");
        h.on_sent(2);
        assert_eq!(h.on_answer(2, 503), Some(Change::Down));
        h.on_sent(3);
        assert_eq!(h.on_answer(3, 405), Some(Change::Up));
        assert!(!h.is_down());
    }
}
