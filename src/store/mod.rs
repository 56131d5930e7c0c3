//! Persistent state through sqlx (runtime queries, no build-time database): subscribers,
//! location bindings (write-through from the registrar), CDRs, and per-install values.
//!
//! SQLite is embedded and the default (the file is created on first use, WAL journal, busy
//! timeout); PostgreSQL is compiled in with the `postgres` feature so that several instances
//! can share one location store. The SQL is written once, portable between the two (the
//! `Any` driver passes it through; `$N` placeholders work in both).
//!
//! Migrations are embedded SQL files applied in order and recorded in `schema_version`.

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};

use crate::config::Proto;
use crate::registrar::location::Binding;

/// Schema migrations, applied in order. Never edit one that has shipped; add the next.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../migrations/0001_init.sql"))];

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names a backend this build does not include.
    #[error(
        "database URL {0:?}: unsupported (sqlite://PATH, or postgres:// with the postgres feature)"
    )]
    Unsupported(String),
    /// The database directory could not be created.
    #[error("creating {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    /// The database refused or failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored row holds a value sipedge cannot read back.
    #[error("corrupt row in {table}: {what}")]
    Corrupt { table: &'static str, what: String },
    /// The subscriber already exists.
    #[error("subscriber {0} already exists")]
    Exists(String),
}

/// A subscriber: HA1 hashes only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub username: String,
    pub domain: String,
    pub ha1_md5: String,
    pub ha1_sha256: String,
    pub created: u64,
}

/// A pool on SQLite or PostgreSQL.
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

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    sqlite: bool,
}

