//! Media sessions per dialog (the seed's `use_media_proxy` / `end_media_session`): which calls
//! are relayed, the offer/answer rewrite of every SDP the proxy forwards for them, and the
//! end of each session — with exactly one stats line and one `cdr` row per call.
//!
//! [`Media`] is the thin async facade the proxy calls: [`Media::offer`] for each request it
//! forwards, [`Media::answer`] for each response it passes up, [`Media::finished`] for the
//! final status of an initial INVITE. Each returns the new SDP body (or `None`: unchanged);
//! the proxy puts it in the message in its own single rewrite. What happens to a call is
//! decided by the pure state machine in `call` (per call and per branch); its relay
//! operations are executed by `relay_client`, one control round trip per SDP; `report` builds
//! the stats line and the CDR row, `cdr` writes it.
//!
//! A call is keyed by (Call-ID, caller's From-tag). Each branch of the initial INVITE gets its
//! own relay session (keyed by our branch id), so early media from several forks works
//! (rtpengine#502, #439); the branch whose 2xx is forwarded wins and the others are deleted.
//! Every later SDP of the dialog (re-INVITE, UPDATE, ACK of a late offer, their answers) goes
//! through the winner's session: the same ports, a re-latch window for the side that sent it
//! (rtpproxy#47, rtpengine#1416).
//!
//! A call ends on BYE, on a final ≥300 (CANCEL or failure), when its offer is never answered,
//! or when the relay reports idle media (`media.idle_timeout`, `media.hold_timeout` on hold);
//! nothing else owns ports, so nothing leaks (rtpengine#526, kamailio#992).
//!
//! On a public host (issue #10): an offer takes ports only for its m= lines with a non-zero
//! port, at most `media.max_streams` of them (more: 488); relay sessions are bounded in total
//! (`media.max_sessions`, and the port range: 503 + Retry-After) and per caller
//! (`media.max_sessions_per_caller`, the authenticated user or else the source IP: 486). Each
//! side's SIP source is passed to the relay with its SDP, so a leg latches only to a source
//! its party signalled (strict source, `sipedge_relay` `latch`).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use sipedge_relay::{Closed, RelayError, RelayHandle, SessionId, SessionStats, Side};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::acc::{self, Hangup};
use crate::clock::Clock;
use crate::media::call::CallIds;
pub use crate::media::call::EndReason;
use crate::media::call::{Call, Finished, RelayClosed, RelayOp, SdpStep};
use crate::media::cdr::CdrWriter;
use crate::media::relay_client::{Done, RelayClient};
use crate::media::report;
use crate::media::sdp;
use crate::metrics::{Kind, Refresh, Registry};
use crate::sip::{HeaderName, Message};

/// Why the media layer refuses an SDP offer: the request is answered with
/// [`Refused::status`] instead of being forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// More m= lines that need ports than `media.max_streams`.
    TooManyStreams,
    /// `media.max_sessions` reached, or no free port pairs (or the server is stopping).
    Busy,
    /// The caller already holds `media.max_sessions_per_caller` sessions.
    CallerLimit,
}

impl Refused {
    /// The SIP status answering the request (exhaustive: no wildcard arm).
    pub fn status(self) -> u16 {
        match self {
            // RFC 3261 §21.4.26: the session description is not acceptable.
            Self::TooManyStreams => 488,
            // RFC 3261 §21.5.4: temporarily overloaded; Retry-After says when to come back.
            Self::Busy => 503,
            // The caller's own calls must end first; another server would say the same.
            Self::CallerLimit => 486,
        }
    }

    /// Extra headers of the answer.
    pub fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Busy => &[("Retry-After", "30")],
            Self::TooManyStreams | Self::CallerLimit => &[],
        }
    }

    /// The configuration key of the limit, for the security log line.
    pub fn limit(self) -> &'static str {
        match self {
            Self::TooManyStreams => "media.max_streams",
            Self::Busy => "media.max_sessions",
            Self::CallerLimit => "media.max_sessions_per_caller",
        }
    }

    fn idx(self) -> usize {
        match self {
            Self::TooManyStreams => 0,
            Self::Busy => 1,
            Self::CallerLimit => 2,
        }
    }
}

