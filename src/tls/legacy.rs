//! The legacy acceptor: OpenSSL configured to accept what old devices speak.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use anyhow::{anyhow, bail, Context, Result};
use openssl::dh::Dh;
use openssl::ssl::{
    NameType, Ssl, SslAlert, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode,
    SslOptions, SslRef, SslVersion,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

use crate::config::{DeviceTlsConfig, LegacyVersion};

/// Suites that must never be offered, whatever the configured cipher string says.
const NEVER: &str = "!aNULL:!eNULL";

/// What the device's TLS turned out to be, for the log and the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTls {
    /// OpenSSL's protocol name: `SSLv3`, `TLSv1`, `TLSv1.1`, `TLSv1.2`, `TLSv1.3`.
    pub version: &'static str,
    /// OpenSSL's cipher name, e.g. `ECDHE-RSA-AES128-SHA`.
    pub cipher: String,
    /// The server name the device asked for, if any.
    pub sni: Option<String>,
    /// True when the key exchange gives forward secrecy (ECDHE/DHE, or any TLS 1.3 suite).
    pub forward_secrecy: bool,
    /// How long the handshake took.
    pub handshake: std::time::Duration,
}

impl DeviceTls {
    fn of(ssl: &SslRef, handshake: std::time::Duration) -> DeviceTls {
        let cipher = ssl.current_cipher();
        let description = cipher.map(|c| c.description()).unwrap_or_default();
        let kx = description
            .split_whitespace()
            .find_map(|field| field.strip_prefix("Kx="))
            .unwrap_or("");
        DeviceTls {
            version: ssl.version_str(),
            cipher: cipher.map(|c| c.name()).unwrap_or("").to_string(),
            // The servername callback refuses anything else; checked again before it is kept.
            sni: ssl
                .servername(NameType::HOST_NAME)
                .filter(|name| crate::text::is_host_name(name))
                .map(str::to_string),
            forward_secrecy: matches!(kx, "ECDH" | "DH" | "any" | "ECDHEPSK" | "DHEPSK"),
            handshake,
        }
    }

    /// Weaker than the upstream leg: anything below TLS 1.2, or TLS 1.2 without forward secrecy.
    pub fn downgraded(&self) -> bool {
        !matches!(self.version, "TLSv1.2" | "TLSv1.3") || !self.forward_secrecy
    }
}

/// Why a device handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The name as sent, made printable.
    #[error("device sent SNI {0:?}, which sni_allow does not admit or is not a host name")]
    SniRefused(Option<String>),
    #[error("TLS handshake failed: {0}")]
    Failed(String),
}

/// The one acceptor all routes share; `reload` swaps its context without touching open sessions.
pub struct LegacyAcceptor {
    context: RwLock<SslContext>,
}

impl LegacyAcceptor {
    pub fn new(config: &DeviceTlsConfig) -> Result<LegacyAcceptor> {
        Ok(LegacyAcceptor {
            context: RwLock::new(build_context(config)?),
        })
    }

    /// Rebuilds the context from the files; on error the old one stays in use.
    pub fn reload(&self, config: &DeviceTlsConfig) -> Result<()> {
        let context = build_context(config)?;
        *self
            .context
            .write()
            .map_err(|_| anyhow!("acceptor lock poisoned"))? = context;
        Ok(())
    }

