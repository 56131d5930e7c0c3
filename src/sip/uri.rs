//! SIP and SIPS URIs (RFC 3261 §19.1), borrowed from the message text.
//!
//! sipedge reads URIs (user and host of the Request-URI, Route and Contact targets) but never
//! re-serialises them: a forwarded URI keeps its bytes. Other schemes (tel:, urn:, mailto:)
//! are recognised as such and left alone.

use std::net::IpAddr;

/// A `sip:`/`sips:` URI. Escapes (`%41`) are kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri<'a> {
    pub secure: bool,
    pub user: Option<&'a str>,
    pub password: Option<&'a str>,
    /// The host as written, with the brackets of an IPv6 reference removed.
    pub host: &'a str,
    pub port: Option<u16>,
    /// `;name[=value]` parameters, as written, without the leading `;`.
    params: &'a str,
    /// `?headers`, without the `?`.
    pub headers: Option<&'a str>,
}

/// Why a URI could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// Not `scheme:...` at all.
    #[error("not a URI")]
    NotAUri,
    /// A URI of another scheme; the scheme is reported so that a proxy can answer 416.
    #[error("unsupported URI scheme")]
    Scheme,
    /// A sip/sips URI that breaks the grammar (empty host, bad port, bad IPv6 reference).
    #[error("malformed SIP URI")]
    Malformed,
}

