//! Typed views of the headers a proxy must understand: Via (RFC 3261 §20.42, RFC 3581),
//! name-addr headers From/To/Contact/Route/Record-Route (§20.10, §20.20, §20.30, §20.34,
//! §20.39), CSeq (§20.16) and Max-Forwards (§20.22). Each view keeps absolute offsets so that
//! the rewrite layer can edit the exact bytes.

use std::borrow::Cow;
use std::ops::Range;

use super::header::HeaderName;
use super::parse::{Malformed, Message};
use super::scan::{
    Param, Params, first_of_list, is_lws, is_token, parse_decimal, parse_params, scan_list,
    skip_lws, skip_quoted, split_list, trim,
};

/// One Via value: `SIP/2.0/UDP host:port;params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via<'m> {
    pub transport: &'m str,
    /// Host as written, without the brackets of an IPv6 reference.
    pub host: &'m str,
    pub port: Option<u16>,
    /// Borrowed from the message for its top Via (parsed once, kept with it), owned otherwise.
    pub params: Cow<'m, Params>,
    /// The whole value (within its header line).
    pub span: Range<usize>,
    buf: &'m [u8],
}

/// A Via value as offsets into its message: how [`Message`] keeps its top Via, so that the
/// transaction key, the sanity checks, NAT detection, the reply and the forward (each asks for
/// it) share one parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ViaSpans {
    transport: Range<usize>,
    host: Range<usize>,
    port: Option<u16>,
    params: Params,
    span: Range<usize>,
}

impl ViaSpans {
    /// The view of these spans in `buf`, the message they were scanned from; `params` are
    /// these spans' own, borrowed or taken.
    fn view<'m>(&self, buf: &'m [u8], params: Cow<'m, Params>) -> Via<'m> {
        Via {
            transport: scanned_str(buf, self.transport.clone()),
            host: scanned_str(buf, self.host.clone()),
            port: self.port,
            params,
            span: self.span.clone(),
            buf,
        }
    }
}

impl<'m> Via<'m> {
    pub fn param(&self, name: &str) -> Option<&'m str> {
        let p = self.params.find(self.buf, name)?;
        Some(match &p.value {
            Some(v) => std::str::from_utf8(&self.buf[v.clone()]).unwrap_or(""),
            None => "",
        })
    }

    pub fn param_span(&self, name: &str) -> Option<&Param> {
        self.params.find(self.buf, name)
    }

    pub fn branch(&self) -> Option<&'m str> {
        self.param("branch")
    }

    /// True when the transport is connection-oriented (TCP, TLS, SCTP, WS).
    pub fn is_reliable(&self) -> bool {
        !self.transport.eq_ignore_ascii_case("UDP")
    }
}

/// A `name-addr` or `addr-spec` with header parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr<'m> {
    /// The display name as written (quoted or not), if any.
    pub display: Option<Range<usize>>,
    pub uri: &'m str,
    pub uri_span: Range<usize>,
    /// Borrowed from the message for its From and To (parsed once, kept with it), owned
    /// otherwise.
    pub params: Cow<'m, Params>,
    /// The whole element.
    pub span: Range<usize>,
    buf: &'m [u8],
}

/// A name-addr as offsets into its message, its URI checked to be UTF-8: how [`Message`]
/// keeps its From and To.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NameAddrSpans {
    display: Option<Range<usize>>,
    uri_span: Range<usize>,
    params: Params,
    span: Range<usize>,
}

impl NameAddrSpans {
    /// The view of these spans in `buf`, the message they were scanned from.
    fn view<'m>(&self, buf: &'m [u8], params: Cow<'m, Params>) -> NameAddr<'m> {
        NameAddr {
            display: self.display.clone(),
            uri: scanned_str(buf, self.uri_span.clone()),
            uri_span: self.uri_span.clone(),
            params,
            span: self.span.clone(),
            buf,
        }
    }
}

/// A message's From and To, each parsed or the reason it could not be.
#[derive(Debug, Clone)]
pub(crate) struct Parties {
    from: Result<NameAddrSpans, Malformed>,
    to: Result<NameAddrSpans, Malformed>,
}

