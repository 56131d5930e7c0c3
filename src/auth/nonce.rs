//! Server nonces and nonce-count replay detection (RFC 7616 §3.3 and §3.4, RFC 3261 §22.4).
//!
//! A nonce is stateless: `hex(issued_at || salt || MAC)` where `issued_at` is the unix time in
//! seconds (u64, big-endian), `salt` a caller-supplied u64 (a counter: two nonces issued in the
//! same second differ), and `MAC` the first 16 bytes of HMAC-SHA256(key, issued_at || salt ||
//! realm) (RFC 2104). Any instance holding the key can check a nonce without a lookup; the
//! timestamp lets the server answer `stale=true` once it is older than the nonce TTL, as
//! RFC 7616 §3.3 suggests ("a nonce might ... include a time-stamp").
//!
//! A stateless nonce can be replayed while it is fresh, so [`ReplayGuard`] remembers, per
//! nonce, the highest nonce count (`nc`) accepted; RFC 7616 §3.4: "the server ... can detect
//! request replays by maintaining its own copy of this count". Its memory is bounded.
//!
//! Pure: time comes in as `now`, unix seconds. The only I/O is [`NonceKey::generate`].

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;

use hmac::{Hmac, KeyInit, Mac as _};
use sha2::Sha256;

use super::{ct_eq, to_hex};

/// How far in the future a nonce's timestamp may be (clock skew between instances sharing the
/// key), in seconds.
const MAX_SKEW: u64 = 5;
/// Bytes of the truncated MAC in a nonce.
const MAC_LEN: usize = 16;
/// Bytes of a decoded nonce: issued_at, salt, MAC.
const NONCE_LEN: usize = 8 + 8 + MAC_LEN;

/// The per-install secret that authenticates nonces (32 bytes). Instances that share a
/// location store should share it, so that a nonce issued by one is accepted by another.
#[derive(Clone)]
pub struct NonceKey {
    bytes: [u8; 32],
    /// The HMAC state after the key was absorbed: each nonce MAC clones it instead of hashing
    /// the two key blocks again, which halves the cost of issuing and of checking a nonce
    /// (two of each per registration; issue #15).
    keyed: Hmac<Sha256>,
}

impl NonceKey {
    /// A key from stored bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        // invariant: HMAC accepts keys of any length.
        #[allow(clippy::expect_used)]
        let keyed =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&bytes).expect("HMAC takes any key length");
        Self { bytes, keyed }
    }

    /// A fresh random key, read from `/dev/urandom`.
    pub fn generate() -> std::io::Result<Self> {
        let mut b = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        Ok(Self::from_bytes(b))
    }

    /// The key bytes, for storing.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl PartialEq for NonceKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for NonceKey {}

/// Never prints the secret.
impl fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

/// Issues a nonce for `realm` at `now` (unix seconds): 64 lower-case hex digits.
pub fn issue(key: &NonceKey, now: u64, salt: u64, realm: &str) -> String {
    let mac = nonce_mac(key, now, salt, realm);
    let mut raw = [0u8; NONCE_LEN];
    let fields = now.to_be_bytes().into_iter().chain(salt.to_be_bytes());
    for (dst, src) in raw.iter_mut().zip(fields.chain(mac)) {
        *dst = src;
    }
    to_hex(&raw)
}

/// A valid nonce as [`ReplayGuard`] remembers it: 16 bytes instead of its 64 hex digits.
///
/// `tag` is the first 8 bytes of the nonce's MAC. Two valid nonces issued in the same second
/// share a tag with probability 2⁻⁶⁴, and nobody without the key can make one that does, so
/// `(issued, tag)` names one nonce. Ordered by issue time first, so the oldest comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NonceId {
    /// When the nonce was issued (unix seconds).
    pub issued: u64,
    tag: u64,
}

/// What a nonce sent back by a client is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceStatus {
    /// Issued by us, for this realm, within the TTL; the id is the key for
    /// [`ReplayGuard::accept`].
    Valid(NonceId),
    /// Issued by us for this realm but older than the TTL: challenge again with `stale=true`
    /// (RFC 7616 §3.3), and the client retries without asking its user.
    Stale,
    /// Not one of ours: bad format, MAC mismatch (forged, tampered, another key or another
    /// realm) or issued more than 5 s in the future. Challenge again without `stale`.
    Invalid,
}

