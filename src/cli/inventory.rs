//! `tlsbridge inventory [--json]`: from the running instance's admin endpoint or, when none
//! answers, from the state file.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use super::admin_client;
use crate::config::Config;
use crate::inventory::{Client, Inventory};

/// Returns the rendered inventory and a line naming where it came from.
pub fn inventory(config: &Config, json: bool) -> Result<(String, String)> {
    let (clients, source) = match fetch(config) {
        Some(Ok(clients)) => {
            let admin = config.admin.listen.map(admin_client::local_address);
            (
                clients,
                format!(
                    "from the running instance at {}",
                    admin.map(|a| a.to_string()).unwrap_or_default()
                ),
            )
        }
        Some(Err(err)) => return Err(err),
        None => {
            let stored = Inventory::load(&config.state_dir, usize::MAX)?;
            let path = stored.path().display().to_string();
            (
                stored.snapshot(),
                format!("from {path} (no running instance answered)"),
            )
        }
    };
    let out = match json {
        true => serde_json::to_string_pretty(&clients)? + "\n",
        false => table(&clients),
    };
    Ok((out, format!("{} legacy device(s), {source}", clients.len())))
}

/// `None` when no admin endpoint answers; an error when one answers with nonsense.
fn fetch(config: &Config) -> Option<Result<Vec<Client>>> {
    let (status, body) = admin_client::get(config.admin.listen?, "/clients").ok()?;
    if status != 200 {
        return None;
    }
    Some(serde_json::from_str(&body).context("the admin endpoint's /clients is not an inventory"))
}

/// The inventory as a table for `tlsbridge inventory`.
fn table(clients: &[Client]) -> String {
    let join = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k}({v})"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let rows: Vec<[String; 8]> = clients
        .iter()
        .map(|c| {
            [
                c.ip.to_string(),
                c.last_seen.clone(),
                c.connections.to_string(),
                join(&c.versions),
                join(&c.ciphers),
                c.routes.iter().cloned().collect::<Vec<_>>().join(","),
                c.ehlo.clone(),
                c.last_sni.clone(),
            ]
        })
        .collect();
    let header = [
        "DEVICE",
        "LAST_SEEN",
        "CONNECTIONS",
        "TLS",
        "CIPHERS",
        "ROUTES",
        "EHLO",
        "SNI",
    ];
    super::table::table(&header, &rows)
}
