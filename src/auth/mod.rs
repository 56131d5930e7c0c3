//! SIP digest authentication, the pure parts: reading credentials, computing and checking the
//! response, writing challenges, and the nonces those challenges carry.
//!
//! - [`digest`]: the `Authorization` / `Proxy-Authorization` grammar and the digest computation
//!   of RFC 3261 §22.4 (which points at RFC 2617, now RFC 7616 §3.4), with MD5 and SHA-256
//!   (RFC 8760 §2 adds SHA-256 to SIP); the `WWW-Authenticate` / `Proxy-Authenticate`
//!   challenge of RFC 7616 §3.3.
//! - [`mac`]: the MACs that make our Record-Route and Via branch tamper-proof (HMAC-SHA256
//!   with a key derived from the per-install secret).
//! - [`nonce`]: stateless server nonces (a timestamp and an HMAC, so any instance with the key
//!   can check them, RFC 7616 §3.3 "nonce") and the bounded nonce-count replay guard
//!   (RFC 7616 §3.4 "nc").
//!
//! Nothing here reads a socket or a clock: time comes in as `now` (unix seconds). The one I/O
//! call is [`nonce::NonceKey::generate`], which reads the key from `/dev/urandom` once at
//! start-up.

pub mod digest;
pub mod mac;
pub mod nonce;
pub mod service;

/// Lower-case hex of `bytes` (RFC 7616 §3.4.1: digests are written as 32 or 64 lower-case hex
/// digits).
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for i in 0..bytes.len() * 2 {
        s.push(char::from(hex_digit(bytes, i)));
    }
    s
}

/// The `i`-th lower-case hex digit of `bytes` (two per byte, high nibble first).
pub(crate) fn hex_digit(bytes: &[u8], i: usize) -> u8 {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let b = bytes[i / 2];
    let nibble = if i % 2 == 0 { b >> 4 } else { b & 0x0f };
    DIGITS[usize::from(nibble)]
}

/// Compares two byte strings in time that depends only on their lengths (which are public: a
/// digest or MAC has a fixed size), so that a mismatch does not reveal how many leading bytes
/// were right.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_and_padded() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(to_hex(&[]), "");
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(!ct_eq(b"xbc", b"abc"));
    }
}
