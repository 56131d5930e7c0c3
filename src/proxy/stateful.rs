//! The stateful proxy's I/O shell (RFC 3261 §16 with §17 transactions): one task per
//! received request owns its [`ProxyTxn`] (the sans-IO core in [`super::txn`]) until only the
//! RFC timers' absorbing is left; then the task ends and [`super::linger`]'s shared table
//! answers for the finished transaction until its timers end. The tables here route events
//! (retransmissions, ACKs, CANCELs, responses) to the task that owns the transaction, or to
//! that table. Also here: proxy authentication and name resolution before a request gets
//! its task, the limits on transactions, stray responses, and stateless ACK forwarding.
//!
//! The protocol decisions are pure and live elsewhere: routing in [`super::pipeline`], the
//! per-request state in [`super::txn`], the forwarded bytes in [`super::forward`],
//! best-response selection in [`super::response`], the state machines in
//! [`crate::transaction`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::accounting::Accounting;
use super::forward::{self, Asserted};
use super::linger::{ForRequest, ForResponse, Linger, MemCharge};
use super::pipeline::{AuthNeed, Dest, Hop, Plan};
use super::probe::Prober;
use super::txn::{self, Attempt, Event as TableEvent, Input, MediaOp, ProxyTxn, Role, Work};
use crate::acc;
use crate::auth::mac::RouteKey;
use crate::auth::service::{Authenticator, Kind as AuthKind, Outcome};
use crate::config::Config;
use crate::dns::Resolver;
use crate::media::session::Media;
use crate::metrics::{Kind, Registry};
use crate::sip::{Message, Rewrite, reply};
use crate::transaction::{Timers, TxnKey, client_key, invite_key_for_cancel, server_key};
use crate::transport::{Proto, Source, Transmit, Transports};

/// Events queued per transaction task (a retransmission storm beyond this is dropped: the
/// peer retransmits).
const EVENTS: usize = 8;

/// What the owning task is told (the core's [`Input`], with the response boxed: small
/// events, in a queue every transaction has).
#[derive(Debug)]
enum Post {
    /// The request was received again.
    Retransmission,
    /// The ACK for our non-2xx final.
    Ack,
    /// The caller cancelled (a 200 for the CANCEL was already sent).
    Cancel,
    /// A response for branch `idx`, or for the CANCEL sent on that branch.
    Response {
        idx: usize,
        cancel: bool,
        resp: Box<Message>,
    },
}

/// A transaction task's queue of events: what the tables hand it, bounded by [`EVENTS`].
///
/// Not a `tokio::sync::mpsc` channel: one of those allocates a block of 32 slots and
/// cache-padded halves, about 1.3 KB, and every transaction has a queue for its whole life
/// (32 s after its final over UDP; issue #15, memory per transaction). This one is a few
/// words plus the queued events. One consumer (the task); any thread posts.
///
/// Its lock is the standard library's, by exception to clippy.toml: it is taken only in the
/// synchronous `post`, `recv` (before its await) and `shrink`, for one push or pop, and never
/// held across an await — the case tokio's documentation recommends it for; an async lock
/// could not be taken by a receive loop without waiting or dropping the event.
#[derive(Debug, Default)]
struct Inbox {
    #[allow(clippy::disallowed_types)] // see above: never held across an await
    queue: std::sync::Mutex<std::collections::VecDeque<Post>>,
    ready: Notify,
}

impl Inbox {
    /// The queue, locked. A poisoned lock only means a panicking task held it: the queue is
    /// intact.
    fn queue(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Post>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an event without waiting; `false` when the queue is full.
    fn post(&self, event: Post) -> bool {
        {
            let mut q = self.queue();
            if q.len() >= EVENTS {
                return false;
            }
            q.push_back(event);
        }
        // Stores a permit when the task is not waiting: no event is missed.
        self.ready.notify_one();
        true
    }

    /// The next event, waiting for one.
    async fn recv(&self) -> Post {
        loop {
            if let Some(e) = self.queue().pop_front() {
                return e;
            }
            self.ready.notified().await;
        }
    }

    /// Gives back the queue's room when it is empty (events come in bursts: the responses
    /// of a branch, a storm of retransmissions; a finished transaction mostly waits).
    fn shrink(&self) {
        let mut q = self.queue();
        if q.is_empty() {
            q.shrink_to_fit();
        }
    }
}

/// The proxy's transaction tables.
pub struct Proxy {
    transports: Arc<Transports>,
    /// What every request's core needs (sockets, timers, the route key), shared.
    ctx: Arc<txn::Context>,
    /// Server transactions by key.
    server: DashMap<TxnKey, Arc<Inbox>>,
    /// Client transactions (and the CANCELs we sent) by key → (owner, branch, is CANCEL).
    client: DashMap<TxnKey, (Arc<Inbox>, usize, bool)>,
    /// The finished transactions waiting out their timers, without a task.
    linger: Arc<Linger>,
    /// The media relay side, when enabled.
    media: Option<Arc<Media>>,
    /// The CDR rows of the calls that are not relayed, and their dialogs until the BYE.
    acc: Arc<Accounting>,
    /// Transactions in flight per source IP (`limits.transactions_per_ip`).
    per_ip: Arc<DashMap<IpAddr, usize>>,
    /// Bytes of outsized messages held by live transactions (`limits.transaction_memory`).
    large_bytes: Arc<AtomicUsize>,
    /// Next hops by name (RFC 3263).
    dns: Arc<Resolver>,
    /// Which route next hops probing found down (`probe_interval`).
    prober: Arc<Prober>,
    stats: ProxyStats,
}

/// Counters of the proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Responses that matched no transaction and were not a 2xx we could verify: dropped.
    pub stray_dropped: AtomicU64,
    /// Requests refused with 503 because of `limits.transactions(_per_ip)`.
    pub txn_limited: AtomicU64,
    /// Events for a transaction task dropped because its queue was full (retransmission
    /// storms; the peer retransmits).
    pub events_dropped: AtomicU64,
    /// Branches moved to their next alternate (503, timeout, unreachable, silent).
    pub failovers: AtomicU64,
}

