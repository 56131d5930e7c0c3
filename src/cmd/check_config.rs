//! `sipedge check-config`: validate, print the effective configuration.

use std::path::Path;

use super::{CmdError, load_config};

pub(crate) fn run(path: &Path) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    super::serve::warn_about(&cfg);
    print!("{}", cfg.effective_toml());
    eprintln!("{}: ok", path.display());
    Ok(())
}
