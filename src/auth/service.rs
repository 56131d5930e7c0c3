//! The I/O side of digest authentication, shared by the registrar (`www_authorize`, 401) and
//! the proxy (`proxy_authorize`, 407): find the credentials for our realm, check the nonce,
//! look the subscriber up in the store, verify the response, refuse replayed nonce counts.
//!
//! Every failed attempt is reported to [`Security`] (a security event line, and the counts
//! that ban a source or lock a user); a locked user or a source banned by this very failure
//! gets 403 instead of a new challenge.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Mutex;
use tracing::{debug, error};

use super::digest::{self, Credentials};
use super::nonce::{self, NonceKey, NonceStatus, ReplayGuard};
use crate::clock::Clock;
use crate::config::{AuthConfig, DigestAlgorithm};
use crate::security::Security;
use crate::sip::{HeaderName, Message};
use crate::store::{Store, Subscriber};
use dashmap::DashMap;

/// Nonces tracked for nc replay detection.
const REPLAY_CAPACITY: usize = 262_144;

/// Which challenge: 401/WWW-Authenticate or 407/Proxy-Authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Www,
    Proxy,
}

impl Kind {
    fn credentials_header(self) -> HeaderName {
        match self {
            Self::Www => HeaderName::Authorization,
            Self::Proxy => HeaderName::ProxyAuthorization,
        }
    }

