//! Message authentication codes over what sipedge writes into the messages it forwards, so
//! that what comes back can be trusted without keeping state for it:
//!
//! - our **Record-Route** URI carries `;m=` — a MAC over the Call-ID, the caller's From tag
//!   and the URI text before it (address, transport, `nat=yes`, the `fc`/`fe` flow tokens). An
//!   in-dialog request follows a Route of ours only when the MAC verifies for its Call-ID and
//!   one of its tags, so nobody can make us send a request to an address they chose by
//!   writing a Route or a flow token themselves.
//! - our **Via branch** ends in a MAC over the branch and the address its responses go to
//!   (the previous hop), so a stray 2xx — one that matches no transaction any more — is
//!   forwarded only to the hop we received the request from, never to a Via someone added.
//!
//! - the **inter-instance Route** (README "Several instances") that an instance pushes onto a
//!   request it forwards to the instance owning the callee's binding carries `;m=` too, a MAC
//!   in a domain of its own over the Call-ID, the From tag and the URI (the owner's address and
//!   the `ob` flow token naming the phone's NAT binding): the owner sends the request to that
//!   binding only when it verifies, so nobody outside can use the hop to reach NATed phones,
//!   and no Record-Route of ours can be replayed as one.
//!
//! The key is derived from the per-install secret (`meta.nonce_secret`), so every instance
//! sharing a store accepts the others' routes. Pure: no clock, no I/O.

use std::fmt::Write as _;
use std::net::SocketAddr;

use hmac::{Hmac, KeyInit, Mac as _};
use sha2::Sha256;

use super::nonce::NonceKey;
use super::{ct_eq, hex_digit};
use crate::sip::text::Addr;

/// Hex digits of a Record-Route MAC (64 bits: the MAC is checked online only, one guess
/// per request, so 2^64 guesses are out of reach).
const ROUTE_MAC_HEX: usize = 16;
/// Hex digits of a branch MAC (48 bits, same reasoning; the branch stays short).
const BRANCH_MAC_HEX: usize = 12;

/// The name of our Record-Route MAC parameter.
pub const ROUTE_MAC_PARAM: &str = ";m=";

/// HMAC-SHA256 (RFC 2104) of the concatenation of `parts`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // invariant: HMAC accepts keys of any length (longer ones are hashed first).
    #[allow(clippy::expect_used)]
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The key of our Record-Route and branch MACs, kept as the HMAC state after the key was
/// absorbed: each MAC clones it instead of hashing the key blocks again (it runs several times
/// per call).
#[derive(Clone)]
pub struct RouteKey(Hmac<Sha256>);

impl std::fmt::Debug for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteKey(..)")
    }
}

impl RouteKey {
    /// Derives the key from the per-install secret (domain-separated from nonce MACs).
    pub fn derive(secret: &NonceKey) -> Self {
        Self::from_bytes(hmac_sha256(secret.as_bytes(), &[b"sipedge route mac v1"]))
    }

