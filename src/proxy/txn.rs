//! One proxied request (RFC 3261 §16), sans-IO in the quinn-proto style: its server
//! transaction, a client transaction per branch and the CANCEL sent on it, the response
//! context (forking, best response), CANCEL handling, Timer C / 408, and the media steps of
//! an initial INVITE.
//!
//! [`ProxyTxn`] is a plain struct: it is fed with [`ProxyTxn::handle`],
//! [`ProxyTxn::handle_timeout`], [`ProxyTxn::handle_offer`] and [`ProxyTxn::handle_answer`]
//! (each with `now`), and drained with [`ProxyTxn::poll_transmit`],
//! [`ProxyTxn::poll_media`], [`ProxyTxn::poll_event`] and [`ProxyTxn::poll_timeout`]. It
//! never reads a clock, a socket or a task: [`super::stateful`] feeds it and carries out what
//! it returns, and the unit tests drive it on virtual time.
//!
//! A branch towards a `[[trunk]]` answers the first 401/407 of its next hop itself (Kamailio's
//! `uac_auth()`): the challenge is not relayed; the same request goes again with the trunk's
//! credentials, CSeq + 1 and a new Via branch, in a new client transaction
//! ([`ProxyTxn::answer_challenge`]). A second challenge means the credentials are wrong: the
//! caller gets a 403 naming trunk authentication (the provider's 407 would ask the phone for
//! a password it does not have). Responses going upstream carry the caller's CSeq again.
//!
//! Media steps are requests to the shell ([`MediaOp`]) whose results come back through
//! `handle_offer` / `handle_answer`. The shell completes each before it feeds the next input,
//! so a branch's responses keep their order.
//!
//! Failover (Kamailio's dispatcher with a tm `failure_route`): a branch may carry alternate
//! destinations ([`Attempt`]s, from a `[[route]]` list or the SRV targets of a name). When its
//! client transaction ends in a 503, a local 408 without any provisional (Timer B/F) or a
//! transport error, or when its next hop stays silent (not even a 100) for the plan's
//! `failover_timeout`, and the caller has not cancelled and no final went upstream, the
//! branch is sent again to the next alternate on a new client transaction with a new Via
//! branch ([`ProxyTxn::restart_branch`]); its media session key (`Branch.id`) stays.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use super::forward::{self, Local, Options, RouteEdit, Target};
use super::pipeline::{Hop, Plan};
use super::response::{Challenge, Conclusion, Final, ResponseContext};
use crate::auth::digest;
use crate::auth::mac::RouteKey;
use crate::config::MediaMode;
use crate::media::session::Refused;
pub use crate::media::session::Role;
use crate::sip::{HeaderName, Message, reply};
use crate::transaction::{ClientAction, ClientTxn, Kind, ServerAction, ServerTxn, Timers, TxnKey};
use crate::transport::{Proto, Source, Transmit};

/// What the proxy core needs of the configuration and the sockets, shared by every request.
#[derive(Debug, Clone)]
pub struct Context {
    pub timers: Timers,
    /// Our sockets, to pick the outgoing one and write Via/Record-Route.
    pub local: Vec<(Proto, SocketAddr)>,
    /// The address written into Via and Record-Route.
    pub advertise: std::net::IpAddr,
    /// `server.max_forwards`.
    pub max_forwards: u8,
    /// Signs our Record-Route and branches.
    pub key: RouteKey,
    /// Whether a media relay is running (else no [`MediaOp`] is ever asked for).
    pub media: bool,
}

impl Context {
    /// Our listening socket for a transport (the first one configured).
    pub fn socket_for(&self, proto: Proto) -> SocketAddr {
        self.local
            .iter()
            .find(|(p, _)| *p == proto)
            .or_else(|| self.local.first())
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 5060)), |(_, a)| *a)
    }

    /// Our side where a request came in, and where it leaves over `out`.
    pub fn sides(&self, source: Source, out: Proto) -> ((Local, Proto), Local) {
        let inbound = Local {
            advertise: self.advertise,
            port: source.local.port(),
        };
        let outbound = Local {
            advertise: self.advertise,
            port: self.socket_for(out).port(),
        };
        ((inbound, source.proto), outbound)
    }

    /// The bytes of one forwarded copy of `msg`: one rewrite of the received message (Route,
    /// Request-URI, Max-Forwards, Record-Route, Via, credentials, body).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        &self,
        msg: &Message,
        source: Source,
        hop: &Hop,
        dest: SocketAddr,
        branch: &str,
        plan: &Plan,
        strip_proxy_auth: bool,
        force_rport: bool,
        body: Option<Vec<u8>>,
        credentials: Option<(&'static str, String)>,
    ) -> Vec<u8> {
        let target = Target {
            ruri: hop.ruri.clone(),
            dest,
            proto: hop.proto,
        };
        let (inbound, outbound) = self.sides(source, hop.proto);
        let route = if plan.strict_route {
            RouteEdit::PopLast
        } else if plan.pop_route {
            RouteEdit::PopFirst
        } else {
            RouteEdit::Keep
        };
        let opts = Options {
            record_route: plan.record_route,
            strip_proxy_auth,
            nat: plan.nat,
            max_forwards_cap: self.max_forwards,
            caller_flow: plan.caller_flow,
            callee_flow: hop.flow,
            source: Some(source.remote),
            force_rport,
            route,
            identity: plan.identity.clone(),
            // RFC 3261 §22.2: a request with credentials is a new request, CSeq + 1; our
            // Record-Route records the offset for the dialog's later requests.
            cseq_offset: plan.cseq_offset + u32::from(credentials.is_some()),
            owner: hop.owner.map(|binding| (dest, binding)),
            credentials,
        };
        forward::request(
            msg, &target, inbound, outbound, branch, opts, &self.key, body,
        )
    }
}

/// One resolved place for a branch: the hop (its Request-URI and transport) and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub hop: Hop,
    pub dest: SocketAddr,
}

/// What the transaction task does with its request.
#[derive(Debug)]
pub enum Work {
    /// Forward along the plan; `dests[i]` are the resolved places of `plan.targets[i]` in
    /// failover order (the first is tried first; never empty).
    Forward {
        plan: Plan,
        dests: Vec<Vec<Attempt>>,
        strip_proxy_auth: bool,
        /// The user proxy authentication verified (media sessions count against it).
        auth_user: Option<String>,
    },
    /// Answer with these bytes (a complete response).
    Reply(Vec<u8>),
}

/// An input from the network for this request.
#[derive(Debug)]
pub enum Input {
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
        resp: Message,
    },
}

