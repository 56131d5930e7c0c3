//! Targeted edits of a received message: every byte outside the edited spans is forwarded as
//! received. This is how a proxy stays transparent to headers, parameters and formatting it
//! does not understand (RFC 3261 §16.6: a proxy changes only what it must).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::ops::Range;

use super::header::HeaderName;
use super::headers::Via;
use super::parse::{Malformed, Message};
use super::scan::split_list;
use super::text::Ip;

/// One replacement: `at` (possibly empty, for an insertion) becomes `with`, a span of the
/// rewrite's text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edit {
    at: Range<usize>,
    with: Range<usize>,
    /// Order among insertions at the same offset.
    seq: usize,
}

/// A set of edits on one message, applied by [`Rewrite::finish`].
///
/// Edits must not overlap; each method below edits a distinct part of the message.
#[derive(Debug)]
pub struct Rewrite<'m> {
    msg: &'m Message,
    edits: Vec<Edit>,
    /// The new text of every edit, one after the other: one string for all of them, not one
    /// each (a forwarded request has four to six).
    text: String,
    body: Option<Vec<u8>>,
}

impl<'m> Rewrite<'m> {
    pub fn new(msg: &'m Message) -> Self {
        Self {
            msg,
            edits: Vec::with_capacity(8),
            text: String::with_capacity(256),
            body: None,
        }
    }

    fn push(&mut self, at: Range<usize>, with: &str) {
        let start = self.text.len();
        self.text.push_str(with);
        self.record(at, start);
    }

    /// Replaces `at` with formatted text, written straight into the rewrite's text.
    fn push_fmt(&mut self, at: Range<usize>, with: std::fmt::Arguments<'_>) {
        let start = self.text.len();
        let _ = self.text.write_fmt(with);
        self.record(at, start);
    }

    /// `at` becomes the text written since `start`.
    fn record(&mut self, at: Range<usize>, start: usize) {
        let seq = self.edits.len();
        self.edits.push(Edit {
            at,
            with: start..self.text.len(),
            seq,
        });
    }

    /// Inserts a header line before the header at `index`, or at the end of the header
    /// section when `index` is out of range.
    pub fn insert_header(&mut self, before: Option<usize>, name: &str, value: &str) {
        let at = before
            .and_then(|i| self.msg.headers().get(i))
            .map_or(self.msg.headers_end(), |h| h.line.start);
        let eol = self.msg.eol();
        self.push_fmt(at..at, format_args!("{name}: {value}{eol}"));
    }

    /// Adds a Via on top (RFC 3261 §16.6 step 8).
    pub fn push_via(&mut self, value: &str) {
        let first = self.index_of(HeaderName::Via);
        self.insert_header(first.or(Some(0)), "Via", value);
    }

    /// Removes the top Via value (RFC 3261 §16.7 step 3), keeping the others on its line.
    pub fn pop_via(&mut self) -> Result<(), Malformed> {
        self.pop_first_value(HeaderName::Via)
    }

    /// Removes the first Route value (loose routing, RFC 3261 §16.4).
    pub fn pop_route(&mut self) -> Result<(), Malformed> {
        self.pop_first_value(HeaderName::Route)
    }

    /// Removes the last Route value (strict-route compatibility, RFC 3261 §16.4).
    pub fn pop_last_route(&mut self) -> Result<(), Malformed> {
        let h = self
            .msg
            .headers_named(HeaderName::Route)
            .last()
            .ok_or(Malformed::Missing("Route"))?;
        let parts =
            split_list(self.msg.as_bytes(), h.value.clone()).ok_or(Malformed::Header("Route"))?;
        match parts.as_slice() {
            [] | [_] => self.push(h.line.clone(), ""),
            [.., before, last] => self.push(before.end..last.end, ""),
        }
        Ok(())
    }

    /// Adds a Record-Route value above the existing ones (RFC 3261 §16.6 step 4); with no
    /// Record-Route yet, it goes right after the Via headers.
    pub fn push_record_route(&mut self, value: &str) {
        let idx = self.index_of(HeaderName::RecordRoute).or_else(|| {
            let last_via = self
                .msg
                .headers()
                .iter()
                .rposition(|h| h.name == HeaderName::Via)?;
            Some(last_via + 1)
        });
        self.insert_header(idx, "Record-Route", value);
    }

