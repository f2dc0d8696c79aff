//! 3DES, RC4 and SSLv3 on the device leg.
//!
//! With the `legacy-ciphers` feature (a vendored OpenSSL with weak ciphers, SSLv3 and the legacy
//! provider) an OpenSSL client that offers nothing but one weak suite gets through the proxy to a
//! TLS 1.2+ upstream and back. Without it, a configuration naming those suites or SSLv3 is refused
//! at start-up with a message that names the feature.
//!
//!   CARGO_TARGET_DIR=target/legacy cargo test --locked --features legacy-ciphers --test it legacy_ciphers::
//!
//! Self-contained (it uses nothing from `support`): an rcgen CA and leaf for the upstream, a
//! rustls echo upstream, and the proxy started in-process from a TOML file in a tempdir.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// The weak suites named explicitly, as docs/devices.md tells admins to do.
const WEAK_CIPHERS: &str = "AES128-SHA:DES-CBC3-SHA:RC4-SHA:@SECLEVEL=0";

/// A configuration for one tcp route (implicit TLS on both legs) to `upstream_port`, with
/// state and certificates in `dir` and `extra_roots` trusting `ca_path`.
fn config_toml(
    dir: &Path,
    ca_path: &Path,
    upstream_port: u16,
    min_version: &str,
    ciphers: &str,
) -> String {
    let p = |path: PathBuf| serde_json::to_string(&path.display().to_string()).unwrap();
    format!(
        r#"state_dir = {state}

[log]
level = "debug"

[admin]
listen = ""

[device_tls]
cert = {cert}
key = {key}
names = ["localhost"]
min_version = "{min_version}"
ciphers = "{ciphers}"
handshake_timeout = "10s"

[upstream_tls]
extra_roots = [{ca}]
connect_timeout = "5s"

[[route]]
name = "echo"
listen = "127.0.0.1:0"
protocol = "tcp"
device_tls = "tls"
upstream = "localhost:{upstream_port}"
upstream_tls = "tls"
"#,
        state = p(dir.join("state")),
        cert = p(dir.join("certs/tlsbridge.crt")),
        key = p(dir.join("certs/tlsbridge.key")),
        ca = p(ca_path.to_path_buf()),
    )
}

fn write_config(dir: &Path, min_version: &str, ciphers: &str) -> Result<PathBuf> {
    let ca_path = dir.join("test-ca.pem");
    if !ca_path.exists() {
        // Never read in the tests that do not connect; a valid PEM keeps `check` happy.
        std::fs::write(&ca_path, upstream_pki()?.0).context("write the test CA")?;
    }
    let path = dir.join("tlsbridge.toml");
    std::fs::write(&path, config_toml(dir, &ca_path, 9, min_version, ciphers))
        .context("write the config")?;
    Ok(path)
}

/// A test CA (ECDSA P-256: rcgen with ring cannot make RSA keys) and a "localhost" leaf signed by
/// it: (CA PEM, leaf chain PEM, leaf key PKCS#8 DER). ECDSA is fine here: the leaf serves the
/// upstream leg (rustls, TLS 1.2+); the proxy makes its own RSA certificate for the device leg,
/// which the RSA key exchange of DES-CBC3-SHA and RC4-SHA needs.
fn upstream_pki() -> Result<(
    String,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    Vec<u8>,
)> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "legacy_ciphers test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
    Ok((
        ca.pem(),
        vec![leaf.der().clone(), ca.der().clone()],
        leaf_key.serialize_der(),
    ))
}

