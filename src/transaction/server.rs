//! Server transactions: the proxy's side of a received request (RFC 3261 §17.2).
//!
//! - INVITE (§17.2.1, with RFC 6026 §8.5-§8.7): Proceeding → Completed (300-699, retransmitted
//!   by Timer G over UDP, T1 doubling to T2, until the ACK or Timer H = 64·T1) → Confirmed
//!   (Timer I = T4 on UDP, 0 on reliable) → Terminated; or Proceeding → Accepted (2xx; every
//!   later 2xx the core forwards is sent too) → Terminated after Timer L = 64·T1.
//! - non-INVITE (§17.2.2): Trying → Proceeding → Completed (Timer J = 64·T1 on UDP, 0 on
//!   reliable) → Terminated.
//!
//! Request retransmissions are absorbed: the last response is sent again where the RFC says
//! so (§17.2.1 Proceeding and Completed, §17.2.2 Proceeding and Completed), nothing otherwise.
//! The core computes where responses go (§18.2.2); the transaction only says what to send.
//!
//! Each machine makes its transitions in one `match (state, event)`, listing every pair.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::{Class, Deadlines, Kind, Timers};

/// What the driver must do for a server transaction, drained with
/// [`ServerTxn::poll_action`] in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAction {
    /// Send these bytes upstream (to the response target the core computes).
    Send(Vec<u8>),
    /// Timer H fired without ACK (the core may log it).
    AckTimeout,
    /// Done; remove from the table. Always the last action.
    Terminated,
}

/// The states of RFC 3261 §17.2.1 (INVITE: `Proceeding`, `Completed`, `Confirmed`, `Accepted`
/// of RFC 6026, `Terminated`) and §17.2.2 (non-INVITE: `Trying`, `Proceeding`, `Completed`,
/// `Terminated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Non-INVITE received, no response sent yet.
    Trying,
    /// A provisional was sent (or, for INVITE, the transaction was just created).
    Proceeding,
    /// A final was sent (INVITE: 300-699, waiting for the ACK).
    Completed,
    /// The ACK for a non-2xx final arrived; its retransmissions are absorbed.
    Confirmed,
    /// A 2xx to an INVITE was sent (RFC 6026 §8.5).
    Accepted,
    /// Done.
    Terminated,
}

/// A server transaction (RFC 3261 §17.2): created when a request arrives that matches no
/// existing transaction ([`super::server_key`]).
#[derive(Debug)]
pub struct ServerTxn {
    common: Common,
    machine: Machine,
}

#[derive(Debug)]
struct Common {
    reliable: bool,
    timers: Timers,
    /// The last response sent: what a request retransmission gets again.
    last: Option<Vec<u8>>,
    final_status: Option<u16>,
    actions: VecDeque<ServerAction>,
}

impl Common {
    fn send_last(&mut self) {
        if let Some(bytes) = &self.last {
            self.actions.push_back(ServerAction::Send(bytes.clone()));
        }
    }

    /// Sends a response and remembers it for request retransmissions.
    fn send(&mut self, bytes: Vec<u8>) {
        self.actions.push_back(ServerAction::Send(bytes.clone()));
        self.last = Some(bytes);
    }
}

#[derive(Debug)]
enum Machine {
    Invite(InviteServer),
    NonInvite(NonInviteServer),
}

impl ServerTxn {
    /// For an INVITE the core sends 100 Trying itself via [`Self::respond`]; the transaction
    /// starts in Proceeding (INVITE, §17.2.1) / Trying (non-INVITE, §17.2.2).
    pub fn new(kind: Kind, reliable: bool, timers: Timers, now: Instant) -> Self {
        let _ = now; // no timer runs before the first response
        let common = Common {
            reliable,
            timers,
            last: None,
            final_status: None,
            actions: VecDeque::new(),
        };
        let machine = match kind {
            Kind::Invite => Machine::Invite(InviteServer {
                state: InviteState::Proceeding,
                armed: Deadlines::new(),
                timer_g: timers.t1,
            }),
            Kind::NonInvite => Machine::NonInvite(NonInviteServer {
                state: NonInviteState::Trying,
                armed: Deadlines::new(),
            }),
        };
        Self { common, machine }
    }

    /// A retransmission of the request arrived: queue `Send(last response)` if there is one
    /// (Proceeding: the last provisional; Completed: the final). In Trying, Confirmed and
    /// Accepted it is absorbed.
    pub fn on_request_retransmission(&mut self, now: Instant) {
        match &mut self.machine {
            Machine::Invite(m) => m.handle(&mut self.common, InviteEvent::Retransmission, now),
            Machine::NonInvite(m) => {
                m.handle(&mut self.common, NonInviteEvent::Retransmission, now)
            }
        }
    }

