//! Where the operations run: this host's fleet, or a daemon named by
//! `--remote` / `$FORKD_REMOTE` (bearer token from `$FORKD_TOKEN`). Every
//! command gets a `&dyn Operations` and prints the same either way.

use anyhow::{anyhow, Result};
use forkd_core::{Env, Fleet};
use forkd_ops::Operations;

/// The daemon to use, if any: the flag, else `$FORKD_REMOTE`.
pub fn daemon(flag: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var("FORKD_REMOTE").ok().filter(|s| !s.is_empty()))
}

/// The operations: a client of `remote` when set, else this host's fleet.
pub fn operations(remote: Option<&str>) -> Result<Box<dyn Operations>> {
    match remote {
        Some(spec) => {
            let token = std::env::var("FORKD_TOKEN").ok().filter(|t| !t.is_empty());
            let client =
                forkd_client::Client::new(spec, token).map_err(|e| anyhow!("--remote: {e}"))?;
            Ok(Box::new(client))
        }
        None => Ok(Box::new(Fleet::open(&Env::from_process())?)),
    }
}

/// Refuses commands that only make sense on this host.
pub fn local_only(remote: Option<&str>, command: &str) -> Result<()> {
    if remote.is_some() {
        return Err(crate::exit::Usage(format!(
            "`forkd {command}` runs on this host only; drop --remote (or unset FORKD_REMOTE)"
        ))
        .into());
    }
    Ok(())
}