impl Proxy {
    pub fn new(
        cfg: &Config,
        transports: Arc<Transports>,
        local: Vec<(Proto, SocketAddr)>,
        key: RouteKey,
        media: Option<Arc<Media>>,
        acc: Arc<Accounting>,
        prober: Arc<Prober>,
    ) -> Self {
        let timers = Timers {
            fr: cfg.server.fr_timer,
            fr_inv: cfg.server.fr_inv_timer,
            ..Timers::default()
        };
        let ctx = txn::Context {
            timers,
            local,
            advertise: cfg.server.advertise,
            max_forwards: cfg.server.max_forwards,
            key,
            media: media.is_some(),
        };
        Self {
            media,
            acc,
            transports,
            ctx: Arc::new(ctx),
            server: DashMap::new(),
            client: DashMap::new(),
            linger: Arc::new(Linger::default()),
            per_ip: Arc::new(DashMap::new()),
            large_bytes: Arc::new(AtomicUsize::new(0)),
            dns: prober.dns().clone(),
            prober,
            stats: ProxyStats::default(),
        }
    }

    /// The finished transactions' table (its sweeper runs on the application's runtime).
    pub fn linger(&self) -> &Arc<Linger> {
        &self.linger
    }

    /// The proxy's counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// The prober of route next hops.
    pub fn prober(&self) -> &Arc<Prober> {
        &self.prober
    }

