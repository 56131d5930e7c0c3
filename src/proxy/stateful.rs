//! The stateful proxy (RFC 3261 §16 with §17 transactions): one task per received request
//! owns its server transaction, a client transaction per branch and the response context.
//! The tables here only route events (retransmissions, ACKs, CANCELs, responses) to the task
//! that owns the transaction.
//!
//! The protocol decisions are pure and live elsewhere: routing in [`super::pipeline`], the
//! forwarded bytes in [`super::forward`], best-response selection in [`super::response`], the
//! state machines in [`crate::transaction`]. This file moves events between them and the
//! sockets.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use super::forward::{self, Local, Options, Target};
use super::pipeline::{AuthNeed, Dest, Hop, Plan};
use super::response::{Final, ResponseContext};
use crate::auth::mac::RouteKey;
use crate::auth::service::{Authenticator, Kind as AuthKind, Outcome};
use crate::config::{Config, MediaMode, Proto};
use crate::media::session::Media;
use crate::sip::{Framing, Message, Rewrite, reply};
use crate::transaction::{
    ClientAction, ClientTxn, Kind, ServerAction, ServerTxn, Timers, TxnKey, cancel_for, client_key,
    invite_key_for_cancel, server_key,
};
use crate::transport::server::Transports;
use crate::transport::{Outbound, Source};

/// Events queued per transaction task (a retransmission storm beyond this waits).
const EVENTS: usize = 8;

/// What the owning task is told.
#[derive(Debug)]
enum Event {
    /// The request was received again.
    Retransmission,
    /// The ACK for our non-2xx final.
    Ack,
    /// The caller cancelled (a 200 for the CANCEL was already sent).
    Cancel,
    /// A response for branch `idx`, or for the CANCEL sent on that branch. Boxed: the
    /// channel allocates its slots in blocks, and every transaction has a channel.
    Response {
        idx: usize,
        cancel: bool,
        resp: Box<Message>,
    },
}

/// The proxy's transaction tables.
pub struct Proxy {
    cfg: Arc<Config>,
    transports: Arc<Transports>,
    /// Our sockets, to pick the outgoing one and write Via/Record-Route.
    local: Vec<(Proto, SocketAddr)>,
    timers: Timers,
    /// Server transactions by key.
    server: DashMap<TxnKey, mpsc::Sender<Event>>,
    /// Client transactions (and the CANCELs we sent) by key → (owner, branch, is CANCEL).
    client: DashMap<TxnKey, (mpsc::Sender<Event>, usize, bool)>,
    /// The media relay side, when enabled (set once at start).
    media: OnceLock<Arc<Media>>,
    /// Signs our Record-Route and branches.
    key: RouteKey,
    /// Transactions in flight per source IP (`limits.transactions_per_ip`).
    per_ip: Arc<DashMap<IpAddr, usize>>,
    /// Bytes of outsized messages held by live transactions (`limits.transaction_memory`).
    large_bytes: Arc<AtomicUsize>,
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
}

impl Proxy {
    pub fn new(
        cfg: Arc<Config>,
        transports: Arc<Transports>,
        local: Vec<(Proto, SocketAddr)>,
        key: RouteKey,
    ) -> Self {
        let timers = Timers {
            fr: cfg.server.fr_timer,
            fr_inv: cfg.server.fr_inv_timer,
            ..Timers::default()
        };
        Self {
            media: OnceLock::new(),
            cfg,
            transports,
            local,
            timers,
            server: DashMap::new(),
            client: DashMap::new(),
            key,
            per_ip: Arc::new(DashMap::new()),
            large_bytes: Arc::new(AtomicUsize::new(0)),
            stats: ProxyStats::default(),
        }
    }

