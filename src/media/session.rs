//! Media sessions per dialog (the seed's `use_media_proxy` / `end_media_session`): which calls
//! are relayed, the offer/answer rewrite of every SDP the proxy forwards for them, and the
//! end of each session — with exactly one stats line and one `cdr` row per call.
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

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use sipedge_relay::{
    Closed, Direction as RelayDirection, Endpoint, RelayError, RelayHandle, SessionId,
    SessionStats, Side, StreamPorts,
};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::media::cdr::CdrWriter;
use crate::media::sdp::{self, Direction, SdpInfo};
use crate::sip::{Framing, HeaderName, Message, Rewrite};
use crate::store::{Cdr, Store};

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
}

/// Why a call's media ended (the `reason` field of the stats line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Bye,
    Cancel,
    Failed,
    Timeout,
    Shutdown,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bye => "bye",
            Self::Cancel => "cancel",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Shutdown => "shutdown",
        }
    }
}

/// One relayed call.
#[derive(Debug)]
struct Call {
    call_id: String,
    caller_tag: String,
    callee_tag: Option<String>,
    from_uri: String,
    to_uri: String,
    start_unix: u64,
    answer_unix: Option<u64>,
    /// Our branch id → its relay session (created at the first SDP on that branch).
    branches: Vec<(String, Option<Allocated>)>,
    /// The branch whose 2xx was forwarded.
    winner: Option<String>,
    /// Early dialogs: the callee's To-tag → its branch (PRACK/UPDATE with SDP before the
    /// 2xx go through that branch's session, RFC 3262/3311).
    early: Vec<(String, String)>,
    status: u16,
    ended: bool,
    /// The relay ended the media before the INVITE got its final response (an offer never
    /// answered): the report waits for that response, so the CDR has the call's status.
    timed_out: Option<SessionStats>,
    /// Who the sessions are counted against: `user:NAME` or `ip:ADDR`.
    caller: String,
    /// Per side ([`side_idx`]: caller, callee), where its last SIP message with SDP
    /// came from: besides the SDP address, the only source its media may latch from.
    sources: [Option<IpAddr>; 2],
}

/// A branch's relay session.
#[derive(Debug, Clone)]
struct Allocated {
    id: SessionId,
    /// One entry per relayed stream.
    ports: Vec<StreamPorts>,
    /// The m= line (index in the SDP) of each relayed stream: port-0 lines have none.
    lines: Vec<usize>,
    /// m= lines of the SDP it was made for.
    m_lines: usize,
}

impl Allocated {
    /// Whether this SDP fits the session: same m= lines, and every line with a port is one
    /// that has relay ports (RFC 3264 §8.2: a re-offer may enable a disabled stream).
    fn fits(&self, info: &SdpInfo) -> bool {
        info.streams.len() == self.m_lines
            && info
                .streams
                .iter()
                .enumerate()
                .all(|(i, s)| s.port == 0 || self.lines.contains(&i))
    }
}

/// Index of a side in [`Call::sources`].
fn side_idx(side: Side) -> usize {
    match side {
        Side::Caller => 0,
        Side::Callee => 1,
    }
}

/// The m= lines of an SDP that take relay ports: those with a non-zero port.
fn enabled_lines(info: &SdpInfo) -> Vec<usize> {
    info.streams
        .iter()
        .enumerate()
        .filter(|(_, s)| s.port != 0)
        .map(|(i, _)| i)
        .collect()
}

impl Call {
    fn session(&self, branch: &str) -> Option<&Allocated> {
        self.branches
            .iter()
            .find(|(b, _)| b == branch)
            .and_then(|(_, s)| s.as_ref())
    }

    fn winner_session(&self) -> Option<&Allocated> {
        self.winner.as_deref().and_then(|w| self.session(w))
    }
}

type CallKey = (String, String);

/// The media side of the proxy: calls, the relay handle, the store for CDRs.
pub struct Media {
    relay: RelayHandle,
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
    /// Shutting down: no new sessions.
    closing: AtomicBool,
    cdr: CdrWriter,
    clock: Arc<dyn Clock>,
}