/// A media step the shell performs, then reports back.
#[derive(Debug)]
pub enum MediaOp {
    /// The SDP of the request on branch `idx` (the received request,
    /// [`ProxyTxn::request`]); report with [`ProxyTxn::handle_offer`].
    Offer {
        idx: usize,
        branch: String,
        role: Role,
        auth_user: Option<String>,
    },
    /// A response on branch `idx` on its way upstream; report with
    /// [`ProxyTxn::handle_answer`], giving `resp` back.
    Answer {
        idx: usize,
        branch: String,
        role: Role,
        /// Where the answering party's SIP came from (where we sent the request).
        from: SocketAddr,
        resp: Message,
    },
    /// The final response of an initial INVITE went upstream. Nothing to report.
    Finished { status: u16, cancelled: bool },
}

/// A change to the proxy's transaction tables.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Responses with this key belong to branch `idx` (`cancel`: to the CANCEL sent on it).
    Bind {
        key: TxnKey,
        idx: usize,
        cancel: bool,
    },
    /// This client key is over.
    Unbind(TxnKey),
    /// The final response is sent: the request no longer counts as pending
    /// (`limits.transactions_per_ip`).
    Final,
    /// The server transaction is over: a later copy of the request is a new request.
    ServerDone,
    /// Branch `idx` left `from` for its next alternate `to` (README "Next hops and failover").
    Failover {
        idx: usize,
        from: SocketAddr,
        to: SocketAddr,
        reason: FailoverReason,
    },
}

/// What a finished transaction still owes the network until its RFC timers end
/// ([`ProxyTxn::retire`]). The shell keeps it in a table shared by every finished
/// transaction ([`super::linger`]) instead of a task each: a few hundred bytes for 32 s, not
/// the whole request state.
#[derive(Debug, PartialEq, Eq)]
pub struct Finished {
    /// The server transaction's part and its deadline (Timer J, L or I); `None` when it has
    /// ended (over a reliable transport).
    pub server: Option<(Instant, ServerRest)>,
    /// The client transactions still running (each branch's, its CANCEL's, the attempts left
    /// by a failover): key, deadline (Timer K, D or M) and part.
    pub clients: Vec<(TxnKey, Instant, ClientRest)>,
}

/// What a finished server transaction does with what still arrives for it.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerRest {
    /// An INVITE answered (RFC 6026 Accepted) or ACKed (Confirmed): retransmissions of the
    /// request and of its ACK are absorbed; a CANCEL gets its 200 (RFC 3261 §16.10).
    Invite,
    /// A non-INVITE request in Completed: each retransmission gets the final again.
    Resend(Transmit),
}

/// What a finished client transaction does with the responses that still arrive for it.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientRest {
    /// A non-INVITE (or CANCEL) in Completed: retransmitted finals are absorbed (Timer K).
    Absorb,
    /// An INVITE in Completed: a retransmitted non-2xx final gets our ACK again (Timer D).
    Ack(Transmit),
    /// An INVITE in Accepted, not relayed: a 2xx goes upstream statelessly, as one after
    /// Timer M does (RFC 6026 §7.2: our branch's MAC checks where).
    Pass,
    /// An INVITE in Accepted whose answer went through the relay: a 2xx with the answer's
    /// To-tag gets the rewritten copy that went upstream (the relay's SDP, not the callee's);
    /// other responses are absorbed.
    Answer { tag: String, up: Transmit },
}

/// Why a branch moved to its next alternate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverReason {
    /// The next hop answered 503 Service Unavailable.
    Unavailable,
    /// No final and no provisional before Timer B/F (a local 408).
    Timeout,
    /// The next hop could not be reached (a transport error, a failed connect).
    Unreachable,
    /// Nothing at all, not even a 100, within the route's `failover_timeout_ms`.
    Silent,
}

impl FailoverReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "503",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Silent => "no response within failover_timeout_ms",
        }
    }
}

/// Where a branch is.
#[derive(Debug)]
enum Leg {
    /// Its request waits for the media offer.
    Offering,
    /// Forwarded: its client transaction runs.
    Sent { txn: Box<ClientTxn>, key: TxnKey },
    /// Its client transaction terminated, or it was never sent (refused by media).
    Over,
}

#[derive(Debug)]
struct Branch {
    /// Our branch id (the media session key of an initial INVITE's branch).
    id: String,
    /// The Via branch of the current attempt (`id` for the first; a new one per failover).
    via: String,
    /// Failovers so far (0: the first destination).
    attempt: usize,
    hop: Hop,
    dest: SocketAddr,
    role: Role,
    leg: Leg,
    /// The CANCEL we sent on this branch.
    /// (Boxed: most branches never send one.)
    cancel: Option<Box<(ClientTxn, TxnKey)>>,
    /// Cancel as soon as a provisional arrives (RFC 3261 §9.1).
    cancel_pending: bool,
    /// The places still to try, in order.
    alternates: VecDeque<Attempt>,
    /// The trunk's credentials went out on this attempt: another challenge means they are
    /// wrong.
    auth_sent: bool,
    /// The body the request carried when forwarded (the relay's SDP), for a resend.
    body: Option<Vec<u8>>,
    /// When the current attempt was sent, and whether anything came back from it.
    sent_at: Instant,
    answered: bool,
    /// Client transactions of earlier attempts that finish on their own (the ACK of a 503
    /// and its retransmissions, Timer D).
    retired: Vec<Retired>,
}

/// A client transaction left behind by a failover.
#[derive(Debug)]
struct Retired {
    txn: Box<ClientTxn>,
    key: TxnKey,
    dest: SocketAddr,
    proto: Proto,
}

/// The reason phrase of the 403 a caller gets when a trunk's credentials are refused.
pub const TRUNK_REJECTED: &str = "Forbidden (trunk authentication failed)";

/// The state of one proxied request. See the module documentation.
#[derive(Debug)]
pub struct ProxyTxn {
    ctx: Arc<Context>,
    /// The received request; `None` once [`ProxyTxn::compact`] found nothing left that needs
    /// it.
    msg: Option<Box<Message>>,
    source: Source,
    /// Where responses go ([`crate::nat::response_dest`] of the request).
    up: SocketAddr,
    /// The request's CSeq number: responses go upstream with it.
    caller_cseq: Option<u32>,
    invite: bool,
    server: ServerTxn,
    /// Answer at the sender's source port (force_rport: it is behind NAT).
    nated: bool,
    answered_locally: bool,
    plan: Plan,
    strip_proxy_auth: bool,
    auth_user: Option<String>,
    branches: Vec<Branch>,
    rc: ResponseContext,
    /// A media limit refused a branch's SDP: its status and headers answer that branch.
    media_refused: Option<Refused>,
    /// The initial INVITE's final response was reported to media.
    media_final: bool,
    cancelled: bool,
    /// The To-tag of the 2xx that went upstream as the INVITE's final (the callee's tag of
    /// the dialog accounting waits on).
    answer_tag: Option<String>,
    final_reported: bool,
    server_done: bool,
    /// Some branch was forwarded (not every one was refused by media).
    sent_any: bool,
    /// A trunk's credentials were challenged again: the caller's 403 says so.
    trunk_rejected: bool,
    transmits: VecDeque<Transmit>,
    media: VecDeque<MediaOp>,
    events: VecDeque<Event>,
}

