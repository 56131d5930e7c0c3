//! Client transactions: the proxy's side of a forwarded request (RFC 3261 §17.1).
//!
//! - INVITE (§17.1.1, with RFC 6026 §8.4): Calling → Proceeding → Completed (non-2xx final,
//!   ACKed here, §17.1.1.3) or Accepted (2xx, whose ACK is end-to-end) → Terminated. Timer A
//!   retransmits over UDP (T1, doubling, §17.1.1.2); Timer B (64·T1) bounds Calling only;
//!   Timer C (`fr_inv`, §16.6 step 11) bounds the whole wait and is reset by every provisional
//!   but 100 (§16.7 step 2); Timer D (≥ 32 s on UDP, 0 on reliable) absorbs retransmitted
//!   finals; Timer M (64·T1, RFC 6026 §8.4) passes up retransmitted 2xx.
//! - non-INVITE (§17.1.2): Trying → Proceeding → Completed → Terminated. Timer E retransmits
//!   over UDP (T1 doubling to T2, then T2 once a provisional arrived, §17.1.2.2); Timer F
//!   (`fr`) bounds the wait; Timer K (T4 on UDP, 0 on reliable) absorbs retransmitted finals.
//!
//! Also the two requests a proxy builds for a client transaction rather than forwards: the ACK
//! for a non-2xx final ([`ack_for`], §17.1.1.3) and the CANCEL ([`cancel_for`], §9.1).
//!
//! Each machine makes its transitions in one `match (state, event)`, listing every pair.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::{Class, Deadlines, Kind, Timers};
use crate::sip::{Framing, HeaderName, Message};

/// What the driver must do for a client transaction, drained with
/// [`ClientTxn::poll_action`] in order.
#[derive(Debug, Clone)]
pub enum ClientAction {
    /// Send these bytes to the branch destination (the request, a retransmission, or the
    /// hop-by-hop ACK for a non-2xx final).
    Send(Vec<u8>),
    /// Pass this response up to the core: every provisional (RFC 3261 §17.1.1.2, §17.1.2.2:
    /// retransmitted reliable provisionals and the periodic 1xx of §13.3.1.1 must travel on),
    /// the first copy of a final, and for INVITE every 2xx, including retransmissions in
    /// Accepted (RFC 6026 §8.4).
    PassUp(Message),
    /// Timer B, F or C fired without a final response: the core answers 408 upstream
    /// (RFC 3261 §16.8) and, for INVITE after a provisional, sends CANCEL. Reported at most
    /// once, and never together with [`ClientAction::TransportError`].
    Timeout,
    /// Transport error reported by the core via [`ClientTxn::on_transport_error`] before a
    /// final response: treat as 503 (RFC 3261 §8.1.3.1, §17.1.4).
    TransportError,
    /// Done; remove from the table. Always the last action.
    Terminated,
}

/// The states of RFC 3261 §17.1.1 (INVITE: `Calling`, `Proceeding`, `Completed`, `Accepted`
/// of RFC 6026, `Terminated`) and §17.1.2 (non-INVITE: `Trying`, `Proceeding`, `Completed`,
/// `Terminated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// INVITE sent, no response yet.
    Calling,
    /// Non-INVITE sent, no response yet.
    Trying,
    /// A provisional response arrived.
    Proceeding,
    /// A non-2xx final (INVITE) or any final (non-INVITE) arrived; retransmissions of it are
    /// absorbed (and ACKed, for INVITE).
    Completed,
    /// A 2xx to an INVITE arrived; further 2xx are passed up (RFC 6026 §8.4).
    Accepted,
    /// Done.
    Terminated,
}

/// A client transaction (RFC 3261 §17.1): created when the proxy forwards a request, fed with
/// the responses that match it ([`super::client_key`]), its timers and transport errors.
#[derive(Debug)]
pub struct ClientTxn {
    common: Common,
    machine: Machine,
}

/// What both machines share.
#[derive(Debug)]
struct Common {
    /// The request exactly as forwarded. Kept as bytes: it is parsed again only to build an
    /// ACK for a non-2xx final or a CANCEL, so a forwarded request costs no parse here.
    request: Vec<u8>,
    /// The ACK for our non-2xx final, built once (its retransmissions are ACKed again).
    ack: Option<Vec<u8>>,
    reliable: bool,
    timers: Timers,
    got_provisional: bool,
    /// Timeout or TransportError has been reported (only one of them, once).
    gave_up: bool,
    actions: VecDeque<ClientAction>,
}

impl Common {
    fn send_request(&mut self) {
        self.actions
            .push_back(ClientAction::Send(self.request.clone()));
    }

    /// The ACK for a non-2xx final (RFC 3261 §17.1.1.3); `None` if our own request no longer
    /// parses (it always does: we built it).
    fn ack(&mut self, resp: &Message) -> Option<Vec<u8>> {
        if self.ack.is_none() {
            let req = Message::parse(&self.request, Framing::Datagram).ok()?;
            self.ack = Some(ack_for(&req, resp));
        }
        self.ack.clone()
    }

    fn give_up(&mut self, why: ClientAction) {
        if !self.gave_up {
            self.gave_up = true;
            self.actions.push_back(why);
        }
    }
}

