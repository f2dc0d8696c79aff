//! The upstream connector: rustls, TLS 1.2 minimum, web PKI roots plus `extra_roots`, server
//! name always verified. There is deliberately no way to turn verification off.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::net::TcpStream;

use super::client::ClientStream;
use crate::config::{ModernVersion, UpstreamTlsConfig};
use crate::outcome::UpstreamFailure;

/// The one client configuration all routes share (and with it the session-resumption cache).
pub struct ModernConnector {
    config: RwLock<Arc<ClientConfig>>,
}

impl ModernConnector {
    pub fn new(config: &UpstreamTlsConfig) -> Result<ModernConnector> {
        Ok(Self::from_config(client_config(config)?))
    }

    pub fn from_config(config: Arc<ClientConfig>) -> ModernConnector {
        ModernConnector {
            config: RwLock::new(config),
        }
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
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> std::io::Result<ClientStream> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
        ClientStream::connect(self.config(), name, tcp).await
    }
}

/// Builds the rustls client configuration from `[upstream_tls]`.
pub fn client_config(config: &UpstreamTlsConfig) -> Result<Arc<ClientConfig>> {
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(config))?
        .with_root_certificates(roots(config)?)
        .with_no_client_auth();
    Ok(Arc::new(client))
}

/// The same configuration, presenting a client certificate (`route.upstream_client_cert` and
/// `upstream_client_key`, PEM) to upstreams that authenticate by certificate, such as
/// Microsoft 365 relay connectors. Also returns the key file's mode when group or others may
/// read it, for a warning at start.
pub fn client_config_with_identity(
    config: &UpstreamTlsConfig,
    cert: &Path,
    key: &Path,
) -> Result<(Arc<ClientConfig>, Option<u32>)> {
    use std::os::unix::fs::PermissionsExt;
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|err| {
            anyhow!(
                "upstream_client_cert: cannot read {}: {err}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        bail!(
            "upstream_client_cert: {} holds no PEM certificate",
            cert.display()
        );
    }
    // The error is the file's name only: a parse error could quote key material.
    let private = PrivateKeyDer::from_pem_file(key).map_err(|_| {
        anyhow!(
            "upstream_client_key: {} holds no readable PEM private key",
            key.display()
        )
    })?;
    let loose = std::fs::metadata(key)
        .map(|meta| meta.permissions().mode() & 0o777)
        .ok()
        .filter(|mode| mode & 0o077 != 0);
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(config))?
        .with_root_certificates(roots(config)?)
        .with_client_auth_cert(chain, private)
        .with_context(|| {
            format!(
                "upstream_client_cert/upstream_client_key: {} and {} do not form a usable pair",
                cert.display(),
                key.display()
            )
        })?;
    Ok((Arc::new(client), loose))
}

/// The same configuration, but the certificates the server presents are kept in `seen` so
/// `tlsbridge probe` can show them even when verification fails. Verification itself is the
/// standard web PKI verifier's, unchanged.
pub fn recording_config(
    config: &UpstreamTlsConfig,
    seen: Arc<Mutex<Vec<CertificateDer<'static>>>>,
) -> Result<Arc<ClientConfig>> {
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(config)?), provider())
        .build()?;
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(config))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recording { inner, seen }))
        .with_no_client_auth();
    Ok(Arc::new(client))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn versions(config: &UpstreamTlsConfig) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS12_AND_UP: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match config.min_version {
        ModernVersion::Tls12 => &TLS12_AND_UP,
        ModernVersion::Tls13 => &TLS13_ONLY,
    }
}

fn roots(config: &UpstreamTlsConfig) -> Result<RootCertStore> {
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
    Ok(roots)
}

/// Delegates every decision to the web PKI verifier; only records what the server presented.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Vec<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.clone().into_owned())
                .collect();
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
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

/// What the upstream leg's TLS turned out to be, for the log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The rustls suite name, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: &'static str,
    /// Time from the start of the TLS handshake to its end.
    pub handshake: std::time::Duration,
    /// The server certificate's notAfter (Unix seconds), for the expiry metric.
    pub certificate_expiry: Option<i64>,
}

