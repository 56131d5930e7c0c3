//! Writing call records so that none is lost (issue #10 item 7): a CDR the database refuses is
//! retried a few times with backoff off the SIP path, then appended to a spool file (one JSON
//! object per line, `media.cdr_spool`), which the next start loads into the database and
//! removes. Only when the spool cannot be written either does the CDR end up in the log alone
//! (at `error`, whole, so an operator can still recover it).
//!
//! The spool format is [`Cdr`] as JSON, one per line, in the order the calls ended.
//!
//! Group commit, off the SIP path: `write` hands the row to a batcher and returns; the
//! batcher waits up to [`GATHER`] for more rows and writes what it has (at most
//! [`MAX_CDR_ROWS`]) as one multi-row INSERT, so the store commits once per batch, not once
//! per call. A BYE is forwarded without waiting for the database (it waited for the commit
//! before: a slow store held every call's teardown, and at 1,500 calls/s the store's worker
//! thread, woken for 2.5 rows per commit, was a sixth of sipedge's CPU). The queue is bounded
//! ([`QUEUE`]): when that many rows wait, `write` waits for room — the back-pressure a store
//! that cannot keep up imposes anyway. A batch the store refuses is written row by row, so
//! one bad row fails alone; a row that fails goes to the retries. [`CdrWriter::close`] (the
//! shutdown) writes what is queued and returns when every row is in the store or the spool;
//! after it, `write` itself inserts, or spools, before it returns.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::store::{Cdr, MAX_CDR_ROWS, Store};

/// Waits between the attempts after the first one failed: 0.5 s, 2 s, 8 s.
const BACKOFF: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(8),
];
/// One insert may take this long before it counts as failed (a hung database must not hold
/// the shutdown).
const INSERT_TIMEOUT: Duration = Duration::from_secs(5);
/// CDRs waiting for a retry at once; beyond that a failed CDR goes straight to the spool, so
/// a database outage under load holds bounded memory.
const MAX_RETRYING: usize = 1024;
/// CDRs waiting for the batcher at most; beyond it `write` waits for room (the back-pressure a
/// slow store imposes on the calls' ending anyway, now bounded).
const QUEUE: usize = 4096;
/// How long the batcher waits, after the first row of a batch, for more (a row is committed
/// this much later than it could be; at 1,500 calls/s a commit carries ~15 rows instead of 2.5).
pub const GATHER: Duration = Duration::from_millis(10);

/// What the batcher is handed.
#[allow(clippy::large_enum_variant)] // nearly every job is a row: boxing it would cost an
// allocation per CDR to shrink the rare flush
enum Job {
    /// A row to write.
    Row(Cdr),
    /// Answer once every row queued before this one was written (or handed to the retries).
    Flush(oneshot::Sender<()>),
}

/// Writes CDRs to the store, with retries and the spool behind it. Cheap to share (`Arc`).
pub struct CdrWriter {
    inner: Arc<Inner>,
    /// To the batcher (group commit).
    batch: mpsc::Sender<Job>,
}

struct Inner {
    store: Store,
    spool: PathBuf,
    backoff: Vec<Duration>,
    /// One append at a time, so lines never interleave.
    spool_lock: Mutex<()>,
    /// Records the store refused (spooled or lost), since start: the metric of CDR write
    /// failures.
    failed: AtomicU64,
    /// Batches the batcher wrote (each one statement).
    commits: AtomicU64,
    /// Background retries in flight.
    retrying: Mutex<JoinSet<()>>,
    /// Set at shutdown: retries skip their remaining waits and spool at once.
    closing: watch::Sender<bool>,
}

impl CdrWriter {
    /// A writer to `store`, spooling to `spool`.
    pub fn new(store: Store, spool: PathBuf) -> Self {
        Self::with_backoff(store, spool, BACKOFF.to_vec())
    }

    /// The same with other waits between retries (tests).
    pub fn with_backoff(store: Store, spool: PathBuf, backoff: Vec<Duration>) -> Self {
        let (closing, _) = watch::channel(false);
        let (batch, jobs) = mpsc::channel(QUEUE);
        let inner = Arc::new(Inner {
            store,
            spool,
            backoff,
            spool_lock: Mutex::new(()),
            failed: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            retrying: Mutex::new(JoinSet::new()),
            closing,
        });
        tokio::spawn(batcher(inner.clone(), jobs));
        Self { inner, batch }
    }

