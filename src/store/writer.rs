//! Group commit for the `location` table: the registrar's write-through without a database
//! round trip per REGISTER.
//!
//! One writer owns one connection of its own (no pool checkout, hence none of sqlx's
//! ping-on-release per statement) and writes the binding changes that are waiting when it
//! gets to them as one batch. On SQLite the writer is a thread with a `rusqlite` connection
//! to the pool's file (the statements are the same; sqlx would run them on a thread of its
//! own anyway, one round trip and a copy of every bound value away); on PostgreSQL and
//! MySQL/MariaDB it is a task on a detached connection of the pool. A batch is a single
//! multi-row upsert, in one transaction with the deletes and PostgreSQL's change
//! notifications when there are any. Every caller waits
//! for the commit of its own batch, so a 200 OK still never precedes a durable binding
//! (Kamailio's usrloc `db_mode=1`, write-through, at the cost of its `db_mode=2` write-back).
//! Under load the batches grow by themselves (the REGISTERs that arrived during one commit
//! go into the next), at low load a batch is one change and costs one statement, as before.
//!
//! A batch never holds two changes of one address-of-record (the next one waits for the next
//! batch), so the order of a batch's statements cannot reorder one AOR's history. When a
//! batch fails, its changes are retried one by one, so one bad change fails alone.

use std::sync::Arc;

use sqlx::Connection;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::location::Binding;
use super::sqlite_writer::Job;
use super::{Store, StoreError};

/// Changes waiting for the writer at most; a full queue makes the registrar answer 500.
pub(super) const QUEUE: usize = 4096;
/// Changes written in one batch at most.
pub(super) const MAX_CHANGES: usize = 64;
/// Bindings upserted by one statement at most (15 parameters each: far below every
/// backend's parameter limit).
const MAX_ROWS: usize = 256;

/// What a change wrote: its upserted bindings and removed contacts, handed back to the caller
/// once durable (for its log lines) instead of copied on the way in. The bindings are shared
/// with the memory side (the same `Arc`s the location service keeps): nothing is copied to be
/// written.
pub type Written = (Vec<Arc<Binding>>, Vec<String>);

/// One address-of-record's new state, and who waits for it.
pub(super) struct Change {
    pub(super) aor: String,
    pub(super) upsert: Vec<Arc<Binding>>,
    pub(super) remove: Vec<String>,
    done: oneshot::Sender<Result<Written, StoreError>>,
}

impl Change {
    pub(super) fn answer(self, r: Result<(), StoreError>) {
        let _ = self.done.send(r.map(|()| (self.upsert, self.remove)));
    }
}

/// The handle the location service writes through.
#[derive(Debug, Clone)]
pub struct BindingWriter {
    tx: Queue,
}

/// Where the changes go: the SQLite store's writer thread, or a task of our own.
#[derive(Debug, Clone)]
enum Queue {
    Thread(mpsc::Sender<Job>),
    Task(mpsc::Sender<Change>),
}

impl BindingWriter {
    /// Starts the writer on `store`: on SQLite the store's writer thread
    /// ([`super::sqlite_writer`]), on the database servers a task on a connection of the pool.
    pub fn start(store: Store) -> Self {
        match store.sqlite.as_ref().and_then(|w| w.jobs()) {
            Some(jobs) => Self {
                tx: Queue::Thread(jobs.clone()),
            },
            None => Self::start_task(store),
        }
    }