    /// A key from raw bytes (tests).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        // invariant: HMAC accepts keys of any length.
        #[allow(clippy::expect_used)]
        let state =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&b).expect("HMAC takes any key length");
        Self(state)
    }

    fn mac_hex(&self, parts: &[&[u8]], len: usize) -> MacHex {
        let mut mac = self.0.clone();
        for p in parts {
            mac.update(p);
        }
        MacHex::of(&mac.finalize().into_bytes(), len)
    }

    /// The MAC of a Record-Route URI whose text (without `<>`) is `uri` up to the MAC
    /// parameter, for the dialog of `call_id` created by the caller's `from_tag`.
    pub fn route_mac(&self, call_id: &str, from_tag: &str, uri: &str) -> MacHex {
        self.mac_hex(
            &[
                b"rr\0",
                call_id.as_bytes(),
                b"\0",
                from_tag.as_bytes(),
                b"\0",
                uri.as_bytes(),
            ],
            ROUTE_MAC_HEX,
        )
    }

    /// The MAC of an inter-instance Route URI (`uri` up to the MAC parameter) for the request
    /// of `call_id` with From tag `from_tag`.
    pub fn owner_route_mac(&self, call_id: &str, from_tag: &str, uri: &str) -> MacHex {
        self.mac_hex(
            &[
                b"ob\0",
                call_id.as_bytes(),
                b"\0",
                from_tag.as_bytes(),
                b"\0",
                uri.as_bytes(),
            ],
            ROUTE_MAC_HEX,
        )
    }

    /// True when `uri` (a Route value, without `<>`) ends in an inter-instance MAC of ours
    /// that verifies for `call_id` and `from_tag`.
    pub fn verify_owner_route(&self, call_id: &str, from_tag: &str, uri: &str) -> bool {
        let Some(at) = uri.rfind(ROUTE_MAC_PARAM) else {
            return false;
        };
        let (signed, rest) = uri.split_at(at);
        let given = &rest[ROUTE_MAC_PARAM.len()..];
        given.len() == ROUTE_MAC_HEX && self.owner_route_mac(call_id, from_tag, signed).is(given)
    }

    /// True when `uri` (a Route value, without `<>`) ends in a MAC of ours that verifies for
    /// `call_id` and one of `tags` (the From tag, or the To tag for requests of the callee).
    pub fn verify_route(&self, call_id: &str, tags: &[&str], uri: &str) -> bool {
        let Some(at) = uri.rfind(ROUTE_MAC_PARAM) else {
            return false;
        };
        let (signed, rest) = uri.split_at(at);
        let given = &rest[ROUTE_MAC_PARAM.len()..];
        given.len() == ROUTE_MAC_HEX
            && tags
                .iter()
                .any(|tag| self.route_mac(call_id, tag, signed).is(given))
    }

    /// The MAC that ends a branch of ours: over the branch before it and the address the
    /// responses of that transaction go to.
    pub fn branch_mac(&self, branch: &str, upstream: SocketAddr) -> MacHex {
        let mut mac = self.0.clone();
        mac.update(b"br\0");
        mac.update(branch.as_bytes());
        mac.update(b"\0");
        // The address's text straight into the MAC (no string is built for it).
        let _ = write!(Absorb(&mut mac), "{}", Addr(upstream));
        MacHex::of(&mac.finalize().into_bytes(), BRANCH_MAC_HEX)
    }

    /// True when `branch` is `<core>-<mac>` with a MAC of ours for `upstream`.
    pub fn verify_branch(&self, branch: &str, upstream: SocketAddr) -> bool {
        let Some((core, given)) = branch.rsplit_once('-') else {
            return false;
        };
        given.len() == BRANCH_MAC_HEX && self.branch_mac(core, upstream).is(given)
    }
}

/// Feeds formatted text into a MAC.
struct Absorb<'a>(&'a mut Hmac<Sha256>);

impl std::fmt::Write for Absorb<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.update(s.as_bytes());
        Ok(())
    }
}

/// A MAC's leading hex digits, lower case, kept on the stack: it is written into a header
/// straight away, so a heap string for it (several per call) would only be copied and freed.
#[derive(Clone, Copy)]
pub struct MacHex {
    digits: [u8; MAC_HEX_MAX],
    len: usize,
}

/// The most hex digits a [`MacHex`] holds (the longest MAC written, `ROUTE_MAC_HEX`).
const MAC_HEX_MAX: usize = 16;

impl MacHex {
    /// The first `len` hex digits of `mac` (`len` at most [`MAC_HEX_MAX`]).
    fn of(mac: &[u8], len: usize) -> Self {
        let mut digits = [0u8; MAC_HEX_MAX];
        let len = len.min(MAC_HEX_MAX).min(mac.len() * 2);
        for (i, d) in digits[..len].iter_mut().enumerate() {
            *d = hex_digit(mac, i);
        }
        Self { digits, len }
    }

    /// Whether `given` is this MAC, hex case not significant, in time that depends only on
    /// the lengths.
    fn is(&self, given: &str) -> bool {
        let mut lower = [0u8; MAC_HEX_MAX];
        if given.len() > MAC_HEX_MAX {
            return false;
        }
        for (l, g) in lower.iter_mut().zip(given.bytes()) {
            *l = g.to_ascii_lowercase();
        }
        ct_eq(&self.digits[..self.len], &lower[..given.len()])
    }

    pub fn as_str(&self) -> &str {
        // invariant: every digit is an ASCII hex digit written by `of`, so the bytes are UTF-8.
        std::str::from_utf8(&self.digits[..self.len]).unwrap_or_default()
    }
}