    /// The proxy's counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// Hands an event to a transaction task without waiting: a task whose queue is full is
    /// busy with a storm of retransmissions, and the peer will send this one again.
    fn post(&self, tx: &mpsc::Sender<Event>, event: Event) {
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(event) {
            self.stats.events_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Transactions alive (server and client), for logs, tests and `show`.
    pub fn transaction_count(&self) -> (usize, usize) {
        (self.server.len(), self.client.len())
    }

    /// Gives a request to the transaction it belongs to (a retransmission, the ACK for our
    /// non-2xx final, or a CANCEL). True if it was consumed.
    pub fn absorb(&self, msg: &Message, source: Source) -> bool {
        let method = msg.method().unwrap_or_default();
        if method == "CANCEL" {
            let Some(key) = invite_key_for_cancel(msg) else {
                return false;
            };
            let Some(tx) = self.server.get(&key).map(|e| e.value().clone()) else {
                return false;
            };
            // RFC 3261 §16.10: answer the CANCEL at once, then cancel the branches.
            let nated = crate::nat::detect::detect(msg, source.remote).is_nated();
            let out = self.upstream(
                msg,
                source,
                reply::response(msg, source.remote, 200, "OK", &[]),
                nated,
            );
            self.transports.send(out);
            self.post(&tx, Event::Cancel);
            return true;
        }
        let Some(key) = server_key(msg) else {
            return false;
        };
        let Some(tx) = self.server.get(&key).map(|e| e.value().clone()) else {
            return false;
        };
        let event = if method == "ACK" {
            Event::Ack
        } else {
            Event::Retransmission
        };
        self.post(&tx, event);
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
        if let Some((tx, idx, cancel)) = self.client.get(&key).map(|e| e.value().clone()) {
            self.post(
                &tx,
                Event::Response {
                    idx,
                    cancel,
                    resp: Box::new(resp),
                },
            );
            return;
        }
        let forwarded = resp.status().is_some_and(|s| (200..300).contains(&s))
            && key.method == "INVITE"
            && self.forward_stray(&resp);
        if !forwarded {
            self.stats.stray_dropped.fetch_add(1, Relaxed);
            debug!(peer.addr = %source.remote, sip.status = resp.status(), "response matches no transaction: dropped");
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
            b.starts_with(forward::BRANCH_PREFIX) && self.key.verify_branch(b, dest)
        });
        if !signed {
            crate::security_event!("stray_response", dest, sip.status = resp.status());
            return false;
        }
        let mut rw = Rewrite::new(resp);
        if rw.pop_via().is_err() {
            return false;
        }
        let proto = if next.is_reliable() {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        let out = Outbound {
            proto,
            local: self.socket_for(proto),
            dest,
            bytes: rw.finish(),
        };
        self.transports.send(out);
        true
    }

    /// Enables media relaying (once, at start).
    pub fn set_media(&self, media: Arc<Media>) {
        let _ = self.media.set(media);
    }

    /// The media side, when enabled.
    pub fn media(&self) -> Option<&Arc<Media>> {
        self.media.get()
    }

    /// Carries out a routing plan for a new request: proxy authentication when the plan asks
    /// for it (the seed's `proxy_authorize` + `check_from` + `consume_credentials`), name
    /// resolution, then the transaction task. Runs off the receive loop.
    pub async fn forward(
        self: Arc<Self>,
        msg: Message,
        source: Source,
        plan: Plan,
        auth: Option<Arc<Authenticator>>,
        now_unix: u64,
    ) {
        let reply_now = |status: u16, reason: &str, extra: &[(&str, &str)]| {
            reply::response(&msg, source.remote, status, reason, extra)
        };
        if plan.stateless {
            let dests = resolve(&plan.targets).await;
            if let Some(Some(dest)) = dests.first() {
                self.forward_stateless(&msg, source, &plan, *dest).await;
            }
            return;
        }
        let res = match self.reserve(&msg, source) {
            Ok(res) => res,
            Err(Refusal::Owned) => {
                debug!("request already has a transaction");
                return;
            }
            Err(Refusal::Limit(limit)) => {
                self.stats.txn_limited.fetch_add(1, Relaxed);
                crate::security_event!("transaction_limit", source.remote, limit);
                let bytes = reply_now(503, "Service Unavailable", &[("Retry-After", "5")]);
                let nated = plan.sender_nated;
                self.transports
                    .send(self.upstream(&msg, source, bytes, nated));
                return;
            }
        };
        let mut strip_proxy_auth = false;
        let mut auth_user = None;
        if let Some(need) = plan.auth {
            let verdict = match &auth {
                None => Err((500, reply_now(500, "Server Internal Error", &[]))),
                Some(a) => {
                    let peer = source.remote;
                    authorize(a, &msg, peer, need, now_unix, &reply_now, &self.cfg).await
                }
            };
            match verdict {
                Ok(user) => {
                    strip_proxy_auth = true;
                    auth_user = Some(user);
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
                Err((_, bytes)) => return self.launch(res, msg, source, Work::Reply(bytes)),
            }
        }
        let resolved = resolve(&plan.targets).await;
        let mut kept = Plan {
            targets: Vec::new(),
            ..plan.clone()
        };
        let mut dests = Vec::new();
        for (hop, dest) in plan.targets.iter().zip(resolved) {
            if let Some(d) = dest {
                kept.targets.push(hop.clone());
                dests.push(d);
            }
        }
        if dests.is_empty() {
            let bytes = reply_now(503, "Service Unavailable", &[("Retry-After", "30")]);
            return self.launch(res, msg, source, Work::Reply(bytes));
        }
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
        );
    }

    /// Forwards an ACK for a 2xx (end-to-end, no transaction).
    pub async fn forward_stateless(
        &self,
        msg: &Message,
        source: Source,
        plan: &Plan,
        dest: SocketAddr,
    ) {
        let Some(hop) = plan.targets.first() else {
            return;
        };
        let target = Target {
            ruri: hop.ruri.clone(),
            dest,
            proto: hop.proto,
        };
        let (inbound, outbound) = self.sides(source, hop.proto);
        let sent_by = msg
            .top_via()
            .map(|v| format!("{}:{}", v.host, v.port.unwrap_or(5060)));
        let nated = plan.sender_nated;
        let branch = forward::branch_id(
            msg,
            msg.top_via().ok().and_then(|v| v.branch()).unwrap_or(""),
            sent_by.as_deref().unwrap_or(""),
            0,
            &self.key,
            self.upstream_dest(msg, source, nated),
        );
        let bytes = self.build(
            msg,
            &target,
            inbound,
            outbound,
            &branch,
            plan,
            false,
            None,
            (source.remote, nated),
        );
        // An ACK may carry the answer to a late offer (RFC 3264 §5: offer in the 2xx).
        let bytes = match self.media.get() {
            Some(m) if !msg.body().is_empty() => {
                match m
                    .on_request(msg, bytes, "", None, source.remote, None)
                    .await
                {
                    Ok(b) => b,
                    // invariant: an ACK is never refused (`Media::on_request`).
                    Err(_) => return,
                }
            }
            _ => bytes,
        };
        debug!(%dest, "forwarding statelessly");
        self.transports.send(Outbound {
            proto: hop.proto,
            local: self.socket_for(hop.proto),
            dest,
            bytes,
        });
    }

    /// Claims the server transaction of a new request before any slow work (authentication,
    /// name resolution), so that its retransmissions are absorbed meanwhile. `None` when the
    /// request already has an owner (it was a retransmission after all) or when
    /// `limits.transactions(_per_ip)` are reached.
    pub fn reserve(&self, msg: &Message, source: Source) -> Result<Reservation, Refusal> {
        let key = server_key(msg).ok_or(Refusal::Owned)?;
        let limits = &self.cfg.limits;
        if self.server.len() >= limits.transactions {
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
        let (tx, rx) = mpsc::channel(EVENTS);
        match self.server.entry(key.clone()) {
            dashmap::Entry::Occupied(_) => Err(Refusal::Owned),
            dashmap::Entry::Vacant(v) => {
                v.insert(tx.clone());
                Ok(Reservation {
                    key,
                    tx,
                    rx,
                    slot,
                    charge,
                })
            }
        }
    }

    /// Runs the transaction task for a reserved request: forward it along `work`, or answer
    /// it locally (statefully: retransmissions get the same answer, the ACK is absorbed).
    pub fn launch(
        self: &Arc<Self>,
        mut res: Reservation,
        msg: Message,
        source: Source,
        work: Work,
    ) {
        let span = info_span!(
            "txn",
            sip.method = msg.method().unwrap_or_default(),
            sip.call_id = msg.call_id().unwrap_or_default(),
            sip.branch = %res.key.branch
        );
        let proxy = self.clone();
        // If the task panics, its table entry goes with it (no leak, and a retransmission
        // of the request is not absorbed by a task that no longer exists).
        let guard = EntryGuard {
            proxy: self.clone(),
            key: res.key.clone(),
            tx: res.tx.clone(),
            _charge: std::mem::take(&mut res.charge),
        };
        tokio::spawn(
            async move {
                proxy.run(res, msg, source, work).await;
                drop(guard);
            }
            .instrument(span),
        );
    }

    /// The task owning one proxied request.
    async fn run(self: Arc<Self>, res: Reservation, msg: Message, source: Source, work: Work) {
        let Reservation {
            key,
            tx,
            mut rx,
            slot,
            charge: _,
        } = res;
        // The per-IP place is held while the request is pending; a transaction that has
        // sent its final only waits out its timers (bounded by the total limit).
        let mut slot = Some(slot);
        let now = Instant::now();
        let (plan, dests, strip_proxy_auth, auth_user, local_reply) = match work {
            Work::Forward {
                plan,
                dests,
                strip_proxy_auth,
                auth_user,
            } => (plan, dests, strip_proxy_auth, auth_user, None),
            Work::Reply(bytes) => (Plan::default(), Vec::new(), false, None, Some(bytes)),
        };
        let invite = msg.method() == Some("INVITE");
        let kind = if invite {
            Kind::Invite
        } else {
            Kind::NonInvite
        };
        let mut server = ServerTxn::new(kind, source.proto == Proto::Tcp, self.timers, now);
        // force_rport: a sender behind NAT is answered at its source port.
        let nated = if local_reply.is_some() {
            crate::nat::detect::detect(&msg, source.remote).is_nated()
        } else {
            plan.sender_nated
        };
        let answered_locally = local_reply.is_some();
        if let Some(bytes) = local_reply {
            let status = Message::parse(&bytes, Framing::Datagram)
                .ok()
                .and_then(|m| m.status())
                .unwrap_or(500);
            server.respond(status, bytes, now);
        } else if invite {
            // RFC 3261 §16.2: a proxy answers 100 to an INVITE it will forward.
            let trying = reply::response(&msg, source.remote, 100, "Trying", &[]);
            server.respond(100, trying, now);
        }
        let incoming_branch = key.branch.clone();
        let mut branches: Vec<Branch> = Vec::new();
        // A media limit refused a branch's SDP: its status and headers answer that branch.
        let mut media_refused: Option<crate::media::session::Refused> = None;
        for (i, (hop, dest)) in plan.targets.iter().zip(&dests).enumerate() {
            let branch_id = forward::branch_id(
                &msg,
                &incoming_branch,
                &key.sent_by,
                i,
                &self.key,
                self.upstream_dest(&msg, source, nated),
            );
            let target = Target {
                ruri: hop.ruri.clone(),
                dest: *dest,
                proto: hop.proto,
            };
            let (inbound, outbound) = self.sides(source, hop.proto);
            let bytes = self.build(
                &msg,
                &target,
                inbound,
                outbound,
                &branch_id,
                &plan,
                strip_proxy_auth,
                hop.flow,
                (source.remote, nated),
            );
            // Media: each branch of an initial INVITE gets its own relay session; requests
            // inside a relayed dialog go through its session (BYE ends it).
            let relay = plan
                .media
                .map(|mode| relay_decision(mode, plan.sender_nated, hop));
            let in_dialog = msg.to().ok().and_then(|t| t.tag()).is_some();
            let bytes = match self.media.get() {
                Some(m) if relay.is_some() || in_dialog => {
                    let user = auth_user.as_deref();
                    let src = source.remote;
                    match m
                        .on_request(&msg, bytes, &branch_id, relay, src, user)
                        .await
                    {
                        Ok(b) => b,
                        // A media limit: this branch is answered locally (below).
                        Err(why) => {
                            media_refused = Some(why);
                            continue;
                        }
                    }
                }
                _ => bytes,
            };
            let Ok(fwd) = Message::parse(&bytes, Framing::Datagram) else {
                warn!("forwarded request does not parse; branch dropped");
                continue;
            };
            let Some(ck) = server_key(&fwd) else {
                warn!("forwarded request has no transaction key; branch dropped");
                continue;
            };
            self.client.insert(ck.clone(), (tx.clone(), i, false));
            let txn = ClientTxn::new(kind, fwd, hop.proto == Proto::Tcp, self.timers, now);
            branches.push(Branch {
                relay: relay.or((!in_dialog).then_some(false)),
                id: branch_id,
                idx: i,
                hop: hop.clone(),
                dest: *dest,
                key: ck,
                txn: Some(txn),
                cancel: None,
                cancel_pending: false,
            });
        }
        drop(tx);
        let mut rc = ResponseContext::new(plan.targets.len());
        for b in &branches {
            debug!(branch = b.idx, dest = %b.dest, transport = b.hop.proto.as_str(), "forwarding");
        }
        if branches.len() < plan.targets.len() {
            for i in 0..plan.targets.len() {
                if !branches.iter().any(|b| b.idx == i) {
                    rc.on_local_final(i, media_refused.map_or(500, |r| r.status()));
                }
            }
        }

        let mut server_done = false;
        // Media: the initial INVITE's final response was reported; a CANCEL arrived.
        let mut media_final = false;
        let mut cancelled = false;
        loop {
            let now = Instant::now();
            // Drain the branches.
            let mut cancel_others = false;
            for b in &mut branches {
                while let Some(a) = b.txn.as_mut().and_then(ClientTxn::poll_action) {
                    match a {
                        ClientAction::Send(bytes) => self.send_branch(b, bytes),
                        ClientAction::PassUp(resp) => {
                            let status = resp.status().unwrap_or(0);
                            let resp = match self.media.get() {
                                // The answering party's SIP comes from where we sent it.
                                Some(m) if b.relay != Some(false) => {
                                    m.on_response(&msg, resp, &b.id, b.relay, b.dest).await
                                }
                                _ => resp,
                            };
                            let first_2xx = invite
                                && !media_final
                                && b.relay.is_some()
                                && (200..300).contains(&status);
                            if (101..200).contains(&status) && b.cancel_pending {
                                b.cancel_pending = false;
                                self.send_cancel(b, &tx_for(&self.client, &b.key), now);
                            }
                            let d = rc.on_response(b.idx, resp);
                            cancel_others |= d.cancel_others;
                            if let Some(up) = d.forward {
                                if let Some(bytes) = pop_our_via(&up) {
                                    server.respond(up.status().unwrap_or(0), bytes, now);
                                }
                            }
                            if first_2xx && let Some(m) = self.media.get() {
                                media_final = true;
                                m.on_final(&msg, status, false).await;
                            }
                        }
                        ClientAction::Timeout => {
                            rc.on_local_final(b.idx, 408);
                            if b.txn.as_ref().is_some_and(ClientTxn::got_provisional) {
                                self.send_cancel(b, &tx_for(&self.client, &b.key), now);
                            }
                        }
                        ClientAction::TransportError => rc.on_local_final(b.idx, 503),
                        ClientAction::Terminated => {
                            self.client.remove(&b.key);
                            b.txn = None;
                        }
                    }
                }
                if let Some(c) = b.cancel.as_mut() {
                    while let Some(a) = c.poll_action() {
                        match a {
                            ClientAction::Send(bytes) => {
                                let out = Outbound {
                                    proto: b.hop.proto,
                                    local: self.socket_for(b.hop.proto),
                                    dest: b.dest,
                                    bytes,
                                };
                                self.transports.send(out);
                            }
                            ClientAction::Terminated => {
                                if let Some(k) = server_key(c.request()) {
                                    self.client.remove(&k);
                                }
                                b.cancel = None;
                                break;
                            }
                            ClientAction::PassUp(_)
                            | ClientAction::Timeout
                            | ClientAction::TransportError => {}
                        }
                    }
                }
            }
            if cancel_others {
                self.cancel_pending(&mut branches, &mut rc, now);
                continue;
            }
            if let Some(best) = rc.conclude().filter(|_| !answered_locally) {
                let (status, bytes) = match best {
                    Final::Received(resp) => {
                        let status = resp.status().unwrap_or(500);
                        match pop_our_via(&resp) {
                            Some(b) => (status, b),
                            // A downstream UA answered with only our Via (it built the response
                            // from our CANCEL, say): RFC 3261 §16.7 step 3 forbids forwarding it,
                            // so the caller gets the same status from us.
                            None => (
                                status,
                                reply::response(&msg, source.remote, status, reason(status), &[]),
                            ),
                        }
                    }
                    Final::Local(status) => {
                        // Every branch refused by a media limit: its own answer (the 503 → 500
                        // of RFC 3261 §16.7 step 6 is for a 503 received from downstream).
                        let status = match media_refused {
                            Some(r) if branches.is_empty() => r.status(),
                            _ => status,
                        };
                        let extra = media_refused
                            .filter(|r| r.status() == status)
                            .map_or(&[][..], |r| r.headers());
                        let bytes =
                            reply::response(&msg, source.remote, status, reason(status), extra);
                        (status, bytes)
                    }
                };
                server.respond(status, bytes, now);
                if invite
                    && !media_final
                    && plan.media.is_some()
                    && let Some(m) = self.media.get()
                {
                    media_final = true;
                    m.on_final(&msg, status, cancelled).await;
                }
            }
            if server.final_status().is_some() {
                drop(slot.take());
            }
            while let Some(a) = server.poll_action() {
                match a {
                    ServerAction::Send(bytes) => {
                        let out = self.upstream(&msg, source, bytes, nated);
                        self.transports.send(out);
                    }
                    ServerAction::AckTimeout => debug!("no ACK for our final response"),
                    ServerAction::Terminated => {
                        // The server side is over: a later copy of the request is new.
                        server_done = true;
                        self.server.remove(&key);
                    }
                }
            }
            let branches_done = branches
                .iter()
                .all(|b| b.txn.is_none() && b.cancel.is_none());
            if server_done && branches_done {
                break;
            }
            let deadline = branches
                .iter()
                .filter_map(|b| b.txn.as_ref().and_then(ClientTxn::poll_timeout))
                .chain(
                    branches
                        .iter()
                        .filter_map(|b| b.cancel.as_ref().and_then(ClientTxn::poll_timeout)),
                )
                .chain(server.poll_timeout())
                .min();
            let event = match deadline {
                Some(d) => tokio::select! {
                    e = rx.recv() => e,
                    () = tokio::time::sleep_until(d) => None,
                },
                None => rx.recv().await,
            };
            let now = Instant::now();
            match event {
                Some(Event::Retransmission) => server.on_request_retransmission(now),
                Some(Event::Ack) => server.on_ack(now),
                Some(Event::Cancel) => {
                    cancelled = true;
                    self.cancel_pending(&mut branches, &mut rc, now);
                }
                Some(Event::Response { idx, cancel, resp }) => {
                    if let Some(b) = branches.iter_mut().find(|b| b.idx == idx) {
                        let t = if cancel {
                            b.cancel.as_mut()
                        } else {
                            b.txn.as_mut()
                        };
                        if let Some(t) = t {
                            t.on_response(*resp, now);
                        }
                    }
                }
                None => {
                    server.on_timer(now);
                    for b in &mut branches {
                        if let Some(t) = b.txn.as_mut() {
                            t.on_timer(now);
                        }
                        if let Some(c) = b.cancel.as_mut() {
                            c.on_timer(now);
                        }
                    }
                }
            }
        }
        self.server.remove(&key);
        for b in &branches {
            self.client.remove(&b.key);
        }
        let (servers, clients) = self.transaction_count();
        debug!(
            transactions.server = servers,
            transactions.client = clients,
            "transaction done"
        );
    }

    /// Cancels every pending branch (RFC 3261 §16.10): CANCEL to those with a provisional;
    /// those without one are cancelled when it arrives, or end as 487 if they never answer.
    fn cancel_pending(&self, branches: &mut [Branch], rc: &mut ResponseContext, now: Instant) {
        let pending: Vec<(usize, bool)> = rc.pending().collect();
        for (idx, provisional) in pending {
            let Some(b) = branches.iter_mut().find(|b| b.idx == idx) else {
                continue;
            };
            if provisional {
                let tx = tx_for(&self.client, &b.key);
                self.send_cancel(b, &tx, now);
            } else {
                b.cancel_pending = true;
                rc.on_local_final(idx, 487);
            }
        }
    }

    /// Starts a CANCEL client transaction on a branch (once).
    fn send_cancel(&self, b: &mut Branch, tx: &Option<mpsc::Sender<Event>>, now: Instant) {
        if b.cancel.is_some() {
            return;
        }
        let Some(tx) = tx else { return };
        let Some(txn) = b.txn.as_mut() else { return };
        // RFC 3261 §9.1: once cancelled, the INVITE waits 64·T1 at most for its final.
        txn.on_cancel(now);
        let bytes = cancel_for(txn.request());
        let Ok(cancel) = Message::parse(&bytes, Framing::Datagram) else {
            return;
        };
        if let Some(k) = server_key(&cancel) {
            self.client.insert(k, (tx.clone(), b.idx, true));
        }
        b.cancel = Some(ClientTxn::new(
            Kind::NonInvite,
            cancel,
            b.hop.proto == Proto::Tcp,
            self.timers,
            now,
        ));
    }

    fn send_branch(&self, b: &Branch, bytes: Vec<u8>) {
        self.transports.send(Outbound {
            proto: b.hop.proto,
            local: self.socket_for(b.hop.proto),
            dest: b.dest,
            bytes,
        });
    }

    /// A response to the request, addressed by [`crate::nat::response_dest`].
    fn upstream(&self, req: &Message, source: Source, bytes: Vec<u8>, nated: bool) -> Outbound {
        Outbound {
            proto: source.proto,
            local: source.local,
            dest: self.upstream_dest(req, source, nated),
            bytes,
        }
    }

    /// Where responses to the request go (bound into our branch MAC).
    fn upstream_dest(&self, req: &Message, source: Source, nated: bool) -> SocketAddr {
        crate::nat::response_dest(req, source, nated)
    }

    /// Our listening socket for a transport (the first one configured).
    fn socket_for(&self, proto: Proto) -> SocketAddr {
        self.local
            .iter()
            .find(|(p, _)| *p == proto)
            .or_else(|| self.local.first())
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 5060)), |(_, a)| *a)
    }