    /// Writes one CDR: hands it to the batcher and returns (waiting only while [`QUEUE`] rows
    /// are already queued). After [`Self::close`], inserts it here and returns once it is in
    /// the store or the spool.
    pub async fn write(&self, cdr: Cdr) {
        if *self.inner.closing.borrow() {
            return self.inner.write_now(cdr).await;
        }
        if let Err(mpsc::error::SendError(Job::Row(cdr))) = self.batch.send(Job::Row(cdr)).await {
            // The batcher is gone (the runtime is stopping): one insert of our own.
            self.inner.write_now(cdr).await;
        }
    }

    /// [`Self::write`] without waiting: queues the row, or gives it back when the queue is
    /// full or the writer is closing (then `write` it from a task).
    pub fn try_write(&self, cdr: Cdr) -> Option<Cdr> {
        if *self.inner.closing.borrow() {
            return Some(cdr);
        }
        match self.batch.try_send(Job::Row(cdr)) {
            Ok(()) => None,
            Err(e) => match e.into_inner() {
                Job::Row(cdr) => Some(cdr),
                // What was sent is the row itself: no other job can come back.
                Job::Flush(_) => None,
            },
        }
    }

    /// Returns once every CDR written before the call is committed, or handed to the retries.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.batch.send(Job::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    /// Shutdown: writes what is queued; pending retries stop waiting, try once more and spool
    /// what still fails; returns when every CDR is in the store or the spool. Later writes are
    /// inserted by `write` itself, and spooled at once if they fail.
    pub async fn close(&self) {
        self.inner.closing.send_replace(true);
        self.flush().await;
        let mut tasks = self.inner.retrying.lock().await;
        while tasks.join_next().await.is_some() {}
    }

    /// The spool file.
    pub fn spool_path(&self) -> &Path {
        &self.inner.spool
    }

    /// Batches of CDRs written since start (one statement each).
    pub fn commits(&self) -> u64 {
        self.inner.commits.load(Relaxed)
    }

    /// Records the store refused since start (spooled, or lost when the spool failed too).
    pub fn spooled(&self) -> u64 {
        self.inner.failed.load(Relaxed)
    }
}

impl Inner {
    /// One insert now; on failure, the retries (or the spool, when closing).
    async fn write_now(self: &Arc<Self>, cdr: Cdr) {
        if let Err(e) = insert(&self.store, &cdr).await {
            self.failed_once(cdr, e).await;
        }
    }

    /// A row's first attempt failed: retry it in the background, or spool it now when closing
    /// or when [`MAX_RETRYING`] rows are being retried already.
    async fn failed_once(self: &Arc<Self>, cdr: Cdr, error: String) {
        let mut tasks = self.retrying.lock().await;
        // Reap the finished ones: the set holds only retries in flight.
        while tasks.try_join_next().is_some() {}
        if *self.closing.borrow() || tasks.len() >= MAX_RETRYING {
            drop(tasks);
            warn!(%error, call_id = %cdr.call_id, "writing the CDR failed; spooled");
            self.spool(&cdr).await;
            return;
        }
        warn!(%error, call_id = %cdr.call_id, "writing the CDR failed; will retry");
        let inner = self.clone();
        let closing = self.closing.subscribe();
        tasks.spawn(async move { inner.retry(cdr, closing).await });
    }

    /// One batch in one statement; a batch the store refuses is written row by row (each row
    /// that fails goes to the retries). A batch that timed out goes to the retries whole: row
    /// by row, a hung store would hold the batcher for [`INSERT_TIMEOUT`] per row.
    async fn commit(self: &Arc<Self>, rows: Vec<Cdr>) {
        // Shared with the store's writer: the rows stay here for the failure paths below.
        let rows: Arc<[Cdr]> = rows.into();
        match tokio::time::timeout(INSERT_TIMEOUT, self.store.insert_cdr_batch(rows.clone())).await
        {
            Ok(Ok(())) => {
                self.commits.fetch_add(1, Relaxed);
            }
            Ok(Err(e)) if rows.len() > 1 => {
                warn!(error = %e, rows = rows.len(), "a batch of CDRs was refused; writing them one by one");
                for row in rows.iter() {
                    self.write_now(row.clone()).await;
                }
            }
            r => {
                let error = match r {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer from the database in {INSERT_TIMEOUT:?}"),
                };
                for row in rows.iter() {
                    self.failed_once(row.clone(), error.clone()).await;
                }
            }
        }
    }

