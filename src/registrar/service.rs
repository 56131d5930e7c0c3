//! The registrar as a service (the seed's `route[2]`): `www_authorize` against the subscriber
//! table → `check_to` → `save("location")` with write-through → 200 listing the contacts.
//!
//! REGISTERs are spread over shards by address-of-record: each shard runs the REGISTERs of
//! different AORs at once and one AOR's in order ([`Order`]: two REGISTERs of one AOR never
//! race), and the UDP receive loops never wait for the store. A REGISTER without credentials
//! is challenged on the receive loop when that needs no store read (`challenge_now`). A
//! full shard queue answers 503 with Retry-After instead of queueing without bound. The
//! shard keeps each final response (what of it a retransmission cannot give again) while its
//! non-INVITE server transaction is Completed (Timer J, RFC 3261 §17.2.2: 32 s on UDP;
//! [`Completed`]), so a retransmitted REGISTER gets the same answer instead of a replayed
//! nonce.

use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::cache::Completed;
use super::location::LocationService;
use super::order::Order;
use super::register::{self, Decision, Origin};
use crate::auth::service::{Authenticator, Kind, Outcome};
use crate::clock::Clock;
use crate::config::{Config, LiveConfig};
use crate::sip::{Message, SipUri, reply};
use crate::transaction::Timers;
use crate::transport::{Proto, Source, Transports};

/// REGISTERs of different AORs a shard processes at once (each mostly waits for its commit).
const RUNNING: usize = 16;
/// REGISTERs a shard takes from its queue while their AOR or a running slot is busy.
const WAITING: usize = 64;
/// REGISTERs queued per shard before new ones get 503 (the server runs 32 or more shards).
/// With the running and waiting ones a shard holds at most 256, as when it was serial.
const QUEUE: usize = 256 - RUNNING - WAITING;

/// A REGISTER for one of our domains, from the pipeline.
#[derive(Debug)]
pub struct Job {
    pub msg: Message,
    pub source: Source,
}

/// What the registrar shares between its shards.
pub struct Context {
    /// Loaded once per REGISTER (`[registrar]` is live; see [`crate::config::LIVE_KEYS`]).
    pub cfg: Arc<LiveConfig>,
    pub location: Arc<dyn LocationService>,
    pub transports: Arc<Transports>,
    pub auth: Arc<Authenticator>,
    pub clock: Arc<dyn Clock>,
    /// REGISTERs answered 500 because the store failed them: a binding not saved (the
    /// database refused it, or the writer's queue was full) or a subscriber not read.
    pub store_failures: AtomicU64,
}

/// The handle the pipeline submits REGISTERs to.
#[derive(Clone)]
pub struct Registrar {
    shards: Vec<mpsc::Sender<(Arc<str>, Box<Job>)>>,
    ctx: Arc<Context>,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Registrar {
    /// Starts `shards` shard tasks.
    pub fn start(ctx: Arc<Context>, shards: usize) -> Self {
        let n = shards.max(1);
        let shards = (0..n)
            .map(|i| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(
                    shard(ctx.clone(), rx, n).instrument(info_span!("registrar", shard = i)),
                );
                tx
            })
            .collect();
        Self { shards, ctx }
    }

    /// Registers `registrar_store_failures`.
    pub fn register_metrics(&self, m: &crate::metrics::Registry) {
        let c = Arc::downgrade(&self.ctx);
        m.counter(
            "registrar_store_failures",
            "REGISTERs answered 500 because the store failed them (a binding not saved, a subscriber not read).",
            move || c.upgrade().map_or(0, |c| c.store_failures.load(Relaxed)),
        );
    }

    /// Answers a REGISTER that needs no waiting (a challenge) at once, queues the others;
    /// gives the REGISTER back when its shard is overloaded.
    pub fn submit(&self, job: Box<Job>) -> Result<(), Box<Job>> {
        let aor = aor_key(&job.msg);
        if let Some(bytes) = challenge_now(&self.ctx, &job, &aor) {
            self.ctx
                .transports
                .send(crate::nat::respond(&job.msg, job.source, bytes));
            return Ok(());
        }
        let mut h = std::hash::DefaultHasher::new();
        aor.hash(&mut h);
        let idx = (h.finish() % self.shards.len() as u64) as usize;
        self.shards[idx].try_send((aor, job)).map_err(|e| match e {
            mpsc::error::TrySendError::Full((_, j)) | mpsc::error::TrySendError::Closed((_, j)) => {
                j
            }
        })
    }
}

