//! The end of a relayed call: its stats line (DESIGN §4, STYLE §2.7), its `call ended` line
//! (the one every call logs, [`crate::acc::log_end`]) and its CDR row, with the accounting
//! columns from the proxy's record when the INVITE's final went upstream. Pure but for the
//! log: the end time comes in, the row goes out to `cdr::CdrWriter`.

use sipedge_relay::{LegStats, SessionStats};
use tracing::info;

use crate::acc::{self, Outcome};
use crate::media::call::{Call, EndReason, Invite};
use crate::store::Cdr;

/// Jitter to the microsecond: more digits are noise.
fn ms(j: f64) -> f64 {
    (j * 1000.0).round() / 1000.0
}

/// Logs the call's stats line and `call ended` line, and returns its CDR row; `end_unix` is
/// when it ended.
pub(crate) fn report(c: &Call, reason: EndReason, s: &SessionStats, end_unix: u64) -> Cdr {
    let duration_ms = u64::try_from(s.duration.as_millis()).unwrap_or(u64::MAX);
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
    let leg = |l: &LegStats| (l.pkts, l.bytes, l.lost, ms(l.jitter_ms));
    // The CDR's 0: no final response (the call ended while the INVITE was pending).
    let status = match c.invite {
        Invite::Pending => 0,
        Invite::Final(s) => s,
    };
    let outcome = match (c.invite, reason) {
        (Invite::Final(s), _) => Outcome::of(s, reason == EndReason::Cancel),
        (Invite::Pending, EndReason::Cancel) => Outcome::Cancelled,
        (
            Invite::Pending,
            EndReason::Bye | EndReason::Failed | EndReason::Timeout | EndReason::Shutdown,
        ) => Outcome::Failed,
    };
    // Without the proxy's record (the call ended before its final went upstream: shutdown),
    // the route, user and source are unknown.
    let (request_uri, route, auth_user, source) = c.acc.as_ref().map_or_else(
        || {
            (
                c.to_uri.clone(),
                String::new(),
                String::new(),
                String::new(),
            )
        },
        |a| {
            (
                a.request_uri.clone(),
                a.route.clone(),
                a.auth_user.clone(),
                a.source.to_string(),
            )
        },
    );
    let row = Cdr {
        call_id: c.call_id.clone(),
        from_uri: c.from_uri.clone(),
        to_uri: c.to_uri.clone(),
        start: c.acc.as_ref().map_or(c.start_unix, |a| a.start),
        answer: c.answer_unix,
        end: end_unix,
        status,
        reason: reason.as_str().to_owned(),
        caller: leg(&s.caller),
        callee: leg(&s.callee),
        request_uri,
        route,
        auth_user,
        source,
        outcome: outcome.as_str().to_owned(),
        hangup: c.hangup.map_or("", acc::Hangup::as_str).to_owned(),
        relayed: true,
    };
    acc::log_end(&row);
    row
}

/// The sum of two sessions' stats (the forks of an unanswered call): counters add up, the
/// duration and the jitter are the larger.
pub(crate) fn add(a: SessionStats, b: &SessionStats) -> SessionStats {
    let leg = |x: LegStats, y: &LegStats| LegStats {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::call::CallIds;
    use std::time::Duration;

    #[test]
    fn cdr_row_of_a_call() {
        let ids = CallIds {
            call_id: "c1@test",
            from_uri: "sip:a@test",
            to_uri: "sip:b@test",
            from_tag: "f",
            to_tag: None,
        };
        let mut c = Call::new(&ids, "ip:192.0.2.1".into(), 100);
        let leg = |pkts, jitter_ms| LegStats {
            pkts,
            bytes: pkts * 172,
            jitter_ms,
            ..LegStats::default()
        };
        let a = SessionStats {
            duration: Duration::from_secs(3),
            caller: leg(10, 1.23456),
            callee: leg(5, 0.5),
        };
        let b = SessionStats {
            duration: Duration::from_secs(4),
            caller: leg(1, 2.0),
            callee: leg(2, 0.1),
        };
        let sum = add(a, &b);
        assert_eq!(sum.duration, Duration::from_secs(4));
        assert_eq!((sum.caller.pkts, sum.callee.pkts), (11, 7));
        assert_eq!(sum.caller.jitter_ms, 2.0);
        // Pending INVITE: status 0, and no accounting record yet.
        let row = report(&c, EndReason::Shutdown, &sum, 110);
        assert_eq!(row.status, 0);
        assert_eq!((row.start, row.end, row.answer), (100, 110, None));
        assert_eq!(row.reason, "shutdown");
        assert_eq!((row.outcome.as_str(), row.route.as_str()), ("failed", ""));
        assert!(row.relayed);
        c.finished(486, false, 105);
        c.acc = Some(crate::acc::Start {
            call_id: "c1@test".into(),
            caller_tag: "f".into(),
            from_uri: "sip:a@test".into(),
            to_uri: "sip:b@test".into(),
            request_uri: "sip:b@test".into(),
            route: "location".into(),
            auth_user: "a".into(),
            source: "192.0.2.1:5060".parse().unwrap(),
            start: 99,
        });
        let row = report(&c, EndReason::Failed, &b, 106);
        assert_eq!(row.status, 486);
        assert_eq!(row.caller, (1, 172, 0, 2.0));
        // The proxy's record fills the accounting columns.
        assert_eq!(
            (
                row.route.as_str(),
                row.auth_user.as_str(),
                row.source.as_str()
            ),
            ("location", "a", "192.0.2.1:5060")
        );
        assert_eq!((row.outcome.as_str(), row.start), ("failed", 99));
        c.hangup = Some(crate::acc::Hangup::Callee);
        let row = report(&c, EndReason::Bye, &b, 107);
        assert_eq!(row.hangup, "callee");
        let row = report(
            &c,
            EndReason::Failed,
            &SessionStats {
                caller: leg(1, 1.23456),
                ..b
            },
            106,
        );
        assert_eq!(row.caller.3, 1.235, "jitter to the microsecond");
    }
}