#[derive(Debug)]
enum Machine {
    Invite(InviteClient),
    NonInvite(NonInviteClient),
}

impl ClientTxn {
    /// `request` is the message exactly as forwarded (our Via on top). Queues `Send(request)`
    /// and arms the first timers.
    pub fn new(kind: Kind, request: Vec<u8>, reliable: bool, timers: Timers, now: Instant) -> Self {
        let mut common = Common {
            request,
            ack: None,
            reliable,
            timers,
            got_provisional: false,
            gave_up: false,
            actions: VecDeque::new(),
        };
        common.send_request();
        let machine = match kind {
            Kind::Invite => Machine::Invite(InviteClient::start(&common, now)),
            Kind::NonInvite => Machine::NonInvite(NonInviteClient::start(&common, now)),
        };
        Self { common, machine }
    }

    /// A response matching this transaction arrived. Anything that is not a response is
    /// ignored.
    pub fn on_response(&mut self, resp: Message, now: Instant) {
        let Some(class) = resp.status().and_then(Class::of) else {
            return;
        };
        match &mut self.machine {
            Machine::Invite(m) => {
                m.handle(&mut self.common, InviteEvent::Response(class, resp), now)
            }
            Machine::NonInvite(m) => {
                m.handle(&mut self.common, NonInviteEvent::Response(class, resp), now)
            }
        }
    }

    /// Fires every timer due at or before `now`, in deadline order. Timers re-armed by a
    /// firing count from `now`, so a late wakeup retransmits once, not in a burst.
    pub fn on_timer(&mut self, now: Instant) {
        match &mut self.machine {
            Machine::Invite(m) => {
                while let Some(t) = m.armed.pop_due(now) {
                    m.handle(&mut self.common, InviteEvent::Timer(t), now);
                }
            }
            Machine::NonInvite(m) => {
                while let Some(t) = m.armed.pop_due(now) {
                    m.handle(&mut self.common, NonInviteEvent::Timer(t), now);
                }
            }
        }
    }

    /// The transport could not send for this transaction (RFC 3261 §17.1.4): before a final
    /// response this reports [`ClientAction::TransportError`] and terminates.
    pub fn on_transport_error(&mut self, now: Instant) {
        match &mut self.machine {
            Machine::Invite(m) => m.handle(&mut self.common, InviteEvent::TransportError, now),
            Machine::NonInvite(m) => {
                m.handle(&mut self.common, NonInviteEvent::TransportError, now)
            }
        }
    }

    /// The core sent (or, before any provisional, decided to send) a CANCEL for this INVITE.
    /// RFC 3261 §9.1: if no final response arrives within 64·T1 of the CANCEL, the INVITE is
    /// considered cancelled, so Timer C is cut to 64·T1 (a Timeout is still reported if that
    /// happens, once). Provisionals no longer restart Timer C. No effect on non-INVITE
    /// transactions, which are not cancelled (§9.1) and end by their final or Timer F.
    pub fn on_cancel(&mut self, now: Instant) {
        match &mut self.machine {
            Machine::Invite(m) => m.handle(&mut self.common, InviteEvent::Cancel, now),
            // RFC 3261 §9.1: CANCEL is for INVITE; a non-INVITE runs its course.
            Machine::NonInvite(_) => {}
        }
    }

    /// The next action to execute, in order.
    pub fn poll_action(&mut self) -> Option<ClientAction> {
        self.common.actions.pop_front()
    }

    /// The earliest armed timer; `None` once terminated.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.machine {
            Machine::Invite(m) => m.armed.earliest(),
            Machine::NonInvite(m) => m.armed.earliest(),
        }
    }

    /// The RFC state.
    pub fn state(&self) -> ClientState {
        match &self.machine {
            Machine::Invite(m) => match m.state {
                InviteState::Calling => ClientState::Calling,
                InviteState::Proceeding => ClientState::Proceeding,
                InviteState::Completed => ClientState::Completed,
                InviteState::Accepted => ClientState::Accepted,
                InviteState::Terminated => ClientState::Terminated,
            },
            Machine::NonInvite(m) => match m.state {
                NonInviteState::Trying => ClientState::Trying,
                NonInviteState::Proceeding => ClientState::Proceeding,
                NonInviteState::Completed => ClientState::Completed,
                NonInviteState::Terminated => ClientState::Terminated,
            },
        }
    }

    /// The request as forwarded.
    pub fn request(&self) -> &[u8] {
        &self.common.request
    }

    /// The CANCEL for this request (RFC 3261 §9.1); `None` if the request does not parse.
    pub fn cancel_request(&self) -> Option<Vec<u8>> {
        let req = Message::parse(&self.common.request, Framing::Datagram).ok()?;
        Some(cancel_for(&req))
    }

    /// The ACK built for our non-2xx final (INVITE, Completed): what a retransmission of that
    /// final gets again.
    pub fn ack(&self) -> Option<&[u8]> {
        self.common.ack.as_deref()
    }

    /// True once a provisional was received (a CANCEL may then be sent, RFC 3261 §9.1).
    pub fn got_provisional(&self) -> bool {
        self.common.got_provisional
    }

    /// Once a final has arrived (Completed, Accepted, Terminated), frees what only a pending
    /// transaction needs: the request (nothing is retransmitted or cancelled any more; the
    /// ACK for a retransmitted non-2xx final was built with the first one) and the spare room
    /// of the action queue. What is left absorbs retransmissions until Timer D/K/M. Call it
    /// with the actions drained; before a final it does nothing.
    pub fn compact(&mut self) {
        if !matches!(
            self.state(),
            ClientState::Completed | ClientState::Accepted | ClientState::Terminated
        ) {
            return;
        }
        self.common.request = Vec::new();
        if let Some(ack) = &mut self.common.ack {
            ack.shrink_to_fit();
        }
        self.common.actions.shrink_to_fit();
    }
}