impl ProxyTxn {
    /// Starts the request: a 100 Trying for an INVITE (RFC 3261 §16.2), the local answer of
    /// `Work::Reply`, or a branch per target of `Work::Forward` (those that need a media offer
    /// first ask for it).
    pub fn new(ctx: Arc<Context>, msg: Message, source: Source, work: Work, now: Instant) -> Self {
        let invite = msg.method() == Some("INVITE");
        let kind = if invite {
            Kind::Invite
        } else {
            Kind::NonInvite
        };
        let server = ServerTxn::new(kind, source.proto.is_reliable(), ctx.timers, now);
        let (plan, dests, strip_proxy_auth, auth_user, local_reply) = match work {
            Work::Forward {
                plan,
                dests,
                strip_proxy_auth,
                auth_user,
            } => (plan, dests, strip_proxy_auth, auth_user, None),
            Work::Reply(bytes) => (Plan::default(), Vec::new(), false, None, Some(bytes)),
        };
        // force_rport: a sender behind NAT is answered at its source port.
        let nated = if local_reply.is_some() {
            crate::nat::detect::detect(&msg, source.remote).is_nated()
        } else {
            plan.sender_nated
        };
        let up = crate::nat::response_dest(&msg, source, nated);
        let caller_cseq = msg.cseq().ok().map(|c| c.seq);
        let mut t = Self {
            ctx,
            up,
            caller_cseq,
            invite,
            server,
            nated,
            answered_locally: local_reply.is_some(),
            strip_proxy_auth,
            auth_user,
            branches: Vec::new(),
            rc: ResponseContext::new(plan.targets.len()),
            plan,
            media_refused: None,
            media_final: false,
            cancelled: false,
            answer_tag: None,
            final_reported: false,
            server_done: false,
            sent_any: false,
            trunk_rejected: false,
            transmits: VecDeque::new(),
            media: VecDeque::new(),
            events: VecDeque::new(),
            source,
            msg: None,
        };
        if let Some(bytes) = local_reply {
            let status = match reply::status_of(&bytes) {
                0 => 500,
                s => s,
            };
            t.server.respond(status, bytes, now);
        } else if invite {
            let trying = reply::response(&msg, source.remote, 100, "Trying", &[]);
            t.server.respond(100, trying, now);
        }
        t.msg = Some(Box::new(msg));
        t.start_branches(dests, now);
        t.drive(now);
        t
    }

    /// Our Via branch for forwarded copy `index` of the request (RFC 3261 §16.6 step 8).
    /// `None` once the request is released ([`ProxyTxn::compact`]: no new branch then).
    fn branch_for(&self, index: usize) -> Option<String> {
        let msg = self.msg.as_ref()?;
        let key = crate::transaction::server_key(msg);
        let (incoming, sent_by) = key.as_ref().map_or(("", ""), |k| (k.branch(), k.sent_by()));
        Some(forward::branch_id(
            msg,
            incoming,
            sent_by,
            index,
            &self.ctx.key,
            self.up,
        ))
    }

    fn start_branches(&mut self, dests: Vec<Vec<Attempt>>, now: Instant) {
        let Some(msg) = &self.msg else {
            return;
        };
        let in_dialog = msg.to().ok().and_then(|t| t.tag()).is_some();
        let bye = msg.method() == Some("BYE");
        let has_body = !msg.body().is_empty();
        let targets = std::mem::take(&mut self.plan.targets);
        self.branches.reserve_exact(targets.len());
        for (i, (hop, attempts)) in targets.iter().zip(dests).enumerate() {
            let mut attempts = VecDeque::from(attempts);
            let Some(first) = attempts.pop_front() else {
                continue;
            };
            let Some(id) = self.branch_for(i) else {
                continue;
            };
            let role = match self.plan.media {
                Some(mode) if relay_decision(mode, self.plan.sender_nated, hop) => Role::Relay,
                Some(_) => Role::Direct,
                None if in_dialog => Role::InDialog,
                None => Role::Direct,
            };
            // Media is asked only where it has something to do: every relayed branch of an
            // initial INVITE (a late offer still opens the call), and in-dialog requests that
            // carry a body or end the dialog.
            let offer = self.ctx.media
                && match role {
                    Role::Relay => true,
                    Role::Direct => false,
                    Role::InDialog => bye || has_body,
                };
            let idx = self.branches.len();
            self.branches.push(Branch {
                id: id.clone(),
                via: id.clone(),
                attempt: 0,
                hop: first.hop,
                dest: first.dest,
                role,
                leg: Leg::Offering,
                cancel: None,
                cancel_pending: false,
                alternates: attempts,
                body: None,
                sent_at: now,
                answered: false,
                retired: Vec::new(),
                auth_sent: false,
            });
            if offer {
                push_media(
                    &mut self.media,
                    MediaOp::Offer {
                        idx,
                        branch: id,
                        role,
                        auth_user: self.auth_user.clone(),
                    },
                );
            } else {
                self.send(idx, None, now);
            }
        }
        self.plan.targets = targets;
    }

    /// Forwards branch `idx` (with the relay's SDP when `body` is set).
    fn send(&mut self, idx: usize, body: Option<Vec<u8>>, now: Instant) {
        self.send_with(idx, body, None, now);
    }

