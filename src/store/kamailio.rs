//! Reading the `subscriber` table of a Kamailio/OpenSER database (`sipedge user import
//! --kamailio URL`): Kamailio's own schema (`auth_db-create.sql`: `username`, `domain`,
//! `password`, `ha1`, `ha1b`), on SQLite, PostgreSQL or MySQL/MariaDB. Only the names and the
//! `ha1` hash are read; the `password` column (plaintext, when Kamailio kept it) is not.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};

use super::dialect::Dialect;
use super::{StoreError, redact, text};

/// One row of Kamailio's `subscriber` table, as stored there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KamailioSubscriber {
    pub username: String,
    /// Empty when Kamailio ran with `use_domain = 0`.
    pub domain: String,
    /// MD5(username:realm:password), lower- or upper-case hex.
    pub ha1: String,
}

/// Every row of the `subscriber` table of the Kamailio database at `url` (read-only; a
/// SQLite file must exist).
pub async fn read_kamailio_subscribers(url: &str) -> Result<Vec<KamailioSubscriber>, StoreError> {
    sqlx::any::install_default_drivers();
    let dialect = Dialect::from_url(url)?;
    let url = match dialect {
        Dialect::Sqlite => {
            let path = url
                .strip_prefix("sqlite://")
                .unwrap_or_default()
                .split('?')
                .next()
                .unwrap_or_default();
            if !std::path::Path::new(path).is_file() {
                return Err(StoreError::Unsupported(format!("{url} (no such file)")));
            }
            format!("sqlite://{path}?mode=ro")
        }
        Dialect::Postgres | Dialect::Mysql => url.to_owned(),
    };
    let opts = AnyConnectOptions::from_str(&url)
        .map_err(|e| StoreError::Unsupported(format!("{}: {e}", redact(&url))))?;
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await?;
    let rows =
        sqlx::query("SELECT username, domain, ha1 FROM subscriber ORDER BY domain, username")
            .fetch_all(&pool)
            .await;
    pool.close().await;
    rows?
        .iter()
        .map(|r| {
            Ok(KamailioSubscriber {
                username: text(r, "username")?,
                domain: text(r, "domain")?,
                ha1: text(r, "ha1")?,
            })
        })
        .collect()
}