    async fn retry(&self, cdr: Cdr, mut closing: watch::Receiver<bool>) {
        for (i, wait) in self.backoff.iter().enumerate() {
            if !*closing.borrow() {
                tokio::select! {
                    () = tokio::time::sleep(*wait) => {}
                    _ = closing.wait_for(|c| *c) => {}
                }
            }
            match insert(&self.store, &cdr).await {
                Ok(()) => {
                    info!(call_id = %cdr.call_id, attempt = i + 2, "CDR written after a retry");
                    return;
                }
                Err(error) if i + 1 == self.backoff.len() => {
                    warn!(%error, call_id = %cdr.call_id, "CDR still not written; spooling it");
                }
                Err(_) => {}
            }
            if *closing.borrow() {
                break;
            }
        }
        self.spool(&cdr).await;
    }

    /// Appends the CDR to the spool file; if that fails too, logs it whole.
    async fn spool(&self, cdr: &Cdr) {
        self.failed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _guard = self.spool_lock.lock().await;
        let path = self.spool.clone();
        let record = cdr.clone();
        let r = tokio::task::spawn_blocking(move || append(&path, &record)).await;
        match r {
            Ok(Ok(())) => {
                info!(call_id = %cdr.call_id, spool = %self.spool.display(), "CDR spooled");
            }
            Ok(Err(e)) => lost(cdr, &self.spool, &e.to_string()),
            Err(e) => lost(cdr, &self.spool, &e.to_string()),
        }
    }
}

/// The group commit: takes the first CDR waiting, waits up to [`GATHER`] for more (at most
/// [`MAX_CDR_ROWS`]; a flush cuts the wait short), and writes them in one statement. Ends
/// when every [`CdrWriter`] handle is gone.
async fn batcher(inner: Arc<Inner>, mut queue: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_CDR_ROWS);
    let flushing = |jobs: &[Job]| jobs.iter().any(|j| matches!(j, Job::Flush(_)));
    while queue.recv_many(&mut jobs, MAX_CDR_ROWS).await > 0 {
        let deadline = tokio::time::Instant::now() + GATHER;
        while jobs.len() < MAX_CDR_ROWS && !flushing(&jobs) {
            let room = MAX_CDR_ROWS - jobs.len();
            let more = queue.recv_many(&mut jobs, room);
            match tokio::time::timeout_at(deadline, more).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let mut rows = Vec::with_capacity(jobs.len());
        let mut flushed = Vec::new();
        for job in jobs.drain(..) {
            match job {
                Job::Row(cdr) => rows.push(cdr),
                Job::Flush(done) => flushed.push(done),
            }
        }
        if !rows.is_empty() {
            inner.commit(rows).await;
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

/// The last resort: the whole record in the log, for the operator.
fn lost(cdr: &Cdr, spool: &Path, error: &str) {
    let line = serde_json::to_string(cdr).unwrap_or_default();
    error!(%error, spool = %spool.display(), cdr = %line, "CDR neither written nor spooled");
}

async fn insert(store: &Store, cdr: &Cdr) -> Result<(), String> {
    match tokio::time::timeout(INSERT_TIMEOUT, store.insert_cdr(cdr)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer from the database in {INSERT_TIMEOUT:?}")),
    }
}

/// Appends one CDR as a JSON line (creating the file and its directory).
pub fn append(path: &Path, cdr: &Cdr) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut line = serde_json::to_vec(cdr).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // One write per line: O_APPEND keeps whole lines together.
    f.write_all(&line)?;
    f.sync_data()
}

/// The spool's records, and the lines that are not a CDR (kept, never dropped silently).
pub fn read(path: &Path) -> std::io::Result<(Vec<Cdr>, Vec<String>)> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e),
    };
    let mut cdrs = Vec::new();
    let mut bad = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Cdr>(&line) {
            Ok(c) => cdrs.push(c),
            Err(_) => bad.push(line),
        }
    }
    Ok((cdrs, bad))
}

