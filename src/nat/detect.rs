//! Far-end NAT detection: the tests of OpenSER/Kamailio nathelper's `nat_uac_test`, as pure
//! functions of a message and the address it came from.
//!
//! - Contact host in a private (RFC 1918), shared (RFC 6598), loopback or link-local range;
//! - top Via sent-by address or port different from the packet's source (RFC 3581 territory);
//! - top Via host in one of those ranges.
//!
//! A verdict lists which tests fired, so logs can say why a party was treated as NATed.

use std::net::{IpAddr, SocketAddr};

use crate::sip::{ContactValue, Message, SipUri};

/// Which nathelper tests fired for one message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// A Contact URI host is a private, shared, loopback or link-local address.
    pub contact_private: bool,
    /// The top Via sent-by is not the address and port the packet came from.
    pub via_mismatch: bool,
    /// The top Via host is a private, shared, loopback or link-local address.
    pub via_private: bool,
}

impl Verdict {
    /// True when any test fired: the sender is behind NAT.
    pub fn is_nated(self) -> bool {
        self.contact_private || self.via_mismatch || self.via_private
    }
}

/// Runs every test on `msg` as received from `source`.
pub fn detect(msg: &Message, source: SocketAddr) -> Verdict {
    let mut v = Verdict::default();
    if let Ok(via) = msg.top_via() {
        let host: Option<IpAddr> = via.host.parse().ok();
        v.via_private = host.is_some_and(is_private);
        let port = via.port.unwrap_or(5060);
        v.via_mismatch = host != Some(source.ip()) || port != source.port();
    }
    // A malformed Contact list counts as no Contact, whatever came before the defect.
    let mut private = false;
    let listed = msg.for_each_contact(|c| {
        private |= match c {
            ContactValue::Addr(a) => SipUri::parse(a.uri)
                .ok()
                .and_then(|u| u.ip())
                .is_some_and(is_private),
            ContactValue::Star => false,
        };
    });
    v.contact_private = listed.is_ok() && private;
    v
}

/// RFC 1918, RFC 6598 (carrier-grade NAT), loopback, link-local, and IPv6 unique-local /
/// link-local / loopback: addresses that cannot be reached from the public side.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || (o[0] == 100 && (64..128).contains(&o[1]))
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments()[0];
            v6.is_loopback() || (seg & 0xfe00) == 0xfc00 || (seg & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Framing;

    fn msg(via: &str, contact: &str) -> Message {
        let text = format!(
            "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {via};branch=z9hG4bK1\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: n\r\nCSeq: 1 INVITE\r\n\
Contact: <{contact}>\r\n\r\n"
        );
        Message::parse(text.as_bytes(), Framing::Datagram).unwrap()
    }

    #[test]
    fn ranges() {
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.10",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "169.254.1.1",
            "::1",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(is_private(private.parse().unwrap()), "{private}");
        }
        for public in [
            "203.0.113.5",
            "172.32.0.1",
            "100.128.0.1",
            "8.8.8.8",
            "2001:db8::1",
        ] {
            assert!(!is_private(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn each_test_alone() {
        let src: SocketAddr = "203.0.113.9:5060".parse().unwrap();
        // A public phone telling the truth: nothing fires.
        let v = detect(&msg("203.0.113.9:5060", "sip:a@203.0.113.9:5060"), src);
        assert!(!v.is_nated(), "{v:?}");
        // Private Contact only.
        let v = detect(&msg("203.0.113.9:5060", "sip:a@192.168.1.20:5060"), src);
        assert_eq!(
            v,
            Verdict {
                contact_private: true,
                ..Verdict::default()
            }
        );
        // The NAT changed the port (symmetric NAT): sent-by port differs.
        let v = detect(&msg("203.0.113.9:5062", "sip:a@203.0.113.9:5062"), src);
        assert!(v.via_mismatch && !v.via_private && !v.contact_private);
        // The usual home router: private Via and Contact, other source.
        let v = detect(&msg("192.168.1.20:5060", "sip:a@192.168.1.20:5060"), src);
        assert!(v.via_mismatch && v.via_private && v.contact_private);
        // A hostname in Via is not the source address.
        let v = detect(&msg("phone.example.com", "sip:a@203.0.113.9"), src);
        assert!(v.via_mismatch);
        // Any private Contact of a list counts; a malformed list counts as none, whatever
        // came before its defect.
        let v = detect(
            &msg("203.0.113.9:5060", "sip:a@203.0.113.9>, <sip:a@10.0.0.2"),
            src,
        );
        assert!(v.contact_private);
        let v = detect(&msg("203.0.113.9:5060", "sip:a@10.0.0.2>, \"x"), src);
        assert!(!v.contact_private, "{v:?}");
    }
}
