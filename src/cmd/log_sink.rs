//! Where log lines go: to a writer thread through a bounded queue, so that no thread serving
//! SIP or media ever waits on stderr — a slow journald, a full pipe, a terminal on hold — or
//! on the others' writes (stderr is one lock; a line per call at info meant one `write` per
//! call under it on the receive loops, issue #15).
//!
//! A line is formatted by the thread that logs it (into a buffer of its own) and queued
//! whole, so lines never interleave. When the queue is full the line is dropped and counted
//! (`log_lines_dropped`); the writer says how many in a line of its own once it catches up.
//! The writer writes what is queued, flushes, and rests 10 ms before it looks again, so a
//! busy log goes out in batches (a line appears at most ~10 ms after it was logged).
//! [`LogGuard`] (kept by `main`) waits for the queue to drain when the process ends.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};

use tracing_subscriber::fmt::MakeWriter;

/// Lines queued at most (a few MB at the longest lines; a second of a busy info log).
pub(crate) const QUEUE: usize = 8192;
/// After writing a batch the writer rests this long, so that the lines of that time go out
/// as one batch: a writer woken for every line cost a wake-up and a `write` per line, more
/// than the direct `write` it replaced (a line per call at info, thousands per second).
const BATCH: std::time::Duration = std::time::Duration::from_millis(10);

/// The process's log sink's count of dropped lines (set by [`Sink::publish`]).
static PROCESS: OnceLock<Arc<AtomicU64>> = OnceLock::new();

/// Lines of the process's log dropped because the queue was full, since start.
pub(crate) fn dropped() -> u64 {
    PROCESS.get().map_or(0, |d| d.load(Relaxed))
}

/// What the queue carries.
enum Item {
    Line(Vec<u8>),
    /// Flush, then say so (the queue before it is written).
    Sync(SyncSender<()>),
}

/// The subscriber's writer factory: each event gets a [`Line`].
#[derive(Clone)]
pub(crate) struct Sink {
    tx: SyncSender<Item>,
    /// Lines dropped because the queue was full.
    dropped: Arc<AtomicU64>,
}

impl Sink {
    /// Makes this sink's count the process's ([`dropped`], the metric).
    pub(crate) fn publish(&self) {
        let _ = PROCESS.set(self.dropped.clone());
    }
}

/// Waits for the queue to be written when dropped (the end of `main`), or by [`Self::sync`].
pub(crate) struct LogGuard {
    tx: SyncSender<Item>,
}

/// Starts the writer thread on `out` (stderr in the binary).
pub(crate) fn start<W: Write + Send + 'static>(out: W) -> (Sink, LogGuard) {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let count = dropped.clone();
    // Detached: it ends with the process. Should it fail to start, the receiver is gone and
    // every line is written by its own thread, as before (`Line::drop`).
    let _ = std::thread::Builder::new()
        .name("log".into())
        .spawn(move || write_lines(&rx, out, &count));
    let guard = LogGuard { tx: tx.clone() };
    (Sink { tx, dropped }, guard)
}

impl LogGuard {
    /// Waits until every line queued so far is written and flushed.
    pub(crate) fn sync(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.tx.send(Item::Sync(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.sync();
    }
}

fn write_lines<W: Write>(rx: &Receiver<Item>, out: W, dropped: &AtomicU64) {
    let mut out = io::BufWriter::with_capacity(64 << 10, out);
    let mut reported = 0;
    // Says how many lines were dropped since it last said so.
    let mut report = |out: &mut io::BufWriter<W>| {
        let now = dropped.load(Relaxed);
        if now > reported {
            let _ = writeln!(
                out,
                "sipedge: {} log lines dropped: the log's queue ({QUEUE} lines) was full",
                now - reported
            );
            reported = now;
        }
    };
    while let Ok(first) = rx.recv() {
        let mut item = Some(first);
        // Everything queued, then one flush.
        while let Some(i) = item.take() {
            match i {
                Item::Line(l) => {
                    let _ = out.write_all(&l);
                }
                Item::Sync(done) => {
                    report(&mut out);
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            item = rx.try_recv().ok();
        }
        report(&mut out);
        let _ = out.flush();
        // Lines logged meanwhile queue without waking this thread (it is not waiting on the
        // queue while it sleeps).
        std::thread::sleep(BATCH);
    }
}

/// One event's line, queued when the formatter is done with it.
pub(crate) struct Line<'a> {
    buf: Vec<u8>,
    sink: &'a Sink,
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            buf: Vec::with_capacity(256),
            sink: self,
        }
    }
}

impl Write for Line<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        match self.sink.tx.try_send(Item::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.sink.dropped.fetch_add(1, Relaxed);
            }
            // The writer is gone (it cannot panic on its own; a failed thread start): write
            // here, as before.
            Err(TrySendError::Disconnected(Item::Line(l))) => {
                let _ = io::stderr().write_all(&l);
            }
            Err(TrySendError::Disconnected(Item::Sync(_))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, PoisonError};

    /// An output whose writes wait until released (a stalled stderr), recording what came.
    #[derive(Clone, Default)]
    struct Stalled {
        #[allow(clippy::disallowed_types)] // test double; never held across an await
        got: Arc<std::sync::Mutex<Vec<u8>>>,
        #[allow(clippy::disallowed_types)]
        gate: Arc<std::sync::Mutex<()>>,
    }

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            self.got
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log(sink: &Sink, text: &str) {
        let mut w = sink.make_writer();
        // The formatter writes a line in pieces.
        let (a, b) = text.split_at(text.len() / 2);
        w.write_all(a.as_bytes()).unwrap();
        w.write_all(b.as_bytes()).unwrap();
    }

    #[test]
    fn lines_arrive_whole_and_in_order_and_sync_waits_for_them() {
        let out = Stalled::default();
        let (sink, guard) = start(out.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        log(&sink, &format!("thread {t} line {i}\n"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        guard.sync();
        let got = String::from_utf8(out.got.lock().unwrap().clone()).unwrap();
        assert_eq!(got.lines().count(), 400);
        for t in 0..4 {
            let mine: Vec<_> = got
                .lines()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let want: Vec<_> = (0..100).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, want, "whole lines, in each thread's order");
        }
    }

    #[test]
    fn a_stalled_output_never_holds_up_the_logging_thread() {
        let out = Stalled::default();
        let gate = out.gate.lock().unwrap();
        let (sink, guard) = start(out.clone());
        let started = tokio::time::Instant::now();
        // Twice the queue while the output is stuck: every call returns at once.
        for i in 0..2 * QUEUE {
            log(&sink, &format!("line {i}\n"));
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "logging waited on the output"
        );
        let lost = sink.dropped.load(Relaxed);
        assert!(lost > 0, "the excess is dropped and counted");
        drop(gate);
        guard.sync();
        let got = String::from_utf8(out.got.lock().unwrap().clone()).unwrap();
        assert!(got.starts_with("line 0\n"), "the first lines were kept");
        let kept = got.lines().filter(|l| l.starts_with("line ")).count();
        assert_eq!(
            kept as u64 + lost,
            2 * QUEUE as u64,
            "every line kept or counted"
        );
        assert!(
            got.contains("log lines dropped: the log's queue (8192 lines) was full"),
            "the writer says what it dropped"
        );
    }
}
