//! Accounting for every call (the seed's `acc` module, issue #12 item 5): one `cdr` row per
//! initial INVITE that reaches routing, whatever its outcome.
//!
//! The rule (README "Accounting"): an initial INVITE (no To-tag) gets exactly one row when it
//! passed sanity, the flood gate and, when its route asks for it, proxy authentication, and
//! then was forwarded (answered, failed, cancelled, timed out, refused by a media limit), or
//! was answered by sipedge after that point (503 when the next hop does not resolve), or got
//! the location service's 404 while coming from one of our users or a `[[route]]` next hop
//! ([`counts_not_found`]). No row for what never got that far: 407 challenges, failed
//! authentication, routing refusals (403, 416, 482, 483), `limits.transactions` 503s, and a
//! scanner's 404: a flood must not fill the table.
//!
//! Who writes the row: a relayed call's media session ([`crate::media::session::Media`]),
//! with its media figures, when it ends; every other call this module, through the same
//! `CdrWriter` (retries, then the spool). A failed call is written when its final response
//! goes upstream; an answered one opens a dialog in [`Dialogs`] that the BYE passing through
//! the proxy closes (end time, who hung up). The table is bounded (`limits.dialogs`, the
//! oldest is closed with reason `evicted` and counted) and aged (`limits.dialog_max_age`:
//! reason `timeout`); at shutdown the open ones are written with reason `shutdown`.
//!
//! This module is pure: [`Start`], [`Dialogs`] and the row building (wall time comes in as
//! unix seconds). The async shell the proxy calls, with the lock, the clock and the writer,
//! is [`crate::proxy::accounting::Accounting`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use tracing::info;

use crate::config::Config;
use crate::sip::text::Addr;
use crate::sip::{Message, SipUri};
use crate::store::Cdr;

/// How an INVITE ended (the `outcome` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx went upstream.
    Answered,
    /// A final ≥ 300 that is not a cancel.
    Failed,
    /// The caller's CANCEL, or a 487.
    Cancelled,
}

impl Outcome {
    /// The outcome of final status `status`; `cancelled`: the caller sent a CANCEL.
    pub fn of(status: u16, cancelled: bool) -> Self {
        match status {
            200..=299 => Self::Answered,
            487 => Self::Cancelled,
            _ if cancelled => Self::Cancelled,
            _ => Self::Failed,
        }
    }

    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Who sent the BYE (the `hangup` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hangup {
    Caller,
    Callee,
}

impl Hangup {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Callee => "callee",
        }
    }
}

/// Why an answered call's row was written (the `reason` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// A BYE passed through the proxy.
    Bye(Hangup),
    /// No BYE within `limits.dialog_max_age`.
    Timeout,
    /// `limits.dialogs` open dialogs: the oldest made room for a new one.
    Evicted,
    /// The server stopped.
    Shutdown,
}

impl Close {
    fn reason(self) -> &'static str {
        match self {
            Self::Bye(_) => "bye",
            Self::Timeout => "timeout",
            Self::Evicted => "evicted",
            Self::Shutdown => "shutdown",
        }
    }

    fn hangup(self) -> Option<Hangup> {
        match self {
            Self::Bye(h) => Some(h),
            Self::Timeout | Self::Evicted | Self::Shutdown => None,
        }
    }
}

/// The route name of a call answered by sipedge itself (the location service's 404).
pub const LOCAL: &str = "local";

/// What accounting knows of a call once its INVITE was accepted for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub call_id: String,
    /// The caller's From-tag.
    pub caller_tag: String,
    pub from_uri: String,
    pub to_uri: String,
    pub request_uri: String,
    /// The `[[route]]` name, "location", "foreign" or [`LOCAL`].
    pub route: String,
    /// The user proxy authentication verified ('' when none was asked for).
    pub auth_user: String,
    pub source: SocketAddr,
    /// When the INVITE came (unix seconds).
    pub start: u64,
}