/// Runs the real binary with `args`; returns (exit code, stdout, stderr).
fn tlsbridge(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tlsbridge"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the tlsbridge binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[cfg(feature = "legacy-ciphers")]
mod weak {
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::{ensure, Context, Result};
    use openssl::ssl::{Ssl, SslConnector, SslMethod, SslOptions, SslVerifyMode, SslVersion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tokio_openssl::SslStream;

    use super::{config_toml, tlsbridge, upstream_pki, write_config, WEAK_CIPHERS};

    const LIMIT: Duration = Duration::from_secs(20);

    /// A rustls echo server (TLS 1.2 and 1.3 only) on 127.0.0.1:0, for "localhost".
    async fn echo_upstream(
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: Vec<u8>,
    ) -> Result<(u16, JoinHandle<()>)> {
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (mut read, mut write) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
        Ok((port, task))
    }

    /// The proxy, running in this process, and what it needs to stay up.
    struct Running {
        _dir: tempfile::TempDir,
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<Result<()>>,
        upstream: JoinHandle<()>,
    }

    impl Running {
        async fn start(min_version: &str, ciphers: &str) -> Result<Running> {
            let dir = tempfile::tempdir()?;
            let (ca_pem, chain, key) = upstream_pki()?;
            let ca_path = dir.path().join("test-ca.pem");
            std::fs::write(&ca_path, ca_pem)?;
            let (port, upstream) = echo_upstream(chain, key).await?;
            let path = dir.path().join("tlsbridge.toml");
            std::fs::write(
                &path,
                config_toml(dir.path(), &ca_path, port, min_version, ciphers),
            )?;
            let config = tlsbridge::config::Config::load_from(Some(&path), std::iter::empty())
                .context("load the config")?;
            let server = tlsbridge::server::Server::bind(config)
                .await
                .context("bind the proxy")?;
            let addr = server.local_addr("echo").context("no route echo")?;
            let (tx, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(server.run(async move {
                let _ = rx.await;
            }));
            Ok(Running {
                _dir: dir,
                addr,
                stop: Some(tx),
                task,
                upstream,
            })
        }

        async fn stop(mut self) -> Result<()> {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            let result = tokio::time::timeout(Duration::from_secs(40), &mut self.task)
                .await
                .context("the proxy did not stop")?
                .context("the proxy task panicked")?;
            self.upstream.abort();
            result
        }
    }

    /// An OpenSSL client pinned to exactly `version` that offers nothing but `cipher`.
    async fn device(
        addr: SocketAddr,
        version: SslVersion,
        cipher: &str,
    ) -> Result<SslStream<TcpStream>> {
        // The client shares the process (and OpenSSL's default library context) with the proxy,
        // but must not rely on the proxy having loaded the provider first.
        tlsbridge::tls::legacy::load_legacy_provider()?;
        let mut builder = SslConnector::builder(SslMethod::tls_client())?;
        builder.set_security_level(0);
        // SslConnector sets NO_SSLV3 (and the rest of its safe defaults): a device has none.
        builder.clear_options(SslOptions::NO_SSLV3);
        builder.set_min_proto_version(Some(version))?;
        builder.set_max_proto_version(Some(version))?;
        builder.set_cipher_list(cipher)?;
        builder.set_verify(SslVerifyMode::NONE);
        let connector = builder.build();
        let config = connector.configure()?.verify_hostname(false);
        let ssl: Ssl = config.into_ssl("localhost")?;
        let tcp = TcpStream::connect(addr).await?;
        let mut stream = SslStream::new(ssl, tcp)?;
        tokio::time::timeout(LIMIT, Pin::new(&mut stream).connect())
            .await
            .context("device handshake timed out")?
            .context("device handshake failed")?;
        Ok(stream)
    }

    /// Connects with exactly `version` and `cipher`, checks what was negotiated and that bytes
    /// come back unchanged from the upstream.
    async fn round_trip(
        addr: SocketAddr,
        version: SslVersion,
        cipher: &str,
        expect_version: &str,
    ) -> Result<()> {
        let mut stream = device(addr, version, cipher).await?;
        let negotiated = stream
            .ssl()
            .current_cipher()
            .map(|c| c.name())
            .unwrap_or("");
        ensure!(
            negotiated == cipher,
            "negotiated {negotiated}, wanted {cipher}"
        );
        let got_version = stream.ssl().version_str();
        ensure!(
            got_version == expect_version,
            "negotiated {got_version}, wanted {expect_version}"
        );
        let payload = format!("hello through {cipher} over {expect_version}\n").repeat(200);
        stream.write_all(payload.as_bytes()).await?;
        stream.flush().await?;
        let mut echoed = vec![0u8; payload.len()];
        tokio::time::timeout(LIMIT, stream.read_exact(&mut echoed))
            .await
            .context("echo timed out")?
            .context("reading the echo")?;
        ensure!(
            echoed == payload.as_bytes(),
            "the echo differs from what was sent"
        );
        let _ = stream.shutdown().await;
        Ok(())
    }

    #[test]
    fn the_linked_openssl_has_3des_rc4_and_ssl3() {
        let support = tlsbridge::tls::legacy::legacy_support();
        assert!(support.des3, "DES-CBC3-SHA unavailable: {support:?}");
        assert!(support.rc4, "RC4-SHA unavailable: {support:?}");
        assert!(support.ssl3, "SSLv3 unavailable (cfg no_ssl3): {support:?}");
        assert!(tlsbridge::tls::legacy::legacy_ciphers_available());
    }

    #[test]
    fn check_protocol_settings_accepts_the_weak_suites_and_ssl3() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "SSLv3", WEAK_CIPHERS).unwrap();
        let config = tlsbridge::config::Config::load_from(Some(&path), std::iter::empty())
            .expect("the config itself is valid");
        tlsbridge::tls::legacy::check_protocol_settings(&config.device_tls).unwrap();
        let mut typo = config.device_tls.clone();
        typo.ciphers = "AES128-SHA:DES-CBC3-SHAA:@SECLEVEL=0".into();
        let err = tlsbridge::tls::legacy::check_protocol_settings(&typo).unwrap_err();
        assert!(format!("{err:#}").contains("DES-CBC3-SHAA"), "{err:#}");
    }

    #[test]
    fn version_says_legacy_ciphers_are_available() {
        let (code, out, err) = tlsbridge(&["--version"]);
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(out.contains("OpenSSL 3."), "{out}");
        assert!(out.contains("vendored"), "{out}");
        assert!(
            out.contains("legacy ciphers: available (3DES yes, RC4 yes, SSLv3 yes)"),
            "{out}"
        );
    }

    #[test]
    fn check_accepts_the_weak_suites_and_ssl3() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "SSLv3", WEAK_CIPHERS).unwrap();
        let path = path.to_str().unwrap();
        let (code, out, err) = tlsbridge(&["certs", "init", "--config", path]);
        assert_eq!(code, Some(0), "certs init: {out}{err}");
        let (code, out, err) = tlsbridge(&["check", "--config", path]);
        assert_eq!(code, Some(0), "check: {out}{err}");
        assert!(out.contains("present and usable"), "{out}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls10_3des_only_client_gets_through() {
        let proxy = Running::start("TLSv1", WEAK_CIPHERS).await.unwrap();
        round_trip(proxy.addr, SslVersion::TLS1, "DES-CBC3-SHA", "TLSv1")
            .await
            .unwrap();
        proxy.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls10_rc4_only_client_gets_through() {
        let proxy = Running::start("TLSv1", WEAK_CIPHERS).await.unwrap();
        round_trip(proxy.addr, SslVersion::TLS1, "RC4-SHA", "TLSv1")
            .await
            .unwrap();
        proxy.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ssl3_clients_get_through() {
        let proxy = Running::start("SSLv3", WEAK_CIPHERS).await.unwrap();
        for cipher in ["DES-CBC3-SHA", "RC4-SHA", "AES128-SHA"] {
            round_trip(proxy.addr, SslVersion::SSL3, cipher, "SSLv3")
                .await
                .unwrap_or_else(|err| panic!("SSLv3 {cipher}: {err:#}"));
        }
        proxy.stop().await.unwrap();
    }

    /// Loading the legacy provider must not turn off the default one: modern suites still work.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn modern_clients_still_get_aes_gcm() {
        let proxy = Running::start("SSLv3", WEAK_CIPHERS).await.unwrap();
        round_trip(proxy.addr, SslVersion::TLS1, "AES128-SHA", "TLSv1")
            .await
            .unwrap();
        proxy.stop().await.unwrap();
        let proxy = Running::start("TLSv1", "DEFAULT:@SECLEVEL=0")
            .await
            .unwrap();
        round_trip(
            proxy.addr,
            SslVersion::TLS1_2,
            "ECDHE-RSA-AES256-GCM-SHA384",
            "TLSv1.2",
        )
        .await
        .unwrap();
        proxy.stop().await.unwrap();
    }

    /// Weak suites are offered only where the config names them: `DEFAULT` (the shipped configs)
    /// and `min_version = "TLSv1"` keep 3DES, RC4 and SSLv3 out even in this build.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_default_config_offers_no_weak_suite() {
        let proxy = Running::start("TLSv1", "DEFAULT:@SECLEVEL=0")
            .await
            .unwrap();
        for (version, cipher) in [
            (SslVersion::TLS1, "DES-CBC3-SHA"),
            (SslVersion::TLS1, "RC4-SHA"),
            (SslVersion::SSL3, "AES128-SHA"),
        ] {
            let result = device(proxy.addr, version, cipher).await;
            assert!(
                result.is_err(),
                "{version:?} {cipher} was accepted with DEFAULT:@SECLEVEL=0"
            );
        }
        // The route still works for a TLS 1.0 device with an ordinary suite.
        round_trip(proxy.addr, SslVersion::TLS1, "AES128-SHA", "TLSv1")
            .await
            .unwrap();
        proxy.stop().await.unwrap();
    }
}

