//! The async shell of accounting ([`crate::acc`]): the dialog table behind a lock, the wall
//! clock, and the CDR writer shared with the media side (retries, then the spool). The proxy
//! calls it when a call's final response goes upstream, when a BYE passes through, and at
//! shutdown; a task sweeps the table for `limits.dialog_max_age`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Mutex;

use crate::acc::{Dialogs, Start, log_end};
use crate::clock::Clock;
use crate::media::cdr::CdrWriter;
use crate::sip::Message;
use crate::store::Cdr;

/// How often the dialog table is swept for `limits.dialog_max_age`.
const SWEEP: Duration = Duration::from_secs(30);

/// The async shell: the dialog table behind a lock, the CDR writer, the clock.
pub struct Accounting {
    dialogs: Mutex<Dialogs>,
    cdr: Arc<CdrWriter>,
    clock: Arc<dyn Clock>,
    /// Mirrors of the table's counts, for the metrics (read without the lock).
    open: AtomicU64,
    evicted: AtomicU64,
}

impl Accounting {
    /// Writes through `cdr`; at most `max_dialogs` answered calls wait for their BYE, each
    /// `max_age` at most.
    pub fn new(
        cdr: Arc<CdrWriter>,
        clock: Arc<dyn Clock>,
        max_dialogs: usize,
        max_age: Duration,
    ) -> Self {
        Self {
            dialogs: Mutex::new(Dialogs::new(max_dialogs, max_age)),
            cdr,
            clock,
            open: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    /// Answered calls waiting for their BYE.
    pub fn dialogs(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Dialogs evicted by `limits.dialogs` since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// The final response of a call that is not relayed went upstream: a failure is written
    /// now, an answer opens its dialog (`callee_tag`: the To-tag of the 2xx).
    ///
    /// Never waits, like [`Self::bye`]: it runs at the end of the INVITE's transaction task,
    /// and an async version's future (the dialog table's lock, the writer's queue) was a
    /// 3.9 KB allocation per call (issue #15).
    pub fn finished(
        self: &Arc<Self>,
        start: Start,
        status: u16,
        callee_tag: Option<&str>,
        cancelled: bool,
    ) {
        let now = self.clock.unix();
        if !(200..300).contains(&status) {
            return self.write_soon(start.failed(status, cancelled, now));
        }
        let callee_tag = callee_tag.unwrap_or_default();
        if let Ok(mut d) = self.dialogs.try_lock() {
            let evicted = d.open(start, callee_tag, status, now);
            self.mirror(&d);
            drop(d);
            if let Some(row) = evicted {
                self.write_soon(row);
            }
            return;
        }
        let me = self.clone();
        let callee_tag = callee_tag.to_owned();
        tokio::spawn(async move {
            let evicted = {
                let mut d = me.dialogs.lock().await;
                let e = d.open(start, &callee_tag, status, now);
                me.mirror(&d);
                e
            };
            if let Some(row) = evicted {
                me.write(row).await;
            }
        });
    }

    /// A BYE passed through the proxy: closes its dialog, if it is one of ours. Never waits
    /// (it runs on the receive loop): the table's lock is held for moments, so it is mostly
    /// free; when it is not, a task closes the dialog. The row is queued the same way.
    pub fn bye(self: &Arc<Self>, msg: &Message) {
        let (Ok(call_id), Ok(from), Ok(to)) = (msg.call_id(), msg.from(), msg.to()) else {
            return;
        };
        let (Some(from_tag), Some(to_tag)) = (from.tag(), to.tag()) else {
            return;
        };
        let now = self.clock.unix();
        if let Ok(mut d) = self.dialogs.try_lock() {
            let row = self.close(&mut d, call_id, from_tag, to_tag, now);
            drop(d);
            if let Some(row) = row {
                self.write_soon(row);
            }
            return;
        }
        let me = self.clone();
        let ids = [call_id, from_tag, to_tag].map(str::to_owned);
        tokio::spawn(async move {
            let [call_id, from_tag, to_tag] = &ids;
            let row = me.close(
                &mut *me.dialogs.lock().await,
                call_id,
                from_tag,
                to_tag,
                now,
            );
            if let Some(row) = row {
                me.write(row).await;
            }
        });
    }

    /// Closes one dialog of the table (`bye`).
    fn close(
        &self,
        d: &mut Dialogs,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        now: u64,
    ) -> Option<Cdr> {
        let row = d.bye(call_id, from_tag, to_tag, now);
        self.mirror(d);
        row
    }

    /// [`Self::write`] without waiting: the row is queued, or written by a task when the
    /// writer's queue is full.
    fn write_soon(self: &Arc<Self>, row: Cdr) {
        log_end(&row);
        if let Some(row) = self.cdr.try_write(row) {
            let cdr = self.cdr.clone();
            tokio::spawn(async move { cdr.write(row).await });
        }
    }

    /// Closes the dialogs older than `limits.dialog_max_age`.
    pub async fn expire(&self) {
        let rows = {
            let mut d = self.dialogs.lock().await;
            let r = d.expire(self.clock.unix());
            self.mirror(&d);
            r
        };
        for row in rows {
            self.write(row).await;
        }
    }

    /// Sweeps the table every 30 s while the accounting lives.
    pub async fn sweep(me: Weak<Self>) {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(me) = me.upgrade() else { return };
            me.expire().await;
        }
    }

    /// Server shutdown: every open dialog is written (reason `shutdown`).
    pub async fn shutdown(&self) {
        let rows = {
            let mut d = self.dialogs.lock().await;
            let r = d.drain(self.clock.unix());
            self.mirror(&d);
            r
        };
        for row in rows {
            self.write(row).await;
        }
    }

    /// The `call ended` line and the row.
    pub async fn write(&self, row: Cdr) {
        log_end(&row);
        self.cdr.write(row).await;
    }

    /// Wall time (unix seconds).
    pub fn unix(&self) -> u64 {
        self.clock.unix()
    }

    fn mirror(&self, d: &Dialogs) {
        self.open.store(d.len() as u64, Ordering::Relaxed);
        self.evicted.store(d.evicted(), Ordering::Relaxed);
    }
}
