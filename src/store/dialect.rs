//! The seam between the store's SQL and the backends: everything that differs between SQLite,
//! PostgreSQL and MySQL/MariaDB is answered here, so that every query is written once.
//!
//! - Placeholders: queries are written with `?`; PostgreSQL gets `$1, $2, …`.
//! - Upsert: `ON CONFLICT (key) DO UPDATE SET c = excluded.c` vs `ON DUPLICATE KEY UPDATE
//!   c = VALUES(c)`; "insert if absent": `ON CONFLICT (key) DO NOTHING` vs a no-op update of
//!   the key (not `INSERT IGNORE`, which would also swallow a too-long value).
//! - Migrations: `{key:N}` is a text column that is part of a key (`TEXT`, or `VARCHAR(N)` on
//!   MySQL, which cannot index `TEXT`), `{table}` follows each `CREATE TABLE (...)` (MySQL:
//!   InnoDB, utf8mb4 with binary collation, so that comparisons are exact as on the others).
//! - Quoting: identifiers that are reserved words (`"key"`) use standard double quotes; MySQL
//!   sessions run with `ANSI_QUOTES` so that they mean the same there.
//! - Session setup: SQLite's busy timeout; MySQL's strict mode.

use super::StoreError;

/// The SQL dialect of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// Embedded SQLite (always compiled in).
    Sqlite,
    /// PostgreSQL (the `postgres` feature).
    Postgres,
    /// MySQL or MariaDB (the `mysql` feature).
    Mysql,
}

impl Dialect {
    /// The dialect of a database URL, if this build includes its driver.
    pub(crate) fn from_url(url: &str) -> Result<Self, StoreError> {
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        let (dialect, feature, compiled) = match scheme {
            "sqlite" => return Ok(Self::Sqlite),
            "postgres" | "postgresql" => (Self::Postgres, "postgres", cfg!(feature = "postgres")),
            "mysql" | "mariadb" => (Self::Mysql, "mysql", cfg!(feature = "mysql")),
            _ => return Err(StoreError::Unsupported(super::redact(url))),
        };
        if !compiled {
            return Err(StoreError::FeatureMissing {
                url: super::redact(url),
                feature,
            });
        }
        if !url.starts_with(&format!("{scheme}://")) {
            return Err(StoreError::Unsupported(super::redact(url)));
        }
        Ok(dialect)
    }

    /// Connections in the pool: SQLite has one writer anyway.
    pub(crate) fn max_connections(self) -> u32 {
        match self {
            Self::Sqlite => 4,
            Self::Postgres | Self::Mysql => 16,
        }
    }