impl Start {
    /// The record of an initial INVITE; `None` for any other request (a re-INVITE has a
    /// To-tag) or one without the headers sanity guarantees.
    pub fn of(
        msg: &Message,
        source: SocketAddr,
        route: &str,
        auth_user: Option<&str>,
        now_unix: u64,
    ) -> Option<Self> {
        if msg.method() != Some("INVITE") {
            return None;
        }
        let to = msg.to().ok()?;
        if to.tag().is_some() {
            return None;
        }
        let from = msg.from().ok()?;
        Some(Self {
            call_id: msg.call_id().ok()?.to_owned(),
            caller_tag: from.tag().unwrap_or_default().to_owned(),
            from_uri: from.uri.to_owned(),
            to_uri: to.uri.to_owned(),
            request_uri: msg.request_uri()?.to_owned(),
            route: route.to_owned(),
            auth_user: auth_user.unwrap_or_default().to_owned(),
            source,
            start: now_unix,
        })
    }

    /// The row of this call, not relayed (media figures zero).
    pub fn row(
        self,
        status: u16,
        answer: Option<u64>,
        end: u64,
        reason: &str,
        hangup: Option<Hangup>,
    ) -> Cdr {
        Cdr {
            call_id: self.call_id,
            from_uri: self.from_uri,
            to_uri: self.to_uri,
            start: self.start,
            answer,
            end,
            status,
            reason: reason.to_owned(),
            caller: (0, 0, 0, 0.0),
            callee: (0, 0, 0, 0.0),
            request_uri: self.request_uri,
            route: self.route,
            auth_user: self.auth_user,
            source: Addr(self.source).to_string(),
            outcome: Outcome::of(status, false).as_str().to_owned(),
            hangup: hangup.map_or("", Hangup::as_str).to_owned(),
            relayed: false,
        }
    }

    /// The row of a call whose INVITE got final status `status` ≥ 300 at `now_unix`
    /// (`cancelled`: the caller sent a CANCEL).
    pub fn failed(self, status: u16, cancelled: bool, now_unix: u64) -> Cdr {
        let outcome = Outcome::of(status, cancelled);
        let reason = match outcome {
            Outcome::Cancelled => "cancel",
            Outcome::Answered | Outcome::Failed => "failed",
        };
        let mut row = self.row(status, None, now_unix, reason, None);
        row.outcome = outcome.as_str().to_owned();
        row
    }
}

/// Whether the location service's 404 to this INVITE is a call outcome (a row): it comes from
/// one of our users (its From is in one of `server.domains`) or from the address of a
/// `[[route]]` next hop (an inbound call from the PBX or the provider). A scanner probing
/// user names from elsewhere gets its 404 without a row.
pub fn counts_not_found(cfg: &Config, msg: &Message, source: SocketAddr) -> bool {
    let from_ours = msg
        .from()
        .ok()
        .and_then(|f| {
            SipUri::parse(f.uri)
                .ok()
                .map(|u| cfg.is_local_domain(u.host))
        })
        .unwrap_or(false);
    from_ours
        || cfg
            .routes
            .iter()
            .flat_map(|r| &r.next_hops)
            .any(|h| h.ip() == Some(source.ip()))
}

/// The `call ended` line: one per call, whoever writes its row (STYLE §2.7 `info`).
pub fn log_end(c: &Cdr) {
    let duration = c.answer.map_or(0, |a| c.end.saturating_sub(a));
    info!(
        sip.call_id = %c.call_id,
        from = %c.from_uri,
        to = %c.to_uri,
        route = %c.route,
        status = c.status,
        duration,
        outcome = %c.outcome,
        reason = %c.reason,
        hangup = %c.hangup,
        relayed = c.relayed,
        "call ended"
    );
}

/// Call-ID, caller's tag, callee's tag.
type DialogKey = (String, String, String);

/// An answered call waiting for its BYE.
#[derive(Debug, Clone)]
struct Open {
    start: Start,
    status: u16,
    answer: u64,
    seq: u64,
}

impl Open {
    fn close(self, now_unix: u64, how: Close) -> Cdr {
        self.start.row(
            self.status,
            Some(self.answer),
            now_unix.max(self.answer),
            how.reason(),
            how.hangup(),
        )
    }
}

/// The answered calls that are not relayed, until their BYE: bounded in number and age.
#[derive(Debug)]
pub struct Dialogs {
    max: usize,
    max_age: u64,
    open: HashMap<DialogKey, Open>,
    /// (answer time, sequence) → dialog: the oldest first, for eviction and expiry.
    by_age: BTreeMap<(u64, u64), DialogKey>,
    seq: u64,
    evicted: u64,
}

impl Dialogs {
    /// At most `max` dialogs (≥ 1), each kept `max_age` at most.
    pub fn new(max: usize, max_age: Duration) -> Self {
        Self {
            max: max.max(1),
            max_age: max_age.as_secs(),
            open: HashMap::new(),
            by_age: BTreeMap::new(),
            seq: 0,
            evicted: 0,
        }
    }