    /// The status, reason and challenge header of a challenge of this kind.
    pub fn challenge_status(self) -> (u16, &'static str, &'static str) {
        match self {
            Self::Www => (401, "Unauthorized", "WWW-Authenticate"),
            Self::Proxy => (407, "Proxy Authentication Required", "Proxy-Authenticate"),
        }
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The request carries valid credentials of this subscriber (with its caller ID, for
    /// the identity a route asserts).
    Authorized {
        username: String,
        caller_id: Option<String>,
    },
    /// Challenge (again); `stale` when the credentials were right but the nonce expired.
    Challenge { stale: bool },
    /// The store failed: answer 500.
    StoreError,
    /// Answer this final response, without a challenge: 400 when the digest `uri` is not the
    /// Request-URI (RFC 7616 §3.4.6), 403 when the user is locked or the source was just
    /// banned for failed authentications.
    Refuse { status: u16, reason: &'static str },
}

/// The reason phrase of a refusal for a locked user or a banned source.
const LOCKED: &str = "Forbidden: too many failed authentications";

/// Seconds a subscriber's hashes are reused from memory before the store is asked again.
const HA1_CACHE_TTL: u64 = 30;
/// Subscribers kept in that cache at most.
const HA1_CACHE_CAPACITY: usize = 100_000;

/// Shared authenticator state.
pub struct Authenticator {
    cfg: AuthConfig,
    store: Store,
    key: NonceKey,
    replay: Mutex<ReplayGuard>,
    /// (username, domain) → (subscriber, unix time read): saves the store round trip on every
    /// authenticated request of an active phone.
    cache: DashMap<(String, String), (Arc<Subscriber>, u64)>,
    /// Failed-attempt counts, bans and locks, shared with the transport entry point.
    security: Arc<Security>,
    /// Monotonic time for `security`.
    clock: Arc<dyn Clock>,
}

impl Authenticator {
    pub fn new(
        cfg: AuthConfig,
        store: Store,
        key: NonceKey,
        security: Arc<Security>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let replay = Mutex::new(ReplayGuard::new(REPLAY_CAPACITY, cfg.nonce_ttl.as_secs()));
        Self {
            cfg,
            store,
            key,
            replay,
            cache: DashMap::new(),
            security,
            clock,
        }
    }

    fn cached(&self, username: &str, domain: &str, now: u64) -> Option<Arc<Subscriber>> {
        let key = (username.to_owned(), domain.to_owned());
        let entry = self.cache.get(&key)?;
        let (sub, at) = entry.value();
        (now < at + HA1_CACHE_TTL).then(|| sub.clone())
    }

    fn remember(&self, sub: Arc<Subscriber>, now: u64) {
        if self.cache.len() >= HA1_CACHE_CAPACITY {
            self.cache.retain(|_, (_, at)| now < *at + HA1_CACHE_TTL);
            if self.cache.len() >= HA1_CACHE_CAPACITY {
                return;
            }
        }
        self.cache
            .insert((sub.username.clone(), sub.domain.clone()), (sub, now));
    }

    /// The realm for a request whose relevant domain (To for REGISTER, From otherwise) is
    /// `domain`: `auth.realm`, or the domain when it is empty.
    pub fn realm<'a>(&'a self, domain: &'a str) -> &'a str {
        self.cfg.realm.as_deref().unwrap_or(domain)
    }

    /// Checks the credentials of `msg` (received from `peer`) for `realm` against the
    /// subscriber `(username, domain)`.
    ///
    /// Counted as a failure (and logged as `auth_failed`): a wrong response, an unknown user, a
    /// digest `uri` that is not the Request-URI, an algorithm we did not offer. Not counted: no
    /// credentials for our realm, a nonce that is not ours or expired (the client answers a new
    /// challenge), a replayed nonce count (logged as `nonce_replay`: the response was right).
    pub async fn check(
        &self,
        msg: &Message,
        peer: SocketAddr,
        kind: Kind,
        realm: &str,
        domain: &str,
        now: u64,
    ) -> Outcome {
        let Some(creds) = Self::credentials(msg, kind, realm) else {
            return Outcome::Challenge { stale: false };
        };
        let ttl = self.cfg.nonce_ttl.as_secs();
        let nonce_id = match nonce::check(&self.key, &creds.nonce, now, ttl, realm) {
            NonceStatus::Valid(id) => id,
            NonceStatus::Stale => return Outcome::Challenge { stale: true },
            NonceStatus::Invalid => {
                debug!(user = %creds.username, "nonce not ours");
                return Outcome::Challenge { stale: false };
            }
        };
        let mono = self.clock.now();
        let failed = |reason: &'static str, known_user: bool| {
            let known_domain = known_user.then_some(domain);
            let v =
                self.security
                    .auth_failed(peer, &creds.username, known_domain, realm, reason, mono);
            if v.source_banned || v.user_locked {
                Outcome::Refuse {
                    status: 403,
                    reason: LOCKED,
                }
            } else {
                Outcome::Challenge { stale: false }
            }
        };
        // RFC 7616 §3.4.6: the response must be for this request's URI, else it may be one
        // captured from another request. 400, as the RFC says: a client that hashes another
        // URI would fail again on every new challenge.
        let request_uri = msg.request_uri().unwrap_or_default();
        if !digest::uri_matches(&creds.uri, request_uri) {
            return match failed("uri_mismatch", false) {
                Outcome::Challenge { .. } => Outcome::Refuse {
                    status: 400,
                    reason: "Bad Request: digest uri is not the Request-URI",
                },
                refused => refused,
            };
        }
        // Only what we offered: a client may not pick a weaker (or any other) algorithm. A new
        // challenge lists the offered ones.
        if !self.cfg.algorithms.contains(&creds.algorithm) {
            return failed("algorithm_not_offered", false);
        }
        if self
            .security
            .user_locked(peer, &creds.username, domain, realm, mono)
        {
            return Outcome::Refuse {
                status: 403,
                reason: LOCKED,
            };
        }
        let method = msg.method().unwrap_or_default();
        let verify = |sub: &Subscriber| {
            let ha1 = match creds.algorithm {
                DigestAlgorithm::Md5 => Some(&sub.ha1_md5),
                DigestAlgorithm::Sha256 => sub.ha1_sha256.as_ref(),
            };
            ha1.map(|ha1| digest::verify(ha1, method, &creds))
        };
        // A cached entry that verifies is enough; one that does not is read again from the
        // store, so a new password works at once (an old one keeps working until the entry
        // ages out, at most HA1_CACHE_TTL).
        let cached = self.cached(&creds.username, domain, now);
        let (verified, sub) = match cached {
            Some(sub) if verify(&sub) == Some(true) => (Some(true), sub),
            // Boxed: the store's future is large and only a cache miss needs it; inline it
            // would make every REGISTER's and INVITE's task that much bigger.
            _ => match Box::pin(self.store.subscriber(&creds.username, domain)).await {
                Err(e) => {
                    error!(error = %e, "subscriber lookup failed");
                    return Outcome::StoreError;
                }
                Ok(None) => {
                    self.cache
                        .remove(&(creds.username.to_string(), domain.to_owned()));
                    return failed("unknown_user", false);
                }
                Ok(Some(sub)) => {
                    let sub = Arc::new(sub);
                    let ok = verify(&sub);
                    self.remember(sub.clone(), now);
                    (ok, sub)
                }
            },
        };
        let Some(verified) = verified else {
            // A SHA-256 response for a subscriber imported with an MD5 HA1 only: not a wrong
            // password (we cannot tell), so not counted; the new challenge offers MD5 alone
            // (see `challenge_for`).
            debug!(user = %creds.username, "no SHA-256 HA1 for this subscriber yet");
            return Outcome::Challenge { stale: false };
        };
        if !verified {
            return failed("password", true);
        }
        // Without qop (RFC 2069 clients) there is no nonce count: such a nonce is good once.
        let nc = creds.nc.unwrap_or(1);
        if !self.replay.lock().await.accept(nonce_id, nc, now) {
            self.security
                .nonce_replay(peer, &creds.username, realm, nc, mono);
            return Outcome::Challenge { stale: true };
        }
        self.security.auth_ok(peer, &creds.username, domain);
        Outcome::Authorized {
            username: creds.username.into_owned(),
            caller_id: sub.caller_id.clone(),
        }
    }

    /// The credentials `msg` offers for `realm`, if any parse.
    fn credentials<'m>(msg: &'m Message, kind: Kind, realm: &str) -> Option<Credentials<'m>> {
        msg.headers_named(kind.credentials_header())
            .filter_map(|h| msg.str_at(h.value.clone()))
            .filter_map(|v| digest::parse_credentials(v).ok())
            .find(|c| c.realm == realm)
    }