/// The 401 for a REGISTER without credentials, when it can be built without waiting (see
/// [`Authenticator::challenge_now`]): half of all REGISTERs, answered on the receive loop
/// without a trip through a shard. A challenge reads and writes no binding and is not kept
/// for retransmissions (a retransmission gets a fresh one, as from [`handle`]), so it needs
/// neither the shard's order nor its table. Anything else (`None`) goes to the shard, which
/// gives the same answers for the same requests.
fn challenge_now(ctx: &Context, job: &Job, aor: &str) -> Option<Vec<u8>> {
    let msg = &job.msg;
    let (user, domain) = addressee(&ctx.cfg.load(), msg, aor).ok()?;
    let realm = ctx.auth.realm(domain);
    let now = ctx.clock.unix();
    let headers = ctx
        .auth
        .challenge_now(msg, Kind::Www, realm, user, domain, now)?;
    let extra: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    Some(reply::response(
        msg,
        job.source.remote,
        401,
        "Unauthorized",
        &extra,
    ))
}

/// Whom a REGISTER is for: the To user and the domain in lower case (taken from `aor`, its
/// [`aor_key`]), or the status and reason refusing it: a malformed To (400), a To URI that
/// is not a SIP URI (404), no user part (400), a domain we do not serve (403).
fn addressee<'m, 'a>(
    cfg: &Config,
    msg: &'m Message,
    aor: &'a str,
) -> Result<(&'m str, &'a str), (u16, &'static str)> {
    let to = msg.to().map_err(|_| (400, "Malformed To header"))?;
    let to_uri = SipUri::parse(to.uri).map_err(|_| (404, "Not Found"))?;
    let user = to_uri.user.ok_or((400, "To has no user part"))?;
    // `aor` is `user@domain` for this To.
    let domain = aor.get(user.len() + 1..).unwrap_or_default();
    if !cfg.is_local_domain(domain) {
        return Err((403, "Domain Not Served Here"));
    }
    Ok((user, domain))
}

/// A transaction key for retransmission matching (RFC 3261 §17.2.3).
fn txn_key(msg: &Message) -> Option<String> {
    use std::fmt::Write;
    let via = msg.top_via().ok()?;
    let branch = via.branch()?;
    let seq = msg.cseq().ok()?.seq;
    let mut key = String::with_capacity(branch.len() + via.host.len() + 18);
    // invariant: writing to a String cannot fail.
    let _ = write!(
        key,
        "{branch}|{}:{}|{seq}",
        via.host,
        via.port.unwrap_or(5060)
    );
    Some(key)
}

/// The address-of-record a REGISTER is for, as the shards key it: `user@domain` with the
/// domain in lower case (as [`handle`] names it), or the To URI's text when it has no user
/// (such a REGISTER is refused, in order like the rest).
fn aor_key(msg: &Message) -> Arc<str> {
    let Ok(to) = msg.to() else {
        return Arc::from("");
    };
    match SipUri::parse(to.uri) {
        Ok(SipUri {
            user: Some(user),
            host,
            ..
        }) => {
            let mut aor = String::with_capacity(user.len() + 1 + host.len());
            aor.push_str(user);
            aor.push('@');
            aor.extend(host.chars().map(|c| c.to_ascii_lowercase()));
            aor.into()
        }
        _ => to.uri.into(),
    }
}

/// A REGISTER that ended: the job, the response to send, and what the table of completed
/// transactions keeps of it and under which key (none for a challenge or over TCP).
type Ended = (Box<Job>, Vec<u8>, Option<(String, Box<[u8]>)>);

