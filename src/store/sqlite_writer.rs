//! The one thread that writes a SQLite store: the registrar's binding changes (group commit,
//! see [`super::writer`]) and the call records' batches ([`Store::insert_cdr_batch`]), on a
//! `rusqlite` connection of its own to the pool's file.
//!
//! Why a thread of our own: sqlx runs every SQLite connection on a worker thread anyway, and
//! reaching it cost a round trip per statement plus a copy of every bound value into its
//! argument buffers. At 9,200 registrations/s a quarter of the registrar's CPU went to the
//! writer, only a third of that to SQLite itself (issue #15). Owning its connection, the
//! thread binds straight from the bindings and rows and answers the callers itself. And one
//! writer for both tables means the registrar's commits and the call records' never wait
//! for each other's lock (SQLite has one writer at a time; two connections would take turns
//! through the busy handler's sleeps).
//!
//! Statements are prepared once and reused: one upsert of one binding, one delete, one
//! insert of one call record; a batch of several is one `BEGIN IMMEDIATE` transaction that
//! runs them row by row (in-process, a statement costs no round trip; a multi-row statement
//! per batch size would keep up to 64 prepared programs each).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::cdr::Cdr;
use super::writer::{Change, MAX_CHANGES, QUEUE, gather, settle};
use super::{Sql, StoreError};