    /// The current context, for a new connection (a reference-count bump).
    pub fn context(&self) -> SslContext {
        match self.context.read() {
            Ok(context) => context.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Runs the server handshake. `sni_allow`, when given, refuses names outside it with an
    /// `unrecognized_name` alert (and devices that send no SNI at all).
    pub async fn accept<S>(
        &self,
        stream: S,
        sni_allow: Option<Arc<[String]>>,
    ) -> Result<(SslStream<S>, DeviceTls), HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let setup = |stream| -> Result<SslStream<S>, openssl::error::ErrorStack> {
            let mut ssl = Ssl::new(&self.context())?;
            if let Some(allow) = sni_allow.clone() {
                ssl.set_ex_data(*sni_index()?, allow);
            }
            SslStream::new(ssl, stream)
        };
        let mut stream = setup(stream).map_err(|err| HandshakeError::Failed(err.to_string()))?;
        let started = std::time::Instant::now();
        if let Err(err) = Pin::new(&mut stream).accept().await {
            let sni = stream.ssl().servername(NameType::HOST_NAME);
            if sni.is_some_and(|name| !crate::text::is_host_name(name)) {
                return Err(HandshakeError::SniRefused(sni.map(crate::text::printable)));
            }
            let sni = sni.map(str::to_string);
            if let Some(allow) = &sni_allow {
                if !allow
                    .iter()
                    .any(|p| name_matches(p, sni.as_deref().unwrap_or("")))
                {
                    return Err(HandshakeError::SniRefused(sni));
                }
            }
            return Err(HandshakeError::Failed(match err.ssl_error() {
                Some(stack) => stack.to_string(),
                None => err.to_string(),
            }));
        }
        let info = DeviceTls::of(stream.ssl(), started.elapsed());
        Ok((stream, info))
    }
}

fn sni_index(
) -> Result<&'static openssl::ex_data::Index<Ssl, Arc<[String]>>, openssl::error::ErrorStack> {
    static INDEX: std::sync::OnceLock<openssl::ex_data::Index<Ssl, Arc<[String]>>> =
        std::sync::OnceLock::new();
    if let Some(index) = INDEX.get() {
        return Ok(index);
    }
    let index = Ssl::new_ex_index()?;
    Ok(INDEX.get_or_init(|| index))
}

/// True when `name` is `pattern` or matches a one-label wildcard (`*.example.com`).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

fn protocol_version(version: LegacyVersion) -> Result<SslVersion> {
    Ok(match version {
        LegacyVersion::Ssl3 if !has_ssl3() => bail!(
            "device_tls.min_version: SSLv3 is not available in the linked OpenSSL ({}); build \
             tlsbridge with the \"legacy-ciphers\" feature",
            openssl::version::version()
        ),
        LegacyVersion::Ssl3 => SslVersion::SSL3,
        LegacyVersion::Tls1 => SslVersion::TLS1,
        LegacyVersion::Tls11 => SslVersion::TLS1_1,
        LegacyVersion::Tls12 => SslVersion::TLS1_2,
    })
}

/// Whether the linked OpenSSL can speak SSLv3 at all (distribution builds cannot).
pub fn has_ssl3() -> bool {
    !cfg!(no_ssl3)
}

/// Loads OpenSSL's "legacy" provider, where OpenSSL 3 keeps RC4, once per process and before the
/// first `SslContext`: a context only offers the suites whose algorithms it can fetch when it is
/// created. `retain_fallbacks` keeps the implicit default provider (AES, SHA-2, ECDHE, ...)
/// active; a plain `Provider::load` would switch it off. The provider stays loaded for good.
#[cfg(feature = "legacy-ciphers")]
pub fn load_legacy_provider() -> Result<()> {
    static LEGACY: std::sync::OnceLock<Result<openssl::provider::Provider, String>> =
        std::sync::OnceLock::new();
    match LEGACY.get_or_init(|| {
        openssl::provider::Provider::try_load(None, "legacy", true).map_err(|err| err.to_string())
    }) {
        Ok(_) => Ok(()),
        Err(err) => bail!(
            "cannot load OpenSSL's \"legacy\" provider (RC4 needs it) into {}: {err}",
            openssl::version::version()
        ),
    }
}

/// Without the `legacy-ciphers` feature nothing is loaded: the standard build has no RC4.
#[cfg(not(feature = "legacy-ciphers"))]
pub fn load_legacy_provider() -> Result<()> {
    Ok(())
}

/// What the linked OpenSSL can offer very old devices beyond the standard suites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegacySupport {
    /// `DES-CBC3-SHA` (3DES) is a usable suite.
    pub des3: bool,
    /// `RC4-SHA` is a usable suite (needs the legacy provider).
    pub rc4: bool,
    /// SSLv3 is compiled in.
    pub ssl3: bool,
}

/// Asks the linked OpenSSL (after loading the legacy provider where the build has it).
pub fn legacy_support() -> LegacySupport {
    let provider = load_legacy_provider().is_ok();
    LegacySupport {
        des3: suite_available("DES-CBC3-SHA"),
        rc4: provider && suite_available("RC4-SHA"),
        ssl3: has_ssl3(),
    }
}

/// True when this is a `legacy-ciphers` build and its OpenSSL really offers 3DES and RC4.
pub fn legacy_ciphers_available() -> bool {
    let support = legacy_support();
    cfg!(feature = "legacy-ciphers") && support.des3 && support.rc4
}