/// Checks a nonce for `realm` at `now` (unix seconds) against a TTL in seconds. A nonce is
/// still valid exactly `ttl` seconds after issue, stale one second later.
///
/// Only the exact text [`issue`] produced is accepted (lower-case hex), so that one nonce has
/// one spelling and [`ReplayGuard`] cannot be bypassed by changing its case.
pub fn check(key: &NonceKey, nonce: &str, now: u64, ttl: u64, realm: &str) -> NonceStatus {
    let Some(raw) = decode(nonce) else {
        return NonceStatus::Invalid;
    };
    let issued = be_u64(&raw[..8]);
    let salt = be_u64(&raw[8..16]);
    let mac = nonce_mac(key, issued, salt, realm);
    if !ct_eq(&raw[16..], &mac) {
        return NonceStatus::Invalid;
    }
    if issued > now.saturating_add(MAX_SKEW) {
        return NonceStatus::Invalid;
    }
    if now.saturating_sub(issued) > ttl {
        return NonceStatus::Stale;
    }
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&raw[16..24]);
    NonceStatus::Valid(NonceId {
        issued,
        tag: u64::from_be_bytes(tag),
    })
}

/// The truncated MAC of a nonce. The realm goes last: the fields before it have a fixed size,
/// so the MAC input is unambiguous.
fn nonce_mac(key: &NonceKey, issued: u64, salt: u64, realm: &str) -> [u8; MAC_LEN] {
    let mut state = key.keyed.clone();
    state.update(&issued.to_be_bytes());
    state.update(&salt.to_be_bytes());
    state.update(realm.as_bytes());
    let full: [u8; 32] = state.finalize().into_bytes().into();
    let mut mac = [0u8; MAC_LEN];
    for (dst, src) in mac.iter_mut().zip(full) {
        *dst = src;
    }
    mac
}

/// Decodes the 64 lower-case hex digits of a nonce.
fn decode(nonce: &str) -> Option<[u8; NONCE_LEN]> {
    let b = nonce.as_bytes();
    if b.len() != 2 * NONCE_LEN {
        return None;
    }
    let mut out = [0u8; NONCE_LEN];
    for (dst, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        *dst = (nibble(*hi)? << 4) | nibble(*lo)?;
    }
    Some(out)
}

/// One lower-case hex digit.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// A big-endian integer from up to 8 bytes.
fn be_u64(b: &[u8]) -> u64 {
    b.iter().fold(0, |n, &x| (n << 8) | u64::from(x))
}

/// Nonce-count replay detection: per nonce, the highest `nc` accepted (RFC 7616 §3.4).
///
/// Memory is bounded: at most `capacity` nonces are tracked, and nonces older than `ttl` (which
/// [`check`] calls stale anyway) are purged on every call. When a new nonce arrives at capacity,
/// the oldest tracked nonce is evicted, and from then on any untracked nonce issued at or before
/// the evicted one's time is refused: otherwise flooding the guard with fresh nonces would
/// make it forget a nonce whose requests could then be replayed. A refused client is
/// challenged again and retries with a fresh nonce.
///
/// One tracked nonce costs about 30 bytes (a 16-byte [`NonceId`] and a 4-byte count in a
/// B-tree node); keyed by the nonce's text it cost about 130 (issue #15: a registration burst
/// filled the guard to 35 MB).
#[derive(Debug)]
pub struct ReplayGuard {
    capacity: usize,
    ttl: u64,
    /// Nonce → highest nc accepted; ordered so that the oldest nonce comes first.
    seen: BTreeMap<NonceId, u32>,
    /// Issue time of the newest nonce evicted for capacity, if any.
    evicted_through: Option<u64>,
}

impl ReplayGuard {
    /// A guard tracking at most `capacity` nonces (at least 1) for `ttl` seconds each (use the
    /// nonce TTL).
    pub fn new(capacity: usize, ttl: u64) -> Self {
        Self {
            capacity: capacity.max(1),
            ttl,
            seen: BTreeMap::new(),
            evicted_through: None,
        }
    }

