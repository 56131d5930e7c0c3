//! The `cdr` table: one call record per call (see [`crate::acc`] for which calls, and README
//! "Accounting"): read back by `sipedge cdr export`.

use std::sync::Arc;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::dialect::Dialect;
use super::{Store, StoreError, from_i64, text, to_i64};

/// One call record (`cdr` table). Serialisable: the CDR spool keeps it as a JSON line, and
/// `cdr export --format json` prints it. The fields added in schema version 2 default when
/// absent, so a spool written by an older sipedge still loads.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cdr {
    pub call_id: String,
    pub from_uri: String,
    pub to_uri: String,
    /// Unix seconds.
    pub start: u64,
    pub answer: Option<u64>,
    pub end: u64,
    /// Final status of the INVITE (0 when none was seen).
    pub status: u16,
    /// Why the call ended: bye, cancel, failed, timeout, evicted, shutdown.
    pub reason: String,
    /// Received from the caller: packets, bytes, lost, jitter (ms). Zero when not relayed.
    pub caller: (u64, u64, u64, f64),
    /// Received from the callee.
    pub callee: (u64, u64, u64, f64),
    /// The Request-URI of the INVITE as received.
    #[serde(default)]
    pub request_uri: String,
    /// The `[[route]]` name, "location", "foreign" or "local" (answered by sipedge itself).
    #[serde(default)]
    pub route: String,
    /// The user proxy authentication verified ('' when none was asked for).
    #[serde(default)]
    pub auth_user: String,
    /// ip:port the INVITE came from.
    #[serde(default)]
    pub source: String,
    /// answered, failed or cancelled.
    #[serde(default)]
    pub outcome: String,
    /// Who sent the BYE: caller or callee ('' when the call did not end by a BYE).
    #[serde(default)]
    pub hangup: String,
    /// Whether the media went through the relay (the media figures are then filled).
    #[serde(default)]
    pub relayed: bool,
}

const COLS: [&str; 23] = [
    "call_id",
    "from_uri",
    "to_uri",
    "start_ts",
    "answer_ts",
    "end_ts",
    "status",
    "reason",
    "caller_pkts",
    "caller_bytes",
    "caller_lost",
    "caller_jitter_ms",
    "callee_pkts",
    "callee_bytes",
    "callee_lost",
    "callee_jitter_ms",
    "request_uri",
    "route",
    "auth_user",
    "source",
    "outcome",
    "hangup",
    "relayed",
];

/// Rows per query of [`Store::cdrs_since`]: an export of a large table holds one page.
const EXPORT_PAGE: u32 = 5000;
/// Rows of one multi-row INSERT at most (24 parameters each: 1,536, far below every
/// backend's parameter limit).
pub const MAX_CDR_ROWS: usize = 64;

/// One row's values, in [`COLS`] order, then the instance. Strings are bound as `&str`: the
/// `Any` driver borrows those, where a `&String` is cloned before the backend copies it again.
fn bind<'q>(q: super::AnyQuery<'q>, c: &'q Cdr, instance: &'q str) -> super::AnyQuery<'q> {
    q.bind(c.call_id.as_str())
        .bind(c.from_uri.as_str())
        .bind(c.to_uri.as_str())
        .bind(to_i64(c.start))
        .bind(c.answer.map(to_i64))
        .bind(to_i64(c.end))
        .bind(i64::from(c.status))
        .bind(c.reason.as_str())
        .bind(to_i64(c.caller.0))
        .bind(to_i64(c.caller.1))
        .bind(to_i64(c.caller.2))
        .bind(c.caller.3)
        .bind(to_i64(c.callee.0))
        .bind(to_i64(c.callee.1))
        .bind(to_i64(c.callee.2))
        .bind(c.callee.3)
        .bind(c.request_uri.as_str())
        .bind(c.route.as_str())
        .bind(c.auth_user.as_str())
        .bind(c.source.as_str())
        .bind(c.outcome.as_str())
        .bind(c.hangup.as_str())
        .bind(i64::from(c.relayed))
        // Which instance wrote it: every instance on one database writes one table.
        .bind(instance)
}

/// The table's queries in one dialect.
#[derive(Debug)]
pub(super) struct Sql {
    insert: String,
    summary: String,
    recent: String,
    since: String,
    by_call: String,
}

