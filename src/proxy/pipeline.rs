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

use super::sanity::{self, Verdict};
use crate::config::{Config, RelayForeign};
use crate::registrar::service::Job;
use crate::sip::{Framing, Message, SipUri, reply};
use crate::transport::{Outbound, Proto, Source};

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
pub enum Dispatch {
    /// Send this (a local reply).
    Send(Outbound),
    /// Hand this REGISTER for one of our domains to the registrar.
    Register(Box<Job>),
    /// Nothing to do.
    Nothing,
}

impl From<Option<Outbound>> for Dispatch {
    fn from(o: Option<Outbound>) -> Self {
        o.map_or(Self::Nothing, Self::Send)
    }
}

/// The signalling core: configuration plus the sockets we own (for the "myself" check).
#[derive(Debug)]
pub struct Core {
    cfg: Arc<Config>,
    /// Addresses of the bound sockets (the real ports when the config asked for port 0).
    local: Vec<(Proto, SocketAddr)>,
}

impl Core {
    pub fn new(cfg: Arc<Config>, local: Vec<(Proto, SocketAddr)>) -> Self {
        Self { cfg, local }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Handles one received message; returns what the I/O side must do.
    pub fn handle(&self, bytes: &[u8], source: Source, framing: Framing) -> Dispatch {
        match sanity::check(bytes, framing, self.cfg.server.max_message_size) {
            Verdict::Drop(reason) => {
                debug!(peer.addr = %source.remote, ?reason, "dropping message");
                Dispatch::Nothing
            }
            Verdict::Response(msg) => {
                // No client transactions exist yet, so no response can match one (RFC 3261
                // §17.1.3); a stateful proxy drops stray responses.
                debug!(peer.addr = %source.remote, sip.status = msg.status(), "dropping stray response");
                Dispatch::Nothing
            }
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
                        .is_some_and(|u| self.is_myself(&u, source));
                if for_registrar {
                    return Dispatch::Register(Box::new(Job { msg, source }));
                }
                self.request(&msg, source).into()
            }
        }
    }

    fn request(&self, msg: &Message, source: Source) -> Option<Outbound> {
        // invariant: sanity checked the method, Request-URI and Call-ID of this request.
        let method = msg.method().unwrap_or_default();
        let uri_text = msg.request_uri().unwrap_or_default();
        debug!(
            sip.method = method,
            sip.call_id = msg.call_id().unwrap_or_default(),
            peer.addr = %source.remote,
            "request"
        );
        if method == "ACK" {
            // An ACK is never answered. Without transactions, an ACK to us ends here.
            return None;
        }
        let Ok(uri) = SipUri::parse(uri_text) else {
            return Some(self.reply(msg, source, 400, "Malformed Request-URI", &[]));
        };
        let for_us = self.is_myself(&uri, source);
        let max_forwards = msg.max_forwards().ok().flatten();

        if method == "CANCEL" {
            // RFC 3261 §16.10: a CANCEL that matches no transaction gets 481.
            return Some(self.reply(msg, source, 481, "Call/Transaction Does Not Exist", &[]));
        }
        if !for_us {
            if max_forwards == Some(0) {
                return Some(self.reply(msg, source, 483, "Too Many Hops", &[]));
            }
            return Some(match self.cfg.server.relay_foreign {
                RelayForeign::Deny => self.reply(msg, source, 403, "Relaying Forbidden", &[]),
                RelayForeign::Authenticated | RelayForeign::Open => {
                    self.reply(msg, source, 501, "Relaying Not Implemented", &[])
                }
            });
        }
        if !KNOWN_METHODS.contains(&method) {
            return Some(self.reply(msg, source, 501, "Not Implemented", &[("Allow", ALLOW)]));
        }
        match (method, uri.user) {
            // Keepalive OPTIONS and NOTIFY addressed to the proxy itself (the seed answers them).
            ("OPTIONS", None) => Some(self.reply(
                msg,
                source,
                200,
                "OK",
                &[("Allow", ALLOW), ("Accept", "application/sdp")],
            )),
            ("NOTIFY", None) => Some(self.reply(msg, source, 200, "OK", &[])),
            (_, _) if max_forwards == Some(0) => {
                Some(self.reply(msg, source, 483, "Too Many Hops", &[]))
            }
            // No location service yet: nobody is registered here.
            (_, _) => Some(self.reply(msg, source, 404, "User Not Found", &[])),
        }
    }

    /// RFC 3261 §16.4 / Kamailio `myself`: the URI names one of our domains or one of our
    /// addresses, on one of our ports.
    fn is_myself(&self, uri: &SipUri<'_>, source: Source) -> bool {
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
        if self.cfg.is_local_domain(uri.host) {
            return uri.port.is_none() || port_ok(uri.port);
        }
        let Some(ip) = uri.ip() else {
            return false;
        };
        // A wildcard socket (0.0.0.0) serves every local address; the ones we can know without
        // asking the kernel for each packet's destination are the advertised address, the
        // address a TCP connection was accepted on, and loopback.
        let ours = ip == self.cfg.server.advertise
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
    ) -> Outbound {
        let bytes = reply::response(msg, source.remote, status, reason, extra);
        let dest = match source.proto {
            Proto::Tcp => source.remote,
            Proto::Udp => msg.top_via().map_or(source.remote, |via| {
                reply::response_target(&via, source.remote)
            }),
        };
        Outbound {
            proto: source.proto,
            local: source.local,
            dest,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> Core {
        let cfg = Config::from_toml(
            "[server]\nlisten=[\"udp:127.0.0.1:5060\"]\ndomains=[\"example.com\"]\nrelay_foreign=\"deny\"\n",
            || "127.0.0.1".parse().unwrap(),
        )
        .unwrap();
        Core::new(
            Arc::new(cfg),
            vec![(Proto::Udp, "127.0.0.1:5060".parse().unwrap())],
        )
    }

    fn src() -> Source {
        Source {
            proto: Proto::Udp,
            remote: "192.0.2.7:40000".parse().unwrap(),
            local: "127.0.0.1:5060".parse().unwrap(),
        }
    }

    fn status_of(method: &str, uri: &str, extra: &str) -> Option<u16> {
        let text = format!(
            "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7:40000;branch=z9hG4bK9;rport\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <{uri}>\r\nCall-ID: t1\r\nCSeq: 1 {method}\r\n{extra}\r\n"
        );
        let out = match core().handle(text.as_bytes(), src(), Framing::Datagram) {
            Dispatch::Send(out) => out,
            Dispatch::Register(_) => return Some(0),
            Dispatch::Nothing => return None,
        };
        assert_eq!(out.dest, src().remote, "rport: answer the source");
        Message::parse(&out.bytes, Framing::Datagram)
            .unwrap()
            .status()
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
        assert_eq!(status_of("ACK", "sip:bob@example.com", ""), None);
    }
}
