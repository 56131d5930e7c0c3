//! Building the request a proxy forwards (RFC 3261 §16.6): new Request-URI when retargeted,
//! Max-Forwards decremented (and capped), Record-Route on dialog-creating requests (two when
//! the request changes transport), our Via on top with a branch that a retransmission maps
//! to again, credentials meant for us removed, identity headers of untrusted senders removed
//! and ours added (RFC 3325 §5). Everything else is forwarded byte for byte.
//!
//! Pure: message in, bytes out.

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

use crate::auth::mac::{ROUTE_MAC_PARAM, RouteKey};
use crate::config::Identity;
use crate::sip::text::{Addr, Ip};
use crate::sip::{HeaderName, Message, Rewrite};
use crate::transport::Proto;

/// Where and how one branch is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// New Request-URI, or `None` to keep the received one.
    pub ruri: Option<String>,
    /// The next hop (resolved).
    pub dest: SocketAddr,
    pub proto: Proto,
}

/// Our side of a hop: the address we write in Via/Record-Route and the socket's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    pub advertise: std::net::IpAddr,
    pub port: u16,
}

/// A NAT binding: where a party behind NAT can be reached (the address and transport its
/// packets come from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub proto: Proto,
    pub addr: SocketAddr,
}

impl Flow {
    /// The Record-Route parameter value: `u~IP~PORT`, `t~IP~PORT` or `s~IP~PORT` (TLS).
    pub fn token(self) -> String {
        let mut t = String::with_capacity(24);
        self.write_token(&mut t);
        t
    }

    /// Appends the token to `out`.
    pub fn write_token(self, out: &mut String) {
        let p = match self.proto {
            Proto::Udp => 'u',
            Proto::Tcp => 't',
            Proto::Tls => 's',
        };
        let _ = write!(out, "{p}~{}~{}", Ip(self.addr.ip()), self.addr.port());
    }

    /// Reads a token written by [`Flow::token`].
    pub fn parse(token: &str) -> Option<Self> {
        let mut it = token.split('~');
        let proto = match it.next()? {
            "u" => Proto::Udp,
            "t" => Proto::Tcp,
            "s" => Proto::Tls,
            _ => return None,
        };
        let ip: std::net::IpAddr = it.next()?.parse().ok()?;
        let port: u16 = it.next()?.parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(Self {
            proto,
            addr: SocketAddr::new(ip, port),
        })
    }
}

/// The identity headers of a forwarded request (RFC 3325).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityEdit {
    /// The sender is outside our trust domain (not in `security.trusted`): the
    /// `P-Asserted-Identity`, `P-Preferred-Identity` and `Remote-Party-ID` it wrote are
    /// removed (RFC 3325 §5: an identity is only passed on from a trusted element).
    pub strip: bool,
    /// Our assertion for the authenticated caller (`[[route]] identity`). It replaces any
    /// identity header the request carried (RFC 3325 §6: the proxy that asserts removes
    /// `P-Preferred-Identity`).
    pub assert: Option<Asserted>,
}

/// One identity header we add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asserted {
    /// [`HeaderName::PAssertedIdentity`] or [`HeaderName::RemotePartyId`].
    pub name: HeaderName,
    pub value: String,
}

impl Asserted {
    /// The header a route's `identity` asks for, for `user` (the caller ID, or the username)
    /// in `domain`; `None` for `identity = "none"`. RPID carries the seed's `rpid_suffix`.
    pub fn new(mode: Identity, user: &str, domain: &str) -> Option<Self> {
        let uri = format!("<sip:{user}@{domain}>");
        match mode {
            Identity::Pai => Some(Self {
                name: HeaderName::PAssertedIdentity,
                value: uri,
            }),
            Identity::Rpid => Some(Self {
                name: HeaderName::RemotePartyId,
                value: format!("{uri};party=calling;id-type=subscriber;screen=yes"),
            }),
            Identity::None => None,
        }
    }
}

const IDENTITY_HEADERS: [HeaderName; 3] = [
    HeaderName::PAssertedIdentity,
    HeaderName::PPreferredIdentity,
    HeaderName::RemotePartyId,
];