/// The media limits (`[media]` table).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// m= lines that take ports, per SDP.
    pub max_streams: usize,
    /// Relay sessions in total.
    pub max_sessions: usize,
    /// Relay sessions per caller.
    pub max_sessions_per_caller: usize,
}

/// Refusals since start, per limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    pub too_many_streams: u64,
    pub busy: u64,
    pub caller_limit: u64,
    /// Answered 503 because the relay could not open a session (not a limit).
    pub relay_error: u64,
}

/// How a branch's request relates to media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A branch of an initial INVITE whose media goes through the relay.
    Relay,
    /// A branch of an initial INVITE whose media goes direct (not relayed).
    Direct,
    /// Any request inside a dialog (relayed when its dialog is).
    InDialog,
}

type CallKey = (String, String);

/// The media side of the proxy: the relayed calls (each a pure [`Call`] behind a lock), the
/// relay client that executes what they decide, the limits, and the CDR writer.
pub struct Media {
    relay: RelayClient,
    address: IpAddr,
    calls: DashMap<CallKey, Arc<Mutex<Call>>>,
    /// Relay session → its call and caller, for timeouts reported by the relay. Every live
    /// session is here (bounded by `limits.max_sessions`).
    by_session: DashMap<SessionId, (CallKey, String)>,
    /// Sessions allocated or being allocated (reserved before the relay is asked).
    live: AtomicUsize,
    /// Caller → its live sessions; an entry exists only while the count is positive.
    per_caller: DashMap<String, usize>,
    limits: Limits,
    refusals: [AtomicU64; 3],
    /// Offers answered 503 because the relay failed to open a session (a socket error such
    /// as EMFILE): never forwarded unrelayed, never a security event (the fault is ours).
    relay_errors: AtomicU64,
    /// Shutting down: no new sessions.
    closing: AtomicBool,
    /// Shared with accounting (the calls that are not relayed).
    cdr: Arc<CdrWriter>,
    clock: Arc<dyn Clock>,
    /// The reports of ended calls waiting for their sessions' stats ([`Self::end`]): the
    /// shutdown waits for them before it closes the CDR writer.
    reports: Mutex<JoinSet<()>>,
}

/// A call's stats line and its CDR row ([`report::report`]), written through `cdr`.
async fn write_report(
    cdr: &CdrWriter,
    clock: &dyn Clock,
    c: &Call,
    reason: EndReason,
    s: &SessionStats,
) {
    cdr.write(report::report(c, reason, s, clock.unix())).await;
}

/// Whether a body is SDP we should look at.
pub fn is_sdp(content_type: Option<&str>, body: &[u8]) -> bool {
    !body.is_empty()
        && content_type.is_none_or(|c| {
            c.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/sdp"))
        })
}

/// The body of `msg` when it is SDP.
fn sdp_body(msg: &Message) -> Option<&[u8]> {
    let body = msg.body();
    is_sdp(msg.header_str(HeaderName::ContentType), body).then_some(body)
}

fn ids(msg: &Message) -> Option<CallIds<'_>> {
    let from = msg.from().ok()?;
    let to = msg.to().ok()?;
    Some(CallIds {
        call_id: msg.call_id().ok()?,
        from_tag: from.tag()?,
        to_tag: to.tag(),
        from_uri: from.uri,
        to_uri: to.uri,
    })
}

/// A call in progress as `sipedge show calls` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveCall {
    pub call_id: String,
    pub from: String,
    pub to: String,
    /// `offered`, `early`, `confirmed`, `timed-out` or `ended`.
    pub state: &'static str,
    pub start_unix: u64,
    pub answer_unix: Option<u64>,
    /// Who the call is counted against: `user:NAME` or `ip:ADDR`.
    pub caller: String,
    /// Relay RTP ports per stream: (facing the caller, facing the callee).
    pub ports: Vec<(u16, u16)>,
    /// What the relay received from the caller and from the callee so far.
    pub from_caller: Option<LegView>,
    pub from_callee: Option<LegView>,
}

/// One direction's live figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LegView {
    pub packets: u64,
    pub bytes: u64,
    pub lost: u64,
    pub jitter_ms: f64,
    pub dropped: u64,
}

