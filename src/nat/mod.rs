//! Far-end NAT traversal (the seed's nathelper usage), the pure part: detection of phones
//! behind NAT (`detect`, used for `;nat=yes` and flow tokens in our Record-Route, force_rport
//! and the media decision) and where a response goes. Keepalives to NATed bindings live with
//! the bindings, in [`crate::registrar::keepalive`].

pub mod detect;

use std::net::SocketAddr;

use crate::sip::{Message, reply};
use crate::transport::{Proto, Source, Transmit};

/// Where a response to `req` goes — the one rule every responder uses (local replies,
/// proxied responses, the registrar): RFC 3261 §18.2.2 (TCP: the connection it came on),
/// RFC 3581 (`rport`: the source port), and force_rport: a sender behind NAT (`nated`,
/// nathelper's tests) is answered at its source address even without `rport`.
pub fn response_dest(req: &Message, source: Source, nated: bool) -> SocketAddr {
    match source.proto {
        Proto::Tcp | Proto::Tls => source.remote,
        Proto::Udp if nated => source.remote,
        Proto::Udp => req
            .top_via()
            .map_or(source.remote, |v| reply::response_target(&v, source.remote)),
    }
}

/// A response to `req` ready to send, by [`response_dest`] with nathelper's tests run here.
pub fn respond(req: &Message, source: Source, bytes: Vec<u8>) -> Transmit {
    let nated = detect::detect(req, source.remote).is_nated();
    Transmit {
        proto: source.proto,
        local: source.local,
        dest: response_dest(req, source, nated),
        bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Framing;

    fn register(via: &str, contact: &str) -> Message {
        let text = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {via};branch=z9hG4bK1\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\nCall-ID: r1\r\nCSeq: 1 REGISTER\r\n\
Contact: <{contact}>\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(text.as_bytes(), Framing::Datagram).unwrap()
    }

    fn udp(remote: &str) -> Source {
        Source {
            proto: Proto::Udp,
            remote: remote.parse().unwrap(),
            local: "198.51.100.1:5060".parse().unwrap(),
        }
    }

    #[test]
    fn natted_sender_without_rport_is_answered_at_its_source_port() {
        // A phone behind NAT: private Via and Contact, no rport; the router mapped 5060 to
        // 41000. The answer must go to the mapping, not to the Via port (lost behind NAT).
        let req = register("192.168.1.20:5060", "sip:a@192.168.1.20:5060");
        let src = udp("203.0.113.4:41000");
        assert_eq!(respond(&req, src, Vec::new()).dest, src.remote);
        // A public phone without rport is answered at its Via port (RFC 3261 §18.2.2), here
        // the port it sent from.
        let req = register("203.0.113.5:5070", "sip:a@203.0.113.5:5070");
        let src = udp("203.0.113.5:5070");
        assert_eq!(
            respond(&req, src, Vec::new()).dest,
            "203.0.113.5:5070".parse().unwrap()
        );
        // TCP: always the connection's peer.
        let tcp = Source {
            proto: Proto::Tcp,
            ..src
        };
        assert_eq!(respond(&req, tcp, Vec::new()).dest, src.remote);
    }
}