/// What the pipeline decided about the forwarded copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Add Record-Route (dialog-creating requests).
    pub record_route: bool,
    /// Remove Proxy-Authorization (credentials were for us: `consume_credentials`).
    pub strip_proxy_auth: bool,
    /// Mark the caller as NATed in our Record-Route (`;nat=yes`, the seed's
    /// `record_route_preset`).
    pub nat: bool,
    /// `server.max_forwards`.
    pub max_forwards_cap: u8,
    /// The caller's NAT binding (`;fc=`) and the callee's (`;fe=`), written into our
    /// Record-Route so that in-dialog requests reach a NATed party at its binding while their
    /// Request-URI stays the Contact it sent (no Contact rewriting; DESIGN §4).
    pub caller_flow: Option<Flow>,
    pub callee_flow: Option<Flow>,
    /// Where the request came from: the previous hop's Via gets `received`/`rport`
    /// (RFC 3261 §18.2.1, RFC 3581), `rport` even unasked when `force_rport` (a NATed sender).
    pub source: Option<SocketAddr>,
    pub force_rport: bool,
    /// Our Route header on top is removed (loose routing), or the last one, which became the
    /// Request-URI (strict-route compatibility), RFC 3261 §16.4.
    pub route: RouteEdit,
    /// Identity headers removed and added (RFC 3325).
    pub identity: IdentityEdit,
    /// Forwarded to the instance owning the callee's binding (README "Several instances"):
    /// its SIP address and the phone's NAT binding, written into a signed Route on top
    /// ([`owner_route_uri`]).
    pub owner: Option<(SocketAddr, Flow)>,
    /// Added to the CSeq number: a trunk's authenticated re-send went out with the caller's
    /// CSeq + 1, so the dialog's later requests from the caller follow (recorded in our
    /// Record-Route as `;cs=N;ft=<caller's From tag>`, [`cseq_params`]).
    pub cseq_offset: u32,
    /// A trunk's answer to a challenge: `Authorization` or `Proxy-Authorization` and its value.
    pub credentials: Option<(&'static str, String)>,
}

/// The Record-Route parameters of a dialog whose caller-side CSeq numbers are `offset` below
/// the provider's: `;cs=N;ft=TAG` (the caller's From tag, Kamailio's `append_fromtag`, so
/// the direction of a later request is known). Characters of the tag that a URI parameter
/// cannot carry are %-escaped (RFC 3261 §25.1 `paramchar`).
pub fn cseq_params(offset: u32, from_tag: &str) -> String {
    let mut s = format!(";cs={offset};ft=");
    s.push_str(&escape_param(from_tag));
    s
}

/// The caller's CSeq number of a response to a request a trunk re-sent with CSeq + N (a
/// stray 2xx retransmission, after the transaction): our Record-Route in it, signed for its
/// dialog, says N (`;cs=`) and whose request it was (`;ft=`, the caller's From tag). `None`:
/// the CSeq stays as it is.
pub fn callers_cseq(resp: &Message, key: &RouteKey) -> Option<u32> {
    let call_id = resp.call_id().ok()?;
    let from_tag = resp.from().ok()?.tag()?;
    let seq = resp.cseq().ok()?.seq;
    let rr = resp.route_set(HeaderName::RecordRoute).ok()?;
    rr.iter()
        .filter(|r| key.verify_route(call_id, &[from_tag], r.uri))
        .filter_map(|r| crate::sip::SipUri::parse(r.uri).ok())
        .find_map(|u| {
            let n: u32 = u.param("cs")?.parse().ok()?;
            (u.param("ft")? == escape_param(from_tag)).then(|| seq.saturating_sub(n))
        })
}

/// `text` with every byte outside `unreserved / param-unreserved` %-escaped.
pub fn escape_param(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()[]/:&+$".contains(&b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// What happens to the Route set of a forwarded request (RFC 3261 §16.4, §16.6 step 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteEdit {
    /// Forwarded as received.
    #[default]
    Keep,
    /// The top Route is ours: removed.
    PopFirst,
    /// A strict router put our URI in the Request-URI: the last Route is the remote target
    /// and is removed.
    PopLast,
}