// ---- INVITE (RFC 3261 §17.1.1, RFC 6026 §8.4, proxy Timer C of §16) ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InviteState {
    Calling,
    Proceeding,
    Completed,
    Accepted,
    Terminated,
}

/// The timers of an INVITE client transaction; the order breaks ties between equal
/// deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum InviteTimer {
    /// Request retransmission (UDP only): T1, doubling.
    A,
    /// Transaction timeout in Calling: 64·T1.
    B,
    /// Proxy final-response timeout (`fr_inv`), reset by provisionals but 100.
    C,
    /// Wait for retransmitted finals in Completed: ≥ 32 s on UDP.
    D,
    /// Wait for retransmitted 2xx in Accepted: 64·T1.
    M,
}

#[derive(Debug)]
enum InviteEvent {
    Response(Class, Message),
    Timer(InviteTimer),
    TransportError,
    Cancel,
}

#[derive(Debug)]
struct InviteClient {
    state: InviteState,
    armed: Deadlines<InviteTimer>,
    /// The current Timer A interval.
    timer_a: Duration,
    /// A CANCEL is sent or due (the core's `on_cancel`, or Timer C after a provisional):
    /// provisionals no longer reset Timer C, which now bounds the wait for the final at 64·T1.
    cancelling: bool,
}

impl InviteClient {
    fn start(c: &Common, now: Instant) -> Self {
        let t = c.timers;
        let mut armed = Deadlines::new();
        // RFC 3261 §17.1.1.2: Timer A only for unreliable transports; Timer B always.
        if !c.reliable {
            armed.set(InviteTimer::A, now + t.t1);
        }
        armed.set(InviteTimer::B, now + t.t1_x64());
        // §16.6 step 11: the proxy starts Timer C when it forwards an INVITE.
        armed.set(InviteTimer::C, now + t.fr_inv);
        Self {
            state: InviteState::Calling,
            armed,
            timer_a: t.t1,
            cancelling: false,
        }
    }

    /// Cuts Timer C to `at` unless it already fires earlier.
    fn cancel_deadline(&mut self, at: Instant) {
        if self.armed.get(InviteTimer::C).is_none_or(|c| at < c) {
            self.armed.set(InviteTimer::C, at);
        }
    }

