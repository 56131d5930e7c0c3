//! Bytes → [`Message`]: the received bytes kept as they are, plus an index of the start line,
//! every header (name, value, whole line including folded continuation lines) and the body
//! (RFC 3261 §7, §18.3).
//!
//! Indexing is lenient: it fails only when the start line cannot be recognised, so that a
//! request with a broken header can still get a 400 that names the broken header. Everything
//! else wrong with the message is recorded as [`Message::defect`] and judged by the sanity
//! check of the proxy.

use std::ops::Range;
use std::sync::OnceLock;

use super::header::HeaderName;
use super::headers::{Parties, ViaSpans};
use super::scan::{is_lws, is_token, trim};

#[cfg(test)]
thread_local! {
    /// Messages parsed on this thread: tests count the parses of a code path.
    pub(crate) static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What makes a message unacceptable. The `Display` form is the reason phrase of the 400 (or
/// 505) that answers it, so it names the part at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Nothing but white space (a keepalive), or no bytes at all.
    #[error("Empty message")]
    Empty,
    /// The first line is neither a request line nor a status line.
    #[error("Malformed start line")]
    StartLine,
    /// `Method SP Request-URI SP SIP-Version` is not what the first line holds.
    #[error("Malformed request line")]
    RequestLine,
    /// The request is for a SIP version other than 2.0.
    #[error("SIP Version Not Supported")]
    Version,
    /// A header line has no colon, or a continuation line has nothing to continue.
    #[error("Malformed header line")]
    HeaderLine,
    /// The header section does not end with an empty line.
    #[error("Truncated message")]
    Truncated,
    /// A mandatory header is absent.
    #[error("Missing {0} header")]
    Missing(&'static str),
    /// A header that may appear once appears more than once.
    #[error("Duplicate {0} header")]
    Duplicate(&'static str),
    /// A header value does not follow its grammar.
    #[error("Malformed {0} header")]
    Header(&'static str),
    /// The CSeq method differs from the request method (RFC 3261 §8.1.1.5).
    #[error("CSeq method does not match the request method")]
    CSeqMethod,
    /// Content-Length announces more bytes than the datagram carries (RFC 3261 §18.3).
    #[error("Content-Length exceeds the body")]
    ContentLength,
}

impl Malformed {
    /// The status code of the local reply to a request with this defect.
    pub fn status(self) -> u16 {
        match self {
            Self::Version => 505,
            Self::Empty
            | Self::StartLine
            | Self::RequestLine
            | Self::HeaderLine
            | Self::Truncated
            | Self::Missing(_)
            | Self::Duplicate(_)
            | Self::Header(_)
            | Self::CSeqMethod
            | Self::ContentLength => 400,
        }
    }
}

/// How the body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A UDP datagram: Content-Length may be absent (the body is the rest), must not exceed what
    /// is present, and bytes past it are discarded.
    Datagram,
    /// A message cut out of a stream by [`crate::transport::framing`]: the buffer holds exactly
    /// one message.
    Stream,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request {
        method: Range<usize>,
        uri: Range<usize>,
    },
    Response {
        code: u16,
        reason: Range<usize>,
    },
}

/// One header field as it appears in the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    /// The name as written (any case, compact or long).
    pub name_span: Range<usize>,
    /// The value without leading and trailing white space; may contain folded line breaks.
    pub value: Range<usize>,
    /// From the first byte of the name to just past the line terminator of the last
    /// continuation line: removing this range removes the header.
    pub line: Range<usize>,
}

/// A SIP message: the bytes as received and an index into them.
#[derive(Debug, Clone)]
pub struct Message {
    buf: Vec<u8>,
    start: StartLine,
    headers: Vec<Header>,
    /// Offset of the empty line that ends the header section (where new headers go).
    headers_end: usize,
    body: Range<usize>,
    /// `\r\n`, or `\n` for a message that uses bare line feeds.
    eol: &'static str,
    defect: Option<Malformed>,
    /// The top Via, scanned on first use ([`Self::top_via`]); `None` when it is missing or
    /// malformed. Boxed: a message is moved around by value, and most never reach a Via.
    top_via: OnceLock<Option<Box<ViaSpans>>>,
    /// From and To, scanned together on the first use of either ([`Self::from`],
    /// [`Self::to`]): every request is checked for both, then read again by the transaction,
    /// the routing, accounting and the media layer (~40 parses per proxied call before).
    parties: OnceLock<Box<Parties>>,
}

impl Message {
    /// Indexes `input`. Fails only when no start line can be recognised; other problems are
    /// left in [`Self::defect`].
    pub fn parse(input: &[u8], framing: Framing) -> Result<Self, Malformed> {
        #[cfg(test)]
        PARSES.with(|p| p.set(p.get() + 1));
        // RFC 3261 §7.5: CRLFs before the start line are ignored (they are also keepalives).
        let lead = input.iter().take_while(|&&b| is_lws(b)).count();
        if lead == input.len() {
            return Err(Malformed::Empty);
        }
        let buf = input[lead..].to_vec();

        let (first_end, first_next) = line_end(&buf, 0).ok_or(Malformed::StartLine)?;
        let eol = if first_end > 0 && buf[first_end - 1] == b'\r' {
            "\r\n"
        } else {
            "\n"
        };
        let first_trimmed = if eol == "\r\n" {
            first_end - 1
        } else {
            first_end
        };
        let (start, mut defect) = parse_start_line(&buf, 0..first_trimmed)?;

        // Header lines until the empty line; room for a usual message's at once (grown from
        // empty it took two or three allocations per parse).
        let mut headers: Vec<Header> = Vec::with_capacity(16);
        let mut pos = first_next;
        let mut headers_end = None;
        while pos < buf.len() {
            let Some((end, next)) = line_end(&buf, pos) else {
                // Last line without a terminator: a header, but the message is truncated.
                index_header_line(&buf, pos, buf.len(), buf.len(), &mut headers, &mut defect);
                pos = buf.len();
                break;
            };
            let content_end = if end > pos && buf[end - 1] == b'\r' {
                end - 1
            } else {
                end
            };
            if content_end == pos {
                headers_end = Some(pos);
                pos = next;
                break;
            }
            index_header_line(&buf, pos, content_end, next, &mut headers, &mut defect);
            pos = next;
        }
        let Some(headers_end) = headers_end else {
            defect.get_or_insert(Malformed::Truncated);
            let len = buf.len();
            return Ok(Self {
                buf,
                start,
                headers,
                headers_end: len,
                body: len..len,
                eol,
                defect,
                top_via: OnceLock::new(),
                parties: OnceLock::new(),
            });
        };

        // The body: Content-Length rules of RFC 3261 §18.3 (and §20.14 for streams).
        let available = buf.len() - pos;
        let mut body_len = match framing {
            Framing::Datagram => available,
            Framing::Stream => 0,
        };
        let mut cl_seen = false;
        for h in headers
            .iter()
            .filter(|h| h.name == HeaderName::ContentLength)
        {
            if cl_seen {
                defect.get_or_insert(Malformed::Duplicate("Content-Length"));
                break;
            }
            cl_seen = true;
            match super::scan::parse_decimal(&buf[h.value.clone()], u64::from(u32::MAX)) {
                None => {
                    defect.get_or_insert(Malformed::Header("Content-Length"));
                }
                Some(n) if n as usize > available => {
                    defect.get_or_insert(Malformed::ContentLength);
                }
                // invariant: n <= available, which is a usize
                Some(n) => body_len = n as usize,
            }
        }
        let body = pos..pos + body_len.min(available);
        let mut buf = buf;
        buf.truncate(body.end);
        // Messages live as long as their transaction (32 s on UDP): keep only what they use.
        headers.shrink_to_fit();
        Ok(Self {
            buf,
            start,
            headers,
            headers_end,
            body,
            eol,
            defect,
            top_via: OnceLock::new(),
            parties: OnceLock::new(),
        })
    }

    /// The top Via's spans: `scan` (given the bytes and the first Via header line) runs on the
    /// first call only.
    pub(crate) fn top_via_spans(
        &self,
        scan: impl FnOnce(&[u8], &Header) -> Option<ViaSpans>,
    ) -> Option<&ViaSpans> {
        self.top_via
            .get_or_init(|| {
                let h = self.header(HeaderName::Via)?;
                scan(&self.buf, h).map(Box::new)
            })
            .as_deref()
    }

    /// The From and To spans, scanned by `scan` on the first call only.
    pub(crate) fn parties_spans(&self, scan: impl FnOnce(&Self) -> Parties) -> &Parties {
        self.parties.get_or_init(|| Box::new(scan(self)))
    }

    /// The message bytes (after leading CRLFs and trailing bytes beyond Content-Length are
    /// discarded).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The first problem found while indexing, if any.
    pub fn defect(&self) -> Option<Malformed> {
        self.defect
    }

    pub fn start_line(&self) -> &StartLine {
        &self.start
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The request method, as written (methods are case-sensitive, RFC 3261 §7.1).
    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => self.str_at(method.clone()),
            StartLine::Response { .. } => None,
        }
    }

    /// The Request-URI text.
    pub fn request_uri(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { uri, .. } => self.str_at(uri.clone()),
            StartLine::Response { .. } => None,
        }
    }

    pub fn request_uri_span(&self) -> Option<Range<usize>> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri.clone()),
            StartLine::Response { .. } => None,
        }
    }

    /// The status code of a response.
    pub fn status(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// Headers with the given name, in order.
    pub fn headers_named(&self, name: HeaderName) -> impl Iterator<Item = &Header> {
        self.headers.iter().filter(move |h| h.name == name)
    }

    /// Headers with a name not known to [`HeaderName`], matched case-insensitively.
    pub fn headers_other<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Header> {
        self.headers.iter().filter(move |h| {
            h.name == HeaderName::Other
                && self.buf[h.name_span.clone()].eq_ignore_ascii_case(name.as_bytes())
        })
    }

    /// The value of the only (first) header with this name.
    pub fn header(&self, name: HeaderName) -> Option<&Header> {
        self.headers.iter().find(|h| h.name == name)
    }

    /// The trimmed value of the first header with this name, if it is UTF-8.
    pub fn header_str(&self, name: HeaderName) -> Option<&str> {
        self.header(name).and_then(|h| self.str_at(h.value.clone()))
    }

    pub fn body(&self) -> &[u8] {
        &self.buf[self.body.clone()]
    }

    pub fn body_span(&self) -> Range<usize> {
        self.body.clone()
    }

    /// Where headers added by sipedge are inserted when no better place exists.
    pub fn headers_end(&self) -> usize {
        self.headers_end
    }

    pub fn eol(&self) -> &'static str {
        self.eol
    }

    /// The bytes of a span.
    pub fn bytes_at(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// The text of a span, if it is UTF-8.
    pub fn str_at(&self, r: Range<usize>) -> Option<&str> {
        std::str::from_utf8(&self.buf[r]).ok()
    }
}