    /// Dialogs open.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Dialogs closed to make room since start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// The call was answered at `now_unix` with `status`, the callee's tag `callee_tag`.
    /// With `limits.dialogs` open, the oldest makes room: its row is returned (reason
    /// `evicted`). The same dialog twice keeps the first.
    pub fn open(
        &mut self,
        start: Start,
        callee_tag: &str,
        status: u16,
        now_unix: u64,
    ) -> Option<Cdr> {
        let key = (
            start.call_id.clone(),
            start.caller_tag.clone(),
            callee_tag.to_owned(),
        );
        if self.open.contains_key(&key) {
            return None;
        }
        let evicted = if self.open.len() >= self.max {
            self.evicted += 1;
            self.pop_oldest().map(|o| o.close(now_unix, Close::Evicted))
        } else {
            None
        };
        self.seq += 1;
        self.by_age.insert((now_unix, self.seq), key.clone());
        self.open.insert(
            key,
            Open {
                start,
                status,
                answer: now_unix,
                seq: self.seq,
            },
        );
        evicted
    }

    /// A BYE with these tags (its From-tag and To-tag) in a dialog of `call_id`: the call's
    /// row, with who hung up. `None`: not a dialog of ours (a relayed call, or unknown).
    pub fn bye(
        &mut self,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        now_unix: u64,
    ) -> Option<Cdr> {
        let by_caller = (call_id.to_owned(), from_tag.to_owned(), to_tag.to_owned());
        let (key, who) = if self.open.contains_key(&by_caller) {
            (by_caller, Hangup::Caller)
        } else {
            let by_callee = (call_id.to_owned(), to_tag.to_owned(), from_tag.to_owned());
            (by_callee, Hangup::Callee)
        };
        let o = self.remove(&key)?;
        Some(o.close(now_unix, Close::Bye(who)))
    }

    /// The dialogs answered `limits.dialog_max_age` or more before `now_unix`: their rows
    /// (reason `timeout`).
    pub fn expire(&mut self, now_unix: u64) -> Vec<Cdr> {
        let mut rows = Vec::new();
        while let Some((&(answer, _), _)) = self.by_age.first_key_value() {
            if answer.saturating_add(self.max_age) > now_unix {
                break;
            }
            if let Some(o) = self.pop_oldest() {
                rows.push(o.close(now_unix, Close::Timeout));
            }
        }
        rows
    }

    /// Every open dialog's row (reason `shutdown`), oldest first; the table is empty after.
    pub fn drain(&mut self, now_unix: u64) -> Vec<Cdr> {
        let mut rows = Vec::with_capacity(self.open.len());
        while let Some(o) = self.pop_oldest() {
            rows.push(o.close(now_unix, Close::Shutdown));
        }
        rows
    }

    fn pop_oldest(&mut self) -> Option<Open> {
        let (_, key) = self.by_age.pop_first()?;
        self.open.remove(&key)
    }