    /// True if `nc` is greater than any nc seen for the nonce `id`, and then records it; false
    /// is a replay (or a nonce this guard can no longer vouch for: expired, or evicted). `id`
    /// comes from [`NonceStatus::Valid`]; `now` is unix seconds.
    pub fn accept(&mut self, id: NonceId, nc: u32, now: u64) -> bool {
        self.purge(now);
        if now.saturating_sub(id.issued) > self.ttl {
            return false;
        }
        if let Some(highest) = self.seen.get_mut(&id) {
            if nc > *highest {
                *highest = nc;
                return true;
            }
            return false;
        }
        if self.evicted_through.is_some_and(|t| id.issued <= t) {
            return false;
        }
        while self.seen.len() >= self.capacity {
            match self.seen.pop_first() {
                Some((old, _)) => {
                    self.evicted_through = Some(
                        self.evicted_through
                            .map_or(old.issued, |e| e.max(old.issued)),
                    );
                }
                None => break,
            }
        }
        self.seen.insert(id, nc);
        true
    }

    /// Number of nonces tracked.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no nonce is tracked.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Drops the nonces older than the TTL (oldest first, so this stops at the first fresh one).
    fn purge(&mut self, now: u64) {
        loop {
            match self.seen.first_key_value() {
                Some((old, _)) if now.saturating_sub(old.issued) > self.ttl => {
                    self.seen.pop_first();
                }
                _ => break,
            }
        }
        if self
            .evicted_through
            .is_some_and(|t| now.saturating_sub(t) > self.ttl)
        {
            // Every nonce the mark covers is expired now; the expiry check refuses them.
            self.evicted_through = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;
    const TTL: u64 = 300;
    const REALM: &str = "example.com";

    fn key() -> NonceKey {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        NonceKey::from_bytes(b)
    }

    /// The MAC from the kept key state is the RFC 2104 HMAC of the key bytes: nonces issued
    /// by an instance of another version sharing the store (or before a restart) still verify.
    #[test]
    fn the_kept_key_state_gives_the_plain_hmac() {
        let k = key();
        let plain = crate::auth::mac::hmac_sha256(
            k.as_bytes(),
            &[&NOW.to_be_bytes(), &7u64.to_be_bytes(), REALM.as_bytes()],
        );
        assert_eq!(nonce_mac(&k, NOW, 7, REALM)[..], plain[..MAC_LEN]);
        assert_eq!(&issue(&k, NOW, 7, REALM)[32..], to_hex(&plain[..MAC_LEN]));
    }

    /// The issue time `check` found valid, if it did.
    fn issued(s: NonceStatus) -> Option<u64> {
        match s {
            NonceStatus::Valid(id) => Some(id.issued),
            _ => None,
        }
    }

    /// A test nonce id: `name` stands for the MAC.
    fn id(name: &str, issued: u64) -> NonceId {
        let mut tag = [0u8; 8];
        for (t, b) in tag.iter_mut().zip(name.bytes()) {
            *t = b;
        }
        NonceId {
            issued,
            tag: u64::from_be_bytes(tag),
        }
    }

    #[test]
    fn nonce_layout() {
        // Computed independently with Python's hmac module.
        let n = issue(&key(), NOW, 7, REALM);
        assert_eq!(
            n,
            "000000006553f1000000000000000007bb7b2bd2dd2d2a8f117d0c1ad908dcc5"
        );
        assert_eq!(&n[..16], format!("{NOW:016x}"));
        assert_eq!(&n[16..32], "0000000000000007");
        // Another salt, another nonce, in the same second.
        assert_ne!(issue(&key(), NOW, 8, REALM), n);
    }

    #[test]
    fn valid_until_ttl_then_stale() {
        let k = key();
        let n = issue(&k, NOW, 1, REALM);
        assert_eq!(issued(check(&k, &n, NOW, TTL, REALM)), Some(NOW));
        assert_eq!(issued(check(&k, &n, NOW + TTL, TTL, REALM)), Some(NOW));
        assert_eq!(check(&k, &n, NOW + TTL + 1, TTL, REALM), NonceStatus::Stale);
        assert_eq!(check(&k, &n, u64::MAX, TTL, REALM), NonceStatus::Stale);
    }

    #[test]
    fn every_tampered_character_is_invalid() {
        let k = key();
        let n = issue(&k, NOW, 1, REALM);
        for i in 0..n.len() {
            let mut b = n.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            let t = String::from_utf8(b).unwrap();
            assert_eq!(check(&k, &t, NOW, TTL, REALM), NonceStatus::Invalid, "{i}");
        }
        // An old forged timestamp is Invalid, not Stale: only our nonces go stale.
        let forged = format!("{:016x}{}", NOW - 10 * TTL, &n[16..]);
        assert_eq!(check(&k, &forged, NOW, TTL, REALM), NonceStatus::Invalid);
        // Upper case is another spelling of the same bytes: refused.
        assert_eq!(
            check(&k, &n.to_uppercase(), NOW, TTL, REALM),
            NonceStatus::Invalid
        );
    }

    #[test]
    fn other_realm_or_key_is_invalid() {
        let k = key();
        let n = issue(&k, NOW, 1, REALM);
        assert_eq!(check(&k, &n, NOW, TTL, "example.org"), NonceStatus::Invalid);
        assert_eq!(check(&k, &n, NOW, TTL, ""), NonceStatus::Invalid);
        let other = NonceKey::from_bytes([0x42; 32]);
        assert_eq!(check(&other, &n, NOW, TTL, REALM), NonceStatus::Invalid);
    }

    #[test]
    fn future_timestamps_beyond_the_skew_are_invalid() {
        let k = key();
        let soon = issue(&k, NOW + MAX_SKEW, 1, REALM);
        assert_eq!(
            issued(check(&k, &soon, NOW, TTL, REALM)),
            Some(NOW + MAX_SKEW)
        );
        let later = issue(&k, NOW + MAX_SKEW + 1, 1, REALM);
        assert_eq!(check(&k, &later, NOW, TTL, REALM), NonceStatus::Invalid);
        let far = issue(&k, u64::MAX, 1, REALM);
        assert_eq!(check(&k, &far, NOW, TTL, REALM), NonceStatus::Invalid);
    }

    #[test]
    fn garbage_is_invalid_and_never_panics() {
        let k = key();
        let n = issue(&k, NOW, 1, REALM);
        for g in [
            "",
            "0",
            "zz",
            &n[..63],
            format!("{n}0").as_str(),
            format!(" {}", &n[1..]).as_str(),
            "é000000000000000000000000000000000000000000000000000000000000000",
            "ééééééééééééééééééééééééééééééééé",
        ] {
            assert_eq!(check(&k, g, NOW, TTL, REALM), NonceStatus::Invalid, "{g:?}");
        }
        let mut state: u64 = 0x5eed;
        for _ in 0..5_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let len = (state >> 58) as usize + 40;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (state.rotate_left(i as u32 * 7) >> 56) as u8)
                .collect();
            let s = String::from_utf8_lossy(&bytes);
            assert_eq!(check(&k, &s, NOW, TTL, REALM), NonceStatus::Invalid);
        }
    }

