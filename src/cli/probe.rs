//! `tlsbridge probe ROUTE|HOST:PORT [--starttls smtp|imap|pop3]`: connects exactly as the
//! upstream leg would (same roots, versions and dialog) and shows what it found.

use std::fmt::Write;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use rustls::pki_types::CertificateDer;

use crate::config::{Config, ConfigError, Upstream, UpstreamMode};
use crate::protocol::Dialect;
use crate::tls::modern::{self, ModernConnector};
use crate::upstream::{self, Start, Target};

/// `tlsbridge probe`: prints the report; fails when the upstream leg would fail.
pub fn run(config: &Config, target: &str, starttls: Option<Dialect>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (report, ok) = runtime.block_on(probe(config, target, starttls))?;
    print!("{report}");
    if !ok {
        bail!("the upstream leg to {target} would fail");
    }
    Ok(())
}

/// The report, and whether the upstream leg would succeed.
pub async fn probe(
    config: &Config,
    target: &str,
    starttls: Option<Dialect>,
) -> Result<(String, bool)> {
    let (host, port, start) = resolve(config, target, starttls)?;
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
        start,
        client_name,
        timeout,
    };
    let result = upstream::establish(&target, &connector).await;

    let mut out = String::new();
    let how = match start {
        Start::Starttls(dialect) => format!("STARTTLS ({})", dialect.as_str()),
        Start::Tls(_) => "implicit TLS".to_string(),
    };
    writeln!(
        out,
        "target:       {host}:{port}, {how}, TLS {}+",
        config.upstream_tls.min_version
    )?;
    if let Ok(leg) = &result {
        writeln!(out, "address:      {}", leg.addr)?;
        writeln!(out, "protocol:     {}", leg.tls.version)?;
        writeln!(out, "cipher:       {}", leg.tls.cipher)?;
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
        Err(err) => writeln!(
            out,
            "verification: FAILED: {err:#} [{}]",
            err.cause().reason()
        )?,
    }
    Ok((out, result.is_ok()))
}

fn resolve(
    config: &Config,
    target: &str,
    starttls: Option<Dialect>,
) -> Result<(String, u16, Start)> {
    if let Some(route) = config.routes.iter().find(|r| r.name == target) {
        let Upstream::Fixed { host, port } = &route.upstream else {
            bail!(ConfigError(format!(
                "route {target} routes by SNI; probe HOST:PORT instead"
            )));
        };
        let dialect = starttls.or(Dialect::of(route.protocol));
        let start = match (route.upstream_tls, dialect) {
            (UpstreamMode::Starttls, Some(dialect)) => Start::Starttls(dialect),
            _ => Start::Tls(dialect),
        };
        return Ok((host.clone(), *port, start));
    }
    match target.parse::<Upstream>() {
        Ok(Upstream::Fixed { host, port }) => Ok(match starttls {
            Some(dialect) => (host, port, Start::Starttls(dialect)),
            None => (host, port, Start::Tls(None)),
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