    /// Our side where the request came in and where it leaves.
    fn sides(&self, source: Source, out: Proto) -> ((Local, Proto), Local) {
        let adv = self.cfg.server.advertise;
        let inbound = Local {
            advertise: adv,
            port: source.local.port(),
        };
        let outbound = Local {
            advertise: adv,
            port: self.socket_for(out).port(),
        };
        ((inbound, source.proto), outbound)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        msg: &Message,
        target: &Target,
        inbound: (Local, Proto),
        outbound: Local,
        branch: &str,
        plan: &Plan,
        strip_proxy_auth: bool,
        callee_flow: Option<forward::Flow>,
        from: (SocketAddr, bool),
    ) -> Vec<u8> {
        let mut bytes = forward::request(
            msg,
            target,
            inbound,
            outbound,
            branch,
            Options {
                record_route: plan.record_route,
                strip_proxy_auth,
                nat: plan.nat,
                max_forwards_cap: self.cfg.server.max_forwards,
                caller_flow: plan.caller_flow,
                callee_flow,
                source: Some(from.0),
                force_rport: from.1,
            },
            &self.key,
        );
        if plan.pop_route || plan.strict_route {
            // Our Route is removed from the forwarded copy (loose routing), or the last one that
            // became the Request-URI (strict-route compatibility), RFC 3261 §16.4.
            if let Ok(m) = Message::parse(&bytes, Framing::Datagram) {
                let mut rw = Rewrite::new(&m);
                let popped = if plan.strict_route {
                    rw.pop_last_route()
                } else {
                    rw.pop_route()
                };
                if popped.is_ok() {
                    bytes = rw.finish();
                }
            }
        }
        bytes
    }
}