    /// Adds a Route header right after the Via headers: the next hop's Route when the
    /// request had no other one left (an instance forwarding to the owner of a binding, README
    /// "Several instances"; a Route of ours popped by [`Self::pop_route`] may be there too).
    pub fn push_route(&mut self, value: &str) {
        let idx = self
            .msg
            .headers()
            .iter()
            .rposition(|h| h.name == HeaderName::Via)
            .map(|v| v + 1);
        self.insert_header(idx, "Route", value);
    }

    /// Like [`Self::set_via_received`], and adds `rport=<source port>` even when the client did
    /// not ask for it (Kamailio's `force_rport`, for clients behind NAT).
    pub fn force_via_rport(&mut self, via: &Via<'_>, source: SocketAddr) {
        let msg = self.msg;
        via_received(msg, via, source, true, &mut |at, text| {
            self.push_fmt(at, text)
        });
    }

    /// Sets `received` and, when the client asked for it, `rport` on the top Via
    /// (RFC 3261 §18.2.1, RFC 3581 §4). See [`via_received_edits`].
    pub fn set_via_received(&mut self, via: &Via<'_>, source: SocketAddr) {
        let msg = self.msg;
        via_received(msg, via, source, false, &mut |at, text| {
            self.push_fmt(at, text)
        });
    }

    /// Writes a new Max-Forwards value, adding the header when absent.
    pub fn set_max_forwards(&mut self, n: u8) {
        match self.msg.header(HeaderName::MaxForwards) {
            Some(h) => self.push_fmt(h.value.clone(), format_args!("{n}")),
            None => {
                let first_via = self.index_of(HeaderName::Via).map(|i| i + 1);
                self.insert_header(first_via, "Max-Forwards", &n.to_string());
            }
        }
    }

    /// Writes a new CSeq number, keeping the method (a trunk's authenticated re-send and the
    /// in-dialog CSeq offset it causes). Nothing happens without a CSeq header.
    pub fn set_cseq(&mut self, seq: u32) {
        let (Some(h), Ok(cseq)) = (self.msg.header(HeaderName::CSeq), self.msg.cseq()) else {
            return;
        };
        self.push_fmt(h.value.clone(), format_args!("{seq} {}", cseq.method));
    }

    /// Removes every header with this name.
    pub fn remove_headers(&mut self, name: HeaderName) {
        let spans: Vec<_> = self
            .msg
            .headers_named(name)
            .map(|h| h.line.clone())
            .collect();
        for line in spans {
            self.push(line, "");
        }
    }

    /// Replaces the whole value of the header at `index`.
    pub fn replace_value(&mut self, index: usize, value: &str) {
        if let Some(h) = self.msg.headers().get(index) {
            self.push(h.value.clone(), value);
        }
    }

    /// Replaces a span of the message (for example one Contact URI) with new text.
    pub fn replace_span(&mut self, at: Range<usize>, with: &str) {
        self.push(at, with);
    }

    /// Replaces the body; Content-Length follows (and is added if the message had none).
    pub fn replace_body(&mut self, body: Vec<u8>) {
        let len = body.len().to_string();
        match self.msg.header(HeaderName::ContentLength) {
            Some(h) => self.push(h.value.clone(), &len),
            None => self.insert_header(None, "Content-Length", &len),
        }
        self.body = Some(body);
    }

    /// Applies the edits and returns the new message bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let src = self.msg.as_bytes();
        let body_span = self.msg.body_span();
        let head = &src[..body_span.start];
        self.edits.sort_by_key(|e| (e.at.start, e.at.end, e.seq));
        let grow = self.text.len();
        let mut out = Vec::with_capacity(src.len() + grow);
        let mut pos = 0;
        for e in &self.edits {
            // Overlapping edits would be a bug of the caller; skip rather than corrupt.
            if e.at.start < pos || e.at.end > head.len() {
                debug_assert!(false, "overlapping or out-of-range edit {e:?}");
                continue;
            }
            out.extend_from_slice(&head[pos..e.at.start]);
            out.extend_from_slice(&self.text.as_bytes()[e.with.clone()]);
            pos = e.at.end;
        }
        out.extend_from_slice(&head[pos..]);
        match self.body {
            Some(body) => out.extend_from_slice(&body),
            None => out.extend_from_slice(&src[body_span]),
        }
        out
    }

    fn index_of(&self, name: HeaderName) -> Option<usize> {
        self.msg.headers().iter().position(|h| h.name == name)
    }

    /// Removes the first element of the first header with this name: the whole line when it
    /// holds a single value, else the element and its comma.
    fn pop_first_value(&mut self, name: HeaderName) -> Result<(), Malformed> {
        let h = self
            .msg
            .header(name)
            .ok_or(Malformed::Missing(name.as_str()))?;
        let parts = split_list(self.msg.as_bytes(), h.value.clone())
            .ok_or(Malformed::Header(name.as_str()))?;
        match parts.get(1) {
            None => self.push(h.line.clone(), ""),
            Some(second) => self.push(h.value.start..second.start, ""),
        }
        Ok(())
    }
}