    /// The writer as a task on a connection taken from the pool (what the database servers
    /// use; on SQLite, tests run it to keep both paths exercised).
    fn start_task(store: Store) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Self {
            tx: Queue::Task(tx),
        }
    }

    /// Writes one AOR's change; returns when its batch is committed (or failed), with the
    /// change.
    pub async fn save(
        &self,
        aor: &str,
        upsert: Vec<Arc<Binding>>,
        remove: Vec<String>,
    ) -> Result<Written, StoreError> {
        self.submit(aor, upsert, remove)?.await
    }

    /// Queues one AOR's change now (changes of one AOR are written in the order they were
    /// queued); the returned future resolves when its batch is committed (or failed).
    fn submit(
        &self,
        aor: &str,
        upsert: Vec<Arc<Binding>>,
        remove: Vec<String>,
    ) -> Result<impl Future<Output = Result<Written, StoreError>> + use<>, StoreError> {
        let (done, wait) = oneshot::channel();
        let change = Change {
            aor: aor.to_owned(),
            upsert,
            remove,
            done,
        };
        let busy = |full: bool| {
            StoreError::Busy(if full {
                "location writer queue full"
            } else {
                "location writer stopped"
            })
        };
        match &self.tx {
            Queue::Thread(tx) => tx
                .try_send(Job::Bindings(change))
                .map_err(|e| busy(matches!(e, mpsc::error::TrySendError::Full(_))))?,
            Queue::Task(tx) => tx
                .try_send(change)
                .map_err(|e| busy(matches!(e, mpsc::error::TrySendError::Full(_))))?,
        }
        Ok(async move {
            wait.await
                .unwrap_or(Err(StoreError::Busy("location writer stopped")))
        })
    }
}

/// The next batch: `first` and the changes `next` hands over (those queued behind it), up to
/// [`MAX_CHANGES`] changes and [`MAX_ROWS`] rows, never two of one AOR (a change that cannot
/// join is `held` for the next batch).
pub(super) fn gather(
    first: Change,
    next: &mut impl FnMut() -> Option<Change>,
    held: &mut Option<Change>,
    batch: &mut Vec<Change>,
) {
    let mut rows = first.upsert.len();
    batch.push(first);
    while batch.len() < MAX_CHANGES {
        let Some(c) = next() else { break };
        // At most MAX_CHANGES to compare with: a scan, no set of copied keys per batch.
        if batch.iter().any(|b| b.aor == c.aor) || rows + c.upsert.len() > MAX_ROWS {
            *held = Some(c);
            break;
        }
        rows += c.upsert.len();
        batch.push(c);
    }
}

async fn run(store: Store, mut rx: mpsc::Receiver<Change>) {
    let mut conn: Option<sqlx::AnyConnection> = None;
    // A change that could not join the previous batch (its AOR was already in it).
    let mut held: Option<Change> = None;
    // One vector for every batch: growing a fresh one per batch cost reallocations of
    // kilobytes on the registrar's hot path.
    let mut batch: Vec<Change> = Vec::with_capacity(MAX_CHANGES);
    loop {
        let first = match held.take() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(c) => c,
                None => break,
            },
        };
        gather(first, &mut || rx.try_recv().ok(), &mut held, &mut batch);
        write(&store, &mut conn, &mut batch).await;
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

/// Writes one batch and answers its callers; leaves `batch` empty.
async fn write(store: &Store, conn: &mut Option<sqlx::AnyConnection>, batch: &mut Vec<Change>) {
    if conn.is_none() {
        match store.pool.acquire().await {
            // Detached: the pool neither pings it on every release nor waits for it at close.
            Ok(c) => *conn = Some(c.detach()),
            Err(e) => {
                let e = StoreError::from(e);
                warn!(error = %e, "location writer: no database connection");
                for c in batch.drain(..) {
                    c.answer(Err(StoreError::Busy("no database connection")));
                }
                return;
            }
        }
    }
    // invariant: set just above.
    let c = conn.as_mut().expect("connection acquired above");
    let result = store.write_bindings(c, batch).await;
    if result.is_err() {
        // The connection may be what failed: the next batch takes a fresh one.
        *conn = None;
    }
    if settle(batch, result) {
        for change in batch.drain(..) {
            let r = store
                .save_bindings(&change.aor, &change.upsert, &change.remove)
                .await;
            change.answer(r);
        }
    }
}