    /// [`Self::send`], with a trunk's `credentials` when set: a new client transaction on the
    /// branch's current Via branch replaces the leg (whoever still needs the old one has
    /// taken it off first).
    fn send_with(
        &mut self,
        idx: usize,
        body: Option<Vec<u8>>,
        credentials: Option<(&'static str, String)>,
        now: Instant,
    ) {
        let (Some(b), Some(msg)) = (self.branches.get(idx), &self.msg) else {
            return;
        };
        let bytes = self.ctx.build(
            msg,
            self.source,
            &b.hop,
            b.dest,
            &b.via,
            &self.plan,
            self.strip_proxy_auth,
            self.nated,
            body.clone(),
            credentials,
        );
        let (_, outbound) = self.ctx.sides(self.source, b.hop.proto);
        let key = TxnKey::new(
            &b.via,
            &forward::hostport(outbound),
            msg.method().unwrap_or_default(),
        );
        let kind = if self.invite {
            Kind::Invite
        } else {
            Kind::NonInvite
        };
        let txn = ClientTxn::new(kind, bytes, b.hop.proto.is_reliable(), self.ctx.timers, now);
        tracing::debug!(branch = idx, dest = %b.dest, transport = b.hop.proto.as_str(), "forwarding");
        self.events.push_back(Event::Bind {
            key: key.clone(),
            idx,
            cancel: false,
        });
        let b = &mut self.branches[idx];
        b.leg = Leg::Sent {
            txn: Box::new(txn),
            key,
        };
        b.body = body;
        b.sent_at = now;
        b.answered = false;
        self.sent_any = true;
    }

    /// Sends branch `idx` again, to `next`, on a new client transaction with a new Via branch
    /// (RFC 3261 §16.6 step 8: one branch per forwarded copy), with the body it was first
    /// forwarded with. The branch's media session key (`Branch.id`) stays, so its relay
    /// session serves whichever attempt answers. The caller has taken the previous client
    /// transaction off the branch ([`ProxyTxn::fail_over`]).
    fn restart_branch(&mut self, idx: usize, next: Attempt, now: Instant) {
        let Some(b) = self.branches.get_mut(idx) else {
            return;
        };
        b.attempt += 1;
        // Distinct from every first attempt's index (branches are far fewer than 2^16).
        let index = idx + (b.attempt << 16);
        let Some(via) = self.branch_for(index) else {
            return;
        };
        let b = &mut self.branches[idx];
        b.via = via;
        b.hop = next.hop;
        b.dest = next.dest;
        // A new next hop challenges on its own: the trunk's credentials are not spent there.
        b.auth_sent = false;
        let body = b.body.take();
        self.send(idx, body, now);
    }

    /// Whether branch `idx` may move to its next alternate now: one remains, the caller has
    /// not cancelled, the branch is not being cancelled, and no final went upstream.
    fn can_fail_over(&self, idx: usize) -> bool {
        self.branches
            .get(idx)
            .is_some_and(|b| !b.alternates.is_empty() && !b.cancel_pending && b.cancel.is_none())
            && !self.cancelled
            && self.server.final_status().is_none()
    }

    /// Moves branch `idx` to its next alternate. Its client transaction is retired (`retire`:
    /// it still owes an ACK and absorbs retransmissions of the final it got) or dropped
    /// quietly (nothing was received, so there is nothing to CANCEL or ACK), and its key is
    /// unbound then. False when no alternate remains.
    fn fail_over(
        &mut self,
        idx: usize,
        reason: FailoverReason,
        retire: bool,
        now: Instant,
    ) -> bool {
        if !self.can_fail_over(idx) {
            return false;
        }
        let b = &mut self.branches[idx];
        let Some(next) = b.alternates.pop_front() else {
            return false;
        };
        if let Leg::Sent { txn, key } = std::mem::replace(&mut b.leg, Leg::Over) {
            if retire {
                b.retired.push(Retired {
                    txn,
                    key,
                    dest: b.dest,
                    proto: b.hop.proto,
                });
            } else {
                self.events.push_back(Event::Unbind(key));
            }
        }
        self.events.push_back(Event::Failover {
            idx,
            from: b.dest,
            to: next.dest,
            reason,
        });
        self.restart_branch(idx, next, now);
        true
    }

    /// When branch `idx`'s silent next hop is left for the next alternate, if it may be.
    fn failover_deadline(&self, idx: usize) -> Option<Instant> {
        let timeout = self.plan.failover_timeout?;
        let b = self.branches.get(idx)?;
        (matches!(b.leg, Leg::Sent { .. }) && !b.answered && self.can_fail_over(idx))
            .then(|| b.sent_at + timeout)
    }

    /// A 401/407 `resp` on branch `idx`, whose hop belongs to a trunk: answered with the
    /// trunk's credentials (Kamailio `uac_auth()`). True when the challenge is handled here
    /// (re-sent, or refused a second time: the caller gets [`TRUNK_REJECTED`]); false when it
    /// goes upstream as today (no challenge for the trunk's realm, or the caller cancelled).
    fn answer_challenge(&mut self, idx: usize, resp: &Message, now: Instant) -> bool {
        let Some(b) = self.branches.get(idx) else {
            return false;
        };
        let Some(trunk) = b.hop.trunk.clone() else {
            return false;
        };
        let status = resp.status().unwrap_or(0);
        if b.auth_sent {
            tracing::warn!(
                trunk = %trunk.name,
                sip.status = status,
                peer.addr = %b.dest,
                "trunk credentials rejected"
            );
            self.trunk_rejected = true;
            self.rc.on_local_final(idx, 403);
            return true;
        }
        if self.cancelled {
            return false;
        }
        let (header, answer_name) = match status {
            401 => (HeaderName::WwwAuthenticate, "Authorization"),
            _ => (HeaderName::ProxyAuthenticate, "Proxy-Authorization"),
        };
        let challenge = resp
            .headers_named(header)
            .filter_map(|h| resp.str_at(h.value.clone()))
            .filter_map(|v| digest::parse_challenge(v).ok())
            .find(|c| trunk.realm.as_ref().is_none_or(|r| *r == c.realm));
        let Some(challenge) = challenge else {
            tracing::debug!(trunk = %trunk.name, "no challenge the trunk can answer: relayed");
            return false;
        };
        let Some(msg) = &self.msg else {
            return false;
        };
        let method = msg.method().unwrap_or_default();
        let uri = b
            .hop
            .ruri
            .as_deref()
            .or(msg.request_uri())
            .unwrap_or_default();
        // The client nonce only has to be unpredictable to the server: a MAC of its nonce.
        let cnonce = self.ctx.key.branch_mac(&challenge.nonce, b.dest);
        let cnonce = cnonce.as_str();
        let credentials = digest::authorization(
            &challenge,
            &digest::Answer {
                username: &trunk.auth_username,
                password: &trunk.password,
                method,
                uri,
                cnonce,
                nc: 1,
            },
        );
        tracing::info!(trunk = %trunk.name, sip.status = status, dest = %b.dest, "answering the trunk's challenge");
        // A new Via branch, as for a failover (RFC 3261 §16.6 step 8); the media key stays.
        let attempt = b.attempt + 1;
        let Some(via) = self.branch_for(idx + (attempt << 16)) else {
            return false;
        };
        let b = &mut self.branches[idx];
        // The challenged transaction is retired: it ACKs the 401/407 and absorbs its
        // retransmissions until Timer D.
        if let Leg::Sent { txn, key } = std::mem::replace(&mut b.leg, Leg::Over) {
            b.retired.push(Retired {
                txn,
                key,
                dest: b.dest,
                proto: b.hop.proto,
            });
        }
        b.attempt = attempt;
        b.via = via;
        b.auth_sent = true;
        let body = b.body.take();
        self.send_with(idx, body, Some((answer_name, credentials)), now);
        // The next hop has answered: no failover timer for the re-send.
        self.branches[idx].answered = true;
        // The challenged transaction's ACK leaves before the new request.
        self.drain_retired(idx);
        true
    }

    /// The received request; `None` once [`ProxyTxn::compact`] released it (no media step
    /// is asked for after that).
    pub fn request(&self) -> Option<&Message> {
        self.msg.as_deref()
    }

    /// Where the request came from.
    pub fn source(&self) -> Source {
        self.source
    }

    /// The final status that went upstream, once one did ([`Event::Final`]).
    pub fn final_status(&self) -> Option<u16> {
        self.server.final_status()
    }

    /// Whether the caller sent a CANCEL.
    pub fn cancelled(&self) -> bool {
        self.cancelled
    }

    /// The To-tag of the 2xx that answered the INVITE (the callee's side of the dialog).
    pub fn answer_tag(&self) -> Option<&str> {
        self.answer_tag.as_deref()
    }

    /// An input from the network.
    pub fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::Retransmission => self.server.on_request_retransmission(now),
            Input::Ack => self.server.on_ack(now),
            Input::Cancel => {
                self.cancelled = true;
                self.cancel_pending(now);
            }
            Input::Response { idx, cancel, resp } => {
                if let Some(b) = self.branches.get_mut(idx) {
                    // A response to an earlier attempt (a retransmitted 503) goes to the
                    // client transaction that is finishing it.
                    let via = resp
                        .top_via()
                        .ok()
                        .and_then(|v| v.branch().map(str::to_owned));
                    if !cancel
                        && let Some(r) = b
                            .retired
                            .iter_mut()
                            .find(|r| via.as_deref() == Some(r.key.branch()))
                    {
                        r.txn.on_response(resp, now);
                        self.drive(now);
                        return;
                    }
                    if !cancel {
                        b.answered = true;
                    }
                    let txn = match (cancel, &mut b.leg, &mut b.cancel) {
                        (false, Leg::Sent { txn, .. }, _) => Some(&mut **txn),
                        (true, _, Some(c)) => Some(&mut c.0),
                        _ => None,
                    };
                    if let Some(txn) = txn {
                        txn.on_response(resp, now);
                    }
                }
            }
        }
        self.drive(now);
    }

    /// The deadline of [`ProxyTxn::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.server.on_timer(now);
        for b in &mut self.branches {
            if let Leg::Sent { txn, .. } = &mut b.leg {
                txn.on_timer(now);
            }
            if let Some(c) = &mut b.cancel {
                c.0.on_timer(now);
            }
            for r in &mut b.retired {
                r.txn.on_timer(now);
            }
        }
        for idx in 0..self.branches.len() {
            if self.failover_deadline(idx).is_some_and(|d| d <= now) {
                self.fail_over(idx, FailoverReason::Silent, false, now);
            }
        }
        self.drive(now);
    }

    /// The result of [`MediaOp::Offer`] for branch `idx`: the body its request carries
    /// instead of the received one (`None`: unchanged), or the media limit that refuses it.
    pub fn handle_offer(
        &mut self,
        now: Instant,
        idx: usize,
        result: Result<Option<Vec<u8>>, Refused>,
    ) {
        if !matches!(self.branches.get(idx).map(|b| &b.leg), Some(Leg::Offering)) {
            return;
        }
        match result {
            // An ACK is never refused (the media layer forwards it unchanged).
            Ok(body) => self.send(idx, body, now),
            Err(why) => {
                self.media_refused = Some(why);
                self.branches[idx].leg = Leg::Over;
                self.rc.on_local_final(idx, why.status());
            }
        }
        self.drive(now);
    }

    /// The result of [`MediaOp::Answer`]: the response back, and the body it carries upstream
    /// instead of its own (`None`: unchanged).
    pub fn handle_answer(
        &mut self,
        now: Instant,
        idx: usize,
        resp: Message,
        body: Option<Vec<u8>>,
    ) {
        if self.pass_up(idx, resp, body, now) {
            // A 2xx or 6xx: the other branches are cancelled (RFC 3261 §16.7 step 10).
            self.cancel_pending(now);
        }
        self.drive(now);
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next media step to perform.
    pub fn poll_media(&mut self) -> Option<MediaOp> {
        self.media.pop_front()
    }

    /// The next change to the transaction tables.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`ProxyTxn::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.branches
            .iter()
            .enumerate()
            .flat_map(|(idx, b)| {
                let txn = match &b.leg {
                    Leg::Sent { txn, .. } => txn.poll_timeout(),
                    _ => None,
                };
                [
                    txn,
                    b.cancel.as_ref().and_then(|c| c.0.poll_timeout()),
                    self.failover_deadline(idx),
                ]
                .into_iter()
                .chain(b.retired.iter().map(|r| r.txn.poll_timeout()))
            })
            .flatten()
            .chain(self.server.poll_timeout())
            .min()
    }

    /// Everything is over: the server transaction and every branch (and its CANCEL).
    pub fn is_done(&self) -> bool {
        self.server_done
            && self.media.is_empty()
            && self
                .branches
                .iter()
                .all(|b| matches!(b.leg, Leg::Over) && b.cancel.is_none() && b.retired.is_empty())
    }

    /// Only the RFC timers are left: the final went upstream, nothing is queued for the
    /// shell, and every client transaction (CANCELs and retired attempts included) has its
    /// final, so no branch is forwarded, cancelled or answered locally any more.
    fn settled(&self) -> bool {
        use crate::transaction::ClientState as C;
        let final_in =
            |txn: &ClientTxn| matches!(txn.state(), C::Completed | C::Accepted | C::Terminated);
        self.server.final_status().is_some()
            && self.media.is_empty()
            && self.transmits.is_empty()
            && self.events.is_empty()
            && self.branches.iter().all(|b| {
                let leg = match &b.leg {
                    Leg::Offering => false,
                    Leg::Sent { txn, .. } => final_in(txn),
                    Leg::Over => true,
                };
                leg && b.cancel.as_ref().is_none_or(|c| final_in(&c.0))
                    && b.retired.iter().all(|r| final_in(&r.txn))
            })
    }

    /// Hands over what this transaction still owes the network once only the RFC timers'
    /// absorbing is left (see [`Finished`]); `None` while anything else may still happen: the
    /// request is pending, a media step or a transmit is queued, an INVITE's non-2xx final
    /// still waits for its ACK (Timer G retransmits it), or a relayed INVITE was answered by
    /// more than one 2xx (each further 2xx goes through the media layer, which needs the
    /// task). The caller drops the transaction after it.
    pub fn retire(&self) -> Option<Finished> {
        use crate::transaction::{ClientState as C, ServerState as S};
        if !self.settled() {
            return None;
        }
        let server = match (self.server.state(), self.invite) {
            (S::Terminated, _) => None,
            (S::Accepted | S::Confirmed, true) => Some(ServerRest::Invite),
            (S::Completed, false) => {
                let last = self.server.last_response()?;
                Some(ServerRest::Resend(self.upstream(last.to_vec())))
            }
            _ => return None,
        };
        let server = match server {
            Some(rest) => Some((self.server.poll_timeout()?, rest)),
            None => None,
        };
        let accepted = self
            .branches
            .iter()
            .filter(|b| matches!(&b.leg, Leg::Sent { txn, .. } if txn.state() == C::Accepted))
            .count();
        let mut clients = Vec::new();
        for b in &self.branches {
            if let Leg::Sent { txn, key } = &b.leg
                && let Some(at) = txn.poll_timeout()
            {
                let rest = match txn.state() {
                    C::Completed if self.invite => ClientRest::Ack(Transmit {
                        proto: b.hop.proto,
                        local: self.ctx.socket_for(b.hop.proto),
                        dest: b.dest,
                        bytes: txn.ack()?.to_vec(),
                    }),
                    C::Completed => ClientRest::Absorb,
                    C::Accepted if !self.ctx.media || b.role == Role::Direct => ClientRest::Pass,
                    C::Accepted if accepted == 1 => ClientRest::Answer {
                        tag: self.answer_tag.clone()?,
                        up: self.upstream(self.server.last_response()?.to_vec()),
                    },
                    _ => return None,
                };
                clients.push((key.clone(), at, rest));
            }
            if let Some(c) = &b.cancel
                && let Some(at) = c.0.poll_timeout()
            {
                clients.push((c.1.clone(), at, ClientRest::Absorb));
            }
            for r in &b.retired {
                let Some(at) = r.txn.poll_timeout() else {
                    continue;
                };
                let rest = match r.txn.ack() {
                    Some(ack) => ClientRest::Ack(Transmit {
                        proto: r.proto,
                        local: self.ctx.socket_for(r.proto),
                        dest: r.dest,
                        bytes: ack.to_vec(),
                    }),
                    None => ClientRest::Absorb,
                };
                clients.push((r.key.clone(), at, rest));
            }
        }
        Some(Finished { server, clients })
    }

    /// Drops what only a pending request needs once [`Self::settled`], so that a finished
    /// transaction waiting out its timers (32 s over UDP) keeps little more than its keys, the
    /// last response for retransmitted requests and, per branch, the ACK for a retransmitted
    /// non-2xx final and where it goes (issue #15: memory per transaction). The received
    /// request goes too unless a media step may still ask for it (a retransmitted 2xx of a
    /// relayed INVITE branch). The shell calls it after draining; it does nothing before.
    pub fn compact(&mut self) {
        if !self.settled() {
            return;
        }
        // RFC 6026 §8.4: an INVITE's 2xx retransmissions still go up; through the media
        // layer when the branch is relayed, which reads the request.
        let media_later =
            self.invite && self.ctx.media && self.branches.iter().any(|b| b.role != Role::Direct);
        if !media_later {
            self.msg = None;
        }
        // Nothing is forwarded again (no failover, no new branch after the final).
        self.plan = Plan {
            media: self.plan.media,
            ..Plan::default()
        };
        self.auth_user = None;
        self.rc.compact();
        self.server.compact();
        for b in &mut self.branches {
            b.alternates = VecDeque::new();
            b.body = None;
            b.hop.ruri = None;
            b.hop.failover = Vec::new();
            b.hop.dest = super::pipeline::Dest::Addr(b.dest);
            if let Leg::Sent { txn, .. } = &mut b.leg {
                txn.compact();
            }
            if let Some(c) = &mut b.cancel {
                c.0.compact();
            }
            for r in &mut b.retired {
                r.txn.compact();
            }
        }
        self.branches.shrink_to_fit();
        self.transmits.shrink_to_fit();
        self.media.shrink_to_fit();
        self.events.shrink_to_fit();
    }

    /// Runs the branches' and the server transaction's actions until nothing moves.
    fn drive(&mut self, now: Instant) {
        loop {
            let mut cancel_others = false;
            for idx in 0..self.branches.len() {
                cancel_others |= self.drain_branch(idx, now);
                self.drain_cancel(idx);
                self.drain_retired(idx);
            }
            if cancel_others {
                self.cancel_pending(now);
                continue;
            }
            break;
        }
        if let Some(c) = self.rc.conclude().filter(|_| !self.answered_locally) {
            self.conclude(c, now);
        }
        if self.server.final_status().is_some() && !self.final_reported {
            self.final_reported = true;
            self.events.push_back(Event::Final);
        }
        while let Some(a) = self.server.poll_action() {
            match a {
                ServerAction::Send(bytes) => {
                    let out = self.upstream(bytes);
                    self.transmits.push_back(out);
                }
                ServerAction::AckTimeout => tracing::debug!("no ACK for our final response"),
                ServerAction::Terminated => {
                    self.server_done = true;
                    self.events.push_back(Event::ServerDone);
                }
            }
        }
    }

    /// Drains branch `idx`'s client transaction; true when the other branches must be
    /// cancelled (a 2xx or 6xx arrived).
    fn drain_branch(&mut self, idx: usize, now: Instant) -> bool {
        let mut cancel_others = false;
        loop {
            let b = &mut self.branches[idx];
            let Leg::Sent { txn, key } = &mut b.leg else {
                return cancel_others;
            };
            let Some(action) = txn.poll_action() else {
                return cancel_others;
            };
            match action {
                ClientAction::Send(bytes) => {
                    let out = Transmit {
                        proto: b.hop.proto,
                        local: self.ctx.socket_for(b.hop.proto),
                        dest: b.dest,
                        bytes,
                    };
                    self.transmits.push_back(out);
                }
                ClientAction::PassUp(resp) => {
                    let status = resp.status().unwrap_or(0);
                    let trunk = b.hop.trunk.is_some();
                    // RFC 3263 §4.3 / Kamailio's failure_route: a 503 moves the branch to its
                    // next alternate, if it may; the caller never sees that 503. A trunk's
                    // challenge is answered with its credentials (Kamailio's uac_auth()).
                    if (status == 503
                        && self.fail_over(idx, FailoverReason::Unavailable, true, now))
                        || (matches!(status, 401 | 407)
                            && trunk
                            && self.answer_challenge(idx, &resp, now))
                    {
                        continue;
                    }
                    let b = &mut self.branches[idx];
                    // In a dialog, only a body can be the relay's business (an answer to
                    // a re-offer); a BYE's 200 passes straight up.
                    let for_media = match b.role {
                        Role::Relay => true,
                        Role::InDialog => !resp.body().is_empty(),
                        Role::Direct => false,
                    };
                    if self.ctx.media && for_media && (101..300).contains(&status) {
                        // The media layer sees it first; `handle_answer` continues.
                        push_media(
                            &mut self.media,
                            MediaOp::Answer {
                                idx,
                                branch: b.id.clone(),
                                role: b.role,
                                // Through the instance owning the callee's binding: the
                                // party's packets come from that binding, not from the owner.
                                from: b.hop.owner.map_or(b.dest, |binding| binding.addr),
                                resp,
                            },
                        );
                    } else {
                        cancel_others |= self.pass_up(idx, resp, None, now);
                    }
                }
                ClientAction::Timeout => {
                    let provisional = txn.got_provisional();
                    // Timer B/F without any provisional: the next hop is down, try the next.
                    if !provisional && self.fail_over(idx, FailoverReason::Timeout, false, now) {
                        continue;
                    }
                    self.rc.on_local_final(idx, 408);
                    // Timer C (RFC 3261 §16.8): a branch that answered provisionally is
                    // cancelled; one that never answered is dropped.
                    if provisional {
                        self.send_cancel(idx, now);
                    }
                }
                ClientAction::TransportError => {
                    // RFC 3261 §8.1.3.1: a transport failure is a local 503; like a received
                    // one, it moves the branch on.
                    if !self.fail_over(idx, FailoverReason::Unreachable, false, now) {
                        self.rc.on_local_final(idx, 503);
                    }
                }
                ClientAction::Terminated => {
                    let key = key.clone();
                    b.leg = Leg::Over;
                    self.events.push_back(Event::Unbind(key));
                }
            }
        }
    }

    /// Sends what the retired client transactions of branch `idx` ask for (an ACK, its
    /// retransmissions) and drops those that ended.
    fn drain_retired(&mut self, idx: usize) {
        let b = &mut self.branches[idx];
        let mut i = 0;
        while i < b.retired.len() {
            let r = &mut b.retired[i];
            let mut over = false;
            while let Some(a) = r.txn.poll_action() {
                match a {
                    ClientAction::Send(bytes) => self.transmits.push_back(Transmit {
                        proto: r.proto,
                        local: self.ctx.socket_for(r.proto),
                        dest: r.dest,
                        bytes,
                    }),
                    ClientAction::Terminated => over = true,
                    // Its final was taken when it was retired; nothing else goes up.
                    ClientAction::PassUp(_)
                    | ClientAction::Timeout
                    | ClientAction::TransportError => {}
                }
            }
            if over {
                let r = b.retired.remove(i);
                self.events.push_back(Event::Unbind(r.key));
            } else {
                i += 1;
            }
        }
    }

    /// Sends what the CANCEL of branch `idx` asks for.
    fn drain_cancel(&mut self, idx: usize) {
        let b = &mut self.branches[idx];
        let Some(cancel) = &mut b.cancel else {
            return;
        };
        let (c, key) = &mut **cancel;
        while let Some(a) = c.poll_action() {
            match a {
                ClientAction::Send(bytes) => self.transmits.push_back(Transmit {
                    proto: b.hop.proto,
                    local: self.ctx.socket_for(b.hop.proto),
                    dest: b.dest,
                    bytes,
                }),
                ClientAction::Terminated => {
                    self.events.push_back(Event::Unbind(key.clone()));
                    b.cancel = None;
                    return;
                }
                ClientAction::PassUp(_) | ClientAction::Timeout | ClientAction::TransportError => {}
            }
        }
    }

    /// An initial INVITE of a call some branch of which goes through the relay: its final
    /// outcome is the media layer's business ([`MediaOp::Finished`]). A call with no relayed
    /// branch has no session to end or give back.
    fn relays(&self) -> bool {
        // A branch is relayed only by the plan's media policy (`start_branches`).
        self.ctx.media && self.branches.iter().any(|b| b.role == Role::Relay)
    }

    /// A response of branch `idx` goes through the response context (after media, with the
    /// relay's SDP in `body`). True when the other branches must be cancelled.
    fn pass_up(&mut self, idx: usize, resp: Message, body: Option<Vec<u8>>, now: Instant) -> bool {
        let status = resp.status().unwrap_or(0);
        // The first 2xx ends the media negotiation of every branch, also when it comes from a
        // branch that is not relayed: the relayed forks give their sessions back now.
        let first_2xx =
            self.invite && !self.media_final && self.relays() && (200..300).contains(&status);
        let Some(b) = self.branches.get_mut(idx) else {
            return false;
        };
        // RFC 3261 §9.1: any provisional, 100 included, lets the CANCEL go.
        if (100..200).contains(&status) && b.cancel_pending {
            b.cancel_pending = false;
            self.send_cancel(idx, now);
        }
        let d = self.rc.on_response(idx, resp);
        if let Some(up) = d.forward
            && let Some(bytes) = upstream_copy(&up, body, self.caller_cseq())
        {
            let up_status = up.status().unwrap_or(0);
            if self.invite
                && (200..300).contains(&up_status)
                && self.server.final_status().is_some_and(|s| s >= 300)
            {
                // RFC 3261 §16.7 step 5: every 2xx to an INVITE goes upstream, also one that
                // crossed our own final (a 487 for the caller's CANCEL, Timer C's 408). The
                // server transaction has completed with that final, so it goes statelessly;
                // the caller ACKs and ends the call.
                let out = self.upstream(bytes);
                self.transmits.push_back(out);
            } else {
                if self.invite
                    && (200..300).contains(&up_status)
                    && self.server.final_status().is_none()
                {
                    self.answer_tag = up.to().ok().and_then(|t| t.tag()).map(str::to_owned);
                }
                self.server.respond(up_status, bytes, now);
            }
        }
        if first_2xx {
            self.media_final = true;
            push_media(
                &mut self.media,
                MediaOp::Finished {
                    status,
                    cancelled: false,
                },
            );
        }
        d.cancel_others
    }

    /// The best final response goes upstream (RFC 3261 §16.7 step 6), with the other
    /// branches' challenges when it is a 401/407 (step 7).
    fn conclude(&mut self, Conclusion { best, challenges }: Conclusion, now: Instant) {
        if self.msg.is_none() {
            // Released: the final went upstream before (ProxyTxn::compact).
            return;
        }
        let (status, bytes) = match best {
            Final::Received(resp) => {
                let status = resp.status().unwrap_or(500);
                match upstream_copy_with(&resp, None, &challenges, self.caller_cseq()) {
                    Some(b) => (status, b),
                    // A downstream UA answered with only our Via (it built the response from
                    // our CANCEL, say): RFC 3261 §16.7 step 3 forbids forwarding it, so the
                    // caller gets the same status from us.
                    None => (status, self.local_response(status, &[])),
                }
            }
            Final::Local(status) => {
                // Every branch refused by a media limit: its own answer (the 503 → 500 of
                // RFC 3261 §16.7 step 6 is for a 503 received from downstream).
                let status = match self.media_refused {
                    Some(r) if !self.sent_any => r.status(),
                    _ => status,
                };
                let extra = self
                    .media_refused
                    .filter(|r| r.status() == status)
                    .map_or(&[][..], |r| r.headers());
                (status, self.local_response(status, extra))
            }
        };
        self.server.respond(status, bytes, now);
        if self.invite && !self.media_final && self.relays() {
            self.media_final = true;
            push_media(
                &mut self.media,
                MediaOp::Finished {
                    status,
                    cancelled: self.cancelled,
                },
            );
        }
    }

    /// A response to the caller, addressed by [`crate::nat::response_dest`].
    fn upstream(&self, bytes: Vec<u8>) -> Transmit {
        Transmit {
            proto: self.source.proto,
            local: self.source.local,
            dest: self.up,
            bytes,
        }
    }

    fn local_response(&self, status: u16, extra: &[(&str, &str)]) -> Vec<u8> {
        let reason = if status == 403 && self.trunk_rejected {
            TRUNK_REJECTED
        } else {
            reply::reason(status)
        };
        match &self.msg {
            Some(msg) => reply::response(msg, self.source.remote, status, reason, extra),
            // Released ([`ProxyTxn::compact`]): `conclude`, the only caller, returns first.
            None => Vec::new(),
        }
    }

    /// The CSeq number of the request as the caller sent it: responses go upstream with it,
    /// also those to a trunk's re-send (CSeq + 1) or to an in-dialog request sent on with the
    /// dialog's offset.
    fn caller_cseq(&self) -> Option<u32> {
        self.caller_cseq
    }

    /// Cancels every pending branch (RFC 3261 §16.10): CANCEL to those with a provisional;
    /// those without one are cancelled when it arrives, or end as 487 if they never answer.
    fn cancel_pending(&mut self, now: Instant) {
        let pending: Vec<(usize, bool)> = self.rc.pending().collect();
        for (idx, provisional) in pending {
            // The response context counts the provisionals that go upstream; a 100 (hop by
            // hop) also lets the CANCEL go (RFC 3261 §9.1).
            let provisional = provisional
                || self.branches.get(idx).is_some_and(
                    |b| matches!(&b.leg, Leg::Sent { txn, .. } if txn.got_provisional()),
                );
            if provisional {
                self.send_cancel(idx, now);
            } else if let Some(b) = self.branches.get_mut(idx) {
                b.cancel_pending = true;
                self.rc.on_local_final(idx, 487);
            }
        }
    }

    /// Starts a CANCEL client transaction on branch `idx` (once).
    fn send_cancel(&mut self, idx: usize, now: Instant) {
        // RFC 3261 §9.1: a non-INVITE is never cancelled; it ends by its final or Timer F.
        if !self.invite {
            return;
        }
        let b = &mut self.branches[idx];
        if b.cancel.is_some() {
            return;
        }
        let Leg::Sent { txn, key: sent } = &mut b.leg else {
            return;
        };
        // RFC 3261 §9.1: once cancelled, the INVITE waits 64·T1 at most for its final.
        txn.on_cancel(now);
        let Some(bytes) = txn.cancel_request() else {
            return;
        };
        let (_, outbound) = self.ctx.sides(self.source, b.hop.proto);
        // The branch of the INVITE sent last (a trunk's re-send has its own).
        let key = TxnKey::new(sent.branch(), &forward::hostport(outbound), "CANCEL");
        self.events.push_back(Event::Bind {
            key: key.clone(),
            idx,
            cancel: true,
        });
        let c = ClientTxn::new(
            Kind::NonInvite,
            bytes,
            b.hop.proto.is_reliable(),
            self.ctx.timers,
            now,
        );
        b.cancel = Some(Box::new((c, key)));
    }
}