/// The endpoint a side announced for each m= line (`None` for a disabled stream).
fn endpoints(info: &SdpInfo) -> Vec<Option<Endpoint>> {
    info.streams
        .iter()
        .map(|s| {
            if s.port == 0 {
                return None;
            }
            // No usable c= (a host name, or none): latching will find the source.
            let ip = s.addr.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let rtcp = match s.rtcp {
                Some((port, addr)) => SocketAddr::new(addr.unwrap_or(ip), port),
                None => SocketAddr::new(ip, s.port.wrapping_add(1)),
            };
            Some(Endpoint {
                rtp: SocketAddr::new(ip, s.port),
                rtcp,
                rtcp_mux: s.rtcp_mux,
                direction: match s.direction {
                    Direction::SendRecv => RelayDirection::SendRecv,
                    Direction::SendOnly => RelayDirection::SendOnly,
                    Direction::RecvOnly => RelayDirection::RecvOnly,
                    Direction::Inactive => RelayDirection::Inactive,
                },
                clock_rate: s.clock_rate,
            })
        })
        .collect()
}

/// The relay ports to advertise to the party opposite `from`, per m= line; `None` keeps the
/// line's port (0 for a disabled stream, RFC 3264 §8.2).
fn ports_for(info: &SdpInfo, alloc: &Allocated, from: Side) -> Vec<Option<u16>> {
    info.streams
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let k = alloc.lines.iter().position(|&l| l == i)?;
            let p = alloc.ports.get(k)?;
            (s.port != 0).then_some(match from {
                // The caller's SDP goes to the callee: it sends to the callee-facing leg.
                Side::Caller => p.callee.rtp,
                Side::Callee => p.caller.rtp,
            })
        })
        .collect()
}