    fn remove(&mut self, key: &DialogKey) -> Option<Open> {
        let o = self.open.remove(key)?;
        self.by_age.remove(&(o.answer, o.seq));
        Some(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Framing;

    fn start(call_id: &str, at: u64) -> Start {
        Start {
            call_id: call_id.into(),
            caller_tag: "a".into(),
            from_uri: "sip:alice@example.com".into(),
            to_uri: "sip:bob@example.com".into(),
            request_uri: "sip:bob@example.com".into(),
            route: "location".into(),
            auth_user: String::new(),
            source: "192.0.2.1:5060".parse().unwrap(),
            start: at,
        }
    }

    #[test]
    fn outcomes() {
        assert_eq!(Outcome::of(200, false), Outcome::Answered);
        assert_eq!(Outcome::of(200, true), Outcome::Answered, "answered first");
        assert_eq!(Outcome::of(487, false), Outcome::Cancelled);
        assert_eq!(Outcome::of(408, true), Outcome::Cancelled);
        assert_eq!(Outcome::of(486, false), Outcome::Failed);
        assert_eq!(Outcome::of(404, false), Outcome::Failed);
    }

    #[test]
    fn start_of_an_initial_invite_only() {
        let text = |method: &str, to_tag: &str| {
            format!(
                "{method} sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
                 From: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>{to_tag}\r\n\
                 Call-ID: c1\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
            )
        };
        let msg = |t: String| Message::parse(t.as_bytes(), Framing::Datagram).unwrap();
        let src: SocketAddr = "192.0.2.1:5060".parse().unwrap();
        let s = Start::of(&msg(text("INVITE", "")), src, "pbx", Some("alice"), 7).unwrap();
        assert_eq!(
            (s.call_id.as_str(), s.caller_tag.as_str(), s.route.as_str()),
            ("c1", "a1", "pbx")
        );
        assert_eq!((s.auth_user.as_str(), s.start), ("alice", 7));
        assert_eq!(s.request_uri, "sip:bob@example.com");
        assert!(Start::of(&msg(text("INVITE", ";tag=b")), src, "pbx", None, 7).is_none());
        assert!(Start::of(&msg(text("OPTIONS", "")), src, "pbx", None, 7).is_none());
    }

    #[test]
    fn failed_rows() {
        let s = start("c1", 100);
        let row = s.clone().failed(486, false, 103);
        assert_eq!((row.status, row.outcome.as_str()), (486, "failed"));
        assert_eq!(
            (row.reason.as_str(), row.answer, row.end),
            ("failed", None, 103)
        );
        assert_eq!(row.source, "192.0.2.1:5060");
        assert!(!row.relayed && row.hangup.is_empty());
        let row = s.failed(487, true, 104);
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            ("cancelled", "cancel")
        );
    }

    #[test]
    fn bye_closes_the_dialog_and_says_who_hung_up() {
        let mut d = Dialogs::new(10, Duration::from_secs(3600));
        assert!(d.open(start("c1", 100), "b", 200, 102).is_none());
        assert!(d.open(start("c2", 100), "b", 200, 102).is_none());
        assert_eq!(d.len(), 2);
        // Unknown tags: not ours.
        assert!(d.bye("c1", "x", "y", 110).is_none());
        // The caller's BYE (From = caller).
        let row = d.bye("c1", "a", "b", 160).unwrap();
        assert_eq!((row.answer, row.end, row.status), (Some(102), 160, 200));
        assert_eq!(
            (row.reason.as_str(), row.hangup.as_str()),
            ("bye", "caller")
        );
        assert_eq!(row.outcome, "answered");
        // The callee's BYE (From = callee).
        let row = d.bye("c2", "b", "a", 170).unwrap();
        assert_eq!(row.hangup, "callee");
        assert!(d.is_empty());
        // A second BYE (a retransmission after the first closed it): nothing.
        assert!(d.bye("c2", "b", "a", 171).is_none());
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_oldest() {
        let mut d = Dialogs::new(2, Duration::from_secs(3600));
        assert!(d.open(start("c1", 1), "b", 200, 10).is_none());
        assert!(d.open(start("c2", 1), "b", 200, 11).is_none());
        // The same dialog again: kept once, nothing evicted.
        assert!(d.open(start("c2", 1), "b", 200, 12).is_none());
        let row = d.open(start("c3", 1), "b", 200, 13).unwrap();
        assert_eq!(
            (row.call_id.as_str(), row.reason.as_str()),
            ("c1", "evicted")
        );
        assert_eq!(row.end, 13);
        assert_eq!((d.len(), d.evicted()), (2, 1));
        assert!(d.bye("c1", "a", "b", 14).is_none(), "evicted: gone");
        assert!(d.bye("c3", "a", "b", 14).is_some());
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn old_dialogs_time_out_and_shutdown_drains() {
        let mut d = Dialogs::new(10, Duration::from_secs(100));
        d.open(start("c1", 0), "b", 200, 1000);
        d.open(start("c2", 0), "b", 200, 1050);
        assert!(d.expire(1099).is_empty());
        let rows = d.expire(1100);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].call_id.as_str(), rows[0].reason.as_str()),
            ("c1", "timeout")
        );
        assert_eq!((rows[0].answer, rows[0].end), (Some(1000), 1100));
        // A BYE removes its dialog from the age index too.
        d.open(start("c3", 0), "b", 200, 1060);
        assert!(d.bye("c2", "a", "b", 1070).is_some());
        let rows = d.drain(1080);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].call_id.as_str(), rows[0].reason.as_str()),
            ("c3", "shutdown")
        );
        assert!(d.is_empty() && d.expire(u64::MAX).is_empty());
    }
}
