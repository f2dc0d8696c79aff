//! The device-facing certificate: a local CA and a leaf for `device_tls.names`, made with rcgen
//! when the configured files are missing. User-supplied files are used as they are.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use openssl::hash::MessageDigest;
use openssl::x509::X509;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::config::{DeviceTlsConfig, KeyType};

/// Where the local CA lives: beside the leaf certificate.
pub fn ca_paths(device_tls: &DeviceTlsConfig) -> (PathBuf, PathBuf) {
    let dir = device_tls.cert.parent().unwrap_or(Path::new("."));
    (dir.join("ca.crt"), dir.join("ca.key"))
}

/// What `ensure` did, for the log and `certs init`.
#[derive(Debug, PartialEq, Eq)]
pub enum Provision {
    /// Both files were present and are used as they are.
    Existing,
    /// A leaf was generated (and the CA too, when `new_ca`).
    Generated { new_ca: bool },
}

/// Makes sure the configured certificate and key exist, generating them from the local CA.
pub fn ensure(device_tls: &DeviceTlsConfig) -> Result<Provision> {
    let (cert, key) = (&device_tls.cert, &device_tls.key);
    match (cert.exists(), key.exists()) {
        (true, true) => return Ok(Provision::Existing),
        (true, false) => bail!(
            "device_tls.key: {} is missing but the certificate exists",
            key.display()
        ),
        (false, true) => bail!(
            "device_tls.cert: {} is missing but the key exists",
            cert.display()
        ),
        (false, false) => {}
    }
    let (ca_cert_path, ca_key_path) = ca_paths(device_tls);
    let (ca_cert_pem, ca_key_pem, new_ca) = if ca_cert_path.exists() && ca_key_path.exists() {
        let cert = read(&ca_cert_path)?;
        let key = read(&ca_key_path)?;
        (cert, key, false)
    } else {
        let (cert, key) = new_ca_pem(device_tls.key_type)?;
        crate::fsutil::write_atomic(&ca_key_path, key.as_bytes(), 0o600)?;
        crate::fsutil::write_atomic(&ca_cert_path, cert.as_bytes(), 0o644)?;
        (cert, key, true)
    };
    let (leaf, leaf_key) = new_leaf_pem(device_tls, &ca_cert_pem, &ca_key_pem)
        .with_context(|| format!("cannot sign a leaf with the CA {}", ca_cert_path.display()))?;
    crate::fsutil::write_atomic(key, leaf_key.as_bytes(), 0o600)?;
    // The chain file carries the CA too, so devices that want the full chain get it.
    crate::fsutil::write_atomic(cert, format!("{leaf}{ca_cert_pem}").as_bytes(), 0o644)?;
    Ok(Provision::Generated { new_ca })
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// An RSA-2048 key: old devices often cannot use ECDSA. rcgen's ring backend cannot generate
/// RSA keys, so OpenSSL makes it and rcgen signs with it.
fn rsa_key() -> Result<KeyPair> {
    let rsa = openssl::rsa::Rsa::generate(2048)?;
    let pem = openssl::pkey::PKey::from_rsa(rsa)?.private_key_to_pem_pkcs8()?;
    let pem = String::from_utf8(pem)?;
    Ok(KeyPair::from_pem_and_sign_algo(&pem, &PKCS_RSA_SHA256)?)
}

fn new_key(key_type: KeyType) -> Result<KeyPair> {
    match key_type {
        KeyType::Rsa2048 => rsa_key(),
        KeyType::EcdsaP256 => Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?),
    }
}

fn base_params(common_name: &str, days: i64) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "tlsbridge");
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
    let mut serial = [0u8; 16];
    openssl::rand::rand_bytes(&mut serial)?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params)
}