    fn handle(&mut self, c: &mut Common, event: InviteEvent, now: Instant) {
        use ClientAction::{PassUp, Send};
        use InviteEvent as E;
        use InviteState as S;
        use InviteTimer as T;
        let t = c.timers;
        let before = self.state;
        self.state = match (before, event) {
            // §17.1.1.2: any 1xx moves Calling to Proceeding; retransmissions stop and Timer B
            // no longer applies: from here only Timer C bounds the wait.
            (S::Calling | S::Proceeding, E::Response(Class::Provisional, resp)) => {
                c.got_provisional = true;
                self.armed.clear(T::A);
                self.armed.clear(T::B);
                if self.cancelling {
                    // §9.1: the CANCEL goes out now, at the latest; the final must follow
                    // within 64·T1.
                    self.cancel_deadline(now + t.t1_x64());
                } else if resp.status() != Some(100) {
                    // §16.7 step 2: a provisional other than 100 resets Timer C.
                    self.armed.set(T::C, now + t.fr_inv);
                }
                c.actions.push_back(PassUp(resp));
                S::Proceeding
            }
            // RFC 6026 §8.4: a 2xx moves to Accepted (not Terminated, as RFC 3261 had it) so
            // that retransmitted 2xx still reach the core, until Timer M.
            (S::Calling | S::Proceeding, E::Response(Class::Success, resp)) => {
                self.armed.clear_all();
                self.armed.set(T::M, now + t.t1_x64());
                c.actions.push_back(PassUp(resp));
                S::Accepted
            }
            // §17.1.1.2: a 300-699 is passed up and ACKed by the transaction (§17.1.1.3);
            // Completed absorbs its retransmissions for Timer D (0 on reliable transports).
            (S::Calling | S::Proceeding, E::Response(Class::Failure, resp)) => {
                self.armed.clear_all();
                let ack = c.ack(&resp);
                c.actions.push_back(PassUp(resp));
                c.actions.extend(ack.map(Send));
                if c.reliable {
                    S::Terminated
                } else {
                    self.armed.set(T::D, now + timer_d(&t));
                    S::Completed
                }
            }
            // §17.1.1.2: a retransmitted final is ACKed again, not passed up.
            (S::Completed, E::Response(Class::Failure, resp)) => {
                let ack = c.ack(&resp);
                c.actions.extend(ack.map(Send));
                S::Completed
            }
            // RFC 6026 §8.4: every 2xx goes up (a proxy forwards every 2xx, §16.7 step 5);
            // one arriving after a non-2xx final is the core's to judge.
            (S::Completed | S::Accepted, E::Response(Class::Success, resp)) => {
                c.actions.push_back(PassUp(resp));
                before
            }
            // Late provisionals after a final, and non-2xx in Accepted, are absorbed.
            (S::Completed, E::Response(Class::Provisional, _))
            | (S::Accepted, E::Response(Class::Provisional | Class::Failure, _))
            | (
                S::Terminated,
                E::Response(Class::Provisional | Class::Success | Class::Failure, _),
            ) => before,

            // §17.1.1.2: retransmit and double Timer A (no T2 cap for INVITE requests).
            (S::Calling, E::Timer(T::A)) => {
                c.send_request();
                self.timer_a *= 2;
                self.armed.set(T::A, now + self.timer_a);
                S::Calling
            }
            // §17.1.1.2: Timer B in Calling: report the timeout.
            (S::Calling, E::Timer(T::B)) => {
                c.give_up(ClientAction::Timeout);
                S::Terminated
            }
            // §16.8: Timer C before any provisional: behave as if a 408 had arrived.
            (S::Calling, E::Timer(T::C)) => {
                c.give_up(ClientAction::Timeout);
                S::Terminated
            }
            (S::Proceeding, E::Timer(T::C)) => {
                c.give_up(ClientAction::Timeout);
                if self.cancelling {
                    // §9.1: no final 64·T1 after the CANCEL: the INVITE is cancelled.
                    S::Terminated
                } else {
                    // §16.8: after a provisional the core sends CANCEL; stay to ACK the 487
                    // it provokes, for 64·T1 at most (§9.1).
                    self.cancelling = true;
                    self.armed.set(T::C, now + t.t1_x64());
                    S::Proceeding
                }
            }
            // §17.1.1.2 Timer D; RFC 6026 §8.4 Timer M.
            (S::Completed, E::Timer(T::D)) | (S::Accepted, E::Timer(T::M)) => S::Terminated,
            // Each timer is disarmed on leaving the states that arm it, so these never fire.
            (S::Calling, E::Timer(T::D | T::M))
            | (S::Proceeding, E::Timer(T::A | T::B | T::D | T::M))
            | (S::Completed, E::Timer(T::A | T::B | T::C | T::M))
            | (S::Accepted, E::Timer(T::A | T::B | T::C | T::D))
            | (S::Terminated, E::Timer(T::A | T::B | T::C | T::D | T::M)) => before,

            // §17.1.4: a transport failure before the final is reported (the core treats it
            // as a 503, §8.1.3.1) and ends the transaction.
            (S::Calling | S::Proceeding, E::TransportError) => {
                c.give_up(ClientAction::TransportError);
                S::Terminated
            }
            // The ACK could not be sent (§17.1.4); the final is already with the core.
            (S::Completed, E::TransportError) => S::Terminated,
            // Nothing of ours is in flight in Accepted: keep passing 2xx up.
            (S::Accepted | S::Terminated, E::TransportError) => before,

            // §9.1: no CANCEL before a provisional; Timer B still bounds Calling.
            (S::Calling, E::Cancel) => {
                self.cancelling = true;
                S::Calling
            }
            (S::Proceeding, E::Cancel) => {
                self.cancelling = true;
                self.cancel_deadline(now + t.t1_x64());
                S::Proceeding
            }
            // A final already arrived: nothing to cancel.
            (S::Completed | S::Accepted | S::Terminated, E::Cancel) => before,
        };
        if self.state == S::Terminated && before != S::Terminated {
            self.armed.clear_all();
            c.actions.push_back(ClientAction::Terminated);
        }
    }
}

/// RFC 3261 §17.1.1.2: Timer D is at least 32 s on unreliable transports (it covers the
/// server's Timer G/H retransmissions, 64·T1 of the server's T1).
fn timer_d(t: &Timers) -> Duration {
    t.t1_x64().max(Duration::from_secs(32))
}

// ---- non-INVITE (RFC 3261 §17.1.2) ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonInviteState {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

/// The timers of a non-INVITE client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum NonInviteTimer {
    /// Request retransmission (UDP only): T1 doubling to T2; T2 in Proceeding.
    E,
    /// Transaction timeout: `fr`.
    F,
    /// Wait for retransmitted finals in Completed: T4 on UDP.
    K,
}

#[derive(Debug)]
enum NonInviteEvent {
    Response(Class, Message),
    Timer(NonInviteTimer),
    TransportError,
}

#[derive(Debug)]
struct NonInviteClient {
    state: NonInviteState,
    armed: Deadlines<NonInviteTimer>,
    /// The current Timer E interval.
    timer_e: Duration,
}

