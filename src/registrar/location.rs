//! The location service (Kamailio `usrloc`).
//!
//! - [`LocationService`]: what the registrar, the proxy and the keepalives need of the
//!   bindings — the seam a location shared by several instances implements later.
//! - [`WriteThrough`]: today's service, usrloc's WRITE_THROUGH mode: every change is in the
//!   store before it is in memory (nothing is acknowledged that a restart would lose), lookups
//!   read memory only, and expired bindings are purged at their deadline (no periodic scans).
//! - [`Location`]: the memory side, bindings by address-of-record plus the expiry index.
//!
//! Several instances on one PostgreSQL (DESIGN §5, README "Several instances"): each write is
//! notified to every instance in its transaction, and [`WriteThrough::follow`] re-reads the
//! address-of-record it names into memory, so a registration, a de-registration or a removal
//! at one instance is in every other's memory as soon as it is committed (an expiry needs no
//! message: every instance purges at the same deadline). When the listening connection is
//! lost, everything is read again on reconnection. Each instance records its SIP address and a
//! heartbeat in the `instance` table; [`LocationService::owner`] says who reaches a binding's
//! phone: this instance, another one (alive: a heartbeat within [`DEAD_AFTER`] seconds), or
//! nobody (its owner died: the binding is not used until the phone registers again).

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use tracing::{debug, error, info, warn};

use crate::clock::Clock;
use crate::metrics::Registry;
pub use crate::store::Binding;
use crate::store::{BindingWriter, Change, Store, StoreError, Written};

/// Seconds between two heartbeats of an instance sharing the store.
pub const HEARTBEAT: u64 = 10;
/// An instance whose last heartbeat is older than this (seconds) is taken for dead: the
/// bindings it owns are not used, since the NAT bindings they point to lead to its sockets.
pub const DEAD_AFTER: u64 = 3 * HEARTBEAT;

/// Who can reach the phone of a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// This instance (the phone's NAT binding points at one of our sockets).
    Here,
    /// Another instance, alive, at this SIP address: requests go through it.
    At(SocketAddr),
    /// Another instance that is dead or unknown: the binding is not used.
    Gone,
}

/// A boxed future borrowing the service (the trait is used as `dyn`).
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The bindings as the rest of the server sees them (usrloc's API).
pub trait LocationService: Send + Sync + std::fmt::Debug {
    /// The live bindings of an AOR at `now` (unix seconds), highest q first. Never waits: it
    /// is called on the request path.
    fn lookup(&self, aor: &str, now: u64) -> Vec<Arc<Binding>>;

    /// Every binding (`show registrations`).
    fn snapshot(&self) -> Vec<Arc<Binding>>;

    /// The bindings `keep` picks, and those only (the keepalive walk: a tenth
    /// of the NATed bindings every tenth of `nat.ping_interval`; copying all of them each
    /// time was ten allocations per binding, however many were due).
    fn select(&self, keep: &dyn Fn(&Binding) -> bool) -> Vec<Arc<Binding>> {
        let mut all = self.snapshot();
        all.retain(|b| keep(b));
        all
    }

    /// Applies a REGISTER's change to one AOR: `upsert` and `remove` (contact URIs) are what
    /// changes, `after` is the AOR's bindings once applied. Done when it is durable; gives
    /// the change back (for the caller's log lines).
    fn save<'a>(
        &'a self,
        aor: &'a str,
        upsert: Vec<Arc<Binding>>,
        remove: Vec<String>,
        after: Vec<Arc<Binding>>,
    ) -> Pending<'a, Result<Written, StoreError>>;

    /// Removes a binding that stopped answering keepalives, unless a REGISTER refreshed it
    /// since `b.updated`. True when it was removed.
    fn remove_unreachable<'a>(&'a self, b: &'a Binding) -> Pending<'a, Result<bool, StoreError>>;

    /// Bindings held.
    fn binding_count(&self) -> usize;

    /// Addresses-of-record with at least one binding.
    fn aor_count(&self) -> usize;

    /// Who reaches the phone of `b` at `now` (unix seconds). One instance alone owns every
    /// binding.
    fn owner(&self, _b: &Binding, _now: u64) -> Owner {
        Owner::Here
    }
}

