//! The request and reply pipeline (DESIGN §4). Sans-IO: [`Core::handle`] takes the bytes of
//! one received message and its [`Source`] and returns what to send.
//!
//! What is decided here today: sanity (step 1), the requests the proxy answers itself (step 6:
//! OPTIONS and NOTIFY addressed to us → 200), CANCEL without a transaction → 481, and the
//! status the proxy gives where forwarding, the registrar and the location service will take
//! over (REGISTER → 501, users of our domains → 404, foreign domains per `relay_foreign`).

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::debug;

use super::forward::{Flow, IdentityEdit, creates_dialog};
use super::sanity::{self, Verdict};
use crate::auth::mac::RouteKey;
use crate::clock::Clock;
use crate::config::{Config, Identity, MediaMode, RelayForeign, Trunk};
use crate::registrar::location::{Binding, LocationService, Owner};
use crate::registrar::service::Job;
use crate::security::Security;
use crate::sip::{Framing, HeaderName, Message, SipUri, reply};
use crate::transport::{Proto, Source, Transmit};

/// Methods sipedge knows (RFC 3261 and the extensions a proxy meets); others get 501 when
/// addressed to us (RFC 3261 §8.2.1).
const KNOWN_METHODS: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "PRACK",
    "UPDATE",
    "INFO",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "MESSAGE",
    "PUBLISH",
];

/// The `Allow` header value of our own responses.
const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, REGISTER, PRACK, UPDATE, INFO, SUBSCRIBE, NOTIFY, REFER, MESSAGE, PUBLISH";

/// What the I/O side does with a received message.
#[derive(Debug)]
// Messages by value: a `Dispatch` is made once per received message and taken apart at once
// by the driver, so a box would only be an allocation and a free per message (13 per call;
// the transaction boxes the request it keeps anyway).
#[allow(clippy::large_enum_variant)]
pub enum Dispatch {
    /// Send this (a local reply).
    Send(Transmit),
    /// Hand this REGISTER for one of our domains to the registrar.
    Register(Box<Job>),
    /// A well-formed request: transaction matching, then [`Core::route`].
    Request(Message, Source),
    /// A well-formed response: to its client transaction.
    Response(Message, Source),
    /// Nothing to do.
    Nothing,
}

impl From<Option<Transmit>> for Dispatch {
    fn from(o: Option<Transmit>) -> Self {
        o.map_or(Self::Nothing, Self::Send)
    }
}

/// The routing decision for a request.
#[derive(Debug)]
pub enum Routed {
    /// Answer locally.
    Reply(Transmit),
    /// Forward along this plan.
    Forward(Box<Plan>),
    /// Nothing to do (an ACK for us).
    Absorb,
    /// The location service has no binding for this initial INVITE, and the call counts for
    /// accounting ([`crate::acc::counts_not_found`]): answered with this 404 through a server
    /// transaction (retransmissions absorbed), and given its CDR row.
    NotFound(Transmit),
}

/// Where a request goes and how.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// One per branch; several = parallel forking.
    pub targets: Vec<Hop>,
    pub record_route: bool,
    /// Our Route header is on top and must be removed.
    pub pop_route: bool,
    /// A strict router sent us our Record-Route URI as Request-URI: the last Route became the
    /// Request-URI and must be removed (RFC 3261 §16.4).
    pub strict_route: bool,
    pub auth: Option<AuthNeed>,
    /// Forward without a transaction (ACK for 2xx).
    pub stateless: bool,
    /// The dialog's caller is behind NAT (`;nat=yes` in our Route).
    pub nat: bool,
    /// The caller's NAT binding, recorded in our Record-Route (`;fc=`).
    pub caller_flow: Option<Flow>,
    /// nathelper's tests fired for the sender of this request (computed once here; the
    /// forwarding side uses it for force_rport).
    pub sender_nated: bool,
    /// An initial INVITE's media policy (`[[route]].media`, `media.mode` for registered
    /// users); `None` for every other request (in-dialog ones follow their dialog).
    pub media: Option<MediaMode>,
    /// The accounting name of the route an initial INVITE took (the `cdr` table's `route`):
    /// the `[[route]]` name, "location" or "foreign"; `None` for every other request.
    pub route: Option<String>,
    /// The identity an initial INVITE's `[[route]]` asserts for its authenticated caller
    /// (`None` for every other request).
    pub assert_identity: Identity,
    /// The identity headers of the forwarded copy: set by the proxy once it knows whether the
    /// sender is trusted and who authenticated ([`IdentityEdit`]).
    pub identity: IdentityEdit,
    /// `[[route]].failover_timeout_ms`: a branch whose next hop sends nothing at all (not
    /// even a 100) for this long moves to its next alternate, if one remains. `None`: only a
    /// 503, a timeout or a transport error moves it.
    pub failover_timeout: Option<std::time::Duration>,
    /// Added to the CSeq of the forwarded copy: an in-dialog request of the caller in a
    /// dialog whose INVITE a trunk re-sent with credentials (`;cs=` in our Route).
    pub cseq_offset: u32,
}

/// One branch before name resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// New Request-URI (a registered contact), or keep the received one.
    pub ruri: Option<String>,
    pub dest: Dest,
    pub proto: Proto,
    /// The callee's NAT binding when it differs from its Contact, recorded in our
    /// Record-Route (`;fe=`).
    pub flow: Option<Flow>,
    /// The hops tried in turn when this one fails (a `[[route]]`'s later next hops): a 503, a
    /// timeout or an unreachable hop moves the branch on (README "Next hops and failover").
    pub failover: Vec<Self>,
    /// `[[route]].trunk`: a 401/407 from this hop is answered with these credentials.
    pub trunk: Option<Arc<Trunk>>,
    /// `dest` is the instance owning the callee's binding, which sends the request out to
    /// this NAT binding of the phone (README "Several instances"): a signed Route tells it.
    pub owner: Option<Flow>,
}

impl Hop {
    /// The callee is behind NAT: its NAT binding (recorded by us, or by the instance owning
    /// it) is not the address of its Contact.
    pub fn callee_nated(&self) -> bool {
        self.flow.is_some()
            || self.owner.is_some_and(|binding| {
                let contact = self.ruri.as_deref().and_then(|r| SipUri::parse(r).ok());
                contact.and_then(|u| u.socket_addr()) != Some(binding.addr)
            })
    }
}

/// A next hop: an address (a registered flow) or a name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Addr(SocketAddr),
    /// A name with a port: A/AAAA only (RFC 3263 §4.2).
    Host(String, u16),
    /// A name without a port: NAPTR, SRV, then A/AAAA on 5060 (RFC 3263 §4); `transport` is
    /// the URI's `;transport=` (`None`: NAPTR/SRV choose, else UDP).
    Name {
        host: String,
        transport: Option<Proto>,
    },
}

impl Dest {
    /// The destination of `host[:port]` with an explicit `transport` or none.
    pub fn of(host: &str, port: Option<u16>, transport: Option<Proto>) -> Self {
        match (host.parse::<std::net::IpAddr>(), port) {
            (Ok(ip), p) => Self::Addr(SocketAddr::new(
                ip,
                p.unwrap_or(transport.map_or(5060, Proto::default_port)),
            )),
            (Err(_), Some(p)) => Self::Host(host.to_owned(), p),
            (Err(_), None) => Self::Name {
                host: host.to_owned(),
                transport,
            },
        }
    }
}

