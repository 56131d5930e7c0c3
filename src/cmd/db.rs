//! `sipedge db migrate`: create or upgrade the schema.

use std::path::Path;

use anyhow::Context as _;
use sipedge::store::Store;

use super::{CmdError, load_config, runtime};

pub(crate) fn migrate(path: &Path) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    runtime()?.block_on(async {
        let store = Store::connect(&cfg.database_url)
            .await
            .context("opening the database")
            .map_err(CmdError::Runtime)?;
        let n = store
            .migrate()
            .await
            .context("migrating the database")
            .map_err(CmdError::Runtime)?;
        println!("{n} migration(s) applied");
        Ok(())
    })
}