async fn shard(ctx: Arc<Context>, mut rx: mpsc::Receiver<(Arc<str>, Box<Job>)>, shards: usize) {
    // Sized once: `limits.registrar_cache*` need a restart.
    let limits = ctx.cfg.load().limits.clone();
    let mut sent = Completed::new(
        limits.registrar_cache / shards,
        limits.registrar_cache_bytes / shards,
    );
    let mut order = Order::new(RUNNING, WAITING);
    // The running REGISTERs are futures of the shard itself, not tasks: a task per REGISTER
    // cost a 128-byte-aligned allocation (glibc's slow path), the runtime's scheduling and a
    // second wake-up (the task's, then the shard's) once its commit was answered. A panic
    // is caught per REGISTER, as a task's would be.
    let mut running = FuturesUnordered::new();
    // The table is swept on a timer, not only when the next REGISTER arrives: memory a
    // flood left behind is returned within a second of its expiry.
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut start: Vec<(Arc<str>, Box<Job>)> = Vec::new();
    let mut open = true;
    // `start` holds the REGISTERs that may start now (from the queue, or behind one of
    // their AOR that ended).
    while open || !running.is_empty() || !start.is_empty() {
        // Retransmissions are answered from the table when their turn comes (a
        // retransmission of a REGISTER still running waits behind it, and finds its answer).
        while let Some((aor, job)) = start.pop() {
            let key = txn_key(&job.msg);
            if let Some(bytes) = key
                .as_ref()
                .and_then(|k| sent.retransmission(k, Instant::now()))
                .and_then(|kept| reply::response_again(&job.msg, job.source.remote, kept))
            {
                debug!("REGISTER retransmission, resending the response");
                ctx.transports
                    .send(crate::nat::respond(&job.msg, job.source, bytes));
                start.extend(order.done(&aor));
                continue;
            }
            running.push(guarded(aor.clone(), run(ctx.clone(), job, aor, key)));
        }
        tokio::select! {
            job = rx.recv(), if open && order.has_room() => match job {
                Some((aor, job)) => start.extend(order.arrive(aor, job)),
                None => open = false,
            },
            Some((aor, ended)) = running.next(), if !running.is_empty() => {
                match ended {
                    Ok((job, bytes, keep)) => {
                        if let Some((k, kept)) = keep {
                            sent.insert(k, kept, Instant::now() + Timers::default().t1_x64());
                        }
                        // The one responder: RFC 3261 §18.2.2, rport, and force_rport for NATed phones.
                        ctx.transports.send(crate::nat::respond(&job.msg, job.source, bytes));
                    }
                    // A bug: the REGISTER goes unanswered (the phone retransmits), the shard
                    // and the AOR go on.
                    Err(_) => error!("a REGISTER's processing panicked"),
                }
                start.extend(order.done(&aor));
            }
            _ = sweep.tick() => sent.sweep(Instant::now()),
        }
    }
}

/// A running REGISTER of `aor` as the shard polls it: its AOR with what it ended with, or the
/// panic it ended in.
fn guarded(
    aor: Arc<str>,
    register: impl Future<Output = Ended>,
) -> impl Future<Output = (Arc<str>, std::thread::Result<Ended>)> {
    AssertUnwindSafe(register)
        .catch_unwind()
        .map(move |ended| (aor, ended))
}

/// One REGISTER's processing (a future its shard polls): [`handle`], and what the table of
/// completed transactions keeps.
async fn run(ctx: Arc<Context>, job: Box<Job>, aor: Arc<str>, key: Option<String>) -> Ended {
    let (status, response) = handle(&ctx, &job, &aor, ctx.clock.unix()).await;
    // RFC 3261 §17.2.2: over UDP the transaction stays Completed for Timer J and answers
    // retransmissions with its final; over TCP it ends with the response. Challenges are not
    // kept: a retransmission gets a fresh one (one datagram per request either way), and a
    // flood of unauthenticated REGISTERs holds nothing.
    // Of the response the table keeps what a retransmission cannot give again (the status
    // line, the Contact list, Date): the copied headers come from the retransmission itself.
    let keep = key
        .filter(|_| status != 401 && job.source.proto == Proto::Udp)
        .map(|k| (k, response.kept()));
    (job, response.bytes, keep)
}