/// The endpoints of the relayed streams only, in relay stream order.
fn relayed_endpoints(info: &SdpInfo, alloc: &Allocated) -> Vec<Option<Endpoint>> {
    let all = endpoints(info);
    alloc
        .lines
        .iter()
        .map(|&i| all.get(i).copied().flatten())
        .collect()
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

impl Media {
    /// The media side over a started relay; failed CDRs go to `cdr_spool`.
    pub fn new(
        relay: RelayHandle,
        address: IpAddr,
        store: Store,
        clock: Arc<dyn Clock>,
        limits: Limits,
        cdr_spool: PathBuf,
    ) -> Self {
        Self {
            relay,
            address,
            calls: DashMap::new(),
            by_session: DashMap::new(),
            live: AtomicUsize::new(0),
            per_caller: DashMap::new(),
            limits,
            refusals: Default::default(),
            closing: AtomicBool::new(false),
            cdr: CdrWriter::new(store, cdr_spool),
            clock,
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
        }
    }

    /// The CDR writer (its spool path).
    pub fn cdr_writer(&self) -> &CdrWriter {
        &self.cdr
    }

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

    /// Relayed calls in progress.
    pub fn calls(&self) -> usize {
        self.calls.len()
    }

    /// The relay (for its counts).
    pub fn relay(&self) -> &RelayHandle {
        &self.relay
    }

    /// A new INVITE is relayed: registers the call and, when it carries an offer, allocates
    /// the branch's session and returns the rewritten body for that branch. `src` is where
    /// the INVITE came from; `caller` the key its sessions count against. `Err`: a limit
    /// refuses the offer (the call is forgotten unless another branch holds a session).
    pub async fn initial_offer(
        &self,
        ids: &CallIds<'_>,
        branch: &str,
        body: Option<&[u8]>,
        src: SocketAddr,
        caller: &str,
    ) -> Result<Option<Vec<u8>>, Refused> {
        let key = (ids.call_id.to_owned(), ids.from_tag.to_owned());
        let call = self
            .calls
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Call {
                    call_id: ids.call_id.to_owned(),
                    caller_tag: ids.from_tag.to_owned(),
                    callee_tag: None,
                    from_uri: ids.from_uri.to_owned(),
                    to_uri: ids.to_uri.to_owned(),
                    start_unix: self.clock.unix(),
                    answer_unix: None,
                    branches: Vec::new(),
                    winner: None,
                    early: Vec::new(),
                    status: 0,
                    ended: false,
                    timed_out: None,
                    caller: caller.to_owned(),
                    sources: [None, None],
                }))
            })
            .clone();
        let mut call = call.lock().await;
        if !call.branches.iter().any(|(b, _)| b == branch) {
            call.branches.push((branch.to_owned(), None));
        }
        let Some(body) = body else { return Ok(None) };
        let r = self
            .apply(&mut call, &key, branch, Side::Caller, body, false, src)
            .await;
        if r.is_err() && call.branches.iter().all(|(_, s)| s.is_none()) {
            // Nothing of it is relayed: no call to end, no CDR for a refused flood.
            call.ended = true;
            self.calls.remove(&key);
        }
        r
    }

    /// A response with SDP on a branch of the initial INVITE (18x/2xx): the answer (or, for a
    /// late offer, the offer) of the callee side.
    pub async fn initial_response(
        &self,
        ids: &CallIds<'_>,
        branch: &str,
        status: u16,
        body: &[u8],
        src: SocketAddr,
    ) -> Option<Vec<u8>> {
        let key = (ids.call_id.to_owned(), ids.from_tag.to_owned());
        let call = self.calls.get(&key)?.clone();
        let mut call = call.lock().await;
        if call.ended {
            return None;
        }
        if (200..300).contains(&status) {
            call.winner = Some(branch.to_owned());
            call.callee_tag = ids.to_tag.map(str::to_owned);
        }
        if let Some(tag) = ids.to_tag
            && !call.early.iter().any(|(t, _)| t == tag)
        {
            call.early.push((tag.to_owned(), branch.to_owned()));
        }
        // A response cannot be refused: what does not fit is forwarded unchanged.
        self.apply(&mut call, &key, branch, Side::Callee, body, true, src)
            .await
            .ok()
            .flatten()
    }

    /// The initial INVITE got its final response upstream.
    pub async fn initial_final(&self, call_id: &str, from_tag: &str, status: u16, cancelled: bool) {
        let key = (call_id.to_owned(), from_tag.to_owned());
        let Some(call) = self.calls.get(&key).map(|c| c.clone()) else {
            return;
        };
        let mut c = call.lock().await;
        c.status = status;
        if let Some(stats) = c.timed_out.take() {
            drop(c);
            self.calls.remove(&key);
            let c = call.lock().await;
            self.report(&c, EndReason::Timeout, &stats).await;
            return;
        }
        if (200..300).contains(&status) {
            c.answer_unix = Some(self.clock.unix());
            // The losing forks give their ports back at once.
            let winner = c.winner.clone();
            let losers: Vec<SessionId> = c
                .branches
                .iter()
                .filter(|(b, _)| Some(b) != winner.as_ref())
                .filter_map(|(_, s)| s.as_ref().map(|s| s.id))
                .collect();
            c.branches.retain(|(b, _)| Some(b) == winner.as_ref());
            drop(c);
            for id in losers {
                self.forget(id);
                let _ = self.relay.delete(id).await;
            }
            // A 2xx without SDP anywhere: nothing to relay.
            let c = call.lock().await;
            if c.winner_session().is_none() && c.branches.iter().all(|(_, s)| s.is_none()) {
                drop(c);
                self.calls.remove(&key);
            }
            return;
        }
        drop(c);
        let reason = if cancelled || status == 487 {
            EndReason::Cancel
        } else {
            EndReason::Failed
        };
        self.end(&key, reason).await;
    }

    /// SDP in a request or response inside a relayed dialog. `sender_tag` is the tag of the
    /// party that sent this SDP, `src` where it came from. Returns the rewritten body; `Err`
    /// when a limit refuses a re-offer.
    pub async fn in_dialog(
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
        if call.ended {
            return Ok(None);
        }
        let side = if sender_tag == call.caller_tag {
            Side::Caller
        } else {
            Side::Callee
        };
        // Confirmed: the winner. Early (PRACK/UPDATE before the 2xx): the branch of the
        // callee's To-tag.
        let branch = match &call.winner {
            Some(w) => w.clone(),
            None => {
                let early = [Some(tags.0), tags.1]
                    .into_iter()
                    .flatten()
                    .find(|t| *t != call.caller_tag)
                    .and_then(|callee_tag| call.early.iter().find(|(t, _)| t == callee_tag))
                    .map(|(_, b)| b.clone());
                match early {
                    Some(b) => b,
                    None => return Ok(None),
                }
            }
        };
        self.apply(&mut call, &key, &branch, side, body, true, src)
            .await
    }

    /// True when the dialog of these tags is relayed.
    pub fn is_relayed(&self, call_id: &str, tags: (&str, Option<&str>)) -> bool {
        self.find(call_id, tags).is_some()
    }

    /// BYE: ends the dialog's media.
    pub async fn bye(&self, call_id: &str, tags: (&str, Option<&str>)) {
        if let Some((key, _)) = self.find(call_id, tags) {
            self.end(&key, EndReason::Bye).await;
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
        let is_winner = c.winner_session().is_some_and(|s| s.id == closed.id);
        for (_, s) in &mut c.branches {
            if s.as_ref().is_some_and(|s| s.id == closed.id) {
                *s = None;
            }
        }
        let last = c.branches.iter().all(|(_, s)| s.is_none());
        if is_winner || last {
            c.ended = true;
            // The other forks of a call whose winner timed out.
            let others: Vec<SessionId> = c
                .branches
                .iter()
                .filter_map(|(_, s)| s.as_ref().map(|s| s.id))
                .collect();
            for id in others {
                self.forget(id);
                let _ = self.relay.delete(id).await;
            }
            debug!(relay_reason = ?closed.reason, "relay closed an idle session");
            if c.status == 0 {
                // The INVITE is still pending: its final response reports the call.
                c.timed_out = Some(closed.stats);
                return;
            }
            self.calls.remove(&key);
            self.report(&c, EndReason::Timeout, &closed.stats).await;
        }
    }

    /// Closes every call (server shutdown): each logs its stats line and writes its CDR; new
    /// offers are refused from now on. Returns when every CDR is in the store or the spool.
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::Relaxed);
        let keys: Vec<CallKey> = self.calls.iter().map(|e| e.key().clone()).collect();
        for key in keys {
            self.end(&key, EndReason::Shutdown).await;
        }
        self.cdr.close().await;
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

    /// Ends a call: deletes its sessions, logs the stats line, writes the CDR.
    async fn end(&self, key: &CallKey, reason: EndReason) {
        let Some((_, call)) = self.calls.remove(key) else {
            return;
        };
        let mut c = call.lock().await;
        c.ended = true;
        let winner = c.winner_session().map(|s| s.id);
        let mut stats: Option<SessionStats> = None;
        let mut others = SessionStats::default();
        for (_, s) in &c.branches {
            let Some(s) = s else { continue };
            self.forget(s.id);
            match self.relay.delete(s.id).await {
                Ok(st) if Some(s.id) == winner => stats = Some(st),
                Ok(st) => others = add(others, &st),
                Err(error) => debug!(%error, "deleting a relay session"),
            }
        }
        // An unanswered call reports what its forks relayed (early media); one whose media the
        // relay already ended reports that.
        let (reason, stats) = match c.timed_out.take() {
            Some(t) => (EndReason::Timeout, t),
            None => (reason, stats.unwrap_or(others)),
        };
        self.report(&c, reason, &stats).await;
    }

    /// The per-call stats line and the CDR row (DESIGN §4, STYLE §2.7).
    async fn report(&self, c: &Call, reason: EndReason, s: &SessionStats) {
        let duration_ms = u64::try_from(s.duration.as_millis()).unwrap_or(u64::MAX);
        // Jitter to the microsecond: more digits are noise.
        let ms = |j: f64| (j * 1000.0).round() / 1000.0;
        info!(
            call_id = %c.call_id,
            reason = %reason.as_str(),
            duration_ms,
            caller_pkts = s.caller.pkts,
            caller_bytes = s.caller.bytes,
            caller_lost = s.caller.lost,
            caller_jitter_ms = ms(s.caller.jitter_ms),
            callee_pkts = s.callee.pkts,
            callee_bytes = s.callee.bytes,
            callee_lost = s.callee.lost,
            callee_jitter_ms = ms(s.callee.jitter_ms),
            "media session closed"
        );
        let cdr = Cdr {
            call_id: c.call_id.clone(),
            from_uri: c.from_uri.clone(),
            to_uri: c.to_uri.clone(),
            start: c.start_unix,
            answer: c.answer_unix,
            end: self.clock.unix(),
            status: c.status,
            reason: reason.as_str().to_owned(),
            caller: (
                s.caller.pkts,
                s.caller.bytes,
                s.caller.lost,
                ms(s.caller.jitter_ms),
            ),
            callee: (
                s.callee.pkts,
                s.callee.bytes,
                s.callee.lost,
                ms(s.callee.jitter_ms),
            ),
        };
        self.cdr.write(cdr).await;
    }

    /// Runs one SDP through a branch's session: allocates it on the first SDP (ports only for
    /// the m= lines with a port), tells the relay the sender's endpoints and SIP source,
    /// returns the body rewritten with the relay's address and the ports that face the
    /// receiver. `Ok(None)`: forward the SDP unchanged; `Err`: a limit refuses it.
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
        call.sources[side_idx(from)] = Some(src.ip());
        let lines = enabled_lines(&info);
        if lines.len() > self.limits.max_streams {
            return Err(self.refuse(Refused::TooManyStreams, src, &call.call_id));
        }
        let mut alloc = call.session(branch).cloned();
        if alloc.as_ref().is_some_and(|a| !a.fits(&info)) {
            // A re-offer that adds m= lines, enables a disabled one or renumbers them (RFC
            // 3264 §8): a fresh session for the new lines, the old one's ports back.
            if let Some(old) = alloc.take() {
                self.forget(old.id);
                let _ = self.relay.delete(old.id).await;
                if let Some((_, s)) = call.branches.iter_mut().find(|(b, _)| b == branch) {
                    *s = None;
                }
            }
        }
        let alloc = match alloc {
            Some(a) => a,
            // Every stream disabled: nothing to relay.
            None if lines.is_empty() => return Ok(None),
            None => {
                if let Err(why) = self.reserve(&call.caller) {
                    return Err(self.refuse(why, src, &call.call_id));
                }
                match self.relay.allocate(call.call_id.clone(), lines.len()).await {
                    Ok(a) => {
                        let a = Allocated {
                            id: a.id,
                            ports: a.streams,
                            lines,
                            m_lines: info.streams.len(),
                        };
                        self.by_session
                            .insert(a.id, (key.clone(), call.caller.clone()));
                        match call.branches.iter_mut().find(|(b, _)| b == branch) {
                            Some((_, s)) => *s = Some(a.clone()),
                            None => call.branches.push((branch.to_owned(), Some(a.clone()))),
                        }
                        a
                    }
                    Err(RelayError::PortsExhausted) => {
                        self.unreserve(&call.caller);
                        return Err(self.refuse(Refused::Busy, src, &call.call_id));
                    }
                    Err(error) => {
                        self.unreserve(&call.caller);
                        warn!(%error, call_id = %call.call_id, "media relay: no session; SDP forwarded unchanged");
                        return Ok(None);
                    }
                }
            }
        };
        let sources = call.sources[side_idx(from)].into_iter().collect();
        match self
            .relay
            .update(
                alloc.id,
                from,
                relayed_endpoints(&info, &alloc),
                sources,
                answered,
            )
            .await
        {
            Ok(()) => {}
            Err(RelayError::NoSuchSession) => return Ok(None),
            Err(error) => {
                warn!(%error, "media relay update");
                return Ok(None);
            }
        }
        match sdp::rewrite(body, self.address, &ports_for(&info, &alloc, from)) {
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

/// Identifiers of a call taken from a message.
#[derive(Debug, Clone, Copy)]
pub struct CallIds<'a> {
    pub call_id: &'a str,
    pub from_tag: &'a str,
    pub to_tag: Option<&'a str>,
    pub from_uri: &'a str,
    pub to_uri: &'a str,
}