impl UpstreamTls {
    pub fn of(session: &rustls::CommonState, handshake: std::time::Duration) -> UpstreamTls {
        let version = match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        let cipher = session
            .negotiated_cipher_suite()
            .and_then(|suite| suite.suite().as_str())
            .unwrap_or("");
        let certificate_expiry = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| certificate_expiry(leaf));
        UpstreamTls {
            version,
            cipher,
            handshake,
            certificate_expiry,
        }
    }
}

/// Certificates whose expiry was parsed, with it; the last [`KEEP`] (more upstream hosts than
/// that are not expected).
static PARSED: std::sync::Mutex<Vec<(Vec<u8>, Option<i64>)>> = std::sync::Mutex::new(Vec::new());
const KEEP: usize = 8;

/// The leaf certificate's expiry (Unix seconds), parsed once per certificate: resumed sessions
/// show the same few certificates again and again, and parsing one cost about 1 % of a session.
fn certificate_expiry(leaf: &[u8]) -> Option<i64> {
    let mut parsed = PARSED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, expiry)) = parsed.iter().find(|(der, _)| der == leaf) {
        return *expiry;
    }
    let expiry = x509_parser::parse_x509_certificate(leaf)
        .ok()
        .map(|(_, cert)| cert.validity().not_after.timestamp());
    if parsed.len() == KEEP {
        parsed.remove(0);
    }
    parsed.push((leaf.to_vec(), expiry));
    expiry
}

/// Names a handshake failure, for metrics labels and the session outcome.
pub fn failure_cause(err: &std::io::Error) -> UpstreamFailure {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => UpstreamFailure::ClosedDuringHandshake,
            _ => UpstreamFailure::HandshakeIo,
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(_) => UpstreamFailure::CertificateInvalid,
        rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)
        | rustls::Error::PeerIncompatible(_) => UpstreamFailure::ProtocolVersion,
        rustls::Error::AlertReceived(_) => UpstreamFailure::AlertReceived,
        _ => UpstreamFailure::HandshakeFailed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    #[test]
    fn certificate_expiry_is_parsed_once_per_certificate_and_stays_right() {
        let certs: Vec<(Vec<u8>, i64)> = (0..KEEP as i32 + 2)
            .map(|i| {
                let mut params = rcgen::CertificateParams::new(vec!["x.test".into()]).unwrap();
                params.not_after = rcgen::date_time_ymd(2030 + i, 1, 1);
                let key = rcgen::KeyPair::generate().unwrap();
                let cert = params.self_signed(&key).unwrap();
                (cert.der().to_vec(), params.not_after.unix_timestamp())
            })
            .collect();
        // Twice round more certificates than are kept: each answer is the certificate's own.
        for _ in 0..2 {
            for (der, expiry) in &certs {
                assert_eq!(certificate_expiry(der), Some(*expiry));
                assert_eq!(certificate_expiry(der), Some(*expiry), "from the cache");
            }
        }
        assert!(PARSED.lock().unwrap().len() <= KEEP);
        assert_eq!(certificate_expiry(b"not a certificate"), None);
    }

    fn upstream_tls() -> UpstreamTlsConfig {
        UpstreamTlsConfig {
            min_version: ModernVersion::Tls12,
            extra_roots: Vec::new(),
            connect_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_client_identity_loads_and_a_loose_key_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let pair = rcgen::generate_simple_self_signed(vec!["relay.contoso.com".into()]).unwrap();
        let (cert, key) = (dir.path().join("relay.crt"), dir.path().join("relay.key"));
        std::fs::write(&cert, pair.cert.pem()).unwrap();
        std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (config, loose) = client_config_with_identity(&upstream_tls(), &cert, &key).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        assert_eq!(loose, Some(0o644));

        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n").unwrap();
        let err = client_config_with_identity(&upstream_tls(), &cert, &key).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("upstream_client_key") && !text.contains("c2VjcmV0"),
            "{text}"
        );
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
        let err = client_config_with_identity(&upstream_tls(), &cert, &key).unwrap_err();
        assert!(format!("{err:#}").contains("usable pair"), "{err:#}");
    }
}