/// Finds the end of the line that starts at `from`: `(offset of '\n', offset after it)`.
fn line_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let nl = buf[from..].iter().position(|&b| b == b'\n')? + from;
    Some((nl, nl + 1))
}

/// Indexes one header line `buf[pos..content_end]` (terminator ends at `next`), or extends the
/// previous header when the line is a continuation.
fn index_header_line(
    buf: &[u8],
    pos: usize,
    content_end: usize,
    next: usize,
    headers: &mut Vec<Header>,
    defect: &mut Option<Malformed>,
) {
    if matches!(buf[pos], b' ' | b'\t') {
        // RFC 3261 §7.3.1: a line starting with white space continues the previous header.
        match headers.last_mut() {
            Some(h) => {
                let extended = trim(buf, h.value.start..content_end);
                if extended.end > extended.start {
                    // A value that was empty starts on the continuation line.
                    h.value = if h.value.is_empty() {
                        extended
                    } else {
                        h.value.start..extended.end
                    };
                }
                h.line.end = next;
            }
            None => {
                defect.get_or_insert(Malformed::HeaderLine);
            }
        }
        return;
    }
    let Some(colon) = buf[pos..content_end].iter().position(|&b| b == b':') else {
        defect.get_or_insert(Malformed::HeaderLine);
        return;
    };
    let colon = pos + colon;
    // RFC 3261 §25.1: HCOLON = *( SP / HTAB ) ":" SWS; the name itself is a token.
    let name_span = trim(buf, pos..colon);
    if name_span.is_empty() || !buf[name_span.clone()].iter().all(|&b| is_token(b)) {
        defect.get_or_insert(Malformed::HeaderLine);
        return;
    }
    headers.push(Header {
        name: HeaderName::from_bytes(&buf[name_span.clone()]),
        name_span,
        value: trim(buf, colon + 1..content_end),
        line: pos..next,
    });
}