/// A claimed server transaction, not yet running.
pub struct Reservation {
    key: TxnKey,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
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
    tx: mpsc::Sender<Event>,
    _charge: MemCharge,
}

/// Bytes of an outsized message counted against `limits.transaction_memory` while its
/// transaction lives.
#[derive(Default)]
struct MemCharge {
    bytes: usize,
    held: Option<Arc<AtomicUsize>>,
}

impl Drop for MemCharge {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            held.fetch_sub(self.bytes, Relaxed);
        }
    }
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
            .remove_if(&self.key, |_, v| v.same_channel(&self.tx));
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

/// What the transaction task does with its request.
#[derive(Debug)]
pub enum Work {
    /// Forward along the plan; `dests[i]` is the resolved address of `plan.targets[i]`.
    Forward {
        plan: Plan,
        dests: Vec<SocketAddr>,
        strip_proxy_auth: bool,
        /// The user proxy authentication verified (media sessions count against it).
        auth_user: Option<String>,
    },
    /// Answer with these bytes (a complete response).
    Reply(Vec<u8>),
}

/// One branch of a proxied request.
struct Branch {
    /// Media: `Some(relayed?)` on a branch of an initial INVITE, `None` inside a dialog.
    relay: Option<bool>,
    /// Our branch id (the media session key of an initial INVITE's branch).
    id: String,
    idx: usize,
    hop: Hop,
    dest: SocketAddr,
    key: TxnKey,
    txn: Option<ClientTxn>,
    /// The CANCEL we sent on this branch.
    cancel: Option<ClientTxn>,
    /// Cancel as soon as a provisional arrives (RFC 3261 §9.1).
    cancel_pending: bool,
}