/// A downstream response with our Via removed (and the relay's SDP), ready to go upstream
/// with the caller's CSeq number `cseq`; `None` when no Via would be left (the response was
/// meant for us, RFC 3261 §16.7 step 3).
fn upstream_copy(resp: &Message, body: Option<Vec<u8>>, cseq: Option<u32>) -> Option<Vec<u8>> {
    upstream_copy_with(resp, body, &[], cseq)
}

/// [`upstream_copy`], adding `challenges` (other branches' challenges, RFC 3261 §16.7 step 7)
/// at the end of the header section, values unmodified.
fn upstream_copy_with(
    resp: &Message,
    body: Option<Vec<u8>>,
    challenges: &[Challenge],
    cseq: Option<u32>,
) -> Option<Vec<u8>> {
    if resp.via_count().ok()? < 2 {
        return None;
    }
    let mut rw = crate::sip::Rewrite::new(resp);
    rw.pop_via().ok()?;
    if let (Some(seq), Ok(theirs)) = (cseq, resp.cseq())
        && theirs.seq != seq
    {
        rw.set_cseq(seq);
    }
    if let Some(body) = body {
        rw.replace_body(body);
    }
    for c in challenges {
        rw.insert_header(None, c.name.as_str(), &c.value);
    }
    Some(rw.finish())
}

/// Whether a branch of an initial INVITE is relayed: `[[route]].media` / `media.mode`, where
/// `nat` means the caller or this callee is behind NAT (the callee's Contact is not where it
/// registered from).
pub fn relay_decision(mode: MediaMode, caller_nated: bool, hop: &Hop) -> bool {
    match mode {
        MediaMode::Always => true,
        MediaMode::Never => false,
        MediaMode::Nat => caller_nated || hop.callee_nated(),
    }
}

/// Queues a media step. The queue starts small: an op is a quarter kilobyte, and a deque's
/// first growth (four) would cross glibc's 1 KB fast-path limit (issue #15).
fn push_media(queue: &mut VecDeque<MediaOp>, op: MediaOp) {
    if queue.capacity() == 0 {
        queue.reserve_exact(2);
    }
    queue.push_back(op);
}
