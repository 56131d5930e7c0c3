//! The `instance` table: every instance sharing the store, its SIP address (where the others
//! forward requests for the bindings it owns) and its last heartbeat (README "Several
//! instances").

use sqlx::Row;

use super::dialect::Dialect;
use super::{Store, StoreError, from_i64, text, to_i64};

/// One instance as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// `server.instance_id`.
    pub id: String,
    /// Its SIP address, `ip:port` (UDP).
    pub address: String,
    /// Unix seconds of its last heartbeat.
    pub heartbeat: u64,
}

/// Rows read at most (the table is written by the instances only; this bounds what a
/// damaged table can make us hold).
const MAX_INSTANCES: u32 = 1000;

/// The table's queries in one dialect.
#[derive(Debug)]
pub(super) struct Sql {
    upsert: String,
    list: String,
}

impl Sql {
    pub(super) fn new(d: Dialect) -> Self {
        Self {
            upsert: d.upsert(
                "instance",
                &["id", "address", "heartbeat"],
                &["id"],
                &["address", "heartbeat"],
            ),
            list: d.sql(&format!(
                "SELECT id, address, heartbeat FROM instance ORDER BY heartbeat DESC LIMIT {MAX_INSTANCES}"
            )),
        }
    }
}

impl Store {
    /// Records that instance `id` is alive at `now` and reachable at `address`; on
    /// PostgreSQL the other instances are told in the same transaction.
    pub async fn instance_heartbeat(
        &self,
        id: &str,
        address: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&self.sql.instance.upsert)
            .bind(id)
            .bind(address)
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await?;
        if self.is_postgres() {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(super::INSTANCE_CHANNEL)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every instance, the most recently alive first.
    pub async fn instances(&self) -> Result<Vec<Instance>, StoreError> {
        let rows = sqlx::query(&self.sql.instance.list)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Instance {
                    id: text(r, "id")?,
                    address: text(r, "address")?,
                    heartbeat: from_i64(r.try_get("heartbeat")?),
                })
            })
            .collect()
    }
}