impl<'a> SipUri<'a> {
    pub fn parse(text: &'a str) -> Result<Self, UriError> {
        let colon = text.find(':').ok_or(UriError::NotAUri)?;
        let scheme = &text[..colon];
        if scheme.is_empty()
            || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(UriError::NotAUri);
        }
        let secure = if scheme.eq_ignore_ascii_case("sip") {
            false
        } else if scheme.eq_ignore_ascii_case("sips") {
            true
        } else {
            return Err(UriError::Scheme);
        };
        let rest = &text[colon + 1..];
        // userinfo ends at the first '@': RFC 3261 §25.1 forbids a bare '@' in user and password
        // (the user part may hold ';' and '?', so they cannot delimit it).
        let (userinfo, hostpart) = match rest.find('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, pw)) => (Some(user), Some(pw)),
                None => (Some(u), None),
            },
            None => (None, None),
        };
        if user.is_some_and(str::is_empty) {
            return Err(UriError::Malformed);
        }
        let (host, after_host) = if let Some(v6) = hostpart.strip_prefix('[') {
            let close = v6.find(']').ok_or(UriError::Malformed)?;
            let host = &v6[..close];
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| UriError::Malformed)?;
            (host, &v6[close + 1..])
        } else {
            let end = hostpart.find([':', ';', '?']).unwrap_or(hostpart.len());
            (&hostpart[..end], &hostpart[end..])
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:".contains(c))
        {
            return Err(UriError::Malformed);
        }
        let (port, after_port) = match after_host.strip_prefix(':') {
            Some(p) => {
                let end = p.find([';', '?']).unwrap_or(p.len());
                let port = p[..end].parse::<u16>().map_err(|_| UriError::Malformed)?;
                (Some(port), &p[end..])
            }
            None => (None, after_host),
        };
        let (params, headers) = match after_port.find('?') {
            Some(q) => (&after_port[..q], Some(&after_port[q + 1..])),
            None => (after_port, None),
        };
        Ok(Self {
            secure,
            user,
            password,
            host,
            port,
            params: params.strip_prefix(';').unwrap_or(params),
            headers,
        })
    }

    /// The value of a URI parameter (`None` if absent, `Some("")` for a flag like `lr`).
    pub fn param(&self, name: &str) -> Option<&'a str> {
        self.params
            .split(';')
            .filter(|p| !p.is_empty())
            .find_map(|p| match p.split_once('=') {
                Some((n, v)) if n.eq_ignore_ascii_case(name) => Some(v),
                None if p.eq_ignore_ascii_case(name) => Some(""),
                _ => None,
            })
    }

    /// The `;`-separated parameters as written, without the leading `;` (may be empty).
    pub fn params(&self) -> &'a str {
        self.params
    }

    /// The same URI with another host and port (Kamailio's `rewritehostport`): scheme, user,
    /// password, parameters and headers are kept as written.
    pub fn with_hostport(&self, host: &str, port: u16) -> String {
        self.with_host(host, Some(port))
    }

    /// [`SipUri::with_hostport`] where the port may be left out (a name to be resolved
    /// through SRV, RFC 3263 §4.2).
    pub fn with_host(&self, host: &str, port: Option<u16>) -> String {
        let scheme = if self.secure { "sips" } else { "sip" };
        let mut out = format!("{scheme}:");
        if let Some(user) = self.user {
            out.push_str(user);
            if let Some(pw) = self.password {
                out.push(':');
                out.push_str(pw);
            }
            out.push('@');
        }
        if host.contains(':') {
            out.push_str(&format!("[{host}]"));
        } else {
            out.push_str(host);
        }
        if let Some(port) = port {
            out.push_str(&format!(":{port}"));
        }
        if !self.params.is_empty() {
            out.push(';');
            out.push_str(self.params);
        }
        if let Some(h) = self.headers {
            out.push('?');
            out.push_str(h);
        }
        out
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The address of a URI whose host is an IP address, on its port or 5060: what nathelper
    /// compares with where a message came from.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        self.ip()
            .map(|ip| std::net::SocketAddr::new(ip, self.port.unwrap_or(5060)))
    }

    /// The transport parameter, lower-cased comparisons are the caller's business.
    pub fn transport(&self) -> Option<&'a str> {
        self.param("transport")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_common_forms() {
        let u =
            SipUri::parse("sip:alice:secret@example.com:5070;transport=tcp;lr?subject=x").unwrap();
        assert_eq!(u.user, Some("alice"));
        assert_eq!(u.password, Some("secret"));
        assert_eq!(u.host, "example.com");
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.transport(), Some("tcp"));
        assert_eq!(u.param("LR"), Some(""));
        assert_eq!(u.headers, Some("subject=x"));

        let u = SipUri::parse("sips:[2001:db8::10]:5061").unwrap();
        assert!(u.secure);
        assert_eq!(u.host, "2001:db8::10");
        assert_eq!(u.ip(), Some("2001:db8::10".parse().unwrap()));
        assert_eq!(u.port, Some(5061));

        // RFC 3261 user-unreserved allows ';' and '?' in the user part.
        let u = SipUri::parse("sip:user;par=u%40example.net@example.com").unwrap();
        assert_eq!(u.user, Some("user;par=u%40example.net"));
        assert_eq!(u.host, "example.com");
    }

    #[test]
    fn rewrite_host_and_port() {
        let u = SipUri::parse("sip:1234@example.com;user=phone?subject=x").unwrap();
        assert_eq!(
            u.with_hostport("pbx.example.net", 5070),
            "sip:1234@pbx.example.net:5070;user=phone?subject=x"
        );
        let u = SipUri::parse("sips:a:pw@h").unwrap();
        assert_eq!(
            u.with_hostport("2001:db8::1", 5061),
            "sips:a:pw@[2001:db8::1]:5061"
        );
    }

    #[test]
    fn rejects_and_classifies() {
        assert_eq!(SipUri::parse("tel:+15551234"), Err(UriError::Scheme));
        assert_eq!(SipUri::parse("urn:service:sos"), Err(UriError::Scheme));
        assert_eq!(SipUri::parse("nocolon"), Err(UriError::NotAUri));
        assert_eq!(SipUri::parse("sip:"), Err(UriError::Malformed));
        assert_eq!(SipUri::parse("sip:a@h:99999"), Err(UriError::Malformed));
        assert_eq!(SipUri::parse("sip:[zz::1]"), Err(UriError::Malformed));
        assert_eq!(SipUri::parse("sip:@host"), Err(UriError::Malformed));
    }

    /// Differential check against rsip on URIs both should accept: same user, host and port.
    #[test]
    fn agrees_with_rsip() {
        for text in [
            "sip:alice@example.com",
            "sip:bob@192.0.2.4:5080",
            "sip:example.com;transport=tcp",
            "sips:carol@chicago.example.com",
            "sip:+15551234567@gw.example.net;user=phone",
        ] {
            let ours = SipUri::parse(text).unwrap();
            let theirs = rsip::Uri::try_from(text).unwrap();
            assert_eq!(ours.user, theirs.user(), "{text}");
            assert_eq!(ours.host, theirs.host().to_string(), "{text}");
            assert_eq!(ours.port, theirs.port().map(|p| *p.value()), "{text}");
        }
    }
}