/// The RFC 3261 §16.6 step 8 branch:
/// `z9hG4bK-se-<loop cookie>-<transaction hash>-<MAC>`.
///
/// The transaction hash covers the received branch, its sent-by and the branch index, so the
/// same received request always maps to the same outgoing branch. The loop cookie covers what
/// identifies the request as received (Request-URI, From tag, Call-ID, CSeq number): when a
/// request comes back carrying one of our Vias with the same cookie, it has looped; a spiral
/// (the Request-URI changed on the way) has a different cookie (RFC 3261 §16.3 step 4).
/// The MAC binds the branch to `upstream`, where the responses go
/// ([`RouteKey::verify_branch`]): a response that outlived its transaction is forwarded only
/// there.
pub fn branch_id(
    msg: &Message,
    incoming_branch: &str,
    sent_by: &str,
    index: usize,
    key: &RouteKey,
    upstream: SocketAddr,
) -> String {
    let mut h = std::hash::DefaultHasher::new();
    incoming_branch.hash(&mut h);
    sent_by.hash(&mut h);
    index.hash(&mut h);
    // One string, sized for the whole branch: `<prefix><cookie>-<hash>-<mac>`.
    let mut branch = String::with_capacity(BRANCH_PREFIX.len() + 8 + 1 + 16 + 1 + 12);
    let _ = write!(
        branch,
        "{BRANCH_PREFIX}{:08x}-{:016x}",
        loop_cookie(msg),
        h.finish()
    );
    let mac = key.branch_mac(&branch, upstream);
    branch.push('-');
    branch.push_str(mac.as_str());
    branch
}

/// Prefix of every branch sipedge generates.
pub const BRANCH_PREFIX: &str = "z9hG4bK-se-";

fn loop_cookie(msg: &Message) -> u32 {
    let mut h = std::hash::DefaultHasher::new();
    msg.request_uri().hash(&mut h);
    msg.from().ok().and_then(|f| f.tag()).hash(&mut h);
    msg.call_id().ok().hash(&mut h);
    msg.cseq().ok().map(|c| c.seq).hash(&mut h);
    (h.finish() & 0xffff_ffff) as u32
}

/// True when `msg` carries a Via of ours (`ours` = our sent-by `host:port`) whose loop cookie
/// matches the request as received now: it has been here before unchanged, a loop.
pub fn is_loop(msg: &Message, ours: &[String]) -> bool {
    let mut seen = 0;
    let mut cookie = None;
    let mut looped = false;
    let all_read = msg.for_each_via(|v| {
        seen += 1;
        if looped || seen == 1 {
            return;
        }
        let port = v.port.unwrap_or(5060);
        let mine = ours.iter().any(|o| {
            o.rsplit_once(':')
                .is_some_and(|(host, p)| host == v.host && p.parse() == Ok(port))
        });
        if mine {
            // Computed only for a request that carries a Via of ours (most do not).
            let cookie = cookie.get_or_insert_with(|| format!("{:08x}", loop_cookie(msg)));
            looped = v
                .branch()
                .and_then(|b| b.strip_prefix(BRANCH_PREFIX))
                .is_some_and(|rest| rest.starts_with(cookie.as_str()));
        }
    });
    all_read.is_ok() && looped
}

/// A Record-Route or Via host:port for our side.
/// Our Via sent-by for a side: `advertise:port`, IPv6 in brackets.
pub fn hostport(l: Local) -> String {
    HostPort(l).to_string()
}

/// [`hostport`] as text to write into another string (no string of its own).
pub struct HostPort(pub Local);

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.advertise {
            std::net::IpAddr::V6(v6) => write!(f, "[{v6}]:{}", self.0.port),
            std::net::IpAddr::V4(v4) => Addr(SocketAddr::new(v4.into(), self.0.port)).fmt(f),
        }
    }
}

/// Our Record-Route URI for one side, signed for the dialog of `call_id` created by the
/// caller's `from_tag` (`;m=`, [`RouteKey::route_mac`]).
pub fn record_route_uri(
    local: Local,
    proto: Proto,
    opts: &Options,
    key: &RouteKey,
    (call_id, from_tag): (&str, &str),
) -> String {
    let transport = match proto {
        Proto::Udp => "",
        Proto::Tcp => ";transport=tcp",
        Proto::Tls => ";transport=tls",
    };
    let nat = if opts.nat { ";nat=yes" } else { "" };
    // One string: `<`, the URI, then its MAC over the URI text (everything after the `<`).
    let mut rr = String::with_capacity(128);
    let _ = write!(rr, "<sip:{}{transport};lr{nat}", HostPort(local));
    if let Some(f) = opts.caller_flow {
        rr.push_str(";fc=");
        f.write_token(&mut rr);
    }
    if let Some(f) = opts.callee_flow {
        rr.push_str(";fe=");
        f.write_token(&mut rr);
    }
    if opts.cseq_offset != 0 {
        rr.push_str(&cseq_params(opts.cseq_offset, from_tag));
    }
    let mac = key.route_mac(call_id, from_tag, &rr[1..]);
    rr.push_str(ROUTE_MAC_PARAM);
    rr.push_str(mac.as_str());
    rr.push('>');
    rr
}

