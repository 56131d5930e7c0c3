//! The `meta` table: per-install values (the nonce secret), shared by every instance.

use sqlx::any::AnyRow;

use super::dialect::Dialect;
use super::{Store, StoreError, text};

/// `key` is a reserved word in MySQL: quoted (MySQL sessions use `ANSI_QUOTES`).
const KEY: &str = "\"key\"";

/// The table's queries in one dialect.
#[derive(Debug)]
pub(super) struct Sql {
    get: String,
    insert_if_absent: String,
}

impl Sql {
    pub(super) fn new(d: Dialect) -> Self {
        Self {
            get: d.sql(&format!("SELECT value FROM meta WHERE {KEY} = ?")),
            insert_if_absent: d.insert_if_absent("meta", &[KEY, "value"], &[KEY]),
        }
    }
}

impl Store {
    /// Reads a `meta` value.
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(&self.sql.meta.get)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r: AnyRow| text(&r, "value")).transpose()
    }

    /// Stores `value` under `key` unless a value is already there; returns the stored value.
    /// Several instances starting at once agree on one value.
    pub async fn meta_get_or_insert(&self, key: &str, value: &str) -> Result<String, StoreError> {
        sqlx::query(&self.sql.meta.insert_if_absent)
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        self.meta(key).await?.ok_or(StoreError::Corrupt {
            table: "meta",
            what: format!("{key} vanished after insert"),
        })
    }
}
