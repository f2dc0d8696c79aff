//! `tlsbridge health`: exit 0 when the running instance's `/healthz` answers 200. Made for
//! container HEALTHCHECKs, which then need neither curl nor a shell.

use anyhow::{bail, Result};

use super::admin_client;
use crate::config::Config;

/// The admin token from `admin.token_file`, when configured.
pub fn token(config: &Config) -> Option<&str> {
    config.admin.token.as_ref().map(|t| t.expose())
}

pub fn health(config: &Config) -> Result<String> {
    let Some(listen) = config.admin.listen else {
        bail!("admin.listen is disabled: nothing to ask");
    };
    let (status, body) = admin_client::get_with_token(listen, "/healthz", token(config))?;
    if status != 200 {
        bail!("/healthz answered {status}: {}", body.trim());
    }
    Ok(format!(
        "healthy ({})\n",
        admin_client::local_address(listen)
    ))
}