/// The inter-instance Route to the `owner` of a binding (its SIP address), naming the
/// phone's NAT binding (`;ob=`), signed for the request of `call_id` with `from_tag`
/// ([`RouteKey::owner_route_mac`]).
pub fn owner_route_uri(
    owner: SocketAddr,
    binding: Flow,
    key: &RouteKey,
    (call_id, from_tag): (&str, &str),
) -> String {
    let uri = format!("sip:{owner};lr;{OWNER_PARAM}={}", binding.token());
    let mac = key.owner_route_mac(call_id, from_tag, &uri);
    format!("<{uri}{ROUTE_MAC_PARAM}{mac}>")
}

/// The parameter of an inter-instance Route that names the phone's NAT binding.
pub const OWNER_PARAM: &str = "ob";

/// Builds the forwarded request in one rewrite of the received bytes. `max_forwards` is the
/// received value (already checked to be above 0 by sanity), `inbound` our side where the
/// request arrived, `outbound` the side it leaves on, `branch` from [`branch_id`], `key`
/// signs our Record-Route, `body` replaces the body (the relay's SDP).
#[allow(clippy::too_many_arguments)]
pub fn request(
    msg: &Message,
    target: &Target,
    inbound: (Local, Proto),
    outbound: Local,
    branch: &str,
    opts: Options,
    key: &RouteKey,
    body: Option<Vec<u8>>,
) -> Vec<u8> {
    let mut rw = Rewrite::new(msg);
    // A Route that does not parse was refused by the routing already; nothing to pop then.
    let _ = match opts.route {
        RouteEdit::Keep => Ok(()),
        RouteEdit::PopFirst => rw.pop_route(),
        RouteEdit::PopLast => rw.pop_last_route(),
    };
    if let Some(body) = body {
        rw.replace_body(body);
    }
    if let (Some(new), Some(span)) = (&target.ruri, msg.request_uri_span()) {
        rw.replace_span(span, new);
    }
    // RFC 3261 §16.6 step 3, capped like Kamailio's maxfwd module.
    let mf = match msg.max_forwards().ok().flatten() {
        Some(n) => n.saturating_sub(1).min(opts.max_forwards_cap),
        None => opts.max_forwards_cap,
    };
    rw.set_max_forwards(mf);
    if opts.cseq_offset != 0
        && let Ok(cseq) = msg.cseq()
    {
        rw.set_cseq(cseq.seq.saturating_add(opts.cseq_offset));
    }
    if opts.record_route {
        // RFC 3261 §16.6 step 4; RFC 5658 double Record-Route when the transport changes.
        // The top value faces the next hop, the second the previous hop.
        // invariant: sanity refused requests without a Call-ID; a From without tag signs
        // with the empty tag (RFC 2543 peers).
        let dialog = (
            msg.call_id().unwrap_or_default(),
            msg.from().ok().and_then(|f| f.tag()).unwrap_or_default(),
        );
        let out_rr = record_route_uri(outbound, target.proto, &opts, key, dialog);
        if inbound.1 != target.proto || inbound.0 != outbound {
            let in_rr = record_route_uri(inbound.0, inbound.1, &opts, key, dialog);
            rw.push_record_route(&format!("{out_rr}, {in_rr}"));
        } else {
            rw.push_record_route(&out_rr);
        }
    }
    if let Some((owner, binding)) = opts.owner {
        let dialog = (
            msg.call_id().unwrap_or_default(),
            msg.from().ok().and_then(|f| f.tag()).unwrap_or_default(),
        );
        rw.push_route(&owner_route_uri(owner, binding, key, dialog));
    }
    if opts.strip_proxy_auth {
        rw.remove_headers(HeaderName::ProxyAuthorization);
    }
    if opts.identity.strip || opts.identity.assert.is_some() {
        for name in IDENTITY_HEADERS {
            rw.remove_headers(name);
        }
    }
    if let Some(a) = &opts.identity.assert {
        rw.insert_header(None, a.name.as_str(), &a.value);
    }
    if let Some((name, value)) = &opts.credentials {
        rw.insert_header(None, name, value);
    }
    if let (Some(src), Ok(via)) = (opts.source, msg.top_via()) {
        if opts.force_rport {
            rw.force_via_rport(&via, src);
        } else {
            rw.set_via_received(&via, src);
        }
    }
    let transport = target.proto.as_str();
    rw.push_via(&format!(
        "SIP/2.0/{transport} {};branch={branch}",
        HostPort(outbound)
    ));
    rw.finish()
}