    /// Hands an event to a transaction task without waiting: a task whose queue is full is
    /// busy with a storm of retransmissions, and the peer will send this one again.
    fn post(&self, inbox: &Inbox, event: Post) {
        if !inbox.post(event) {
            self.stats.events_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Registers the proxy's counters and its live transactions.
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        type Field = fn(&ProxyStats) -> &AtomicU64;
        let counters: [(&str, &str, Field); 4] = [
            (
                "proxy_stray_responses_dropped",
                "Responses that matched no transaction and were not a verifiable 2xx.",
                |s| &s.stray_dropped,
            ),
            (
                "proxy_transactions_limited",
                "Requests refused with 503 by limits.transactions(_per_ip).",
                |s| &s.txn_limited,
            ),
            (
                "proxy_events_dropped",
                "Events for a transaction task dropped because its queue was full.",
                |s| &s.events_dropped,
            ),
            (
                "proxy_failovers",
                "Branches sent on to their next alternate next hop (503, timeout, unreachable, silent).",
                |s| &s.failovers,
            ),
        ];
        self.dns.register_metrics(m);
        self.prober.register_metrics(m);
        for (name, help, field) in counters {
            let p = Arc::downgrade(self);
            m.counter(name, help, move || {
                p.upgrade().map_or(0, |p| field(&p.stats).load(Relaxed))
            });
        }
        let p = Arc::downgrade(self);
        m.gauge(
            "acc_dialogs",
            "Answered calls (not relayed) waiting for their BYE to complete their CDR row.",
            move || p.upgrade().map_or(0, |p| p.acc.dialogs()),
        );
        let p = Arc::downgrade(self);
        m.counter(
            "acc_dialogs_evicted",
            "Answered calls whose CDR row was written early (reason evicted) by limits.dialogs.",
            move || p.upgrade().map_or(0, |p| p.acc.evicted()),
        );
        for (side, pick) in [("server", 0usize), ("client", 1)] {
            let p = Arc::downgrade(self);
            m.labelled(
                "proxy_transactions",
                "Transactions alive.",
                Kind::Gauge,
                &[("side", side)],
                move || {
                    p.upgrade().map_or(0, |p| {
                        let (s, c) = p.transaction_count();
                        [s, c][pick] as u64
                    })
                },
            );
        }
    }

    /// Up to `max` live transactions of each side, for `sipedge show transactions`:
    /// (side, method, branch, sent-by).
    pub fn transactions(&self, max: usize) -> Vec<(&'static str, TxnKey)> {
        let server = self
            .server
            .iter()
            .take(max)
            .map(|e| ("server", e.key().clone()));
        let client = self.client.iter().take(max).map(|e| {
            (
                if e.value().2 {
                    "client-cancel"
                } else {
                    "client"
                },
                e.key().clone(),
            )
        });
        let (done_server, done_client) = self.linger.keys(max);
        server
            .chain(done_server.into_iter().map(|k| ("server", k)))
            .chain(client)
            .chain(done_client.into_iter().map(|k| ("client", k)))
            .collect()
    }

    /// Transactions alive (server and client, the finished ones waiting out their timers
    /// included), for logs, tests and `show`.
    pub fn transaction_count(&self) -> (usize, usize) {
        let (s, c) = self.linger.len();
        (self.server.len() + s, self.client.len() + c)
    }

    /// Gives a request to the transaction it belongs to (a retransmission, the ACK for our
    /// non-2xx final, or a CANCEL). True if it was consumed.
    pub fn absorb(&self, msg: &Message, source: Source) -> bool {
        let method = msg.method().unwrap_or_default();
        if method == "CANCEL" {
            let Some(key) = invite_key_for_cancel(msg) else {
                return false;
            };
            let inbox = self.server.get(&key).map(|e| e.value().clone());
            if inbox.is_none() && !self.linger.has_server(&key) {
                return false;
            }
            // RFC 3261 §16.10: answer the CANCEL at once, then cancel the branches (none are
            // left when the INVITE's transaction is finished).
            let nated = crate::nat::detect::detect(msg, source.remote).is_nated();
            let out = self.upstream(
                msg,
                source,
                reply::response(msg, source.remote, 200, "OK", &[]),
                nated,
            );
            self.transports.send(out);
            if let Some(inbox) = inbox {
                self.post(&inbox, Post::Cancel);
            }
            return true;
        }
        let Some(key) = server_key(msg) else {
            return false;
        };
        let Some(inbox) = self.server.get(&key).map(|e| e.value().clone()) else {
            return match self.linger.on_request(&key, method == "ACK") {
                None => false,
                Some(ForRequest::Absorb) => true,
                Some(ForRequest::Resend(out)) => {
                    self.transports.send(out);
                    true
                }
            };
        };
        let event = if method == "ACK" {
            Post::Ack
        } else {
            Post::Retransmission
        };
        self.post(&inbox, event);
        true
    }

    /// A response from downstream: to the client transaction it belongs to; with none, a
    /// stray 2xx is forwarded statelessly (RFC 3261 §16.7, RFC 6026 §7) when its top Via is
    /// ours and its branch MAC says the next Via is where we sent the request from.
    /// Everything else is dropped and counted.
    pub fn on_response(&self, resp: Message, source: Source) {
        let Some(key) = client_key(&resp) else {
            self.stats.stray_dropped.fetch_add(1, Relaxed);
            return;
        };
        if let Some((inbox, idx, cancel)) = self.client.get(&key).map(|e| e.value().clone()) {
            self.post(
                &inbox,
                Post::Response {
                    idx,
                    cancel,
                    resp: Box::new(resp),
                },
            );
            return;
        }
        match self.linger.on_response(&key, &resp) {
            Some(ForResponse::Absorb) => return,
            Some(ForResponse::Send(out)) => return self.transports.send(out),
            Some(ForResponse::Stray) => {
                self.stats.stray_dropped.fetch_add(1, Relaxed);
                debug!(peer.addr = %source.remote, "2xx with another To-tag for a finished relayed branch: dropped");
                return;
            }
            // Statelessly, below.
            Some(ForResponse::Pass) | None => {}
        }
        let forwarded = resp.status().is_some_and(|s| (200..300).contains(&s))
            && key.method() == "INVITE"
            && self.forward_stray(&resp);
        if !forwarded {
            self.stats.stray_dropped.fetch_add(1, Relaxed);
            debug!(peer.addr = %source.remote, sip.status = resp.status(), "response matches no transaction: dropped");
        }
    }

    /// Messages that could not be sent because no connection to `dest` could be opened
    /// (RFC 3261 §8.1.3.1: a transport failure counts as a 503 from that hop): every request
    /// of ours among them gets a locally made `503 Service Unavailable`, fed to its client
    /// transaction like a received response, so that the branch ends now (or fails over)
    /// instead of waiting for Timer B/F. Responses and ACKs have nobody waiting.
    pub fn transport_failed(&self, proto: Proto, dest: SocketAddr, unsent: Vec<Vec<u8>>) {
        for bytes in unsent {
            let Some(resp) = transport_failure_response(&bytes, dest) else {
                continue;
            };
            debug!(peer.addr = %dest, transport = proto.as_str(), "transport failure: 503 for the branch");
            let source = Source {
                proto,
                remote: dest,
                local: self.ctx.socket_for(proto),
            };
            self.on_response(resp, source);
        }
    }

    /// A 2xx retransmission after our transaction ended: pop our Via, send to the next —
    /// only if our branch's MAC binds it to that address. False when not forwarded.
    fn forward_stray(&self, resp: &Message) -> bool {
        let Ok(vias) = resp.vias() else { return false };
        let (Some(ours), Some(next)) = (vias.first(), vias.get(1)) else {
            return false;
        };
        let ip = next
            .param("received")
            .and_then(|r| r.parse().ok())
            .or_else(|| next.host.parse().ok());
        let Some(ip) = ip else { return false };
        let port = next
            .param("rport")
            .and_then(|p| p.parse().ok())
            .or(next.port)
            .unwrap_or(5060);
        let dest = SocketAddr::new(ip, port);
        let signed = ours.branch().is_some_and(|b| {
            b.starts_with(forward::BRANCH_PREFIX) && self.ctx.key.verify_branch(b, dest)
        });
        if !signed {
            crate::security_event!("stray_response", dest, sip.status = resp.status());
            return false;
        }
        let mut rw = Rewrite::new(resp);
        if rw.pop_via().is_err() {
            return false;
        }
        if let Some(seq) = forward::callers_cseq(resp, &self.ctx.key) {
            rw.set_cseq(seq);
        }
        let proto = Proto::from_token(next.transport).unwrap_or(if next.is_reliable() {
            Proto::Tcp
        } else {
            Proto::Udp
        });
        let out = Transmit {
            proto,
            local: self.ctx.socket_for(proto),
            dest,
            bytes: rw.finish(),
        };
        self.transports.send(out);
        true
    }

    /// The media side, when enabled.
    pub fn media(&self) -> Option<&Arc<Media>> {
        self.media.as_ref()
    }

    /// The accounting of the calls that are not relayed.
    pub fn accounting(&self) -> &Arc<Accounting> {
        &self.acc
    }

    /// The location service's 404 to an initial INVITE that counts as a call outcome
    /// ([`super::pipeline::Routed::NotFound`]): answered through a server transaction, so
    /// that its retransmissions are absorbed and the call gets exactly one row (route
    /// "local"). Under `limits.transactions` the 404 goes statelessly, without a row.
    pub fn not_found(
        self: &Arc<Self>,
        cfg: &Config,
        msg: Message,
        source: Source,
        out: Transmit,
        now_unix: u64,
    ) {
        match self.reserve(cfg, &msg, source) {
            Ok(res) => {
                let start = acc::Start::of(&msg, source.remote, acc::LOCAL, None, now_unix);
                self.launch(res, msg, source, Work::Reply(out.bytes), start);
            }
            Err(Refusal::Owned) => {}
            Err(Refusal::Limit(_)) => self.transports.send(out),
        }
    }

    /// Carries out a routing plan for a new request: proxy authentication when the plan asks
    /// for it (the seed's `proxy_authorize` + `check_from` + `consume_credentials`), name
    /// resolution, then the transaction task. Runs off the receive loop. `cfg` is the
    /// configuration the request was routed with (its limits apply).
    pub async fn forward(
        self: Arc<Self>,
        cfg: Arc<Config>,
        msg: Message,
        source: Source,
        plan: Plan,
        auth: Option<Arc<Authenticator>>,
        now_unix: u64,
    ) {
        let reply_now = |status: u16, reason: &str, extra: &[(&str, &str)]| {
            reply::response(&msg, source.remote, status, reason, extra)
        };
        let mut plan = plan;
        // RFC 3325 §5: identity headers pass only from inside our trust domain.
        plan.identity.strip = !cfg.security.is_trusted(source.remote.ip());
        if plan.stateless {
            let dests = resolve(&self.dns, &self.prober, &plan.targets).await;
            if let Some(a) = dests.first().and_then(|d| d.first()) {
                // An ACK may carry the answer to a late offer (RFC 3264 §5: offer in the
                // 2xx). An ACK is never refused by media (`Media::offer`): what does not fit
                // goes unchanged.
                let body = match self.media.as_ref() {
                    Some(m) if !msg.body().is_empty() => m
                        .offer(&msg, "", Role::InDialog, source.remote, None)
                        .await
                        .ok()
                        .flatten(),
                    _ => None,
                };
                self.forward_stateless(&msg, source, &plan, a, body);
            }
            return;
        }
        let Some(res) = self.claim(&cfg, &msg, source, &plan) else {
            return;
        };
        let mut strip_proxy_auth = false;
        let mut auth_user = None;
        if let Some(need) = plan.auth {
            let verdict = match &auth {
                None => Err((500, reply_now(500, "Server Internal Error", &[]))),
                Some(a) => {
                    let peer = source.remote;
                    authorize(a, &msg, peer, need, now_unix, &reply_now, &cfg).await
                }
            };
            match verdict {
                Ok(user) => {
                    strip_proxy_auth = true;
                    // The caller's number, or its username when none is set (README "Caller
                    // identity").
                    let asserted_user = user.caller_id.as_deref().unwrap_or(&user.username);
                    plan.identity.assert =
                        Asserted::new(plan.assert_identity, asserted_user, &user.domain);
                    auth_user = Some(user.username);
                }
                Err((407, bytes)) => {
                    // A challenge is sent once, without a server transaction: it is never
                    // retransmitted, so a spoofed request draws one datagram, not eleven
                    // (the caller's retransmission of the INVITE draws another 407, and its
                    // ACK for the 407 is dropped by the routing: no dialog of ours).
                    self.server.remove(&res.key);
                    drop(res);
                    let nated = plan.sender_nated;
                    self.transports
                        .send(self.upstream(&msg, source, bytes, nated));
                    return;
                }
                // Refused by authentication: no row (README "Accounting").
                Err((_, bytes)) => return self.launch(res, msg, source, Work::Reply(bytes), None),
            }
        }
        let resolved = resolve(&self.dns, &self.prober, &plan.targets).await;
        let creds = Credentials {
            strip_proxy_auth,
            auth_user,
        };
        self.dispatch(res, msg, source, plan, resolved, creds, now_unix);
    }

    /// [`Proxy::forward`] on the receive loop, for the plans that need nothing waited for: no
    /// proxy authentication, next hops that are all addresses (no name to resolve), and for
    /// an ACK no SDP for the relay. Most requests are such (a `[[route]]` to an address, a
    /// registered contact, every in-dialog request): they go out without a task of their own
    /// for the routing, its allocation and its wake-up (issue #15). Gives the request and the
    /// plan back, untouched, when something must be waited for.
    pub fn forward_now(
        self: &Arc<Self>,
        cfg: &Config,
        msg: Message,
        source: Source,
        plan: Box<Plan>,
        now_unix: u64,
    ) -> Result<(), (Box<Message>, Box<Plan>)> {
        let media_in_ack = plan.stateless && self.media.is_some() && !msg.body().is_empty();
        if plan.auth.is_some() || media_in_ack {
            return Err((Box::new(msg), plan));
        }
        let Some(resolved) = resolve_now(|a| self.prober.is_down(a), &plan.targets) else {
            return Err((Box::new(msg), plan));
        };
        let mut plan = *plan;
        // RFC 3325 §5, as in `forward`.
        plan.identity.strip = !cfg.security.is_trusted(source.remote.ip());
        if plan.stateless {
            if let Some(a) = resolved.first().and_then(|d| d.first()) {
                self.forward_stateless(&msg, source, &plan, a, None);
            }
            return Ok(());
        }
        if let Some(res) = self.claim(cfg, &msg, source, &plan) {
            self.dispatch(
                res,
                msg,
                source,
                plan,
                resolved,
                Credentials::default(),
                now_unix,
            );
        }
        Ok(())
    }

    /// The server transaction of a request to forward ([`Proxy::reserve`]), or `None` when
    /// it has one already or a limit refuses it (answered 503 here).
    fn claim(
        &self,
        cfg: &Config,
        msg: &Message,
        source: Source,
        plan: &Plan,
    ) -> Option<Reservation> {
        match self.reserve(cfg, msg, source) {
            Ok(res) => Some(res),
            Err(Refusal::Owned) => {
                debug!("request already has a transaction");
                None
            }
            Err(Refusal::Limit(limit)) => {
                self.stats.txn_limited.fetch_add(1, Relaxed);
                crate::security_event!("transaction_limit", source.remote, limit);
                let bytes = reply::response(
                    msg,
                    source.remote,
                    503,
                    "Service Unavailable",
                    &[("Retry-After", "5")],
                );
                let nated = plan.sender_nated;
                self.transports
                    .send(self.upstream(msg, source, bytes, nated));
                None
            }
        }
    }

    /// The rest of forwarding once the caller is known and the next hops resolved: the
    /// call's accounting record, a BYE's dialog closed, the transaction task launched (a 503
    /// when no next hop resolved).
    #[allow(clippy::too_many_arguments)] // one call site each in `forward` and `forward_now`
    fn dispatch(
        self: &Arc<Self>,
        res: Reservation,
        msg: Message,
        source: Source,
        plan: Plan,
        resolved: Vec<Vec<Attempt>>,
        creds: Credentials,
        now_unix: u64,
    ) {
        // Past authentication: an initial INVITE is a call, whatever happens to it now.
        let start = plan.route.as_deref().and_then(|route| {
            acc::Start::of(
                &msg,
                source.remote,
                route,
                creds.auth_user.as_deref(),
                now_unix,
            )
        });
        if msg.method() == Some("BYE") {
            self.acc.bye(&msg);
        }
        // The plan is moved, not copied: its hops with no place left are dropped.
        let mut kept = plan;
        let targets = std::mem::take(&mut kept.targets);
        kept.targets.reserve_exact(targets.len());
        let mut dests = Vec::with_capacity(targets.len());
        for (hop, attempts) in targets.into_iter().zip(resolved) {
            // RFC 5922 §4: a TLS hop's certificate must name the host we resolved (the
            // domain, not an SRV target).
            for a in attempts.iter().filter(|a| a.hop.proto == Proto::Tls) {
                if let Dest::Host(host, _) | Dest::Name { host, .. } = &a.hop.dest {
                    self.transports.set_tls_name(a.dest, host);
                }
            }
            if !attempts.is_empty() {
                kept.targets.push(hop);
                dests.push(attempts);
            }
        }
        if dests.is_empty() {
            let bytes = reply::response(
                &msg,
                source.remote,
                503,
                "Service Unavailable",
                &[("Retry-After", "30")],
            );
            return self.launch(res, msg, source, Work::Reply(bytes), start);
        }
        let Credentials {
            strip_proxy_auth,
            auth_user,
        } = creds;
        self.launch(
            res,
            msg,
            source,
            Work::Forward {
                plan: kept,
                dests,
                strip_proxy_auth,
                auth_user,
            },
            start,
        );
    }

    /// Forwards an ACK for a 2xx (end-to-end, no transaction) to the first place of its
    /// next hop; `body`: the relay's rewrite of its SDP, if any.
    pub fn forward_stateless(
        &self,
        msg: &Message,
        source: Source,
        plan: &Plan,
        attempt: &Attempt,
        body: Option<Vec<u8>>,
    ) {
        let (hop, dest) = (&attempt.hop, attempt.dest);
        let sent_by = msg
            .top_via()
            .map(|v| format!("{}:{}", v.host, v.port.unwrap_or(5060)));
        let nated = plan.sender_nated;
        let branch = forward::branch_id(
            msg,
            msg.top_via().ok().and_then(|v| v.branch()).unwrap_or(""),
            sent_by.as_deref().unwrap_or(""),
            0,
            &self.ctx.key,
            crate::nat::response_dest(msg, source, nated),
        );
        let bytes = self.ctx.build(
            msg, source, hop, dest, &branch, plan, false, nated, body, None,
        );
        debug!(%dest, "forwarding statelessly");
        self.transports.send(Transmit {
            proto: hop.proto,
            local: self.ctx.socket_for(hop.proto),
            dest,
            bytes,
        });
    }

    /// Claims the server transaction of a new request before any slow work (authentication,
    /// name resolution), so that its retransmissions are absorbed meanwhile. `None` when the
    /// request already has an owner (it was a retransmission after all) or when
    /// `limits.transactions(_per_ip)` are reached.
    pub fn reserve(
        &self,
        cfg: &Config,
        msg: &Message,
        source: Source,
    ) -> Result<Reservation, Refusal> {
        let key = server_key(msg).ok_or(Refusal::Owned)?;
        let limits = &cfg.limits;
        if self.server.len() + self.linger.server_len() >= limits.transactions {
            return Err(Refusal::Limit("limits.transactions"));
        }
        // Outsized messages share a byte budget: a flood of 60 KB requests that nobody answers
        // would otherwise hold hundreds of MB for a minute (the request, the forwarded copy per
        // branch and the response are kept for retransmissions).
        let excess = msg.len().saturating_sub(LARGE_MESSAGE) * HELD_COPIES;
        let charge = if excess > 0 {
            let held = self.large_bytes.fetch_add(excess, Relaxed) + excess;
            if held > limits.transaction_memory {
                self.large_bytes.fetch_sub(excess, Relaxed);
                return Err(Refusal::Limit("limits.transaction_memory"));
            }
            MemCharge {
                bytes: excess,
                held: Some(self.large_bytes.clone()),
            }
        } else {
            MemCharge::default()
        };
        let ip = source.remote.ip();
        let slot = {
            let mut n = self.per_ip.entry(ip).or_insert(0);
            if *n >= limits.transactions_per_ip {
                return Err(Refusal::Limit("limits.transactions_per_ip"));
            }
            *n += 1;
            TxnSlot {
                per_ip: self.per_ip.clone(),
                ip,
            }
        };
        let inbox = Arc::new(Inbox::default());
        match self.server.entry(key.clone()) {
            dashmap::Entry::Occupied(_) => Err(Refusal::Owned),
            dashmap::Entry::Vacant(v) => {
                v.insert(inbox.clone());
                Ok(Reservation {
                    key,
                    inbox,
                    slot,
                    charge,
                })
            }
        }
    }

    /// Runs the transaction task for a reserved request: forward it along `work`, or answer
    /// it locally (statefully: retransmissions get the same answer, the ACK is absorbed).
    /// `start`: the call's accounting record, when its outcome gets a CDR row.
    pub fn launch(
        self: &Arc<Self>,
        mut res: Reservation,
        msg: Message,
        source: Source,
        work: Work,
        start: Option<acc::Start>,
    ) {
        // At debug, not info: an enabled span per transaction lives the transaction's 32 s, and
        // tracing's registry keeps a small allocation per span slot that pins the freed pages
        // around it (80,000 calls at 4,000/s at log level info: 476 MB after the load instead
        // of 60 MB, and 40 % more CPU). Lines logged inside carry their own sip.* fields.
        let span = debug_span!(
            "txn",
            sip.method = msg.method().unwrap_or_default(),
            sip.call_id = msg.call_id().unwrap_or_default(),
            sip.branch = res.key.branch()
        );
        // If the task panics, its table entry goes with it (no leak, and a retransmission
        // of the request is not absorbed by a task that no longer exists).
        let guard = EntryGuard {
            proxy: self.clone(),
            key: res.key.clone(),
            inbox: res.inbox.clone(),
            charge: std::mem::take(&mut res.charge),
        };
        let Reservation {
            key, inbox, slot, ..
        } = res;
        let task = Task {
            t: ProxyTxn::new(self.ctx.clone(), msg, source, work, Instant::now()),
            key,
            inbox,
            // The per-IP place is held while the request is pending; a transaction that
            // has sent its final only waits out its timers (bounded by the total limit).
            slot: Some(slot),
            // Most transactions bind one client key (a CANCEL adds one).
            bound: Vec::with_capacity(1),
            call: CallAcc {
                start: start.map(Box::new),
                ready: None,
            },
        };
        // The task's future is all the task holds, for the life of the transaction: it is
        // `run` itself, with its state built here (issue #15: memory per transaction).
        let fut = self.clone().run(task, guard).instrument(span);
        tokio::spawn(fut);
    }

    /// The task owning one proxied request: feeds its [`ProxyTxn`] with the network, its
    /// timers and the media layer's answers, and carries out what it asks for. `_guard`
    /// goes with the task, however it ends.
    ///
    /// A function returning an `async move` block, not an `async fn`: an async fn moves its
    /// arguments into locals, and the future would hold the 1 KB [`Task`] twice for the
    /// transaction's whole life (rust-lang/rust#62958); the block's captures are used in place.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn run(self: Arc<Self>, mut task: Task, guard: EntryGuard) -> impl Future<Output = ()> {
        async move {
            // Captured, so that it goes with the task however it ends.
            let mut guard = guard;
            let Task {
                t,
                key,
                inbox,
                slot,
                bound,
                call,
            } = &mut task;
            loop {
                // Boxed: its future is large (the media steps' states) and runs for moments; inline it
                // would be part of the task for the transaction's whole life (issue #15).
                Box::pin(self.carry_out(t, key, inbox, slot, bound, call)).await;
                if t.is_done() {
                    break;
                }
                // Only the timers' absorbing left: the shared table takes it over (before the
                // live entries go, so that a retransmission always finds one of them).
                if let Some(fin) = t.retire() {
                    self.linger
                        .insert(key, fin, std::mem::take(&mut guard.charge));
                    break;
                }
                // Still waiting for something (an ACK, a second 2xx of a relayed call): the
                // task keeps only what that needs.
                t.compact();
                inbox.shrink();
                let deadline = t.poll_timeout();
                let post = match deadline {
                    Some(d) => tokio::select! {
                        p = inbox.recv() => Some(p),
                        () = tokio::time::sleep_until(d) => None,
                    },
                    None => Some(inbox.recv().await),
                };
                let now = Instant::now();
                match post {
                    Some(Post::Retransmission) => t.handle(now, Input::Retransmission),
                    Some(Post::Ack) => t.handle(now, Input::Ack),
                    Some(Post::Cancel) => t.handle(now, Input::Cancel),
                    Some(Post::Response { idx, cancel, resp }) => t.handle(
                        now,
                        Input::Response {
                            idx,
                            cancel,
                            resp: *resp,
                        },
                    ),
                    None => t.handle_timeout(now),
                }
            }
            self.server.remove(key);
            for k in bound.iter() {
                self.client.remove(k);
            }
            let (servers, clients) = self.transaction_count();
            debug!(
                transactions.server = servers,
                transactions.client = clients,
                "transaction done"
            );
        }
    }