/// One line for `--version`: whether 3DES, RC4 and SSLv3 can be offered to devices.
pub fn legacy_summary() -> String {
    let support = legacy_support();
    let yes = |b: bool| if b { "yes" } else { "no" };
    let detail = format!(
        "3DES {}, RC4 {}, SSLv3 {}",
        yes(support.des3),
        yes(support.rc4),
        yes(support.ssl3)
    );
    if cfg!(feature = "legacy-ciphers") && support.des3 && support.rc4 {
        format!("legacy ciphers: available ({detail})")
    } else if cfg!(feature = "legacy-ciphers") {
        format!("legacy ciphers: built with \"legacy-ciphers\" but incomplete ({detail})")
    } else {
        format!(
            "legacy ciphers: not available ({detail}); build with the \"legacy-ciphers\" feature"
        )
    }
}

/// True when OpenSSL accepts `suite` as a cipher list at security level 0.
fn suite_available(suite: &str) -> bool {
    SslContextBuilder::new(SslMethod::tls_server())
        .map(|mut probe| {
            probe.set_security_level(0);
            probe.set_cipher_list(suite).is_ok()
        })
        .unwrap_or(false)
}

/// Checks `min_version` and `ciphers` against the linked OpenSSL without needing the certificate
/// files: what `build_context` would refuse for these two settings, it refuses too.
pub fn check_protocol_settings(config: &DeviceTlsConfig) -> Result<()> {
    apply_protocol_settings(
        &mut SslContextBuilder::new(SslMethod::tls_server())?,
        config,
    )
}

/// Security level, protocol versions and cipher suites: the part of the acceptor that decides
/// which devices get in.
fn apply_protocol_settings(
    builder: &mut SslContextBuilder,
    config: &DeviceTlsConfig,
) -> Result<()> {
    // Before the context exists: it only offers the suites it can fetch when it is created.
    load_legacy_provider()?;
    // Level 0 before anything else: TLS 1.0/1.1, SHA-1 signatures and SHA-1 certs need it.
    builder.set_security_level(0);
    // Explicit, so a system openssl.cnf with MinProtocol = TLSv1.2 cannot win.
    builder.set_min_proto_version(Some(protocol_version(config.min_version)?))?;
    builder.set_max_proto_version(None)?;
    check_named_suites(&config.ciphers)?;
    builder
        .set_cipher_list(&format!("{}:{NEVER}", config.ciphers))
        .map_err(|err| {
            anyhow!(
                "device_tls.ciphers: OpenSSL rejects {:?}: {err}",
                config.ciphers
            )
        })?;
    Ok(())
}

/// Names every explicitly named suite that the linked OpenSSL does not have, so a config asking
/// for 3DES or RC4 fails at start-up instead of at a device's handshake.
fn check_named_suites(ciphers: &str) -> Result<()> {
    let keyword =
        |t: &str| t.starts_with(['!', '-', '+', '@']) || t.chars().all(|c| c.is_ascii_uppercase());
    for token in ciphers
        .split([':', ',', ' '])
        .filter(|t| !t.is_empty() && !keyword(t))
    {
        if suite_available(token) {
            continue;
        }
        if cfg!(feature = "legacy-ciphers") {
            bail!(
                "device_tls.ciphers: {token} is not a suite of the linked OpenSSL ({}), even \
                 with \"legacy-ciphers\"; check the name with `openssl ciphers -v`",
                openssl::version::version()
            );
        }
        bail!(
            "device_tls.ciphers: {token} is not available in the linked OpenSSL ({}); 3DES, \
             RC4 and SSLv3 need a build with the \"legacy-ciphers\" feature",
            openssl::version::version()
        );
    }
    Ok(())
}

