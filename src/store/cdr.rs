//! The `cdr` table: one call record per relayed call.

use sqlx::Row;

use super::dialect::Dialect;
use super::{Store, StoreError, text, to_i64};

/// One call record (`cdr` table). Serialisable: the CDR spool keeps it as a JSON line.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Why the media session closed: bye, cancel, failed, timeout, shutdown.
    pub reason: String,
    /// Received from the caller: packets, bytes, lost, jitter (ms).
    pub caller: (u64, u64, u64, f64),
    /// Received from the callee.
    pub callee: (u64, u64, u64, f64),
}

const COLS: [&str; 16] = [
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
];

/// The table's queries in one dialect.
#[derive(Debug)]
pub(super) struct Sql {
    insert: String,
    summary: String,
    recent: String,
}

impl Sql {
    pub(super) fn new(d: Dialect) -> Self {
        Self {
            insert: d.insert("cdr", &COLS),
            summary: d
                .sql("SELECT reason, status, caller_pkts, callee_pkts FROM cdr WHERE call_id = ?"),
            recent: d.sql("SELECT * FROM cdr ORDER BY end_ts DESC LIMIT ?"),
        }
    }
}

impl Store {
    /// Writes one call record (one per relayed call, when its media session closes).
    pub async fn insert_cdr(&self, c: &Cdr) -> Result<(), StoreError> {
        sqlx::query(&self.sql.cdr.insert)
            .bind(&c.call_id)
            .bind(&c.from_uri)
            .bind(&c.to_uri)
            .bind(to_i64(c.start))
            .bind(c.answer.map(to_i64))
            .bind(to_i64(c.end))
            .bind(i64::from(c.status))
            .bind(&c.reason)
            .bind(to_i64(c.caller.0))
            .bind(to_i64(c.caller.1))
            .bind(to_i64(c.caller.2))
            .bind(c.caller.3)
            .bind(to_i64(c.callee.0))
            .bind(to_i64(c.callee.1))
            .bind(to_i64(c.callee.2))
            .bind(c.callee.3)
            .execute(&self.pool)
            .await?;
        Ok(())
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
}