    /// Sends, updates the tables and performs the media steps the core asks for, until it
    /// asks for nothing more. Media steps are awaited one by one, before the next input.
    /// The call's row: when the final goes upstream ([`TableEvent::Final`]) the record is
    /// ready; the media layer takes it for a relayed call (its `Finished` step comes in the
    /// same drain), else it is written here once the core asks for nothing more.
    async fn carry_out(
        &self,
        t: &mut ProxyTxn,
        key: &TxnKey,
        inbox: &Arc<Inbox>,
        slot: &mut Option<TxnSlot>,
        bound: &mut Vec<TxnKey>,
        call: &mut CallAcc,
    ) {
        loop {
            // Table changes before the transmits: a callee on a fast link answers within
            // microseconds, on another receive thread, and its response must find the client
            // transaction (Bind) already in the table, or it is dropped as stray.
            while let Some(e) = t.poll_event() {
                match e {
                    TableEvent::Bind { key, idx, cancel } => {
                        self.client
                            .insert(key.clone(), (inbox.clone(), idx, cancel));
                        bound.push(key);
                    }
                    TableEvent::Unbind(k) => {
                        self.client.remove(&k);
                    }
                    TableEvent::Final => {
                        drop(slot.take());
                        if let Some(status) = t.final_status()
                            && let Some(s) = call.start.take()
                        {
                            call.ready = Some((s, status));
                        }
                    }
                    // A later copy of the request is new.
                    TableEvent::ServerDone => {
                        self.server.remove(key);
                    }
                    TableEvent::Failover {
                        idx,
                        from,
                        to,
                        reason,
                    } => {
                        self.stats.failovers.fetch_add(1, Relaxed);
                        info!(branch = idx, %from, %to, reason = reason.as_str(), "next hop failed: trying the next one");
                    }
                }
            }
            while let Some(out) = t.poll_transmit() {
                self.transports.send(out);
            }
            // The media and accounting steps are boxed: their futures are large, and inline
            // they would be part of every transaction task for its whole life (32 s after the
            // final over UDP), not only while they run (issue #15, memory per transaction).
            let Some(op) = t.poll_media() else {
                if let Some((s, status)) = call.ready.take() {
                    self.acc.finished(*s, status, t.answer_tag(), t.cancelled());
                }
                return;
            };
            let Some(media) = &self.media else { continue };
            // The core keeps the request while a media step may still come (ProxyTxn::compact).
            let Some(req) = t.request() else { continue };
            match op {
                MediaOp::Offer {
                    idx,
                    branch,
                    role,
                    auth_user,
                } => {
                    if role == Role::InDialog && !media.holds_dialog(req) {
                        t.handle_offer(Instant::now(), idx, Ok(None));
                        continue;
                    }
                    let source = t.source();
                    let r = Box::pin(media.offer(
                        req,
                        &branch,
                        role,
                        source.remote,
                        auth_user.as_deref(),
                    ))
                    .await;
                    t.handle_offer(Instant::now(), idx, r);
                }
                MediaOp::Answer {
                    idx,
                    branch,
                    role,
                    from,
                    resp,
                } => {
                    let body = Box::pin(media.answer(req, &resp, &branch, role, from)).await;
                    t.handle_answer(Instant::now(), idx, resp, body);
                }
                MediaOp::Finished { status, cancelled } => {
                    let start = call.ready.take().map(|(s, _)| *s);
                    let back = Box::pin(media.finished(req, status, cancelled, start)).await;
                    // Not a relayed call after all: the row is ours.
                    call.ready = back.map(|s| (Box::new(s), status));
                }
            }
        }
    }

