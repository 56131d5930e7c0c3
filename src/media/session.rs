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

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use dashmap::DashMap;
use sipedge_relay::{
    Closed, Direction as RelayDirection, Endpoint, RelayError, RelayHandle, SessionId,
    SessionStats, Side, StreamPorts,
};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::media::sdp::{self, Direction, SdpInfo};
use crate::sip::{Framing, HeaderName, Message, Rewrite};
use crate::store::{Cdr, Store};

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
}

#[derive(Debug, Clone)]
struct Allocated {
    id: SessionId,
    ports: Vec<StreamPorts>,
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
    /// Relay session → its call, for timeouts reported by the relay.
    by_session: DashMap<SessionId, CallKey>,
    store: Store,
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

/// The relay ports to advertise to the party opposite `from`, per m= line.
fn ports_for(info: &SdpInfo, alloc: &Allocated, from: Side) -> Vec<Option<u16>> {
    info.streams
        .iter()
        .zip(&alloc.ports)
        .map(|(s, p)| {
            (s.port != 0).then_some(match from {
                // The caller's SDP goes to the callee: it sends to the callee-facing leg.
                Side::Caller => p.callee.rtp,
                Side::Callee => p.caller.rtp,
            })
        })
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
    pub fn new(relay: RelayHandle, address: IpAddr, store: Store, clock: Arc<dyn Clock>) -> Self {
        Self {
            relay,
            address,
            calls: DashMap::new(),
            by_session: DashMap::new(),
            store,
            clock,
        }
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
    /// the branch's session and returns the rewritten body for that branch.
    pub async fn initial_offer(
        &self,
        ids: &CallIds<'_>,
        branch: &str,
        body: Option<&[u8]>,
    ) -> Option<Vec<u8>> {
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
                }))
            })
            .clone();
        let mut call = call.lock().await;
        if !call.branches.iter().any(|(b, _)| b == branch) {
            call.branches.push((branch.to_owned(), None));
        }
        let body = body?;
        self.apply(&mut call, &key, branch, Side::Caller, body, false)
            .await
    }

    /// A response with SDP on a branch of the initial INVITE (18x/2xx): the answer (or, for a
    /// late offer, the offer) of the callee side.
    pub async fn initial_response(
        &self,
        ids: &CallIds<'_>,
        branch: &str,
        status: u16,
        body: &[u8],
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
        self.apply(&mut call, &key, branch, Side::Callee, body, true)
            .await
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
                self.by_session.remove(&id);
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
    /// party that sent this SDP. Returns the rewritten body.
    pub async fn in_dialog(
        &self,
        call_id: &str,
        tags: (&str, Option<&str>),
        sender_tag: &str,
        body: &[u8],
    ) -> Option<Vec<u8>> {
        let (key, call) = self.find(call_id, tags)?;
        let mut call = call.lock().await;
        if call.ended {
            return None;
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
                let callee_tag = [Some(tags.0), tags.1]
                    .into_iter()
                    .flatten()
                    .find(|t| *t != call.caller_tag)?;
                call.early
                    .iter()
                    .find(|(t, _)| t == callee_tag)
                    .map(|(_, b)| b.clone())?
            }
        };
        self.apply(&mut call, &key, &branch, side, body, true).await
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
        let Some((_, key)) = self.by_session.remove(&closed.id) else {
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
                self.by_session.remove(&id);
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

    /// Closes every call (server shutdown).
    pub async fn shutdown(&self) {
        let keys: Vec<CallKey> = self.calls.iter().map(|e| e.key().clone()).collect();
        for key in keys {
            self.end(&key, EndReason::Shutdown).await;
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
            self.by_session.remove(&s.id);
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
            reason: reason.as_str(),
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
        if let Err(error) = self.store.insert_cdr(&cdr).await {
            warn!(%error, call_id = %c.call_id, "writing the CDR");
        }
    }

    /// Runs one SDP through a branch's session: allocates it on the first SDP, tells the relay
    /// the sender's endpoints, returns the body rewritten with the relay's address and the
    /// ports that face the receiver.
    async fn apply(
        &self,
        call: &mut Call,
        key: &CallKey,
        branch: &str,
        from: Side,
        body: &[u8],
        answered: bool,
    ) -> Option<Vec<u8>> {
        let info = match sdp::inspect(body) {
            Ok(i) => i,
            Err(error) => {
                debug!(%error, "SDP not relayed: cannot parse it");
                return None;
            }
        };
        let mut alloc = call.session(branch).cloned();
        if alloc
            .as_ref()
            .is_some_and(|a| a.ports.len() != info.streams.len())
        {
            // A re-offer that adds or removes m= lines (RFC 3264 §8 allows adding only; some
            // phones renumber): a fresh session with the new count, the old one's ports back.
            if let Some(old) = alloc.take() {
                self.by_session.remove(&old.id);
                let _ = self.relay.delete(old.id).await;
            }
        }
        let alloc = match alloc {
            Some(a) => a,
            None => match self
                .relay
                .allocate(call.call_id.clone(), info.streams.len())
                .await
            {
                Ok(a) => {
                    let a = Allocated {
                        id: a.id,
                        ports: a.streams,
                    };
                    self.by_session.insert(a.id, key.clone());
                    match call.branches.iter_mut().find(|(b, _)| b == branch) {
                        Some((_, s)) => *s = Some(a.clone()),
                        None => call.branches.push((branch.to_owned(), Some(a.clone()))),
                    }
                    a
                }
                Err(error) => {
                    warn!(%error, call_id = %call.call_id, "media relay: no session; SDP forwarded unchanged");
                    return None;
                }
            },
        };
        match self
            .relay
            .update(alloc.id, from, endpoints(&info), answered)
            .await
        {
            Ok(()) => {}
            Err(RelayError::NoSuchSession) => return None,
            Err(error) => {
                warn!(%error, "media relay update");
                return None;
            }
        }
        match sdp::rewrite(body, self.address, &ports_for(&info, &alloc, from)) {
            Ok(b) => Some(b),
            Err(error) if error.is_internal() => {
                warn!(%error, call_id = %call.call_id, "SDP rewrite: relay ports do not fit");
                None
            }
            Err(error) => {
                debug!(%error, "SDP not rewritten");
                None
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
    pub async fn on_request(
        &self,
        msg: &Message,
        fwd: Vec<u8>,
        branch: &str,
        initial: Option<bool>,
    ) -> Vec<u8> {
        let Some(ids) = ids(msg) else { return fwd };
        let body = sdp_body(msg);
        let new = match initial {
            Some(false) => None,
            Some(true) => self.initial_offer(&ids, branch, body).await,
            None if msg.method() == Some("BYE") => {
                self.bye(ids.call_id, (ids.from_tag, ids.to_tag)).await;
                None
            }
            None => match body {
                Some(b) => {
                    self.in_dialog(ids.call_id, (ids.from_tag, ids.to_tag), ids.from_tag, b)
                        .await
                }
                None => None,
            },
        };
        match new {
            Some(body) => with_body(fwd, body),
            None => fwd,
        }
    }

    /// A response on its way upstream (our Via still on top). `initial` as in `on_request`.
    pub async fn on_response(
        &self,
        req: &Message,
        resp: Message,
        branch: &str,
        initial: Option<bool>,
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
            (Some(true), Some(ids)) => self.initial_response(&ids, branch, status, body).await,
            // The responder is the party the request was sent to: its tag is the request's To-tag.
            (None, Some(ids)) => match ids.to_tag.or_else(|| req.to().ok().and_then(|t| t.tag())) {
                Some(sender) => {
                    self.in_dialog(ids.call_id, (ids.from_tag, ids.to_tag), sender, body)
                        .await
                }
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
        let alloc = Allocated {
            id: SessionId(1),
            ports: (0..3)
                .map(|i| StreamPorts {
                    caller: pair(30000 + 4 * i),
                    callee: pair(30002 + 4 * i),
                })
                .collect(),
        };
        // The caller's offer goes to the callee: the callee-facing ports; the disabled stream
        // keeps port 0.
        assert_eq!(
            ports_for(&info, &alloc, Side::Caller),
            vec![Some(30002), None, Some(30010)]
        );
        assert_eq!(
            ports_for(&info, &alloc, Side::Callee),
            vec![Some(30000), None, Some(30008)]
        );
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
