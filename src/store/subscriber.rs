//! The `subscriber` table: one row per user, HA1 hashes only.
//!
//! A subscriber imported from Kamailio/OpenSER has an MD5 HA1 and no SHA-256 one until their
//! password is next set: the column holds `''` then (it is `NOT NULL` since version 1, and
//! SQLite cannot drop a constraint without rebuilding the table), read back as `None`.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::dialect::Dialect;
use super::{Store, StoreError, from_i64, optional_text, text, to_i64};

/// A subscriber: HA1 hashes only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub username: String,
    pub domain: String,
    pub ha1_md5: String,
    /// `None` for a subscriber imported with an MD5 HA1 only (stored as `''`).
    pub ha1_sha256: Option<String>,
    pub created: u64,
    /// The number asserted for this subscriber (`P-Asserted-Identity` / `Remote-Party-ID` on
    /// routes with `identity`); `None`: the username is asserted.
    pub caller_id: Option<String>,
}

const COLS: [&str; 6] = [
    "username",
    "domain",
    "ha1_md5",
    "ha1_sha256",
    "created",
    "caller_id",
];
const KEY: [&str; 2] = ["username", "domain"];

/// The table's queries in one dialect.
#[derive(Debug)]
pub(super) struct Sql {
    insert: String,
    upsert: String,
    set_hashes: String,
    set_caller_id: String,
    delete: String,
    delete_bindings: String,
    get: String,
    list: String,
}

impl Sql {
    pub(super) fn new(d: Dialect) -> Self {
        let select = COLS.join(", ");
        Self {
            insert: d.insert("subscriber", &COLS),
            upsert: d.upsert("subscriber", &COLS, &KEY, &["ha1_md5", "ha1_sha256"]),
            set_hashes: d.sql(
                "UPDATE subscriber SET ha1_md5 = ?, ha1_sha256 = ? WHERE username = ? AND domain = ?",
            ),
            set_caller_id: d.sql(
                "UPDATE subscriber SET caller_id = ? WHERE username = ? AND domain = ?",
            ),
            delete: d.sql("DELETE FROM subscriber WHERE username = ? AND domain = ?"),
            delete_bindings: d.sql("DELETE FROM location WHERE aor = ?"),
            get: d.sql(&format!(
                "SELECT {select} FROM subscriber WHERE username = ? AND domain = ?"
            )),
            list: format!("SELECT {select} FROM subscriber ORDER BY domain, username"),
        }
    }
}

/// The values of [`COLS`], in order.
fn bind<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    s: &'q Subscriber,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    q.bind(&s.username)
        .bind(&s.domain)
        .bind(&s.ha1_md5)
        .bind(s.ha1_sha256.as_deref().unwrap_or_default())
        .bind(to_i64(s.created))
        .bind(s.caller_id.as_deref())
}

impl Store {
    /// Adds a subscriber; [`StoreError::Exists`] if there is one with that name.
    pub async fn add_subscriber(&self, s: &Subscriber) -> Result<(), StoreError> {
        if self.subscriber(&s.username, &s.domain).await?.is_some() {
            return Err(StoreError::Exists(format!("{}@{}", s.username, s.domain)));
        }
        bind(sqlx::query(&self.sql.subscriber.insert), s)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Adds or replaces many subscribers in one transaction (bulk import); returns how many.
    /// An existing subscriber keeps its caller ID unless the new row has one.
    pub async fn upsert_subscribers(&self, subs: &[Subscriber]) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        for s in subs {
            bind(sqlx::query(&self.sql.subscriber.upsert), s)
                .execute(&mut *tx)
                .await?;
            if let Some(id) = &s.caller_id {
                sqlx::query(&self.sql.subscriber.set_caller_id)
                    .bind(id)
                    .bind(&s.username)
                    .bind(&s.domain)
                    .execute(&mut *tx)
                    .await?;
            }
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
        let r = sqlx::query(&self.sql.subscriber.set_hashes)
            .bind(ha1_md5)
            .bind(ha1_sha256)
            .bind(username)
            .bind(domain)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Sets (or with `None` clears) the caller ID of an existing subscriber; false if there
    /// is none.
    pub async fn set_caller_id(
        &self,
        username: &str,
        domain: &str,
        caller_id: Option<&str>,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(&self.sql.subscriber.set_caller_id)
            .bind(caller_id)
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
        let r = sqlx::query(&self.sql.subscriber.delete)
            .bind(username)
            .bind(domain)
            .execute(&mut *tx)
            .await?;
        let aor = format!("{username}@{domain}");
        sqlx::query(&self.sql.subscriber.delete_bindings)
            .bind(&aor)
            .execute(&mut *tx)
            .await?;
        if self.is_postgres() {
            // Running instances drop the bindings from memory at once.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(super::LOCATION_CHANNEL)
                .bind(&aor)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    /// One subscriber, if there is one with that name.
    pub async fn subscriber(
        &self,
        username: &str,
        domain: &str,
    ) -> Result<Option<Subscriber>, StoreError> {
        let row = sqlx::query(&self.sql.subscriber.get)
            .bind(username)
            .bind(domain)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| from_row(&r)).transpose()
    }

    /// Every subscriber, by domain then username.
    pub async fn list_subscribers(&self) -> Result<Vec<Subscriber>, StoreError> {
        let rows = sqlx::query(&self.sql.subscriber.list)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }
}

fn from_row(r: &AnyRow) -> Result<Subscriber, StoreError> {
    Ok(Subscriber {
        username: text(r, "username")?,
        domain: text(r, "domain")?,
        ha1_md5: text(r, "ha1_md5")?,
        ha1_sha256: Some(text(r, "ha1_sha256")?).filter(|h| !h.is_empty()),
        created: from_i64(r.try_get("created")?),
        caller_id: optional_text(r, "caller_id")?,
    })
}