impl std::fmt::Display for MacHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for MacHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MacHex({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RouteKey {
        RouteKey::derive(&NonceKey::from_bytes([7; 32]))
    }

    fn hex(bytes: &[u8]) -> String {
        super::super::to_hex(bytes)
    }

    #[test]
    fn hmac_rfc4231_vectors() {
        assert_eq!(
            hex(&hmac_sha256(&[0x0b; 20], &[b"Hi There"])),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        let tc2 = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert_eq!(
            hex(&hmac_sha256(
                b"Jefe",
                &[b"what do ya", b"", b" want for nothing?"]
            )),
            tc2
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                &[b"Test Using Larger Than Block-Size Key - Hash Key First"]
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn route_mac_binds_dialog_and_every_parameter() {
        let k = key();
        let uri = "sip:192.0.2.1:5060;lr;nat=yes;fc=u~203.0.113.4~41000";
        let mac = k.route_mac("call-1", "tagA", uri);
        let signed = format!("{uri}{ROUTE_MAC_PARAM}{mac}");
        assert!(k.verify_route("call-1", &["tagA"], &signed));
        // Either tag of the dialog may carry the caller's (requests of the callee).
        assert!(k.verify_route("call-1", &["tagB", "tagA"], &signed));
        assert!(
            !k.verify_route("call-2", &["tagA"], &signed),
            "other Call-ID"
        );
        assert!(!k.verify_route("call-1", &["tagB"], &signed), "other tag");
        // A forged flow token, a dropped parameter, an added one, no MAC at all.
        let forged = signed.replace("203.0.113.4~41000", "198.51.100.9~5060");
        assert!(!k.verify_route("call-1", &["tagA"], &forged));
        assert!(!k.verify_route("call-1", &["tagA"], &signed.replace(";nat=yes", "")));
        assert!(!k.verify_route("call-1", &["tagA"], uri));
        assert!(!k.verify_route("call-1", &["tagA"], "sip:192.0.2.1;lr;m="));
        // Another install's key.
        let other = RouteKey::derive(&NonceKey::from_bytes([8; 32]));
        assert!(!other.verify_route("call-1", &["tagA"], &signed));
        // Hex case is not significant.
        let upper = format!(
            "{uri}{ROUTE_MAC_PARAM}{}",
            mac.as_str().to_ascii_uppercase()
        );
        assert!(k.verify_route("call-1", &["tagA"], &upper));
    }

    #[test]
    fn owner_routes_and_record_routes_do_not_mix() {
        let k = key();
        let uri = "sip:192.0.2.2:5060;lr;ob=u~203.0.113.4~41000";
        let signed = format!("{uri}{ROUTE_MAC_PARAM}{}", k.owner_route_mac("c", "t", uri));
        assert!(k.verify_owner_route("c", "t", &signed));
        assert!(!k.verify_owner_route("c", "u", &signed), "other tag");
        assert!(!k.verify_owner_route("d", "t", &signed), "other Call-ID");
        let forged = signed.replace("203.0.113.4~41000", "198.51.100.9~5060");
        assert!(!k.verify_owner_route("c", "t", &forged), "other binding");
        assert!(!k.verify_route("c", &["t"], &signed), "not a Record-Route");
        let rr = format!("{uri}{ROUTE_MAC_PARAM}{}", k.route_mac("c", "t", uri));
        assert!(
            !k.verify_owner_route("c", "t", &rr),
            "a Record-Route is not one"
        );
        assert!(!k.verify_owner_route("c", "t", uri));
    }

    #[test]
    fn macs_are_the_leading_hex_of_the_hmac_over_the_text() {
        let k = RouteKey::from_bytes([9; 32]);
        let core = "z9hG4bK-se-0011aabb-0123456789abcdef";
        for up in ["203.0.113.4:41000", "[2001:db8::1]:5060"] {
            let up: SocketAddr = up.parse().unwrap();
            let text = up.to_string();
            let full = hex(&hmac_sha256(
                &[9; 32],
                &[b"br\0", core.as_bytes(), b"\0", text.as_bytes()],
            ));
            assert_eq!(k.branch_mac(core, up).as_str(), &full[..BRANCH_MAC_HEX]);
        }
        let uri = "sip:192.0.2.1:5060;lr";
        let full = hex(&hmac_sha256(
            &[9; 32],
            &[b"rr\0", b"c", b"\0", b"t", b"\0", uri.as_bytes()],
        ));
        let mac = k.route_mac("c", "t", uri);
        assert_eq!(mac.as_str(), &full[..ROUTE_MAC_HEX]);
        assert_eq!(mac.to_string(), mac.as_str());
    }

    #[test]
    fn branch_mac_binds_the_upstream_hop() {
        let k = key();
        let up: SocketAddr = "203.0.113.4:41000".parse().unwrap();
        let core = "z9hG4bK-se-0011aabb-0123456789abcdef";
        let branch = format!("{core}-{}", k.branch_mac(core, up));
        assert!(k.verify_branch(&branch, up));
        assert!(!k.verify_branch(&branch, "198.51.100.9:5060".parse().unwrap()));
        assert!(!k.verify_branch(core, up));
        assert!(!k.verify_branch("z9hG4bKabc", up));
        assert!(!k.verify_branch("", up));
    }
}
