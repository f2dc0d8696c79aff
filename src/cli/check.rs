//! `tlsbridge check`: validates the configuration and prints the effective routes.

use std::fmt::Write;

use anyhow::Result;

use crate::config::Config;
use crate::tls::{legacy::LegacyAcceptor, modern};

/// Validates everything that can be validated without binding ports and prints a summary.
pub fn check(config: &Config) -> Result<String> {
    modern::client_config(&config.upstream_tls).map_err(crate::config::ConfigError::from_anyhow)?;
    let tls = &config.device_tls;
    crate::tls::legacy::check_protocol_settings(tls)
        .map_err(crate::config::ConfigError::from_anyhow)?;
    let cert_state = if tls.cert.exists() && tls.key.exists() {
        LegacyAcceptor::new(tls).map_err(crate::config::ConfigError::from_anyhow)?;
        "present and usable"
    } else {
        "missing: generated from the local CA at start"
    };
    let mut out = String::new();
    let admin = config
        .admin
        .listen
        .map(|a| a.to_string())
        .unwrap_or_else(|| "disabled".into());
    writeln!(out, "configuration ok: {} route(s)", config.routes.len())?;
    writeln!(
        out,
        "device certificate: {} ({cert_state})",
        tls.cert.display()
    )?;
    writeln!(
        out,
        "device TLS: min_version {} ciphers {:?}",
        tls.min_version, tls.ciphers
    )?;
    writeln!(
        out,
        "upstream TLS: min_version {}, {} extra root file(s)",
        config.upstream_tls.min_version,
        config.upstream_tls.extra_roots.len()
    )?;
    writeln!(
        out,
        "admin: {admin}; state_dir: {}",
        config.state_dir.display()
    )?;
    writeln!(out)?;
    let header = [
        "ROUTE",
        "LISTEN",
        "PROTOCOL",
        "DEVICE_TLS",
        "UPSTREAM",
        "UPSTREAM_TLS",
        "ALLOW",
    ];
    let rows: Vec<[String; 7]> = config
        .routes
        .iter()
        .map(|r| {
            let allow: Vec<String> = r.allow.iter().map(|n| n.to_string()).collect();
            [
                r.name.clone(),
                r.listen.to_string(),
                r.protocol.to_string(),
                r.device_tls.to_string(),
                r.upstream.to_string(),
                r.upstream_tls.to_string(),
                allow.join(","),
            ]
        })
        .collect();
    out += &super::table::table(&header, &rows);
    Ok(out)
}