    /// The challenge for `msg` when it can be given at once: `msg` offers no credentials for
    /// `realm` (so [`Self::check`] would answer `Challenge { stale: false }` without looking
    /// anything up) and [`Self::challenge_for`] needs no store read for `user@domain`. `None`
    /// otherwise: the caller takes the async path.
    pub fn challenge_now(
        &self,
        msg: &Message,
        kind: Kind,
        realm: &str,
        user: &str,
        domain: &str,
        now: u64,
    ) -> Option<Vec<(&'static str, String)>> {
        if Self::credentials(msg, kind, realm).is_some() {
            return None;
        }
        self.challenge_known(kind, realm, Some(user), domain, now, false)
    }

    /// [`Self::challenge_for`] when it needs no store read: one algorithm configured, no
    /// user, or the user's hashes in memory. `None`: the subscriber must be read.
    fn challenge_known(
        &self,
        kind: Kind,
        realm: &str,
        user: Option<&str>,
        domain: &str,
        now: u64,
        stale: bool,
    ) -> Option<Vec<(&'static str, String)>> {
        let both = self.cfg.algorithms.contains(&DigestAlgorithm::Md5)
            && self.cfg.algorithms.contains(&DigestAlgorithm::Sha256);
        let Some(user) = user.filter(|_| both) else {
            return Some(self.challenge(kind, realm, now, stale));
        };
        let sub = self.cached(user, domain, now)?;
        Some(self.challenge_by(&sub, kind, realm, now, stale))
    }

    /// The challenge for a known subscriber: MD5 alone when it has no SHA-256 HA1.
    fn challenge_by(
        &self,
        sub: &Subscriber,
        kind: Kind,
        realm: &str,
        now: u64,
        stale: bool,
    ) -> Vec<(&'static str, String)> {
        if sub.ha1_sha256.is_none() {
            self.challenge_with(kind, realm, now, stale, &[DigestAlgorithm::Md5])
        } else {
            self.challenge(kind, realm, now, stale)
        }
    }

