//! Change notifications between instances sharing one PostgreSQL (DESIGN §5): every write to
//! `location` and every instance heartbeat sends a `NOTIFY` in the transaction of the write,
//! and each instance `LISTEN`s on a connection of its own ([`Store::listen`]), so a
//! registration made at one instance is in the others' memory as soon as it is committed.
//! SQLite and MySQL/MariaDB have no such thing and serve one instance.

use super::{Store, StoreError};

/// The channel of `location` changes; the payload is the address-of-record.
pub const LOCATION_CHANNEL: &str = "sipedge_location";
/// The channel of instance heartbeats; the payload is the instance id.
pub const INSTANCE_CHANNEL: &str = "sipedge_instance";

/// A change made by some instance (this one included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The bindings of this address-of-record changed.
    Location(String),
    /// An instance (re)started or is still alive.
    Instance(String),
}

/// The listening connection.
#[derive(Debug)]
pub struct Changes {
    #[cfg(feature = "postgres")]
    listener: sqlx::postgres::PgListener,
}

impl Store {
    /// Listens for changes (PostgreSQL only; elsewhere [`StoreError::Unsupported`]).
    pub async fn listen(&self) -> Result<Changes, StoreError> {
        #[cfg(feature = "postgres")]
        if self.is_postgres() {
            let mut listener = sqlx::postgres::PgListener::connect(&self.url).await?;
            listener
                .listen_all([LOCATION_CHANNEL, INSTANCE_CHANNEL])
                .await?;
            return Ok(Changes { listener });
        }
        Err(StoreError::Unsupported(format!(
            "{} (change notifications need PostgreSQL)",
            super::redact(&self.url)
        )))
    }
}

impl Changes {
    /// The next change; `None` when the connection was lost (notifications sent meanwhile are
    /// gone: the caller reloads everything; the next call reconnects).
    pub async fn next(&mut self) -> Result<Option<Change>, StoreError> {
        #[cfg(feature = "postgres")]
        loop {
            let Some(n) = self.listener.try_recv().await? else {
                return Ok(None);
            };
            let payload = n.payload().to_owned();
            match n.channel() {
                LOCATION_CHANNEL => return Ok(Some(Change::Location(payload))),
                INSTANCE_CHANNEL => return Ok(Some(Change::Instance(payload))),
                _ => continue,
            }
        }
        #[cfg(not(feature = "postgres"))]
        Ok(None)
    }
}