/// This instance among the others on one PostgreSQL.
#[derive(Debug)]
struct Cluster {
    /// `server.instance_id`.
    me: String,
    /// Our SIP address, as the others reach us (`advertise:port`, UDP).
    address: SocketAddr,
    /// Every instance id → its SIP address and last heartbeat (bounded by what
    /// [`Store::instances`] reads).
    instances: DashMap<String, (SocketAddr, u64)>,
}

/// Bindings in memory, written through to the store.
#[derive(Debug)]
pub struct WriteThrough {
    memory: Location,
    store: Store,
    /// Group commit of the registrar's changes ([`BindingWriter`]).
    writer: BindingWriter,
    /// Set when the store is shared (PostgreSQL).
    cluster: Option<Cluster>,
}

impl WriteThrough {
    /// Loads the live bindings of the store (at `now`) into memory.
    pub async fn load(store: Store, now: u64) -> Result<Self, StoreError> {
        let memory = Location::new();
        memory.load(store.load_bindings(now).await?).await;
        Ok(Self {
            memory,
            writer: BindingWriter::start(store.clone()),
            store,
            cluster: None,
        })
    }

    /// Like [`Self::load`]; on PostgreSQL, also joins the instances sharing it: records our
    /// SIP `address` under `instance` and reads the others'. Run [`Self::follow`] next.
    pub async fn load_shared(
        store: Store,
        now: u64,
        instance: &str,
        address: SocketAddr,
    ) -> Result<Self, StoreError> {
        let mut me = Self::load(store, now).await?;
        if me.store.is_postgres() {
            me.cluster = Some(Cluster {
                me: instance.to_owned(),
                address,
                instances: DashMap::new(),
            });
            me.heartbeat(now).await?;
        }
        Ok(me)
    }

    /// True when other instances may share the store.
    pub fn is_shared(&self) -> bool {
        self.cluster.is_some()
    }

