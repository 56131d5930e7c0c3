//! The digest scheme itself: reading `Authorization` / `Proxy-Authorization` credentials
//! (RFC 3261 §25.1 `credentials`, RFC 7616 §3.4), computing the response a client should have
//! sent (RFC 7616 §3.4.1, RFC 2069 when the client sends no `qop`), checking it, and writing the
//! challenge of a 401/407 (RFC 7616 §3.3, RFC 3261 §22.1 and §22.3).
//!
//! Algorithms: `MD5` (RFC 3261 §22.4) and `SHA-256` (RFC 8760 §2). The `-sess` variants and
//! `SHA-512-256` are refused: sipedge never offers them. Quality of protection: `auth` or none
//! (RFC 2069 compatibility, which RFC 3261 §22.4 still requires servers to accept); `auth-int`
//! is refused because sipedge never offers it.
//!
//! The client side (sipedge answering a provider's challenge with a trunk's credentials,
//! Kamailio's `uac_auth()`): [`parse_challenge`] reads a `WWW-Authenticate` /
//! `Proxy-Authenticate` value and [`authorization`] writes the credentials that answer it,
//! with `qop=auth` (cnonce, nc) when the challenge offers it, RFC 2069 style when it does not.
//!
//! Pure: no I/O, no clock. The parser never panics, whatever the input.

use std::borrow::Cow;

use md5::Md5;
use sha2::{Digest, Sha256};

use super::{ct_eq, to_hex};
use crate::config::DigestAlgorithm;
use crate::sip::scan::{is_lws, is_token, skip_lws};

/// A parsed `Authorization` / `Proxy-Authorization` value (`Digest k=v, k="v", ...`).
///
/// Every string is the parameter's value with quotes and `\` escapes removed, exactly as the
/// client sent it otherwise: the digest hashes these texts, so nothing is normalised. A value
/// is borrowed from the header unless unescaping changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials<'a> {
    /// `username`: the user part the client authenticates as.
    pub username: Cow<'a, str>,
    /// `realm`: the protection space the client answers (RFC 3261 §22.1).
    pub realm: Cow<'a, str>,
    /// `nonce`: the server nonce being answered, verbatim.
    pub nonce: Cow<'a, str>,
    /// `uri`: the digest-uri, as sent (RFC 3261 §22.4: a SIP URI, not necessarily the
    /// Request-URI text).
    pub uri: Cow<'a, str>,
    /// `response`: the client's digest, hex (any case); its length matches `algorithm`.
    pub response: Cow<'a, str>,
    /// `algorithm`; MD5 when the parameter is absent (RFC 7616 §3.4).
    pub algorithm: DigestAlgorithm,
    /// `qop` as sent (it is hashed as sent); when present it is `auth` in some case.
    pub qop: Option<Cow<'a, str>>,
    /// `nc`, the nonce count, as a number (never 0).
    pub nc: Option<u32>,
    /// `nc` exactly as sent (8 hex digits, in the client's case): the digest hashes this text.
    pub nc_raw: Option<Cow<'a, str>>,
    /// `cnonce`: the client nonce.
    pub cnonce: Option<Cow<'a, str>>,
    /// `opaque`, to be echoed from the challenge.
    pub opaque: Option<Cow<'a, str>>,
}