impl Sql {
    pub(super) fn new(d: Dialect) -> Self {
        Self {
            insert: d.insert("cdr", &[&COLS[..], &["instance"]].concat()),
            summary: d
                .sql("SELECT reason, status, caller_pkts, callee_pkts FROM cdr WHERE call_id = ?"),
            recent: d.sql("SELECT * FROM cdr ORDER BY end_ts DESC LIMIT ?"),
            since: d.sql(&format!(
                "SELECT {} FROM cdr WHERE start_ts >= ? \
                 ORDER BY start_ts, call_id, end_ts LIMIT ? OFFSET ?",
                COLS.join(", ")
            )),
            by_call: d.sql(&format!(
                "SELECT {} FROM cdr WHERE call_id = ? ORDER BY start_ts, end_ts",
                COLS.join(", ")
            )),
        }
    }
}

impl Sql {
    /// Inserts one call record on the SQLite writer thread's connection
    /// ([`super::sqlite_writer`]): the one prepared single-row INSERT, bound in [`COLS`] order
    /// and then the instance, as [`bind`] does.
    pub(super) fn insert_sqlite(
        &self,
        db: &rusqlite::Connection,
        c: &Cdr,
        instance: &str,
    ) -> Result<(), StoreError> {
        let mut st = db.prepare_cached(&self.insert)?;
        let (a, b) = (&c.caller, &c.callee);
        st.raw_bind_parameter(1, c.call_id.as_str())?;
        st.raw_bind_parameter(2, c.from_uri.as_str())?;
        st.raw_bind_parameter(3, c.to_uri.as_str())?;
        st.raw_bind_parameter(4, to_i64(c.start))?;
        st.raw_bind_parameter(5, c.answer.map(to_i64))?;
        st.raw_bind_parameter(6, to_i64(c.end))?;
        st.raw_bind_parameter(7, i64::from(c.status))?;
        st.raw_bind_parameter(8, c.reason.as_str())?;
        st.raw_bind_parameter(9, to_i64(a.0))?;
        st.raw_bind_parameter(10, to_i64(a.1))?;
        st.raw_bind_parameter(11, to_i64(a.2))?;
        st.raw_bind_parameter(12, a.3)?;
        st.raw_bind_parameter(13, to_i64(b.0))?;
        st.raw_bind_parameter(14, to_i64(b.1))?;
        st.raw_bind_parameter(15, to_i64(b.2))?;
        st.raw_bind_parameter(16, b.3)?;
        st.raw_bind_parameter(17, c.request_uri.as_str())?;
        st.raw_bind_parameter(18, c.route.as_str())?;
        st.raw_bind_parameter(19, c.auth_user.as_str())?;
        st.raw_bind_parameter(20, c.source.as_str())?;
        st.raw_bind_parameter(21, c.outcome.as_str())?;
        st.raw_bind_parameter(22, c.hangup.as_str())?;
        st.raw_bind_parameter(23, i64::from(c.relayed))?;
        st.raw_bind_parameter(24, instance)?;
        st.raw_execute()?;
        Ok(())
    }
}

/// A text column added by a later migration: '' in rows written before it (NULL).
fn opt_text(r: &AnyRow, col: &str) -> Result<String, StoreError> {
    use sqlx::ValueRef;
    if r.try_get_raw(col)?.is_null() {
        return Ok(String::new());
    }
    text(r, col)
}

fn int(r: &AnyRow, col: &str) -> Result<u64, StoreError> {
    Ok(from_i64(r.try_get::<i64, _>(col)?))
}

fn leg(r: &AnyRow, side: &str) -> Result<(u64, u64, u64, f64), StoreError> {
    Ok((
        int(r, &format!("{side}_pkts"))?,
        int(r, &format!("{side}_bytes"))?,
        int(r, &format!("{side}_lost"))?,
        r.try_get(format!("{side}_jitter_ms").as_str())?,
    ))
}

fn row(r: &AnyRow) -> Result<Cdr, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt { table: "cdr", what };
    let status = r.try_get::<i64, _>("status")?;
    Ok(Cdr {
        call_id: text(r, "call_id")?,
        from_uri: text(r, "from_uri")?,
        to_uri: text(r, "to_uri")?,
        start: int(r, "start_ts")?,
        answer: r.try_get::<Option<i64>, _>("answer_ts")?.map(from_i64),
        end: r.try_get::<Option<i64>, _>("end_ts")?.map_or(0, from_i64),
        status: u16::try_from(status).map_err(|_| corrupt(format!("status {status}")))?,
        reason: text(r, "reason")?,
        caller: leg(r, "caller")?,
        callee: leg(r, "callee")?,
        request_uri: opt_text(r, "request_uri")?,
        route: opt_text(r, "route")?,
        auth_user: opt_text(r, "auth_user")?,
        source: opt_text(r, "source")?,
        outcome: opt_text(r, "outcome")?,
        hangup: opt_text(r, "hangup")?,
        relayed: r.try_get::<i64, _>("relayed")? != 0,
    })
}