    /// Writes our heartbeat and reads every instance's.
    async fn heartbeat(&self, now: u64) -> Result<(), StoreError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        self.store
            .instance_heartbeat(&c.me, &c.address.to_string(), now)
            .await?;
        self.read_instances().await
    }

    async fn read_instances(&self) -> Result<(), StoreError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        let all = self.store.instances().await?;
        c.instances.retain(|id, _| all.iter().any(|i| &i.id == id));
        for i in all {
            match i.address.parse::<SocketAddr>() {
                Ok(addr) => {
                    c.instances.insert(i.id, (addr, i.heartbeat));
                }
                Err(_) => {
                    warn!(instance = %i.id, address = %i.address, "instance row with a bad address")
                }
            }
        }
        Ok(())
    }

    /// Reads every live binding again (after the listening connection was lost: the
    /// notifications sent meanwhile are gone).
    async fn reload_all(&self, now: u64) -> Result<(), StoreError> {
        let all = self.store.load_bindings(now).await?;
        self.memory.replace_all(all).await;
        Ok(())
    }

    /// Follows the other instances while the service lives (shared store only): listens for
    /// changes and applies them to memory, heartbeats every [`HEARTBEAT`] seconds, and after a
    /// lost connection reconnects (every second until it works) and reads everything again.
    /// Holds the service weakly.
    pub async fn follow(me: Weak<Self>, clock: Arc<dyn Clock>) {
        let Some(store) = me.upgrade().map(|m| m.store.clone()) else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_secs(HEARTBEAT));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut changes = match store.listen().await {
                Ok(c) => c,
                Err(e) => {
                    error!(error = %e, "cannot listen for location changes; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if me.strong_count() == 0 {
                        return;
                    }
                    continue;
                }
            };
            // Listening from here: whatever changed before is in this read.
            let mut synced = false;
            loop {
                let Some(this) = me.upgrade() else {
                    return;
                };
                if !synced {
                    match this.reload_all(clock.unix()).await {
                        Ok(()) => {
                            synced = true;
                            info!(
                                bindings = this.binding_count(),
                                "location synchronised with the shared store"
                            );
                        }
                        Err(e) => error!(error = %e, "reading the location table failed"),
                    }
                    if let Err(e) = this.read_instances().await {
                        error!(error = %e, "reading the instance table failed");
                    }
                }
                drop(this);
                tokio::select! {
                    r = changes.next() => {
                        let Some(this) = me.upgrade() else {
                            return;
                        };
                        match r {
                            Ok(Some(Change::Location(aor))) => {
                                let now = clock.unix();
                                match this.store.load_aor(&aor, now).await {
                                    Ok(v) => {
                                        debug!(%aor, bindings = v.len(), "location change");
                                        this.memory.set(&aor, v).await;
                                    }
                                    Err(e) => {
                                        error!(error = %e, %aor, "reading a changed binding failed");
                                        synced = false;
                                    }
                                }
                            }
                            Ok(Some(Change::Instance(id))) => {
                                debug!(instance = %id, "instance heartbeat");
                                if let Err(e) = this.read_instances().await {
                                    error!(error = %e, "reading the instance table failed");
                                }
                            }
                            Ok(None) => {
                                // Listen again first, then read everything: nothing is lost
                                // between the two.
                                warn!("lost the location change notifications; reconnecting and reading everything again");
                                break;
                            }
                            Err(e) => {
                                warn!(error = %e, "location change notifications failed; reconnecting");
                                break;
                            }
                        }
                    }
                    _ = tick.tick() => {
                        let Some(this) = me.upgrade() else {
                            return;
                        };
                        if let Err(e) = this.heartbeat(clock.unix()).await {
                            error!(error = %e, "instance heartbeat failed");
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Purges expired bindings at their deadline, from memory and the store, until the
    /// service is dropped: sleeps until the earliest deadline, or until an earlier one
    /// appears. Holds the service weakly.
    pub async fn expire(me: Weak<Self>, clock: Arc<dyn Clock>) {
        loop {
            let Some(this) = me.upgrade() else {
                return;
            };
            let now = clock.unix();
            let wait = match this.memory.next_deadline().await {
                Some(t) if t <= now => Duration::ZERO,
                Some(t) => Duration::from_secs(t - now),
                None => Duration::from_secs(3600),
            };
            if !wait.is_zero() {
                // Sleep without holding the service: it may be dropped meanwhile.
                let changed = this.memory.changed.clone();
                drop(this);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = changed.notified() => continue,
                }
            }
            let Some(this) = me.upgrade() else {
                return;
            };
            let now = clock.unix();
            let expired = this.memory.purge(now).await;
            for b in &expired {
                info!(aor = %b.aor, contact = %b.contact, "registration expired");
            }
            if !expired.is_empty() {
                if let Err(e) = this.store.delete_expired(now).await {
                    error!(error = %e, "deleting expired bindings from the store failed");
                }
            }
        }
    }

    /// Registers the binding and address-of-record gauges (walks the map at each read).
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        let l = Arc::downgrade(self);
        m.gauge("registrar_bindings", "Registered contacts.", move || {
            l.upgrade().map_or(0, |l| l.binding_count() as u64)
        });
        let l = Arc::downgrade(self);
        m.gauge(
            "registrar_aors",
            "Addresses-of-record with a contact.",
            move || l.upgrade().map_or(0, |l| l.aor_count() as u64),
        );
    }
}

impl LocationService for WriteThrough {
    fn lookup(&self, aor: &str, now: u64) -> Vec<Arc<Binding>> {
        self.memory.lookup(aor, now)
    }

    fn snapshot(&self) -> Vec<Arc<Binding>> {
        self.memory.snapshot()
    }

    fn select(&self, keep: &dyn Fn(&Binding) -> bool) -> Vec<Arc<Binding>> {
        self.memory.select(keep)
    }

    fn save<'a>(
        &'a self,
        aor: &'a str,
        upsert: Vec<Arc<Binding>>,
        remove: Vec<String>,
        after: Vec<Arc<Binding>>,
    ) -> Pending<'a, Result<Written, StoreError>> {
        Box::pin(async move {
            let written = self.writer.save(aor, upsert, remove).await?;
            self.memory.set(aor, after).await;
            Ok(written)
        })
    }

    fn remove_unreachable<'a>(&'a self, b: &'a Binding) -> Pending<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            // Memory first: the binding is out of service even if the store fails.
            if !self
                .memory
                .remove_if_unchanged(&b.aor, &b.contact, b.updated)
            {
                return Ok(false);
            }
            self.store
                .save_bindings::<Binding>(&b.aor, &[], std::slice::from_ref(&b.contact))
                .await?;
            Ok(true)
        })
    }

    fn binding_count(&self) -> usize {
        self.memory.binding_count()
    }

    fn aor_count(&self) -> usize {
        self.memory.aor_count()
    }

    fn owner(&self, b: &Binding, now: u64) -> Owner {
        let Some(c) = &self.cluster else {
            return Owner::Here;
        };
        if b.instance == c.me {
            return Owner::Here;
        }
        match c.instances.get(&b.instance).map(|e| *e.value()) {
            Some((addr, heartbeat)) if now <= heartbeat + DEAD_AFTER => Owner::At(addr),
            _ => Owner::Gone,
        }
    }
}