/// The edits that put `received`/`rport` on a Via (RFC 3261 §18.2.1, RFC 3581 §4):
/// `received` when the sent-by host is not the source address, or always when `rport` is
/// present; `rport` gets the source port only when the client included it.
pub(crate) fn via_received_edits(
    msg: &Message,
    via: &Via<'_>,
    source: SocketAddr,
    force_rport: bool,
) -> Vec<(Range<usize>, String)> {
    let mut edits = Vec::new();
    via_received(msg, via, source, force_rport, &mut |at, text| {
        edits.push((at, text.to_string()));
    });
    edits
}

/// [`via_received_edits`], each edit handed to `edit` as it is decided (a span of `msg` and
/// its new text, in order; two insertions at one place go in the order given).
fn via_received(
    msg: &Message,
    via: &Via<'_>,
    source: SocketAddr,
    force_rport: bool,
    edit: &mut dyn FnMut(Range<usize>, std::fmt::Arguments<'_>),
) {
    let rport = via.param_span("rport");
    let sent_by_is_source = via.host.parse::<std::net::IpAddr>().ok() == Some(source.ip());
    // A parameter the Via lacks goes after the last one (or after sent-by when there are none).
    let end = || {
        let at = via
            .params
            .last()
            .map_or_else(|| via_sent_by_end(msg, via), |p| p.span.end);
        at..at
    };
    let ip = Ip(source.ip());
    if rport.is_some() || force_rport || !sent_by_is_source {
        let at = via
            .param_span("received")
            .map_or_else(end, |p| p.span.clone());
        edit(at, format_args!(";received={ip}"));
    }
    let port = source.port();
    match rport {
        Some(p) => edit(p.span.clone(), format_args!(";rport={port}")),
        None if force_rport => edit(end(), format_args!(";rport={port}")),
        None => {}
    }
}

/// The end of `host[:port]` in a Via value with no parameters: the value end minus trailing
/// white space or comment.
fn via_sent_by_end(msg: &Message, via: &Via<'_>) -> usize {
    let bytes = msg.bytes_at(via.span.clone());
    let end = bytes.iter().position(|&b| b == b'(').unwrap_or(bytes.len());
    let trimmed = bytes[..end]
        .iter()
        .rposition(|b| !super::scan::is_lws(*b))
        .map_or(0, |p| p + 1);
    via.span.start + trimmed
}

/// Applies `edits` (absolute offsets inside `range`) to `msg[range]` and returns the text.
pub(crate) fn apply_within(
    msg: &Message,
    range: Range<usize>,
    mut edits: Vec<(Range<usize>, String)>,
) -> Vec<u8> {
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    let src = msg.as_bytes();
    let mut out = Vec::with_capacity(range.len() + 64);
    let mut pos = range.start;
    for (at, with) in edits {
        if at.start < pos || at.end > range.end {
            continue;
        }
        out.extend_from_slice(&src[pos..at.start]);
        out.extend_from_slice(with.as_bytes());
        pos = at.end;
    }
    out.extend_from_slice(&src[pos..range.end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::Framing;

    const REQ: &str = "INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK1;rport, SIP/2.0/UDP p.example.com;branch=z9hG4bK0\r\n\
Route: <sip:proxy.example.com;lr>, <sip:next.example.net;lr>\r\n\
Max-Forwards: 70\r\n\
X-Odd-Header :  keep   me\r\n\
To: <sip:bob@example.com>\r\n\
From: <sip:alice@example.com>;tag=1\r\n\
Call-ID: c1\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 3\r\n\
\r\n\
abc";

    fn msg() -> Message {
        Message::parse(REQ.as_bytes(), Framing::Datagram).unwrap()
    }

    #[test]
    fn no_edits_is_identity() {
        let m = msg();
        assert_eq!(Rewrite::new(&m).finish(), REQ.as_bytes());
    }

    #[test]
    fn forwarding_edits_touch_only_their_spans() {
        let m = msg();
        let via = m.top_via().unwrap();
        let mut rw = Rewrite::new(&m);
        rw.set_via_received(&via, "203.0.113.7:40000".parse().unwrap());
        rw.push_via("SIP/2.0/UDP 198.51.100.1;branch=z9hG4bKnew");
        rw.pop_route().unwrap();
        rw.set_max_forwards(69);
        rw.push_record_route("<sip:198.51.100.1;lr>");
        let out = String::from_utf8(rw.finish()).unwrap();
        let want = REQ
            .replace(
                "Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK1;rport,",
                "Via: SIP/2.0/UDP 198.51.100.1;branch=z9hG4bKnew\r\n\
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK1;rport=40000;received=203.0.113.7,",
            )
            .replace(
                "Route: <sip:proxy.example.com;lr>, <sip:next",
                "Record-Route: <sip:198.51.100.1;lr>\r\nRoute: <sip:next",
            )
            .replace("Max-Forwards: 70", "Max-Forwards: 69");
        assert_eq!(out, want);
        let again = Message::parse(out.as_bytes(), Framing::Datagram).unwrap();
        assert_eq!(again.vias().unwrap().len(), 3);
        assert_eq!(again.route_set(HeaderName::Route).unwrap().len(), 1);
    }

    #[test]
    fn pop_last_route() {
        let m = msg();
        let mut rw = Rewrite::new(&m);
        rw.pop_last_route().unwrap();
        let out = String::from_utf8(rw.finish()).unwrap();
        assert!(
            out.contains("Route: <sip:proxy.example.com;lr>\r\n"),
            "{out}"
        );
        let m = Message::parse(out.as_bytes(), Framing::Datagram).unwrap();
        let mut rw = Rewrite::new(&m);
        rw.pop_last_route().unwrap();
        assert!(!String::from_utf8(rw.finish()).unwrap().contains("Route:"));
    }

    #[test]
    fn pop_via_and_body() {
        let m = msg();
        let mut rw = Rewrite::new(&m);
        rw.pop_via().unwrap();
        rw.replace_body(b"hello".to_vec());
        let out = String::from_utf8(rw.finish()).unwrap();
        assert!(out.starts_with(
            "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP p.example.com;branch=z9hG4bK0\r\n"
        ));
        assert!(out.ends_with("Content-Length: 5\r\n\r\nhello"));
        // A single-valued line disappears entirely.
        let m2 = Message::parse(out.as_bytes(), Framing::Datagram).unwrap();
        let mut rw = Rewrite::new(&m2);
        rw.pop_via().unwrap();
        let out = String::from_utf8(rw.finish()).unwrap();
        assert!(!out.contains("Via"));
    }

    #[test]
    fn received_rules() {
        let m = Message::parse(
            b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060\r\n\r\n",
            Framing::Datagram,
        )
        .unwrap();
        let via = m.top_via().unwrap();
        // Same address, no rport: nothing to add.
        assert!(via_received_edits(&m, &via, "192.0.2.1:5060".parse().unwrap(), false).is_empty());
        // force_rport: received and rport even though the client did not ask.
        let mut rw = Rewrite::new(&m);
        rw.force_via_rport(&via, "192.0.2.1:40000".parse().unwrap());
        let out = String::from_utf8(rw.finish()).unwrap();
        assert!(
            out.contains("Via: SIP/2.0/UDP 192.0.2.1:5060;received=192.0.2.1;rport=40000\r\n"),
            "{out}"
        );
        let mut rw = Rewrite::new(&m);
        rw.set_via_received(&via, "192.0.2.9:5060".parse().unwrap());
        let out = String::from_utf8(rw.finish()).unwrap();
        assert!(out.contains("Via: SIP/2.0/UDP 192.0.2.1:5060;received=192.0.2.9\r\n"));
    }
}