impl From<&sipedge_relay::LegStats> for LegView {
    fn from(s: &sipedge_relay::LegStats) -> Self {
        Self {
            packets: s.pkts,
            bytes: s.bytes,
            lost: s.lost,
            jitter_ms: s.jitter_ms,
            dropped: s.dropped,
        }
    }
}

/// The relay's counts as last read: the relay's control thread owns them, so they are
/// fetched (one round trip) by [`Refresh`] before the registry is read.
struct RelayGauges {
    relay: RelayHandle,
    ports: AtomicU64,
    strangers: AtomicU64,
    forwarded: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped: AtomicU64,
}

impl Refresh for RelayGauges {
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let c = self.relay.counts().await;
            self.ports.store(c.ports_in_use as u64, Ordering::Relaxed);
            self.strangers.store(c.strangers, Ordering::Relaxed);
            self.forwarded.store(c.forwarded, Ordering::Relaxed);
            self.forwarded_bytes
                .store(c.forwarded_bytes, Ordering::Relaxed);
            self.dropped.store(c.dropped, Ordering::Relaxed);
        })
    }
}

impl Media {
    /// The media side over a started relay; its calls' rows go through `cdr`.
    pub fn new(
        relay: RelayHandle,
        address: IpAddr,
        cdr: Arc<CdrWriter>,
        clock: Arc<dyn Clock>,
        limits: Limits,
    ) -> Self {
        Self {
            relay: RelayClient::new(relay),
            address,
            calls: DashMap::new(),
            by_session: DashMap::new(),
            live: AtomicUsize::new(0),
            per_caller: DashMap::new(),
            limits,
            refusals: Default::default(),
            relay_errors: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            cdr,
            clock,
            reports: Mutex::new(JoinSet::new()),
        }
    }