    #[test]
    fn keys() {
        let k = key();
        assert_eq!(k.as_bytes()[31], 31);
        assert_eq!(NonceKey::from_bytes(*k.as_bytes()), k);
        assert_eq!(format!("{k:?}"), "NonceKey(..)");
        let a = NonceKey::generate().unwrap();
        let b = NonceKey::generate().unwrap();
        assert_ne!(a, b);
        assert_ne!(a.as_bytes(), &[0u8; 32]);
    }

    #[test]
    fn one_nonce_one_id() {
        // Two nonces of the same second are two ids; one nonce checked twice is one id, so
        // the guard sees its second use as a replay.
        let k = key();
        let ids: Vec<NonceId> = [1, 2, 1]
            .map(
                |salt| match check(&k, &issue(&k, NOW, salt, REALM), NOW, TTL, REALM) {
                    NonceStatus::Valid(id) => id,
                    other => panic!("{other:?}"),
                },
            )
            .into();
        assert_ne!(ids[0], ids[1]);
        assert_eq!(ids[0], ids[2]);
        let mut g = ReplayGuard::new(10, TTL);
        assert!(g.accept(ids[0], 1, NOW));
        assert!(g.accept(ids[1], 1, NOW));
        assert!(!g.accept(ids[2], 1, NOW));
        assert_eq!(g.len(), 2);
    }

