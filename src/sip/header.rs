//! Header names: canonical forms, compact forms (RFC 3261 §7.3.3, RFC 3265, RFC 3515, RFC 4028)
//! and case-insensitive matching (RFC 3261 §7.3.1).

/// The headers the proxy reads or edits. Everything else is [`HeaderName::Other`] and is
/// forwarded untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    MaxForwards,
    Contact,
    Route,
    RecordRoute,
    ContentLength,
    ContentType,
    Expires,
    Authorization,
    ProxyAuthorization,
    WwwAuthenticate,
    ProxyAuthenticate,
    Supported,
    Require,
    ProxyRequire,
    Path,
    UserAgent,
    /// RFC 3325 identity headers, and the older Remote-Party-ID (removed from untrusted
    /// senders' requests).
    PAssertedIdentity,
    PPreferredIdentity,
    RemotePartyId,
    /// Any other header, matched by its name bytes.
    Other,
}

impl HeaderName {
    /// Canonical spelling, used when sipedge writes a header and in error reason phrases.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Via => "Via",
            Self::From => "From",
            Self::To => "To",
            Self::CallId => "Call-ID",
            Self::CSeq => "CSeq",
            Self::MaxForwards => "Max-Forwards",
            Self::Contact => "Contact",
            Self::Route => "Route",
            Self::RecordRoute => "Record-Route",
            Self::ContentLength => "Content-Length",
            Self::ContentType => "Content-Type",
            Self::Expires => "Expires",
            Self::Authorization => "Authorization",
            Self::ProxyAuthorization => "Proxy-Authorization",
            Self::WwwAuthenticate => "WWW-Authenticate",
            Self::ProxyAuthenticate => "Proxy-Authenticate",
            Self::Supported => "Supported",
            Self::Require => "Require",
            Self::ProxyRequire => "Proxy-Require",
            Self::Path => "Path",
            Self::UserAgent => "User-Agent",
            Self::PAssertedIdentity => "P-Asserted-Identity",
            Self::PPreferredIdentity => "P-Preferred-Identity",
            Self::RemotePartyId => "Remote-Party-ID",
            Self::Other => "",
        }
    }

    /// Recognises a header name as written on the wire: any case, long or compact form.
    pub fn from_bytes(name: &[u8]) -> Self {
        if name.len() == 1 {
            // RFC 3261 §7.3.3 and the registry of compact forms.
            return match name[0].to_ascii_lowercase() {
                b'v' => Self::Via,
                b'f' => Self::From,
                b't' => Self::To,
                b'i' => Self::CallId,
                b'm' => Self::Contact,
                b'l' => Self::ContentLength,
                b'c' => Self::ContentType,
                b'k' => Self::Supported,
                _ => Self::Other,
            };
        }
        const LONG: &[(&[u8], HeaderName)] = &[
            (b"via", HeaderName::Via),
            (b"from", HeaderName::From),
            (b"to", HeaderName::To),
            (b"call-id", HeaderName::CallId),
            (b"cseq", HeaderName::CSeq),
            (b"max-forwards", HeaderName::MaxForwards),
            (b"contact", HeaderName::Contact),
            (b"route", HeaderName::Route),
            (b"record-route", HeaderName::RecordRoute),
            (b"content-length", HeaderName::ContentLength),
            (b"content-type", HeaderName::ContentType),
            (b"expires", HeaderName::Expires),
            (b"authorization", HeaderName::Authorization),
            (b"proxy-authorization", HeaderName::ProxyAuthorization),
            (b"www-authenticate", HeaderName::WwwAuthenticate),
            (b"proxy-authenticate", HeaderName::ProxyAuthenticate),
            (b"supported", HeaderName::Supported),
            (b"require", HeaderName::Require),
            (b"proxy-require", HeaderName::ProxyRequire),
            (b"path", HeaderName::Path),
            (b"user-agent", HeaderName::UserAgent),
            (b"p-asserted-identity", HeaderName::PAssertedIdentity),
            (b"p-preferred-identity", HeaderName::PPreferredIdentity),
            (b"remote-party-id", HeaderName::RemotePartyId),
        ];
        LONG.iter()
            .find(|(long, _)| long.eq_ignore_ascii_case(name))
            .map_or(Self::Other, |(_, h)| *h)
    }

    /// Headers that RFC 3261 §7.3 allows to appear only once (their grammar has no `#` list).
    pub fn is_single(self) -> bool {
        matches!(
            self,
            Self::From
                | Self::To
                | Self::CallId
                | Self::CSeq
                | Self::MaxForwards
                | Self::ContentLength
                | Self::ContentType
                | Self::Expires
        )
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderName;

    #[test]
    fn compact_and_case_insensitive() {
        for (wire, want) in [
            ("v", HeaderName::Via),
            ("V", HeaderName::Via),
            ("f", HeaderName::From),
            ("t", HeaderName::To),
            ("i", HeaderName::CallId),
            ("m", HeaderName::Contact),
            ("l", HeaderName::ContentLength),
            ("c", HeaderName::ContentType),
            ("k", HeaderName::Supported),
            ("s", HeaderName::Other),
            ("cALL-iD", HeaderName::CallId),
            ("RECORD-ROUTE", HeaderName::RecordRoute),
            ("X-Custom", HeaderName::Other),
            ("p-asserted-identity", HeaderName::PAssertedIdentity),
            ("P-Preferred-Identity", HeaderName::PPreferredIdentity),
            ("Remote-Party-Id", HeaderName::RemotePartyId),
        ] {
            assert_eq!(HeaderName::from_bytes(wire.as_bytes()), want, "{wire}");
        }
    }
}
