//! Matching messages to transactions (RFC 3261 §17.1.3 for responses, §17.2.3 for requests).
//!
//! A transaction is identified by the branch and sent-by of the top Via and by the method.
//! For a request, the method is that of the request line, except that an ACK belongs to the
//! INVITE it acknowledges (§17.2.3); a CANCEL has its own transaction. For a response, the
//! method is that of CSeq and the top Via is ours (§17.1.3), so the key of a response equals
//! the [`server_key`] of the request as we forwarded it.
//!
//! Only branches with the RFC 3261 magic cookie `z9hG4bK` (§8.1.1.7) are globally unique and
//! matched this way. Requests from RFC 2543 elements (§17.2.3's backwards-compatible matching
//! on Request-URI, tags, Call-ID and CSeq) get no key: the caller treats them as new.

use std::fmt::Write as _;

use crate::sip::Message;

/// The magic cookie that starts every RFC 3261 branch (RFC 3261 §8.1.1.7).
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// What identifies a transaction (RFC 3261 §17.1.3, §17.2.3): the `branch` parameter of the
/// top Via, as written (compared case-sensitively); its sent-by, `host:port` with the host
/// lower-cased, an IPv6 reference in brackets, and port 5060 when none is written; and the
/// method of the transaction (`INVITE` for an ACK, CSeq's method for a response).
///
/// The three in one allocation (`method SP branch SP sent-by`): a key is built for every
/// message and copied into the tables, and three strings each were ~35 allocations per
/// proxied call (issue #15).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TxnKey {
    text: Box<str>,
    /// Where the method and the branch end in `text`.
    method_end: usize,
    branch_end: usize,
}

impl TxnKey {
    /// The key of `branch`, `sent_by` (already normalised) and `method`.
    pub fn new(branch: &str, sent_by: &str, method: &str) -> Self {
        Self::build(method, branch, sent_by.len(), |t| t.push_str(sent_by))
    }

    /// `sent_by_len` bytes written by `sent_by` after the method, the branch and their
    /// separators.
    fn build(
        method: &str,
        branch: &str,
        sent_by_len: usize,
        sent_by: impl FnOnce(&mut String),
    ) -> Self {
        let mut text = String::with_capacity(method.len() + branch.len() + sent_by_len + 2);
        text.push_str(method);
        text.push(' ');
        text.push_str(branch);
        text.push(' ');
        sent_by(&mut text);
        Self {
            text: text.into_boxed_str(),
            method_end: method.len(),
            branch_end: method.len() + 1 + branch.len(),
        }
    }

    pub fn branch(&self) -> &str {
        self.text
            .get(self.method_end + 1..self.branch_end)
            .unwrap_or_default()
    }

    pub fn sent_by(&self) -> &str {
        self.text.get(self.branch_end + 1..).unwrap_or_default()
    }

    pub fn method(&self) -> &str {
        self.text.get(..self.method_end).unwrap_or_default()
    }
}

impl std::fmt::Debug for TxnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnKey")
            .field("branch", &self.branch())
            .field("sent_by", &self.sent_by())
            .field("method", &self.method())
            .finish()
    }
}

/// For a received request: the key of the server transaction it belongs to. ACK maps to the
/// INVITE's key (method `INVITE`); CANCEL has its own key (method `CANCEL`).
///
/// Only RFC 3261 branches (starting `z9hG4bK`) are matched this way; for others, or when the
/// top Via cannot be read, this returns `None` (the caller treats the request as new).
pub fn server_key(req: &Message) -> Option<TxnKey> {
    let method = req.method()?;
    // RFC 3261 §17.2.3: "the method of the request matches the one that created the
    // transaction, except for ACK, where the method of the request that created the
    // transaction is INVITE".
    let method = if method == "ACK" { "INVITE" } else { method };
    via_key(req, method)
}

/// The server key of the INVITE a CANCEL cancels (same branch and sent-by, method `INVITE`;
/// RFC 3261 §9.2). `None` when `cancel` is not a CANCEL or has no RFC 3261 branch.
pub fn invite_key_for_cancel(cancel: &Message) -> Option<TxnKey> {
    if cancel.method()? != "CANCEL" {
        return None;
    }
    via_key(cancel, "INVITE")
}

/// For a received response: the key of the client transaction (top Via branch and CSeq method,
/// RFC 3261 §17.1.3; sent-by is that of the top Via, which is ours).
pub fn client_key(resp: &Message) -> Option<TxnKey> {
    resp.status()?;
    let cseq = resp.cseq().ok()?;
    via_key(resp, cseq.method)
}