/// In-memory bindings plus their expiry index.
///
/// The bindings are shared (`Arc`): a lookup, the registrar's decision and the write to the
/// store hold the same ones, so a REGISTER copies none (issue #15). The index has one entry
/// per address-of-record, its earliest deadline, instead of one per binding keyed by two
/// copied strings.
#[derive(Debug, Default)]
pub struct Location {
    by_aor: DashMap<String, Vec<Arc<Binding>>>,
    /// (deadline, aor): every AOR in `by_aor` has an entry at or before its earliest
    /// deadline. Entries may be early (a binding removed since, a refresh racing the purge):
    /// the purge finds nothing expired there and files the AOR again at its real deadline.
    expiry: tokio::sync::Mutex<BTreeSet<(u64, String)>>,
    /// Wakes the purge task when a deadline earlier than the one it sleeps on appears.
    changed: Arc<tokio::sync::Notify>,
}

/// The earliest deadline of a set of bindings.
fn earliest(bindings: &[Arc<Binding>]) -> Option<u64> {
    bindings.iter().map(|b| b.expires).min()
}

impl Location {
    pub fn new() -> Self {
        Self::default()
    }

    /// The live bindings of an AOR at `now`, highest q first.
    pub fn lookup(&self, aor: &str, now: u64) -> Vec<Arc<Binding>> {
        let Some(list) = self.by_aor.get(aor) else {
            return Vec::new();
        };
        // Sized exactly: see `register::decide`.
        let mut v = Vec::with_capacity(list.len());
        v.extend(list.iter().filter(|b| b.expires > now).cloned());
        drop(list);
        v.sort_by_key(|b| std::cmp::Reverse(b.q));
        v
    }