impl<'m> NameAddr<'m> {
    pub fn param(&self, name: &str) -> Option<&'m str> {
        let p = self.params.find(self.buf, name)?;
        Some(match &p.value {
            Some(v) => std::str::from_utf8(&self.buf[v.clone()]).unwrap_or(""),
            None => "",
        })
    }

    pub fn tag(&self) -> Option<&'m str> {
        self.param("tag")
    }
}

/// A Contact header value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // built for a moment while a message is read, never kept
pub enum ContactValue<'m> {
    /// `Contact: *` (RFC 3261 §10.2.2).
    Star,
    Addr(NameAddr<'m>),
}

/// The CSeq header: sequence number and method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CSeq<'m> {
    pub seq: u32,
    pub method: &'m str,
}

fn utf8(buf: &[u8], r: Range<usize>) -> Option<&str> {
    std::str::from_utf8(&buf[r]).ok()
}

/// Parses one Via value at `r`. LWS is allowed around the `/` separators (RFC 3261 §25.1).
pub fn parse_via(buf: &[u8], r: Range<usize>) -> Option<Via<'_>> {
    let mut spans = scan_via(buf, r)?;
    let params = std::mem::take(&mut spans.params);
    Some(spans.view(buf, Cow::Owned(params)))
}

/// Text that [`scan_via`] checked to be UTF-8 (so the empty fallback is never taken).
fn scanned_str(buf: &[u8], r: Range<usize>) -> &str {
    std::str::from_utf8(&buf[r]).unwrap_or("")
}

/// The spans of the Via value at `r`, its host and transport checked to be UTF-8.
fn scan_via(buf: &[u8], r: Range<usize>) -> Option<ViaSpans> {
    let end = r.end;
    let mut i = r.start;
    let mut protocol = [0..0, 0..0, 0..0];
    for (n, slot) in protocol.iter_mut().enumerate() {
        i = skip_lws(buf, i, end);
        let s = i;
        while i < end && is_token(buf[i]) {
            i += 1;
        }
        if i == s {
            return None;
        }
        *slot = s..i;
        i = skip_lws(buf, i, end);
        if n < 2 {
            if i >= end || buf[i] != b'/' {
                return None;
            }
            i += 1;
        }
    }
    if !buf[protocol[0].clone()].eq_ignore_ascii_case(b"SIP") {
        return None;
    }
    let transport = protocol[2].clone();
    utf8(buf, transport.clone())?;
    // sent-by = host [ COLON port ]
    i = skip_lws(buf, i, end);
    let (host, mut i) = if i < end && buf[i] == b'[' {
        let close = buf[i..end].iter().position(|&b| b == b']')? + i;
        (i + 1..close, close + 1)
    } else {
        let s = i;
        while i < end && (buf[i].is_ascii_alphanumeric() || buf[i] == b'-' || buf[i] == b'.') {
            i += 1;
        }
        (s..i, i)
    };
    if host.is_empty() {
        return None;
    }
    utf8(buf, host.clone())?;
    i = skip_lws(buf, i, end);
    let mut port = None;
    if i < end && buf[i] == b':' {
        i = skip_lws(buf, i + 1, end);
        let s = i;
        while i < end && buf[i].is_ascii_digit() {
            i += 1;
        }
        port = Some(u16::try_from(parse_decimal(&buf[s..i], 65535)?).ok()?);
    }
    // A trailing comment "(...)" is allowed by the grammar; ignore it.
    let mut pend = end;
    if let Some(paren) = buf[i..end].iter().position(|&b| b == b'(') {
        pend = i + paren;
    }
    let params = parse_params(buf, trim(buf, i..pend))?;
    Some(ViaSpans {
        transport,
        host,
        port,
        params,
        span: r,
    })
}

/// Parses a name-addr / addr-spec with parameters at `r`.
pub fn parse_name_addr(buf: &[u8], r: Range<usize>) -> Option<NameAddr<'_>> {
    let mut spans = scan_name_addr(buf, r)?;
    let params = std::mem::take(&mut spans.params);
    Some(spans.view(buf, Cow::Owned(params)))
}