/// Parses the start line. A line that starts like a request but breaks the grammar (extra
/// spaces, a bad Request-URI, a missing or unsupported version) still yields a request, with
/// the defect, so that it can be answered with 400 or 505.
fn parse_start_line(
    buf: &[u8],
    r: Range<usize>,
) -> Result<(StartLine, Option<Malformed>), Malformed> {
    let line = &buf[r.clone()];
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"SIP/") {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        let mut parts = line.splitn(3, |&b| b == b' ');
        let version = parts.next().unwrap_or_default();
        let code = parts.next().unwrap_or_default();
        if !version.eq_ignore_ascii_case(b"SIP/2.0") || code.len() != 3 {
            return Err(Malformed::StartLine);
        }
        let code = super::scan::parse_decimal(code, 699)
            .filter(|c| *c >= 100)
            .ok_or(Malformed::StartLine)? as u16;
        let reason_start = (r.start + version.len() + 1 + 4).min(r.end);
        return Ok((
            StartLine::Response {
                code,
                reason: reason_start..r.end,
            },
            None,
        ));
    }
    // Request-Line = Method SP Request-URI SP SIP-Version: exactly two single spaces.
    let method_len = line.iter().take_while(|&&b| is_token(b)).count();
    if method_len == 0 {
        return Err(Malformed::StartLine);
    }
    let method = r.start..r.start + method_len;
    let broken = |uri: Range<usize>| {
        Ok((
            StartLine::Request {
                method: method.clone(),
                uri,
            },
            Some(Malformed::RequestLine),
        ))
    };
    let mut parts = line.split(|&b| b == b' ');
    let (Some(m), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return broken(method.end..method.end);
    };
    let uri_start = r.start + m.len() + 1;
    let uri_span = uri_start..uri_start + uri.len();
    if m.len() != method_len
        || uri.is_empty()
        || uri
            .iter()
            .any(|&b| b <= b' ' || b == b'<' || b == b'>' || b == b'"' || b == 0x7f)
        || !uri.contains(&b':')
    {
        return broken(uri_span);
    }
    let defect = if version.eq_ignore_ascii_case(b"SIP/2.0") {
        None
    } else if is_sip_version(version) {
        Some(Malformed::Version)
    } else {
        Some(Malformed::RequestLine)
    };
    Ok((
        StartLine::Request {
            method,
            uri: uri_span,
        },
        defect,
    ))
}

