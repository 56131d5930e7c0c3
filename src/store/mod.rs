//! Persistent state through sqlx (runtime queries, no build-time database): subscribers,
//! location bindings (write-through from the registrar), CDRs, and per-install values.
//!
//! SQLite is embedded and the default (the file and its directory are created on first use,
//! `0600`/`0700` since the HA1 hashes are password-equivalent; WAL journal, busy timeout).
//! PostgreSQL (the `postgres` feature) and MySQL/MariaDB (the `mysql` feature) let several
//! instances share one store. One module per table; every query is written once, and
//! [`dialect`] produces the fragments that differ between the three (placeholders, upserts,
//! key column types in migrations). The queries are built once per store, at connect.

mod cdr;
mod dialect;
mod instance;
mod kamailio;
mod location;
mod meta;
mod migrate;
mod notify;
mod sqlite_writer;
mod subscriber;
mod writer;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow, AnyTypeInfoKind};
use sqlx::{AnyPool, Row, ValueRef};

pub use cdr::{Cdr, MAX_CDR_ROWS};
use dialect::Dialect;

/// A query on the `Any` pool, before its values are bound.
type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;
pub use instance::Instance;
pub use kamailio::{KamailioSubscriber, read_kamailio_subscribers};
pub use location::Binding;
pub use notify::{Change, Changes, INSTANCE_CHANNEL, LOCATION_CHANNEL};
pub use subscriber::Subscriber;
pub use writer::{BindingWriter, Written};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no backend sipedge knows.
    #[error(
        "database URL {0:?}: unsupported (sqlite://PATH, postgres://USER:PW@HOST/DB, \
         mysql://USER:PW@HOST/DB or mariadb://USER:PW@HOST/DB)"
    )]
    Unsupported(String),
    /// The URL names a backend that this build was compiled without.
    #[error(
        "database URL {url:?}: this sipedge was built without the `{feature}` cargo feature \
         (build it with: cargo build --release --features {feature})"
    )]
    FeatureMissing { url: String, feature: &'static str },
    /// The database directory or file could not be created.
    #[error("creating {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    /// The database refused or failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The SQLite file refused or failed (the store's writer thread, `sqlite_writer`).
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row holds a value sipedge cannot read back.
    #[error("corrupt row in {table}: {what}")]
    Corrupt { table: &'static str, what: String },
    /// The subscriber already exists.
    #[error("subscriber {0} already exists")]
    Exists(String),
    /// An embedded migration does not render in this dialect (a bug in sipedge).
    #[error("migration {version}: {what}")]
    Migration { version: i64, what: String },
    /// The store's writer cannot take the change now (its queue is full, or it stopped).
    #[error("database: {0}")]
    Busy(&'static str),
}

/// A pool on SQLite, PostgreSQL or MySQL/MariaDB, with its queries in that dialect.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    sql: Arc<Sql>,
    /// The URL (PostgreSQL's change notifications need a connection of their own).
    url: Arc<str>,
    /// A SQLite store's writer thread (binding changes and call records; started on first use).
    sqlite: Option<Arc<sqlite_writer::SqliteWriter>>,
    /// `server.instance_id`, written into the CDRs ([`Store::with_instance`]; '' by default).
    instance: Arc<str>,
}

/// Every query of every table, rendered once in the store's dialect.
#[derive(Debug)]
struct Sql {
    subscriber: subscriber::Sql,
    location: location::Sql,
    cdr: cdr::Sql,
    meta: meta::Sql,
    migrate: migrate::Sql,
    instance: instance::Sql,
}

impl Sql {
    fn new(d: Dialect) -> Self {
        Self {
            subscriber: subscriber::Sql::new(d),
            location: location::Sql::new(d),
            cdr: cdr::Sql::new(d),
            meta: meta::Sql::new(d),
            migrate: migrate::Sql::new(d),
            instance: instance::Sql::new(d),
        }
    }
}

impl Store {
    /// Connects (creating a SQLite file and its directory if needed). A URL whose backend
    /// this build lacks fails with [`StoreError::FeatureMissing`] naming the cargo feature.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::from_url(url)?;
        let given: Arc<str> = url.into();
        let sqlite_path =
            (dialect == Dialect::Sqlite).then(|| Arc::from(Path::new(sqlite_file(url))));
        let url = match dialect {
            Dialect::Sqlite => sqlite_url(url)?,
            Dialect::Postgres | Dialect::Mysql => url.to_owned(),
        };
        let opts = AnyConnectOptions::from_str(&url)?;
        let setup = dialect.session_setup();
        let pool = AnyPoolOptions::new()
            .max_connections(dialect.max_connections())
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    for stmt in setup {
                        sqlx::query(stmt).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        if dialect == Dialect::Sqlite {
            // Readers never block the writer (a property of the file, set once).
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        let sql = Arc::new(Sql::new(dialect));
        let sqlite =
            sqlite_path.map(|p| Arc::new(sqlite_writer::SqliteWriter::new(p, sql.clone())));
        Ok(Self {
            pool,
            dialect,
            sql,
            url: given,
            sqlite,
            instance: "".into(),
        })
    }

    /// The same store, writing `instance` (`server.instance_id`) into the CDRs.
    pub fn with_instance(mut self, instance: &str) -> Self {
        self.instance = instance.into();
        self
    }

    /// True for PostgreSQL: the backend several instances share, with change notifications
    /// (DESIGN §5).
    pub fn is_postgres(&self) -> bool {
        self.dialect == Dialect::Postgres
    }

    /// True for the embedded SQLite backend.
    pub fn is_sqlite(&self) -> bool {
        self.dialect == Dialect::Sqlite
    }

    /// Empties every table (for tests on a shared database server).
    #[doc(hidden)]
    pub async fn reset_for_tests(&self) -> Result<(), StoreError> {
        for table in ["subscriber", "location", "cdr", "meta", "instance"] {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Closes the pool (waits for connections to return) and the SQLite writer thread's
    /// connection: writes fail from now on.
    pub async fn close(&self) {
        if let Some(w) = &self.sqlite {
            w.close();
        }
        self.pool.close().await;
    }
}

/// `sqlite://PATH` → an sqlx URL that creates the file, after creating its directory
/// (`0700`) and the empty file (`0600`; SQLite gives its WAL and shared-memory files the
/// mode of the database file). An existing directory or file keeps its mode.
fn sqlite_url(url: &str) -> Result<String, StoreError> {
    let rest = sqlite_rest(url);
    let path = sqlite_file(url);
    if path.is_empty() || path == ":memory:" {
        return Err(StoreError::Unsupported(url.to_owned()));
    }
    let path = Path::new(path);
    let io_err = |p: &Path| {
        let p = p.display().to_string();
        move |source| StoreError::Dir { path: p, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(io_err(dir))?;
    }
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    match open.open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let sep = if rest.contains('?') { '&' } else { '?' };
    Ok(format!("sqlite://{rest}{sep}mode=rwc"))
}

/// What follows `sqlite://` (or `sqlite:`): the path and its query.
fn sqlite_rest(url: &str) -> &str {
    url.strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or_default()
}

/// The database file of a `sqlite://PATH[?query]` URL.
fn sqlite_file(url: &str) -> &str {
    sqlite_rest(url).split('?').next().unwrap_or_default()
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

/// A text column. MySQL's `TEXT` reaches the `Any` driver as bytes; the others as text.
fn text(r: &AnyRow, col: &str) -> Result<String, StoreError> {
    if r.try_get_raw(col)?.type_info().kind() == AnyTypeInfoKind::Blob {
        let bytes: Vec<u8> = r.try_get(col)?;
        return String::from_utf8(bytes).map_err(|e| StoreError::Db(sqlx::Error::Decode(e.into())));
    }
    Ok(r.try_get(col)?)
}

/// A nullable text column (`NULL` → `None`), read like [`text`].
fn optional_text(r: &AnyRow, col: &str) -> Result<Option<String>, StoreError> {
    if r.try_get_raw(col)?.is_null() {
        return Ok(None);
    }
    text(r, col).map(Some)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sipedge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn urls() {
        assert_eq!(
            redact("postgres://sip:secret@db.example/sip"),
            "postgres://sip:***@db.example/sip"
        );
        let dir = temp_dir("url");
        let url = format!("sqlite://{}/x/s.db", dir.display());
        assert!(sqlite_url(&url).unwrap().ends_with("/x/s.db?mode=rwc"));
        assert!(dir.join("x").is_dir());
        assert!(sqlite_url("sqlite::memory:").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// HA1 hashes are password-equivalent: the database file, its WAL and the directory
    /// sipedge creates for it are private to the owner.
    #[cfg(unix)]
    #[tokio::test]
    async fn sqlite_file_and_directory_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = temp_dir("perms");
        let db = dir.join("state").join("sipedge.db");
        let store = Store::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store.meta_get_or_insert("k", "v").await.unwrap();
        assert_eq!(mode(&dir), 0o700, "created parent");
        assert_eq!(mode(&dir.join("state")), 0o700, "created directory");
        assert_eq!(mode(&db), 0o600, "database file");
        let wal = dir.join("state").join("sipedge.db-wal");
        assert!(wal.exists(), "WAL journal in use");
        assert_eq!(mode(&wal), 0o600, "WAL file");
        store.close().await;

        // An existing file keeps the mode the operator gave it.
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
        let again = Store::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        assert_eq!(again.meta("k").await.unwrap().as_deref(), Some("v"));
        assert_eq!(mode(&db), 0o640);
        again.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