#[cfg(not(feature = "legacy-ciphers"))]
mod standard {
    use super::{tlsbridge, write_config, WEAK_CIPHERS};

    fn bind_error(min_version: &str, ciphers: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), min_version, ciphers).unwrap();
        let config = tlsbridge::config::Config::load_from(Some(&path), std::iter::empty())
            .expect("the config itself is valid");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        match runtime.block_on(tlsbridge::server::Server::bind(config)) {
            Ok(_) => panic!("bind accepted min_version {min_version} ciphers {ciphers}"),
            Err(err) => format!("{err:#}"),
        }
    }

    #[test]
    fn version_says_legacy_ciphers_are_not_available() {
        let (code, out, err) = tlsbridge(&["--version"]);
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(out.contains("OpenSSL"), "{out}");
        assert!(
            out.contains("legacy ciphers: not available")
                && out.contains("\"legacy-ciphers\" feature"),
            "{out}"
        );
    }

    #[test]
    fn bind_refuses_3des_and_rc4_naming_the_feature() {
        let err = bind_error("TLSv1", WEAK_CIPHERS);
        assert!(err.contains("legacy-ciphers"), "{err}");
        assert!(err.contains("DES-CBC3-SHA"), "{err}");
        let err = bind_error("TLSv1", "AES128-SHA:RC4-SHA:@SECLEVEL=0");
        assert!(
            err.contains("legacy-ciphers") && err.contains("RC4-SHA"),
            "{err}"
        );
    }

    #[test]
    fn bind_refuses_ssl3_naming_the_feature() {
        if tlsbridge::tls::legacy::has_ssl3() {
            eprintln!("skipped: the linked OpenSSL has SSLv3");
            return;
        }
        let err = bind_error("SSLv3", "DEFAULT:@SECLEVEL=0");
        assert!(
            err.contains("SSLv3") && err.contains("legacy-ciphers"),
            "{err}"
        );
    }

    /// What `check` could call to validate the TLS settings without the certificate files.
    #[test]
    fn check_protocol_settings_needs_no_certificate_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "TLSv1", WEAK_CIPHERS).unwrap();
        let config = tlsbridge::config::Config::load_from(Some(&path), std::iter::empty())
            .expect("the config itself is valid");
        assert!(!config.device_tls.cert.exists());
        let err = tlsbridge::tls::legacy::check_protocol_settings(&config.device_tls)
            .expect_err("3DES/RC4 accepted by the standard build");
        let err = format!("{err:#}");
        assert!(err.contains("legacy-ciphers"), "{err}");
    }

    /// `check` validates the TLS settings once the certificate files exist (`certs init`).
    #[test]
    fn check_exits_2_naming_the_feature() {
        for (min_version, ciphers, named) in [
            ("TLSv1", WEAK_CIPHERS, "DES-CBC3-SHA"),
            ("SSLv3", "DEFAULT:@SECLEVEL=0", "SSLv3"),
        ] {
            if named == "SSLv3" && tlsbridge::tls::legacy::has_ssl3() {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let path = write_config(dir.path(), min_version, ciphers).unwrap();
            let path = path.to_str().unwrap();
            let (code, out, err) = tlsbridge(&["certs", "init", "--config", path]);
            assert_eq!(code, Some(0), "certs init: {out}{err}");
            let (code, out, err) = tlsbridge(&["check", "--config", path]);
            assert_eq!(code, Some(2), "check {min_version} {ciphers}: {out}{err}");
            assert!(
                err.contains("legacy-ciphers") && err.contains(named),
                "check {min_version} {ciphers}: {err}"
            );
        }
    }
}
