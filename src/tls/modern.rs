//! The upstream connector: rustls, TLS 1.2 minimum, web PKI roots plus `extra_roots`, server
//! name always verified. There is deliberately no way to turn verification off.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{ModernVersion, UpstreamTlsConfig};

/// The one client configuration all routes share (and with it the session-resumption cache).
pub struct ModernConnector {
    config: RwLock<Arc<ClientConfig>>,
}

impl ModernConnector {
    pub fn new(config: &UpstreamTlsConfig) -> Result<ModernConnector> {
        Ok(ModernConnector {
            config: RwLock::new(client_config(config)?),
        })
    }

    /// Re-reads `extra_roots`; on error the old configuration stays in use.
    pub fn reload(&self, config: &UpstreamTlsConfig) -> Result<()> {
        let new = client_config(config)?;
        *self
            .config
            .write()
            .map_err(|_| anyhow!("connector lock poisoned"))? = new;
        Ok(())
    }

    pub fn config(&self) -> Arc<ClientConfig> {
        match self.config.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The TLS handshake over an established TCP connection, verifying `host`.
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
        TlsConnector::from(self.config()).connect(name, tcp).await
    }
}

/// Builds the rustls client configuration from `[upstream_tls]`.
pub fn client_config(config: &UpstreamTlsConfig) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for path in &config.extra_roots {
        for cert in read_certificates(path)? {
            roots.add(cert).with_context(|| {
                format!(
                    "upstream_tls.extra_roots: {} holds an unusable certificate",
                    path.display()
                )
            })?;
        }
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
        ModernVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        ModernVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(client))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|err| {
            anyhow!(
                "upstream_tls.extra_roots: cannot read {}: {err}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "upstream_tls.extra_roots: {} holds no PEM certificate",
            path.display()
        );
    }
    Ok(certs)
}

/// A short, stable name for a handshake failure, for metrics labels and the session outcome.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "closed_during_handshake",
            _ => "handshake_io",
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(_) => "certificate_invalid",
        rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)
        | rustls::Error::PeerIncompatible(_) => "protocol_version",
        rustls::Error::AlertReceived(_) => "alert_received",
        _ => "handshake_failed",
    }
}