    /// A response to the request, addressed by [`crate::nat::response_dest`].
    fn upstream(&self, req: &Message, source: Source, bytes: Vec<u8>, nated: bool) -> Transmit {
        Transmit {
            proto: source.proto,
            local: source.local,
            dest: crate::nat::response_dest(req, source, nated),
            bytes,
        }
    }
}

/// What a transaction task owns.
struct Task {
    t: ProxyTxn,
    key: TxnKey,
    inbox: Arc<Inbox>,
    slot: Option<TxnSlot>,
    /// The client keys bound in the table, removed with the task.
    bound: Vec<TxnKey>,
    call: CallAcc,
}

/// The accounting of one transaction's call: the record until the final goes upstream, then
/// the record and the final status until the media layer or [`Accounting`] takes it (boxed:
/// most transactions have none, or give it up at their final).
struct CallAcc {
    start: Option<Box<acc::Start>>,
    ready: Option<(Box<acc::Start>, u16)>,
}

/// Who the caller proved to be (proxy authentication), for the forwarded copy and the row.
#[derive(Default)]
struct Credentials {
    /// The caller's Proxy-Authorization was ours: not forwarded.
    strip_proxy_auth: bool,
    auth_user: Option<String>,
}

/// A claimed server transaction, not yet running.
pub struct Reservation {
    key: TxnKey,
    inbox: Arc<Inbox>,
    /// This transaction's place in `limits.transactions_per_ip`, released with its final
    /// response (or the task).
    slot: TxnSlot,
    /// Its share of `limits.transaction_memory`, released with the task.
    charge: MemCharge,
}