    #[test]
    fn replay_guard_wants_increasing_nc() {
        let mut g = ReplayGuard::new(10, TTL);
        assert!(g.is_empty());
        assert!(g.accept(id("a", NOW), 1, NOW));
        assert!(g.accept(id("a", NOW), 2, NOW));
        assert!(!g.accept(id("a", NOW), 2, NOW + 1));
        assert!(!g.accept(id("a", NOW), 1, NOW + 1));
        // A gap is fine (a request may have been lost); going back below it is not.
        assert!(g.accept(id("a", NOW), 5, NOW + 1));
        assert!(!g.accept(id("a", NOW), 3, NOW + 1));
        // Each nonce has its own count.
        assert!(g.accept(id("b", NOW), 1, NOW + 1));
        assert!(!g.accept(id("b", NOW), 1, NOW + 1));
        assert_eq!(g.len(), 2);
        assert!(!g.is_empty());
    }

    #[test]
    fn replay_guard_evicts_the_oldest_at_capacity() {
        let mut g = ReplayGuard::new(2, TTL);
        assert!(g.accept(id("a", NOW), 1, NOW));
        assert!(g.accept(id("b", NOW + 1), 1, NOW + 1));
        assert!(g.accept(id("c", NOW + 2), 1, NOW + 2));
        assert_eq!(g.len(), 2);
        // "a" was evicted; it is refused rather than forgotten, so no replay gets through.
        assert!(!g.accept(id("a", NOW), 1, NOW + 3));
        assert!(!g.accept(id("a", NOW), 9, NOW + 3));
        // "b" and "c" are still tracked.
        assert!(!g.accept(id("b", NOW + 1), 1, NOW + 3));
        assert!(g.accept(id("b", NOW + 1), 2, NOW + 3));
        assert!(!g.accept(id("c", NOW + 2), 1, NOW + 3));
        assert!(g.accept(id("c", NOW + 2), 2, NOW + 3));
        // A newer nonce evicts "b" next.
        assert!(g.accept(id("d", NOW + 3), 1, NOW + 3));
        assert_eq!(g.len(), 2);
        assert!(!g.accept(id("b", NOW + 1), 3, NOW + 3));
        assert!(g.accept(id("c", NOW + 2), 3, NOW + 3));
        assert!(g.accept(id("d", NOW + 3), 2, NOW + 3));

        // Capacity 0 is taken as 1.
        let mut one = ReplayGuard::new(0, TTL);
        assert!(one.accept(id("x", NOW), 1, NOW));
        assert!(!one.accept(id("x", NOW), 1, NOW));
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn replay_guard_purges_expired() {
        let mut g = ReplayGuard::new(10, 30);
        assert!(g.accept(id("a", NOW), 1, NOW));
        assert!(g.accept(id("b", NOW + 10), 1, NOW + 10));
        assert_eq!(g.len(), 2);
        // At NOW+30 "a" is exactly ttl old: kept.
        assert!(g.accept(id("c", NOW + 30), 1, NOW + 30));
        assert_eq!(g.len(), 3);
        // One second later it is purged, and refused as expired.
        assert!(g.accept(id("d", NOW + 31), 1, NOW + 31));
        assert_eq!(g.len(), 3);
        assert!(!g.accept(id("a", NOW), 2, NOW + 31));
        assert_eq!(g.len(), 3);
        // Much later everything is gone, and an expired nonce is not recorded.
        assert!(!g.accept(id("e", NOW), 1, NOW + 1000));
        assert!(g.is_empty());
        // The eviction mark expires with the nonces it covers.
        let mut h = ReplayGuard::new(1, 30);
        assert!(h.accept(id("a", NOW), 1, NOW));
        assert!(h.accept(id("b", NOW + 1), 1, NOW + 1));
        assert!(!h.accept(id("a2", NOW), 1, NOW + 1));
        assert!(h.accept(id("c", NOW + 100), 1, NOW + 100));
        assert_eq!(h.len(), 1);
    }
}
