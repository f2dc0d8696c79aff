//! The JWT client assertion of the certificate credential (Microsoft identity platform
//! "certificate credentials"): header `alg` PS256, `typ` JWT, `x5t#S256` (the certificate's
//! SHA-256 thumbprint); claims `aud` = token URL, `iss` = `sub` = client id, `exp`, `nbf`, `iat`,
//! `jti`. Signed with OpenSSL; nothing here implements cryptography itself.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Padding;
use openssl::sign::{RsaPssSaltlen, Signer};
use openssl::x509::X509;

use crate::secret::Secret;

/// How long an assertion is valid: long enough for clock skew, short enough to be useless when
/// captured. A fresh one is signed for every token request.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

/// The `client_assertion_type` of a JWT bearer assertion (RFC 7523).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The signature algorithm of the assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// RSASSA-PSS with SHA-256, what Entra asks for with `x5t#S256`.
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, the older form.
    Rs256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Ps256 => "PS256",
            Algorithm::Rs256 => "RS256",
        }
    }
}

/// The certificate's private key and thumbprint. Debug shows the thumbprint only.
pub struct AssertionSigner {
    key: PKey<Private>,
    x5t_s256: String,
    algorithm: Algorithm,
}

impl fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("x5t#S256", &self.x5t_s256)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl AssertionSigner {
    /// Reads the PEM certificate (the first one, when the file holds a chain) and its key.
    /// Errors name the config key and the file, never key material.
    pub fn load(cert: &Path, key: &Path) -> Result<AssertionSigner, String> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|err| format!("oauth.{what}: cannot read {}: {err}", path.display()))
        };
        let cert_pem = read("client_cert", cert)?;
        let key_pem = zeroize::Zeroizing::new(read("client_key", key)?);
        AssertionSigner::from_pem(&cert_pem, &key_pem).map_err(|err| {
            format!(
                "oauth.client_cert/client_key ({}, {}): {err}",
                cert.display(),
                key.display()
            )
        })
    }

    /// A signer from PEM text; the key must be RSA and belong to the certificate.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<AssertionSigner, String> {
        let cert = X509::from_pem(cert_pem).map_err(|_| "no PEM certificate".to_string())?;
        let key = PKey::private_key_from_pem(key_pem)
            .map_err(|_| "no unencrypted PEM private key".to_string())?;
        if key.rsa().is_err() {
            return Err("the key must be RSA: Entra verifies PS256/RS256 assertions".into());
        }
        let matches = cert
            .public_key()
            .map(|public| public.public_eq(&key))
            .unwrap_or(false);
        if !matches {
            return Err("the key does not belong to the certificate".into());
        }
        let der = cert
            .to_der()
            .map_err(|err| format!("cannot encode the certificate: {err}"))?;
        Ok(AssertionSigner {
            key,
            x5t_s256: URL_SAFE_NO_PAD.encode(openssl::sha::sha256(&der)),
            algorithm: Algorithm::Ps256,
        })
    }

    /// Signs with RS256 instead of PS256, for endpoints that want the older form.
    pub fn with_algorithm(mut self, algorithm: Algorithm) -> AssertionSigner {
        self.algorithm = algorithm;
        self
    }

    /// The `x5t#S256` header value: base64url of the SHA-256 of the certificate's DER.
    pub fn thumbprint(&self) -> &str {
        &self.x5t_s256
    }

    /// A signed assertion for `client_id` at the token endpoint `audience`, valid from `now`.
    pub fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<Secret, String> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the clock is before 1970".to_string())?
            .as_secs();
        let header = serde_json::json!({
            "alg": self.algorithm.as_str(),
            "typ": "JWT",
            "x5t#S256": self.x5t_s256,
        });
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": random_id()?,
            "nbf": iat,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME.as_secs(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .sign(signing_input.as_bytes())
            .map_err(|err| format!("cannot sign the client assertion: {err}"))?;
        Ok(Secret::new(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        )))
    }

    fn sign(&self, input: &[u8]) -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let mut signer = Signer::new(MessageDigest::sha256(), &self.key)?;
        if self.algorithm == Algorithm::Ps256 {
            signer.set_rsa_padding(Padding::PKCS1_PSS)?;
            signer.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
            signer.set_rsa_mgf1_md(MessageDigest::sha256())?;
        }
        signer.sign_oneshot_to_vec(input)
    }
}