    /// The challenge for a request whose user (To for REGISTER, From otherwise) is
    /// `user@domain`: [`Self::challenge`], except that a subscriber without a SHA-256 HA1
    /// (imported from Kamailio with an MD5 HA1, password not set since) is offered MD5 alone
    /// when MD5 is configured, so that a client preferring SHA-256 does not answer with a
    /// response we cannot check. An unknown user, or a store error, gets the full challenge.
    pub async fn challenge_for(
        &self,
        kind: Kind,
        realm: &str,
        user: Option<&str>,
        domain: &str,
        now: u64,
        stale: bool,
    ) -> Vec<(&'static str, String)> {
        if let Some(c) = self.challenge_known(kind, realm, user, domain, now, stale) {
            return c;
        }
        // Only a user whose hashes are not in memory gets here.
        let read = match user {
            Some(user) => Box::pin(self.store.subscriber(user, domain)).await,
            None => Ok(None),
        };
        match read {
            Ok(Some(sub)) => {
                let sub = Arc::new(sub);
                self.remember(sub.clone(), now);
                self.challenge_by(&sub, kind, realm, now, stale)
            }
            Ok(None) | Err(_) => self.challenge(kind, realm, now, stale),
        }
    }

    /// The challenge headers: one per configured algorithm, in the configured order.
    pub fn challenge(
        &self,
        kind: Kind,
        realm: &str,
        now: u64,
        stale: bool,
    ) -> Vec<(&'static str, String)> {
        self.challenge_with(kind, realm, now, stale, &self.cfg.algorithms)
    }