/// Why proxy authentication is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthNeed {
    /// A `[[route]]` with `auth = true`: proxy auth, and the From user must be the
    /// authenticated user (`check_from`).
    Route,
    /// `relay_foreign = "authenticated"`.
    Foreign,
}

/// The next hop of a SIP URI (RFC 3263 §4: `maddr`, else host; port; transport parameter; a
/// name without a port is resolved through NAPTR/SRV by the shell). A `sips:` URI goes over
/// TLS whatever transport it names (RFC 3261 §26.2.2, RFC 5630 §3.1.3): never in clear; so
/// does `transport=tls`. `None` for what is not a SIP URI (answered 416).
pub fn hop_for_uri(text: &str) -> Option<Hop> {
    let uri = SipUri::parse(text).ok()?;
    let transport = match uri.transport() {
        _ if uri.secure => Some(Proto::Tls),
        Some(t) if t.eq_ignore_ascii_case("tcp") => Some(Proto::Tcp),
        Some(t) if t.eq_ignore_ascii_case("tls") => Some(Proto::Tls),
        Some(t) if t.eq_ignore_ascii_case("udp") => Some(Proto::Udp),
        _ => None,
    };
    let host = uri.param("maddr").unwrap_or(uri.host);
    Some(Hop {
        ruri: None,
        dest: Dest::of(host, uri.port, transport),
        proto: transport.unwrap_or(Proto::Udp),
        flow: None,
        failover: Vec::new(),
        trunk: None,
        owner: None,
    })
}

/// Where a registered contact is reached (Kamailio `fix_nated_register` + `lookup`).
///
/// - A REGISTER that came through NAT ([`Binding::nated`]): at the address it came from,
///   with the Contact as Request-URI. (Over TCP a phone's source port is not the Via's, so a
///   phone's TCP registration counts as NATed and is reached over its connection.) When that address is not the Contact's, the binding
///   goes into our Record-Route (`;fe=`) for the dialog's later requests.
/// - Otherwise (a public phone, or a contact registered by a third party): at the Contact
///   URI, resolved like any URI next hop ([`hop_for_uri`]); a Contact we cannot reach that
///   way falls back to the address the REGISTER came from.
fn binding_hop(b: &Binding) -> Hop {
    let at_flow = |b: &Binding| {
        let contact_addr = SipUri::parse(&b.contact).ok().and_then(|u| u.socket_addr());
        let flow = (contact_addr != Some(b.received)).then_some(Flow {
            proto: b.transport,
            addr: b.received,
        });
        Hop {
            ruri: Some(b.contact.clone()),
            dest: Dest::Addr(b.received),
            proto: b.transport,
            flow,
            failover: Vec::new(),
            trunk: None,
            owner: None,
        }
    };
    if b.nated {
        return at_flow(b);
    }
    match hop_for_uri(&b.contact) {
        Some(hop) => Hop {
            ruri: Some(b.contact.clone()),
            ..hop
        },
        None => at_flow(b),
    }
}