/// What loading the spool did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loaded {
    /// CDRs written to the store.
    pub written: usize,
    /// Left in the spool: the store refused them again, or the line is not a CDR.
    pub kept: usize,
}

/// At start: writes every spooled CDR to the store. The file is removed when all went in;
/// otherwise it is replaced by the lines that did not (atomically, through a temporary file).
pub async fn load_spool(store: &Store, path: &Path) -> std::io::Result<Loaded> {
    let p = path.to_owned();
    let (cdrs, mut keep) = tokio::task::spawn_blocking(move || read(&p))
        .await
        .map_err(std::io::Error::other)??;
    if cdrs.is_empty() && keep.is_empty() {
        return Ok(Loaded::default());
    }
    let mut written = 0;
    for cdr in cdrs {
        match insert(store, &cdr).await {
            Ok(()) => written += 1,
            Err(error) => {
                warn!(%error, call_id = %cdr.call_id, "spooled CDR still not written; kept");
                keep.push(serde_json::to_string(&cdr).map_err(std::io::Error::other)?);
            }
        }
    }
    let kept = keep.len();
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if keep.is_empty() {
            return std::fs::remove_file(&p);
        }
        let tmp = p.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        for line in &keep {
            f.write_all(line.as_bytes())?;
            f.write_all(b"\n")?;
        }
        f.sync_data()?;
        std::fs::rename(&tmp, &p)
    })
    .await
    .map_err(std::io::Error::other)??;
    Ok(Loaded { written, kept })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdr(call_id: &str) -> Cdr {
        Cdr {
            call_id: call_id.into(),
            from_uri: "sip:alice@example.com".into(),
            to_uri: "sip:bob@example.com".into(),
            start: 1_700_000_000,
            answer: Some(1_700_000_002),
            end: 1_700_000_062,
            status: 200,
            reason: "bye".into(),
            caller: (3000, 516_000, 2, 1.25),
            callee: (2999, 515_828, 0, 0.5),
            route: "location".into(),
            outcome: "answered".into(),
            relayed: true,
            ..Cdr::default()
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sipedge-cdr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn spool_round_trip_keeps_order_and_bad_lines() {
        let p = temp("roundtrip.spool");
        assert_eq!(read(&p).unwrap(), (vec![], vec![]), "no spool: nothing");
        // A line an older sipedge spooled (before the accounting columns) still loads.
        std::fs::write(
            &p,
            "{\"call_id\":\"old\",\"from_uri\":\"f\",\"to_uri\":\"t\",\"start\":1,\
             \"answer\":null,\"end\":2,\"status\":487,\"reason\":\"cancel\",\
             \"caller\":[0,0,0,0.0],\"callee\":[0,0,0,0.0]}\n",
        )
        .unwrap();
        let (old, bad) = read(&p).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(
            (old[0].call_id.as_str(), old[0].route.as_str()),
            ("old", "")
        );
        std::fs::remove_file(&p).unwrap();
        append(&p, &cdr("a")).unwrap();
        append(&p, &cdr("b")).unwrap();
        // A line cut by a crash mid-write, then a good one after it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"call_id\":\"c\",\"from\n")
            .unwrap();
        append(&p, &cdr("d")).unwrap();
        let (cdrs, bad) = read(&p).unwrap();
        assert_eq!(cdrs, vec![cdr("a"), cdr("b"), cdr("d")]);
        assert_eq!(bad, vec!["{\"call_id\":\"c\",\"from".to_owned()]);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 4, "one JSON object per line");
        assert!(text.starts_with("{\"call_id\":\"a\""));
    }

    /// A migrated SQLite store in the temp directory.
    async fn store(name: &str) -> Store {
        let path = temp(name);
        let store = Store::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    }

    #[tokio::test]
    async fn a_refused_cdr_is_retried_in_the_background_then_spooled() {
        let db = store("retry.db").await;
        let p = temp("retry.spool");
        let w = CdrWriter::with_backoff(db.clone(), p.clone(), vec![Duration::from_millis(10); 3]);
        // Written while the store is up: no spool.
        w.write(cdr("ok")).await;
        w.flush().await;
        assert_eq!(db.cdr_summary("ok").await.unwrap().len(), 1);
        assert!(!p.exists());
        // The store goes away: the write returns at once, the batch fails, the retries run
        // behind it.
        db.close().await;
        w.write(cdr("down")).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while read(&p).unwrap().0.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never spooled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(read(&p).unwrap().0, vec![cdr("down")]);
        w.close().await;
        // Closed: a failed write is spooled before `write` returns.
        w.write(cdr("late")).await;
        assert_eq!(read(&p).unwrap().0, vec![cdr("down"), cdr("late")]);
    }

    #[tokio::test]
    async fn concurrent_cdrs_share_commits_and_each_gets_its_row() {
        let db = store("batch.db").await;
        let p = temp("batch.spool");
        let w = Arc::new(CdrWriter::new(db.clone(), p.clone()));
        let writes: Vec<_> = (0..300)
            .map(|i| {
                let w = w.clone();
                tokio::spawn(async move { w.write(cdr(&format!("b{i}"))).await })
            })
            .collect();
        for t in writes {
            t.await.unwrap();
        }
        w.flush().await;
        // Every row written before the flush is committed.
        for i in 0..300 {
            let rows = db.cdr_summary(&format!("b{i}")).await.unwrap();
            assert_eq!(rows.len(), 1, "b{i}");
        }
        assert!(!p.exists(), "nothing spooled");
        let commits = w.commits();
        assert!(
            (300usize.div_ceil(MAX_CDR_ROWS) as u64..300).contains(&commits),
            "300 CDRs in {commits} statements"
        );
    }

    #[tokio::test]
    async fn rows_written_one_after_another_share_a_commit() {
        let db = store("gather.db").await;
        let w = CdrWriter::new(db.clone(), temp("gather.spool"));
        // Each write returns without waiting for its commit (it waited for it before, and ten
        // writes in a row made ten commits).
        for i in 0..10 {
            w.write(cdr(&format!("g{i}"))).await;
        }
        w.flush().await;
        assert!(w.commits() < 10, "{} commits", w.commits());
        for i in 0..10 {
            assert_eq!(db.cdr_summary(&format!("g{i}")).await.unwrap().len(), 1);
        }
        // Closed: written before `write` returns.
        w.close().await;
        w.write(cdr("after")).await;
        assert_eq!(db.cdr_summary("after").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn close_cuts_the_backoff_short() {
        let db = store("close.db").await;
        let p = temp("close.spool");
        db.close().await;
        // An hour between retries: only `close` can end them.
        let w = CdrWriter::with_backoff(db, p.clone(), vec![Duration::from_secs(3600); 3]);
        w.write(cdr("x")).await;
        w.flush().await;
        assert!(read(&p).unwrap().0.is_empty(), "retrying, not spooled yet");
        tokio::time::timeout(Duration::from_secs(5), w.close())
            .await
            .expect("close does not wait out the backoff");
        assert_eq!(read(&p).unwrap().0, vec![cdr("x")]);
    }

    #[tokio::test]
    async fn the_spool_is_loaded_and_removed_or_kept_when_the_store_is_down() {
        let db = store("load.db").await;
        let p = temp("load.spool");
        assert_eq!(load_spool(&db, &p).await.unwrap(), Loaded::default());
        append(&p, &cdr("s1")).unwrap();
        append(&p, &cdr("s2")).unwrap();
        // Store down: nothing written, nothing lost.
        let down = store("load-down.db").await;
        down.close().await;
        assert_eq!(
            load_spool(&down, &p).await.unwrap(),
            Loaded {
                written: 0,
                kept: 2
            }
        );
        assert_eq!(read(&p).unwrap().0, vec![cdr("s1"), cdr("s2")]);
        // Store up: both written once, the file removed.
        assert_eq!(
            load_spool(&db, &p).await.unwrap(),
            Loaded {
                written: 2,
                kept: 0
            }
        );
        assert!(!p.exists());
        assert_eq!(db.cdr_summary("s1").await.unwrap().len(), 1);
        assert_eq!(db.cdr_summary("s2").await.unwrap().len(), 1);
    }

    #[test]
    fn append_creates_the_directory() {
        let dir = temp("newdir");
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("cdr.spool");
        append(&p, &cdr("x")).unwrap();
        assert_eq!(read(&p).unwrap().0, vec![cdr("x")]);
    }
}