fn via_key(msg: &Message, method: &str) -> Option<TxnKey> {
    let via = msg.top_via().ok()?;
    let branch = via.branch()?;
    if !branch.starts_with(MAGIC_COOKIE) {
        return None;
    }
    // The sent-by, normalised so that equal values compare equal: `host:port`, the host
    // lower-cased, an IPv6 reference in brackets, 5060 when no port is written.
    let host = via.host;
    let port = via.port.unwrap_or(5060);
    let v6 = host.contains(':');
    let digits = port.checked_ilog10().unwrap_or(0) as usize + 1;
    let len = host.len() + 1 + digits + 2 * usize::from(v6);
    Some(TxnKey::build(method, branch, len, |t| {
        if v6 {
            t.push('[');
        }
        t.extend(host.chars().map(|c| c.to_ascii_lowercase()));
        if v6 {
            t.push(']');
        }
        let _ = write!(t, ":{port}");
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Framing;

    fn msg(s: &str) -> Message {
        Message::parse(s.as_bytes(), Framing::Datagram).unwrap()
    }

    fn request(method: &str, via: &str) -> Message {
        msg(&format!(
            "{method} sip:bob@example.com SIP/2.0\r\n\
Via: {via}\r\n\
Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKuac\r\n\
To: <sip:bob@example.com>\r\n\
From: <sip:alice@example.com>;tag=a\r\n\
Call-ID: k1\r\n\
CSeq: 1 {method}\r\n\
Content-Length: 0\r\n\r\n"
        ))
    }

    const VIA: &str = "SIP/2.0/UDP Proxy.Example.COM:5070;branch=z9hG4bK776asdhds";

    #[test]
    fn ack_maps_to_the_invite_and_cancel_has_its_own() {
        let invite = server_key(&request("INVITE", VIA)).unwrap();
        assert_eq!(
            invite,
            TxnKey::new("z9hG4bK776asdhds", "proxy.example.com:5070", "INVITE")
        );
        let ack = server_key(&request("ACK", VIA)).unwrap();
        assert_eq!(ack, invite);
        let cancel = request("CANCEL", VIA);
        let cancel_key = server_key(&cancel).unwrap();
        assert_eq!(cancel_key.method(), "CANCEL");
        assert_ne!(cancel_key, invite);
        assert_eq!(invite_key_for_cancel(&cancel), Some(invite.clone()));
        // Not a CANCEL: no INVITE to find.
        assert_eq!(invite_key_for_cancel(&request("BYE", VIA)), None);
        assert_eq!(server_key(&request("BYE", VIA)).unwrap().method(), "BYE");
    }

    #[test]
    fn sent_by_and_branch_rules() {
        let a = server_key(&request("INVITE", VIA)).unwrap();
        // Host case does not matter; the port does.
        let b = server_key(&request(
            "INVITE",
            "SIP/2.0/UDP proxy.example.com:5070;branch=z9hG4bK776asdhds",
        ))
        .unwrap();
        assert_eq!(a, b);
        let c = server_key(&request(
            "INVITE",
            "SIP/2.0/UDP proxy.example.com:5071;branch=z9hG4bK776asdhds",
        ))
        .unwrap();
        assert_ne!(a, c);
        let d = server_key(&request(
            "INVITE",
            "SIP/2.0/UDP other.example.com:5070;branch=z9hG4bK776asdhds",
        ))
        .unwrap();
        assert_ne!(a, d);
        // No port means 5060.
        let e = server_key(&request(
            "INVITE",
            "SIP/2.0/UDP h.example.com;branch=z9hG4bKx",
        ))
        .unwrap();
        assert_eq!(e.sent_by(), "h.example.com:5060");
        let v6 = server_key(&request(
            "INVITE",
            "SIP/2.0/UDP [2001:DB8::1];branch=z9hG4bKx",
        ))
        .unwrap();
        assert_eq!(v6.sent_by(), "[2001:db8::1]:5060");
        assert_eq!(v6.branch(), "z9hG4bKx");
        assert_eq!(v6.method(), "INVITE");
        // The branch is compared as written.
        let f = server_key(&request(
            "INVITE",
            "SIP/2.0/UDP proxy.example.com:5070;branch=z9hG4bK776ASDHDS",
        ))
        .unwrap();
        assert_ne!(a, f);
        // RFC 2543 branches (or none) are not matched by key.
        assert_eq!(
            server_key(&request("INVITE", "SIP/2.0/UDP h.example.com;branch=1234")),
            None
        );
        assert_eq!(
            server_key(&request("INVITE", "SIP/2.0/UDP h.example.com")),
            None
        );
    }

    #[test]
    fn response_maps_to_the_client_key() {
        let forwarded = request("INVITE", VIA);
        let resp = msg(&format!(
            "SIP/2.0 180 Ringing\r\n\
Via: {VIA};received=192.0.2.99\r\n\
Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKuac\r\n\
To: <sip:bob@example.com>;tag=b\r\n\
From: <sip:alice@example.com>;tag=a\r\n\
Call-ID: k1\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n"
        ));
        let key = client_key(&resp).unwrap();
        assert_eq!(key.method(), "INVITE");
        assert_eq!(Some(key), server_key(&forwarded));
        // The response to a CANCEL belongs to the CANCEL's client transaction.
        let resp = msg(&format!(
            "SIP/2.0 200 OK\r\nVia: {VIA}\r\nCSeq: 1 CANCEL\r\n\r\n"
        ));
        assert_eq!(client_key(&resp).unwrap().method(), "CANCEL");
        // A request is not a response.
        assert_eq!(client_key(&forwarded), None);
    }
}