/// The spans of the name-addr / addr-spec at `r`, its URI checked to be UTF-8.
fn scan_name_addr(buf: &[u8], r: Range<usize>) -> Option<NameAddrSpans> {
    let end = r.end;
    let mut i = skip_lws(buf, r.start, end);
    if i >= end {
        return None;
    }
    let display_start = i;
    let mut display = None;
    // Display name: quoted string or tokens, followed by '<'.
    if buf[i] == b'"' {
        i = skip_quoted(buf, i, end)?;
        display = Some(display_start..i);
        i = skip_lws(buf, i, end);
        if i >= end || buf[i] != b'<' {
            return None;
        }
    } else if let Some(lt) = buf[i..end].iter().position(|&b| b == b'<') {
        // Tokens before '<' must not contain URI punctuation of an addr-spec.
        let before = &buf[i..i + lt];
        if before.iter().all(|&b| is_token(b) || is_lws(b)) {
            let t = trim(buf, i..i + lt);
            if !t.is_empty() {
                display = Some(t);
            }
            i += lt;
        }
    }
    let (uri_span, after) = if i < end && buf[i] == b'<' {
        let close = buf[i..end].iter().position(|&b| b == b'>')? + i;
        (trim(buf, i + 1..close), close + 1)
    } else {
        // addr-spec: the URI ends at the first ';' (RFC 3261 §20: parameters after an
        // addr-spec belong to the header) or at white space.
        let s = i;
        while i < end && buf[i] != b';' && !is_lws(buf[i]) {
            i += 1;
        }
        (s..i, i)
    };
    let uri = utf8(buf, uri_span.clone())?;
    if uri.is_empty() || !uri.contains(':') {
        return None;
    }
    let params = parse_params(buf, trim(buf, after..end))?;
    Some(NameAddrSpans {
        display,
        uri_span,
        params,
        span: r,
    })
}

