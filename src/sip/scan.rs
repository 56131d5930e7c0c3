//! Byte-level scanning shared by the header value parsers: linear white space, quoted strings,
//! top-level comma lists and `;name=value` parameters (RFC 3261 §25.1).
//!
//! Every function works on absolute offsets into the message buffer so that a parsed value can
//! be edited in place later.

use std::ops::Range;

/// Linear white space, including the CR/LF of a folded header (RFC 3261 §7.3.1).
pub(crate) fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// `token` characters of RFC 3261 §25.1.
#[inline]
pub(crate) fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// Shrinks `r` so that it neither starts nor ends with white space.
pub(crate) fn trim(buf: &[u8], mut r: Range<usize>) -> Range<usize> {
    while r.start < r.end && is_lws(buf[r.start]) {
        r.start += 1;
    }
    while r.end > r.start && is_lws(buf[r.end - 1]) {
        r.end -= 1;
    }
    r
}

/// Skips white space from `i`, never past `end`.
pub(crate) fn skip_lws(buf: &[u8], mut i: usize, end: usize) -> usize {
    while i < end && is_lws(buf[i]) {
        i += 1;
    }
    i
}

/// Given `buf[i] == b'"'`, returns the offset just past the closing quote, honouring `\`
/// escapes, or `None` when the string is not terminated before `end`.
pub(crate) fn skip_quoted(buf: &[u8], mut i: usize, end: usize) -> Option<usize> {
    i += 1;
    while i < end {
        match buf[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Splits a header value at the commas that separate list elements, ignoring commas inside
/// quoted strings and `<...>` URIs. Elements are trimmed; empty elements are kept (as empty
/// ranges) so that the caller can reject them. `None` means an unterminated quote or bracket.
pub(crate) fn split_list(buf: &[u8], r: Range<usize>) -> Option<Vec<Range<usize>>> {
    let mut out = Vec::new();
    scan_list(buf, r, |e| out.push(e))?;
    Some(out)
}

/// The first element of a list, as [`split_list`] would give it, without allocating; the
/// whole value is still checked (`None` for an unterminated quote or bracket anywhere).
pub(crate) fn first_of_list(buf: &[u8], r: Range<usize>) -> Option<Range<usize>> {
    let mut first = None;
    scan_list(buf, r, |e| {
        first.get_or_insert(e);
    })?;
    first
}

/// Calls `each` with every trimmed list element of `r`, in order.
pub(crate) fn scan_list(
    buf: &[u8],
    r: Range<usize>,
    mut each: impl FnMut(Range<usize>),
) -> Option<()> {
    let mut start = r.start;
    let mut i = r.start;
    while i < r.end {
        match buf[i] {
            b'"' => i = skip_quoted(buf, i, r.end)?,
            b'<' => {
                i += buf[i..r.end].iter().position(|&b| b == b'>')? + 1;
            }
            b',' => {
                each(trim(buf, start..i));
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    each(trim(buf, start..r.end));
    Some(())
}

/// One `;name[=value]` parameter. `span` covers from the `;` to the end of the value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Param {
    pub name: Range<usize>,
    pub value: Option<Range<usize>>,
    pub span: Range<usize>,
}

/// How many parameters a [`Params`] holds without allocating: a Via's `branch`, `rport`,
/// `received` and one more; a From's or To's `tag`; a Contact's `expires`, `+sip.instance`,
/// `reg-id`.
const INLINE_PARAMS: usize = 4;

/// A parsed `*( SEMI name [EQUAL value] )` list: the first [`INLINE_PARAMS`] in place, the
/// rest in a vector. Built as a vector at every parse of a Via, From, To or Contact, it was
/// ~50 allocations per proxied call (issue #15).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    len: usize,
    inline: [Param; INLINE_PARAMS],
    more: Vec<Param>,
}

impl Params {
    fn push(&mut self, p: Param) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = p,
            None => self.more.push(p),
        }
        self.len += 1;
    }

    /// The parameters in order.
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.inline[..self.len.min(INLINE_PARAMS)]
            .iter()
            .chain(&self.more)
    }

    /// A parameter by case-insensitive name (`buf`: the message the list was parsed from).
    pub fn find(&self, buf: &[u8], name: &str) -> Option<&Param> {
        self.iter()
            .find(|p| buf[p.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
    }

    /// The last parameter.
    pub fn last(&self) -> Option<&Param> {
        self.iter().last()
    }
}

/// Parses `*( SEMI name [EQUAL value] )` from `r`, which must start at a `;` (after optional
/// white space) or be empty. Values may be tokens, hosts or quoted strings.
pub(crate) fn parse_params(buf: &[u8], r: Range<usize>) -> Option<Params> {
    let mut out = Params::default();
    let mut i = skip_lws(buf, r.start, r.end);
    while i < r.end {
        let (p, next) = scan_param(buf, i, r.end)?;
        out.push(p);
        i = next;
    }
    Some(out)
}

/// The parameter at `i` (a `;`) and where the next one starts (past white space); `None`
/// at `end` or when no parameter is there.
fn scan_param(buf: &[u8], i: usize, end: usize) -> Option<(Param, usize)> {
    if i >= end || buf[i] != b';' {
        return None;
    }
    let semi = i;
    let mut i = skip_lws(buf, i + 1, end);
    let name_start = i;
    while i < end && is_token(buf[i]) {
        i += 1;
    }
    if i == name_start {
        return None;
    }
    let name = name_start..i;
    i = skip_lws(buf, i, end);
    let mut value = None;
    let mut span_end = name.end;
    if i < end && buf[i] == b'=' {
        i = skip_lws(buf, i + 1, end);
        let vstart = i;
        if i < end && buf[i] == b'"' {
            i = skip_quoted(buf, i, end)?;
        } else if i < end && buf[i] == b'[' {
            i += buf[i..end].iter().position(|&b| b == b']')? + 1;
        } else {
            while i < end && buf[i] != b';' && !is_lws(buf[i]) {
                i += 1;
            }
        }
        value = Some(vstart..i);
        span_end = i;
        i = skip_lws(buf, i, end);
    }
    let p = Param {
        name,
        value,
        span: semi..span_end,
    };
    Some((p, i))
}

/// Parses an unsigned decimal made only of digits, with an upper bound.
pub(crate) fn parse_decimal(bytes: &[u8], max: u64) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 20 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &b in bytes {
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (n <= max).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_split_respects_quotes_and_brackets() {
        let v = br#""A, B" <sip:a@x;p=1,2>;q=0.5 , <sip:b@y>"#;
        let parts = split_list(v, 0..v.len()).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(&v[parts[0].clone()], br#""A, B" <sip:a@x;p=1,2>;q=0.5"#);
        assert_eq!(&v[parts[1].clone()], b"<sip:b@y>");
        assert!(split_list(b"\"open", 0..5).is_none());
        assert!(split_list(b"<sip:open", 0..9).is_none());
    }

    #[test]
    fn first_of_list_is_the_first_split_and_checks_the_rest() {
        let v = br#" "A, B" <sip:a@x;p=1,2> , <sip:b@y>"#;
        let first = first_of_list(v, 0..v.len()).unwrap();
        assert_eq!(first, split_list(v, 0..v.len()).unwrap()[0]);
        assert_eq!(&v[first], br#""A, B" <sip:a@x;p=1,2>"#);
        // An unterminated quote after the first element still makes the value malformed.
        assert!(first_of_list(b"SIP/2.0/UDP a, \"open", 0..20).is_none());
        assert_eq!(first_of_list(b"", 0..0), Some(0..0));
    }

    #[test]
    fn params_with_quotes_and_lws() {
        let v = br#" ;expires=60 ; +sip.instance="<urn:uuid:1;2>";lr"#;
        let p: Vec<Param> = parse_params(v, 0..v.len())
            .unwrap()
            .iter()
            .cloned()
            .collect();
        assert_eq!(p.len(), 3);
        assert_eq!(&v[p[0].value.clone().unwrap()], b"60");
        assert_eq!(&v[p[1].name.clone()], b"+sip.instance");
        assert_eq!(
            &v[p[1].value.clone().unwrap()],
            br#""<urn:uuid:1;2>""#.as_slice()
        );
        assert!(p[2].value.is_none());
        let params = parse_params(v, 0..v.len()).unwrap();
        assert_eq!(params.find(v, "LR"), Some(&p[2]));
        assert_eq!(params.last(), Some(&p[2]));
        assert!(params.find(v, "l").is_none());
        assert!(parse_params(b"junk", 0..4).is_none());
        assert!(
            parse_params(b";a=1;", 0..5).is_none(),
            "a lone ; is not a parameter"
        );
        assert!(parse_params(b";a=\"x", 0..5).is_none(), "unclosed quote");
        assert!(
            parse_params(b";a=\"x\\", 0..6).is_none(),
            "escape at the end"
        );
        let empty = parse_params(b"  ", 0..2).unwrap();
        assert!(empty.iter().next().is_none() && empty.last().is_none());
        // Past the ones kept in place.
        let v = b";a;b=2;c;d=4;e=5;f";
        let many = parse_params(v, 0..v.len()).unwrap();
        let names: Vec<&[u8]> = many.iter().map(|p| &v[p.name.clone()]).collect();
        assert_eq!(
            names,
            [b"a", b"b", b"c", b"d", b"e", b"f"].map(|n| n.as_slice())
        );
        assert_eq!(many.iter().count(), 6);
        assert_eq!(&v[many.find(v, "E").unwrap().value.clone().unwrap()], b"5");
        assert_eq!(&v[many.last().unwrap().name.clone()], b"f");
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal(b"70", 255), Some(70));
        assert_eq!(parse_decimal(b"256", 255), None);
        assert_eq!(parse_decimal(b"-1", 255), None);
        assert_eq!(parse_decimal(b"", 255), None);
        assert_eq!(parse_decimal(b"99999999999999999999", u64::MAX), None);
    }
}