fn tx_for(
    client: &DashMap<TxnKey, (mpsc::Sender<Event>, usize, bool)>,
    key: &TxnKey,
) -> Option<mpsc::Sender<Event>> {
    client.get(key).map(|e| e.value().0.clone())
}

/// A downstream response with our Via removed, ready to go upstream; `None` when no Via would
/// be left (the response was meant for us, RFC 3261 §16.7 step 3) or it has none.
fn pop_our_via(resp: &Message) -> Option<Vec<u8>> {
    if resp.vias().ok()?.len() < 2 {
        return None;
    }
    let mut rw = Rewrite::new(resp);
    rw.pop_via().ok()?;
    Some(rw.finish())
}

fn reason(status: u16) -> &'static str {
    match status {
        408 => "Request Timeout",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        503 => "Service Unavailable",
        _ => match status / 100 {
            4 => "Client Error",
            5 => "Server Error",
            6 => "Global Failure",
            _ => "Error",
        },
    }
}

/// Proxy authentication of the caller (407 challenges), then `check_from` for `[[route]]`
/// rules: the From user must be the authenticated user. `Ok` holds that user, `Err` the
/// response to send.
async fn authorize(
    auth: &Authenticator,
    msg: &Message,
    peer: SocketAddr,
    need: AuthNeed,
    now: u64,
    reply_now: &impl Fn(u16, &str, &[(&str, &str)]) -> Vec<u8>,
    cfg: &Config,
) -> Result<String, (u16, Vec<u8>)> {
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
        .check(msg, peer, AuthKind::Proxy, &realm, &domain, now)
        .await
    {
        Outcome::Authorized { username } => {
            if need == AuthNeed::Route && from_user.as_deref() != Some(username.as_str()) {
                warn!(auth.user = %username, from.user = ?from_user, "From does not match the credentials");
                return Err((403, reply_now(403, "Use From ID", &[])));
            }
            Ok(username)
        }
        Outcome::Challenge { stale } => {
            let headers = auth.challenge(AuthKind::Proxy, &realm, now, stale);
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

/// Resolves the hops of a plan: addresses as they are, names through the system resolver
/// (A/AAAA; NAPTR/SRV is not done). A name that does not resolve drops its branch.
pub async fn resolve(hops: &[Hop]) -> Vec<Option<SocketAddr>> {
    let mut out = Vec::with_capacity(hops.len());
    for h in hops {
        out.push(match &h.dest {
            Dest::Addr(a) => Some(*a),
            Dest::Host(host, port) => match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(mut addrs) => addrs.next(),
                Err(error) => {
                    warn!(%host, %error, "next hop does not resolve");
                    None
                }
            },
        });
    }
    out
}

/// Whether a branch of an initial INVITE is relayed: `[[route]].media` / `media.mode`, where
/// `nat` means the caller or this callee is behind NAT (the callee's Contact is not where it
/// registered from).
fn relay_decision(mode: MediaMode, caller_nated: bool, hop: &Hop) -> bool {
    match mode {
        MediaMode::Always => true,
        MediaMode::Never => false,
        MediaMode::Nat => caller_nated || hop.flow.is_some(),
    }
}