    /// One challenge header per algorithm of `algorithms`, all with the same nonce.
    fn challenge_with(
        &self,
        kind: Kind,
        realm: &str,
        now: u64,
        stale: bool,
        algorithms: &[DigestAlgorithm],
    ) -> Vec<(&'static str, String)> {
        static SALT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let salt = SALT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = nonce::issue(&self.key, now, salt, realm);
        let (_, _, header) = kind.challenge_status();
        algorithms
            .iter()
            .map(|alg| (header, digest::challenge(*alg, realm, &n, "", stale)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::digest::{expected_response, ha1, parse_credentials};
    use crate::clock::SystemClock;
    use crate::config::Config;
    use crate::sip::Framing;

    const REALM: &str = "example.com";
    const NOW: u64 = 1_700_000_000;

    /// An authenticator on a fresh SQLite file holding alice (password "s3cret"), with
    /// `auth_extra` in `[auth]` and `security_extra` in `[security]`.
    async fn authenticator(
        auth_extra: &str,
        security_extra: &str,
    ) -> (Authenticator, Arc<Security>) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "sipedge-auth-{}-{}.sqlite",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let cfg = Config::from_toml(
            &format!("[auth]\n{auth_extra}\n[security]\ntrusted = []\n{security_extra}"),
            || "192.0.2.10".parse().unwrap(),
        )
        .unwrap();
        let store = Store::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
            .add_subscriber(&Subscriber {
                username: "alice".into(),
                domain: REALM.into(),
                ha1_md5: ha1(DigestAlgorithm::Md5, "alice", REALM, "s3cret"),
                ha1_sha256: Some(ha1(DigestAlgorithm::Sha256, "alice", REALM, "s3cret")),
                created: 0,
                caller_id: None,
            })
            .await
            .unwrap();
        let security = Arc::new(Security::new(
            cfg.security.clone(),
            tokio::time::Instant::now(),
        ));
        let auth = Authenticator::new(
            cfg.auth,
            store,
            NonceKey::from_bytes([7; 32]),
            security.clone(),
            Arc::new(SystemClock),
        );
        (auth, security)
    }

    /// A REGISTER to `sip:example.com` answering a fresh challenge of `auth`, hashed with
    /// `alg`, `password` and digest `uri`.
    fn register(auth: &Authenticator, alg: DigestAlgorithm, password: &str, uri: &str) -> Message {
        register_as(auth, "alice", alg, password, uri)
    }

    fn register_as(
        auth: &Authenticator,
        user: &str,
        alg: DigestAlgorithm,
        password: &str,
        uri: &str,
    ) -> Message {
        let challenge = auth.challenge(Kind::Www, REALM, NOW, false);
        let nonce = challenge[0]
            .1
            .split("nonce=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .to_owned();
        let (name, zero) = match alg {
            DigestAlgorithm::Md5 => ("MD5", "0".repeat(32)),
            DigestAlgorithm::Sha256 => ("SHA-256", "0".repeat(64)),
        };
        let header = |response: &str| {
            format!(
                "Digest username=\"{user}\", realm=\"{REALM}\", nonce=\"{nonce}\", uri=\"{uri}\", \
                 response=\"{response}\", algorithm={name}, qop=auth, nc=00000001, cnonce=\"c1\""
            )
        };
        let zero_header = header(&zero);
        let template = parse_credentials(&zero_header).unwrap();
        let response =
            expected_response(alg, &ha1(alg, user, REALM, password), "REGISTER", &template);
        let text = format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK1\r\n\
             From: <sip:{user}@example.com>;tag=1\r\nTo: <sip:{user}@example.com>\r\n\
             Call-ID: c1\r\nCSeq: 1 REGISTER\r\nAuthorization: {}\r\n\
             Content-Length: 0\r\n\r\n",
            header(&response)
        );
        Message::parse(text.as_bytes(), Framing::Datagram).unwrap()
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    async fn check(auth: &Authenticator, msg: &Message, from: &str) -> Outcome {
        auth.check(msg, peer(from), Kind::Www, REALM, REALM, NOW)
            .await
    }

    fn authorized() -> Outcome {
        Outcome::Authorized {
            username: "alice".into(),
            caller_id: None,
        }
    }

    const CHALLENGE: Outcome = Outcome::Challenge { stale: false };

    #[tokio::test]
    async fn the_digest_uri_must_be_the_request_uri() {
        let (auth, security) = authenticator("", "").await;
        let a = "203.0.113.5:5060";
        let good = register(&auth, DigestAlgorithm::Md5, "s3cret", "sip:example.com");
        assert_eq!(check(&auth, &good, a).await, authorized());
        // The same form of the URI, written differently, is the same URI.
        let good = register(&auth, DigestAlgorithm::Md5, "s3cret", "sip:EXAMPLE.COM");
        assert_eq!(check(&auth, &good, a).await, authorized());
        // A response computed (rightly) for another URI: a captured Authorization replayed
        // on another request.
        let other = register(&auth, DigestAlgorithm::Md5, "s3cret", "sip:other.example");
        assert_eq!(
            check(&auth, &other, a).await,
            Outcome::Refuse {
                status: 400,
                reason: "Bad Request: digest uri is not the Request-URI"
            }
        );
        assert_eq!(security.stats(tokio::time::Instant::now()).auth_failures, 1);
    }

    #[tokio::test]
    async fn only_offered_algorithms_are_accepted() {
        let (md5_only, security) = authenticator("algorithms = [\"MD5\"]", "").await;
        let a = "203.0.113.5:5060";
        let sha = register(
            &md5_only,
            DigestAlgorithm::Sha256,
            "s3cret",
            "sip:example.com",
        );
        assert_eq!(
            check(&md5_only, &sha, a).await,
            CHALLENGE,
            "SHA-256 was not offered"
        );
        assert_eq!(security.stats(tokio::time::Instant::now()).auth_failures, 1);
        let md5 = register(&md5_only, DigestAlgorithm::Md5, "s3cret", "sip:example.com");
        assert_eq!(check(&md5_only, &md5, a).await, authorized());

        let (sha_only, _) = authenticator("algorithms = [\"SHA-256\"]", "").await;
        let md5 = register(&sha_only, DigestAlgorithm::Md5, "s3cret", "sip:example.com");
        assert_eq!(
            check(&sha_only, &md5, a).await,
            CHALLENGE,
            "MD5 was not offered"
        );
        let sha = register(
            &sha_only,
            DigestAlgorithm::Sha256,
            "s3cret",
            "sip:example.com",
        );
        assert_eq!(check(&sha_only, &sha, a).await, authorized());
    }

    #[tokio::test]
    async fn wrong_passwords_ban_the_source_without_a_new_challenge() {
        let (auth, security) = authenticator("", "auth_failures = 3\nauth_failures_user = 0").await;
        let a = "203.0.113.5:5060";
        for i in 0..2 {
            let m = register(
                &auth,
                DigestAlgorithm::Md5,
                &format!("guess{i}"),
                "sip:example.com",
            );
            assert_eq!(check(&auth, &m, a).await, CHALLENGE, "guess {i}");
        }
        let m = register(&auth, DigestAlgorithm::Md5, "guess2", "sip:example.com");
        assert_eq!(
            check(&auth, &m, a).await,
            Outcome::Refuse {
                status: 403,
                reason: LOCKED
            },
            "the failure that bans gets no challenge"
        );
        let now = tokio::time::Instant::now();
        assert!(!security.allow(peer(a), now), "and the source is banned");
        assert!(security.allow(peer("203.0.113.6:5060"), now));
        let right = register(&auth, DigestAlgorithm::Md5, "s3cret", "sip:example.com");
        assert_eq!(check(&auth, &right, "203.0.113.6:5060").await, authorized());
        assert_eq!(security.stats(now).bans_auth, 1);
    }

    #[tokio::test]
    async fn proxy_authentication_failures_count_too() {
        let (auth, security) = authenticator("", "auth_failures = 2").await;
        let as_proxy = |m: Message| {
            let text = String::from_utf8(m.as_bytes().to_vec())
                .unwrap()
                .replace("\r\nAuthorization:", "\r\nProxy-Authorization:");
            Message::parse(text.as_bytes(), Framing::Datagram).unwrap()
        };
        let a = peer("203.0.113.5:5060");
        let wrong = as_proxy(register(
            &auth,
            DigestAlgorithm::Md5,
            "x",
            "sip:example.com",
        ));
        let first = auth.check(&wrong, a, Kind::Proxy, REALM, REALM, NOW).await;
        assert_eq!(first, CHALLENGE);
        let second = auth.check(&wrong, a, Kind::Proxy, REALM, REALM, NOW).await;
        assert!(matches!(second, Outcome::Refuse { status: 403, .. }));
        assert!(!security.allow(a, tokio::time::Instant::now()));
        // And the right password through Proxy-Authorization is accepted (from elsewhere).
        let right = as_proxy(register(
            &auth,
            DigestAlgorithm::Md5,
            "s3cret",
            "sip:example.com",
        ));
        let b = peer("203.0.113.6:5060");
        assert_eq!(
            auth.check(&right, b, Kind::Proxy, REALM, REALM, NOW).await,
            authorized()
        );
    }

    #[tokio::test]
    async fn a_locked_user_is_refused_even_with_the_right_password() {
        let (auth, security) = authenticator(
            "",
            "auth_failures = 100\nauth_failures_user = 2\nban_time = 60",
        )
        .await;
        let m = register(&auth, DigestAlgorithm::Md5, "x", "sip:example.com");
        assert_eq!(check(&auth, &m, "203.0.113.1:5060").await, CHALLENGE);
        let locked = Outcome::Refuse {
            status: 403,
            reason: LOCKED,
        };
        assert_eq!(check(&auth, &m, "203.0.113.2:5060").await, locked);
        let right = register(&auth, DigestAlgorithm::Md5, "s3cret", "sip:example.com");
        assert_eq!(check(&auth, &right, "203.0.113.3:5060").await, locked);
        let s = security.stats(tokio::time::Instant::now());
        assert_eq!((s.user_locks, s.auth_refused_locked), (1, 1));
    }

    #[tokio::test]
    async fn unknown_users_count_against_the_source() {
        let (auth, security) = authenticator("", "auth_failures = 2").await;
        let text = String::from_utf8(
            register(&auth, DigestAlgorithm::Md5, "x", "sip:example.com")
                .as_bytes()
                .to_vec(),
        )
        .unwrap()
        .replace("username=\"alice\"", "username=\"mallory\"");
        let m = Message::parse(text.as_bytes(), Framing::Datagram).unwrap();
        let a = "203.0.113.5:5060";
        assert_eq!(check(&auth, &m, a).await, CHALLENGE);
        assert!(matches!(
            check(&auth, &m, a).await,
            Outcome::Refuse { status: 403, .. }
        ));
        assert!(!security.allow(peer(a), tokio::time::Instant::now()));
    }

    /// A request that offers credentials for the realm is never challenged at once (its
    /// check may need the store); one without is, when one algorithm is configured.
    #[tokio::test]
    async fn only_a_request_without_credentials_is_challenged_at_once() {
        let (auth, _) = authenticator("algorithms = [\"MD5\"]", "").await;
        let with = register(&auth, DigestAlgorithm::Md5, "s3cret", "sip:example.com");
        assert_eq!(
            auth.challenge_now(&with, Kind::Www, REALM, "alice", REALM, NOW),
            None
        );
        let text = String::from_utf8(with.as_bytes().to_vec()).unwrap();
        let start = text.find("Authorization:").unwrap();
        let end = start + text[start..].find("\r\n").unwrap() + 2;
        let bare = format!("{}{}", &text[..start], &text[end..]);
        let bare = Message::parse(bare.as_bytes(), Framing::Datagram).unwrap();
        let headers = auth
            .challenge_now(&bare, Kind::Www, REALM, "alice", REALM, NOW)
            .expect("a challenge at once");
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[0].0, "WWW-Authenticate");
        assert!(headers[0].1.contains("algorithm=MD5"), "{}", headers[0].1);
        // Credentials for another realm only: challenged at once too, as `check` would.
        let other = text.replace("realm=\"example.com\"", "realm=\"elsewhere\"");
        let other = Message::parse(other.as_bytes(), Framing::Datagram).unwrap();
        assert!(
            auth.challenge_now(&other, Kind::Www, REALM, "alice", REALM, NOW)
                .is_some()
        );
    }

    /// A subscriber imported from Kamailio has an MD5 HA1 only: with both algorithms
    /// configured they are offered MD5 alone, and a SHA-256 answer gets a new challenge (not
    /// a 500, not a counted failure); their MD5 answer is accepted.
    #[tokio::test]
    async fn a_subscriber_without_a_sha256_ha1_authenticates_with_md5() {
        let (auth, security) = authenticator("algorithms = [\"SHA-256\", \"MD5\"]", "").await;
        auth.store
            .add_subscriber(&Subscriber {
                username: "kam".into(),
                domain: REALM.into(),
                ha1_md5: ha1(DigestAlgorithm::Md5, "kam", REALM, "old"),
                ha1_sha256: None,
                caller_id: None,
                created: 0,
            })
            .await
            .unwrap();
        let offered = |headers: Vec<(&str, String)>| {
            headers
                .iter()
                .map(|(_, v)| {
                    v.split("algorithm=")
                        .nth(1)
                        .unwrap()
                        .split(',')
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect::<Vec<_>>()
        };
        // Without credentials the challenge needs the subscriber's HA1s (which algorithms):
        // not at once while the subscriber is not in memory, at once after.
        let bare = Message::parse(
            b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK1\r\n\
              From: <sip:kam@example.com>;tag=1\r\nTo: <sip:kam@example.com>\r\n\
              Call-ID: c\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n",
            Framing::Datagram,
        )
        .unwrap();
        let now = |user: &str| auth.challenge_now(&bare, Kind::Www, REALM, user, REALM, NOW);
        assert_eq!(now("kam"), None, "not cached yet");
        let kam = auth
            .challenge_for(Kind::Www, REALM, Some("kam"), REALM, NOW, false)
            .await;
        assert_eq!(offered(kam), ["MD5"]);
        assert_eq!(offered(now("kam").expect("cached now")), ["MD5"]);
        let alice = auth
            .challenge_for(Kind::Www, REALM, Some("alice"), REALM, NOW, false)
            .await;
        assert_eq!(offered(alice), ["SHA-256", "MD5"]);
        let nobody = auth
            .challenge_for(Kind::Www, REALM, Some("nobody"), REALM, NOW, false)
            .await;
        assert_eq!(
            offered(nobody),
            ["SHA-256", "MD5"],
            "unknown: the full challenge"
        );

        let a = "203.0.113.5:5060";
        let sha = register_as(
            &auth,
            "kam",
            DigestAlgorithm::Sha256,
            "old",
            "sip:example.com",
        );
        assert_eq!(check(&auth, &sha, a).await, CHALLENGE);
        assert_eq!(security.stats(tokio::time::Instant::now()).auth_failures, 0);
        let md5 = register_as(&auth, "kam", DigestAlgorithm::Md5, "old", "sip:example.com");
        assert_eq!(
            check(&auth, &md5, a).await,
            Outcome::Authorized {
                username: "kam".into(),
                caller_id: None
            }
        );
        let wrong = register_as(&auth, "kam", DigestAlgorithm::Md5, "new", "sip:example.com");
        assert_eq!(check(&auth, &wrong, a).await, CHALLENGE);
        assert_eq!(security.stats(tokio::time::Instant::now()).auth_failures, 1);
    }
}