/// Processes one REGISTER for `aor` (its [`aor_key`]) and returns the response: its status
/// and the response built.
async fn handle(ctx: &Context, job: &Job, aor: &str, now: u64) -> (u16, reply::Reply) {
    let cfg = ctx.cfg.load();
    let msg = &job.msg;
    let src = job.source.remote;
    let respond = |status: u16, reason: &str, extra: &[(&str, &str)]| {
        (status, reply::reply(msg, src, status, reason, extra))
    };
    // `addressee` keeps the To view and its URI out of the await points below (they are
    // large, and would make every REGISTER's task larger); `user` borrows the message.
    let (user, domain) = match addressee(&cfg, msg, aor) {
        Ok(who) => who,
        Err((status, reason)) => return respond(status, reason, &[]),
    };
    // www_authorize against the subscriber table.
    let realm = ctx.auth.realm(domain);
    // Boxed: the check's future is over half a kilobyte, and inline it would make every
    // REGISTER's task large enough to miss the allocator's fast path (issue #15).
    let username = match Box::pin(ctx.auth.check(msg, src, Kind::Www, realm, domain, now)).await {
        Outcome::Authorized { username, .. } => username,
        Outcome::Challenge { stale } => {
            let headers = ctx
                .auth
                .challenge_for(Kind::Www, realm, Some(user), domain, now, stale)
                .await;
            let extra: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            return respond(401, "Unauthorized", &extra);
        }
        Outcome::StoreError => {
            ctx.store_failures.fetch_add(1, Relaxed);
            return respond(500, "Server Internal Error", &[("Retry-After", "5")]);
        }
        Outcome::Refuse { status, reason } => return respond(status, reason, &[]),
    };
    // check_to: the To user must be the authenticated user.
    if username != user {
        warn!(auth.user = %username, to.user = %user, peer.addr = %src, "To does not match the credentials");
        return respond(
            403,
            "Forbidden: To does not match the authenticated user",
            &[],
        );
    }

    let origin = Origin {
        aor,
        source: job.source,
        instance: &cfg.server.instance_id,
        now,
    };
    let current = ctx.location.lookup(aor, now);
    let decision = match register::decide(&cfg.registrar, msg, origin, current) {
        Ok(d) => d,
        Err(r) => {
            let extra: Vec<(&str, &str)> =
                r.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            return respond(r.status, &r.reason, &extra);
        }
    };
    // The 200's Contact list is the bindings once applied, which go to the location service.
    let mut extra: Vec<(&str, String)> = register::contact_headers(&decision.after, now);
    extra.push(("Date", reply::http_date(now)));
    if decision.is_change() {
        // Write-through: nothing is acknowledged that the store does not hold.
        let Decision {
            upsert,
            remove,
            after,
        } = decision;
        match ctx.location.save(aor, upsert, remove, after).await {
            Err(e) => {
                ctx.store_failures.fetch_add(1, Relaxed);
                error!(error = %e, %aor, "saving bindings failed");
                return respond(500, "Server Internal Error", &[("Retry-After", "5")]);
            }
            Ok((upserted, removed)) => {
                for b in &upserted {
                    info!(%aor, contact = %b.contact, received = %b.received, transport = b.transport.as_str(), expires = b.remaining(now), "registered");
                }
                for c in &removed {
                    info!(%aor, contact = %c, "unregistered");
                }
            }
        }
    }
    let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
    respond(200, "OK", &extra)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use tokio::net::UdpSocket;
    use tokio::sync::{Mutex, Semaphore};

    use super::*;
    use crate::auth::digest::{self, Answer};
    use crate::auth::nonce::NonceKey;
    use crate::clock::SystemClock;
    use crate::config::{Config, DigestAlgorithm};
    use crate::registrar::location::{Binding, Location, Pending};
    use crate::security::Security;
    use crate::sip::Framing;
    use crate::store::Subscriber;
    use crate::store::{StoreError, Written};
    use crate::transport::Listeners;

    /// Bindings in memory; saves of `gated` wait for a permit of `gate` (a slow commit), saves
    /// of `failing` fail (a database that refuses).
    #[derive(Debug)]
    struct Gated {
        memory: Location,
        gated: &'static str,
        failing: &'static str,
        gate: Semaphore,
        saved: Mutex<Vec<String>>,
    }

    impl LocationService for Gated {
        fn lookup(&self, aor: &str, now: u64) -> Vec<Arc<Binding>> {
            self.memory.lookup(aor, now)
        }
        fn snapshot(&self) -> Vec<Arc<Binding>> {
            self.memory.snapshot()
        }
        fn save<'a>(
            &'a self,
            aor: &'a str,
            upsert: Vec<Arc<Binding>>,
            remove: Vec<String>,
            after: Vec<Arc<Binding>>,
        ) -> Pending<'a, Result<Written, StoreError>> {
            Box::pin(async move {
                if aor == self.gated {
                    // invariant: the semaphore is never closed.
                    self.gate.acquire().await.expect("open").forget();
                }
                if aor == self.failing {
                    return Err(StoreError::Db(sqlx::Error::PoolClosed));
                }
                self.saved.lock().await.push(aor.to_owned());
                self.memory.set(aor, after).await;
                Ok((upsert, remove))
            })
        }
        fn remove_unreachable<'a>(
            &'a self,
            _b: &'a Binding,
        ) -> Pending<'a, Result<bool, StoreError>> {
            Box::pin(async { Ok(false) })
        }
        fn binding_count(&self) -> usize {
            self.memory.binding_count()
        }
        fn aor_count(&self) -> usize {
            self.memory.aor_count()
        }
    }

    /// A REGISTER of `user` with `contact`, answering `challenge`.
    fn register(user: &str, contact: &str, cseq: u32, challenge: &str) -> Message {
        let ch = digest::parse_challenge(challenge).expect("our challenge");
        let auth = digest::authorization(
            &ch,
            &Answer {
                username: user,
                password: "pw",
                method: "REGISTER",
                uri: "sip:example.com",
                cnonce: "c",
                nc: 1,
            },
        );
        let text = format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK{user}{cseq}\r\n\
             From: <sip:{user}@example.com>;tag=1\r\nTo: <sip:{user}@example.com>\r\n\
             Call-ID: {user}\r\nCSeq: {cseq} REGISTER\r\nContact: <{contact}>\r\n\
             Authorization: {auth}\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(text.as_bytes(), Framing::Datagram).expect("a REGISTER the test built")
    }

    /// The next response the phone receives: its CSeq number and Contact header count.
    async fn answer(phone: &UdpSocket) -> Option<(u16, u32, usize)> {
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_millis(1500), phone.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        let m = Message::parse(&buf[..n], Framing::Datagram).ok()?;
        Some((m.status()?, m.cseq().ok()?.seq, m.contacts().ok()?.len()))
    }

    /// The registrar's shard does not wait for one AOR's commit before answering another
    /// AOR's REGISTER, and keeps one AOR's REGISTERs in order: the second sees the first's
    /// binding. A save the store refuses is answered 500 and counted.
    #[tokio::test]
    async fn a_slow_commit_holds_its_aor_only() {
        let cfg = Config::from_toml(
            "[server]\nlisten=[\"udp:127.0.0.1:0\"]\ndomains=[\"example.com\"]\n\
             [auth]\nalgorithms=[\"MD5\"]\n[security]\ntrusted=[]\n",
            || "127.0.0.1".parse().expect("address"),
        )
        .expect("config");
        let path =
            std::env::temp_dir().join(format!("sipedge-shard-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let store = crate::store::Store::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("store");
        store.migrate().await.expect("schema");
        for user in ["alice", "bob", "carol"] {
            store
                .add_subscriber(&Subscriber {
                    username: user.into(),
                    domain: "example.com".into(),
                    ha1_md5: digest::ha1(DigestAlgorithm::Md5, user, "example.com", "pw"),
                    ha1_sha256: None,
                    created: 0,
                    caller_id: None,
                })
                .await
                .expect("subscriber");
        }
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let security = Arc::new(Security::new(cfg.security.clone(), Instant::now()));
        let auth = Arc::new(Authenticator::new(
            cfg.auth.clone(),
            store,
            NonceKey::from_bytes([7; 32]),
            security,
            clock.clone(),
        ));
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let listeners = Listeners::bind(
            &[(Proto::Udp, listen)],
            crate::app::transport_limits(&cfg),
            None,
        )
        .await
        .expect("bind");
        let local = listeners.local_addrs()[0].1;
        let location = Arc::new(Gated {
            memory: Location::new(),
            gated: "alice@example.com",
            failing: "carol@example.com",
            gate: Semaphore::new(0),
            saved: Mutex::new(Vec::new()),
        });
        // A fresh nonce for each REGISTER: their counts are checked in the order they run.
        let challenge = || {
            auth.challenge(Kind::Www, "example.com", clock.unix(), false)[0]
                .1
                .clone()
        };
        let challenges = [challenge(), challenge(), challenge(), challenge()];
        let registrar = Registrar::start(
            Arc::new(Context {
                cfg: Arc::new(LiveConfig::new(Arc::new(cfg))),
                location: location.clone(),
                transports: listeners.transports(),
                auth,
                clock,
                store_failures: AtomicU64::new(0),
            }),
            1,
        );
        let phone = UdpSocket::bind("127.0.0.1:0").await.expect("phone");
        let source = Source {
            proto: Proto::Udp,
            remote: phone.local_addr().expect("bound"),
            local,
        };
        let submit = |msg: Message| {
            registrar
                .submit(Box::new(Job { msg, source }))
                .expect("room in the shard");
        };
        // A REGISTER's task (this future plus tokio's header, rounded up) stays below the
        // kilobyte where glibc leaves its fast paths and consolidates its free lists first:
        // at 1,920 bytes that was 5 % of the registrar's CPU (issue #15, perf at 8,000/s).
        let task = run(
            registrar.ctx.clone(),
            Box::new(Job {
                msg: register("alice", "sip:alice@192.0.2.7", 0, &challenges[0]),
                source,
            }),
            "alice@example.com".into(),
            None,
        );
        assert!(
            std::mem::size_of_val(&task) <= 640,
            "{}",
            std::mem::size_of_val(&task)
        );
        drop(task);
        submit(register("alice", "sip:alice@192.0.2.7", 1, &challenges[0]));
        submit(register("alice", "sip:alice@192.0.2.8", 2, &challenges[1]));
        submit(register("bob", "sip:bob@192.0.2.9", 1, &challenges[2]));
        // bob is answered while alice's first commit is pending (one shard holds both).
        assert_eq!(answer(&phone).await, Some((200, 1, 1)), "bob's 200");
        assert_eq!(answer(&phone).await, None, "alice waits for her commit");
        location.gate.add_permits(2);
        // alice's REGISTERs in order, the second seeing the first's binding.
        assert_eq!(answer(&phone).await, Some((200, 1, 1)));
        assert_eq!(answer(&phone).await, Some((200, 2, 2)));
        assert_eq!(
            *location.saved.lock().await,
            ["bob@example.com", "alice@example.com", "alice@example.com"]
        );
        let metrics = crate::metrics::Registry::new();
        registrar.register_metrics(&metrics);
        assert_eq!(metrics.get("registrar_store_failures"), Some(0));
        submit(register("carol", "sip:carol@192.0.2.10", 1, &challenges[3]));
        assert_eq!(
            answer(&phone).await,
            Some((500, 1, 0)),
            "carol's save failed"
        );
        assert_eq!(metrics.get("registrar_store_failures"), Some(1));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_aor_key_is_the_registrars_aor() {
        let msg = |to: &str| {
            let text = format!(
                "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK1\r\n\
                 From: <sip:a@example.com>;tag=1\r\nTo: {to}\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n\
                 Content-Length: 0\r\n\r\n"
            );
            Message::parse(text.as_bytes(), Framing::Datagram).expect("a REGISTER")
        };
        assert_eq!(
            &*aor_key(&msg("<sip:Alice@EXAMPLE.com;transport=tcp>")),
            "Alice@example.com"
        );
        assert_eq!(&*aor_key(&msg("sip:example.com")), "sip:example.com");
    }
}
