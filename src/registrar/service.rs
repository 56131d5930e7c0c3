//! The registrar as a service (the seed's `route[2]`): `www_authorize` against the subscriber
//! table → `check_to` → `save("location")` with write-through → 200 listing the contacts.
//!
//! REGISTERs are spread over shards by address-of-record: each shard handles its requests in
//! order (so two REGISTERs of one AOR never race), and the UDP receive loops never wait for
//! the store. A full shard queue answers 503 with Retry-After instead of queueing without
//! bound. The shard keeps each final response while its non-INVITE server transaction is
//! Completed (Timer J, RFC 3261 §17.2.2: 32 s on UDP; [`Completed`]), so a retransmitted
//! REGISTER gets the same answer instead of a replayed nonce.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::cache::Completed;
use super::location::LocationService;
use super::register::{self, Origin};
use crate::auth::service::{Authenticator, Kind, Outcome};
use crate::clock::Clock;
use crate::config::LiveConfig;
use crate::sip::{Message, SipUri, reply};
use crate::transaction::Timers;
use crate::transport::{Proto, Source, Transports};

/// REGISTERs waiting per shard before new ones get 503 (the server runs 32 or more shards).
const QUEUE: usize = 256;

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
}

/// The handle the pipeline submits REGISTERs to.
#[derive(Debug, Clone)]
pub struct Registrar {
    shards: Vec<mpsc::Sender<Box<Job>>>,
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
        Self { shards }
    }

    /// Queues a REGISTER; gives it back when its shard is overloaded.
    pub fn submit(&self, job: Box<Job>) -> Result<(), Box<Job>> {
        let aor_key = job
            .msg
            .to()
            .ok()
            .map(|t| t.uri.to_owned())
            .unwrap_or_default();
        let mut h = std::hash::DefaultHasher::new();
        aor_key.hash(&mut h);
        let idx = (h.finish() % self.shards.len() as u64) as usize;
        self.shards[idx].try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
        })
    }
}

/// A transaction key for retransmission matching (RFC 3261 §17.2.3).
fn txn_key(msg: &Message) -> Option<String> {
    let via = msg.top_via().ok()?;
    Some(format!(
        "{}|{}:{}|{}",
        via.branch()?,
        via.host,
        via.port.unwrap_or(5060),
        msg.cseq().ok()?.seq
    ))
}

async fn shard(ctx: Arc<Context>, mut rx: mpsc::Receiver<Box<Job>>, shards: usize) {
    // Sized once: `limits.registrar_cache*` need a restart.
    let limits = ctx.cfg.load().limits.clone();
    let mut sent = Completed::new(
        limits.registrar_cache / shards,
        limits.registrar_cache_bytes / shards,
    );
    // The table is swept on a timer, not only when the next REGISTER arrives: memory a
    // flood left behind is returned within a second of its expiry.
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let job = tokio::select! {
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
            _ = sweep.tick() => {
                sent.sweep(Instant::now());
                continue;
            }
        };
        let now = Instant::now();
        let key = txn_key(&job.msg);
        let resend = key.as_ref().and_then(|k| sent.retransmission(k, now));
        let bytes = match resend {
            Some(bytes) => {
                debug!("REGISTER retransmission, resending the response");
                bytes
            }
            None => {
                let (status, bytes) = handle(&ctx, &job, ctx.clock.unix()).await;
                // RFC 3261 §17.2.2: over UDP the transaction stays Completed for Timer J and
                // answers retransmissions with its final; over TCP it ends with the response.
                // Challenges are not kept: a retransmission gets a fresh one (one datagram per
                // request either way), and a flood of unauthenticated REGISTERs holds nothing.
                if let Some(k) = key.filter(|_| status != 401 && job.source.proto == Proto::Udp) {
                    sent.insert(k, &bytes, Instant::now() + Timers::default().t1_x64());
                }
                bytes
            }
        };
        // The one responder: RFC 3261 §18.2.2, rport, and force_rport for NATed phones.
        ctx.transports
            .send(crate::nat::respond(&job.msg, job.source, bytes));
    }
}

/// Processes one REGISTER and returns the response: its status and bytes.
async fn handle(ctx: &Context, job: &Job, now: u64) -> (u16, Vec<u8>) {
    let cfg = ctx.cfg.load();
    let msg = &job.msg;
    let src = job.source.remote;
    let respond = |status: u16, reason: &str, extra: &[(&str, &str)]| {
        (status, reply::response(msg, src, status, reason, extra))
    };
    let Ok(to) = msg.to() else {
        return respond(400, "Malformed To header", &[]);
    };
    let Ok(to_uri) = SipUri::parse(to.uri) else {
        return respond(404, "Not Found", &[]);
    };
    let (Some(user), domain) = (to_uri.user, to_uri.host.to_ascii_lowercase()) else {
        return respond(400, "To has no user part", &[]);
    };
    if !cfg.is_local_domain(&domain) {
        return respond(403, "Domain Not Served Here", &[]);
    }
    let aor = format!("{user}@{domain}");
    // www_authorize against the subscriber table.
    let realm = ctx.auth.realm(&domain);
    let username = match ctx
        .auth
        .check(msg, src, Kind::Www, &realm, &domain, now)
        .await
    {
        Outcome::Authorized { username, .. } => username,
        Outcome::Challenge { stale } => {
            let headers = ctx
                .auth
                .challenge_for(Kind::Www, &realm, Some(user), &domain, now, stale)
                .await;
            let extra: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            return respond(401, "Unauthorized", &extra);
        }
        Outcome::StoreError => {
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
        aor: &aor,
        source: job.source,
        instance: &cfg.server.instance_id,
        now,
    };
    let current = ctx.location.lookup(&aor, now);
    let decision = match register::decide(&cfg.registrar, msg, origin, &current) {
        Ok(d) => d,
        Err(r) => {
            let extra: Vec<(&str, &str)> =
                r.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            return respond(r.status, &r.reason, &extra);
        }
    };
    if decision.is_change() {
        // Write-through: nothing is acknowledged that the store does not hold.
        if let Err(e) = ctx
            .location
            .save(
                &aor,
                &decision.upsert,
                &decision.remove,
                decision.after.clone(),
            )
            .await
        {
            error!(error = %e, %aor, "saving bindings failed");
            return respond(500, "Server Internal Error", &[("Retry-After", "5")]);
        }
        for b in &decision.upsert {
            info!(%aor, contact = %b.contact, received = %b.received, transport = b.transport.as_str(), expires = b.remaining(now), "registered");
        }
        for c in &decision.remove {
            info!(%aor, contact = %c, "unregistered");
        }
    }
    let date = reply::http_date(now);
    let mut extra: Vec<(&str, String)> = register::contact_headers(&decision.after, now);
    extra.push(("Date", date));
    let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
    respond(200, "OK", &extra)
}