    /// Statements run on every new connection.
    pub(crate) fn session_setup(self) -> &'static [&'static str] {
        match self {
            // A busy writer is waited for instead of failing the REGISTER.
            Self::Sqlite => &["PRAGMA busy_timeout = 5000", "PRAGMA synchronous = NORMAL"],
            Self::Postgres => &[],
            // Standard identifier quotes, and errors instead of silent truncation.
            Self::Mysql => {
                &["SET SESSION sql_mode = CONCAT(@@sql_mode, ',ANSI_QUOTES,STRICT_ALL_TABLES')"]
            }
        }
    }

    /// `q` (written with `?` placeholders) in this dialect.
    pub(crate) fn sql(self, q: &str) -> String {
        match self {
            Self::Sqlite | Self::Mysql => q.to_owned(),
            Self::Postgres => {
                let mut out = String::with_capacity(q.len() + 16);
                let mut n = 0;
                for c in q.chars() {
                    if c == '?' {
                        n += 1;
                        out.push('$');
                        out.push_str(&n.to_string());
                    } else {
                        out.push(c);
                    }
                }
                out
            }
        }
    }

    /// `INSERT INTO table (cols) VALUES (?, …)`.
    pub(crate) fn insert(self, table: &str, cols: &[&str]) -> String {
        self.insert_rows(table, cols, 1)
    }

    /// `INSERT INTO table (cols) VALUES (?, …), (?, …), …` for `rows` rows (at least one).
    pub(crate) fn insert_rows(self, table: &str, cols: &[&str], rows: usize) -> String {
        let row = format!("({})", vec!["?"; cols.len()].join(", "));
        let values = vec![row.as_str(); rows.max(1)].join(", ");
        self.sql(&format!(
            "INSERT INTO {table} ({}) VALUES {values}",
            cols.join(", ")
        ))
    }

    /// Inserts a row, or sets `update` from it when a row with the same `key` exists.
    pub(crate) fn upsert(
        self,
        table: &str,
        cols: &[&str],
        key: &[&str],
        update: &[&str],
    ) -> String {
        self.upsert_rows(table, cols, key, update, 1)
    }

    /// [`Self::upsert`] of `rows` rows in one statement (their keys must differ: PostgreSQL
    /// refuses to update one row twice in a statement).
    pub(crate) fn upsert_rows(
        self,
        table: &str,
        cols: &[&str],
        key: &[&str],
        update: &[&str],
        rows: usize,
    ) -> String {
        let insert = self.insert_rows(table, cols, rows);
        match self {
            Self::Sqlite | Self::Postgres => {
                let set: Vec<String> = update
                    .iter()
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect();
                format!(
                    "{insert} ON CONFLICT ({}) DO UPDATE SET {}",
                    key.join(", "),
                    set.join(", ")
                )
            }
            Self::Mysql => {
                let set: Vec<String> = update
                    .iter()
                    .map(|c| format!("{c} = VALUES({c})"))
                    .collect();
                format!("{insert} ON DUPLICATE KEY UPDATE {}", set.join(", "))
            }
        }
    }

    /// Inserts a row unless one with the same `key` exists (then nothing changes).
    pub(crate) fn insert_if_absent(self, table: &str, cols: &[&str], key: &[&str]) -> String {
        let insert = self.insert(table, cols);
        match self {
            Self::Sqlite | Self::Postgres => {
                format!("{insert} ON CONFLICT ({}) DO NOTHING", key.join(", "))
            }
            // A no-op update: only a duplicate key is ignored, any other error still fails.
            Self::Mysql => {
                let same: Vec<String> = key.iter().map(|c| format!("{c} = {c}")).collect();
                format!("{insert} ON DUPLICATE KEY UPDATE {}", same.join(", "))
            }
        }
    }

    /// A migration file in this dialect: its `{key:N}` and `{table}` tokens replaced.
    pub(crate) fn migration(self, sql: &str) -> Result<String, String> {
        let mut out = String::with_capacity(sql.len() + 256);
        let mut rest = sql;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let end = rest[start..]
                .find('}')
                .ok_or_else(|| format!("unclosed token at {:?}", &rest[start..]))?;
            let token = &rest[start + 1..start + end];
            match (token.split_once(':'), self) {
                (None, _) if token == "table" => {
                    if self == Self::Mysql {
                        out.push_str(" ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin");
                    }
                }
                (Some(("key", n)), Self::Sqlite | Self::Postgres) if n.parse::<u16>().is_ok() => {
                    out.push_str("TEXT");
                }
                (Some(("key", n)), Self::Mysql) if n.parse::<u16>().is_ok() => {
                    out.push_str(&format!("VARCHAR({n})"));
                }
                _ => return Err(format!("unknown token {{{token}}}")),
            }
            rest = &rest[start + end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Dialect; 3] = [Dialect::Sqlite, Dialect::Postgres, Dialect::Mysql];

    #[test]
    fn placeholders() {
        let q = "SELECT a FROM t WHERE b = ? AND c = ?";
        assert_eq!(Dialect::Sqlite.sql(q), q);
        assert_eq!(Dialect::Mysql.sql(q), q);
        assert_eq!(
            Dialect::Postgres.sql(q),
            "SELECT a FROM t WHERE b = $1 AND c = $2"
        );
        assert_eq!(
            Dialect::Postgres.insert("t", &["a", "b", "c"]),
            "INSERT INTO t (a, b, c) VALUES ($1, $2, $3)"
        );
    }

    #[test]
    fn upserts() {
        let cols = ["k", "a", "b"];
        assert_eq!(
            Dialect::Sqlite.upsert("t", &cols, &["k"], &["a", "b"]),
            "INSERT INTO t (k, a, b) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET a = excluded.a, b = excluded.b"
        );
        assert_eq!(
            Dialect::Mysql.upsert("t", &cols, &["k"], &["a", "b"]),
            "INSERT INTO t (k, a, b) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE a = VALUES(a), b = VALUES(b)"
        );
        assert_eq!(
            Dialect::Postgres.upsert_rows("t", &cols, &["k"], &["a"], 2),
            "INSERT INTO t (k, a, b) VALUES ($1, $2, $3), ($4, $5, $6) ON CONFLICT (k) DO UPDATE SET a = excluded.a"
        );
        assert_eq!(
            Dialect::Mysql.upsert_rows("t", &cols, &["k"], &["a"], 2),
            "INSERT INTO t (k, a, b) VALUES (?, ?, ?), (?, ?, ?) ON DUPLICATE KEY UPDATE a = VALUES(a)"
        );
        assert_eq!(
            Dialect::Postgres.insert_if_absent("t", &["\"key\"", "v"], &["\"key\""]),
            "INSERT INTO t (\"key\", v) VALUES ($1, $2) ON CONFLICT (\"key\") DO NOTHING"
        );
        assert_eq!(
            Dialect::Mysql.insert_if_absent("t", &["\"key\"", "v"], &["\"key\""]),
            "INSERT INTO t (\"key\", v) VALUES (?, ?) ON DUPLICATE KEY UPDATE \"key\" = \"key\""
        );
    }

    #[test]
    fn migration_tokens() {
        let sql = "CREATE TABLE t (k {key:255} NOT NULL, v TEXT, PRIMARY KEY (k)){table};";
        assert_eq!(
            Dialect::Sqlite.migration(sql).unwrap(),
            "CREATE TABLE t (k TEXT NOT NULL, v TEXT, PRIMARY KEY (k));"
        );
        assert_eq!(
            Dialect::Postgres.migration(sql).unwrap(),
            Dialect::Sqlite.migration(sql).unwrap()
        );
        assert_eq!(
            Dialect::Mysql.migration(sql).unwrap(),
            "CREATE TABLE t (k VARCHAR(255) NOT NULL, v TEXT, PRIMARY KEY (k)) \
             ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;"
        );
        for d in ALL {
            assert!(d.migration("x {key:abc}").is_err(), "{d:?}");
            assert!(d.migration("x {nope}").is_err(), "{d:?}");
            assert!(d.migration("x {table").is_err(), "{d:?}");
        }
    }

    #[test]
    fn urls_pick_the_dialect_or_name_the_feature() {
        assert_eq!(
            Dialect::from_url("sqlite://data/x.db").unwrap(),
            Dialect::Sqlite
        );
        for (url, feature, compiled) in [
            (
                "postgres://u:pw@h/db",
                "postgres",
                cfg!(feature = "postgres"),
            ),
            (
                "postgresql://u:pw@h/db",
                "postgres",
                cfg!(feature = "postgres"),
            ),
            ("mysql://u:pw@h/db", "mysql", cfg!(feature = "mysql")),
            ("mariadb://u:pw@h/db", "mysql", cfg!(feature = "mysql")),
        ] {
            match Dialect::from_url(url) {
                Ok(_) => assert!(compiled, "{url}"),
                Err(e @ StoreError::FeatureMissing { .. }) => {
                    assert!(!compiled, "{url}");
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("--features {feature}")), "{msg}");
                    assert!(!msg.contains("pw"), "password redacted: {msg}");
                }
                Err(e) => panic!("{url}: {e}"),
            }
        }
        assert!(matches!(
            Dialect::from_url("oracle://h/db"),
            Err(StoreError::Unsupported(_))
        ));
        assert!(matches!(
            Dialect::from_url("nonsense"),
            Err(StoreError::Unsupported(_))
        ));
    }
}