fn new_ca_pem(key_type: KeyType) -> Result<(String, String)> {
    let mut params = base_params("tlsbridge local CA", 3650)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = new_key(key_type)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn new_leaf_pem(
    device_tls: &DeviceTlsConfig,
    ca_cert: &str,
    ca_key: &str,
) -> Result<(String, String)> {
    let names = &device_tls.names;
    let first = names.first().map(String::as_str).unwrap_or("localhost");
    let mut params = base_params(first, 825)?;
    params.subject_alt_names = CertificateParams::new(names.to_vec())?.subject_alt_names;
    params.key_usages = match device_tls.key_type {
        // RSA key exchange (TLS_RSA_*) encrypts the premaster secret to the key.
        KeyType::Rsa2048 => vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ],
        KeyType::EcdsaP256 => vec![KeyUsagePurpose::DigitalSignature],
    };
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let ca_key = KeyPair::from_pem(ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, ca_key)?;
    let key = new_key(device_tls.key_type)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A human summary of every certificate in a PEM file, for `tlsbridge certs show`.
pub fn describe(path: &Path) -> Result<String> {
    let pem = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let chain = X509::stack_from_pem(&pem)
        .with_context(|| format!("{}: not a PEM certificate", path.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate found", path.display());
    }
    let mut out = format!("{}\n", path.display());
    for cert in chain {
        let fingerprint = cert.digest(MessageDigest::sha256())?;
        let names: Vec<String> = cert
            .subject_alt_names()
            .into_iter()
            .flatten()
            .filter_map(|n| {
                n.dnsname()
                    .map(str::to_string)
                    .or_else(|| n.ipaddress().map(ip_text))
            })
            .collect();
        out += &format!(
            "  subject:     {}\n  issuer:      {}\n  names:       {}\n  valid:       {} .. {}\n  serial:      {}\n  sha256:      {}\n",
            name_text(cert.subject_name()),
            name_text(cert.issuer_name()),
            if names.is_empty() { "-".to_string() } else { names.join(", ") },
            cert.not_before(),
            cert.not_after(),
            cert.serial_number().to_bn()?.to_hex_str()?,
            hex(&fingerprint),
        );
    }
    Ok(out)
}

fn name_text(name: &openssl::x509::X509NameRef) -> String {
    name.entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().as_slice();
            let value = String::from_utf8_lossy(value);
            format!("{key}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn ip_text(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default()).to_string(),
        _ => "?".to_string(),
    }
}

/// Lowercase hex with colons, the way certificate fingerprints are usually shown.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn device_tls(dir: &Path) -> DeviceTlsConfig {
        let config = crate::config::Config::load_from(None, Vec::new()).unwrap();
        DeviceTlsConfig {
            cert: dir.join("certs/tlsbridge.crt"),
            key: dir.join("certs/tlsbridge.key"),
            names: vec![
                "printer-gw.lan".into(),
                "10.1.2.3".into(),
                "*.office365.com".into(),
            ],
            ..config.device_tls
        }
    }

    #[test]
    fn generates_ca_and_leaf_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let tls = device_tls(dir.path());
        assert_eq!(ensure(&tls).unwrap(), Provision::Generated { new_ca: true });
        let (ca_cert, ca_key) = ca_paths(&tls);
        for key in [&tls.key, &ca_key] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let chain = X509::stack_from_pem(&fs::read(&tls.cert).unwrap()).unwrap();
        let leaf = &chain[0];
        let ca = X509::from_pem(&fs::read(&ca_cert).unwrap()).unwrap();
        assert!(leaf.verify(&ca.public_key().unwrap()).unwrap());
        assert_eq!(leaf.public_key().unwrap().bits(), 2048);
        assert_eq!(
            leaf.signature_algorithm().object().nid(),
            openssl::nid::Nid::SHA256WITHRSAENCRYPTION
        );
        let text = String::from_utf8(leaf.to_text().unwrap()).unwrap();
        for expected in [
            "CN=printer-gw.lan",
            "DNS:printer-gw.lan",
            "IP Address:10.1.2.3",
            "DNS:*.office365.com",
            "Digital Signature, Key Encipherment",
            "TLS Web Server Authentication",
        ] {
            assert!(text.contains(expected), "leaf lacks {expected}:\n{text}");
        }
        assert_eq!(ensure(&tls).unwrap(), Provision::Existing);
    }

    #[test]
    fn reuses_an_existing_ca_for_a_new_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let tls = device_tls(dir.path());
        ensure(&tls).unwrap();
        let ca_before = fs::read(ca_paths(&tls).0).unwrap();
        fs::remove_file(&tls.cert).unwrap();
        fs::remove_file(&tls.key).unwrap();
        assert_eq!(
            ensure(&tls).unwrap(),
            Provision::Generated { new_ca: false }
        );
        assert_eq!(fs::read(ca_paths(&tls).0).unwrap(), ca_before);
    }

    #[test]
    fn ecdsa_p256_leaf_and_ca_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let tls = DeviceTlsConfig {
            key_type: KeyType::EcdsaP256,
            ..device_tls(dir.path())
        };
        ensure(&tls).unwrap();
        let chain = X509::stack_from_pem(&fs::read(&tls.cert).unwrap()).unwrap();
        let ca = X509::from_pem(&fs::read(ca_paths(&tls).0).unwrap()).unwrap();
        assert!(chain[0].verify(&ca.public_key().unwrap()).unwrap());
        for cert in [&chain[0], &ca] {
            assert_eq!(cert.public_key().unwrap().id(), openssl::pkey::Id::EC);
            assert_eq!(
                cert.signature_algorithm().object().nid(),
                openssl::nid::Nid::ECDSA_WITH_SHA256
            );
        }
        let key = openssl::pkey::PKey::private_key_from_pem(&fs::read(&tls.key).unwrap());
        assert_eq!(key.unwrap().id(), openssl::pkey::Id::EC);
        let text = String::from_utf8(chain[0].to_text().unwrap()).unwrap();
        assert!(!text.contains("Key Encipherment"), "{text}");
    }

    #[test]
    fn half_present_pair_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let tls = device_tls(dir.path());
        ensure(&tls).unwrap();
        fs::remove_file(&tls.key).unwrap();
        let err = ensure(&tls).unwrap_err().to_string();
        assert!(
            err.contains("device_tls.key") && err.contains("tlsbridge.key"),
            "{err}"
        );
    }
}