/// Why an `Authorization` / `Proxy-Authorization` value cannot be used. Every variant is the
/// client's fault; the `Display` form is fit for a 400 reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The scheme is not `Digest` (e.g. `Basic`), or there is no scheme at all.
    #[error("Authorization scheme is not Digest")]
    NotDigest,
    /// The parameter list breaks the grammar: a name without `=`, an empty value, an
    /// unterminated quoted string, a control character, a missing or trailing comma.
    #[error("Malformed Authorization header")]
    Syntax,
    /// A parameter appears twice (RFC 7616 §3.4: each appears at most once); unknown
    /// parameters are reported as `auth-param`.
    #[error("Duplicate {0} parameter in Authorization")]
    Duplicate(&'static str),
    /// A mandatory parameter is absent (`username`, `realm`, `nonce`, `uri`, `response`; `nc`
    /// and `cnonce` when `qop` is present).
    #[error("Missing {0} parameter in Authorization")]
    Missing(&'static str),
    /// A parameter value does not have its format: `response` not hex of the algorithm's
    /// length, `nc` not 8 hex digits or zero.
    #[error("Malformed {0} parameter in Authorization")]
    BadParam(&'static str),
    /// An algorithm other than `MD5` and `SHA-256` (including the `-sess` variants and
    /// `SHA-512-256`).
    #[error("Unsupported digest algorithm")]
    UnsupportedAlgorithm,
    /// A `qop` other than `auth` (`auth-int` included).
    #[error("Unsupported qop")]
    UnsupportedQop,
}

/// The parameters sipedge reads, in the order of the slots in [`parse_credentials`].
const KNOWN: [&str; 10] = [
    "username",
    "realm",
    "nonce",
    "uri",
    "response",
    "algorithm",
    "qop",
    "nc",
    "cnonce",
    "opaque",
];
const USERNAME: usize = 0;
const REALM: usize = 1;
const NONCE: usize = 2;
const URI: usize = 3;
const RESPONSE: usize = 4;
const ALGORITHM: usize = 5;
const QOP: usize = 6;
const NC: usize = 7;
const CNONCE: usize = 8;
const OPAQUE: usize = 9;

/// Parses an `Authorization` / `Proxy-Authorization` header value.
///
/// Grammar (RFC 3261 §25.1, RFC 7616 §3.4): `Digest` (any case), LWS, then comma-separated
/// `name = value` pairs with optional LWS (folded lines included) around `=` and `,`. Values are
/// tokens or quoted strings with `\` escapes. Names are case-insensitive; unknown parameters are
/// ignored; any parameter given twice is an error.
pub fn parse_credentials(value: &str) -> Result<Credentials<'_>, DigestError> {
    let b = value.as_bytes();
    let end = b.len();

    let mut i = skip_lws(b, 0, end);
    let scheme_start = i;
    while i < end && is_token(b[i]) {
        i += 1;
    }
    if !b[scheme_start..i].eq_ignore_ascii_case(b"Digest") || (i < end && !is_lws(b[i])) {
        return Err(DigestError::NotDigest);
    }

    let mut slots: [Option<Cow<'_, str>>; KNOWN.len()] = Default::default();
    let mut unknown: Vec<&[u8]> = Vec::new();
    i = skip_lws(b, i, end);
    while i < end {
        let name_start = i;
        while i < end && is_token(b[i]) {
            i += 1;
        }
        let name = &b[name_start..i];
        if name.is_empty() {
            return Err(DigestError::Syntax);
        }
        i = skip_lws(b, i, end);
        if i >= end || b[i] != b'=' {
            return Err(DigestError::Syntax);
        }
        i = skip_lws(b, i + 1, end);
        let (val, next) = read_value(b, i)?;
        i = skip_lws(b, next, end);

        match KNOWN
            .iter()
            .position(|k| k.as_bytes().eq_ignore_ascii_case(name))
        {
            Some(slot) => {
                if slots[slot].is_some() {
                    return Err(DigestError::Duplicate(KNOWN[slot]));
                }
                slots[slot] = Some(val);
            }
            None => unknown.push(name),
        }

        if i < end {
            if b[i] != b',' {
                return Err(DigestError::Syntax);
            }
            i = skip_lws(b, i + 1, end);
            if i >= end {
                // A trailing comma: RFC 3261 lists have no empty elements.
                return Err(DigestError::Syntax);
            }
        }
    }
    // Sorting keeps duplicate detection O(n log n) on a hostile header with thousands of
    // parameters.
    unknown.sort_unstable_by(|x, y| {
        x.iter()
            .map(u8::to_ascii_lowercase)
            .cmp(y.iter().map(u8::to_ascii_lowercase))
    });
    if unknown.windows(2).any(|w| w[0].eq_ignore_ascii_case(w[1])) {
        return Err(DigestError::Duplicate("auth-param"));
    }

    let mut take = |slot: usize| slots[slot].take();
    let mut required = |slot: usize| take(slot).ok_or(DigestError::Missing(KNOWN[slot]));
    let username = required(USERNAME)?;
    let realm = required(REALM)?;
    let nonce = required(NONCE)?;
    let uri = required(URI)?;
    let response = required(RESPONSE)?;

    let algorithm = match slots[ALGORITHM].take() {
        None => DigestAlgorithm::Md5,
        Some(a) if a.eq_ignore_ascii_case("MD5") => DigestAlgorithm::Md5,
        Some(a) if a.eq_ignore_ascii_case("SHA-256") => DigestAlgorithm::Sha256,
        // MD5-sess, SHA-256-sess, SHA-512-256(-sess) and anything unknown.
        Some(_) => return Err(DigestError::UnsupportedAlgorithm),
    };
    if response.len() != 2 * digest_len(algorithm)
        || !response.bytes().all(|c| c.is_ascii_hexdigit())
    {
        return Err(DigestError::BadParam("response"));
    }

    let qop = slots[QOP].take();
    if let Some(q) = &qop {
        if !q.eq_ignore_ascii_case("auth") {
            return Err(DigestError::UnsupportedQop);
        }
    }
    let nc_raw = slots[NC].take();
    let nc = match &nc_raw {
        None => None,
        Some(raw) => Some(parse_nc(raw).ok_or(DigestError::BadParam("nc"))?),
    };
    let cnonce = slots[CNONCE].take();
    if qop.is_some() {
        // RFC 7616 §3.4: with qop, the client MUST send cnonce and nc.
        if nc.is_none() {
            return Err(DigestError::Missing("nc"));
        }
        if cnonce.is_none() {
            return Err(DigestError::Missing("cnonce"));
        }
    }

    Ok(Credentials {
        username,
        realm,
        nonce,
        uri,
        response,
        algorithm,
        qop,
        nc,
        nc_raw,
        cnonce,
        opaque: slots[OPAQUE].take(),
    })
}

/// Reads a token or a quoted string starting at `i`; returns the value (unquoted, unescaped)
/// and the offset just past it.
fn read_value(b: &[u8], mut i: usize) -> Result<(Cow<'_, str>, usize), DigestError> {
    let end = b.len();
    if i < end && b[i] == b'"' {
        i += 1;
        // Most values have neither escapes nor folds: those are the bytes between the quotes.
        let plain = b[i..]
            .iter()
            .position(|&c| matches!(c, b'"' | b'\\' | 0x00..=0x08 | 0x0a..=0x1f | 0x7f));
        if let Some(n) = plain.filter(|&n| b[i + n] == b'"') {
            let s = std::str::from_utf8(&b[i..i + n]).map_err(|_| DigestError::Syntax)?;
            return Ok((Cow::Borrowed(s), i + n + 1));
        }
        let mut out = Vec::new();
        loop {
            let c = *b.get(i).ok_or(DigestError::Syntax)?;
            match c {
                b'"' => {
                    i += 1;
                    break;
                }
                // RFC 3261 §25.1: quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F).
                b'\\' => {
                    let e = *b.get(i + 1).ok_or(DigestError::Syntax)?;
                    if !e.is_ascii() || e == b'\r' || e == b'\n' {
                        return Err(DigestError::Syntax);
                    }
                    out.push(e);
                    i += 2;
                }
                // A folded line inside the string: the CRLF goes, the white space stays
                // (RFC 3261 §7.3.1).
                b'\r'
                    if b.get(i + 1) == Some(&b'\n')
                        && matches!(b.get(i + 2), Some(b' ' | b'\t')) =>
                {
                    i += 2;
                }
                b'\t' => {
                    out.push(c);
                    i += 1;
                }
                // Any other control character (bare CR or LF included) breaks qdtext.
                0x00..=0x1f | 0x7f => return Err(DigestError::Syntax),
                _ => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        // Only ASCII bytes were removed or added, so UTF-8 input stays UTF-8.
        let s = String::from_utf8(out).map_err(|_| DigestError::Syntax)?;
        Ok((Cow::Owned(s), i))
    } else {
        let start = i;
        while i < end && is_token(b[i]) {
            i += 1;
        }
        if i == start {
            return Err(DigestError::Syntax);
        }
        let s = std::str::from_utf8(&b[start..i]).map_err(|_| DigestError::Syntax)?;
        Ok((Cow::Borrowed(s), i))
    }
}

/// `nc-value = 8LHEX` (RFC 7616 §3.4); the count starts at 1, so 0 is refused.
fn parse_nc(raw: &str) -> Option<u32> {
    if raw.len() != 8 || !raw.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(raw, 16).ok().filter(|&n| n != 0)
}

/// Output size of the algorithm's hash, in bytes.
fn digest_len(alg: DigestAlgorithm) -> usize {
    match alg {
        DigestAlgorithm::Md5 => 16,
        DigestAlgorithm::Sha256 => 32,
    }
}

/// The `algorithm` token of a challenge (RFC 7616 §3.3, RFC 8760 §2).
fn algorithm_token(alg: DigestAlgorithm) -> &'static str {
    match alg {
        DigestAlgorithm::Md5 => "MD5",
        DigestAlgorithm::Sha256 => "SHA-256",
    }
}

/// `H(part0 part1 ...)` as lower-case hex.
fn hash_hex(alg: DigestAlgorithm, parts: &[&str]) -> String {
    match alg {
        DigestAlgorithm::Md5 => {
            let mut h = Md5::new();
            for p in parts {
                h.update(p.as_bytes());
            }
            to_hex(&h.finalize())
        }
        DigestAlgorithm::Sha256 => {
            let mut h = Sha256::new();
            for p in parts {
                h.update(p.as_bytes());
            }
            to_hex(&h.finalize())
        }
    }
}

/// HA1 = H(username ":" realm ":" password), lower-case hex (RFC 7616 §3.4.2). This is what the
/// subscriber table stores instead of the password.
pub fn ha1(alg: DigestAlgorithm, username: &str, realm: &str, password: &str) -> String {
    hash_hex(alg, &[username, ":", realm, ":", password])
}

/// The response the client should have sent, lower-case hex (RFC 7616 §3.4.1):
///
/// - with `qop=auth`: `H(HA1 ":" nonce ":" nc ":" cnonce ":" qop ":" HA2)`;
/// - without `qop` (RFC 2069): `H(HA1 ":" nonce ":" HA2)`;
///
/// where `HA2 = H(method ":" uri)` (RFC 7616 §3.4.3). `nc`, `qop` and `uri` are hashed as the
/// client sent them (`c.nc_raw`; `c.nc` written as 8 lower-case hex digits only when
/// `nc_raw` is absent). `ha1_hex` may be in any case; it is hashed in lower case, as every
/// client computes it.
pub fn expected_response(
    alg: DigestAlgorithm,
    ha1_hex: &str,
    method: &str,
    c: &Credentials,
) -> String {
    let ha1 = ha1_hex.to_ascii_lowercase();
    let ha2 = hash_hex(alg, &[method, ":", &c.uri]);
    match &c.qop {
        Some(qop) => {
            let nc = match (&c.nc_raw, c.nc) {
                (Some(raw), _) => raw.clone(),
                (None, Some(n)) => format!("{n:08x}").into(),
                (None, None) => "".into(),
            };
            let cnonce = c.cnonce.as_deref().unwrap_or("");
            hash_hex(
                alg,
                &[
                    &ha1, ":", &c.nonce, ":", &nc, ":", cnonce, ":", qop, ":", &ha2,
                ],
            )
        }
        None => hash_hex(alg, &[&ha1, ":", &c.nonce, ":", &ha2]),
    }
}

/// True when `c.response` equals the expected response for `c.algorithm`, the stored HA1
/// (computed with that same algorithm) and the request method. Hex case is ignored; the
/// comparison takes the same time wherever the first difference is.
///
/// This checks the response only: the caller checks the realm, the nonce
/// ([`super::nonce::check`]) and the nonce count ([`super::nonce::ReplayGuard`]).
pub fn verify(ha1_hex: &str, method: &str, c: &Credentials) -> bool {
    let expected = expected_response(c.algorithm, ha1_hex, method, c);
    ct_eq(
        expected.as_bytes(),
        c.response.to_ascii_lowercase().as_bytes(),
    )
}

/// Whether the digest `uri` names the Request-URI (RFC 7616 §3.4.6: the server checks that
/// the `uri` parameter designates the same resource as the request line, else the response
/// could be one captured for another request).
///
/// SIP and SIPS URIs are compared as RFC 3261 §19.1.4 says, with one leniency: same scheme;
/// user and password case-sensitive; host case-insensitive; ports equal, a missing port
/// standing for the default one (5060, 5061 for SIPS: common clients, SIPp among them, write
/// `sip:host:5060` for a Request-URI `sip:host`; it is the same resource, so nothing is
/// gained by refusing it); a `user`, `ttl`, `method`, `maddr` or
/// `transport` parameter present in one must be present and equal in the other (parameter
/// values case-insensitive); other parameters must be equal where both have them; headers
/// equal as written. `%` escapes are not decoded (a client writes the same text in both
/// places). Anything else (a `tel:` URI, a malformed one) must be byte-identical.
pub fn uri_matches(digest_uri: &str, request_uri: &str) -> bool {
    use crate::sip::SipUri;
    let (Ok(a), Ok(b)) = (SipUri::parse(digest_uri), SipUri::parse(request_uri)) else {
        return digest_uri == request_uri;
    };
    a.secure == b.secure
        && a.user == b.user
        && a.password == b.password
        && a.host.eq_ignore_ascii_case(b.host)
        && a.port.unwrap_or(default_port(a.secure)) == b.port.unwrap_or(default_port(b.secure))
        && a.headers == b.headers
        && params_match(&a, &b)
}

fn default_port(secure: bool) -> u16 {
    if secure { 5061 } else { 5060 }
}

/// The parameter rule of RFC 3261 §19.1.4.
fn params_match(a: &crate::sip::SipUri<'_>, b: &crate::sip::SipUri<'_>) -> bool {
    const MUST_MATCH: [&str; 5] = ["user", "ttl", "method", "maddr", "transport"];
    let eq = |x: Option<&str>, y: Option<&str>| match (x, y) {
        (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
        (None, None) => true,
        _ => false,
    };
    if !MUST_MATCH.iter().all(|n| eq(a.param(n), b.param(n))) {
        return false;
    }
    a.params()
        .split(';')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map_or(p, |(n, _)| n))
        .all(|name| match (a.param(name), b.param(name)) {
            (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
            _ => true,
        })
}

/// A `WWW-Authenticate` / `Proxy-Authenticate` value (RFC 7616 §3.3):
/// `Digest realm="..", nonce="..", opaque="..", algorithm=MD5, qop="auth"` (no `opaque` when
/// it is empty), then
/// `, stale=true` when the client's nonce was good but expired (it may retry without asking
/// the user). The algorithm token is `MD5` or `SHA-256`.
///
/// `realm`, `nonce` and `opaque` are written as quoted strings: `"` and `\` are escaped, and
/// control characters (which no quoted string may carry) are dropped so that the value can
/// never break the header line.
pub fn challenge(
    alg: DigestAlgorithm,
    realm: &str,
    nonce: &str,
    opaque: &str,
    stale: bool,
) -> String {
    let mut s = String::with_capacity(96 + realm.len() + nonce.len() + opaque.len());
    s.push_str("Digest realm=");
    push_quoted(&mut s, realm);
    s.push_str(", nonce=");
    push_quoted(&mut s, nonce);
    if !opaque.is_empty() {
        s.push_str(", opaque=");
        push_quoted(&mut s, opaque);
    }
    s.push_str(", algorithm=");
    s.push_str(algorithm_token(alg));
    s.push_str(", qop=\"auth\"");
    if stale {
        s.push_str(", stale=true");
    }
    s
}

/// Appends `text` as a quoted string (RFC 3261 §25.1).
fn push_quoted(s: &mut String, text: &str) {
    s.push('"');
    for ch in text.chars() {
        match ch {
            '"' | '\\' => {
                s.push('\\');
                s.push(ch);
            }
            c if c.is_ascii_control() => {}
            c => s.push(c),
        }
    }
    s.push('"');
}

/// A parsed `WWW-Authenticate` / `Proxy-Authenticate` digest challenge (RFC 7616 §3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    /// MD5 when the parameter is absent.
    pub algorithm: DigestAlgorithm,
    /// The challenge offers `qop=auth` (in its comma-separated `qop` list).
    pub qop_auth: bool,
    /// `stale=true`: the nonce expired, the credentials were right.
    pub stale: bool,
}

/// Reads a challenge. `Err` for another scheme, a broken parameter list, a missing `realm` or
/// `nonce`, an algorithm other than MD5/SHA-256, or a `qop` list without `auth` (only
/// `auth-int`, which we cannot compute without the body).
pub fn parse_challenge(value: &str) -> Result<Challenge, DigestError> {
    let b = value.as_bytes();
    let end = b.len();
    let mut i = skip_lws(b, 0, end);
    let scheme_start = i;
    while i < end && is_token(b[i]) {
        i += 1;
    }
    if !b[scheme_start..i].eq_ignore_ascii_case(b"Digest") || (i < end && !is_lws(b[i])) {
        return Err(DigestError::NotDigest);
    }
    let (mut realm, mut nonce, mut opaque, mut algorithm, mut qop, mut stale) =
        (None, None, None, None, None, None);
    i = skip_lws(b, i, end);
    while i < end {
        let name_start = i;
        while i < end && is_token(b[i]) {
            i += 1;
        }
        let name = &b[name_start..i];
        i = skip_lws(b, i, end);
        if name.is_empty() || i >= end || b[i] != b'=' {
            return Err(DigestError::Syntax);
        }
        i = skip_lws(b, i + 1, end);
        let (val, next) = read_value(b, i)?;
        i = skip_lws(b, next, end);
        let slot = match name.to_ascii_lowercase().as_slice() {
            b"realm" => Some((&mut realm, "realm")),
            b"nonce" => Some((&mut nonce, "nonce")),
            b"opaque" => Some((&mut opaque, "opaque")),
            b"algorithm" => Some((&mut algorithm, "algorithm")),
            b"qop" => Some((&mut qop, "qop")),
            b"stale" => Some((&mut stale, "stale")),
            // domain, charset, userhash and extensions: not needed to answer.
            _ => None,
        };
        if let Some((slot, name)) = slot {
            if slot.is_some() {
                return Err(DigestError::Duplicate(name));
            }
            *slot = Some(val);
        }
        if i < end {
            if b[i] != b',' {
                return Err(DigestError::Syntax);
            }
            i = skip_lws(b, i + 1, end);
        }
    }
    let algorithm = match algorithm {
        None => DigestAlgorithm::Md5,
        Some(a) if a.eq_ignore_ascii_case("MD5") => DigestAlgorithm::Md5,
        Some(a) if a.eq_ignore_ascii_case("SHA-256") => DigestAlgorithm::Sha256,
        Some(_) => return Err(DigestError::UnsupportedAlgorithm),
    };
    let qop_auth = match &qop {
        None => false,
        Some(list)
            if list
                .split(',')
                .any(|q| q.trim().eq_ignore_ascii_case("auth")) =>
        {
            true
        }
        Some(_) => return Err(DigestError::UnsupportedQop),
    };
    Ok(Challenge {
        realm: realm.ok_or(DigestError::Missing("realm"))?.into_owned(),
        nonce: nonce.ok_or(DigestError::Missing("nonce"))?.into_owned(),
        opaque: opaque.map(Cow::into_owned),
        algorithm,
        qop_auth,
        stale: stale.is_some_and(|s| s.eq_ignore_ascii_case("true")),
    })
}

/// What the client side puts into its answer besides the challenge: who, what, and the
/// client nonce and count (used only with `qop=auth`).
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub username: &'a str,
    pub password: &'a str,
    pub method: &'a str,
    /// The digest-uri: the Request-URI of the request being authorised.
    pub uri: &'a str,
    pub cnonce: &'a str,
    pub nc: u32,
}

/// The `Authorization` / `Proxy-Authorization` value answering `ch` (RFC 7616 §3.4; RFC 2069
/// form when the challenge has no `qop`).
pub fn authorization(ch: &Challenge, a: &Answer<'_>) -> String {
    let ha1 = ha1(ch.algorithm, a.username, &ch.realm, a.password);
    let nc_raw = format!("{:08x}", a.nc);
    let c = Credentials {
        username: a.username.into(),
        realm: ch.realm.as_str().into(),
        nonce: ch.nonce.as_str().into(),
        uri: a.uri.into(),
        response: "".into(),
        algorithm: ch.algorithm,
        qop: ch.qop_auth.then_some("auth".into()),
        nc: ch.qop_auth.then_some(a.nc),
        nc_raw: ch.qop_auth.then(|| nc_raw.as_str().into()),
        cnonce: ch.qop_auth.then(|| a.cnonce.into()),
        opaque: ch.opaque.as_deref().map(Into::into),
    };
    let response = expected_response(ch.algorithm, &ha1, a.method, &c);
    let mut s = String::with_capacity(256);
    s.push_str("Digest username=");
    push_quoted(&mut s, a.username);
    s.push_str(", realm=");
    push_quoted(&mut s, &ch.realm);
    s.push_str(", nonce=");
    push_quoted(&mut s, &ch.nonce);
    s.push_str(", uri=");
    push_quoted(&mut s, a.uri);
    s.push_str(", response=\"");
    s.push_str(&response);
    s.push_str("\", algorithm=");
    s.push_str(algorithm_token(ch.algorithm));
    if ch.qop_auth {
        s.push_str(", qop=auth, nc=");
        s.push_str(&nc_raw);
        s.push_str(", cnonce=");
        push_quoted(&mut s, a.cnonce);
    }
    if let Some(o) = &ch.opaque {
        s.push_str(", opaque=");
        push_quoted(&mut s, o);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 2617 §3.5, the request for `/dir/index.html` with password "Circle Of Life".
    const RFC2617: &str = "Digest username=\"Mufasa\",\r\n realm=\"testrealm@host.com\",\r\n \
        nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\",\r\n uri=\"/dir/index.html\",\r\n \
        qop=auth,\r\n nc=00000001,\r\n cnonce=\"0a4f113b\",\r\n \
        response=\"6629fae49393a05397450978507c4ef1\",\r\n \
        opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"";

    /// RFC 7616 §3.9.1, with the response and algorithm spliced in.
    fn rfc7616(algorithm: &str, response: &str) -> String {
        format!(
            "Digest username=\"Mufasa\", realm=\"http-auth@example.org\", \
             uri=\"/dir/index.html\", algorithm={algorithm}, \
             nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\", nc=00000001, \
             cnonce=\"f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ\", qop=auth, \
             response=\"{response}\", opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\""
        )
    }

    const RFC7616_MD5: &str = "8ca523f5e9506fed4657c9700eebdbec";
    const RFC7616_SHA256: &str = "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1";

    /// A REGISTER as a SIP phone sends it; the values were computed with Python's hashlib.
    fn sip_register(nc: &str, response: &str) -> String {
        format!(
            "Digest username=\"alice\",realm=\"example.com\",nonce=\"0123456789abcdef\",\
             uri=\"sip:example.com\",response=\"{response}\",algorithm=MD5,\
             cnonce=\"deadbeef\",qop=auth,nc={nc}"
        )
    }
    const ALICE_HA1_MD5: &str = "d2d0c8958e1b1c2b989afda0efb9663e";
    const ALICE_HA1_SHA256: &str =
        "5297838bf1a4f1fc5d284fa2f0df90bdf2046b6bf4c022e85118af37bb6dbf75";
    const ALICE_RESPONSE_NC_LOWER: &str = "72e7e75a718b6a6b51dc63e0ca433037";
    const ALICE_RESPONSE_NC_UPPER: &str = "df30aa61f91c8e1235aeda5315db95d3";
    const MD5_ZERO: &str = "00000000000000000000000000000000";

    #[test]
    fn rfc2617_example() {
        let c = parse_credentials(RFC2617).unwrap();
        assert_eq!(c.username, "Mufasa");
        assert_eq!(c.realm, "testrealm@host.com");
        assert_eq!(c.nonce, "dcd98b7102dd2f0e8b11d0f600bfb0c093");
        assert_eq!(c.uri, "/dir/index.html");
        assert_eq!(c.algorithm, DigestAlgorithm::Md5);
        assert_eq!(c.qop.as_deref(), Some("auth"));
        assert_eq!(c.nc, Some(1));
        assert_eq!(c.nc_raw.as_deref(), Some("00000001"));
        assert_eq!(c.cnonce.as_deref(), Some("0a4f113b"));
        assert_eq!(
            c.opaque.as_deref(),
            Some("5ccc069c403ebaf9f0171e9517f40e41")
        );

        let h = ha1(
            DigestAlgorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        assert_eq!(h, "939e7578ed9e3c518a452acee763bce9");
        assert_eq!(
            expected_response(DigestAlgorithm::Md5, &h, "GET", &c),
            "6629fae49393a05397450978507c4ef1"
        );
        assert!(verify(&h, "GET", &c));
        assert!(!verify(&h, "POST", &c));
    }

    #[test]
    fn rfc7616_md5_example() {
        let header = rfc7616("MD5", RFC7616_MD5);
        let c = parse_credentials(&header).unwrap();
        assert_eq!(c.algorithm, DigestAlgorithm::Md5);
        let h = ha1(
            DigestAlgorithm::Md5,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        assert_eq!(
            expected_response(DigestAlgorithm::Md5, &h, "GET", &c),
            RFC7616_MD5
        );
        assert!(verify(&h, "GET", &c));
    }

    #[test]
    fn rfc7616_sha256_example() {
        let header = rfc7616("SHA-256", RFC7616_SHA256);
        let c = parse_credentials(&header).unwrap();
        assert_eq!(c.algorithm, DigestAlgorithm::Sha256);
        let h = ha1(
            DigestAlgorithm::Sha256,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        assert_eq!(h.len(), 64);
        assert_eq!(
            expected_response(DigestAlgorithm::Sha256, &h, "GET", &c),
            RFC7616_SHA256
        );
        assert!(verify(&h, "GET", &c));
        // The same credentials checked against an MD5 HA1 fail.
        let md5 = ha1(
            DigestAlgorithm::Md5,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        assert!(!verify(&md5, "GET", &c));
    }

    #[test]
    fn no_qop_is_rfc2069() {
        let v = "Digest username=\"Mufasa\", realm=\"testrealm@host.com\", \
                 nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", uri=\"/dir/index.html\", \
                 response=\"670fd8c2df070c60b045671b8b24ff02\"";
        let c = parse_credentials(v).unwrap();
        assert_eq!(c.qop, None);
        assert_eq!(c.nc, None);
        assert_eq!(c.cnonce, None);
        let h = ha1(
            DigestAlgorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        // H(HA1:nonce:HA2), computed independently with Python's hashlib.
        assert_eq!(
            expected_response(DigestAlgorithm::Md5, &h, "GET", &c),
            "670fd8c2df070c60b045671b8b24ff02"
        );
        assert!(verify(&h, "GET", &c));
    }

    #[test]
    fn wrong_password_or_tampered_fields_fail() {
        let c = parse_credentials(RFC2617).unwrap();
        let wrong = ha1(
            DigestAlgorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle of Life",
        );
        assert!(!verify(&wrong, "GET", &c));

        let right = ha1(
            DigestAlgorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        let tampers: [fn(&mut Credentials); 7] = [
            |c| c.nonce.to_mut().push('x'),
            |c| c.uri = "/dir/index.htm".into(),
            |c| c.cnonce = Some("0a4f113c".into()),
            |c| c.nc_raw = Some("00000002".into()),
            |c| c.qop = None,
            |c| c.response = MD5_ZERO.into(),
            |c| {
                c.response.to_mut().pop();
            },
        ];
        for tamper in tampers {
            let mut t = c.clone();
            tamper(&mut t);
            assert!(!verify(&right, "GET", &t), "{t:?}");
        }
    }

    #[test]
    fn sip_register_roundtrip() {
        // Compute what a phone would send, put it in a header, parse and verify.
        let h = ha1(DigestAlgorithm::Md5, "alice", "example.com", "s3cret");
        assert_eq!(h, ALICE_HA1_MD5);
        let h1 = sip_register("0000000a", MD5_ZERO);

        let template = parse_credentials(&h1).unwrap();
        let response = expected_response(DigestAlgorithm::Md5, &h, "REGISTER", &template);
        assert_eq!(response, ALICE_RESPONSE_NC_LOWER);

        let h2 = sip_register("0000000a", &response);

        let c = parse_credentials(&h2).unwrap();
        assert_eq!(c.uri, "sip:example.com");
        assert_eq!(c.nc, Some(10));
        assert_eq!(c.nc_raw.as_deref(), Some("0000000a"));
        assert!(verify(&h, "REGISTER", &c));
        assert!(!verify(&h, "INVITE", &c));

        // Hex case of the response and of the stored HA1 does not matter.
        let h3 = sip_register("0000000a", &response.to_uppercase());

        let upper = parse_credentials(&h3).unwrap();
        assert!(verify(&h, "REGISTER", &upper));
        assert!(verify(&h.to_uppercase(), "REGISTER", &c));

        // The nc text is hashed as sent: upper-case 0000000A gives another response.
        let h4 = sip_register("0000000A", ALICE_RESPONSE_NC_UPPER);

        let c = parse_credentials(&h4).unwrap();
        assert_eq!(c.nc, Some(10));
        assert!(verify(&h, "REGISTER", &c));
        let mut lowered = c.clone();
        lowered.nc_raw = Some("0000000a".into());
        assert!(!verify(&h, "REGISTER", &lowered));

        // Without nc_raw (credentials built by hand), nc is written as 8 lower-case digits.
        let h5 = sip_register("0000000a", &response);

        let mut built = parse_credentials(&h5).unwrap();
        built.nc_raw = None;
        assert!(verify(&h, "REGISTER", &built));
    }

    #[test]
    fn sip_register_sha256() {
        let h = ha1(DigestAlgorithm::Sha256, "alice", "example.com", "s3cret");
        assert_eq!(h, ALICE_HA1_SHA256);
        let v = sip_register(
            "0000000a",
            "0ee461fa35f75981f1a6c1690fea2c3550fd848c781f93ef29ab2f35a44ca58f",
        )
        .replace("algorithm=MD5", "algorithm=sha-256");
        let c = parse_credentials(&v).unwrap();
        assert_eq!(c.algorithm, DigestAlgorithm::Sha256);
        assert!(verify(&h, "REGISTER", &c));
    }

    #[test]
    fn the_uri_is_hashed_as_sent() {
        let h = ha1(DigestAlgorithm::Md5, "alice", "example.com", "s3cret");
        let h6 = sip_register("0000000a", ALICE_RESPONSE_NC_LOWER);

        let c = parse_credentials(&h6).unwrap();
        for other in ["SIP:example.com", "sip:EXAMPLE.com", "sip:example.com:5060"] {
            let mut t = c.clone();
            t.uri = other.into();
            assert!(!verify(&h, "REGISTER", &t), "{other}");
        }
    }

    #[test]
    fn digest_uri_must_name_the_request_uri() {
        for (d, r) in [
            ("sip:example.com", "sip:example.com"),
            ("sip:EXAMPLE.com", "sip:example.COM"),
            ("SIP:alice@example.com", "sip:alice@example.com"),
            (
                "sip:alice@example.com;transport=UDP",
                "sip:alice@example.com;transport=udp",
            ),
            // A parameter other than user/ttl/method/maddr/transport in one only is ignored.
            ("sip:alice@example.com;ob", "sip:alice@example.com"),
            ("sip:alice@example.com;lr;x=1", "sip:alice@example.com;X=1"),
            ("sip:[2001:db8::1]:5070", "sip:[2001:db8::1]:5070"),
            ("tel:+15551234567", "tel:+15551234567"),
            // The default port, written or not.
            ("sip:example.com:5060", "sip:example.com"),
            ("sips:example.com:5061", "sips:example.com"),
        ] {
            assert!(uri_matches(d, r), "{d} vs {r}");
            assert!(uri_matches(r, d), "{r} vs {d}");
        }
        for (d, r) in [
            ("sip:evil.example", "sip:example.com"),
            ("sip:bob@example.com", "sip:alice@example.com"),
            ("sip:Alice@example.com", "sip:alice@example.com"),
            ("sips:example.com", "sip:example.com"),
            ("sip:example.com:5061", "sip:example.com:5060"),
            ("sip:example.com:5070", "sip:example.com"),
            ("sip:example.com;transport=tcp", "sip:example.com"),
            (
                "sip:example.com;transport=tcp",
                "sip:example.com;transport=udp",
            ),
            ("sip:example.com;user=phone", "sip:example.com"),
            ("sip:example.com;maddr=10.0.0.1", "sip:example.com"),
            ("sip:example.com;x=1", "sip:example.com;x=2"),
            ("sip:example.com?Subject=a", "sip:example.com"),
            ("tel:+15551234567", "tel:+15551234568"),
            ("", "sip:example.com"),
        ] {
            assert!(!uri_matches(d, r), "{d} vs {r}");
            assert!(!uri_matches(r, d), "{r} vs {d}");
        }
    }

    #[test]
    fn grammar_is_liberal_where_the_rfcs_are() {
        // Scheme and names in any case, tabs and folds around = and ,, tokens for
        // values RFC 7616 quotes, quoted values for tokens, unknown params ignored.
        let v = "  dIgEsT\tUserName = \"bob\" ,REALM=\r\n\t\"r\",nonce=n1 ,\r\n uri=\"sip:r\", \
                 Response=\"0123456789ABCDEF0123456789abcdef\", Algorithm=\"md5\", \
                 qop=\"Auth\", NC=000000Ff, cnonce=c, opaque=\"\", userhash=false, \
                 x-unknown=\"a, b = c\"";
        let c = parse_credentials(v).unwrap();
        assert_eq!(c.username, "bob");
        assert_eq!(c.realm, "r");
        assert_eq!(c.nonce, "n1");
        assert_eq!(c.uri, "sip:r");
        assert_eq!(c.response, "0123456789ABCDEF0123456789abcdef");
        assert_eq!(c.algorithm, DigestAlgorithm::Md5);
        assert_eq!(c.qop.as_deref(), Some("Auth"));
        assert_eq!(c.nc, Some(255));
        assert_eq!(c.nc_raw.as_deref(), Some("000000Ff"));
        assert_eq!(c.cnonce.as_deref(), Some("c"));
        assert_eq!(c.opaque.as_deref(), Some(""));
    }

    #[test]
    fn quoted_strings_unescape_and_unfold() {
        let v = format!(
            "Digest username=\"a\\\"b\\\\c\", realm=\"two\r\n words\", nonce=\"ü\", \
             uri=\"sip:x\", response=\"{MD5_ZERO}\""
        );
        let c = parse_credentials(&v).unwrap();
        assert_eq!(c.username, "a\"b\\c");
        // Unescaping and unfolding made copies; a plain value is the header's own text.
        assert!(matches!(c.username, Cow::Owned(_)));
        assert!(matches!(c.realm, Cow::Owned(_)));
        assert!(matches!(c.nonce, Cow::Borrowed(_)));
        assert_eq!(c.realm, "two words");
        assert_eq!(c.nonce, "ü");
    }

    #[test]
    fn grammar_errors() {
        use DigestError::*;
        let ok = format!(
            "username=\"u\", realm=\"r\", nonce=\"n\", uri=\"sip:x\", response=\"{MD5_ZERO}\""
        );
        assert!(parse_credentials(&format!("Digest {ok}")).is_ok());
        let cases: Vec<(String, DigestError)> = vec![
            (String::new(), NotDigest),
            ("   ".into(), NotDigest),
            (format!("Basic {ok}"), NotDigest),
            (format!("Digestive {ok}"), NotDigest),
            (format!("Digest,{ok}"), NotDigest),
            ("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==".into(), NotDigest),
            ("Digest".into(), Missing("username")),
            (format!("Digest {ok},"), Syntax),
            (format!("Digest {ok}, "), Syntax),
            (format!("Digest ,{ok}"), Syntax),
            (format!("Digest {ok},,x=1"), Syntax),
            (format!("Digest {ok} x=1"), Syntax),
            (format!("Digest {ok}, x"), Syntax),
            (format!("Digest {ok}, x="), Syntax),
            (format!("Digest {ok}, x=,y=1"), Syntax),
            (format!("Digest {ok}, x=\"open"), Syntax),
            (format!("Digest {ok}, x=\"esc\\"), Syntax),
            (format!("Digest {ok}, x=\"a\nb\""), Syntax),
            (format!("Digest {ok}, x=\"a\rb\""), Syntax),
            (format!("Digest {ok}, x=\"a\u{1}b\""), Syntax),
            (format!("Digest {ok}, x=\"a\\\u{e9}\""), Syntax),
            (format!("Digest {ok}, x=sip:x"), Syntax),
            (format!("Digest {ok}, x=\"a\"b"), Syntax),
            (format!("Digest {ok}, =1"), Syntax),
            (format!("Digest {ok}, Realm=\"r2\""), Duplicate("realm")),
            (format!("Digest {ok}, x=1, X=2"), Duplicate("auth-param")),
        ];
        for (v, want) in cases {
            assert_eq!(parse_credentials(&v), Err(want), "{v:?}");
        }
    }

    #[test]
    fn required_parameters() {
        let full = [
            ("username", "\"u\""),
            ("realm", "\"r\""),
            ("nonce", "\"n\""),
            ("uri", "\"sip:x\""),
            ("response", "\"00000000000000000000000000000000\""),
        ];
        for skip in 0..full.len() {
            let params: Vec<String> = full
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != skip)
                .map(|(_, (k, v))| format!("{k}={v}"))
                .collect();
            let v = format!("Digest {}", params.join(", "));
            assert_eq!(
                parse_credentials(&v),
                Err(DigestError::Missing(full[skip].0)),
                "{v}"
            );
        }
    }

    #[test]
    fn algorithms_and_qop() {
        let base = "Digest username=\"u\", realm=\"r\", nonce=\"n\", uri=\"sip:x\"";
        let md5 = format!("{base}, response=\"{MD5_ZERO}\"");
        let sha = format!("{base}, response=\"{MD5_ZERO}{MD5_ZERO}\"");
        let parse = |v: String| parse_credentials(&v).map(|c| c.algorithm);

        assert_eq!(parse(md5.clone()), Ok(DigestAlgorithm::Md5));
        assert_eq!(
            parse(format!("{md5}, algorithm=Md5")),
            Ok(DigestAlgorithm::Md5)
        );
        assert_eq!(
            parse(format!("{sha}, algorithm=SHA-256")),
            Ok(DigestAlgorithm::Sha256)
        );
        for alg in [
            "MD5-sess",
            "SHA-256-sess",
            "SHA-512-256",
            "SHA-512-256-sess",
            "SHA-1",
            "\"\"",
        ] {
            assert_eq!(
                parse(format!("{md5}, algorithm={alg}")),
                Err(DigestError::UnsupportedAlgorithm),
                "{alg}"
            );
        }
        // The response length must match the algorithm, and be hex.
        assert_eq!(
            parse(format!("{md5}, algorithm=SHA-256")),
            Err(DigestError::BadParam("response"))
        );
        assert_eq!(
            parse(format!("{sha}, algorithm=MD5")),
            Err(DigestError::BadParam("response"))
        );
        assert_eq!(
            parse(format!("{base}, response=\"{}\"", "g".repeat(32))),
            Err(DigestError::BadParam("response"))
        );

        let with = |tail: &str| parse_credentials(&format!("{md5}, {tail}")).map(|c| c.nc);
        assert_eq!(
            with("qop=auth-int, nc=00000001, cnonce=\"c\""),
            Err(DigestError::UnsupportedQop)
        );
        assert_eq!(
            with("qop=\"auth,auth-int\", nc=00000001, cnonce=\"c\""),
            Err(DigestError::UnsupportedQop)
        );
        assert_eq!(
            with("qop=auth, cnonce=\"c\""),
            Err(DigestError::Missing("nc"))
        );
        assert_eq!(
            with("qop=auth, nc=00000001"),
            Err(DigestError::Missing("cnonce"))
        );
        for nc in [
            "1",
            "0000001",
            "000000001",
            "0000000g",
            "00000000",
            "\"+0000001\"",
        ] {
            assert_eq!(
                with(&format!("qop=auth, nc={nc}, cnonce=\"c\"")),
                Err(DigestError::BadParam("nc")),
                "{nc}"
            );
        }
        assert_eq!(
            with("qop=auth, nc=ffffffff, cnonce=\"c\""),
            Ok(Some(u32::MAX))
        );
    }

    #[test]
    fn challenges() {
        assert_eq!(
            challenge(DigestAlgorithm::Md5, "example.com", "abc", "op", false),
            "Digest realm=\"example.com\", nonce=\"abc\", opaque=\"op\", algorithm=MD5, \
             qop=\"auth\""
        );
        assert_eq!(
            challenge(DigestAlgorithm::Sha256, "example.com", "abc", "op", true),
            "Digest realm=\"example.com\", nonce=\"abc\", opaque=\"op\", algorithm=SHA-256, \
             qop=\"auth\", stale=true"
        );
        // Quotes and backslashes are escaped; CR/LF can never split the header.
        assert_eq!(
            challenge(DigestAlgorithm::Md5, "a\"b\\c\r\nX: y", "n", "", false),
            "Digest realm=\"a\\\"b\\\\cX: y\", nonce=\"n\", algorithm=MD5, qop=\"auth\"",
            "an empty opaque is left out"
        );
    }

    #[test]
    fn a_client_answering_our_challenge_verifies() {
        // The realm as the client reads it back from our challenge is the realm we hashed.
        let ch = challenge(DigestAlgorithm::Md5, "we\"ird", "n0", "o", false);
        let realm_q = ch
            .split(", ")
            .next()
            .and_then(|p| p.strip_prefix("Digest realm="))
            .unwrap();
        let v = format!(
            "Digest username=\"u\", realm={realm_q}, nonce=\"n0\", uri=\"sip:x\", \
             response=\"{MD5_ZERO}\", opaque=\"o\""
        );
        let mut c = parse_credentials(&v).unwrap();
        assert_eq!(c.realm, "we\"ird");
        let h = ha1(DigestAlgorithm::Md5, "u", &c.realm, "pw");
        c.response = expected_response(DigestAlgorithm::Md5, &h, "INVITE", &c).into();
        assert!(verify(&h, "INVITE", &c));
    }

    /// A small deterministic LCG (Numerical Recipes constants) for the garbage test.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) as u32
        }
    }

    #[test]
    fn never_panics_on_truncated_or_garbage_input() {
        let valid = rfc7616("SHA-256", RFC7616_SHA256);
        assert!(parse_credentials(&valid).is_ok());
        let h = ha1(DigestAlgorithm::Md5, "u", "r", "p");
        // Every prefix. The response is last but one, so the only complete prefix is the one
        // that stops just before `, opaque=`; every other cut is an error.
        let complete = valid.find(", opaque=").unwrap();
        for cut in 0..valid.len() {
            let r = parse_credentials(&valid[..cut]);
            assert_eq!(r.is_ok(), cut == complete, "{:?}", &valid[..cut]);
        }
        for cut in 0..RFC2617.len() {
            if let Ok(c) = parse_credentials(&RFC2617[..cut]) {
                let _ = verify(&h, "GET", &c);
            }
        }

        // Random bytes, and random strings over the characters the grammar cares about.
        let alphabet: &[u8] = b"Digest =,\"\\\r\n\t abcnru0123456789fF-";
        let mut rng = Lcg(0x5eed);
        let mut parsed = 0;
        for round in 0..20_000 {
            let len = (rng.next() % 96) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let r = rng.next();
                    if round % 2 == 0 {
                        r as u8
                    } else {
                        alphabet[r as usize % alphabet.len()]
                    }
                })
                .collect();
            let s = String::from_utf8_lossy(&bytes);
            for v in [s.to_string(), format!("Digest {s}"), format!("{valid}{s}")] {
                if let Ok(c) = parse_credentials(&v) {
                    parsed += 1;
                    let _ = verify(&h, "REGISTER", &c);
                }
            }
        }
        // Appending garbage to a valid value is sometimes still valid (e.g. trailing
        // white space), so some inputs parse; the point is that none panicked.
        assert!(parsed > 0);
    }

    /// RFC 7616 §3.9.1: the challenge and the client's answer, MD5 and SHA-256.
    #[test]
    fn client_answers_the_rfc7616_example() {
        for (alg, expected) in [("MD5", RFC7616_MD5), ("SHA-256", RFC7616_SHA256)] {
            let ch = parse_challenge(&format!(
                "Digest\r\n realm=\"http-auth@example.org\",\r\n qop=\"auth, auth-int\",\r\n \
                 algorithm={alg},\r\n nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\",\r\n \
                 opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\""
            ))
            .unwrap();
            assert!(ch.qop_auth);
            let value = authorization(
                &ch,
                &Answer {
                    username: "Mufasa",
                    password: "Circle of Life",
                    method: "GET",
                    uri: "/dir/index.html",
                    cnonce: "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
                    nc: 1,
                },
            );
            // Our own server side reads it back and checks it.
            let c = parse_credentials(&value).unwrap();
            assert_eq!(c.response, expected, "{alg}");
            assert_eq!(c.nc_raw.as_deref(), Some("00000001"));
            assert_eq!(
                c.opaque.as_deref(),
                Some("FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS")
            );
            let h = ha1(
                c.algorithm,
                "Mufasa",
                "http-auth@example.org",
                "Circle of Life",
            );
            assert!(verify(&h, "GET", &c));
        }
    }

    /// No qop in the challenge: the RFC 2069 form, no cnonce or nc.
    #[test]
    fn client_answers_without_qop() {
        let ch = parse_challenge(
            "Digest realm=\"testrealm@host.com\", nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\"",
        )
        .unwrap();
        assert!(!ch.qop_auth);
        assert_eq!(ch.algorithm, DigestAlgorithm::Md5);
        let value = authorization(
            &ch,
            &Answer {
                username: "Mufasa",
                password: "Circle Of Life",
                method: "GET",
                uri: "/dir/index.html",
                cnonce: "unused",
                nc: 1,
            },
        );
        let c = parse_credentials(&value).unwrap();
        assert_eq!(c.response, "670fd8c2df070c60b045671b8b24ff02");
        assert_eq!((c.qop, c.cnonce, c.nc), (None, None, None));
    }

    #[test]
    fn challenge_parsing() {
        let ch = parse_challenge(&challenge(
            DigestAlgorithm::Sha256,
            "example.com",
            "n\"1",
            "",
            true,
        ))
        .unwrap();
        assert_eq!(ch.realm, "example.com");
        assert_eq!(ch.nonce, "n\"1");
        assert_eq!(ch.algorithm, DigestAlgorithm::Sha256);
        assert!(ch.qop_auth && ch.stale);
        assert_eq!(ch.opaque, None);
        for (bad, err) in [
            ("Basic realm=\"x\"", DigestError::NotDigest),
            ("Digest nonce=\"n\"", DigestError::Missing("realm")),
            ("Digest realm=\"r\"", DigestError::Missing("nonce")),
            (
                "Digest realm=\"r\", nonce=\"n\", algorithm=MD5-sess",
                DigestError::UnsupportedAlgorithm,
            ),
            (
                "Digest realm=\"r\", nonce=\"n\", qop=\"auth-int\"",
                DigestError::UnsupportedQop,
            ),
            (
                "Digest realm=\"r\", realm=\"s\", nonce=\"n\"",
                DigestError::Duplicate("realm"),
            ),
            ("Digest realm=\"r\" nonce=\"n\"", DigestError::Syntax),
        ] {
            assert_eq!(parse_challenge(bad), Err(err), "{bad}");
        }
        // Every truncation is an error or a challenge, never a panic.
        let full = "Digest realm=\"a\\\"b\", nonce=\"xyz\", qop=\"auth\", opaque=\"o\"";
        for n in 0..full.len() {
            let _ = parse_challenge(&full[..n]);
        }
    }
}
