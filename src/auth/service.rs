//! The I/O side of digest authentication, shared by the registrar (`www_authorize`, 401) and
//! the proxy (`proxy_authorize`, 407): find the credentials for our realm, check the nonce,
//! look the subscriber up in the store, verify the response, refuse replayed nonce counts.

use tokio::sync::Mutex;
use tracing::{debug, error, info, warn};

use super::digest::{self, Credentials};
use super::nonce::{self, NonceKey, NonceStatus, ReplayGuard};
use crate::config::{AuthConfig, DigestAlgorithm};
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
    /// The request carries valid credentials of this subscriber.
    Authorized { username: String },
    /// Challenge (again); `stale` when the credentials were right but the nonce expired.
    Challenge { stale: bool },
    /// The store failed: answer 500.
    StoreError,
}

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
    cache: DashMap<(String, String), (Subscriber, u64)>,
}

impl Authenticator {
    pub fn new(cfg: AuthConfig, store: Store, key: NonceKey) -> Self {
        let replay = Mutex::new(ReplayGuard::new(REPLAY_CAPACITY, cfg.nonce_ttl.as_secs()));
        Self {
            cfg,
            store,
            key,
            replay,
            cache: DashMap::new(),
        }
    }

    fn cached(&self, username: &str, domain: &str, now: u64) -> Option<Subscriber> {
        let key = (username.to_owned(), domain.to_owned());
        let entry = self.cache.get(&key)?;
        let (sub, at) = entry.value();
        (now < at + HA1_CACHE_TTL).then(|| sub.clone())
    }

    fn remember(&self, sub: Subscriber, now: u64) {
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
    pub fn realm(&self, domain: &str) -> String {
        self.cfg.realm.clone().unwrap_or_else(|| domain.to_owned())
    }

    /// Checks the credentials of `msg` for `realm` against the subscriber
    /// `(username, domain)`.
    pub async fn check(
        &self,
        msg: &Message,
        kind: Kind,
        realm: &str,
        domain: &str,
        now: u64,
    ) -> Outcome {
        let creds: Option<Credentials> = msg
            .headers_named(kind.credentials_header())
            .filter_map(|h| msg.str_at(h.value.clone()))
            .filter_map(|v| digest::parse_credentials(v).ok())
            .find(|c| c.realm == realm);
        let Some(creds) = creds else {
            return Outcome::Challenge { stale: false };
        };
        let ttl = self.cfg.nonce_ttl.as_secs();
        let issued = match nonce::check(&self.key, &creds.nonce, now, ttl, realm) {
            NonceStatus::Valid { issued } => issued,
            NonceStatus::Stale => return Outcome::Challenge { stale: true },
            NonceStatus::Invalid => {
                debug!(user = %creds.username, "nonce not ours");
                return Outcome::Challenge { stale: false };
            }
        };
        let method = msg.method().unwrap_or_default();
        let verify = |sub: &Subscriber| {
            let ha1 = match creds.algorithm {
                DigestAlgorithm::Md5 => &sub.ha1_md5,
                DigestAlgorithm::Sha256 => &sub.ha1_sha256,
            };
            digest::verify(ha1, method, &creds)
        };
        // A cached entry that verifies is enough; one that does not is read again from the
        // store, so a new password works at once (an old one keeps working until the entry
        // ages out, at most HA1_CACHE_TTL).
        let cached = self.cached(&creds.username, domain, now);
        let verified = match cached {
            Some(sub) if verify(&sub) => true,
            _ => match self.store.subscriber(&creds.username, domain).await {
                Err(e) => {
                    error!(error = %e, "subscriber lookup failed");
                    return Outcome::StoreError;
                }
                Ok(None) => {
                    self.cache
                        .remove(&(creds.username.clone(), domain.to_owned()));
                    info!(user = %creds.username, %domain, "credentials of an unknown subscriber");
                    return Outcome::Challenge { stale: false };
                }
                Ok(Some(sub)) => {
                    let ok = verify(&sub);
                    self.remember(sub, now);
                    ok
                }
            },
        };
        if !verified {
            warn!(user = %creds.username, %domain, "wrong password");
            return Outcome::Challenge { stale: false };
        }
        // Without qop (RFC 2069 clients) there is no nonce count: such a nonce is good once.
        let nc = creds.nc.unwrap_or(1);
        if !self
            .replay
            .lock()
            .await
            .accept(&creds.nonce, issued, nc, now)
        {
            warn!(user = %creds.username, nc, "digest nonce count replayed");
            return Outcome::Challenge { stale: true };
        }
        Outcome::Authorized {
            username: creds.username,
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
        static SALT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let salt = SALT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = nonce::issue(&self.key, now, salt, realm);
        let (_, _, header) = kind.challenge_status();
        self.cfg
            .algorithms
            .iter()
            .map(|alg| (header, digest::challenge(*alg, realm, &n, "", stale)))
            .collect()
    }
}
