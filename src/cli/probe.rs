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

/// `tlsbridge probe ROUTE --xoauth2`: prints the report; fails unless the upstream accepts the
/// XOAUTH2 login.
pub fn run_xoauth2(config: &Config, route: &str, mailbox: Option<&str>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (report, ok) = runtime.block_on(probe_xoauth2(config, route, mailbox))?;
    print!("{report}");
    if !ok {
        bail!("the XOAUTH2 login through route {route} would fail");
    }
    Ok(())
}

/// Fetches a token with the `[oauth]` settings and runs the route's XOAUTH2 login upstream
/// without sending mail. The report names Entra's error code when the token is refused.
pub async fn probe_xoauth2(
    config: &Config,
    route_name: &str,
    mailbox: Option<&str>,
) -> Result<(String, bool)> {
    use crate::protocol::{self, LineConn, UpstreamAuthError, MAX_AUTH_LINE};
    use tokio::io::AsyncWriteExt;

    let Some(route) = config.routes.iter().find(|r| r.name == route_name) else {
        bail!(ConfigError(format!("no route named {route_name:?}")));
    };
    let Some(dialect) = Dialect::of(route.protocol) else {
        bail!(ConfigError(format!(
            "route {route_name} is a tcp route: XOAUTH2 needs smtp, imap or pop3"
        )));
    };
    let Some(mailbox) = mailbox
        .map(str::to_string)
        .or(route.default_mailbox.clone())
    else {
        bail!(ConfigError(format!(
            "route {route_name} has no default_mailbox: give --mailbox ADDRESS"
        )));
    };
    let mut out = String::new();
    let tls = modern::client_config(&config.upstream_tls).map_err(ConfigError::from_anyhow)?;
    let tokens = crate::oauth::TokenSource::from_config(&config.oauth, tls.clone())?;
    writeln!(out, "token endpoint: {}", tokens.endpoint())?;
    let token = match tokens.token().await {
        Ok(token) => {
            writeln!(out, "token:          ok")?;
            token
        }
        Err(err) => {
            writeln!(
                out,
                "token:          FAILED: {err} [{}]{}",
                err.reason(),
                err.aadsts()
                    .map(|code| format!(" Entra error {code}"))
                    .unwrap_or_default()
            )?;
            return Ok((out, false));
        }
    };
    let (host, port, start) = resolve(config, route_name, None)?;
    let client = match (&route.upstream_client_cert, &route.upstream_client_key) {
        (Some(cert), Some(key)) => {
            modern::client_config_with_identity(&config.upstream_tls, cert, key)
                .map_err(ConfigError::from_anyhow)?
                .0
        }
        _ => tls,
    };
    let connector = ModernConnector::from_config(client);
    let target = Target {
        host: host.clone(),
        port,
        start,
        client_name: config
            .device_tls
            .names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into()),
        timeout: config.upstream_tls.connect_timeout,
    };
    let mut leg = match upstream::establish(&target, &connector).await {
        Ok(leg) => leg,
        Err(err) => {
            writeln!(
                out,
                "upstream:       FAILED: {err:#} [{}]",
                err.cause().reason()
            )?;
            return Ok((out, false));
        }
    };
    writeln!(out, "upstream:       {host}:{port}, {}", leg.tls.version)?;
    let Some(initial) = protocol::sasl::xoauth2_initial_response(&mailbox, &token.token) else {
        writeln!(
            out,
            "xoauth2:        FAILED: {mailbox:?} cannot go into an XOAUTH2 login"
        )?;
        return Ok((out, false));
    };
    let mut conn = LineConn::with_max_line(&mut leg.stream, MAX_AUTH_LINE);
    let login = async {
        if dialect == Dialect::Smtp {
            protocol::smtp::upstream_ehlo(&mut conn, &target.client_name).await?;
        }
        protocol::upstream_xoauth2(dialect, &mut conn, &initial).await
    };
    let result = login.await;
    let goodbye: &[u8] = match dialect {
        Dialect::Smtp | Dialect::Pop3 => b"QUIT\r\n",
        Dialect::Imap => b"tb2 LOGOUT\r\n",
    };
    let _ = conn.send(goodbye).await;
    let _ = leg.stream.shutdown().await;
    match result {
        Ok(()) => {
            writeln!(out, "xoauth2:        ok, logged in as {mailbox}")?;
            Ok((out, true))
        }
        Err(UpstreamAuthError::Rejected(reply)) => {
            writeln!(out, "xoauth2:        REFUSED for {mailbox}: {reply}")?;
            writeln!(
                out,
                "hint:           check the app's {} application permission, its admin consent, \
                 the Exchange service principal and the mailbox permission",
                match dialect {
                    Dialect::Smtp => "SMTP.SendAsApp",
                    Dialect::Imap => "IMAP.AccessAsApp",
                    Dialect::Pop3 => "POP.AccessAsApp",
                }
            )?;
            Ok((out, false))
        }
        Err(UpstreamAuthError::Dialog(err)) => {
            writeln!(out, "xoauth2:        FAILED: {err}")?;
            Ok((out, false))
        }
    }
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