    /// Relay sessions held now (all callers).
    pub fn sessions(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Offers refused by a limit since start.
    pub fn refusals(&self) -> Refusals {
        let r = |i: usize| self.refusals[i].load(Ordering::Relaxed);
        Refusals {
            too_many_streams: r(0),
            busy: r(1),
            caller_limit: r(2),
            relay_error: self.relay_errors.load(Ordering::Relaxed),
        }
    }

    /// Registers the media counters, and the relay's (read from its control thread by a
    /// refresh hook before each read).
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        let me = Arc::downgrade(self);
        m.gauge("media_calls", "Relayed calls in progress.", move || {
            me.upgrade().map_or(0, |me| me.calls() as u64)
        });
        let me = Arc::downgrade(self);
        m.gauge("media_sessions", "Relay sessions held.", move || {
            me.upgrade().map_or(0, |me| me.sessions() as u64)
        });
        for (i, reason) in ["too_many_streams", "busy", "caller_limit"]
            .into_iter()
            .enumerate()
        {
            let me = Arc::downgrade(self);
            m.labelled(
                "media_offers_refused",
                "Offers refused by a media limit.",
                Kind::Counter,
                &[("reason", reason)],
                move || {
                    me.upgrade()
                        .map_or(0, |me| me.refusals[i].load(Ordering::Relaxed))
                },
            );
        }
        let me = Arc::downgrade(self);
        m.labelled(
            "media_offers_refused",
            "Offers refused by a media limit.",
            Kind::Counter,
            &[("reason", "relay_error")],
            move || {
                me.upgrade()
                    .map_or(0, |me| me.relay_errors.load(Ordering::Relaxed))
            },
        );
        let relay = Arc::new(RelayGauges {
            relay: self.relay().clone(),
            ports: AtomicU64::new(0),
            strangers: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let r = relay.clone();
        m.gauge(
            "relay_ports_in_use",
            "Relay UDP ports in use (2 per RTP/RTCP pair).",
            move || r.ports.load(Ordering::Relaxed),
        );
        let r = relay.clone();
        m.counter(
            "relay_strangers_dropped",
            "Datagrams dropped because their source was not the latched or a signalled one.",
            move || r.strangers.load(Ordering::Relaxed),
        );
        let r = relay.clone();
        m.counter(
            "relay_forwarded_packets",
            "RTP and RTCP datagrams forwarded.",
            move || r.forwarded.load(Ordering::Relaxed),
        );
        let r = relay.clone();
        m.counter(
            "relay_forwarded_bytes",
            "Payload bytes of the datagrams forwarded.",
            move || r.forwarded_bytes.load(Ordering::Relaxed),
        );
        let r = relay.clone();
        m.counter(
            "relay_dropped_packets",
            "Datagrams received on relay ports and not forwarded.",
            move || r.dropped.load(Ordering::Relaxed),
        );
        let me = Arc::downgrade(self);
        m.counter(
            "cdr_write_failures",
            "Call records the store refused (then spooled to media.cdr_spool).",
            move || me.upgrade().map_or(0, |me| me.cdr.spooled()),
        );
        let me = Arc::downgrade(self);
        m.counter(
            "cdr_commits",
            "Statements that wrote call records (a batch of the CDRs waiting at that moment each).",
            move || me.upgrade().map_or(0, |me| me.cdr.commits()),
        );
        m.on_refresh(relay);
    }

    /// The calls in progress with their live relay figures, for `sipedge show calls` and the
    /// web page: at most `max`, oldest first.
    pub async fn live_calls(&self, max: usize) -> Vec<LiveCall> {
        let calls: Vec<Arc<Mutex<Call>>> = self.calls.iter().map(|e| e.value().clone()).collect();
        let mut out = Vec::new();
        for call in calls {
            let (mut live, id) = {
                let c = call.lock().await;
                let (state, session) = c.view();
                let live = LiveCall {
                    call_id: c.call_id.clone(),
                    from: c.from_uri.clone(),
                    to: c.to_uri.clone(),
                    state,
                    start_unix: c.start_unix,
                    answer_unix: c.answer_unix,
                    caller: c.caller.clone(),
                    ports: session.map_or_else(Vec::new, |s| {
                        s.ports
                            .iter()
                            .map(|p| (p.caller.rtp, p.callee.rtp))
                            .collect()
                    }),
                    from_caller: None,
                    from_callee: None,
                };
                (live, session.map(|s| s.id))
            };
            if let Some(id) = id
                && let Ok(stats) = self.relay.handle().query(id).await
            {
                live.from_caller = Some(LegView::from(&stats.caller));
                live.from_callee = Some(LegView::from(&stats.callee));
            }
            out.push(live);
        }
        out.sort_by_key(|c| c.start_unix);
        out.truncate(max);
        out
    }

    /// The CDR writer (its spool path).
    pub fn cdr_writer(&self) -> &CdrWriter {
        &self.cdr
    }

    /// Relayed calls in progress.
    pub fn calls(&self) -> usize {
        self.calls.len()
    }

    /// The relay (for its counts).
    pub fn relay(&self) -> &RelayHandle {
        self.relay.handle()
    }

    // ---- The proxy's entry points: the received message in, the new body out ---------------

    /// The SDP body the forwarded request must carry instead of its own on `branch` (our
    /// branch id), or `None`: forward the body unchanged. `req` is the received request, `src`
    /// where it came from, `auth_user` who it authenticated as (the caller its sessions count
    /// against; else its source IP).
    ///
    /// A `Relay` branch of an initial INVITE registers the call and, with an offer, gets its
    /// own relay session. In a dialog (`InDialog`), SDP goes through the dialog's session and
    /// a BYE ends the dialog's media (DESIGN §4). `Direct` changes nothing.
    ///
    /// `Err`: a media limit refuses the offer; the branch is answered with
    /// [`Refused::status`] and [`Refused::headers`] instead of being forwarded. An ACK is
    /// never refused (what does not fit goes as it is).
    /// Whether [`Self::offer`] of an in-dialog request has anything to do: a call of its
    /// dialog is relayed. Without one the offer is a no-op, and the proxy skips the async
    /// step (a boxed future of 3.5 KB per BYE of every call not relayed; issue #15).
    pub fn holds_dialog(&self, req: &Message) -> bool {
        ids(req).is_some_and(|ids| self.find(ids.call_id, (ids.from_tag, ids.to_tag)).is_some())
    }

    pub async fn offer(
        &self,
        req: &Message,
        branch: &str,
        role: Role,
        src: SocketAddr,
        auth_user: Option<&str>,
    ) -> Result<Option<Vec<u8>>, Refused> {
        let Some(ids) = ids(req) else { return Ok(None) };
        let body = sdp_body(req);
        let r = match role {
            Role::Direct => Ok(None),
            Role::Relay => {
                let caller = match auth_user {
                    Some(u) => format!("user:{u}"),
                    None => format!("ip:{}", src.ip()),
                };
                self.initial_offer(&ids, branch, body, src, caller).await
            }
            Role::InDialog if req.method() == Some("BYE") => {
                self.bye(ids.call_id, (ids.from_tag, ids.to_tag)).await;
                Ok(None)
            }
            Role::InDialog => match body {
                Some(b) => {
                    let tags = (ids.from_tag, ids.to_tag);
                    self.in_dialog(ids.call_id, tags, ids.from_tag, b, src)
                        .await
                }
                None => Ok(None),
            },
        };
        match r {
            Err(_) if req.method() == Some("ACK") => Ok(None),
            r => r,
        }
    }

    /// The SDP body the response must carry upstream instead of its own, or `None`: unchanged.
    /// `req` is the received request, `resp` the response from downstream (our Via still on
    /// top), `branch` and `role` those of its request, `from` where the answering party's SIP
    /// comes from. On a `Relay` branch a 1xx with a To-tag opens an early dialog and a 2xx
    /// picks the winner, with SDP or not.
    pub async fn answer(
        &self,
        req: &Message,
        resp: &Message,
        branch: &str,
        role: Role,
        from: SocketAddr,
    ) -> Option<Vec<u8>> {
        let status = resp.status().unwrap_or(0);
        if !(101..300).contains(&status) || role == Role::Direct {
            return None;
        }
        let ids = ids(resp)?;
        let body = sdp_body(resp);
        match role {
            Role::Relay => {
                self.initial_response(&ids, branch, status, body, from)
                    .await
            }
            // The responder is the party the request was sent to: its tag is the request's
            // To-tag.
            Role::InDialog => {
                let body = body?;
                let sender = ids.to_tag.or_else(|| req.to().ok().and_then(|t| t.tag()))?;
                let tags = (ids.from_tag, ids.to_tag);
                self.in_dialog(ids.call_id, tags, sender, body, from)
                    .await
                    .ok()
                    .flatten()
            }
            Role::Direct => None,
        }
    }

    /// The final status of an initial INVITE went upstream (`cancelled`: a CANCEL arrived). A
    /// 2xx frees the losing forks; anything else ends the call (its stats line and CDR).
    ///
    /// `acc` is the call's accounting record: a relayed call keeps it for its CDR row (route,
    /// authenticated user, source). It is given back when this call is not relayed after all
    /// (no session, refused by a media limit, answered by a branch that is not relayed): the
    /// caller writes that row, so that every call has exactly one.
    pub async fn finished(
        &self,
        req: &Message,
        status: u16,
        cancelled: bool,
        acc: Option<acc::Start>,
    ) -> Option<acc::Start> {
        let Some(ids) = ids(req) else { return acc };
        let key = (ids.call_id.to_owned(), ids.from_tag.to_owned());
        let Some(call) = self.calls.get(&key).map(|c| c.clone()) else {
            return acc;
        };
        let mut c = call.lock().await;
        match c.finished(status, cancelled, self.clock.unix()) {
            Finished::Nothing => acc,
            Finished::Report(reason, stats) => {
                self.calls.remove(&key);
                c.acc = acc;
                self.report(&c, reason, &stats).await;
                None
            }
            Finished::Answered { delete, forget } => {
                let back = if forget {
                    self.calls.remove(&key);
                    acc
                } else {
                    c.acc = acc;
                    None
                };
                drop(c);
                for id in delete {
                    self.forget(id);
                    drop(self.relay.delete_later(id));
                }
                back
            }
            Finished::End(reason) => {
                c.acc = acc;
                drop(c);
                if let Some(report) = self.end(&key, reason).await {
                    self.spawn_report(report).await;
                }
                None
            }
        }
    }

    /// The relay closed a session on a timeout.
    pub async fn on_relay_closed(&self, closed: Closed) {
        let Some(key) = self.forget(closed.id) else {
            return;
        };
        let Some(call) = self.calls.get(&key).map(|c| c.clone()) else {
            return;
        };
        let mut c = call.lock().await;
        let RelayClosed::Over { delete, report } = c.relay_closed(closed.id, closed.stats.clone())
        else {
            return;
        };
        for id in delete {
            self.forget(id);
            drop(self.relay.delete_later(id));
        }
        debug!(relay_reason = ?closed.reason, "relay closed an idle session");
        if report {
            self.calls.remove(&key);
            self.report(&c, EndReason::Timeout, &closed.stats).await;
        }
    }

    /// Closes every call (server shutdown): each logs its stats line and writes its CDR; new
    /// offers are refused from now on. Returns when every CDR is in the store or the spool.
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::Relaxed);
        let keys: Vec<CallKey> = self.calls.iter().map(|e| e.key().clone()).collect();
        // Every call's sessions are queued for closing first, then the reports awaited: the
        // workers close them in one round.
        let mut reports = Vec::with_capacity(keys.len());
        for key in keys {
            reports.extend(self.end(&key, EndReason::Shutdown).await);
        }
        for report in reports {
            report.await;
        }
        // And those of calls ended just before.
        let mut spawned = std::mem::take(&mut *self.reports.lock().await);
        while spawned.join_next().await.is_some() {}
        self.cdr.close().await;
    }