    /// The core responds (status and the full response bytes). 1xx → Proceeding; INVITE 2xx →
    /// Accepted (Timer L = 64·T1; later 2xx passed through `respond()` are sent too, RFC 6026
    /// §8.5); INVITE 300-699 → Completed (Timer G retransmits on UDP doubling to T2, Timer H
    /// = 64·T1); non-INVITE final → Completed (Timer J = 64·T1 on UDP, 0 on reliable).
    /// Responses in a state that cannot take them are ignored (nothing is sent).
    pub fn respond(&mut self, status: u16, bytes: Vec<u8>, now: Instant) {
        let Some(class) = Class::of(status) else {
            return;
        };
        match &mut self.machine {
            Machine::Invite(m) => m.handle(
                &mut self.common,
                InviteEvent::Respond(class, status, bytes),
                now,
            ),
            Machine::NonInvite(m) => m.handle(
                &mut self.common,
                NonInviteEvent::Respond(class, status, bytes),
                now,
            ),
        }
    }

    /// ACK for a non-2xx final arrived: Completed → Confirmed (Timer I = T4, 0 on reliable).
    /// Absorbed in every other state; ignored by non-INVITE transactions, which an ACK never
    /// matches.
    pub fn on_ack(&mut self, now: Instant) {
        match &mut self.machine {
            Machine::Invite(m) => m.handle(&mut self.common, InviteEvent::Ack, now),
            // RFC 3261 §17.2.3: an ACK matches INVITE transactions only.
            Machine::NonInvite(_) => {}
        }
    }

    /// Fires every timer due at or before `now`, in deadline order. Timer G re-armed by a
    /// firing counts from `now`, so a late wakeup retransmits once, not in a burst.
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

    /// The next action to execute, in order.
    pub fn poll_action(&mut self) -> Option<ServerAction> {
        self.common.actions.pop_front()
    }

    /// The earliest armed timer; `None` when none runs (Trying, Proceeding, Terminated).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.machine {
            Machine::Invite(m) => m.armed.earliest(),
            Machine::NonInvite(m) => m.armed.earliest(),
        }
    }

    /// The RFC state.
    pub fn state(&self) -> ServerState {
        match &self.machine {
            Machine::Invite(m) => match m.state {
                InviteState::Proceeding => ServerState::Proceeding,
                InviteState::Completed => ServerState::Completed,
                InviteState::Confirmed => ServerState::Confirmed,
                InviteState::Accepted => ServerState::Accepted,
                InviteState::Terminated => ServerState::Terminated,
            },
            Machine::NonInvite(m) => match m.state {
                NonInviteState::Trying => ServerState::Trying,
                NonInviteState::Proceeding => ServerState::Proceeding,
                NonInviteState::Completed => ServerState::Completed,
                NonInviteState::Terminated => ServerState::Terminated,
            },
        }
    }

    /// The last response sent: what a retransmitted request gets again in Completed.
    pub fn last_response(&self) -> Option<&[u8]> {
        self.common.last.as_deref()
    }

    /// The final status sent, if any (the first 2xx for an INVITE answered more than once).
    pub fn final_status(&self) -> Option<u16> {
        self.common.final_status
    }

    /// Frees the spare room of the action queue and of the last response, which is kept
    /// for request retransmissions until the transaction ends. Call it with the actions
    /// drained (an idle transaction waiting for its timers).
    pub fn compact(&mut self) {
        self.common.actions.shrink_to_fit();
        if let Some(last) = &mut self.common.last {
            last.shrink_to_fit();
        }
    }
}

// ---- INVITE (RFC 3261 §17.2.1, RFC 6026 §8.5-§8.7) ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InviteState {
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
    Terminated,
}

/// The timers of an INVITE server transaction; the order breaks ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum InviteTimer {
    /// Final response retransmission (UDP only): T1 doubling to T2.
    G,
    /// Wait for the ACK: 64·T1.
    H,
    /// Absorb ACK retransmissions in Confirmed: T4 on UDP.
    I,
    /// Absorb INVITE retransmissions and send further 2xx in Accepted: 64·T1.
    L,
}

#[derive(Debug)]
enum InviteEvent {
    Respond(Class, u16, Vec<u8>),
    Retransmission,
    Ack,
    Timer(InviteTimer),
}