impl NonInviteClient {
    fn start(c: &Common, now: Instant) -> Self {
        let t = c.timers;
        let mut armed = Deadlines::new();
        // RFC 3261 §17.1.2.2: Timer E only for unreliable transports; Timer F always (here
        // Kamailio's fr_timer rather than 64·T1).
        if !c.reliable {
            armed.set(NonInviteTimer::E, now + t.t1);
        }
        armed.set(NonInviteTimer::F, now + t.fr);
        Self {
            state: NonInviteState::Trying,
            armed,
            timer_e: t.t1,
        }
    }

    fn handle(&mut self, c: &mut Common, event: NonInviteEvent, now: Instant) {
        use ClientAction::PassUp;
        use NonInviteEvent as E;
        use NonInviteState as S;
        use NonInviteTimer as T;
        let t = c.timers;
        let before = self.state;
        self.state = match (before, event) {
            // §17.1.2.2: provisionals are passed up and move Trying to Proceeding; Timer E
            // keeps its current deadline and continues at T2.
            (S::Trying | S::Proceeding, E::Response(Class::Provisional, resp)) => {
                c.got_provisional = true;
                c.actions.push_back(PassUp(resp));
                S::Proceeding
            }
            // §17.1.2.2: a final is passed up; Completed absorbs its retransmissions for
            // Timer K (T4 on UDP, 0 on reliable transports).
            (S::Trying | S::Proceeding, E::Response(Class::Success | Class::Failure, resp)) => {
                self.armed.clear_all();
                c.actions.push_back(PassUp(resp));
                if c.reliable {
                    S::Terminated
                } else {
                    self.armed.set(T::K, now + t.t4);
                    S::Completed
                }
            }
            (
                S::Completed | S::Terminated,
                E::Response(Class::Provisional | Class::Success | Class::Failure, _),
            ) => before,

            // §17.1.2.2: Timer E doubles up to T2 in Trying...
            (S::Trying, E::Timer(T::E)) => {
                c.send_request();
                self.timer_e = (self.timer_e * 2).min(t.t2);
                self.armed.set(T::E, now + self.timer_e);
                S::Trying
            }
            // ... and is T2 in Proceeding.
            (S::Proceeding, E::Timer(T::E)) => {
                c.send_request();
                self.timer_e = t.t2;
                self.armed.set(T::E, now + self.timer_e);
                S::Proceeding
            }
            // §17.1.2.2: Timer F: report the timeout (the core answers 408, §16.8).
            (S::Trying | S::Proceeding, E::Timer(T::F)) => {
                c.give_up(ClientAction::Timeout);
                S::Terminated
            }
            (S::Completed, E::Timer(T::K)) => S::Terminated,
            // Disarmed on leaving the states that arm them.
            (S::Trying | S::Proceeding, E::Timer(T::K))
            | (S::Completed, E::Timer(T::E | T::F))
            | (S::Terminated, E::Timer(T::E | T::F | T::K)) => before,

            // §17.1.4.
            (S::Trying | S::Proceeding, E::TransportError) => {
                c.give_up(ClientAction::TransportError);
                S::Terminated
            }
            // Completed sends nothing, so the error is not about this transaction.
            (S::Completed | S::Terminated, E::TransportError) => before,
        };
        if self.state == S::Terminated && before != S::Terminated {
            self.armed.clear_all();
            c.actions.push_back(ClientAction::Terminated);
        }
    }
}

// ---- requests built by the transaction layer ----

/// The ACK for a non-2xx final response (RFC 3261 §17.1.1.3): R-URI, Call-ID, From, the
/// request's top Via (same branch), To with the response's tag (the response's To, as the RFC
/// requires), CSeq number with method ACK, Route headers from the request, Max-Forwards 70,
/// Content-Length 0.
///
/// `request` is a request the proxy forwarded, so it has those headers; one that is missing
/// is left out.
pub fn ack_for(request: &Message, response: &Message) -> Vec<u8> {
    let to_source = if response.header(HeaderName::To).is_some() {
        response
    } else {
        request
    };
    build_hop_request("ACK", request, to_source)
}

/// The CANCEL for a pending request (RFC 3261 §9.1): same R-URI, Call-ID, To, From, CSeq
/// number (method CANCEL), only the request's top Via, its Route headers, Max-Forwards 70,
/// Content-Length 0.
pub fn cancel_for(request: &Message) -> Vec<u8> {
    build_hop_request("CANCEL", request, request)
}

/// A request that shares its transaction identity with `request`: start line and top Via
/// from it, To from `to_source`, header values copied byte for byte.
fn build_hop_request(method: &str, request: &Message, to_source: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    if let Some(uri) = request.request_uri_span() {
        out.extend_from_slice(request.bytes_at(uri));
    }
    out.extend_from_slice(b" SIP/2.0\r\n");
    // §9.1, §17.1.1.3: a single Via, equal to the top Via of the request.
    if let Ok(via) = request.top_via() {
        line(&mut out, "Via", request.bytes_at(via.span.clone()));
    }
    // §9.1, §17.1.1.3: the Route headers of the request.
    for h in request.headers_named(HeaderName::Route) {
        line(&mut out, "Route", request.bytes_at(h.value.clone()));
    }
    line(&mut out, "Max-Forwards", b"70");
    copy(&mut out, request, HeaderName::From);
    copy(&mut out, to_source, HeaderName::To);
    copy(&mut out, request, HeaderName::CallId);
    let mut cseq = cseq_number(request);
    cseq.push(b' ');
    cseq.extend_from_slice(method.as_bytes());
    line(&mut out, "CSeq", &cseq);
    line(&mut out, "Content-Length", b"0");
    out.extend_from_slice(b"\r\n");
    out
}