/// A random UUID-shaped `jti`, so the endpoint can refuse a replayed assertion.
fn random_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    openssl::rand::rand_bytes(&mut bytes).map_err(|err| format!("no randomness: {err}"))?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// What a token endpoint checks in an assertion; the test endpoint uses it.
#[cfg(test)]
pub mod verify {
    use super::*;
    use openssl::sign::Verifier;

    /// The decoded header and claims, when the signature verifies with `cert`'s key.
    pub fn verify(
        assertion: &str,
        cert: &X509,
    ) -> Result<(serde_json::Value, serde_json::Value), String> {
        let mut parts = assertion.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not three parts".into());
        };
        let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|e| e.to_string());
        let header_json: serde_json::Value =
            serde_json::from_slice(&decode(header)?).map_err(|e| e.to_string())?;
        let claims_json: serde_json::Value =
            serde_json::from_slice(&decode(claims)?).map_err(|e| e.to_string())?;
        let public = cert.public_key().map_err(|e| e.to_string())?;
        let mut verifier =
            Verifier::new(MessageDigest::sha256(), &public).map_err(|e| e.to_string())?;
        if header_json["alg"] == "PS256" {
            verifier
                .set_rsa_padding(Padding::PKCS1_PSS)
                .and_then(|()| verifier.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH))
                .and_then(|()| verifier.set_rsa_mgf1_md(MessageDigest::sha256()))
                .map_err(|e| e.to_string())?;
        }
        let input = format!("{header}.{claims}");
        let ok = verifier
            .verify_oneshot(&decode(signature)?, input.as_bytes())
            .map_err(|e| e.to_string())?;
        if !ok {
            return Err("bad signature".into());
        }
        Ok((header_json, claims_json))
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use openssl::asn1::Asn1Time;
    use openssl::rsa::Rsa;
    use openssl::x509::X509NameBuilder;

    /// A self-signed RSA certificate and its key, as an app registration would hold.
    pub fn app_certificate() -> (X509, PKey<Private>) {
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "tlsbridge test app")
            .unwrap();
        let name = name.build();
        let mut builder = X509::builder().unwrap();
        builder.set_version(2).unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&Asn1Time::days_from_now(30).unwrap())
            .unwrap();
        builder.sign(&key, MessageDigest::sha256()).unwrap();
        (builder.build(), key)
    }

    fn signer(cert: &X509, key: &PKey<Private>) -> AssertionSigner {
        AssertionSigner::from_pem(
            &cert.to_pem().unwrap(),
            &key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn the_assertion_verifies_and_carries_the_documented_fields() {
        let (cert, key) = app_certificate();
        let now = SystemTime::now();
        for algorithm in [Algorithm::Ps256, Algorithm::Rs256] {
            let signer = signer(&cert, &key).with_algorithm(algorithm);
            let assertion = signer
                .assertion("client-1", "https://login.example/t/token", now)
                .unwrap();
            let (header, claims) = verify::verify(assertion.expose(), &cert).unwrap();
            assert_eq!(header["alg"], algorithm.as_str());
            assert_eq!(header["typ"], "JWT");
            let thumb = URL_SAFE_NO_PAD.encode(openssl::sha::sha256(&cert.to_der().unwrap()));
            assert_eq!(header["x5t#S256"], thumb.as_str());
            assert_eq!(claims["aud"], "https://login.example/t/token");
            assert_eq!(claims["iss"], "client-1");
            assert_eq!(claims["sub"], "client-1");
            let iat = claims["iat"].as_u64().unwrap();
            assert_eq!(claims["nbf"].as_u64(), Some(iat));
            assert_eq!(claims["exp"].as_u64(), Some(iat + 600));
            assert_eq!(claims["jti"].as_str().map(str::len), Some(36));
        }
        let a = signer(&cert, &key).assertion("c", "a", now).unwrap();
        let b = signer(&cert, &key).assertion("c", "a", now).unwrap();
        assert_ne!(a, b, "every assertion has its own jti");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_without_quoting_it() {
        let (cert, key) = app_certificate();
        let (_, other) = app_certificate();
        let pem = other.private_key_to_pem_pkcs8().unwrap();
        let err = AssertionSigner::from_pem(&cert.to_pem().unwrap(), &pem).unwrap_err();
        assert!(err.contains("does not belong"), "{err}");
        let err = AssertionSigner::from_pem(b"junk", &pem).unwrap_err();
        assert!(!err.contains("PRIVATE KEY"), "{err}");
        let shown = format!("{:?}", signer(&cert, &key));
        assert!(
            shown.contains("x5t#S256") && !shown.contains("PRIVATE"),
            "{shown}"
        );
    }
}
