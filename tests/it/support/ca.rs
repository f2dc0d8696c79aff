//! A throwaway certificate authority for the tests, made with rcgen (ECDSA P-256: rcgen's ring
//! backend cannot generate RSA keys).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA that signs leaves for the fake upstreams.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate with its key, in PEM and in rustls' types.
#[derive(Clone)]
pub struct Leaf {
    /// The leaf certificate followed by the CA certificate.
    pub chain_pem: String,
    pub key_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl TestCa {
    /// A new self-signed CA with the given common name.
    pub fn new(common_name: &str) -> Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "tlsbridge tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().context("generate CA key")?;
        let issuer = CertifiedIssuer::self_signed(params, key).context("self-sign CA")?;
        Ok(TestCa { issuer })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Writes the CA certificate as PEM to `dir/file_name` and returns the path.
    pub fn write_pem(&self, dir: &Path, file_name: &str) -> Result<PathBuf> {
        let path = dir.join(file_name);
        std::fs::write(&path, self.cert_pem())
            .with_context(|| format!("write CA certificate to {}", path.display()))?;
        Ok(path)
    }

    /// A server leaf for the given DNS names (the first one is also the CN).
    pub fn leaf(&self, dns_names: &[&str]) -> Result<Leaf> {
        let names: Vec<String> = dns_names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).context("leaf params")?;
        if let Some(first) = dns_names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generate leaf key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("sign leaf certificate")?;
        Ok(Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem()),
            key_pem: key.serialize_pem(),
            chain: vec![cert.der().clone(), self.cert_der()],
            key_der: key.serialize_der(),
        })
    }
}

/// The certificates the tests need: a trusted CA (written to `test-ca.pem`, for the proxy's
/// `extra_roots`), leaves for "localhost" and for a wrong name, and a leaf for "localhost" from
/// a CA nobody trusts.
pub struct Pki {
    /// Holds `ca_path` (removed on drop).
    _dir: tempfile::TempDir,
    pub ca: TestCa,
    pub ca_path: PathBuf,
    pub localhost: Leaf,
    pub wrong_name: Leaf,
    pub unknown_ca: Leaf,
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let dir = tempfile::tempdir().context("tempdir for the test CA")?;
        let ca = TestCa::new("tlsbridge test CA")?;
        let ca_path = ca.write_pem(dir.path(), "test-ca.pem")?;
        let localhost = ca.leaf(&["localhost"])?;
        let wrong_name = ca.leaf(&["wrong.example"])?;
        let stranger = TestCa::new("unknown CA")?;
        let unknown_ca = stranger.leaf(&["localhost"])?;
        Ok(Pki {
            _dir: dir,
            ca,
            ca_path,
            localhost,
            wrong_name,
            unknown_ca,
        })
    }
}