fn line(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn copy(out: &mut Vec<u8>, from: &Message, name: HeaderName) {
    if let Some(h) = from.header(name) {
        line(out, name.as_str(), from.bytes_at(h.value.clone()));
    }
}

/// The numeric part of the request's CSeq (§9.1, §17.1.1.3: the same number).
fn cseq_number(request: &Message) -> Vec<u8> {
    match request.cseq() {
        Ok(cseq) => cseq.seq.to_string().into_bytes(),
        Err(_) => request
            .header(HeaderName::CSeq)
            .map(|h| {
                request
                    .bytes_at(h.value.clone())
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .copied()
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::sip::Framing;
    use crate::transaction::tests::{forwarded, response, t0};

    fn drain(txn: &mut ClientTxn) -> Vec<ClientAction> {
        std::iter::from_fn(|| txn.poll_action()).collect()
    }

    fn labels(actions: &[ClientAction]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                ClientAction::Send(b) => {
                    let m = Message::parse(b, Framing::Datagram).unwrap();
                    format!("send {}", m.method().unwrap())
                }
                ClientAction::PassUp(m) => format!("up {}", m.status().unwrap()),
                ClientAction::Timeout => "timeout".into(),
                ClientAction::TransportError => "transport error".into(),
                ClientAction::Terminated => "terminated".into(),
            })
            .collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn invite_txn(reliable: bool) -> (ClientTxn, tokio::time::Instant) {
        let t0 = t0();
        let req = forwarded("INVITE", if reliable { "TCP" } else { "UDP" });
        let mut txn = ClientTxn::new(
            Kind::Invite,
            req.as_bytes().to_vec(),
            reliable,
            Timers::default(),
            t0,
        );
        assert_eq!(labels(&drain(&mut txn)), ["send INVITE"]);
        (txn, t0)
    }

    fn resp(txn: &ClientTxn, status: u16) -> Message {
        let req = Message::parse(txn.request(), Framing::Datagram).unwrap();
        Message::parse(&response(&req, status), Framing::Datagram).unwrap()
    }

    #[test]
    fn timer_a_is_not_capped_for_invite() {
        let (mut txn, t0) = invite_txn(false);
        assert_eq!(txn.state(), ClientState::Calling);
        let mut fired = Vec::new();
        while let Some(at) = txn.poll_timeout() {
            txn.on_timer(at);
            for a in labels(&drain(&mut txn)) {
                fired.push(((at - t0).as_millis(), a));
            }
        }
        let want: Vec<(u128, String)> = [500, 1500, 3500, 7500, 15500, 31500]
            .into_iter()
            .map(|t| (t, "send INVITE".to_owned()))
            .chain([
                (32000, "timeout".to_owned()),
                (32000, "terminated".to_owned()),
            ])
            .collect();
        assert_eq!(fired, want);
        assert_eq!(txn.state(), ClientState::Terminated);
    }

    #[test]
    fn late_wakeup_fires_due_timers_once_in_order() {
        let (mut txn, t0) = invite_txn(false);
        // Asleep until well past Timer B: one retransmission, then the timeout.
        txn.on_timer(t0 + ms(40_000));
        assert_eq!(
            labels(&drain(&mut txn)),
            ["send INVITE", "timeout", "terminated"]
        );
        assert_eq!(txn.poll_timeout(), None);
    }

    #[test]
    fn timer_c_fires_in_calling_when_shorter_than_b() {
        let t0 = t0();
        let timers = Timers {
            fr_inv: Duration::from_secs(10),
            ..Timers::default()
        };
        let mut txn = ClientTxn::new(
            Kind::Invite,
            forwarded("INVITE", "TCP").as_bytes().to_vec(),
            true,
            timers,
            t0,
        );
        drain(&mut txn);
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(10_000)));
        txn.on_timer(t0 + ms(10_000));
        assert_eq!(labels(&drain(&mut txn)), ["timeout", "terminated"]);
    }

    #[test]
    fn trying_100_stops_timer_b_but_does_not_reset_timer_c() {
        let (mut txn, t0) = invite_txn(false);
        let r = resp(&txn, 100);
        txn.on_response(r, t0 + ms(100));
        assert!(txn.got_provisional());
        assert_eq!(labels(&drain(&mut txn)), ["up 100"]);
        // Timer C still counts from the INVITE (§16.7 step 2 resets it on 101-199 only).
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(120_000)));
        let r = resp(&txn, 183);
        txn.on_response(r, t0 + ms(1000));
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(121_000)));
    }

    #[test]
    fn every_provisional_is_passed_up() {
        let (mut txn, t0) = invite_txn(false);
        for (i, status) in [180, 180, 183, 183].into_iter().enumerate() {
            let r = resp(&txn, status);
            txn.on_response(r, t0 + ms(100 * i as u64));
        }
        assert_eq!(
            labels(&drain(&mut txn)),
            ["up 180", "up 180", "up 183", "up 183"]
        );
    }

    #[test]
    fn cancel_cuts_timer_c_to_64_t1() {
        let (mut txn, t0) = invite_txn(false);
        let r = resp(&txn, 180);
        txn.on_response(r, t0 + ms(1000));
        drain(&mut txn);
        txn.on_cancel(t0 + ms(2000));
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(34_000)));
        // Provisionals no longer extend it.
        let r = resp(&txn, 180);
        txn.on_response(r, t0 + ms(3000));
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(34_000)));
        drain(&mut txn);
        // The 487 the CANCEL provokes is ACKed and passed up.
        let r = resp(&txn, 487);
        txn.on_response(r, t0 + ms(4000));
        assert_eq!(labels(&drain(&mut txn)), ["up 487", "send ACK"]);
        assert_eq!(txn.state(), ClientState::Completed);
    }

    #[test]
    fn cancel_without_final_times_out_once() {
        let (mut txn, t0) = invite_txn(false);
        let r = resp(&txn, 180);
        txn.on_response(r, t0 + ms(1000));
        drain(&mut txn);
        txn.on_cancel(t0 + ms(2000));
        txn.on_timer(t0 + ms(34_000));
        assert_eq!(labels(&drain(&mut txn)), ["timeout", "terminated"]);
    }

    #[test]
    fn cancel_before_a_provisional_waits_for_it() {
        let (mut txn, t0) = invite_txn(false);
        txn.on_cancel(t0 + ms(100));
        assert_eq!(txn.state(), ClientState::Calling);
        // Still retransmitting: the CANCEL may not be sent yet (§9.1).
        txn.on_timer(t0 + ms(500));
        assert_eq!(labels(&drain(&mut txn)), ["send INVITE"]);
        let r = resp(&txn, 100);
        txn.on_response(r, t0 + ms(600));
        drain(&mut txn);
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(600 + 32_000)));
    }

    #[test]
    fn transport_error_before_and_after_the_final() {
        let (mut txn, t0) = invite_txn(false);
        txn.on_transport_error(t0 + ms(1));
        assert_eq!(labels(&drain(&mut txn)), ["transport error", "terminated"]);
        txn.on_transport_error(t0 + ms(2));
        assert!(drain(&mut txn).is_empty());

        // In Accepted, nothing of ours is in flight: the error is ignored.
        let (mut txn, t0) = invite_txn(false);
        let r = resp(&txn, 200);
        txn.on_response(r, t0 + ms(10));
        drain(&mut txn);
        txn.on_transport_error(t0 + ms(20));
        assert!(drain(&mut txn).is_empty());
        assert_eq!(txn.state(), ClientState::Accepted);

        // Non-INVITE in Trying.
        let mut txn = ClientTxn::new(
            Kind::NonInvite,
            forwarded("OPTIONS", "UDP").as_bytes().to_vec(),
            false,
            Timers::default(),
            t0,
        );
        drain(&mut txn);
        txn.on_transport_error(t0 + ms(5));
        assert_eq!(labels(&drain(&mut txn)), ["transport error", "terminated"]);
    }

    #[test]
    fn timeout_then_transport_error_reports_only_the_timeout() {
        let (mut txn, t0) = invite_txn(false);
        let r = resp(&txn, 180);
        txn.on_response(r, t0 + ms(1000));
        drain(&mut txn);
        txn.on_timer(t0 + ms(121_000));
        assert_eq!(labels(&drain(&mut txn)), ["timeout"]);
        assert_eq!(txn.state(), ClientState::Proceeding);
        txn.on_transport_error(t0 + ms(121_001));
        assert_eq!(labels(&drain(&mut txn)), ["terminated"]);
    }

    #[test]
    fn accepted_absorbs_non_2xx_and_passes_2xx() {
        let (mut txn, t0) = invite_txn(false);
        for (at, status) in [(10, 200), (20, 180), (30, 486), (40, 200)] {
            let r = resp(&txn, status);
            txn.on_response(r, t0 + ms(at));
        }
        assert_eq!(labels(&drain(&mut txn)), ["up 200", "up 200"]);
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(10 + 32_000)));
        txn.on_timer(t0 + ms(10 + 32_000));
        assert_eq!(labels(&drain(&mut txn)), ["terminated"]);
        // Terminated ignores everything.
        let r = resp(&txn, 200);
        txn.on_response(r, t0 + ms(40_000));
        txn.on_timer(t0 + ms(50_000));
        assert!(drain(&mut txn).is_empty());
    }

    #[test]
    fn reliable_invite_terminates_right_after_acking() {
        let (mut txn, t0) = invite_txn(true);
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(32_000)));
        let r = resp(&txn, 603);
        txn.on_response(r, t0 + ms(10));
        assert_eq!(
            labels(&drain(&mut txn)),
            ["up 603", "send ACK", "terminated"]
        );
    }

    #[test]
    fn non_invite_final_in_completed_is_absorbed() {
        let t0 = t0();
        let mut txn = ClientTxn::new(
            Kind::NonInvite,
            forwarded("REGISTER", "UDP").as_bytes().to_vec(),
            false,
            Timers::default(),
            t0,
        );
        drain(&mut txn);
        for at in [10, 20] {
            let r = resp(&txn, 401);
            txn.on_response(r, t0 + ms(at));
        }
        assert_eq!(labels(&drain(&mut txn)), ["up 401"]);
        assert_eq!(txn.state(), ClientState::Completed);
        // Timer K = T4.
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(5010)));
        txn.on_timer(t0 + ms(5010));
        assert_eq!(labels(&drain(&mut txn)), ["terminated"]);
        // on_cancel has no effect on non-INVITE.
        txn.on_cancel(t0 + ms(6000));
        assert!(drain(&mut txn).is_empty());
    }

    #[test]
    fn ack_for_non_2xx() {
        let req = forwarded("INVITE", "UDP");
        let resp = Message::parse(&response(&req, 486), Framing::Datagram).unwrap();
        let ack = Message::parse(&ack_for(&req, &resp), Framing::Datagram).unwrap();
        assert_eq!(ack.defect(), None);
        assert_eq!(ack.method(), Some("ACK"));
        assert_eq!(ack.request_uri(), req.request_uri());
        let vias = ack.vias().unwrap();
        assert_eq!(vias.len(), 1, "a single Via");
        assert_eq!(vias[0].branch(), req.top_via().unwrap().branch());
        assert_eq!(vias[0].host, "198.51.100.1");
        let cseq = ack.cseq().unwrap();
        assert_eq!((cseq.seq, cseq.method), (314159, "ACK"));
        let to_tag = resp.to().unwrap().tag().unwrap();
        assert_eq!(ack.to().unwrap().tag(), Some(to_tag));
        assert_eq!(ack.to().unwrap().uri, "sip:bob@example.com");
        assert_eq!(ack.from().unwrap().tag(), Some("a1"));
        assert_eq!(ack.call_id().unwrap(), req.call_id().unwrap());
        assert_eq!(ack.max_forwards().unwrap(), Some(70));
        let routes: Vec<_> = ack
            .route_set(HeaderName::Route)
            .unwrap()
            .iter()
            .map(|r| r.uri.to_owned())
            .collect();
        assert_eq!(
            routes,
            [
                "sip:edge2.example.net;lr",
                "sip:core.example.net;lr",
                "sip:last.example.net;lr"
            ]
        );
        assert!(ack.body().is_empty());
        assert_eq!(ack.header_str(HeaderName::ContentLength), Some("0"));
        // Nothing but what §17.1.1.3 lists.
        assert!(ack.header(HeaderName::Contact).is_none());
        assert!(ack.header(HeaderName::RecordRoute).is_none());
        // It opens the same transaction at the next hop as the INVITE did.
        assert_eq!(
            crate::transaction::server_key(&ack),
            crate::transaction::server_key(&req)
        );
    }

    #[test]
    fn cancel_for_pending_request() {
        let req = forwarded("INVITE", "UDP");
        let cancel = Message::parse(&cancel_for(&req), Framing::Datagram).unwrap();
        assert_eq!(cancel.defect(), None);
        assert_eq!(cancel.method(), Some("CANCEL"));
        assert_eq!(cancel.request_uri(), Some("sip:bob@192.0.2.20:5062"));
        let vias = cancel.vias().unwrap();
        assert_eq!(vias.len(), 1);
        assert_eq!(vias[0].branch(), Some("z9hG4bKp1a2b3"));
        let cseq = cancel.cseq().unwrap();
        assert_eq!((cseq.seq, cseq.method), (314159, "CANCEL"));
        // The To of the request, untagged.
        assert_eq!(cancel.to().unwrap().tag(), None);
        assert_eq!(cancel.from().unwrap().tag(), Some("a1"));
        assert_eq!(cancel.call_id().unwrap(), req.call_id().unwrap());
        assert_eq!(cancel.route_set(HeaderName::Route).unwrap().len(), 3);
        assert_eq!(cancel.max_forwards().unwrap(), Some(70));
        // The next hop finds the INVITE from it (§9.2).
        assert_eq!(
            crate::transaction::invite_key_for_cancel(&cancel),
            crate::transaction::server_key(&req)
        );
        assert_ne!(
            crate::transaction::server_key(&cancel),
            crate::transaction::server_key(&req)
        );
    }

    #[test]
    fn ack_and_cancel_without_route() {
        let req = Message::parse(
            b"INVITE sip:b@h SIP/2.0\r\nVia: SIP/2.0/TCP p;branch=z9hG4bKq, SIP/2.0/TCP u;branch=z9hG4bKu\r\n\
To: b <sip:b@h>\r\nFrom: <sip:a@h>;tag=9\r\nCall-ID: x\r\nCSeq: 7 INVITE\r\n\r\n",
            Framing::Stream,
        )
        .unwrap();
        let cancel = cancel_for(&req);
        assert_eq!(
            String::from_utf8(cancel).unwrap(),
            "CANCEL sip:b@h SIP/2.0\r\nVia: SIP/2.0/TCP p;branch=z9hG4bKq\r\nMax-Forwards: 70\r\n\
From: <sip:a@h>;tag=9\r\nTo: b <sip:b@h>\r\nCall-ID: x\r\nCSeq: 7 CANCEL\r\nContent-Length: 0\r\n\r\n"
        );
    }
}