fn build_context(config: &DeviceTlsConfig) -> Result<SslContext> {
    let mut builder = SslContextBuilder::new(SslMethod::tls_server())?;
    apply_protocol_settings(&mut builder, config)?;
    // An idle session gives its read and write buffers back to the allocator. The relay reads
    // into a per-thread buffer and keeps on the heap only what a write did not take, so a write
    // is retried from another address (same bytes): OpenSSL must accept the move.
    builder.set_mode(SslMode::RELEASE_BUFFERS | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
    // Read what the socket has, not a record header and then its body: one `recv` per record
    // or fewer instead of two (natively 3-9 % less CPU per MiB device -> upstream). Every
    // reader of the stream asks OpenSSL first, so records it holds are never left waiting.
    builder.set_read_ahead(true);
    // No IGNORE_UNEXPECTED_EOF: an end without close_notify must stay distinguishable from a
    // clean one (the relay carries it as such).
    // DONT_INSERT_EMPTY_FRAGMENTS: no empty record before each CBC record in TLS 1.0. Some old
    // TLS stacks, the devices this bridge exists for, cannot parse one (OpenSSL's reason for
    // putting the option in SSL_OP_ALL; nginx and HAProxy set it too), and it is the sender's
    // defence against BEAST, which needs chosen plaintext injected adaptively into what this
    // side sends: the upstream's replies and mail. It also made every record cost two MAC and
    // cipher set-ups (upstream -> device: 8 % fewer instructions per MiB without it).
    builder.set_options(
        SslOptions::NO_COMPRESSION
            | SslOptions::CIPHER_SERVER_PREFERENCE
            | SslOptions::NO_RENEGOTIATION
            | SslOptions::DONT_INSERT_EMPTY_FRAGMENTS,
    );
    // DHE suites need parameters; OpenSSL has no safe "auto" switch in the Rust API.
    let dh = Dh::get_2048_256()?;
    builder.set_tmp_dh(&dh)?;
    load_identity(&mut builder, &config.cert, &config.key)?;
    builder.set_servername_callback(|ssl, alert| {
        // A name that is not a host name is refused on every route, before it is matched or
        // recorded: it would otherwise carry a device's text into logs and the inventory.
        if ssl
            .servername(NameType::HOST_NAME)
            .is_some_and(|name| !crate::text::is_host_name(name))
        {
            *alert = SslAlert::UNRECOGNIZED_NAME;
            return Err(openssl::ssl::SniError::ALERT_FATAL);
        }
        let Ok(index) = sni_index() else {
            return Ok(());
        };
        let Some(allow) = ssl.ex_data(*index) else {
            return Ok(());
        };
        let name = ssl.servername(NameType::HOST_NAME).unwrap_or("");
        if allow.iter().any(|pattern| name_matches(pattern, name)) {
            return Ok(());
        }
        *alert = SslAlert::UNRECOGNIZED_NAME;
        Err(openssl::ssl::SniError::ALERT_FATAL)
    });
    Ok(builder.build())
}

fn load_identity(builder: &mut SslContextBuilder, cert: &Path, key: &Path) -> Result<()> {
    builder.set_certificate_chain_file(cert).with_context(|| {
        format!(
            "device_tls.cert: {} is not a usable PEM certificate chain",
            cert.display()
        )
    })?;
    builder
        .set_private_key_file(key, SslFiletype::PEM)
        .with_context(|| {
            format!(
                "device_tls.key: {} is not a usable PEM private key",
                key.display()
            )
        })?;
    builder.check_private_key().with_context(|| {
        format!(
            "device_tls.key: {} does not match {}",
            key.display(),
            cert.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downgraded_means_weaker_than_tls12_with_forward_secrecy() {
        let tls = |version, forward_secrecy| DeviceTls {
            handshake: std::time::Duration::ZERO,
            version,
            cipher: String::new(),
            sni: None,
            forward_secrecy,
        };
        assert!(tls("SSLv3", true).downgraded());
        assert!(tls("TLSv1", true).downgraded());
        assert!(tls("TLSv1.1", true).downgraded());
        assert!(tls("TLSv1.2", false).downgraded(), "RSA key exchange");
        assert!(!tls("TLSv1.2", true).downgraded());
        assert!(!tls("TLSv1.3", true).downgraded());
    }

    #[test]
    fn wildcards_match_one_label_only() {
        assert!(name_matches("*.office365.com", "outlook.office365.com"));
        assert!(name_matches("*.office365.com", "OUTLOOK.Office365.com"));
        assert!(!name_matches("*.office365.com", "a.b.office365.com"));
        assert!(!name_matches("*.office365.com", "office365.com"));
        assert!(name_matches("outlook.office.com", "outlook.office.com"));
        assert!(!name_matches("outlook.office.com", "evil.com"));
        assert!(!name_matches("*.office365.com", ""));
    }

    #[test]
    fn unavailable_suites_are_named_in_the_error() {
        assert!(check_named_suites("DEFAULT:@SECLEVEL=0").is_ok());
        assert!(check_named_suites("AES128-SHA:ECDHE-RSA-AES128-SHA:!aNULL").is_ok());
        let err = check_named_suites("AES128-SHA:NO-SUCH-CIPHER")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("NO-SUCH-CIPHER") && err.contains("legacy-ciphers"),
            "{err}"
        );
    }
}