/// Dialog-creating methods get Record-Route (RFC 3261 §16.6 step 4; RFC 6665 for SUBSCRIBE,
/// RFC 3515 for REFER).
pub fn creates_dialog(method: &str) -> bool {
    matches!(method, "INVITE" | "SUBSCRIBE" | "REFER")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Framing;

    const INVITE: &str = "INVITE sip:1001@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKa1;rport=40000;received=203.0.113.9\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=1\r\n\
To: <sip:1001@example.com>\r\n\
Call-ID: f1\r\n\
CSeq: 1 INVITE\r\n\
Proxy-Authorization: Digest username=\"alice\"\r\n\
X-Keep: me\r\n\
Content-Length: 0\r\n\r\n";

    fn opts(record_route: bool, strip_proxy_auth: bool, nat: bool, cap: u8) -> Options {
        Options {
            record_route,
            strip_proxy_auth,
            nat,
            max_forwards_cap: cap,
            caller_flow: None,
            callee_flow: None,
            source: None,
            force_rport: false,
            route: RouteEdit::Keep,
            identity: IdentityEdit::default(),
            cseq_offset: 0,
            credentials: None,
            owner: None,
        }
    }

    fn key() -> RouteKey {
        RouteKey::from_bytes([3; 32])
    }

    fn up() -> SocketAddr {
        "203.0.113.9:40000".parse().unwrap()
    }

    /// A Record-Route value of ours: the URI without its MAC, checking the MAC verifies.
    fn unsigned(uri: &str) -> &str {
        assert!(key().verify_route("f1", &["1"], uri), "MAC of {uri}");
        &uri[..uri.rfind(ROUTE_MAC_PARAM).unwrap()]
    }

    fn local(port: u16) -> Local {
        Local {
            advertise: "198.51.100.1".parse().unwrap(),
            port,
        }
    }

    #[test]
    fn forwarded_invite() {
        let m = Message::parse(INVITE.as_bytes(), Framing::Datagram).unwrap();
        let target = Target {
            ruri: Some("sip:1001@10.9.9.9:5070".into()),
            dest: "10.9.9.9:5070".parse().unwrap(),
            proto: Proto::Udp,
        };
        let k = key();
        let branch = branch_id(&m, "z9hG4bKa1", "10.0.0.2:5060", 0, &k, up());
        assert_eq!(
            branch,
            branch_id(&m, "z9hG4bKa1", "10.0.0.2:5060", 0, &k, up()),
            "deterministic"
        );
        assert_ne!(
            branch,
            branch_id(&m, "z9hG4bKa1", "10.0.0.2:5060", 1, &k, up())
        );
        assert!(k.verify_branch(&branch, up()));
        assert!(!k.verify_branch(&branch, "198.51.100.7:5060".parse().unwrap()));
        let out = request(
            &m,
            &target,
            (local(5060), Proto::Udp),
            local(5060),
            &branch,
            opts(true, true, true, 10),
            &key(),
            None,
        );
        let f = Message::parse(&out, Framing::Datagram).unwrap();
        assert_eq!(f.request_uri(), Some("sip:1001@10.9.9.9:5070"));
        assert_eq!(f.max_forwards().unwrap(), Some(10), "capped");
        let vias = f.vias().unwrap();
        assert_eq!(vias.len(), 2);
        assert_eq!(vias[0].host, "198.51.100.1");
        assert_eq!(vias[0].branch(), Some(branch.as_str()));
        let rr = f.route_set(HeaderName::RecordRoute).unwrap();
        assert_eq!(rr.len(), 1);
        assert_eq!(unsigned(rr[0].uri), "sip:198.51.100.1:5060;lr;nat=yes");
        assert!(f.header(HeaderName::ProxyAuthorization).is_none());
        assert!(
            String::from_utf8(out.clone())
                .unwrap()
                .contains("X-Keep: me\r\n")
        );

        // The forwarded copy coming back unchanged (but for Vias) is a loop; with another
        // Request-URI it is a spiral.
        let ours = vec!["198.51.100.1:5060".to_owned()];
        let same_ruri = Target {
            ruri: None,
            ..target
        };
        let out = request(
            &m,
            &same_ruri,
            (local(5060), Proto::Udp),
            local(5060),
            &branch,
            opts(false, false, false, 70),
            &key(),
            None,
        );
        let back = String::from_utf8(out).unwrap().replacen(
            "Via: ",
            "Via: SIP/2.0/UDP 10.9.9.9:5070;branch=z9hG4bKpbx\r\nVia: ",
            1,
        );
        let back_msg = Message::parse(back.as_bytes(), Framing::Datagram).unwrap();
        assert!(is_loop(&back_msg, &ours));
        let spiral = back.replacen("sip:1001@example.com SIP", "sip:2002@example.com SIP", 1);
        let spiral_msg = Message::parse(spiral.as_bytes(), Framing::Datagram).unwrap();
        assert!(!is_loop(&spiral_msg, &ours));
        assert!(!is_loop(&m, &ours));
    }

    #[test]
    fn flow_tokens() {
        for f in [
            Flow {
                proto: Proto::Udp,
                addr: "203.0.113.9:40000".parse().unwrap(),
            },
            Flow {
                proto: Proto::Tcp,
                addr: "[2001:db8::5]:5060".parse().unwrap(),
            },
        ] {
            assert_eq!(Flow::parse(&f.token()), Some(f));
            // The token is a valid URI parameter value.
            let uri = format!("sip:198.51.100.1;lr;fc={}", f.token());
            let parsed = crate::sip::SipUri::parse(&uri).unwrap();
            assert_eq!(parsed.param("fc").and_then(Flow::parse), Some(f));
        }
        assert_eq!(Flow::parse("x~1.2.3.4~5"), None);
        assert_eq!(Flow::parse("u~1.2.3.4"), None);
        assert_eq!(Flow::parse("u~1.2.3.4~5~6"), None);
    }

    #[test]
    fn transport_change_double_record_route() {
        let m = Message::parse(INVITE.as_bytes(), Framing::Datagram).unwrap();
        let target = Target {
            ruri: None,
            dest: "10.9.9.9:5060".parse().unwrap(),
            proto: Proto::Tcp,
        };
        let out = request(
            &m,
            &target,
            (local(5060), Proto::Udp),
            local(5060),
            "z9hG4bKx",
            opts(true, false, false, 70),
            &key(),
            None,
        );
        let f = Message::parse(&out, Framing::Datagram).unwrap();
        let rr = f.route_set(HeaderName::RecordRoute).unwrap();
        assert_eq!(
            unsigned(rr[0].uri),
            "sip:198.51.100.1:5060;transport=tcp;lr"
        );
        assert_eq!(unsigned(rr[1].uri), "sip:198.51.100.1:5060;lr");
        assert_eq!(f.max_forwards().unwrap(), Some(69));
        assert!(f.top_via().unwrap().is_reliable());
        assert!(f.header(HeaderName::ProxyAuthorization).is_some());
    }

    /// The INVITE with a forged identity in every form a phone could write it.
    const FORGED: &str = "INVITE sip:15551234567@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 203.0.113.9:5060;branch=z9hG4bKf1\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=1\r\n\
To: <sip:15551234567@example.com>\r\n\
P-Asserted-Identity: <sip:+18005550100@example.com>\r\n\
Call-ID: f2\r\n\
p-preferred-identity: <sip:boss@example.com>\r\n\
Remote-Party-ID: <sip:911@example.com>;party=calling;screen=yes\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n";

    fn forward_with(identity: IdentityEdit) -> Message {
        let m = Message::parse(FORGED.as_bytes(), Framing::Datagram).unwrap();
        let target = Target {
            ruri: None,
            dest: "192.0.2.80:5060".parse().unwrap(),
            proto: Proto::Udp,
        };
        let o = Options {
            identity,
            ..opts(false, false, false, 70)
        };
        let out = request(
            &m,
            &target,
            (local(5060), Proto::Udp),
            local(5060),
            "z9hG4bKx",
            o,
            &key(),
            None,
        );
        Message::parse(&out, Framing::Datagram).unwrap()
    }

    fn values(m: &Message, name: HeaderName) -> Vec<&str> {
        m.headers_named(name)
            .map(|h| m.str_at(h.value.clone()).unwrap())
            .collect()
    }

    #[test]
    fn identity_headers_of_untrusted_senders_are_removed_ours_added() {
        // Trusted sender, nothing asserted: forwarded as received.
        let f = forward_with(IdentityEdit::default());
        assert_eq!(
            values(&f, HeaderName::PAssertedIdentity),
            ["<sip:+18005550100@example.com>"]
        );
        assert_eq!(values(&f, HeaderName::PPreferredIdentity).len(), 1);
        assert_eq!(values(&f, HeaderName::RemotePartyId).len(), 1);

        // Untrusted sender (RFC 3325 §5): all three go, the rest stays.
        let f = forward_with(IdentityEdit {
            strip: true,
            assert: None,
        });
        for name in IDENTITY_HEADERS {
            assert!(values(&f, name).is_empty(), "{name:?}");
        }
        assert_eq!(f.call_id().unwrap(), "f2");
        assert_eq!(f.cseq().unwrap().seq, 1);

        // Our assertion replaces whatever the request carried.
        let pai = Asserted::new(Identity::Pai, "+15550001111", "example.com");
        let f = forward_with(IdentityEdit {
            strip: true,
            assert: pai,
        });
        assert_eq!(
            values(&f, HeaderName::PAssertedIdentity),
            ["<sip:+15550001111@example.com>"]
        );
        assert!(values(&f, HeaderName::PPreferredIdentity).is_empty());
        assert!(values(&f, HeaderName::RemotePartyId).is_empty());

        // RPID with the seed's rpid_suffix; even from a trusted sender, ours is the only one.
        let rpid = Asserted::new(Identity::Rpid, "alice", "example.com");
        let f = forward_with(IdentityEdit {
            strip: false,
            assert: rpid,
        });
        assert_eq!(
            values(&f, HeaderName::RemotePartyId),
            ["<sip:alice@example.com>;party=calling;id-type=subscriber;screen=yes"]
        );
        assert!(values(&f, HeaderName::PAssertedIdentity).is_empty());
        assert!(Asserted::new(Identity::None, "alice", "example.com").is_none());
    }

    /// A stray 2xx of a re-sent INVITE goes upstream with the caller's CSeq: only when our
    /// signed Record-Route in it records the offset for the caller's tag.
    #[test]
    fn stray_2xx_of_a_re_sent_invite_gets_the_callers_cseq() {
        let key = key();
        let resp = |rr: &str, tag: &str| {
            let text = format!(
                "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-se-1\r\n\
                 Record-Route: <{rr}>\r\nFrom: <sip:a@x>;tag={tag}\r\nTo: <sip:b@x>;tag=p\r\n\
                 Call-ID: f1\r\nCSeq: 3 INVITE\r\nContent-Length: 0\r\n\r\n"
            );
            Message::parse(text.as_bytes(), Framing::Datagram).unwrap()
        };
        let uri = format!("sip:192.0.2.1:5060;lr{}", cseq_params(1, "c~1"));
        let signed = format!("{uri}{ROUTE_MAC_PARAM}{}", key.route_mac("f1", "c~1", &uri));
        assert_eq!(callers_cseq(&resp(&signed, "c~1"), &key), Some(2));
        // Another dialog's tag, or a Record-Route we did not sign: unchanged.
        assert_eq!(callers_cseq(&resp(&signed, "other"), &key), None);
        assert_eq!(callers_cseq(&resp(&uri, "c~1"), &key), None);
        assert_eq!(escape_param("a b;c"), "a%20b%3Bc");
    }
}