    /// Replaces the bindings of one AOR (after the store accepted the change). Takes owned
    /// bindings (read from the store) or shared ones (the registrar's).
    pub async fn set<B: Into<Arc<Binding>>>(&self, aor: &str, bindings: Vec<B>) {
        // An `Arc` into an `Arc` reuses the vector in place.
        let bindings: Vec<Arc<Binding>> = bindings.into_iter().map(Into::into).collect();
        let deadline = earliest(&bindings);
        // Memory goes first; the purge checks each deadline it finds against the bindings in
        // memory, so an index a moment behind purges nothing live.
        let old = if bindings.is_empty() {
            self.by_aor.remove(aor).map(|(_, v)| v).unwrap_or_default()
        } else {
            match self.by_aor.get_mut(aor) {
                Some(mut v) => std::mem::replace(&mut *v, bindings),
                None => {
                    self.by_aor.insert(aor.to_owned(), bindings);
                    Vec::new()
                }
            }
        };
        let before = earliest(&old);
        drop(old);
        if before == deadline {
            return;
        }
        let wake = {
            let mut idx = self.expiry.lock().await;
            let first_before = idx.first().map(|(t, _)| *t);
            // The old entry's key string is reused for the new one.
            let key = match before {
                Some(t) => idx
                    .take(&(t, aor.to_owned()))
                    .map_or_else(|| aor.to_owned(), |(_, k)| k),
                None => aor.to_owned(),
            };
            if let Some(t) = deadline {
                idx.insert((t, key));
            }
            // The purge task only needs waking when the earliest deadline moved earlier.
            let first_after = idx.first().map(|(t, _)| *t);
            matches!((first_before, first_after), (None, Some(_)))
                || matches!((first_before, first_after), (Some(b), Some(a)) if a < b)
        };
        if wake {
            self.changed.notify_one();
        }
    }

    /// Loads bindings read from the store at start.
    pub async fn load(&self, bindings: Vec<Binding>) {
        let mut by: std::collections::HashMap<String, Vec<Binding>> = Default::default();
        for b in bindings {
            by.entry(b.aor.clone()).or_default().push(b);
        }
        for (aor, v) in by {
            self.set(&aor, v).await;
        }
    }

    /// Replaces every binding with `bindings` (read again from the store).
    pub async fn replace_all(&self, bindings: Vec<Binding>) {
        let mut by: std::collections::HashMap<String, Vec<Binding>> = Default::default();
        for b in bindings {
            by.entry(b.aor.clone()).or_default().push(b);
        }
        let gone: Vec<String> = self
            .by_aor
            .iter()
            .map(|e| e.key().clone())
            .filter(|aor| !by.contains_key(aor))
            .collect();
        for aor in gone {
            self.set(&aor, Vec::<Binding>::new()).await;
        }
        for (aor, v) in by {
            self.set(&aor, v).await;
        }
    }

    /// The earliest deadline in the index.
    pub async fn next_deadline(&self) -> Option<u64> {
        self.expiry.lock().await.first().map(|(t, _)| *t)
    }

    /// Removes every binding whose deadline is at or before `now` from memory and returns
    /// them (for logging and for the store).
    pub async fn purge(&self, now: u64) -> Vec<Arc<Binding>> {
        let mut due = Vec::new();
        {
            let mut idx = self.expiry.lock().await;
            while let Some(first) = idx.first() {
                if first.0 > now {
                    break;
                }
                if let Some(e) = idx.pop_first() {
                    due.push(e);
                }
            }
        }
        let mut expired = Vec::new();
        let mut again = Vec::new();
        for (_, aor) in due {
            let Some(mut list) = self.by_aor.get_mut(&aor) else {
                continue;
            };
            // Only what is due now: a binding refreshed since stays.
            list.retain(|b| {
                let due = b.expires <= now;
                if due {
                    expired.push(Arc::clone(b));
                }
                !due
            });
            let next = earliest(&list);
            drop(list);
            match next {
                Some(t) => again.push((t, aor)),
                None => {
                    self.by_aor.remove_if(&aor, |_, v| v.is_empty());
                }
            }
        }
        if !again.is_empty() {
            // Filed again at their next deadline (a `set` since has filed its own: the same
            // entry, or a later one beside an early one, which the next purge drops).
            let mut idx = self.expiry.lock().await;
            idx.extend(again);
        }
        expired
    }

    /// Every binding (`show registrations`; the keepalive pinger uses [`Self::select`]).
    pub fn snapshot(&self) -> Vec<Arc<Binding>> {
        self.by_aor.iter().flat_map(|e| e.value().clone()).collect()
    }

