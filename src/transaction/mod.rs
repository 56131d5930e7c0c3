//! RFC 3261 §17 transactions with the RFC 6026 corrections, sans-IO.
//!
//! A transaction is a state machine fed with events (a response, a request retransmission, an
//! ACK, a transport error, the passing of time) and drained for actions (bytes to send, a
//! response for the core, a timeout, the end of the transaction), as in quinn-proto: the
//! machines never touch a socket or read a clock. Time is a [`tokio::time::Instant`] passed in
//! as `now`; [`ClientTxn::poll_timeout`]/[`ServerTxn::poll_timeout`] give the next deadline and
//! `on_timer(now)` fires every timer due by then.
//!
//! - [`client`]: the client transactions of §17.1.1 (INVITE: Calling, Proceeding, Completed,
//!   Accepted of RFC 6026 §8.4, Terminated) and §17.1.2 (non-INVITE: Trying, Proceeding,
//!   Completed, Terminated), plus the proxy's Timer C (§16.6 step 11, §16.7 step 2, §16.8)
//!   and the requests a client transaction builds: the ACK for a non-2xx final (§17.1.1.3)
//!   and the CANCEL (§9.1).
//! - [`server`]: the server transactions of §17.2.1 (INVITE: Proceeding, Completed,
//!   Confirmed, Accepted of RFC 6026 §8.7, Terminated) and §17.2.2 (non-INVITE: Trying,
//!   Proceeding, Completed, Terminated).
//! - [`key`]: matching requests and responses to transactions (§17.1.3, §17.2.3).
//!
//! Timers (§17.1.1.1, Table 4 of RFC 3261 and RFC 6026 §8.11) are named by their RFC letters.
//! Retransmission timers (A, E, G) run only over unreliable transports; the proxy's
//! final-response timers follow Kamailio's `tm` defaults ([`Timers`]).

use std::time::Duration;

use tokio::time::Instant;

pub mod client;
pub mod key;
pub mod server;
#[cfg(test)]
mod tests;

pub use client::{ClientAction, ClientState, ClientTxn, ack_for, cancel_for};
pub use key::{TxnKey, client_key, invite_key_for_cancel, server_key};
pub use server::{ServerAction, ServerState, ServerTxn};

/// Timer values. `Timers::default()` = T1 500 ms, T2 4 s, T4 5 s, fr 30 s, fr_inv 120 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// RTT estimate (RFC 3261 §17.1.1.1), default 500 ms: the first retransmission interval;
    /// 64·T1 is Timer B, H, J, L and M.
    pub t1: Duration,
    /// Maximum retransmission interval of non-INVITE requests and INVITE final responses
    /// (RFC 3261 Table 4), default 4 s.
    pub t2: Duration,
    /// Maximum time a message stays in the network (RFC 3261 Table 4), default 5 s: Timers I
    /// and K.
    pub t4: Duration,
    /// Kamailio `fr_timer`, default 30 s: Timer F, how long a non-INVITE client transaction
    /// waits for a final response.
    pub fr: Duration,
    /// Kamailio `fr_inv_timer`, default 120 s: Timer C of an INVITE client transaction
    /// (RFC 3261 §16.6 step 11: more than 3 minutes is the RFC's advice; Kamailio's 120 s is
    /// ours), restarted by every provisional response but 100 (§16.7 step 2).
    pub fr_inv: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            fr: Duration::from_secs(30),
            fr_inv: Duration::from_secs(120),
        }
    }
}

impl Timers {
    /// 64·T1: Timers B, H, J, L and M (RFC 3261 Table 4, RFC 6026 §8.11).
    pub fn t1_x64(&self) -> Duration {
        self.t1 * 64
    }
}

/// The two families of transactions (RFC 3261 §17): INVITE has its own state machines
/// because of its three-way handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An INVITE transaction.
    Invite,
    /// Any other request except ACK, which creates no transaction (RFC 3261 §17).
    NonInvite,
}

impl Kind {
    /// The kind of transaction a request with this method creates. Methods are case-sensitive
    /// (RFC 3261 §7.1). ACK creates none: the caller handles it before asking.
    pub fn of_method(method: &str) -> Self {
        if method == "INVITE" {
            Self::Invite
        } else {
            Self::NonInvite
        }
    }
}

/// The class of a status code, which is all a transaction looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// 100-199.
    Provisional,
    /// 200-299.
    Success,
    /// 300-699.
    Failure,
}

impl Class {
    /// `None` for a code outside 100-699 (the parser rejects those in responses).
    pub(crate) fn of(status: u16) -> Option<Self> {
        match status {
            100..=199 => Some(Self::Provisional),
            200..=299 => Some(Self::Success),
            300..=699 => Some(Self::Failure),
            _ => None,
        }
    }
}

/// The armed timers of one transaction, by RFC letter (`T`). A handful at most, so a vector.
#[derive(Debug, Clone)]
pub(crate) struct Deadlines<T> {
    armed: Vec<(T, Instant)>,
}

impl<T: Copy + Ord> Deadlines<T> {
    pub(crate) fn new() -> Self {
        Self {
            armed: Vec::with_capacity(4),
        }
    }

    /// Arms (or re-arms) `timer` to fire at `at`.
    pub(crate) fn set(&mut self, timer: T, at: Instant) {
        self.clear(timer);
        self.armed.push((timer, at));
    }

    pub(crate) fn clear(&mut self, timer: T) {
        self.armed.retain(|(t, _)| *t != timer);
    }

    pub(crate) fn clear_all(&mut self) {
        self.armed.clear();
    }

    pub(crate) fn get(&self, timer: T) -> Option<Instant> {
        self.armed
            .iter()
            .find(|(t, _)| *t == timer)
            .map(|(_, at)| *at)
    }

    /// The earliest deadline.
    pub(crate) fn earliest(&self) -> Option<Instant> {
        self.armed.iter().map(|(_, at)| *at).min()
    }

    /// Disarms and returns the timer due at or before `now` with the earliest deadline (ties
    /// in RFC letter order).
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<T> {
        let (i, _) = self
            .armed
            .iter()
            .enumerate()
            .filter(|(_, (_, at))| *at <= now)
            .min_by_key(|(_, (t, at))| (*at, *t))?;
        Some(self.armed.swap_remove(i).0)
    }
}