/// Answers the changes of a written batch: all of them when it was committed, the only one
/// when it failed alone. True when a batch of several failed: its changes are still in
/// `batch`, for the caller to write one by one (so one bad change fails alone).
pub(super) fn settle(batch: &mut Vec<Change>, result: Result<(), StoreError>) -> bool {
    match result {
        Ok(()) => {
            for c in batch.drain(..) {
                c.answer(Ok(()));
            }
            false
        }
        Err(e) if batch.len() == 1 => {
            if let Some(c) = batch.pop() {
                c.answer(Err(e));
            }
            false
        }
        Err(e) => {
            debug!(error = %e, changes = batch.len(), "location batch failed, writing its changes one by one");
            true
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::transport::Proto;

    /// A binding of `aor` at `contact` with every column set.
    pub(in crate::store) fn binding(aor: &str, contact: &str, cseq: u32) -> Binding {
        Binding {
            aor: aor.into(),
            contact: contact.into(),
            received: "192.0.2.7:40123".parse().expect("literal address"),
            nated: true,
            transport: Proto::Udp,
            local_socket: "192.0.2.1:5060".parse().expect("literal address"),
            instance: "t".into(),
            expires: 5000,
            q: 1000,
            call_id: format!("c-{aor}"),
            cseq,
            user_agent: "ua".into(),
            path: String::new(),
            instance_urn: String::new(),
            updated: 1000,
        }
    }

    /// Many AORs' changes written at once, and one AOR's successive changes, land exactly:
    /// the batches neither lose nor reorder a change. On the SQLite writer's thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_changes_land_exactly_and_in_order_per_aor() {
        changes_land_exactly("thread", BindingWriter::start).await;
    }

    /// The same through the pool's connection, as on PostgreSQL and MySQL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_writer_lands_changes_exactly_and_in_order_per_aor() {
        changes_land_exactly("task", BindingWriter::start_task).await;
    }

    async fn changes_land_exactly(engine: &str, start: fn(Store) -> BindingWriter) {
        let dir =
            std::env::temp_dir().join(format!("sipedge-writer-{engine}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::connect(&format!("sqlite://{}/s.db", dir.display()))
            .await
            .expect("sqlite store");
        store.migrate().await.expect("migrations");
        let writer = start(store.clone());

        let mut tasks = Vec::new();
        for i in 0..300 {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move {
                let aor = format!("u{i}@example.net");
                let two = [
                    binding(&aor, &format!("sip:a@10.0.0.{}", i % 250), 1),
                    binding(&aor, "sip:b@10.0.0.1", 1),
                ];
                w.save(&aor, two.map(Arc::new).to_vec(), Vec::new())
                    .await
                    .map(|_| ())
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("saved");
        }
        // One AOR's history, queued back to back without waiting: the last state wins.
        let aor = "seq@example.net";
        let mut waits = Vec::new();
        let last = |n: u32| {
            let mut b = binding(aor, "sip:seq@10.0.0.9", n);
            b.received = "[2001:db8::9]:40000".parse().expect("literal address");
            b.q = 500;
            b
        };
        for n in 1..=20u32 {
            let b = last(n);
            let old = binding(aor, "sip:old@10.0.0.9", n);
            let (upsert, remove) = if n % 2 == 0 {
                (vec![Arc::new(b)], vec!["sip:old@10.0.0.9".to_owned()])
            } else {
                (vec![Arc::new(b), Arc::new(old)], Vec::new())
            };
            waits.push(writer.submit(aor, upsert, remove).expect("queued"));
        }
        for w in waits {
            w.await.expect("saved");
        }

        let all = store.load_bindings(1000).await.expect("load");
        assert_eq!(all.iter().filter(|b| b.aor != aor).count(), 600);
        let seq = store.load_aor(aor, 1000).await.expect("load aor");
        assert_eq!(
            seq.len(),
            1,
            "the 20th change removed the old contact: {seq:?}"
        );
        assert_eq!(seq[0], last(20), "every column reads back as written");
        assert_eq!(
            all.iter()
                .find(|b| b.aor == "u7@example.net" && b.contact == "sip:b@10.0.0.1"),
            Some(&binding("u7@example.net", "sip:b@10.0.0.1", 1))
        );
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