    /// The bindings `keep` picks.
    pub fn select(&self, keep: &dyn Fn(&Binding) -> bool) -> Vec<Arc<Binding>> {
        let mut out = Vec::new();
        for e in self.by_aor.iter() {
            out.extend(e.value().iter().filter(|b| keep(b)).cloned());
        }
        out
    }

    /// Removes one binding from memory if it is still the one refreshed at `updated` (a
    /// REGISTER that refreshed it meanwhile wins). True when it was removed.
    pub fn remove_if_unchanged(&self, aor: &str, contact: &str, updated: u64) -> bool {
        let mut removed = false;
        let mut now_empty = false;
        if let Some(mut list) = self.by_aor.get_mut(aor) {
            if let Some(pos) = list
                .iter()
                .position(|b| b.contact == contact && b.updated == updated)
            {
                list.remove(pos);
                removed = true;
            }
            now_empty = list.is_empty();
        }
        if now_empty {
            self.by_aor.remove_if(aor, |_, v| v.is_empty());
        }
        // The expiry index keeps the old deadline; purge skips entries with no live binding.
        removed
    }

    /// Number of AORs with at least one binding.
    pub fn aor_count(&self) -> usize {
        self.by_aor.len()
    }

    /// Number of bindings.
    pub fn binding_count(&self) -> usize {
        self.by_aor.iter().map(|e| e.value().len()).sum()
    }
}

/// Memory only (usrloc's `db_mode = 0`): for tests, and for a server that keeps nothing.
impl LocationService for Location {
    fn lookup(&self, aor: &str, now: u64) -> Vec<Arc<Binding>> {
        Self::lookup(self, aor, now)
    }

    fn snapshot(&self) -> Vec<Arc<Binding>> {
        Self::snapshot(self)
    }

    fn select(&self, keep: &dyn Fn(&Binding) -> bool) -> Vec<Arc<Binding>> {
        Self::select(self, keep)
    }