#[derive(Debug)]
struct InviteServer {
    state: InviteState,
    armed: Deadlines<InviteTimer>,
    /// The current Timer G interval.
    timer_g: Duration,
}

impl InviteServer {
    fn handle(&mut self, c: &mut Common, event: InviteEvent, now: Instant) {
        use InviteEvent as E;
        use InviteState as S;
        use InviteTimer as T;
        let t = c.timers;
        let before = self.state;
        self.state = match (before, event) {
            // §17.2.1: provisionals keep Proceeding; the last one answers retransmissions.
            (S::Proceeding, E::Respond(Class::Provisional, _, bytes)) => {
                c.send(bytes);
                S::Proceeding
            }
            // RFC 6026 §8.5: a 2xx moves to Accepted (RFC 3261 had Terminated) for Timer L.
            (S::Proceeding, E::Respond(Class::Success, status, bytes)) => {
                c.final_status = Some(status);
                c.send(bytes);
                self.armed.set(T::L, now + t.t1_x64());
                S::Accepted
            }
            // §17.2.1: a 300-699 moves to Completed: Timer G (UDP) and Timer H (all).
            (S::Proceeding, E::Respond(Class::Failure, status, bytes)) => {
                c.final_status = Some(status);
                c.send(bytes);
                if !c.reliable {
                    self.timer_g = t.t1;
                    self.armed.set(T::G, now + self.timer_g);
                }
                self.armed.set(T::H, now + t.t1_x64());
                S::Completed
            }
            // RFC 6026 §8.5: in Accepted, every 2xx from the core is sent (retransmissions
            // from the UAS, 2xx from other forks). Timer L is not restarted.
            (S::Accepted, E::Respond(Class::Success, _, bytes)) => {
                c.actions.push_back(ServerAction::Send(bytes));
                S::Accepted
            }
            // A final was sent: no provisional after it, no second final of another class
            // (the core forwards late 2xx statelessly if it must).
            (S::Accepted, E::Respond(Class::Provisional | Class::Failure, _, _))
            | (
                S::Completed | S::Confirmed | S::Terminated,
                E::Respond(Class::Provisional | Class::Success | Class::Failure, _, _),
            ) => before,

            // §17.2.1: retransmitted INVITEs get the last provisional again in Proceeding,
            // the final again in Completed...
            (S::Proceeding | S::Completed, E::Retransmission) => {
                c.send_last();
                before
            }
            // ... and are absorbed in Confirmed and Accepted (RFC 6026 §8.6).
            (S::Confirmed | S::Accepted | S::Terminated, E::Retransmission) => before,

            // §17.2.1: the ACK stops Timers G and H; Confirmed absorbs ACK retransmissions
            // for Timer I (0 on reliable transports).
            (S::Completed, E::Ack) => {
                self.armed.clear(T::G);
                self.armed.clear(T::H);
                if c.reliable {
                    S::Terminated
                } else {
                    self.armed.set(T::I, now + t.t4);
                    S::Confirmed
                }
            }
            // An ACK before any final, a retransmitted ACK, or an ACK for a 2xx (end to end,
            // it has its own branch and normally never matches, §17.1.1.3): absorbed.
            (S::Proceeding | S::Confirmed | S::Accepted | S::Terminated, E::Ack) => before,

            // §17.2.1: Timer G retransmits the final, doubling up to T2.
            (S::Completed, E::Timer(T::G)) => {
                c.send_last();
                self.timer_g = (self.timer_g * 2).min(t.t2);
                self.armed.set(T::G, now + self.timer_g);
                S::Completed
            }
            // §17.2.1: Timer H: the ACK never came.
            (S::Completed, E::Timer(T::H)) => {
                c.actions.push_back(ServerAction::AckTimeout);
                S::Terminated
            }
            (S::Confirmed, E::Timer(T::I)) | (S::Accepted, E::Timer(T::L)) => S::Terminated,
            // Each timer is disarmed on leaving the states that arm it.
            (S::Proceeding, E::Timer(T::G | T::H | T::I | T::L))
            | (S::Completed, E::Timer(T::I | T::L))
            | (S::Confirmed, E::Timer(T::G | T::H | T::L))
            | (S::Accepted, E::Timer(T::G | T::H | T::I))
            | (S::Terminated, E::Timer(T::G | T::H | T::I | T::L)) => before,
        };
        if self.state == S::Terminated && before != S::Terminated {
            self.armed.clear_all();
            c.actions.push_back(ServerAction::Terminated);
        }
    }
}

// ---- non-INVITE (RFC 3261 §17.2.2) ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonInviteState {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