impl Store {
    /// Writes one call record.
    pub async fn insert_cdr(&self, c: &Cdr) -> Result<(), StoreError> {
        self.insert_cdrs(std::slice::from_ref(c)).await
    }

    /// Writes call records in one statement (a multi-row INSERT: one commit for all of them,
    /// the group commit of [`crate::media::cdr::CdrWriter`]). At most [`MAX_CDR_ROWS`].
    pub async fn insert_cdrs(&self, rows: &[Cdr]) -> Result<(), StoreError> {
        let many;
        let sql = match rows.len() {
            0 => return Ok(()),
            1 => self.sql.cdr.insert.as_str(),
            n => {
                many = self
                    .dialect
                    .insert_rows("cdr", &[&COLS[..], &["instance"]].concat(), n);
                many.as_str()
            }
        };
        let instance = self.instance.as_ref();
        rows.iter()
            .fold(sqlx::query(sql), |q, c| bind(q, c, instance))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// [`Self::insert_cdrs`] for the CDR batcher: on SQLite the store's writer thread inserts
    /// them (one transaction, no round trip to sqlx's thread, the same connection as the
    /// registrar's commits); elsewhere the pool.
    pub async fn insert_cdr_batch(&self, rows: Arc<[Cdr]>) -> Result<(), StoreError> {
        let Some(jobs) = self.sqlite.as_ref().and_then(|w| w.jobs()) else {
            return self.insert_cdrs(&rows).await;
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        let job = super::sqlite_writer::Job::Cdrs {
            rows,
            instance: self.instance.clone(),
            done,
        };
        if jobs.send(job).await.is_err() {
            return Err(StoreError::Busy("sqlite writer stopped"));
        }
        answer
            .await
            .unwrap_or(Err(StoreError::Busy("sqlite writer stopped")))
    }

    /// The `limit` most recently ended calls, newest first, every column by name (for the
    /// control endpoint: new columns appear without a change here).
    pub async fn recent_cdrs(&self, limit: usize) -> Result<Vec<serde_json::Value>, StoreError> {
        use sqlx::{Column, Row as _};
        let rows = sqlx::query(&self.sql.cdr.recent)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let mut m = serde_json::Map::new();
                for col in r.columns() {
                    let name = col.name();
                    let v = if let Ok(v) = r.try_get::<Option<i64>, _>(name) {
                        serde_json::json!(v)
                    } else if let Ok(v) = r.try_get::<Option<f64>, _>(name) {
                        serde_json::json!(v)
                    } else if let Ok(v) = r.try_get::<Option<String>, _>(name) {
                        serde_json::json!(v)
                    } else if let Ok(v) = r.try_get::<Option<Vec<u8>>, _>(name) {
                        serde_json::json!(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    } else {
                        serde_json::Value::Null
                    };
                    m.insert(name.to_owned(), v);
                }
                serde_json::Value::Object(m)
            })
            .collect())
    }

    /// The call records of one Call-ID: (reason, status, caller pkts, callee pkts).
    pub async fn cdr_summary(
        &self,
        call_id: &str,
    ) -> Result<Vec<(String, i64, i64, i64)>, StoreError> {
        let rows = sqlx::query(&self.sql.cdr.summary)
            .bind(call_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    text(r, "reason")?,
                    r.try_get("status")?,
                    r.try_get("caller_pkts")?,
                    r.try_get("callee_pkts")?,
                ))
            })
            .collect()
    }

    /// Page `page` (of [`EXPORT_PAGE`] rows) of the calls that started at or after `since`
    /// (unix seconds), oldest first. An empty page is the end.
    pub async fn cdrs_since(&self, since: u64, page: u32) -> Result<Vec<Cdr>, StoreError> {
        let rows = sqlx::query(&self.sql.cdr.since)
            .bind(to_i64(since))
            .bind(i64::from(EXPORT_PAGE))
            .bind(i64::from(page) * i64::from(EXPORT_PAGE))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row).collect()
    }

    /// Every call record of one Call-ID, whole.
    pub async fn cdrs_of(&self, call_id: &str) -> Result<Vec<Cdr>, StoreError> {
        let rows = sqlx::query(&self.sql.cdr.by_call)
            .bind(call_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row).collect()
    }
}
