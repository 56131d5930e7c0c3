//! The first step of the request pipeline (DESIGN §4 step 1, Kamailio's `sanity` and
//! `maxfwd` modules): is this a message we can process, and if not, what do we answer?
//!
//! Pure: bytes in, verdict out.

use std::borrow::Cow;

use crate::sip::{Framing, Malformed, Message, SipUri, UriError};

/// Why a message is dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Only white space: a CRLF keepalive on UDP.
    Keepalive,
    /// No start line could be recognised.
    Unparseable(Malformed),
    /// A request whose top Via cannot be read: no response could be routed.
    NoVia,
    /// A malformed or oversized response (responses are never answered).
    BadResponse,
    /// A malformed ACK (ACKs are never answered, RFC 3261 §17.2.3).
    BadAck,
}

/// What to do with a received message.
#[derive(Debug)]
pub enum Verdict {
    /// A well-formed request.
    Request(Message),
    /// A well-formed response.
    Response(Message),
    /// Answer the request with this status and reason phrase, then forget it.
    Reject {
        msg: Message,
        status: u16,
        reason: Cow<'static, str>,
    },
    Drop(DropReason),
}

/// Checks one received message. `max_size` is `server.max_message_size`.
pub fn check(bytes: &[u8], framing: Framing, max_size: usize) -> Verdict {
    let msg = match Message::parse(bytes, framing) {
        Ok(m) => m,
        Err(Malformed::Empty) => return Verdict::Drop(DropReason::Keepalive),
        Err(e) => return Verdict::Drop(DropReason::Unparseable(e)),
    };
    if !msg.is_request() {
        return match response_ok(&msg, bytes.len() <= max_size) {
            true => Verdict::Response(msg),
            false => Verdict::Drop(DropReason::BadResponse),
        };
    }
    let is_ack = msg.method() == Some("ACK");
    // Without a readable top Via there is nowhere to send an answer.
    if msg.top_via().is_err() {
        return Verdict::Drop(DropReason::NoVia);
    }
    match request_problem(&msg, bytes.len(), max_size) {
        None => Verdict::Request(msg),
        Some(_) if is_ack => Verdict::Drop(DropReason::BadAck),
        Some((status, reason)) => Verdict::Reject {
            msg,
            status,
            reason,
        },
    }
}

/// The first problem of a request, as (status, reason phrase).
fn request_problem(
    msg: &Message,
    size: usize,
    max_size: usize,
) -> Option<(u16, Cow<'static, str>)> {
    if size > max_size {
        return Some((513, "Message Too Large".into()));
    }
    let reject = |m: Malformed| Some((m.status(), Cow::Owned(m.to_string())));
    if let Some(d) = msg.defect() {
        return reject(d);
    }
    if let Err(e) = msg.via_count() {
        return reject(e);
    }
    if let Err(e) = msg.from() {
        return reject(e);
    }
    if let Err(e) = msg.to() {
        return reject(e);
    }
    if let Err(e) = msg.call_id() {
        return reject(e);
    }
    match msg.cseq() {
        Err(e) => return reject(e),
        Ok(cseq) if Some(cseq.method) != msg.method() => return reject(Malformed::CSeqMethod),
        Ok(_) => {}
    }
    let max_forwards = match msg.max_forwards() {
        Err(e) => return reject(e),
        Ok(mf) => mf,
    };
    // invariant: a request always has a Request-URI (checked by the start-line parser).
    let uri = msg.request_uri().unwrap_or_default();
    match SipUri::parse(uri) {
        Ok(_) => {}
        Err(UriError::Scheme) => return Some((416, "Unsupported URI Scheme".into())),
        Err(UriError::Malformed | UriError::NotAUri) => {
            return Some((400, "Malformed Request-URI".into()));
        }
    }
    // RFC 3261 §16.3 step 2: Max-Forwards 0 → 483, except an OPTIONS that the proxy may answer
    // itself (decided by the pipeline, which knows whether it is for us).
    if max_forwards == Some(0) && msg.method() != Some("OPTIONS") {
        return Some((483, "Too Many Hops".into()));
    }
    None
}

/// A response is usable if it is complete and its Via, CSeq and Call-ID can be read.
fn response_ok(msg: &Message, size_ok: bool) -> bool {
    size_ok
        && msg.defect().is_none()
        && msg.top_via().is_ok()
        && msg.cseq().is_ok()
        && msg.call_id().is_ok()
        && msg.from().is_ok()
        && msg.to().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(s: &str) -> (Option<u16>, String) {
        match check(s.as_bytes(), Framing::Datagram, 65535) {
            Verdict::Request(_) | Verdict::Response(_) => (None, "ok".into()),
            Verdict::Reject { status, reason, .. } => (Some(status), reason.into_owned()),
            Verdict::Drop(d) => (None, format!("drop {d:?}")),
        }
    }

    const BASE: &str = "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\nCall-ID: x\r\n";

    #[test]
    fn rules() {
        assert_eq!(
            verdict(&format!(
                "OPTIONS sip:b@example.com SIP/2.0\r\n{BASE}CSeq: 1 OPTIONS\r\n\r\n"
            )),
            (None, "ok".into())
        );
        assert_eq!(
            verdict(&format!(
                "INVITE sip:b@example.com SIP/2.0\r\n{BASE}CSeq: 1 OPTIONS\r\n\r\n"
            ))
            .0,
            Some(400)
        );
        assert_eq!(
            verdict(&format!(
                "INVITE tel:+1555 SIP/2.0\r\n{BASE}CSeq: 1 INVITE\r\n\r\n"
            ))
            .0,
            Some(416)
        );
        assert_eq!(
            verdict(&format!(
                "INVITE sip:b@example.com SIP/2.0\r\n{BASE}CSeq: 1 INVITE\r\nMax-Forwards: 0\r\n\r\n"
            ))
            .0,
            Some(483)
        );
        // A bad ACK is never answered.
        assert!(
            verdict(&format!("ACK sip:b@example.com SIP/2.0\r\n{BASE}\r\n"))
                .1
                .starts_with("drop")
        );
        // The reason phrase names the missing header.
        assert_eq!(
            verdict(&format!("BYE sip:b@example.com SIP/2.0\r\n{BASE}\r\n")),
            (Some(400), "Missing CSeq header".into())
        );
        assert!(
            verdict("OPTIONS sip:b@example.com SIP/2.0\r\nCSeq: 1 OPTIONS\r\n\r\n")
                .1
                .contains("NoVia")
        );
    }

    #[test]
    fn too_large() {
        let msg = format!("OPTIONS sip:b@example.com SIP/2.0\r\n{BASE}CSeq: 1 OPTIONS\r\n\r\n");
        match check(msg.as_bytes(), Framing::Datagram, 100) {
            Verdict::Reject { status: 513, .. } => {}
            other => panic!("{other:?}"),
        }
    }
}