    // ---- Limits ------------------------------------------------------------------------------

    /// Counts a refusal and writes the (rate-limited) security line.
    fn refuse(&self, why: Refused, src: SocketAddr, call_id: &str) -> Refused {
        self.refusals[why.idx()].fetch_add(1, Ordering::Relaxed);
        crate::security_event!(
            "media_limit",
            src,
            limit = why.limit(),
            sip.status = why.status(),
            sip.call_id = ?call_id
        );
        why
    }

    /// Reserves one session for `caller` before the relay is asked for ports.
    fn reserve(&self, caller: &str) -> Result<(), Refused> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(Refused::Busy);
        }
        let live = self.live.fetch_add(1, Ordering::Relaxed);
        if live >= self.limits.max_sessions {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Busy);
        }
        let mut n = self.per_caller.entry(caller.to_owned()).or_insert(0);
        if *n >= self.limits.max_sessions_per_caller {
            drop(n);
            self.live.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::CallerLimit);
        }
        *n += 1;
        Ok(())
    }

    /// Gives back a reservation (the allocation failed, or its session is gone).
    fn unreserve(&self, caller: &str) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        if let dashmap::Entry::Occupied(mut e) = self.per_caller.entry(caller.to_owned()) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// A relay session is gone (deleted or timed out): forgets it and frees its reservation.
    /// Its call, if it was still known.
    fn forget(&self, id: SessionId) -> Option<CallKey> {
        let (_, (key, caller)) = self.by_session.remove(&id)?;
        self.unreserve(&caller);
        Some(key)
    }

    // ---- Calls -------------------------------------------------------------------------------

    /// A relayed branch of a new INVITE: registers the call and, with an offer, the branch's
    /// session. `Err`: a limit refuses the offer (the call is forgotten unless another branch
    /// holds a session).
    async fn initial_offer(
        &self,
        ids: &CallIds<'_>,
        branch: &str,
        body: Option<&[u8]>,
        src: SocketAddr,
        caller: String,
    ) -> Result<Option<Vec<u8>>, Refused> {
        let key = (ids.call_id.to_owned(), ids.from_tag.to_owned());
        let call = self
            .calls
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Mutex::new(Call::new(ids, caller, self.clock.unix()))))
            .clone();
        let mut call = call.lock().await;
        call.branch_out(branch);
        let Some(body) = body else { return Ok(None) };
        let r = self
            .apply(&mut call, &key, branch, Side::Caller, body, false, src)
            .await;
        if r.is_err() && call.refused() {
            self.calls.remove(&key);
        }
        r
    }

    /// A 1xx/2xx on a relayed branch of the initial INVITE: the early dialog or the winner,
    /// and with SDP the answer (or, for a late offer, the offer) of the callee side.
    async fn initial_response(
        &self,
        ids: &CallIds<'_>,
        branch: &str,
        status: u16,
        body: Option<&[u8]>,
        src: SocketAddr,
    ) -> Option<Vec<u8>> {
        let key = (ids.call_id.to_owned(), ids.from_tag.to_owned());
        let call = self.calls.get(&key)?.clone();
        let mut call = call.lock().await;
        call.response(branch, status, ids.to_tag);
        // A response cannot be refused: what does not fit is forwarded unchanged.
        self.apply(&mut call, &key, branch, Side::Callee, body?, true, src)
            .await
            .ok()
            .flatten()
    }

    /// SDP in a request or response inside a relayed dialog. `sender_tag` is the tag of the
    /// party that sent this SDP, `src` where it came from. Returns the rewritten body; `Err`
    /// when a limit refuses a re-offer.
    async fn in_dialog(
        &self,
        call_id: &str,
        tags: (&str, Option<&str>),
        sender_tag: &str,
        body: &[u8],
        src: SocketAddr,
    ) -> Result<Option<Vec<u8>>, Refused> {
        let Some((key, call)) = self.find(call_id, tags) else {
            return Ok(None);
        };
        let mut call = call.lock().await;
        let Some((branch, side)) = call.route(tags, sender_tag) else {
            return Ok(None);
        };
        self.apply(&mut call, &key, &branch, side, body, true, src)
            .await
    }

    /// BYE: ends the dialog's media. `tags` are the BYE's (From, To): the caller's tag in
    /// From means the caller hung up.
    async fn bye(&self, call_id: &str, tags: (&str, Option<&str>)) {
        if let Some((key, call)) = self.find(call_id, tags) {
            call.lock().await.hangup = Some(if key.1 == tags.0 {
                Hangup::Caller
            } else {
                Hangup::Callee
            });
            if let Some(report) = self.end(&key, EndReason::Bye).await {
                // The BYE goes on now; its call's stats line and CDR follow when the relay
                // has closed the sessions.
                self.spawn_report(report).await;
            }
        }
    }

    fn find(
        &self,
        call_id: &str,
        tags: (&str, Option<&str>),
    ) -> Option<(CallKey, Arc<Mutex<Call>>)> {
        let by = |tag: &str| {
            let key = (call_id.to_owned(), tag.to_owned());
            self.calls.get(&key).map(|c| (key, c.clone()))
        };
        by(tags.0).or_else(|| tags.1.and_then(by))
    }

    /// Ends a call: forgets it and queues the deletes of its sessions
    /// ([`RelayClient::delete_later`]). Returns what logs its stats line and writes its CDR
    /// once the relay has closed them (`None`: the call was already ended).
    async fn end(
        &self,
        key: &CallKey,
        reason: EndReason,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let (_, call) = self.calls.remove(key)?;
        let mut c = call.lock().await;
        let ending = c.end();
        drop(c);
        let deletes: Vec<_> = ending
            .delete
            .iter()
            .map(|&id| {
                self.forget(id);
                (id, self.relay.delete_later(id))
            })
            .collect();
        let (cdr, clock) = (self.cdr.clone(), self.clock.clone());
        Some(async move {
            let mut winner: Option<SessionStats> = None;
            let mut others = SessionStats::default();
            for (id, deleted) in deletes {
                match deleted.await {
                    Ok(st) if Some(id) == ending.winner => winner = Some(st),
                    Ok(st) => others = report::add(others, &st),
                    Err(_) => {}
                }
            }
            // An unanswered call reports what its forks relayed (early media); one whose
            // media the relay already ended reports that.
            let (reason, stats) = match ending.timed_out {
                Some(t) => (EndReason::Timeout, t),
                None => (reason, winner.unwrap_or(others)),
            };
            // Removed from the calls above: nobody else takes this lock any more.
            let c = call.lock().await;
            write_report(&cdr, &*clock, &c, reason, &stats).await;
        })
    }

    /// Runs a call's report ([`Self::end`]) as a task of its own, which the shutdown awaits.
    async fn spawn_report(&self, report: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.reports.lock().await;
        // Reap the finished ones: the set holds only those still waiting.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(report);
    }

    /// The per-call stats line and the CDR row.
    async fn report(&self, c: &Call, reason: EndReason, s: &SessionStats) {
        write_report(&self.cdr, &*self.clock, c, reason, s).await;
    }

    /// Runs one SDP through a branch's session: asks the call what the relay must do (one
    /// round trip), executes it, and returns the body rewritten with the relay's address and
    /// the ports that face the receiver. `Ok(None)`: forward the SDP unchanged; `Err`: a
    /// limit refuses it.
    #[allow(clippy::too_many_arguments)] // private; every argument is one fact of the SDP
    async fn apply(
        &self,
        call: &mut Call,
        key: &CallKey,
        branch: &str,
        from: Side,
        body: &[u8],
        answered: bool,
        src: SocketAddr,
    ) -> Result<Option<Vec<u8>>, Refused> {
        let info = match sdp::inspect(body) {
            Ok(i) => i,
            Err(error) => {
                debug!(%error, "SDP not relayed: cannot parse it");
                return Ok(None);
            }
        };
        let op = match call.sdp(
            branch,
            from,
            &info,
            src.ip(),
            answered,
            self.limits.max_streams,
        ) {
            SdpStep::Unchanged => return Ok(None),
            SdpStep::TooManyStreams => {
                return Err(self.refuse(Refused::TooManyStreams, src, &call.call_id));
            }
            SdpStep::Relay(op) => op,
        };
        match &op {
            RelayOp::Open {
                branch,
                replace,
                lines,
                m_lines,
                ..
            } => {
                if let Some(old) = replace {
                    self.forget(*old);
                }
                if let Err(why) = self.reserve(&call.caller) {
                    if let Some(old) = replace {
                        let _ = self.relay.delete(*old).await;
                    }
                    return Err(self.refuse(why, src, &call.call_id));
                }
                match self.relay.execute(&op).await {
                    Ok(Done::Opened(alloc)) => {
                        self.by_session
                            .insert(alloc.id, (key.clone(), call.caller.clone()));
                        call.opened(branch, alloc, lines.clone(), *m_lines);
                    }
                    Ok(Done::Updated | Done::Deleted) => {}
                    Err(RelayError::PortsExhausted) => {
                        self.unreserve(&call.caller);
                        return Err(self.refuse(Refused::Busy, src, &call.call_id));
                    }
                    Err(error) => {
                        // A socket error (EMFILE, ENOBUFS) or a stopping relay: the route
                        // wants relayed media, so the offer is not forwarded as it came
                        // (a call without its relay is one-way or no audio behind NAT).
                        self.unreserve(&call.caller);
                        self.relay_errors.fetch_add(1, Ordering::Relaxed);
                        static LOG: crate::log::LogLimit = crate::log::LogLimit::new();
                        if let Some(suppressed) = LOG.allow() {
                            warn!(%error, suppressed, call_id = %call.call_id, "media relay: no session for the offer; answered 503");
                        }
                        return Err(Refused::Busy);
                    }
                }
            }
            RelayOp::Update { .. } => {
                // Queued for the session's worker, not awaited: the ports of the rewrite are
                // known already (a session that closed meanwhile is on the event channel).
                if let Err(error) = self.relay.execute(&op).await {
                    warn!(%error, "media relay update");
                    return Ok(None);
                }
            }
            RelayOp::Delete(id) => {
                self.forget(*id);
                let _ = self.relay.execute(&op).await;
                return Ok(None);
            }
        }
        let Some(ports) = call.ports(branch, &info, from) else {
            return Ok(None);
        };
        match sdp::rewrite(body, self.address, &ports) {
            Ok(b) => Ok(Some(b)),
            Err(error) if error.is_internal() => {
                warn!(%error, call_id = %call.call_id, "SDP rewrite: relay ports do not fit");
                Ok(None)
            }
            Err(error) => {
                debug!(%error, "SDP not rewritten");
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdp_bodies_by_content_type() {
        assert!(is_sdp(Some("application/sdp"), b"v=0"));
        assert!(is_sdp(Some("Application/SDP; charset=utf-8"), b"v=0"));
        assert!(is_sdp(None, b"v=0"), "no Content-Type: look at it");
        assert!(!is_sdp(Some("application/sdp"), b""));
        assert!(!is_sdp(Some("multipart/mixed;boundary=x"), b"--x"));
        assert!(!is_sdp(Some("application/isup"), b"\x01"));
    }
}