/// The one timer of a non-INVITE server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum NonInviteTimer {
    /// Absorb request retransmissions in Completed: 64·T1 on UDP.
    J,
}

#[derive(Debug)]
enum NonInviteEvent {
    Respond(Class, u16, Vec<u8>),
    Retransmission,
    Timer(NonInviteTimer),
}

#[derive(Debug)]
struct NonInviteServer {
    state: NonInviteState,
    armed: Deadlines<NonInviteTimer>,
}

impl NonInviteServer {
    fn handle(&mut self, c: &mut Common, event: NonInviteEvent, now: Instant) {
        use NonInviteEvent as E;
        use NonInviteState as S;
        use NonInviteTimer as T;
        let t = c.timers;
        let before = self.state;
        self.state = match (before, event) {
            // §17.2.2: a provisional moves Trying to Proceeding.
            (S::Trying | S::Proceeding, E::Respond(Class::Provisional, _, bytes)) => {
                c.send(bytes);
                S::Proceeding
            }
            // §17.2.2: a final moves to Completed, for Timer J (0 on reliable transports).
            (
                S::Trying | S::Proceeding,
                E::Respond(Class::Success | Class::Failure, status, bytes),
            ) => {
                c.final_status = Some(status);
                c.send(bytes);
                if c.reliable {
                    S::Terminated
                } else {
                    self.armed.set(T::J, now + t.t1_x64());
                    S::Completed
                }
            }
            // §17.2.2: "any other final responses passed by the TU ... MUST be discarded".
            (
                S::Completed | S::Terminated,
                E::Respond(Class::Provisional | Class::Success | Class::Failure, _, _),
            ) => before,

            // §17.2.2: retransmissions are discarded in Trying, answered with the last
            // provisional in Proceeding and with the final in Completed.
            (S::Trying | S::Terminated, E::Retransmission) => before,
            (S::Proceeding | S::Completed, E::Retransmission) => {
                c.send_last();
                before
            }

            (S::Completed, E::Timer(T::J)) => S::Terminated,
            (S::Trying | S::Proceeding | S::Terminated, E::Timer(T::J)) => before,
        };
        if self.state == S::Terminated && before != S::Terminated {
            self.armed.clear_all();
            c.actions.push_back(ServerAction::Terminated);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transaction::tests::t0;

    fn drain(txn: &mut ServerTxn) -> Vec<ServerAction> {
        std::iter::from_fn(|| txn.poll_action()).collect()
    }

    fn send(s: &str) -> ServerAction {
        ServerAction::Send(s.as_bytes().to_vec())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn invite_starts_in_proceeding_and_resends_last_provisional() {
        let t0 = t0();
        let mut txn = ServerTxn::new(Kind::Invite, false, Timers::default(), t0);
        assert_eq!(txn.state(), ServerState::Proceeding);
        assert_eq!(txn.poll_timeout(), None);
        // Nothing sent yet: nothing to resend.
        txn.on_request_retransmission(t0);
        assert!(drain(&mut txn).is_empty());
        txn.respond(100, b"100".to_vec(), t0);
        txn.respond(180, b"180".to_vec(), t0 + ms(10));
        txn.on_request_retransmission(t0 + ms(20));
        assert_eq!(drain(&mut txn), [send("100"), send("180"), send("180")]);
        assert_eq!(txn.final_status(), None);
    }

    #[test]
    fn timer_h_without_ack() {
        let t0 = t0();
        let mut txn = ServerTxn::new(Kind::Invite, false, Timers::default(), t0);
        txn.respond(486, b"486".to_vec(), t0);
        assert_eq!(txn.final_status(), Some(486));
        assert_eq!(drain(&mut txn), [send("486")]);
        let mut sends = Vec::new();
        while let Some(at) = txn.poll_timeout() {
            txn.on_timer(at);
            for a in drain(&mut txn) {
                sends.push(((at - t0).as_millis(), a));
            }
        }
        let g: Vec<u128> = sends
            .iter()
            .filter(|(_, a)| *a == send("486"))
            .map(|(t, _)| *t)
            .collect();
        // Timer G: 500, 1000, 2000, 4000, 4000, ... until Timer H at 32 s.
        let mut want = vec![0u128];
        let mut at = 0;
        let mut interval = 500;
        while at + interval < 32_000 {
            at += interval;
            want.push(at);
            interval = (interval * 2).min(4000);
        }
        assert_eq!(g, want[1..]);
        assert_eq!(
            sends[sends.len() - 2..],
            [
                (32_000, ServerAction::AckTimeout),
                (32_000, ServerAction::Terminated)
            ]
        );
        assert_eq!(txn.state(), ServerState::Terminated);
    }

    #[test]
    fn reliable_invite_has_no_timer_g_and_no_timer_i() {
        let t0 = t0();
        let mut txn = ServerTxn::new(Kind::Invite, true, Timers::default(), t0);
        txn.respond(404, b"404".to_vec(), t0);
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(32_000)));
        txn.on_ack(t0 + ms(50));
        assert_eq!(drain(&mut txn), [send("404"), ServerAction::Terminated]);
    }

    #[test]
    fn confirmed_absorbs_and_ends_after_t4() {
        let t0 = t0();
        let mut txn = ServerTxn::new(Kind::Invite, false, Timers::default(), t0);
        txn.respond(486, b"486".to_vec(), t0);
        txn.on_ack(t0 + ms(100));
        assert_eq!(txn.state(), ServerState::Confirmed);
        txn.on_ack(t0 + ms(200));
        txn.on_request_retransmission(t0 + ms(300));
        txn.respond(200, b"200".to_vec(), t0 + ms(400));
        assert_eq!(drain(&mut txn), [send("486")]);
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(5100)));
        txn.on_timer(t0 + ms(5100));
        assert_eq!(drain(&mut txn), [ServerAction::Terminated]);
    }

    #[test]
    fn accepted_sends_every_2xx_and_nothing_else() {
        let t0 = t0();
        let mut txn = ServerTxn::new(Kind::Invite, false, Timers::default(), t0);
        txn.respond(200, b"200a".to_vec(), t0);
        assert_eq!(txn.state(), ServerState::Accepted);
        txn.respond(180, b"180".to_vec(), t0 + ms(1));
        txn.respond(486, b"486".to_vec(), t0 + ms(2));
        txn.on_request_retransmission(t0 + ms(3));
        txn.on_ack(t0 + ms(4));
        txn.respond(200, b"200b".to_vec(), t0 + ms(5));
        assert_eq!(drain(&mut txn), [send("200a"), send("200b")]);
        assert_eq!(txn.final_status(), Some(200));
        // Timer L from the first 2xx.
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(32_000)));
        txn.on_timer(t0 + ms(32_000));
        assert_eq!(drain(&mut txn), [ServerAction::Terminated]);
        txn.respond(200, b"200c".to_vec(), t0 + ms(32_001));
        assert!(drain(&mut txn).is_empty());
    }

    #[test]
    fn non_invite_states() {
        let t0 = t0();
        let mut txn = ServerTxn::new(Kind::NonInvite, false, Timers::default(), t0);
        assert_eq!(txn.state(), ServerState::Trying);
        // §17.2.2: retransmissions in Trying are discarded.
        txn.on_request_retransmission(t0 + ms(1));
        assert!(drain(&mut txn).is_empty());
        txn.respond(100, b"100".to_vec(), t0 + ms(2));
        txn.on_request_retransmission(t0 + ms(3));
        txn.respond(200, b"200".to_vec(), t0 + ms(4));
        txn.respond(500, b"500".to_vec(), t0 + ms(5));
        txn.on_request_retransmission(t0 + ms(6));
        txn.on_ack(t0 + ms(7));
        assert_eq!(
            drain(&mut txn),
            [send("100"), send("100"), send("200"), send("200")]
        );
        assert_eq!(txn.state(), ServerState::Completed);
        assert_eq!(txn.final_status(), Some(200));
        // Timer J = 64·T1.
        assert_eq!(txn.poll_timeout(), Some(t0 + ms(32_004)));
        txn.on_timer(t0 + ms(32_004));
        assert_eq!(drain(&mut txn), [ServerAction::Terminated]);

        // Reliable: Timer J is 0.
        let mut txn = ServerTxn::new(Kind::NonInvite, true, Timers::default(), t0);
        txn.respond(200, b"200".to_vec(), t0);
        assert_eq!(drain(&mut txn), [send("200"), ServerAction::Terminated]);
        assert_eq!(txn.poll_timeout(), None);
    }

    #[test]
    fn invalid_status_is_ignored() {
        let t0 = t0();
        let mut txn = ServerTxn::new(Kind::Invite, false, Timers::default(), t0);
        txn.respond(99, b"99".to_vec(), t0);
        txn.respond(700, b"700".to_vec(), t0);
        assert!(drain(&mut txn).is_empty());
        assert_eq!(txn.state(), ServerState::Proceeding);
    }
}