/// `SIP/` 1*DIGIT `.` 1*DIGIT
fn is_sip_version(v: &[u8]) -> bool {
    v.len() > 4
        && v[..4].eq_ignore_ascii_case(b"SIP/")
        && match v[4..].iter().position(|&b| b == b'.') {
            Some(dot) => {
                let (major, minor) = (&v[4..4 + dot], &v[5 + dot..]);
                !major.is_empty()
                    && !minor.is_empty()
                    && major.iter().all(u8::is_ascii_digit)
                    && minor.iter().all(u8::is_ascii_digit)
            }
            None => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1\r\n\
Max-Forwards: 70\r\n\
To: <sip:bob@example.com>\r\n\
From: \"Alice\" <sip:alice@example.com>;tag=1\r\n\
Call-ID: abc@192.0.2.1\r\n\
CSeq: 1 INVITE\r\n\
Subject: a folded\r\n  value\r\n\
Content-Length: 4\r\n\
\r\n\
v=0\nEXTRA";

    #[test]
    fn indexes_request() {
        let m = Message::parse(INVITE, Framing::Datagram).unwrap();
        assert_eq!(m.defect(), None);
        assert_eq!(m.method(), Some("INVITE"));
        assert_eq!(m.request_uri(), Some("sip:bob@example.com"));
        assert_eq!(m.header_str(HeaderName::CallId), Some("abc@192.0.2.1"));
        assert_eq!(m.body(), b"v=0\n");
        let subject = m.headers_other("subject").next().unwrap();
        assert_eq!(
            m.bytes_at(subject.value.clone()),
            b"a folded\r\n  value".as_slice()
        );
        // Bytes past Content-Length are discarded (RFC 3261 §18.3).
        assert!(m.as_bytes().ends_with(b"\r\n\r\nv=0\n"));
    }

    #[test]
    fn defects_are_recorded_not_fatal() {
        let m = Message::parse(
            b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nContent-Length: 10\r\n\r\nab",
            Framing::Datagram,
        )
        .unwrap();
        assert_eq!(m.defect(), Some(Malformed::ContentLength));
        let m = Message::parse(b"OPTIONS sip:x SIP/2.0\r\nVia: a\r\n", Framing::Datagram).unwrap();
        assert_eq!(m.defect(), Some(Malformed::Truncated));
        let m = Message::parse(b"OPTIONS sip:x SIP/3.0\r\n\r\n", Framing::Datagram).unwrap();
        assert_eq!(m.defect(), Some(Malformed::Version));
        assert_eq!(Malformed::Version.status(), 505);
    }

    #[test]
    fn start_line_errors() {
        for bad in [
            &b"\x00\x01\x02"[..],
            b"hello world",
            b"SIP/2.0 99 Too small\r\n\r\n",
            b"SIP/2.0 2000 Too big\r\n\r\n",
        ] {
            assert!(Message::parse(bad, Framing::Datagram).is_err(), "{bad:?}");
        }
        assert_eq!(
            Message::parse(b"INVITE  sip:a@b SIP/2.0\r\n\r\n", Framing::Datagram)
                .unwrap()
                .defect(),
            Some(Malformed::RequestLine)
        );
        assert_eq!(
            Message::parse(b"\r\n\r\n", Framing::Datagram).unwrap_err(),
            Malformed::Empty
        );
    }

    #[test]
    fn bare_lf_and_response() {
        let m = Message::parse(b"SIP/2.0 180 Ringing\nVia: x\n\n", Framing::Datagram).unwrap();
        assert_eq!(m.status(), Some(180));
        assert_eq!(m.eol(), "\n");
        assert_eq!(m.defect(), None);
    }

    #[test]
    fn stream_framing_defaults_to_empty_body() {
        let m = Message::parse(b"OPTIONS sip:x SIP/2.0\r\n\r\n", Framing::Stream).unwrap();
        assert!(m.body().is_empty());
    }
}