/// Removes a transaction task's server entry when the task ends, however it ends, and
/// gives back its share of `limits.transaction_memory`.
struct EntryGuard {
    proxy: Arc<Proxy>,
    key: TxnKey,
    inbox: Arc<Inbox>,
    charge: MemCharge,
}

/// Messages up to this size cost nothing against `limits.transaction_memory` (their number
/// is bounded by `limits.transactions`); beyond it, the excess counts.
const LARGE_MESSAGE: usize = 4096;
/// Copies of a request a transaction holds: the received one, the forwarded one, a response.
const HELD_COPIES: usize = 3;

impl Drop for EntryGuard {
    fn drop(&mut self) {
        self.proxy
            .server
            .remove_if(&self.key, |_, v| Arc::ptr_eq(v, &self.inbox));
    }
}

/// Why a request got no transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It already has one (a retransmission).
    Owned,
    /// This limit is reached.
    Limit(&'static str),
}

/// A place in the per-IP transaction count; released when dropped (also when the task
/// owning it unwinds).
struct TxnSlot {
    per_ip: Arc<DashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl Drop for TxnSlot {
    fn drop(&mut self) {
        self.per_ip.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// A subscriber that passed proxy authentication.
struct AuthUser {
    username: String,
    /// The From domain it authenticated in (one of ours).
    domain: String,
    caller_id: Option<String>,
}

/// Proxy authentication of the caller (407 challenges), then `check_from` for `[[route]]`
/// rules: the From user must be the authenticated user. `Ok` holds that user (with its domain
/// and caller ID), `Err` the response to send.
async fn authorize(
    auth: &Authenticator,
    msg: &Message,
    peer: SocketAddr,
    need: AuthNeed,
    now: u64,
    reply_now: &impl Fn(u16, &str, &[(&str, &str)]) -> Vec<u8>,
    cfg: &Config,
) -> Result<AuthUser, (u16, Vec<u8>)> {
    let from = msg.from().ok().and_then(|f| {
        let uri = crate::sip::SipUri::parse(f.uri).ok()?;
        Some((uri.user.map(str::to_owned), uri.host.to_ascii_lowercase()))
    });
    let Some((from_user, domain)) = from else {
        return Err((403, reply_now(403, "Forbidden: From is not a SIP URI", &[])));
    };
    if !cfg.is_local_domain(&domain) {
        return Err((
            403,
            reply_now(403, "Forbidden: From domain not served here", &[]),
        ));
    }
    let realm = auth.realm(&domain);
    match auth
        .check(msg, peer, AuthKind::Proxy, realm, &domain, now)
        .await
    {
        Outcome::Authorized {
            username,
            caller_id,
        } => {
            if need == AuthNeed::Route && from_user.as_deref() != Some(username.as_str()) {
                warn!(auth.user = %username, from.user = from_user.as_deref().unwrap_or(""), "From does not match the credentials");
                return Err((403, reply_now(403, "Use From ID", &[])));
            }
            Ok(AuthUser {
                username,
                domain,
                caller_id,
            })
        }
        Outcome::Challenge { stale } => {
            let headers = auth
                .challenge_for(
                    AuthKind::Proxy,
                    realm,
                    from_user.as_deref(),
                    &domain,
                    now,
                    stale,
                )
                .await;
            let extra: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            Err((407, reply_now(407, "Proxy Authentication Required", &extra)))
        }
        Outcome::StoreError => Err((
            500,
            reply_now(500, "Server Internal Error", &[("Retry-After", "5")]),
        )),
        Outcome::Refuse { status, reason } => Err((status, reply_now(status, reason, &[]))),
    }
}

/// The 503 a request we sent gets when it could not be sent: `None` for what is not a
/// request waiting for a response (a response, an ACK, bytes that do not parse).
fn transport_failure_response(bytes: &[u8], dest: SocketAddr) -> Option<Message> {
    let req = Message::parse(bytes, crate::sip::Framing::Datagram).ok()?;
    if !req.is_request() || req.method() == Some("ACK") {
        return None;
    }
    let resp = reply::response(&req, dest, 503, "Service Unavailable", &[]);
    Message::parse(&resp, crate::sip::Framing::Datagram).ok()
}

/// Resolves the hops of a plan, each with its failover hops, into the places of its branch
/// in order: addresses as they are, names per RFC 3263 (NAPTR, SRV, A/AAAA; one SRV name
/// gives its targets in priority and weight order). At most [`crate::dns::MAX_TARGETS`]
/// places per branch; a hop none of whose names resolves gets none (its branch is dropped).
/// Places that probing found down are left out, unless all of the branch's are.
pub async fn resolve(dns: &Resolver, prober: &Prober, hops: &[Hop]) -> Vec<Vec<Attempt>> {
    let mut out = Vec::with_capacity(hops.len());
    for first in hops {
        let mut places = Places::default();
        for hop in std::iter::once(first).chain(&first.failover) {
            let found = match &hop.dest {
                Dest::Addr(a) => Ok(vec![crate::dns::Next {
                    addr: *a,
                    proto: hop.proto,
                }]),
                Dest::Host(host, port) => dns.resolve(host, Some(*port), Some(hop.proto)).await,
                Dest::Name { host, transport } => dns.resolve(host, None, *transport).await,
            };
            if places.add(hop, found) {
                break;
            }
        }
        out.push(places.finish(|a| prober.is_down(a)));
    }
    out
}

/// [`resolve`] without waiting, for plans whose hops (failover hops included) are all
/// addresses — the usual case: a `[[route]]` to an IP address, a registered contact, a
/// record-routed dialog. `None` when a name is among them. `down`: [`Prober::is_down`].
pub fn resolve_now(down: impl Fn(SocketAddr) -> bool, hops: &[Hop]) -> Option<Vec<Vec<Attempt>>> {
    hops.iter()
        .map(|first| {
            let mut places = Places::default();
            for hop in std::iter::once(first).chain(&first.failover) {
                let Dest::Addr(addr) = hop.dest else {
                    return None;
                };
                let found = crate::dns::Next {
                    addr,
                    proto: hop.proto,
                };
                if places.add(hop, Ok(vec![found])) {
                    break;
                }
            }
            Some(places.finish(&down))
        })
        .collect()
}

/// The places of one branch, gathered hop by hop.
#[derive(Default)]
struct Places(Vec<Attempt>);

impl Places {
    /// Adds what `hop` resolved to; true when the branch has all the places it may have.
    fn add(
        &mut self,
        hop: &Hop,
        found: Result<Vec<crate::dns::Next>, crate::dns::DnsError>,
    ) -> bool {
        match found {
            Ok(places) => self.0.extend(places.into_iter().map(|n| Attempt {
                hop: Hop {
                    proto: n.proto,
                    failover: Vec::new(),
                    ..hop.clone()
                },
                dest: n.addr,
            })),
            Err(error) => warn!(%error, "next hop does not resolve"),
        }
        if self.0.len() >= crate::dns::MAX_TARGETS {
            self.0.truncate(crate::dns::MAX_TARGETS);
            return true;
        }
        false
    }

    /// The places, without those probing found down (unless all are).
    fn finish(self, down: impl Fn(SocketAddr) -> bool) -> Vec<Attempt> {
        let mut attempts = self.0;
        if attempts.iter().any(|a| !down(a.dest)) {
            attempts.retain(|a| !down(a.dest));
        }
        attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(dest: Dest, failover: Vec<Hop>) -> Hop {
        Hop {
            ruri: None,
            dest,
            proto: Proto::Udp,
            flow: None,
            failover,
            trunk: None,
            owner: None,
        }
    }

    #[test]
    fn addresses_resolve_without_waiting_names_do_not() {
        let a: SocketAddr = "192.0.2.1:5060".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:5070".parse().unwrap();
        let c: SocketAddr = "192.0.2.3:5060".parse().unwrap();
        // A branch with its failover hop, and a second branch.
        let hops = [
            hop(Dest::Addr(a), vec![hop(Dest::Addr(b), Vec::new())]),
            hop(Dest::Addr(c), Vec::new()),
        ];
        let up = resolve_now(|_| false, &hops).expect("addresses only");
        let places: Vec<Vec<SocketAddr>> = up
            .iter()
            .map(|branch| branch.iter().map(|at| at.dest).collect())
            .collect();
        assert_eq!(places, vec![vec![a, b], vec![c]]);
        assert!(up[0].iter().all(|at| at.hop.failover.is_empty()));
        // Places found down are left out, unless all of a branch's are.
        let some_down = resolve_now(|p| p == a || p == c, &hops).unwrap();
        assert_eq!(
            some_down[0].iter().map(|at| at.dest).collect::<Vec<_>>(),
            [b]
        );
        assert_eq!(
            some_down[1].iter().map(|at| at.dest).collect::<Vec<_>>(),
            [c]
        );
        // A name anywhere, a failover hop included, must be looked up: the plan waits.
        let named = Dest::Host("pbx.example.com".into(), 5060);
        assert!(resolve_now(|_| false, &[hop(named.clone(), Vec::new())]).is_none());
        let late = [hop(Dest::Addr(a), vec![hop(named, Vec::new())])];
        assert!(resolve_now(|_| false, &late).is_none());
    }

    #[test]
    fn a_failed_request_gets_a_503_for_its_own_branch() {
        let dest: SocketAddr = "192.0.2.9:5061".parse().unwrap();
        let req = b"INVITE sip:bob@192.0.2.9 SIP/2.0\r\n\
Via: SIP/2.0/TLS 192.0.2.1:5061;branch=z9hG4bKours\r\n\
Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bKcaller\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@192.0.2.9>\r\nCall-ID: c1\r\n\
CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let resp = transport_failure_response(req, dest).expect("a 503");
        assert_eq!(resp.status(), Some(503));
        let key = client_key(&resp).expect("matches a client transaction");
        assert_eq!(key.branch(), "z9hG4bKours");
        assert_eq!(key.method(), "INVITE");
        let ack = String::from_utf8_lossy(req).replacen("INVITE", "ACK", 2);
        assert!(transport_failure_response(ack.as_bytes(), dest).is_none());
        let ok = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TLS 192.0.2.1:5061;branch=z9hG4bKx\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\nCall-ID: c1\r\n\
CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        assert!(transport_failure_response(ok, dest).is_none());
        assert!(transport_failure_response(b"garbage", dest).is_none());
    }
}
