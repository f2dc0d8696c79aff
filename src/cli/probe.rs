//! `tlsbridge probe ROUTE|HOST:PORT [--starttls smtp|imap|pop3]`: connects exactly as the
//! upstream leg would (same roots, versions and dialog) and shows what it found.

use std::fmt::Write;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use rustls::pki_types::CertificateDer;

use crate::config::{Config, ConfigError, Protocol, Upstream, UpstreamMode};
use crate::tls::modern::{self, ModernConnector};
use crate::upstream::{self, Target};

/// The report, and whether the upstream leg would succeed.
pub async fn probe(
    config: &Config,
    target: &str,
    starttls: Option<Protocol>,
) -> Result<(String, bool)> {
    let (host, port, protocol, mode) = resolve(config, target, starttls)?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = modern::recording_config(&config.upstream_tls, seen.clone())
        .map_err(ConfigError::from_anyhow)?;
    let connector = ModernConnector::from_config(client);
    let client_name = config
        .device_tls
        .names
        .first()
        .cloned()
        .unwrap_or_else(|| "localhost".into());
    let timeout = config.upstream_tls.connect_timeout;
    let target = Target {
        host: host.clone(),
        port,
        protocol,
        mode,
        client_name,
        timeout,
    };
    let result = upstream::establish(&target, &connector).await;

    let mut out = String::new();
    let how = match mode {
        UpstreamMode::Starttls => format!("STARTTLS ({protocol})"),
        UpstreamMode::Tls => "implicit TLS".to_string(),
    };
    writeln!(
        out,
        "target:       {host}:{port}, {how}, TLS {}+",
        config.upstream_tls.min_version
    )?;
    if let Ok(leg) = &result {
        writeln!(out, "address:      {}", leg.addr)?;
        writeln!(out, "protocol:     {}", leg.tls_version)?;
        writeln!(out, "cipher:       {}", leg.cipher)?;
    }
    let chain = seen.lock().map(|c| c.clone()).unwrap_or_default();
    writeln!(
        out,
        "certificates: {}",
        if chain.is_empty() {
            "none received"
        } else {
            ""
        }
        .trim_end()
    )?;
    for (i, cert) in chain.iter().enumerate() {
        out += &describe(i, cert);
    }
    match &result {
        Ok(_) => writeln!(
            out,
            "verification: ok (certificate chain and name {host} verified)"
        )?,
        Err(err) => writeln!(out, "verification: FAILED: {err:#} [{}]", err.reason())?,
    }
    Ok((out, result.is_ok()))
}

fn resolve(
    config: &Config,
    target: &str,
    starttls: Option<Protocol>,
) -> Result<(String, u16, Protocol, UpstreamMode)> {
    if let Some(route) = config.routes.iter().find(|r| r.name == target) {
        let Upstream::Fixed { host, port } = &route.upstream else {
            bail!(ConfigError(format!(
                "route {target} routes by SNI; probe HOST:PORT instead"
            )));
        };
        let protocol = starttls.unwrap_or(route.protocol);
        return Ok((host.clone(), *port, protocol, route.upstream_tls));
    }
    match target.parse::<Upstream>() {
        Ok(Upstream::Fixed { host, port }) => Ok(match starttls {
            Some(protocol) => (host, port, protocol, UpstreamMode::Starttls),
            None => (host, port, Protocol::Tcp, UpstreamMode::Tls),
        }),
        _ => bail!(ConfigError(format!(
            "{target:?} is neither a route name nor HOST:PORT"
        ))),
    }
}

fn describe(index: usize, der: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => {
            let validity = cert.validity();
            format!(
                "  [{index}] subject: {}\n      issuer:  {}\n      valid:   {} .. {}\n",
                cert.subject(),
                cert.issuer(),
                validity.not_before,
                validity.not_after,
            )
        }
        Err(_) => format!(
            "  [{index}] (unparseable certificate, {} bytes)\n",
            der.len()
        ),
    }
}