    fn save<'a>(
        &'a self,
        aor: &'a str,
        upsert: Vec<Arc<Binding>>,
        remove: Vec<String>,
        after: Vec<Arc<Binding>>,
    ) -> Pending<'a, Result<Written, StoreError>> {
        Box::pin(async move {
            self.set(aor, after).await;
            Ok((upsert, remove))
        })
    }

    fn remove_unreachable<'a>(&'a self, b: &'a Binding) -> Pending<'a, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.remove_if_unchanged(&b.aor, &b.contact, b.updated)) })
    }

    fn binding_count(&self) -> usize {
        Self::binding_count(self)
    }

    fn aor_count(&self) -> usize {
        Self::aor_count(self)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::transport::Proto;

    pub(crate) fn binding(aor: &str, contact: &str, expires: u64, q: u16) -> Binding {
        Binding {
            aor: aor.into(),
            contact: contact.into(),
            received: "192.0.2.1:5060".parse().unwrap(),
            nated: true,
            transport: Proto::Udp,
            local_socket: "127.0.0.1:5060".parse().unwrap(),
            instance: "i".into(),
            expires,
            q,
            call_id: "c".into(),
            cseq: 1,
            user_agent: String::new(),
            path: String::new(),
            instance_urn: String::new(),
            updated: 0,
        }
    }

    #[tokio::test]
    async fn select_copies_only_what_it_keeps() {
        let loc = Location::new();
        loc.set(
            "a@x",
            vec![
                binding("a@x", "sip:1@h", 100, 500),
                binding("a@x", "sip:2@h", 50, 500),
            ],
        )
        .await;
        loc.set("b@x", vec![binding("b@x", "sip:3@h", 100, 500)])
            .await;
        let mut kept: Vec<String> = loc
            .select(&|b: &Binding| b.expires > 60)
            .into_iter()
            .map(|b| b.contact.clone())
            .collect();
        kept.sort();
        assert_eq!(kept, ["sip:1@h", "sip:3@h"]);
        // The trait's default (a service without its own) picks the same.
        let via_trait = LocationService::select(&loc, &|b: &Binding| b.aor == "a@x");
        assert_eq!(via_trait.len(), 2);
        assert_eq!(loc.snapshot().len(), 3);
    }

    #[tokio::test]
    async fn one_deadline_per_aor_and_each_binding_purged_at_its_own() {
        let loc = Location::new();
        let a = |c: &str, t: u64| binding("a@x", c, t, 1000);
        loc.set(
            "a@x",
            vec![a("sip:1@h", 100), a("sip:2@h", 200), a("sip:3@h", 300)],
        )
        .await;
        loc.set("b@x", vec![binding("b@x", "sip:4@h", 150, 1000)])
            .await;
        assert_eq!(loc.expiry.lock().await.len(), 2, "one entry per AOR");
        assert_eq!(loc.next_deadline().await, Some(100));
        // A refresh moves the AOR's entry; it adds none.
        loc.set(
            "a@x",
            vec![a("sip:1@h", 400), a("sip:2@h", 200), a("sip:3@h", 300)],
        )
        .await;
        assert_eq!(loc.expiry.lock().await.len(), 2);
        assert_eq!(loc.next_deadline().await, Some(150));
        // A removal by the keepalives leaves an early entry, which purges nothing.
        assert!(loc.remove_if_unchanged("b@x", "sip:4@h", 0));
        assert!(loc.purge(150).await.is_empty());
        assert_eq!(loc.expiry.lock().await.len(), 1);
        // Each binding goes at its own deadline; the AOR is filed again at the next one.
        let contacts =
            |v: Vec<Arc<Binding>>| -> Vec<String> { v.iter().map(|b| b.contact.clone()).collect() };
        assert_eq!(contacts(loc.purge(200).await), ["sip:2@h"]);
        assert_eq!(loc.next_deadline().await, Some(300));
        assert_eq!(contacts(loc.purge(399).await), ["sip:3@h"]);
        assert_eq!(loc.next_deadline().await, Some(400));
        assert_eq!(loc.binding_count(), 1);
        assert_eq!(contacts(loc.purge(400).await), ["sip:1@h"]);
        assert_eq!((loc.aor_count(), loc.next_deadline().await), (0, None));
    }

    /// A saved binding is the one a lookup returns, not a copy of it.
    #[tokio::test]
    async fn saved_bindings_are_shared_not_copied() {
        let loc = Location::new();
        let b = Arc::new(binding("a@x", "sip:1@h", 100, 1000));
        let (written, _) = LocationService::save(
            &loc,
            "a@x",
            vec![Arc::clone(&b)],
            Vec::new(),
            vec![Arc::clone(&b)],
        )
        .await
        .expect("memory only");
        let found = loc.lookup("a@x", 50);
        assert!(Arc::ptr_eq(&found[0], &b) && Arc::ptr_eq(&written[0], &b));
    }

    #[tokio::test]
    async fn lookup_orders_by_q_and_purge_respects_refresh() {
        let loc = Location::new();
        loc.set(
            "a@x",
            vec![
                binding("a@x", "sip:1@h", 100, 500),
                binding("a@x", "sip:2@h", 200, 900),
            ],
        )
        .await;
        let l = loc.lookup("a@x", 50);
        assert_eq!(l[0].contact, "sip:2@h");
        assert_eq!(loc.next_deadline().await, Some(100));
        // Refresh contact 1 to 300: its old deadline (100) must not remove it.
        loc.set(
            "a@x",
            vec![
                binding("a@x", "sip:1@h", 300, 500),
                binding("a@x", "sip:2@h", 200, 900),
            ],
        )
        .await;
        assert!(loc.purge(150).await.is_empty());
        let gone = loc.purge(250).await;
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].contact, "sip:2@h");
        assert_eq!(loc.binding_count(), 1);
        assert_eq!(loc.purge(300).await.len(), 1);
        assert_eq!(loc.aor_count(), 0);
        assert_eq!(loc.next_deadline().await, None);
    }
}