/// The signalling core: the sockets we own (for the "myself" check) and the state shared
/// with the other services. The configuration comes with each call: the driver loads one
/// snapshot of the live configuration per message, so a reload never changes the rules in
/// the middle of a request.
pub struct Core {
    /// Addresses of the bound sockets (the real ports when the config asked for port 0).
    local: Vec<(Proto, SocketAddr)>,
    location: Option<Arc<dyn LocationService>>,
    clock: Arc<dyn Clock>,
    /// The per-source rate limit and bans, checked before anything else.
    security: Arc<Security>,
    /// Our Via sent-by values (`advertise:port`), for loop detection.
    sent_by: Vec<String>,
    /// Verifies the MAC of our Record-Route when it comes back as a Route.
    key: RouteKey,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Core {
    pub fn new(
        cfg: &Config,
        local: Vec<(Proto, SocketAddr)>,
        location: Option<Arc<dyn LocationService>>,
        clock: Arc<dyn Clock>,
        key: RouteKey,
        security: Arc<Security>,
    ) -> Self {
        let sent_by = local
            .iter()
            .map(|(_, a)| format!("{}:{}", cfg.server.advertise, a.port()))
            .collect();
        Self {
            local,
            location,
            clock,
            security,
            sent_by,
            key,
        }
    }

    /// Our sockets.
    pub fn local(&self) -> &[(Proto, SocketAddr)] {
        &self.local
    }

    /// The flood and brute-force state (for the TCP accept loop: [`Security::is_banned`]).
    pub fn security(&self) -> &Arc<Security> {
        &self.security
    }

    /// Handles one received message; returns what the I/O side must do. The first step is
    /// the per-source rate limit and ban check ([`Security::allow`]).
    pub fn handle(&self, cfg: &Config, bytes: &[u8], source: Source) -> Dispatch {
        let framing = match source.proto {
            Proto::Udp => Framing::Datagram,
            Proto::Tcp | Proto::Tls => Framing::Stream,
        };
        // Floods and banned sources: dropped unread and unanswered (Kamailio pike).
        if !self.security.allow(source.remote, self.clock.now()) {
            return Dispatch::Nothing;
        }
        match sanity::check(bytes, framing, cfg.server.max_message_size) {
            Verdict::Drop(reason) => {
                debug!(peer.addr = %source.remote, ?reason, "dropping message");
                Dispatch::Nothing
            }
            Verdict::Response(msg) => Dispatch::Response(msg, source),
            Verdict::Reject {
                msg,
                status,
                reason,
            } => {
                debug!(peer.addr = %source.remote, sip.status = status, %reason, "rejecting request");
                Dispatch::Send(self.reply(&msg, source, status, &reason, &[]))
            }
            Verdict::Request(msg) => {
                let for_registrar = msg.method() == Some("REGISTER")
                    && msg
                        .request_uri()
                        .and_then(|u| SipUri::parse(u).ok())
                        .is_some_and(|u| self.is_myself(cfg, &u, source));
                if for_registrar {
                    return Dispatch::Register(Box::new(Job { msg, source }));
                }
                Dispatch::Request(msg, source)
            }
        }
    }

    /// The routing decision for a request that matched no transaction (DESIGN §4 steps 2-6,
    /// the seed's main route): loose routing, in-dialog forwarding, the `[[route]]` rules, the
    /// location service, `relay_foreign`, and the requests answered locally.
    pub fn route(&self, cfg: &Config, msg: &Message, source: Source) -> Routed {
        // invariant: sanity checked the method, Request-URI and Call-ID of this request.
        let method = msg.method().unwrap_or_default();
        let uri_text = msg.request_uri().unwrap_or_default();
        debug!(
            sip.method = method,
            sip.call_id = msg.call_id().unwrap_or_default(),
            peer.addr = %source.remote,
            "request"
        );
        let reply =
            |status, reason: &str| Routed::Reply(self.reply(msg, source, status, reason, &[]));
        let Ok(uri) = SipUri::parse(uri_text) else {
            return reply(400, "Malformed Request-URI");
        };
        let for_us = self.is_myself(cfg, &uri, source);
        let max_forwards = msg.max_forwards().ok().flatten();
        let in_dialog = msg.to().ok().and_then(|t| t.tag().map(|_| ())).is_some();

        // Loose routing (RFC 3261 §16.4): our own Route on top is removed.
        let Ok(mut routes) = msg.route_set(HeaderName::Route) else {
            return reply(400, "Malformed Route header");
        };
        // What a Route of ours may carry (flow tokens, `nat=yes`) is trusted only when its MAC
        // verifies for this dialog: the Call-ID and the caller's tag, which is the From tag
        // of the caller's requests and the To tag of the callee's.
        let call_id = msg.call_id().unwrap_or_default();
        let from_tag = msg.from().ok().and_then(|f| f.tag()).unwrap_or_default();
        let to_tag = msg.to().ok().and_then(|t| t.tag()).unwrap_or_default();
        let verified = |uri: &str| self.key.verify_route(call_id, &[from_tag, to_tag], uri);
        // Strict-route compatibility (RFC 3261 §16.4): an RFC 2543 strict router put the URI
        // we record-routed with (no user, `lr`) into the Request-URI; the remote target is
        // the last Route value.
        let mut uri_text = uri_text;
        let mut strict_route = false;
        if uri.user.is_none() && uri.param("lr").is_some() && for_us && verified(uri_text) {
            if let Some(last) = routes.pop() {
                uri_text = last.uri;
                strict_route = true;
            }
        }
        let Ok(uri) = SipUri::parse(uri_text) else {
            return reply(400, "Malformed Route header");
        };
        let for_us = if strict_route {
            self.is_myself(cfg, &uri, source)
        } else {
            for_us
        };
        let pop_route = routes
            .first()
            .and_then(|r| SipUri::parse(r.uri).ok())
            .is_some_and(|u| self.is_myself(cfg, &u, source));
        let route_verified = pop_route && routes.first().is_some_and(|r| verified(r.uri));
        if pop_route && in_dialog && !route_verified {
            // A Route naming us that we did not write for this dialog: following what comes
            // after it would make us a relay for whoever wrote it.
            if method == "ACK" {
                debug!(peer.addr = %source.remote, "ACK with a Route we did not sign: dropped");
                return Routed::Absorb;
            }
            crate::security_event!("invalid_route", source.remote, sip.method = method);
            return reply(403, "Forbidden: Invalid Route");
        }
        // A request another instance forwards to us, the owner of the callee's binding
        // (README "Several instances"): our Route on top carries the phone's NAT binding
        // (`;ob=`) under an inter-instance MAC. Sent there, out of our socket, and recorded
        // in our Record-Route like any NATed callee. One that does not verify is refused: the
        // hop must not let anyone reach the phones behind NAT.
        let owner_route = pop_route.then(|| routes.first()).flatten().filter(|r| {
            SipUri::parse(r.uri).is_ok_and(|u| u.param(super::forward::OWNER_PARAM).is_some())
        });
        if let Some(r) = owner_route {
            let binding = SipUri::parse(r.uri)
                .ok()
                .and_then(|u| u.param(super::forward::OWNER_PARAM).and_then(Flow::parse));
            let signed = self.key.verify_owner_route(call_id, from_tag, r.uri);
            return match binding {
                Some(binding)
                    if signed
                        && !in_dialog
                        && routes.len() == 1
                        && method != "ACK"
                        && method != "CANCEL" =>
                {
                    let contact_addr = SipUri::parse(uri_text).ok().and_then(|u| u.socket_addr());
                    debug!(peer.addr = %source.remote, binding = %binding.addr, "forwarded by the instance that found the binding");
                    Routed::Forward(Box::new(Plan {
                        targets: vec![Hop {
                            ruri: None,
                            dest: Dest::Addr(binding.addr),
                            proto: binding.proto,
                            flow: (contact_addr != Some(binding.addr)).then_some(binding),
                            failover: Vec::new(),
                            trunk: None,
                            owner: None,
                        }],
                        record_route: creates_dialog(method),
                        pop_route: true,
                        strict_route: false,
                        auth: None,
                        stateless: false,
                        nat: false,
                        caller_flow: None,
                        sender_nated: false,
                        media: None,
                        route: None,
                        ..Plan::default()
                    }))
                }
                Some(_) if signed && method == "ACK" => Routed::Absorb,
                // RFC 3261 §16.10: a CANCEL that matches no transaction.
                Some(_) if signed && method == "CANCEL" => {
                    reply(481, "Call/Transaction Does Not Exist")
                }
                _ => {
                    crate::security_event!("invalid_route", source.remote, sip.method = method);
                    reply(403, "Forbidden: Invalid Route")
                }
            };
        }
        let nat_marked = route_verified
            && routes
                .first()
                .and_then(|r| SipUri::parse(r.uri).ok())
                .is_some_and(|u| u.param("nat") == Some("yes"));
        let next_route = routes.get(usize::from(pop_route)).map(|r| r.uri.to_owned());
        let sender_nated = crate::nat::detect::detect(msg, source.remote).is_nated();
        let strict_ruri = uri_text.to_owned();
        // The NAT bindings we recorded for this dialog (`;fc=` caller, `;fe=` callee): a
        // request from one party goes to the other's binding, whatever its Contact says.
        let flow_target = route_verified
            .then(|| routes.first().and_then(|r| SipUri::parse(r.uri).ok()))
            .flatten()
            .and_then(|our| {
                let fc = our.param("fc").and_then(Flow::parse);
                let fe = our.param("fe").and_then(Flow::parse);
                // From neither binding: a peer that is not NATed (a PBX, a provider), or a
                // party whose NAT rebound. If only one binding is recorded and the
                // Request-URI (the Contact of the party addressed) is private, the request
                // is for the NATed party: its Contact cannot be reached, its binding can.
                let ruri_private = SipUri::parse(uri_text)
                    .ok()
                    .and_then(|u| u.ip())
                    .is_some_and(crate::nat::detect::is_private);
                match (fc, fe) {
                    (Some(c), e) if c.addr == source.remote => e,
                    (c, Some(e)) if e.addr == source.remote => c,
                    (Some(c), None) if ruri_private => Some(c),
                    (None, Some(e)) if ruri_private => Some(e),
                    _ => None,
                }
            });
        // A trunk re-sent the dialog's INVITE with CSeq + N (`;cs=N;ft=TAG` in our Route): the
        // caller's later requests (From tag TAG) go on N higher; the provider's are untouched.
        let cseq_offset = route_verified
            .then(|| routes.first().and_then(|r| SipUri::parse(r.uri).ok()))
            .flatten()
            .and_then(|our| {
                let n: u32 = our.param("cs")?.parse().ok()?;
                let caller = our.param("ft")? == super::forward::escape_param(from_tag);
                caller.then_some(n)
            })
            .unwrap_or(0);
        let forward_to = |uri_text: &str, plan_auth| -> Routed {
            match hop_for_uri(uri_text) {
                Some(mut hop) => Routed::Forward(Box::new(Plan {
                    targets: vec![{
                        if strict_route {
                            hop.ruri = Some(strict_ruri.clone());
                        }
                        if let Some(flow) = flow_target {
                            hop.dest = Dest::Addr(flow.addr);
                            hop.proto = flow.proto;
                        }
                        hop
                    }],
                    record_route: false,
                    pop_route,
                    strict_route,
                    auth: plan_auth,
                    stateless: method == "ACK",
                    nat: nat_marked,
                    caller_flow: None,
                    sender_nated,
                    media: None,
                    route: None,
                    assert_identity: Identity::None,
                    identity: IdentityEdit::default(),
                    failover_timeout: None,
                    cseq_offset,
                })),
                None => Routed::Reply(self.reply(msg, source, 416, "Unsupported URI Scheme", &[])),
            }
        };

        if method == "ACK" {
            // An ACK for a 2xx is end-to-end: forwarded statelessly along the route set of a
            // dialog we record-routed (a verified Route of ours). An ACK for a non-2xx of ours
            // was absorbed by its transaction before we got here; any other ACK is dropped,
            // never routed (it gets no answer, so it cannot be used to reach third parties).
            return match (&next_route, in_dialog && route_verified) {
                (Some(r), true) => forward_to(r, None),
                (None, true) if !for_us => forward_to(uri_text, None),
                _ => {
                    debug!(peer.addr = %source.remote, "ACK outside any dialog of ours: dropped");
                    Routed::Absorb
                }
            };
        }
        if method == "CANCEL" {
            // RFC 3261 §16.10: a CANCEL that matches no transaction gets 481.
            return reply(481, "Call/Transaction Does Not Exist");
        }
        if max_forwards == Some(0) && !(for_us && method == "OPTIONS") {
            return reply(483, "Too Many Hops");
        }
        if super::forward::is_loop(msg, &self.sent_by) {
            return reply(482, "Loop Detected");
        }

        if in_dialog {
            if !pop_route && !routes.is_empty() {
                // A route set that does not go through us: not ours to follow.
                return reply(403, "Preloaded Route Not Allowed");
            }
            // Follow the route set; with none left, the Request-URI (the remote target).
            return match (&next_route, for_us) {
                (Some(r), _) => forward_to(r, None),
                (None, false) if pop_route => forward_to(uri_text, None),
                (None, false) => match cfg.server.relay_foreign {
                    RelayForeign::Deny => reply(403, "Relaying Forbidden"),
                    RelayForeign::Open => forward_to(uri_text, None),
                    RelayForeign::Authenticated => forward_to(uri_text, Some(AuthNeed::Foreign)),
                },
                (None, true) => match (method, uri.user) {
                    ("OPTIONS" | "NOTIFY", None) => self.local_ok(msg, source, method),
                    _ => reply(404, "Not Here"),
                },
            };
        }
        if next_route.is_some() {
            // A preloaded route through us to somewhere else would make us an open relay.
            return reply(403, "Preloaded Route Not Allowed");
        }
        if !for_us {
            let record_route = creates_dialog(method);
            return match cfg.server.relay_foreign {
                RelayForeign::Deny => reply(403, "Relaying Forbidden"),
                RelayForeign::Open | RelayForeign::Authenticated => {
                    let auth = (cfg.server.relay_foreign == RelayForeign::Authenticated)
                        .then_some(AuthNeed::Foreign);
                    match forward_to(uri_text, auth) {
                        Routed::Forward(mut plan) => {
                            plan.record_route = record_route;
                            plan.route = (method == "INVITE").then(|| "foreign".to_owned());
                            Routed::Forward(plan)
                        }
                        other => other,
                    }
                }
            };
        }
        if !KNOWN_METHODS.contains(&method) {
            return Routed::Reply(self.reply(
                msg,
                source,
                501,
                "Not Implemented",
                &[("Allow", ALLOW)],
            ));
        }
        let Some(user) = uri.user else {
            return match method {
                "OPTIONS" | "NOTIFY" => self.local_ok(msg, source, method),
                _ => reply(404, "Not Found"),
            };
        };
        let record_route = creates_dialog(method);
        // A caller behind NAT is marked in our Record-Route (`;nat=yes`, the seed's
        // record_route_preset), so the dialog's later requests still know it.
        let caller_nated = sender_nated;
        let caller_flow = caller_nated.then_some(Flow {
            proto: source.proto,
            addr: source.remote,
        });
        if caller_nated {
            debug!(peer.addr = %source.remote, "caller is behind NAT");
        }
        // The [[route]] rules, first match wins (the seed's extension/PSTN routing).
        if let Some(rule) = cfg.routes.iter().find(|r| r.user.is_match(user)) {
            debug!(route = %rule.name, user, "route matched");
            // The next hops in order: the first is the branch, the others its failover.
            let mut hops = rule.next_hops.iter().map(|h| Hop {
                // The seed's rewritehostport: the next hop sees itself in the Request-URI (an
                // address without a port gets 5060 written, as before; a name without one
                // stays without, so the next hop may use SRV too).
                ruri: Some(uri.with_host(
                    &h.host,
                    h.port.or_else(|| {
                        h.ip()
                            .map(|_| h.transport.map_or(5060, Proto::default_port))
                    }),
                )),
                dest: Dest::of(&h.host, h.port, h.transport),
                proto: h.transport.unwrap_or(Proto::Udp),
                flow: None,
                failover: Vec::new(),
                // Each next hop of the route is the trunk's (its failover hops too).
                trunk: rule.trunk.clone(),
                owner: None,
            });
            // Config validation gives every route at least one next hop.
            let Some(mut first) = hops.next() else {
                return reply(500, "Server Internal Error");
            };
            first.failover = hops.collect();
            return Routed::Forward(Box::new(Plan {
                targets: vec![first],
                record_route,
                pop_route,
                strict_route: false,
                auth: rule.auth.then_some(AuthNeed::Route),
                stateless: false,
                nat: caller_nated,
                caller_flow,
                sender_nated,
                media: (method == "INVITE").then_some(rule.media),
                route: (method == "INVITE").then(|| rule.name.clone()),
                assert_identity: if method == "INVITE" && !in_dialog {
                    rule.identity
                } else {
                    Identity::None
                },
                identity: IdentityEdit::default(),
                failover_timeout: Some(rule.failover_timeout),
                cseq_offset: 0,
            }));
        }
        // The location service: every contact of the AOR, reached at the flow it registered
        // from — through the instance owning that flow when it is another one, and not at all
        // when that instance is dead (README "Several instances").
        let aor = format!("{user}@{}", uri.host.to_ascii_lowercase());
        let now = self.unix_now();
        let bindings: Vec<(Arc<Binding>, Owner)> = self
            .location
            .as_ref()
            .map(|l| {
                l.lookup(&aor, now)
                    .into_iter()
                    .map(|b| {
                        let owner = l.owner(&b, now);
                        (b, owner)
                    })
                    .filter(|(b, owner)| {
                        let gone = *owner == Owner::Gone;
                        if gone {
                            debug!(aor = %b.aor, instance = %b.instance, "binding of a dead instance: not used");
                        }
                        !gone
                    })
                    .collect()
            })
            .unwrap_or_default();
        if bindings.is_empty() {
            let out = self.reply(msg, source, 404, "User Not Found", &[]);
            // A call to one of our users who is not registered is a call outcome (README
            // "Accounting") when it comes from one of our users or a `[[route]]` next hop; a
            // scanner's probe is answered statelessly and leaves no row.
            if method == "INVITE" && crate::acc::counts_not_found(cfg, msg, source.remote) {
                return Routed::NotFound(out);
            }
            return Routed::Reply(out);
        }
        Routed::Forward(Box::new(Plan {
            targets: bindings
                .into_iter()
                .map(|(b, owner)| {
                    if let Owner::At(instance) = owner {
                        // The owner records the phone's flow in its own Record-Route; ours
                        // has none, so in-dialog requests go through the owner too.
                        let binding = Flow {
                            proto: b.transport,
                            addr: b.received,
                        };
                        return Hop {
                            ruri: Some(b.contact.clone()),
                            dest: Dest::Addr(instance),
                            proto: Proto::Udp,
                            flow: None,
                            failover: Vec::new(),
                            trunk: None,
                            owner: Some(binding),
                        };
                    }
                    binding_hop(&b)
                })
                .collect(),
            record_route,
            pop_route,
            strict_route: false,
            auth: None,
            stateless: false,
            nat: caller_nated,
            caller_flow,
            sender_nated,
            media: (method == "INVITE").then_some(cfg.media.mode),
            route: (method == "INVITE").then(|| "location".to_owned()),
            assert_identity: Identity::None,
            identity: IdentityEdit::default(),
            failover_timeout: None,
            cseq_offset: 0,
        }))
    }

    /// 200 to an OPTIONS or NOTIFY addressed to the proxy itself (keepalives).
    fn local_ok(&self, msg: &Message, source: Source, method: &str) -> Routed {
        let extra: &[(&str, &str)] = if method == "OPTIONS" {
            &[("Allow", ALLOW), ("Accept", "application/sdp")]
        } else {
            &[]
        };
        Routed::Reply(self.reply(msg, source, 200, "OK", extra))
    }

    fn unix_now(&self) -> u64 {
        self.clock.unix()
    }

    /// RFC 3261 §16.4 / Kamailio `myself`: the URI names one of our domains or one of our
    /// addresses, on one of our ports.
    fn is_myself(&self, cfg: &Config, uri: &SipUri<'_>, source: Source) -> bool {
        let port_ok = |port: Option<u16>| match port {
            None => {
                self.local
                    .iter()
                    .any(|(_, a)| a.port() == if uri.secure { 5061 } else { 5060 })
                    || self
                        .local
                        .iter()
                        .any(|(_, a)| a.port() == source.local.port())
            }
            Some(p) => self.local.iter().any(|(_, a)| a.port() == p),
        };
        if cfg.is_local_domain(uri.host) {
            return uri.port.is_none() || port_ok(uri.port);
        }
        let Some(ip) = uri.ip() else {
            return false;
        };
        // A wildcard socket (0.0.0.0) serves every local address; the ones we can know without
        // asking the kernel for each packet's destination are the advertised address, the
        // address a TCP connection was accepted on, and loopback.
        let ours = ip == cfg.server.advertise
            || ip == source.local.ip()
            || self
                .local
                .iter()
                .any(|(_, a)| a.ip() == ip || (a.ip().is_unspecified() && ip.is_loopback()));
        ours && port_ok(uri.port)
    }

    /// A local response, sent back the way RFC 3261 §18.2.2 says.
    pub fn reply(
        &self,
        msg: &Message,
        source: Source,
        status: u16,
        reason: &str,
        extra: &[(&str, &str)],
    ) -> Transmit {
        let bytes = reply::response(msg, source.remote, status, reason, extra);
        crate::nat::respond(msg, source, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::clock::SystemClock;
    use crate::registrar::location::{Binding, Location};

    /// A UDP binding of `aor` for `contact`, registered from `received` at `instance`.
    fn binding(aor: &str, contact: &str, received: &str, instance: &str, nated: bool) -> Binding {
        Binding {
            aor: aor.into(),
            contact: contact.into(),
            received: received.parse().unwrap(),
            nated,
            transport: Proto::Udp,
            local_socket: "127.0.0.1:5060".parse().unwrap(),
            instance: instance.into(),
            expires: u64::MAX,
            q: 1000,
            call_id: "c".into(),
            cseq: 1,
            user_agent: String::new(),
            path: String::new(),
            instance_urn: String::new(),
            updated: 0,
        }
    }

    fn core() -> (Core, Config) {
        let cfg = Config::from_toml(
            "[server]\nlisten=[\"udp:127.0.0.1:5060\"]\ndomains=[\"example.com\"]\nrelay_foreign=\"deny\"\n\
             [[route]]\nname=\"pbx\"\nuser='^[0-9]{3,4}$'\nnext_hop=\"pbx.example.net:5070\"\n\
             [[route]]\nname=\"provider\"\nuser='^1[0-9]{10}$'\nnext_hop=\"192.0.2.80\"\nauth=true\n\
             [[route]]\nname=\"trunk\"\nuser='^9[0-9]+$'\nfailover_timeout_ms=700\n\
             next_hop=[\"provider.example\", \"sip:[2001:db8::1]:5062;transport=tcp\", \"192.0.2.90\"]\n",
            || "127.0.0.1".parse().unwrap(),
        )
        .unwrap();
        let cfg_security = cfg.security.clone();
        let location = Arc::new(Location::new());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(location.set(
            "carol@example.com",
            vec![binding(
                "carol@example.com",
                "sip:carol@10.0.0.9:5062",
                "203.0.113.4:41000",
                "i",
                true,
            )],
        ));
        let core = Core::new(
            &cfg,
            vec![(Proto::Udp, "127.0.0.1:5060".parse().unwrap())],
            Some(location),
            Arc::new(SystemClock),
            key(),
            Arc::new(Security::new(cfg_security, tokio::time::Instant::now())),
        );
        (core, cfg)
    }

    fn key() -> RouteKey {
        RouteKey::from_bytes([5; 32])
    }

    /// A Route value as we would have record-routed it for the dialog of `decide`'s requests
    /// (Call-ID t1, caller's tag 1).
    fn signed(uri: &str) -> String {
        format!(
            "{uri}{}{}",
            crate::auth::mac::ROUTE_MAC_PARAM,
            key().route_mac("t1", "1", uri)
        )
    }

    fn src() -> Source {
        Source {
            proto: Proto::Udp,
            remote: "192.0.2.7:40000".parse().unwrap(),
            local: "127.0.0.1:5060".parse().unwrap(),
        }
    }

    /// The local status, or the plan.
    fn decide(method: &str, uri: &str, extra: &str) -> Result<Option<u16>, Box<Plan>> {
        let totag = if matches!(method, "BYE" | "ACK") {
            ";tag=callee"
        } else {
            ""
        };
        let text = format!(
            "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7:40000;branch=z9hG4bK9;rport\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <{uri}>{totag}\r\nCall-ID: t1\r\nCSeq: 1 {method}\r\n{extra}\r\n"
        );
        let (c, cfg) = core();
        let out = match c.handle(&cfg, text.as_bytes(), src()) {
            Dispatch::Send(out) => out,
            Dispatch::Register(_) => return Ok(Some(0)),
            Dispatch::Nothing | Dispatch::Response(..) => return Ok(None),
            Dispatch::Request(msg, source) => match c.route(&cfg, &msg, source) {
                Routed::Reply(out) | Routed::NotFound(out) => out,
                Routed::Forward(plan) => return Err(plan),
                Routed::Absorb => return Ok(None),
            },
        };
        assert_eq!(out.dest, src().remote, "rport: answer the source");
        Ok(Message::parse(&out.bytes, Framing::Datagram)
            .unwrap()
            .status())
    }

    fn status_of(method: &str, uri: &str, extra: &str) -> Option<u16> {
        decide(method, uri, extra).expect("a local reply")
    }

    #[test]
    fn local_decisions() {
        assert_eq!(status_of("OPTIONS", "sip:example.com", ""), Some(200));
        assert_eq!(status_of("OPTIONS", "sip:127.0.0.1:5060", ""), Some(200));
        assert_eq!(
            status_of("OPTIONS", "sip:127.0.0.1", "Max-Forwards: 0\r\n"),
            Some(200)
        );
        assert_eq!(
            status_of("NOTIFY", "sip:example.com", "Event: keep-alive\r\n"),
            Some(200)
        );
        assert_eq!(status_of("INVITE", "sip:bob@example.com", ""), Some(404));
        assert_eq!(
            status_of("REGISTER", "sip:example.com", ""),
            Some(0),
            "to the registrar"
        );
        assert_eq!(status_of("FOO", "sip:example.com", ""), Some(501));
        assert_eq!(status_of("CANCEL", "sip:bob@example.com", ""), Some(481));
        assert_eq!(status_of("INVITE", "sip:bob@elsewhere.net", ""), Some(403));
        // Another port on our address is not us.
        assert_eq!(status_of("OPTIONS", "sip:127.0.0.1:5099", ""), Some(403));
        assert_eq!(
            status_of("OPTIONS", "sip:elsewhere.net", "Max-Forwards: 0\r\n"),
            Some(483)
        );
        assert_eq!(
            status_of("INVITE", "sip:1234@example.com", "Max-Forwards: 0\r\n"),
            Some(483)
        );
        assert_eq!(status_of("ACK", "sip:bob@example.com", ""), None);
        // A preloaded route through us to elsewhere.
        assert_eq!(
            status_of(
                "INVITE",
                "sip:bob@example.com",
                "Route: <sip:127.0.0.1;lr>, <sip:evil.example;lr>\r\n"
            ),
            Some(403)
        );
    }

    #[test]
    fn which_404s_are_call_outcomes() {
        let c = core();
        let route = |from: &str, src: Source| {
            let text = format!(
                "INVITE sip:nobody@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7:40000;branch=z9hG4bK9\r\n\
From: <{from}>;tag=1\r\nTo: <sip:nobody@example.com>\r\nCall-ID: n1\r\nCSeq: 1 INVITE\r\n\r\n"
            );
            let msg = Message::parse(text.as_bytes(), Framing::Datagram).unwrap();
            c.0.route(&c.1, &msg, src)
        };
        // One of our users calls someone who is not registered: a call outcome.
        assert!(matches!(
            route("sip:a@example.com", src()),
            Routed::NotFound(_)
        ));
        // A scanner from elsewhere: a plain stateless 404.
        assert!(matches!(
            route("sip:100@198.51.100.9", src()),
            Routed::Reply(_)
        ));
        // ... unless it comes from a [[route]] next hop (the provider's inbound call).
        let provider = Source {
            remote: "192.0.2.80:5060".parse().unwrap(),
            ..src()
        };
        assert!(matches!(
            route("sip:+15550001@carrier.example", provider),
            Routed::NotFound(_)
        ));
    }

    /// Bindings owned by instances "here", "a" (alive at 192.0.2.50:5060) and "dead".
    #[derive(Debug)]
    struct Shared(Location);

    impl LocationService for Shared {
        fn lookup(&self, aor: &str, now: u64) -> Vec<Arc<Binding>> {
            self.0.lookup(aor, now)
        }
        fn snapshot(&self) -> Vec<Arc<Binding>> {
            self.0.snapshot()
        }
        fn save<'a>(
            &'a self,
            aor: &'a str,
            upsert: Vec<Arc<Binding>>,
            remove: Vec<String>,
            after: Vec<Arc<Binding>>,
        ) -> crate::registrar::location::Pending<
            'a,
            Result<crate::store::Written, crate::store::StoreError>,
        > {
            LocationService::save(&self.0, aor, upsert, remove, after)
        }
        fn remove_unreachable<'a>(
            &'a self,
            b: &'a Binding,
        ) -> crate::registrar::location::Pending<'a, Result<bool, crate::store::StoreError>>
        {
            LocationService::remove_unreachable(&self.0, b)
        }
        fn binding_count(&self) -> usize {
            self.0.binding_count()
        }
        fn aor_count(&self) -> usize {
            self.0.aor_count()
        }
        fn owner(&self, b: &Binding, _now: u64) -> Owner {
            match b.instance.as_str() {
                "here" => Owner::Here,
                "a" => Owner::At("192.0.2.50:5060".parse().unwrap()),
                _ => Owner::Gone,
            }
        }
    }

    /// README "Several instances": a binding owned by another instance is reached through it
    /// (a signed Route naming the phone's NAT binding); one owned by a dead instance is not
    /// used; the owner follows a signed Route to the binding and refuses a forged one.
    #[test]
    fn bindings_of_other_instances() {
        let (_, cfg) = core();
        let location = Arc::new(Shared(Location::new()));
        let binding = |contact: &str, received: &str, instance: &str| {
            binding("dora@example.com", contact, received, instance, true)
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(location.0.set(
            "dora@example.com",
            vec![
                binding("sip:dora@10.0.0.5:5060", "203.0.113.5:41000", "a"),
                binding("sip:dora@10.0.0.6:5060", "203.0.113.6:41000", "dead"),
            ],
        ));
        let c = Core::new(
            &cfg,
            vec![(Proto::Udp, "127.0.0.1:5060".parse().unwrap())],
            Some(location),
            Arc::new(SystemClock),
            key(),
            Arc::new(Security::new(
                cfg.security.clone(),
                tokio::time::Instant::now(),
            )),
        );
        let route = |extra: &str, ruri: &str| {
            let text = format!(
                "INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7:40000;branch=z9hG4bK9;rport\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <sip:dora@example.com>\r\nCall-ID: t1\r\nCSeq: 1 INVITE\r\n{extra}\r\n"
            );
            let msg = Message::parse(text.as_bytes(), Framing::Datagram).unwrap();
            c.route(&cfg, &msg, src())
        };
        let Routed::Forward(plan) = route("", "sip:dora@example.com") else {
            panic!("forwarded")
        };
        let flow = Flow {
            proto: Proto::Udp,
            addr: "203.0.113.5:41000".parse().unwrap(),
        };
        assert_eq!(
            plan.targets,
            [Hop {
                ruri: Some("sip:dora@10.0.0.5:5060".into()),
                dest: Dest::Addr("192.0.2.50:5060".parse().unwrap()),
                proto: Proto::Udp,
                flow: None,
                failover: Vec::new(),
                trunk: None,
                owner: Some(flow),
            }],
            "through the owner; the dead instance's binding is left out"
        );
        assert!(
            plan.targets[0].callee_nated(),
            "media: the callee is behind NAT"
        );
        assert_eq!(plan.route.as_deref(), Some("location"));

        // At the owner: our signed Route with the binding.
        let ours = super::super::forward::owner_route_uri(
            "127.0.0.1:5060".parse().unwrap(),
            flow,
            &key(),
            ("t1", "1"),
        );
        let Routed::Forward(plan) = route(&format!("Route: {ours}\r\n"), "sip:dora@10.0.0.5:5060")
        else {
            panic!("the owner forwards")
        };
        assert_eq!(
            plan.targets,
            [Hop {
                ruri: None,
                dest: Dest::Addr(flow.addr),
                proto: Proto::Udp,
                flow: Some(flow),
                failover: Vec::new(),
                trunk: None,
                owner: None,
            }]
        );
        assert!(
            plan.pop_route && plan.record_route && plan.route.is_none() && plan.media.is_none()
        );
        // Forged: another binding under the same MAC, a Record-Route MAC, no MAC.
        let status = |r: Routed| match r {
            Routed::Reply(t) => Message::parse(&t.bytes, Framing::Datagram)
                .unwrap()
                .status(),
            other => panic!("{other:?}"),
        };
        let forged = ours.replace("203.0.113.5~41000", "198.51.100.9~5060");
        let rr = format!(
            "<{}>",
            signed("sip:127.0.0.1:5060;lr;ob=u~198.51.100.9~5060")
        );
        for bad in [
            forged,
            rr,
            "<sip:127.0.0.1:5060;lr;ob=u~198.51.100.9~5060>".into(),
        ] {
            let r = route(&format!("Route: {bad}\r\n"), "sip:dora@10.0.0.5:5060");
            assert_eq!(status(r), Some(403), "{bad}");
        }
    }

    #[test]
    fn a_next_hop_list_gives_the_branch_its_failover_hops() {
        let plan = decide("INVITE", "sip:91234567@example.com", "").unwrap_err();
        assert_eq!(plan.targets.len(), 1, "one branch, tried serially");
        assert_eq!(plan.failover_timeout, Some(Duration::from_millis(700)));
        let first = &plan.targets[0];
        assert_eq!(
            first.dest,
            Dest::Name {
                host: "provider.example".into(),
                transport: None
            },
            "a name without a port: RFC 3263 NAPTR/SRV"
        );
        assert_eq!(first.ruri.as_deref(), Some("sip:91234567@provider.example"));
        let [v6, v4] = first.failover.as_slice() else {
            panic!("two failover hops: {:?}", first.failover);
        };
        assert_eq!(v6.dest, Dest::Addr("[2001:db8::1]:5062".parse().unwrap()));
        assert_eq!(v6.proto, Proto::Tcp);
        assert_eq!(v6.ruri.as_deref(), Some("sip:91234567@[2001:db8::1]:5062"));
        assert_eq!(v4.dest, Dest::Addr("192.0.2.90:5060".parse().unwrap()));
        assert_eq!(v4.proto, Proto::Udp);
        assert_eq!(v4.ruri.as_deref(), Some("sip:91234567@192.0.2.90:5060"));
        // A route without failover_timeout_ms has the default, 2 s.
        assert_eq!(
            decide("INVITE", "sip:1234@example.com", "")
                .unwrap_err()
                .failover_timeout,
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn uri_hops_follow_rfc_3263_for_port_and_transport() {
        let hop = |u: &str| hop_for_uri(u).expect("a reachable URI");
        assert_eq!(
            hop("sip:bob@example.net").dest,
            Dest::Name {
                host: "example.net".into(),
                transport: None
            }
        );
        let tcp = hop("sip:bob@example.net;transport=tcp");
        assert_eq!(
            (tcp.dest, tcp.proto),
            (
                Dest::Name {
                    host: "example.net".into(),
                    transport: Some(Proto::Tcp)
                },
                Proto::Tcp
            )
        );
        assert_eq!(
            hop("sip:bob@example.net:5070").dest,
            Dest::Host("example.net".into(), 5070)
        );
        assert_eq!(
            hop("sip:bob@192.0.2.4").dest,
            Dest::Addr("192.0.2.4:5060".parse().unwrap())
        );
        // A sips: URI: TLS, its SRV name `_sips._tcp` (RFC 3263 §4.1).
        let sips = hop("sips:bob@example.net");
        assert_eq!(
            (sips.dest, sips.proto),
            (
                Dest::Name {
                    host: "example.net".into(),
                    transport: Some(Proto::Tls)
                },
                Proto::Tls
            )
        );
    }

    #[test]
    fn routing_rules_and_location() {
        let plan = decide("INVITE", "sip:1234@example.com", "").unwrap_err();
        assert_eq!(
            plan.route.as_deref(),
            Some("pbx"),
            "accounted as the rule's name"
        );
        assert_eq!(
            plan.targets[0].dest,
            Dest::Host("pbx.example.net".into(), 5070)
        );
        assert!(plan.record_route && plan.auth.is_none());
        let plan = decide("INVITE", "sip:15551234567@example.com", "").unwrap_err();
        assert_eq!(
            plan.targets[0].dest,
            Dest::Addr("192.0.2.80:5060".parse().unwrap())
        );
        assert_eq!(plan.auth, Some(AuthNeed::Route));
        // A registered user: the Request-URI becomes the contact, sent to the flow.
        let plan = decide("INVITE", "sip:carol@example.com", "").unwrap_err();
        assert_eq!(plan.route.as_deref(), Some("location"));
        assert_eq!(plan.targets.len(), 1);
        assert_eq!(
            plan.targets[0].ruri.as_deref(),
            Some("sip:carol@10.0.0.9:5062")
        );
        assert_eq!(
            plan.targets[0].dest,
            Dest::Addr("203.0.113.4:41000".parse().unwrap())
        );
        // In-dialog: our Route is popped, the next Route (or the Request-URI) is the target.
        let plan = decide(
            "BYE",
            "sip:carol@10.0.0.9:5062",
            &format!("Route: <{}>\r\n", signed("sip:127.0.0.1:5060;lr;nat=yes")),
        )
        .unwrap_err();
        assert!(plan.pop_route && plan.nat && !plan.record_route);
        assert_eq!(plan.route, None, "in-dialog: not accounted");
        assert_eq!(
            plan.targets[0].dest,
            Dest::Addr("10.0.0.9:5062".parse().unwrap())
        );
    }

    #[test]
    fn a_binding_is_reached_at_its_nat_binding_only_when_nated() {
        let b = |contact: &str, nated: bool| {
            binding(
                "carol@example.com",
                contact,
                "203.0.113.4:41000",
                "i",
                nated,
            )
        };
        let flow = Flow {
            proto: Proto::Udp,
            addr: "203.0.113.4:41000".parse().unwrap(),
        };
        // NATed (Kamailio fix_nated_register): at the source, recorded as `;fe=`.
        let hop = binding_hop(&b("sip:carol@10.0.0.9:5062", true));
        assert_eq!(hop.dest, Dest::Addr(flow.addr));
        assert_eq!(hop.flow, Some(flow));
        assert_eq!(hop.ruri.as_deref(), Some("sip:carol@10.0.0.9:5062"));
        // Not NATed (a third party registered it): at the Contact, with its transport; no flow.
        let hop = binding_hop(&b("sip:carol@198.51.100.20:5070;transport=tcp", false));
        assert_eq!(hop.dest, Dest::Addr("198.51.100.20:5070".parse().unwrap()));
        assert_eq!((hop.proto, hop.flow), (Proto::Tcp, None));
        assert_eq!(
            hop.ruri.as_deref(),
            Some("sip:carol@198.51.100.20:5070;transport=tcp")
        );
        // A host name is resolved like any next hop.
        let hop = binding_hop(&b("sip:carol@pbx.example.net", false));
        assert_eq!(
            hop.dest,
            Dest::Name {
                host: "pbx.example.net".into(),
                transport: None
            }
        );
        // A Contact that is no SIP URI we can reach: the source, as before.
        let hop = binding_hop(&b("tel:+15551230000", false));
        assert_eq!(hop.dest, Dest::Addr(flow.addr));
    }

    #[test]
    fn flow_tokens_pick_the_other_party() {
        let dest = |uri: &str, route: &str| {
            let plan = decide("BYE", uri, &format!("Route: <{}>\r\n", signed(route))).unwrap_err();
            plan.targets[0].dest.clone()
        };
        let binding = |a: &str| Dest::Addr(a.parse().unwrap());
        // src() is 192.0.2.7:40000.
        let both = "sip:127.0.0.1:5060;lr;fc=u~192.0.2.7~40000;fe=u~203.0.113.4~41000";
        assert_eq!(dest("sip:c@10.0.0.9", both), binding("203.0.113.4:41000"));
        let both = "sip:127.0.0.1:5060;lr;fc=u~203.0.113.4~41000;fe=u~192.0.2.7~40000";
        assert_eq!(dest("sip:c@10.0.0.9", both), binding("203.0.113.4:41000"));
        // Only the caller's binding recorded (a call to a PBX); the PBX hangs up: the private
        // Request-URI is the caller's Contact, reached at its binding.
        let fc_only = "sip:127.0.0.1:5060;lr;fc=u~203.0.113.4~41000";
        assert_eq!(
            dest("sip:a@10.0.0.9", fc_only),
            binding("203.0.113.4:41000")
        );
        // ... but a public Request-URI (the caller, rebound, hanging up towards the PBX) is
        // followed as it is.
        assert_eq!(
            dest("sip:pbx@192.0.2.50:5060", fc_only),
            binding("192.0.2.50:5060")
        );
    }

    /// A trunk re-sent the INVITE with CSeq + 1 (`;cs=1;ft=TAG` in our Record-Route): the
    /// caller's BYE and ACK go on with the offset, the other party's requests without.
    #[test]
    fn trunk_cseq_offset_follows_the_callers_requests_only() {
        let offset = |method: &str, route: &str| {
            decide(
                method,
                "sip:p@192.0.2.50:5060",
                &format!("Route: <{}>\r\n", signed(route)),
            )
            .unwrap_err()
            .cseq_offset
        };
        // decide()'s requests carry From tag 1.
        let callers = "sip:127.0.0.1:5060;lr;cs=1;ft=1";
        assert_eq!(offset("BYE", callers), 1);
        assert_eq!(offset("ACK", callers), 1);
        let other_party = "sip:127.0.0.1:5060;lr;cs=1;ft=zz";
        assert_eq!(offset("BYE", other_party), 0);
        assert_eq!(offset("BYE", "sip:127.0.0.1:5060;lr"), 0);
        // The parameters count only under our MAC.
        let forged = decide(
            "BYE",
            "sip:p@192.0.2.50:5060",
            "Route: <sip:127.0.0.1:5060;lr;cs=1;ft=1>\r\n",
        );
        assert_eq!(forged.map_err(|p| p.cseq_offset), Ok(Some(403)));
    }

    #[test]
    fn routes_we_did_not_sign_are_not_followed() {
        let bye = |route: &str| decide("BYE", "sip:victim@192.0.2.99:5060", route);
        // Our address without a MAC, a forged flow token, a MAC of another dialog.
        let unsigned = "Route: <sip:127.0.0.1:5060;lr>\r\n";
        assert_eq!(bye(unsigned), Ok(Some(403)));
        let forged = format!(
            "Route: <{}>\r\n",
            signed("sip:127.0.0.1:5060;lr;fc=u~203.0.113.4~41000")
                .replace("203.0.113.4~41000", "192.0.2.99~5060")
        );
        assert_eq!(bye(&forged), Ok(Some(403)));
        let other_dialog = format!(
            "Route: <sip:127.0.0.1:5060;lr;m={}>\r\n",
            key().route_mac("another-call", "1", "sip:127.0.0.1:5060;lr")
        );
        assert_eq!(bye(&other_dialog), Ok(Some(403)));
        // A foreign Route alone, in a dialog: not through us.
        assert_eq!(bye("Route: <sip:192.0.2.99;lr>\r\n"), Ok(Some(403)));
        // A signed Route is followed.
        let ok = format!("Route: <{}>\r\n", signed("sip:127.0.0.1:5060;lr"));
        assert!(bye(&ok).is_err(), "forwarded");
        // ACKs: dropped unless they follow a signed Route of ours.
        let ack = |route: &str| decide("ACK", "sip:victim@192.0.2.99:5060", route);
        assert_eq!(ack(""), Ok(None));
        assert_eq!(ack(unsigned), Ok(None));
        assert_eq!(ack("Route: <sip:192.0.2.99;lr>\r\n"), Ok(None));
        assert!(ack(&ok).is_err(), "an ACK in a dialog of ours is forwarded");
    }

    #[test]
    fn secure_uris_are_never_sent_over_plain_transports() {
        let sips = hop_for_uri("sips:bob@192.0.2.9").unwrap();
        assert_eq!(sips.proto, Proto::Tls);
        assert_eq!(sips.dest, Dest::Addr("192.0.2.9:5061".parse().unwrap()));
        // Never in clear, whatever transport a sips: URI names.
        let sips_tcp = hop_for_uri("sips:bob@192.0.2.9:5070;transport=tcp").unwrap();
        assert_eq!(sips_tcp.proto, Proto::Tls);
        let tls = hop_for_uri("sip:bob@example.net;transport=TLS").unwrap();
        assert_eq!(tls.proto, Proto::Tls);
        assert_eq!(
            tls.dest,
            Dest::Name {
                host: "example.net".into(),
                transport: Some(Proto::Tls)
            }
        );
        let tcp = hop_for_uri("sip:bob@192.0.2.9;transport=TCP").unwrap();
        assert_eq!(tcp.proto, Proto::Tcp);
        assert_eq!(tcp.dest, Dest::Addr("192.0.2.9:5060".parse().unwrap()));
        // In a dialog of ours, a sips: remote target is followed over TLS, not downgraded.
        let route = format!("Route: <{}>\r\n", signed("sip:127.0.0.1:5060;lr"));
        let plan = decide("BYE", "sips:bob@192.0.2.9", &route).expect_err("forwarded");
        assert_eq!(plan.targets[0].proto, Proto::Tls);
    }
}