/// What the thread is handed.
pub(super) enum Job {
    /// One address-of-record's binding change (several go in one batch).
    Bindings(Change),
    /// Call records to insert in one transaction; `done` gets the outcome.
    Cdrs {
        rows: Arc<[Cdr]>,
        instance: Arc<str>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// The writer thread of one SQLite store, started on first use.
#[derive(Debug)]
pub(super) struct SqliteWriter {
    path: Arc<Path>,
    sql: Arc<Sql>,
    /// `None` when the thread could not be started (the pool writes instead).
    jobs: OnceLock<Option<mpsc::Sender<Job>>>,
    /// Set by [`super::Store::close`]: the thread refuses what it gets from then on and
    /// closes its connection, as the pool does.
    closed: Arc<AtomicBool>,
}

impl SqliteWriter {
    pub(super) fn new(path: Arc<Path>, sql: Arc<Sql>) -> Self {
        Self {
            path,
            sql,
            jobs: OnceLock::new(),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The store is closing: every job from now on fails.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// The thread's queue, starting the thread on the first call. It ends when every sender
    /// is gone (the store and its binding writers dropped): it holds no store itself.
    pub(super) fn jobs(&self) -> Option<&mpsc::Sender<Job>> {
        self.jobs
            .get_or_init(|| {
                let (tx, rx) = mpsc::channel(QUEUE);
                let (path, sql, closed) =
                    (self.path.clone(), self.sql.clone(), self.closed.clone());
                let spawned = std::thread::Builder::new()
                    .name("sqlite-writer".into())
                    .spawn(move || run(&path, &sql, &closed, rx));
                match spawned {
                    Ok(_) => Some(tx),
                    Err(e) => {
                        warn!(error = %e, "sqlite writer: no thread, writing through the pool");
                        None
                    }
                }
            })
            .as_ref()
    }
}

fn run(path: &Path, sql: &Sql, closed: &AtomicBool, mut rx: mpsc::Receiver<Job>) {
    let mut conn: Option<rusqlite::Connection> = None;
    // A job taken from the queue that could not join the batch being gathered.
    let mut held_job: Option<Job> = None;
    let mut held: Option<Change> = None;
    let mut batch: Vec<Change> = Vec::with_capacity(MAX_CHANGES);
    loop {
        let job = match (held.take(), held_job.take()) {
            (Some(c), job) => {
                held_job = job;
                Job::Bindings(c)
            }
            (None, Some(job)) => job,
            (None, None) => match rx.blocking_recv() {
                Some(job) => job,
                None => break,
            },
        };
        if closed.load(Ordering::Acquire) {
            conn = None;
            refuse(job);
            continue;
        }
        match job {
            Job::Bindings(first) => {
                // A call record batch met while gathering waits for the next turn.
                let mut next = || match rx.try_recv() {
                    Ok(Job::Bindings(c)) => Some(c),
                    Ok(other) => {
                        held_job = Some(other);
                        None
                    }
                    Err(_) => None,
                };
                gather(first, &mut next, &mut held, &mut batch);
                write_bindings(path, sql, &mut conn, &mut batch);
            }
            Job::Cdrs {
                rows,
                instance,
                done,
            } => {
                let r = with_conn(path, &mut conn, |c| insert_cdrs(c, sql, &rows, &instance));
                let _ = done.send(r);
            }
        }
    }
}

/// Answers a job of a closed store.
fn refuse(job: Job) {
    let closed = || Err(StoreError::Busy("store closed"));
    match job {
        Job::Bindings(c) => c.answer(closed()),
        Job::Cdrs { done, .. } => {
            let _ = done.send(closed());
        }
    }
}

/// Opens the thread's connection to the SQLite file the pool uses (created and in WAL mode
/// by [`super::Store::connect`]), with the pool's session settings.
fn open(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Runs `f` on the connection, opened first if needed; a failure drops the connection (the
/// next job opens a fresh one).
fn with_conn<T>(
    path: &Path,
    conn: &mut Option<rusqlite::Connection>,
    f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let c = match conn {
        Some(c) => c,
        None => match open(path) {
            Ok(c) => conn.insert(c),
            Err(e) => {
                warn!(error = %e, "sqlite writer: no database connection");
                return Err(StoreError::Busy("no database connection"));
            }
        },
    };
    let r = f(c);
    if r.is_err() {
        *conn = None;
    }
    r
}

/// Writes one batch of binding changes and answers their callers; leaves `batch` empty. A
/// batch that fails is written again change by change, so one bad change fails alone.
fn write_bindings(
    path: &Path,
    sql: &Sql,
    conn: &mut Option<rusqlite::Connection>,
    batch: &mut Vec<Change>,
) {
    let result = with_conn(path, conn, |c| sql.location.write_sqlite(c, batch));
    if settle(batch, result) {
        for change in batch.drain(..) {
            let one = std::slice::from_ref(&change);
            let r = with_conn(path, conn, |c| sql.location.write_sqlite(c, one));
            change.answer(r);
        }
    }
}

/// Inserts call records: one autocommit statement for one, a transaction for several.
fn insert_cdrs(
    conn: &mut rusqlite::Connection,
    sql: &Sql,
    rows: &[Cdr],
    instance: &str,
) -> Result<(), StoreError> {
    if let [row] = rows {
        return sql.cdr.insert_sqlite(conn, row, instance);
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for row in rows {
        sql.cdr.insert_sqlite(&tx, row, instance)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{Binding, BindingWriter, Cdr, Store};

    fn record(i: u64) -> Cdr {
        Cdr {
            call_id: format!("call-{i:03}"),
            from_uri: format!("sip:{i}@example.net"),
            to_uri: "sip:2000@example.net".into(),
            start: 1_000 + i,
            answer: (i % 2 == 0).then_some(1_002 + i),
            end: 1_010 + i,
            status: if i % 2 == 0 { 200 } else { 486 },
            reason: "bye".into(),
            caller: (i, i * 172, 1, 0.25),
            callee: (i + 1, (i + 1) * 172, 0, 1.5),
            request_uri: "sip:2000@example.net".into(),
            route: "location".into(),
            auth_user: format!("{i}"),
            source: "192.0.2.7:5060".into(),
            outcome: "answered".into(),
            hangup: "caller".into(),
            relayed: i % 3 == 0,
        }
    }

    fn binding(i: u64) -> Binding {
        let aor = format!("u{i:03}@example.net");
        super::super::writer::tests::binding(&aor, &format!("sip:u{i}@10.0.0.1:5062"), 7)
    }

    /// Call record batches and binding changes queued at once go through the one writer
    /// thread: every record lands with every column (and the instance) as written, and every
    /// binding lands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn call_records_and_bindings_share_the_thread() {
        let dir = std::env::temp_dir().join(format!("sipedge-sqlw-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::connect(&format!("sqlite://{}/s.db", dir.display()))
            .await
            .expect("sqlite store")
            .with_instance("edge-1");
        store.migrate().await.expect("migrations");
        let writer = BindingWriter::start(store.clone());

        let mut tasks = Vec::new();
        for b in 0..10u64 {
            let s = store.clone();
            let rows: Arc<[Cdr]> = (b * 20..b * 20 + 20).map(record).collect();
            tasks.push(tokio::spawn(async move { s.insert_cdr_batch(rows).await }));
        }
        for i in 0..200u64 {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move {
                let b = binding(i);
                let aor = b.aor.clone();
                w.save(&aor, vec![std::sync::Arc::new(b)], Vec::new())
                    .await
                    .map(|_| ())
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("written");
        }

        let cdrs = store.cdrs_since(0, 0).await.expect("cdrs");
        let want: Vec<Cdr> = (0..200).map(record).collect();
        assert_eq!(cdrs, want, "every record, every column");
        let newest = store.recent_cdrs(1).await.expect("recent");
        assert_eq!(newest[0]["instance"], "edge-1");
        let mut bindings = store.load_bindings(1_000).await.expect("bindings");
        bindings.sort_by(|a, b| a.aor.cmp(&b.aor));
        assert_eq!(bindings, (0..200).map(binding).collect::<Vec<_>>());
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
