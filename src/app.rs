//! Assembling a running server from a configuration: store (migrated), nonce secret,
//! location service loaded from the store, listeners, registrar. Used by `sipedge serve` and
//! by the end-to-end tests, so both run the same wiring.

use std::sync::Arc;

use tracing::info;

use crate::auth::nonce::NonceKey;
use crate::auth::service::Authenticator;
use crate::clock::Clock;
use crate::config::Config;
use crate::registrar::location::Location;
use crate::registrar::service::{Context, Registrar};
use crate::store::{Store, StoreError};
use crate::transport::server::Server;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened, migrated or read.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// A `server.listen` socket could not be bound.
    #[error("{0}")]
    Bind(std::io::Error),
    /// No randomness for the nonce secret.
    #[error("reading /dev/urandom: {0}")]
    Random(std::io::Error),
    /// The stored nonce secret is not 64 hex digits.
    #[error("meta.nonce_secret in the database is not 64 hex digits")]
    Secret,
}

/// A server ready to run, and its store (to close on shutdown).
pub struct App {
    pub server: Server,
    pub proxy: Arc<crate::proxy::stateful::Proxy>,
    pub store: Store,
    pub location: Arc<Location>,
}

/// Opens and migrates the store, loads the location service, binds the listeners and
/// starts the registrar.
pub async fn build(cfg: Arc<Config>, clock: Arc<dyn Clock>) -> Result<App, StartError> {
    let store = Store::connect(&cfg.database_url).await?;
    let applied = store.migrate().await?;
    if applied > 0 {
        info!(applied, "database schema migrated");
    }
    let key = nonce_key(&store).await?;
    let location = Arc::new(Location::new());
    let bindings = store.load_bindings(clock.unix()).await?;
    info!(bindings = bindings.len(), "location service loaded");
    location.load(bindings).await;

    let mut server = Server::bind(cfg.clone(), Some(location.clone()), clock.clone())
        .await
        .map_err(StartError::Bind)?;
    let shards = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
    let auth = Arc::new(Authenticator::new(cfg.auth.clone(), store.clone(), key));
    server.set_authenticator(auth.clone());
    let ctx = Arc::new(Context {
        cfg,
        store: store.clone(),
        location: location.clone(),
        transports: server.transports(),
        auth,
        clock,
    });
    server.set_registrar(Registrar::start(ctx, shards));
    Ok(App {
        proxy: server.proxy(),
        server,
        store,
        location,
    })
}

/// The per-install nonce secret, generated on first start and kept in the store so that
/// nonces survive a restart and are shared by the instances on one database.
async fn nonce_key(store: &Store) -> Result<NonceKey, StartError> {
    let fresh = NonceKey::generate().map_err(StartError::Random)?;
    let hex: String = fresh
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stored = store.meta_get_or_insert("nonce_secret", &hex).await?;
    if stored.len() != 64 || !stored.is_ascii() {
        return Err(StartError::Secret);
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&stored[2 * i..2 * i + 2], 16).map_err(|_| StartError::Secret)?;
    }
    Ok(NonceKey::from_bytes(key))
}