impl Store {
    /// Connects (creating a SQLite file and its directory if needed).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite {
            sqlite_url(url)?
        } else if cfg!(feature = "postgres")
            && (url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            url.to_owned()
        } else {
            return Err(StoreError::Unsupported(redact(url)));
        };
        let opts = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // Readers never block the writer, and a busy writer is waited for
                        // instead of failing the REGISTER.
                        sqlx::query("PRAGMA busy_timeout = 5000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        if sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        Ok(Self { pool, sqlite })
    }

    /// True for the embedded SQLite backend.
    pub fn is_sqlite(&self) -> bool {
        self.sqlite
    }

    /// Applies the migrations not yet applied; returns how many ran.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL PRIMARY KEY, applied BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let current: Option<i64> = sqlx::query("SELECT MAX(version) AS v FROM schema_version")
            .fetch_one(&self.pool)
            .await?
            .try_get("v")?;
        let current = current.unwrap_or(0);
        let mut ran = 0;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            let mut tx = self.pool.begin().await?;
            for stmt in statements(sql) {
                sqlx::query(&stmt).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO schema_version (version, applied) VALUES ($1, $2)")
                .bind(*version)
                .bind(unix_now_for_migration())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            ran += 1;
        }
        Ok(ran)
    }

    // ---- subscribers ------------------------------------------------------------------------

    pub async fn add_subscriber(&self, s: &Subscriber) -> Result<(), StoreError> {
        if self.subscriber(&s.username, &s.domain).await?.is_some() {
            return Err(StoreError::Exists(format!("{}@{}", s.username, s.domain)));
        }
        sqlx::query(
            "INSERT INTO subscriber (username, domain, ha1_md5, ha1_sha256, created) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&s.username)
        .bind(&s.domain)
        .bind(&s.ha1_md5)
        .bind(&s.ha1_sha256)
        .bind(to_i64(s.created))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Adds or replaces many subscribers in one transaction (bulk import); returns how many.
    pub async fn upsert_subscribers(&self, subs: &[Subscriber]) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        for s in subs {
            sqlx::query(
                "INSERT INTO subscriber (username, domain, ha1_md5, ha1_sha256, created) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (username, domain) DO UPDATE SET ha1_md5 = excluded.ha1_md5, ha1_sha256 = excluded.ha1_sha256",
            )
            .bind(&s.username)
            .bind(&s.domain)
            .bind(&s.ha1_md5)
            .bind(&s.ha1_sha256)
            .bind(to_i64(s.created))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(subs.len())
    }

    /// Replaces the hashes of an existing subscriber; false if there is none.
    pub async fn set_subscriber_hashes(
        &self,
        username: &str,
        domain: &str,
        ha1_md5: &str,
        ha1_sha256: &str,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE subscriber SET ha1_md5 = $1, ha1_sha256 = $2 WHERE username = $3 AND domain = $4",
        )
        .bind(ha1_md5)
        .bind(ha1_sha256)
        .bind(username)
        .bind(domain)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Removes a subscriber and their bindings; false if there was none.
    pub async fn delete_subscriber(
        &self,
        username: &str,
        domain: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("DELETE FROM subscriber WHERE username = $1 AND domain = $2")
            .bind(username)
            .bind(domain)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM location WHERE aor = $1")
            .bind(format!("{username}@{domain}"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn subscriber(
        &self,
        username: &str,
        domain: &str,
    ) -> Result<Option<Subscriber>, StoreError> {
        let row = sqlx::query(
            "SELECT username, domain, ha1_md5, ha1_sha256, created FROM subscriber WHERE username = $1 AND domain = $2",
        )
        .bind(username)
        .bind(domain)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| subscriber_from_row(&r)).transpose()
    }

    pub async fn list_subscribers(&self) -> Result<Vec<Subscriber>, StoreError> {
        let rows = sqlx::query(
            "SELECT username, domain, ha1_md5, ha1_sha256, created FROM subscriber ORDER BY domain, username",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(subscriber_from_row).collect()
    }

    // ---- per-install values -----------------------------------------------------------------

    /// Reads a `meta` value.
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<String, _>("value")).transpose()?)
    }

    /// Stores `value` under `key` unless a value is already there; returns the stored value.
    /// Several instances starting at once agree on one value.
    pub async fn meta_get_or_insert(&self, key: &str, value: &str) -> Result<String, StoreError> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        self.meta(key).await?.ok_or(StoreError::Corrupt {
            table: "meta",
            what: format!("{key} vanished after insert"),
        })
    }

    // ---- location -----------------------------------------------------------------------------

    /// Every binding that has not expired at `now`.
    pub async fn load_bindings(&self, now: u64) -> Result<Vec<Binding>, StoreError> {
        let rows = sqlx::query(
            "SELECT aor, contact, received, transport, local_socket, instance, expires, q, call_id, cseq, user_agent, path, instance_urn, updated \
             FROM location WHERE expires > $1",
        )
        .bind(to_i64(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(binding_from_row).collect()
    }

    /// Writes the new state of one address-of-record in a transaction: `upsert` are inserted
    /// or replaced, `remove` (contact URIs) deleted.
    pub async fn save_bindings(
        &self,
        aor: &str,
        upsert: &[Binding],
        remove: &[String],
    ) -> Result<(), StoreError> {
        // The common case, one contact refreshed: a single autocommit statement (a transaction
        // would cost three more round trips to the database thread).
        if let ([b], []) = (upsert, remove) {
            upsert_binding(b).execute(&self.pool).await?;
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for contact in remove {
            sqlx::query("DELETE FROM location WHERE aor = $1 AND contact = $2")
                .bind(aor)
                .bind(contact)
                .execute(&mut *tx)
                .await?;
        }
        for b in upsert {
            upsert_binding(b).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes bindings that expired at or before `now`; returns how many.
    pub async fn delete_expired(&self, now: u64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM location WHERE expires <= $1")
            .bind(to_i64(now))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    // ---- cdr ----------------------------------------------------------------------------------

    /// Writes one call record (one per relayed call, when its media session closes).
    pub async fn insert_cdr(&self, c: &Cdr) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO cdr (call_id, from_uri, to_uri, start_ts, answer_ts, end_ts, status, reason, \
             caller_pkts, caller_bytes, caller_lost, caller_jitter_ms, \
             callee_pkts, callee_bytes, callee_lost, callee_jitter_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
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

    /// The call records of one Call-ID: (reason, status, caller pkts, callee pkts).
    pub async fn cdr_summary(
        &self,
        call_id: &str,
    ) -> Result<Vec<(String, i64, i64, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT reason, status, caller_pkts, callee_pkts FROM cdr WHERE call_id = $1",
        )
        .bind(call_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
            .collect()
    }

    /// Empties every table (for tests on a shared PostgreSQL database).
    #[doc(hidden)]
    pub async fn reset_for_tests(&self) -> Result<(), StoreError> {
        for table in ["subscriber", "location", "cdr", "meta"] {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Closes the pool (waits for connections to return).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The upsert of one binding (portable `ON CONFLICT ... DO UPDATE`).
fn upsert_binding(b: &Binding) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
    sqlx::query(
        "INSERT INTO location (aor, contact, received, transport, local_socket, instance, expires, q, call_id, cseq, user_agent, path, instance_urn, updated) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
         ON CONFLICT (aor, contact) DO UPDATE SET received = excluded.received, transport = excluded.transport, \
         local_socket = excluded.local_socket, instance = excluded.instance, expires = excluded.expires, q = excluded.q, \
         call_id = excluded.call_id, cseq = excluded.cseq, user_agent = excluded.user_agent, path = excluded.path, \
         instance_urn = excluded.instance_urn, updated = excluded.updated",
    )
    .bind(&b.aor)
    .bind(&b.contact)
    .bind(b.received.to_string())
    .bind(b.transport.as_str())
    .bind(b.local_socket.to_string())
    .bind(&b.instance)
    .bind(to_i64(b.expires))
    .bind(f64::from(b.q) / 1000.0)
    .bind(&b.call_id)
    .bind(i64::from(b.cseq))
    .bind(&b.user_agent)
    .bind(&b.path)
    .bind(&b.instance_urn)
    .bind(to_i64(b.updated))
}

/// `sqlite://PATH` → an sqlx URL that creates the file, after creating its directory.
fn sqlite_url(url: &str) -> Result<String, StoreError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or_default();
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Err(StoreError::Unsupported(url.to_owned()));
    }
    if let Some(dir) = Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let sep = if rest.contains('?') { '&' } else { '?' };
    Ok(format!("sqlite://{rest}{sep}mode=rwc"))
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Splits a migration file into statements: `--` comments are dropped first (they may hold
/// semicolons), then the text is cut at `;` (our SQL has no semicolons in literals).
fn statements(sql: &str) -> Vec<String> {
    let code: String = sql
        .lines()
        .map(|l| l.split("--").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[allow(clippy::disallowed_methods)] // migration bookkeeping only, not protocol time
fn unix_now_for_migration() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| to_i64(d.as_secs()))
}

fn subscriber_from_row(r: &sqlx::any::AnyRow) -> Result<Subscriber, StoreError> {
    Ok(Subscriber {
        username: r.try_get("username")?,
        domain: r.try_get("domain")?,
        ha1_md5: r.try_get("ha1_md5")?,
        ha1_sha256: r.try_get("ha1_sha256")?,
        created: from_i64(r.try_get("created")?),
    })
}

fn binding_from_row(r: &sqlx::any::AnyRow) -> Result<Binding, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt {
        table: "location",
        what,
    };
    let addr = |col: &str| -> Result<SocketAddr, StoreError> {
        let v: String = r.try_get(col)?;
        v.parse().map_err(|_| corrupt(format!("{col} = {v:?}")))
    };
    let transport: String = r.try_get("transport")?;
    let transport = match transport.as_str() {
        "UDP" => Proto::Udp,
        "TCP" => Proto::Tcp,
        other => return Err(corrupt(format!("transport = {other:?}"))),
    };
    let q: f64 = r.try_get("q")?;
    Ok(Binding {
        aor: r.try_get("aor")?,
        contact: r.try_get("contact")?,
        received: addr("received")?,
        transport,
        local_socket: addr("local_socket")?,
        instance: r.try_get("instance")?,
        expires: from_i64(r.try_get("expires")?),
        // invariant: q is stored from a u16 per-mille value in 0..=1000.
        q: (q * 1000.0).round().clamp(0.0, 1000.0) as u16,
        call_id: r.try_get("call_id")?,
        cseq: u32::try_from(r.try_get::<i64, _>("cseq")?).map_err(|_| corrupt("cseq".into()))?,
        user_agent: r.try_get("user_agent")?,
        path: r.try_get("path")?,
        instance_urn: r.try_get("instance_urn")?,
        updated: from_i64(r.try_get("updated")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            redact("postgres://sip:secret@db.example/sip"),
            "postgres://sip:***@db.example/sip"
        );
        let dir = std::env::temp_dir().join(format!("sipedge-url-{}", std::process::id()));
        let url = format!("sqlite://{}/x/s.db", dir.display());
        assert!(sqlite_url(&url).unwrap().ends_with("/x/s.db?mode=rwc"));
        assert!(dir.join("x").is_dir());
        assert!(sqlite_url("sqlite::memory:").is_err());
    }

    #[test]
    fn migration_statements() {
        let stmts = statements(MIGRATIONS[0].1);
        assert_eq!(stmts.len(), 6, "4 tables and 2 indexes: {stmts:#?}");
        assert!(stmts.iter().all(|s| s.starts_with("CREATE")));
    }
}