/// Typed access to the headers of a [`Message`].
impl Message {
    /// Every Via value in order, across all Via header lines.
    pub fn vias(&self) -> Result<Vec<Via<'_>>, Malformed> {
        let mut out = Vec::new();
        self.for_each_via(|v| out.push(v))?;
        Ok(out)
    }

    /// [`Self::vias`] one by one, without a vector: `each` gets every Via in order until a
    /// malformed one, which is the error (`each` may have seen the Vias before it).
    pub fn for_each_via<'m>(&'m self, mut each: impl FnMut(Via<'m>)) -> Result<(), Malformed> {
        let buf = self.as_bytes();
        for h in self.headers_named(HeaderName::Via) {
            let mut ok = true;
            let scanned = scan_list(buf, h.value.clone(), |p| {
                if ok {
                    match parse_via(buf, p) {
                        Some(v) => each(v),
                        None => ok = false,
                    }
                }
            });
            if !ok || scanned.is_none() {
                return Err(Malformed::Header("Via"));
            }
        }
        Ok(())
    }

    /// How many Via values the message has (all of them checked).
    pub fn via_count(&self) -> Result<usize, Malformed> {
        let mut n = 0;
        self.for_each_via(|_| n += 1)?;
        Ok(n)
    }

    /// The topmost Via value (the one that routes a response). Parsed on the first call and
    /// kept with the message (which never changes): the later calls cost no parse.
    pub fn top_via(&self) -> Result<Via<'_>, Malformed> {
        let spans =
            self.top_via_spans(|buf, h| scan_via(buf, first_of_list(buf, h.value.clone())?));
        match spans {
            Some(v) => Ok(v.view(self.as_bytes(), Cow::Borrowed(&v.params))),
            None if self.header(HeaderName::Via).is_none() => Err(Malformed::Missing("Via")),
            None => Err(Malformed::Header("Via")),
        }
    }

    /// The single From or To header.
    pub fn name_addr(&self, name: HeaderName) -> Result<NameAddr<'_>, Malformed> {
        let kept = match name {
            HeaderName::From => &self.parties().from,
            HeaderName::To => &self.parties().to,
            _ => {
                let h = self.single(name)?;
                return parse_name_addr(self.as_bytes(), h.value.clone())
                    .ok_or(Malformed::Header(name.as_str()));
            }
        };
        let spans = kept.as_ref().map_err(|e| *e)?;
        Ok(spans.view(self.as_bytes(), Cow::Borrowed(&spans.params)))
    }

    /// From and To, scanned on the first call.
    fn parties(&self) -> &Parties {
        self.parties_spans(|m| {
            let scan = |name: HeaderName| {
                let h = m.single(name)?;
                scan_name_addr(m.as_bytes(), h.value.clone())
                    .ok_or(Malformed::Header(name.as_str()))
            };
            Parties {
                from: scan(HeaderName::From),
                to: scan(HeaderName::To),
            }
        })
    }

    pub fn from(&self) -> Result<NameAddr<'_>, Malformed> {
        self.name_addr(HeaderName::From)
    }

    pub fn to(&self) -> Result<NameAddr<'_>, Malformed> {
        self.name_addr(HeaderName::To)
    }

    pub fn call_id(&self) -> Result<&str, Malformed> {
        let h = self.single(HeaderName::CallId)?;
        let v = self
            .str_at(h.value.clone())
            .ok_or(Malformed::Header("Call-ID"))?;
        if v.is_empty() || v.bytes().any(is_lws) {
            return Err(Malformed::Header("Call-ID"));
        }
        Ok(v)
    }

    pub fn cseq(&self) -> Result<CSeq<'_>, Malformed> {
        let h = self.single(HeaderName::CSeq)?;
        let bad = Malformed::Header("CSeq");
        let v = self.str_at(h.value.clone()).ok_or(bad)?;
        let (num, method) = v.split_once(|c: char| c.is_ascii_whitespace()).ok_or(bad)?;
        let method = method.trim();
        // RFC 3261 §8.1.1.5: the number is a 32-bit unsigned below 2**31.
        let seq = parse_decimal(num.as_bytes(), (1 << 31) - 1).ok_or(bad)? as u32;
        if method.is_empty() || !method.bytes().all(is_token) {
            return Err(bad);
        }
        Ok(CSeq { seq, method })
    }

    /// Max-Forwards, if present (RFC 3261 §20.22: 0-255).
    pub fn max_forwards(&self) -> Result<Option<u8>, Malformed> {
        let mut it = self.headers_named(HeaderName::MaxForwards);
        let Some(h) = it.next() else {
            return Ok(None);
        };
        if it.next().is_some() {
            return Err(Malformed::Duplicate("Max-Forwards"));
        }
        parse_decimal(self.bytes_at(h.value.clone()), 255)
            .map(|n| Some(n as u8))
            .ok_or(Malformed::Header("Max-Forwards"))
    }

    /// Every Contact value, in order.
    pub fn contacts(&self) -> Result<Vec<ContactValue<'_>>, Malformed> {
        let mut out: Vec<ContactValue<'_>> = Vec::new();
        self.for_each_contact(|c| {
            // One at a time: a value is a few hundred bytes and a message has one or two (a
            // Vec's first growth would take four, over a kilobyte, past the allocator's fast bins).
            out.reserve_exact(out.len().max(1));
            out.push(c);
        })?;
        Ok(out)
    }

    /// Every Contact value in order, without collecting them. An error (a malformed value
    /// anywhere) comes after the values before it were seen: a caller that must not act on
    /// part of the list keeps what it learnt until `Ok`.
    pub fn for_each_contact<'m>(
        &'m self,
        mut each: impl FnMut(ContactValue<'m>),
    ) -> Result<(), Malformed> {
        let buf = self.as_bytes();
        for h in self.headers_named(HeaderName::Contact) {
            let mut ok = true;
            scan_list(buf, h.value.clone(), |p| {
                if !ok {
                    return;
                }
                if &buf[p.clone()] == b"*" {
                    each(ContactValue::Star);
                } else {
                    match parse_name_addr(buf, p) {
                        Some(a) => each(ContactValue::Addr(a)),
                        None => ok = false,
                    }
                }
            })
            .filter(|_| ok)
            .ok_or(Malformed::Header("Contact"))?;
        }
        Ok(())
    }

    /// Every value of a route-like header (Route, Record-Route, Path), in order.
    pub fn route_set(&self, name: HeaderName) -> Result<Vec<NameAddr<'_>>, Malformed> {
        let mut out = Vec::new();
        for h in self.headers_named(name) {
            let parts = split_list(self.as_bytes(), h.value.clone())
                .ok_or(Malformed::Header(name.as_str()))?;
            // Exact: a name-addr is a few hundred bytes (see `contacts`).
            out.reserve_exact(parts.len());
            for p in parts {
                out.push(
                    parse_name_addr(self.as_bytes(), p).ok_or(Malformed::Header(name.as_str()))?,
                );
            }
        }
        Ok(out)
    }

    /// The one header of a single-valued kind: missing and duplicates are errors.
    fn single(&self, name: HeaderName) -> Result<&super::parse::Header, Malformed> {
        let mut it = self.headers_named(name);
        let h = it.next().ok_or(Malformed::Missing(name.as_str()))?;
        if it.next().is_some() {
            return Err(Malformed::Duplicate(name.as_str()));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::Framing;

    fn msg(s: &str) -> Message {
        Message::parse(s.as_bytes(), Framing::Datagram).unwrap()
    }

    #[test]
    fn via_forms() {
        let m = msg("OPTIONS sip:a@b SIP/2.0\r\n\
v: SIP / 2.0 / UDP first.example.com: 4000;ttl=16\r\n  ;maddr=224.2.0.1 ;branch=z9hG4bKa, SIP/2.0/TCP [2001:db8::9]:5061;received=192.0.2.1;rport\r\n\
Via: SIP/2.0/UDP 10.0.0.1\r\n\r\n");
        let vias = m.vias().unwrap();
        assert_eq!(vias.len(), 3);
        assert_eq!(vias[0].host, "first.example.com");
        assert_eq!(vias[0].port, Some(4000));
        assert_eq!(vias[0].branch(), Some("z9hG4bKa"));
        assert_eq!(vias[0].param("maddr"), Some("224.2.0.1"));
        assert_eq!(vias[1].transport, "TCP");
        assert_eq!(vias[1].host, "2001:db8::9");
        assert_eq!(vias[1].param("rport"), Some(""));
        assert!(vias[1].is_reliable());
        assert_eq!(vias[2].port, None);
        assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bKa"));
    }

    #[test]
    fn top_via_is_parsed_once_and_equals_the_first_via() {
        let m = msg("OPTIONS sip:a@b SIP/2.0\r\n\
Via: SIP/2.0/TLS [2001:db8::9]:5061;received=192.0.2.1;rport;branch=z9hG4bKq (c)\r\n\
Via: SIP/2.0/UDP 10.0.0.1\r\n\r\n");
        let top = m.top_via().unwrap();
        assert!(
            matches!(top.params, Cow::Borrowed(_)),
            "kept with the message"
        );
        assert_eq!(top, m.vias().unwrap()[0]);
        assert_eq!(m.top_via().unwrap(), top, "the second call sees the same");
        assert_eq!(top.host, "2001:db8::9");
        assert_eq!(top.transport, "TLS");
        assert_eq!(top.branch(), Some("z9hG4bKq"));

        let none = msg("OPTIONS sip:a@b SIP/2.0\r\nTo: <sip:a@b>\r\n\r\n");
        assert_eq!(none.top_via(), Err(Malformed::Missing("Via")));
        assert_eq!(none.top_via(), Err(Malformed::Missing("Via")));
        let bad = msg("OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP\r\n\r\n");
        assert_eq!(bad.top_via(), Err(Malformed::Header("Via")));
        assert_eq!(bad.top_via(), Err(Malformed::Header("Via")));
    }

    #[test]
    fn from_and_to_are_parsed_once_with_their_errors() {
        let m = msg("OPTIONS sip:a@b SIP/2.0\r\n\
From: \"A\" <sip:alice@example.com>;tag=1\r\n\
To: sip:bob@example.com\r\n\r\n");
        let from = m.from().unwrap();
        assert!(
            matches!(from.params, Cow::Borrowed(_)),
            "kept with the message"
        );
        assert_eq!(m.from().unwrap(), from, "the second call sees the same");
        let fresh = parse_name_addr(m.as_bytes(), from.span.clone()).unwrap();
        assert_eq!(fresh, from, "equal to a parse of its own");
        assert_eq!((from.uri, from.tag()), ("sip:alice@example.com", Some("1")));
        assert_eq!(
            (m.to().unwrap().uri, m.to().unwrap().tag()),
            ("sip:bob@example.com", None)
        );

        let bad = msg("OPTIONS sip:a@b SIP/2.0\r\nFrom: <sip:alice@example.com;tag=1\r\n\r\n");
        for _ in 0..2 {
            assert_eq!(bad.from(), Err(Malformed::Header("From")));
            assert_eq!(bad.to(), Err(Malformed::Missing("To")));
        }
        let twice = msg(
            "OPTIONS sip:a@b SIP/2.0\r\nFrom: <sip:a@x>;tag=1\r\nf: <sip:b@x>;tag=2\r\nTo: <sip:c@x>\r\n\r\n",
        );
        assert_eq!(twice.from(), Err(Malformed::Duplicate("From")));
        assert!(twice.to().is_ok());
    }

    #[test]
    fn name_addr_forms() {
        let m = msg("OPTIONS sip:a@b SIP/2.0\r\n\
From: \"A \\\"quoted\\\" name\" <sip:alice@example.com;transport=tcp>;tag=88\r\n\
To: sip:bob@example.com;tag=99\r\n\
Contact: Bob Smith <sip:bob@192.0.2.4>;q=0.7;expires=60, <sip:bob@[2001:db8::1]>;+sip.instance=\"<urn:uuid:1>\"\r\n\
m: *\r\n\r\n");
        let from = m.from().unwrap();
        assert_eq!(from.uri, "sip:alice@example.com;transport=tcp");
        assert_eq!(from.tag(), Some("88"));
        let to = m.to().unwrap();
        assert_eq!(to.uri, "sip:bob@example.com");
        assert_eq!(to.tag(), Some("99"));
        let c = m.contacts().unwrap();
        assert_eq!(c.len(), 3);
        let ContactValue::Addr(first) = &c[0] else {
            panic!("expected an address")
        };
        assert_eq!(first.param("q"), Some("0.7"));
        assert_eq!(m.bytes_at(first.display.clone().unwrap()), b"Bob Smith");
        assert_eq!(c[2], ContactValue::Star);
    }

    #[test]
    fn bad_values() {
        let m = msg(
            "OPTIONS sip:a@b SIP/2.0\r\nFrom: \"open <sip:a@b>\r\nTo: <sip:b@c\r\nCSeq: 99999999999 OPTIONS\r\nMax-Forwards: 300\r\nCall-ID: a b\r\n\r\n",
        );
        assert_eq!(m.from().unwrap_err(), Malformed::Header("From"));
        assert_eq!(m.to().unwrap_err(), Malformed::Header("To"));
        assert_eq!(m.cseq().unwrap_err(), Malformed::Header("CSeq"));
        assert_eq!(
            m.max_forwards().unwrap_err(),
            Malformed::Header("Max-Forwards")
        );
        assert_eq!(m.call_id().unwrap_err(), Malformed::Header("Call-ID"));
        let m = msg("OPTIONS sip:a@b SIP/2.0\r\ni: x\r\nCall-ID: y\r\n\r\n");
        assert_eq!(m.call_id().unwrap_err(), Malformed::Duplicate("Call-ID"));
        assert_eq!(m.cseq().unwrap_err(), Malformed::Missing("CSeq"));
    }
}
