//! Schema migrations: embedded SQL files applied in order and recorded in `schema_version`.
//! A file is written once for every dialect, with `{key:N}` for text columns that are part of
//! a key and `{table}` after each `CREATE TABLE (...)` (see [`Dialect::migration`]).

use sqlx::Row;

use super::dialect::Dialect;
use super::{Store, StoreError, to_i64};

/// Schema migrations, applied in order. Never change what one renders to on a backend where it
/// has shipped; add the next.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/0001_init.sql")),
    (2, include_str!("../../migrations/0002_cdr_accounting.sql")),
    (
        3,
        include_str!("../../migrations/0003_identity_contacts.sql"),
    ),
    (4, include_str!("../../migrations/0004_instances.sql")),
];

/// The bookkeeping queries in one dialect.
#[derive(Debug)]
pub(super) struct Sql {
    record: String,
}

impl Sql {
    pub(super) fn new(d: Dialect) -> Self {
        Self {
            record: d.insert("schema_version", &["version", "applied"]),
        }
    }
}

impl Store {
    /// Applies the migrations not yet applied; returns how many ran. (On MySQL a schema
    /// change commits implicitly: a migration that fails half-way is not rolled back.)
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
            let stmts = render(self.dialect, *version, sql)?;
            let mut tx = self.pool.begin().await?;
            for stmt in stmts {
                sqlx::query(&stmt).execute(&mut *tx).await?;
            }
            sqlx::query(&self.sql.migrate.record)
                .bind(*version)
                .bind(unix_now_for_migration())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            ran += 1;
        }
        Ok(ran)
    }
}

/// One migration file as statements in `dialect`.
fn render(dialect: Dialect, version: i64, sql: &str) -> Result<Vec<String>, StoreError> {
    // Comments go first: they may hold semicolons and tokens.
    let code: String = sql
        .lines()
        .map(|l| l.split("--").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let code = dialect
        .migration(&code)
        .map_err(|what| StoreError::Migration { version, what })?;
    Ok(statements(&code))
}

/// Splits SQL without comments into statements, at `;` (our SQL has no semicolons in
/// literals).
fn statements(code: &str) -> Vec<String> {
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[allow(clippy::disallowed_methods)] // migration bookkeeping only, not protocol time
fn unix_now_for_migration() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| to_i64(d.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_statements() {
        for d in [Dialect::Sqlite, Dialect::Postgres, Dialect::Mysql] {
            for (version, sql) in MIGRATIONS {
                let stmts = render(d, *version, sql).unwrap();
                assert!(
                    stmts
                        .iter()
                        .all(|s| s.starts_with("CREATE") || s.starts_with("ALTER TABLE")),
                    "{d:?}"
                );
                assert!(!stmts.iter().any(|s| s.contains(['{', '}'])), "{d:?}");
            }
        }
        let stmts = render(Dialect::Sqlite, 1, MIGRATIONS[0].1).unwrap();
        assert_eq!(stmts.len(), 6, "4 tables and 2 indexes: {stmts:#?}");
        // Version 1 has shipped on SQLite and PostgreSQL: it renders to TEXT keys there.
        assert_eq!(
            render(Dialect::Postgres, 1, MIGRATIONS[0].1).unwrap(),
            stmts
        );
        assert!(stmts.iter().all(|s| !s.contains("VARCHAR")));
        assert!(
            stmts[0].contains("username    TEXT NOT NULL"),
            "{}",
            stmts[0]
        );
        // MySQL cannot index TEXT: every key column is bounded there, with exact comparison.
        let my = render(Dialect::Mysql, 1, MIGRATIONS[0].1).unwrap();
        assert!(
            my[0].contains("username    VARCHAR(255) NOT NULL"),
            "{}",
            my[0]
        );
        let tables: Vec<_> = my
            .iter()
            .filter(|s| s.starts_with("CREATE TABLE"))
            .collect();
        assert_eq!(tables.len(), 4);
        assert!(tables.iter().all(|s| s.ends_with("COLLATE=utf8mb4_bin")));
        // Version 2 adds the accounting columns one statement each (SQLite adds one column
        // per ALTER TABLE), the same in every dialect, and the index of `cdr export --since`.
        let v2 = render(Dialect::Sqlite, 2, MIGRATIONS[1].1).unwrap();
        assert_eq!(v2.len(), 8, "{v2:#?}");
        assert_eq!(v2[0], "ALTER TABLE cdr ADD COLUMN request_uri TEXT");
        assert_eq!(v2[7], "CREATE INDEX cdr_start ON cdr (start_ts)");
        for d in [Dialect::Postgres, Dialect::Mysql] {
            assert_eq!(render(d, 2, MIGRATIONS[1].1).unwrap(), v2, "{d:?}");
        }
        // Version 3: the subscriber's caller ID and the binding's NAT flag, alike everywhere.
        let v3 = render(Dialect::Sqlite, 3, MIGRATIONS[2].1).unwrap();
        assert_eq!(
            v3,
            [
                "ALTER TABLE subscriber ADD COLUMN caller_id TEXT",
                "ALTER TABLE location ADD COLUMN nated BIGINT NOT NULL DEFAULT 1",
            ]
        );
        for d in [Dialect::Postgres, Dialect::Mysql] {
            assert_eq!(render(d, 3, MIGRATIONS[2].1).unwrap(), v3, "{d:?}");
        }
        // Version 4: the instance table and the CDR's instance column.
        let (_, v4) = MIGRATIONS.iter().find(|(v, _)| *v == 4).unwrap();
        let v4 = render(Dialect::Mysql, 4, v4).unwrap();
        assert_eq!(v4.len(), 2, "{v4:#?}");
        assert!(
            v4[0].contains("id        VARCHAR(255) NOT NULL PRIMARY KEY"),
            "{}",
            v4[0]
        );
        assert_eq!(v4[1], "ALTER TABLE cdr ADD COLUMN instance TEXT");
    }
}