fn add(a: SessionStats, b: &SessionStats) -> SessionStats {
    let leg = |x: sipedge_relay::LegStats, y: &sipedge_relay::LegStats| sipedge_relay::LegStats {
        pkts: x.pkts + y.pkts,
        bytes: x.bytes + y.bytes,
        lost: x.lost + y.lost,
        jitter_ms: x.jitter_ms.max(y.jitter_ms),
        rtcp_pkts: x.rtcp_pkts + y.rtcp_pkts,
        rtcp_bytes: x.rtcp_bytes + y.rtcp_bytes,
        dropped: x.dropped + y.dropped,
        strangers: x.strangers + y.strangers,
    };
    SessionStats {
        duration: a.duration.max(b.duration),
        caller: leg(a.caller, &b.caller),
        callee: leg(a.callee, &b.callee),
    }
}

// ---- Entry points for the proxy: messages in, rewritten bytes out ---------------------------

/// The body of `msg` when it is SDP.
fn sdp_body(msg: &Message) -> Option<&[u8]> {
    let body = msg.body();
    is_sdp(msg.header_str(HeaderName::ContentType), body).then_some(body)
}

/// `bytes` (a message) with its body replaced.
fn with_body(bytes: Vec<u8>, body: Vec<u8>) -> Vec<u8> {
    match Message::parse(&bytes, Framing::Datagram) {
        Ok(m) => {
            let mut rw = Rewrite::new(&m);
            rw.replace_body(body);
            rw.finish()
        }
        Err(_) => bytes,
    }
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

impl Media {
    /// A request about to leave on one branch (`fwd` = its bytes). `initial` is `Some(relay?)`
    /// for a branch of an initial INVITE, `None` for a request inside a dialog (relayed when
    /// its dialog is). BYE ends the dialog's media here, before it is relayed (DESIGN §4).
    /// `src` is where the request came from, `auth_user` who it authenticated as (the
    /// caller its sessions count against; else its source IP).
    ///
    /// `Err`: a media limit refuses the SDP; the branch is answered with
    /// [`Refused::status`] instead of being forwarded (an ACK is never refused: it is
    /// forwarded unchanged).
    pub async fn on_request(
        &self,
        msg: &Message,
        fwd: Vec<u8>,
        branch: &str,
        initial: Option<bool>,
        src: SocketAddr,
        auth_user: Option<&str>,
    ) -> Result<Vec<u8>, Refused> {
        let Some(ids) = ids(msg) else { return Ok(fwd) };
        let body = sdp_body(msg);
        let new = match initial {
            Some(false) => Ok(None),
            Some(true) => {
                let caller = match auth_user {
                    Some(u) => format!("user:{u}"),
                    None => format!("ip:{}", src.ip()),
                };
                self.initial_offer(&ids, branch, body, src, &caller).await
            }
            None if msg.method() == Some("BYE") => {
                self.bye(ids.call_id, (ids.from_tag, ids.to_tag)).await;
                Ok(None)
            }
            None => match body {
                Some(b) => {
                    self.in_dialog(
                        ids.call_id,
                        (ids.from_tag, ids.to_tag),
                        ids.from_tag,
                        b,
                        src,
                    )
                    .await
                }
                None => Ok(None),
            },
        };
        match new {
            Ok(Some(body)) => Ok(with_body(fwd, body)),
            Ok(None) => Ok(fwd),
            // An ACK has no answer; what does not fit goes as it is.
            Err(_) if msg.method() == Some("ACK") => Ok(fwd),
            Err(why) => Err(why),
        }
    }

    /// A response on its way upstream (our Via still on top). `initial` as in `on_request`;
    /// `src` is the address of the party that answered (where its SIP comes from).
    pub async fn on_response(
        &self,
        req: &Message,
        resp: Message,
        branch: &str,
        initial: Option<bool>,
        src: SocketAddr,
    ) -> Message {
        let status = resp.status().unwrap_or(0);
        if !(101..300).contains(&status) || initial == Some(false) {
            return resp;
        }
        let Some(body) = sdp_body(&resp) else {
            // Without SDP a response still opens an early dialog, and a 2xx picks the winner.
            if initial == Some(true)
                && let Some(ids) = ids(&resp)
                && let Some(call) = self
                    .calls
                    .get(&(ids.call_id.to_owned(), ids.from_tag.to_owned()))
                    .map(|c| c.clone())
            {
                let mut c = call.lock().await;
                if (200..300).contains(&status) {
                    c.winner = Some(branch.to_owned());
                    c.callee_tag = ids.to_tag.map(str::to_owned);
                }
                if let Some(tag) = ids.to_tag
                    && !c.early.iter().any(|(t, _)| t == tag)
                {
                    c.early.push((tag.to_owned(), branch.to_owned()));
                }
            }
            return resp;
        };
        let new = match (initial, ids(&resp)) {
            (Some(true), Some(ids)) => self.initial_response(&ids, branch, status, body, src).await,
            // The responder is the party the request was sent to: its tag is the request's To-tag.
            (None, Some(ids)) => match ids.to_tag.or_else(|| req.to().ok().and_then(|t| t.tag())) {
                Some(sender) => self
                    .in_dialog(ids.call_id, (ids.from_tag, ids.to_tag), sender, body, src)
                    .await
                    .ok()
                    .flatten(),
                None => None,
            },
            _ => None,
        };
        match new {
            Some(b) => {
                let bytes = with_body(resp.as_bytes().to_vec(), b);
                Message::parse(&bytes, Framing::Datagram).unwrap_or(resp)
            }
            None => resp,
        }
    }

    /// The final response of an initial INVITE went upstream.
    pub async fn on_final(&self, req: &Message, status: u16, cancelled: bool) {
        if let Some(ids) = ids(req) {
            self.initial_final(ids.call_id, ids.from_tag, status, cancelled)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sipedge_relay::PortPair;

    const OFFER: &[u8] = b"v=0\r\no=- 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n\
m=audio 4000 RTP/AVP 8\r\na=sendonly\r\n\
m=video 0 RTP/AVP 96\r\n\
m=audio 4002 RTP/AVP 0\r\na=rtcp:5001 IN IP4 10.0.0.3\r\na=rtcp-mux\r\n";

    fn pair(rtp: u16) -> PortPair {
        PortPair { rtp, rtcp: rtp + 1 }
    }

    #[test]
    fn endpoints_from_sdp() {
        let info = sdp::inspect(OFFER).unwrap();
        let eps = endpoints(&info);
        assert_eq!(eps.len(), 3);
        let a = eps[0].as_ref().unwrap();
        assert_eq!(a.rtp, "10.0.0.2:4000".parse().unwrap());
        assert_eq!(
            a.rtcp,
            "10.0.0.2:4001".parse().unwrap(),
            "RTCP on RTP+1 by default"
        );
        assert_eq!(a.direction, RelayDirection::SendOnly);
        assert!(eps[1].is_none(), "port 0: disabled");
        let c = eps[2].as_ref().unwrap();
        assert_eq!(
            c.rtcp,
            "10.0.0.3:5001".parse().unwrap(),
            "a=rtcp with an address"
        );
        assert!(c.rtcp_mux);
    }

    #[test]
    fn ports_face_the_receiver() {
        let info = sdp::inspect(OFFER).unwrap();
        // The disabled video line (m= line 1) takes no ports: two relayed streams.
        let lines = enabled_lines(&info);
        assert_eq!(lines, vec![0, 2]);
        let alloc = Allocated {
            id: SessionId(1),
            ports: (0..2)
                .map(|i| StreamPorts {
                    caller: pair(30000 + 4 * i),
                    callee: pair(30002 + 4 * i),
                })
                .collect(),
            lines,
            m_lines: 3,
        };
        assert!(alloc.fits(&info));
        // The caller's offer goes to the callee: the callee-facing ports; the disabled stream
        // keeps port 0.
        assert_eq!(
            ports_for(&info, &alloc, Side::Caller),
            vec![Some(30002), None, Some(30006)]
        );
        assert_eq!(
            ports_for(&info, &alloc, Side::Callee),
            vec![Some(30000), None, Some(30004)]
        );
        // The relay hears about the relayed streams only, in order.
        let eps = relayed_endpoints(&info, &alloc);
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[1].unwrap().rtp, "10.0.0.2:4002".parse().unwrap());
        // A re-offer enabling the video line needs a new session; one disabling audio fits.
        let video_on = String::from_utf8(OFFER.to_vec())
            .unwrap()
            .replace("m=video 0", "m=video 5000");
        assert!(!alloc.fits(&sdp::inspect(video_on.as_bytes()).unwrap()));
        let audio_off = String::from_utf8(OFFER.to_vec())
            .unwrap()
            .replace("m=audio 4000", "m=audio 0");
        assert!(alloc.fits(&sdp::inspect(audio_off.as_bytes()).unwrap()));
    }

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
