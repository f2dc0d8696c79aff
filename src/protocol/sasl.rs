//! SASL pieces of the post-TLS login, shared by SMTP, IMAP and POP3: decoding the device's
//! PLAIN and LOGIN responses, building the XOAUTH2 initial response for the upstream, and
//! reading the upstream's XOAUTH2 error challenge. Pure functions over bytes; the dialogs that
//! carry them live beside each protocol's other dialog code.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::secret::Secret;
use crate::text::printable;

/// Longest base64 response accepted from a device: a PLAIN response with a long password fits
/// many times over, and anything longer is not a login.
pub const MAX_RESPONSE_B64: usize = 2048;

/// Longest user name (authzid or authcid) accepted.
pub const MAX_USER: usize = 256;

/// Longest password accepted.
pub const MAX_PASSWORD: usize = 1024;

/// Longest upstream XOAUTH2 challenge decoded for the log.
pub const MAX_CHALLENGE_B64: usize = 4096;

/// The AUTH LOGIN prompt for the user name: base64 of `Username:`.
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";

/// The AUTH LOGIN prompt for the password: base64 of `Password:`.
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// Why a device's SASL response was not accepted. Never carries the response itself, which
/// may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The client sent `*` (RFC 4954, RFC 3501, RFC 5034).
    #[error("the client cancelled the authentication")]
    Cancelled,
    #[error("the response is longer than {MAX_RESPONSE_B64} octets")]
    TooLong,
    #[error("the response is not valid base64")]
    NotBase64,
    #[error("the response is malformed: {0}")]
    Malformed(&'static str),
    /// A PLAIN authzid other than the user: acting as someone else is not offered.
    #[error("logging in as one user to act as another is not supported")]
    OtherIdentity,
}

/// A device's PLAIN credentials (RFC 4616).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainCredentials {
    /// The identity to act as, when the device names one; tlsbridge accepts only none or the
    /// same as `user`.
    pub authzid: Option<String>,
    /// The user name (authcid).
    pub user: String,
    pub password: Secret,
}

/// Decodes one base64 SASL response line (CRLF optional). `*` is a cancellation; `=` and an
/// empty line are an empty response.
pub fn decode_response(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    let line = line
        .strip_suffix(b"\n")
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .unwrap_or(line);
    let line = line.trim_ascii();
    if line.len() > MAX_RESPONSE_B64 {
        return Err(SaslError::TooLong);
    }
    match line {
        b"*" => Err(SaslError::Cancelled),
        b"" | b"=" => Ok(Vec::new()),
        _ => STANDARD.decode(line).map_err(|_| SaslError::NotBase64),
    }
}

/// Decodes a PLAIN response: base64 of `authzid NUL authcid NUL passwd`.
pub fn decode_plain(line: &[u8]) -> Result<PlainCredentials, SaslError> {
    let decoded = zeroize::Zeroizing::new(decode_response(line)?);
    let mut parts = decoded.split(|&b| b == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed(
            "PLAIN needs exactly three NUL-separated fields",
        ));
    };
    let authzid = user_name(authzid, true)?;
    let user = user_name(user, false)?.ok_or(SaslError::Malformed("empty user name"))?;
    // The mailbox comes from `user` alone, so a login asking for another identity must fail
    // rather than go on as `user` (RFC 4616, section 2).
    if authzid.as_ref().is_some_and(|authzid| *authzid != user) {
        return Err(SaslError::OtherIdentity);
    }
    Ok(PlainCredentials {
        authzid,
        user,
        password: password_of(password)?,
    })
}

/// Decodes the device's answer to [`LOGIN_USERNAME_PROMPT`] (or the initial response of
/// `AUTH LOGIN <b64>`).
pub fn decode_login_user(line: &[u8]) -> Result<String, SaslError> {
    let decoded = decode_response(line)?;
    user_name(&decoded, false)?.ok_or(SaslError::Malformed("empty user name"))
}

/// Decodes the device's answer to [`LOGIN_PASSWORD_PROMPT`].
pub fn decode_login_password(line: &[u8]) -> Result<Secret, SaslError> {
    let decoded = zeroize::Zeroizing::new(decode_response(line)?);
    password_of(&decoded)
}

fn user_name(bytes: &[u8], may_be_empty: bool) -> Result<Option<String>, SaslError> {
    if bytes.is_empty() {
        return if may_be_empty {
            Ok(None)
        } else {
            Err(SaslError::Malformed("empty user name"))
        };
    }
    if bytes.len() > MAX_USER {
        return Err(SaslError::Malformed("user name too long"));
    }
    let name =
        std::str::from_utf8(bytes).map_err(|_| SaslError::Malformed("user name not UTF-8"))?;
    if name.chars().any(char::is_control) {
        return Err(SaslError::Malformed("control character in the user name"));
    }
    Ok(Some(name.to_string()))
}

fn password_of(bytes: &[u8]) -> Result<Secret, SaslError> {
    if bytes.is_empty() {
        return Err(SaslError::Malformed("empty password"));
    }
    if bytes.len() > MAX_PASSWORD {
        return Err(SaslError::Malformed("password too long"));
    }
    let password =
        std::str::from_utf8(bytes).map_err(|_| SaslError::Malformed("password not UTF-8"))?;
    Ok(Secret::new(password))
}

/// The base64 XOAUTH2 initial response: `user=<mailbox>^Aauth=Bearer <token>^A^A`. It holds
/// the token, so it is a [`Secret`] too. `None` when the mailbox or token could break the
/// framing (a ^A, a control character), which a validated config never produces.
pub fn xoauth2_initial_response(mailbox: &str, token: &Secret) -> Option<Secret> {
    let clean = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic());
    if !clean(mailbox) || !clean(token.expose()) {
        return None;
    }
    let raw = zeroize::Zeroizing::new(format!(
        "user={mailbox}\x01auth=Bearer {}\x01\x01",
        token.expose()
    ));
    Some(Secret::new(STANDARD.encode(raw.as_bytes())))
}

/// What an upstream's XOAUTH2 error challenge said, made safe for a log line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Xoauth2Challenge {
    /// An HTTP-like status, e.g. `401` (bad or expired token) or `400`.
    pub status: Option<String>,
    pub schemes: Option<String>,
    pub scope: Option<String>,
    /// The whole decoded challenge, sanitised and bounded, for anything the fields miss.
    pub text: String,
}

impl fmt::Display for Xoauth2Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.status {
            Some(status) => write!(f, "status {status}")?,
            None => f.write_str("no status")?,
        }
        if let Some(scope) = &self.scope {
            write!(f, ", scope {scope}")?;
        }
        if self.status.is_none() {
            write!(f, ": {}", self.text)?;
        }
        Ok(())
    }
}

/// Decodes an upstream's XOAUTH2 error challenge (base64 JSON such as
/// `{"status":"401","schemes":"bearer","scope":"https://outlook.office.com/SMTP.Send"}`).
/// Anything that is not that shape is still returned, sanitised, in `text`.
pub fn decode_xoauth2_challenge(b64: &[u8]) -> Xoauth2Challenge {
    let b64 = b64.trim_ascii();
    let b64 = &b64[..b64.len().min(MAX_CHALLENGE_B64)];
    let Ok(decoded) = STANDARD.decode(b64) else {
        return Xoauth2Challenge {
            text: format!("not base64: {}", crate::text::printable_bytes(b64)),
            ..Default::default()
        };
    };
    let text = crate::text::printable_bytes(&decoded);
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(&decoded) else {
        return Xoauth2Challenge {
            text,
            ..Default::default()
        };
    };
    let field = |name: &str| match fields.get(name) {
        Some(serde_json::Value::String(s)) => Some(printable(s)),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Xoauth2Challenge {
        status: field("status"),
        schemes: field("schemes"),
        scope: field("scope"),
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(raw: &[u8]) -> Vec<u8> {
        STANDARD.encode(raw).into_bytes()
    }

    #[test]
    fn plain_with_and_without_authzid() {
        let creds = decode_plain(&b64(b"\0scanner1\0pa55 word")).unwrap();
        assert_eq!(creds.authzid, None);
        assert_eq!(creds.user, "scanner1");
        assert_eq!(creds.password.expose(), "pa55 word");
        let mut line = b64(b"scanner1\0scanner1\0pw");
        line.extend_from_slice(b"\r\n");
        let creds = decode_plain(&line).unwrap();
        assert_eq!(creds.authzid.as_deref(), Some("scanner1"));
        assert!(!format!("{creds:?}").contains("pw\""));
        let err = decode_plain(&b64(b"boss\0scanner1\0pw")).unwrap_err();
        assert_eq!(err, SaslError::OtherIdentity);
        assert!(!err.to_string().contains("boss"), "{err}");
    }

    #[test]
    fn plain_rejects_malformed_input_without_echoing_it() {
        for bad in [
            b64(b"scanner1\0pw"),
            b64(b"\0\0pw"),
            b64(b"\0user\0"),
            b64(b"a\0b\0c\0d"),
            b64(b"\0us\x1ber\0pw"),
            b64(b"\0\xff\0pw"),
            b"!!notbase64!!".to_vec(),
        ] {
            let err = decode_plain(&bad).unwrap_err();
            assert!(!err.to_string().contains("pw"), "{err}");
        }
        assert_eq!(decode_plain(b"*\r\n"), Err(SaslError::Cancelled));
        let long = vec![b'A'; MAX_RESPONSE_B64 + 4];
        assert_eq!(decode_plain(&long), Err(SaslError::TooLong));
        let mut long_password = b"\0user\0".to_vec();
        long_password.extend(vec![b'p'; MAX_PASSWORD + 1]);
        assert!(matches!(
            decode_plain(&b64(&long_password)),
            Err(SaslError::Malformed(_))
        ));
    }

    #[test]
    fn login_prompts_and_answers() {
        assert_eq!(
            STANDARD.decode(LOGIN_USERNAME_PROMPT).unwrap(),
            b"Username:"
        );
        assert_eq!(
            STANDARD.decode(LOGIN_PASSWORD_PROMPT).unwrap(),
            b"Password:"
        );
        assert_eq!(decode_login_user(b"c2Nhbm5lcjE=\r\n").unwrap(), "scanner1");
        assert_eq!(
            decode_login_password(b"cGFzcw==\r\n").unwrap().expose(),
            "pass"
        );
        assert_eq!(decode_login_user(b"*\r\n"), Err(SaslError::Cancelled));
        assert!(decode_login_user(b"\r\n").is_err());
        assert!(decode_login_password(b"=\r\n").is_err());
    }

    #[test]
    fn xoauth2_initial_response_is_the_documented_string() {
        let token = Secret::new("eyJ0eXAi.abc.def");
        let response = xoauth2_initial_response("scanner@contoso.com", &token).unwrap();
        assert_eq!(
            STANDARD.decode(response.expose()).unwrap(),
            b"user=scanner@contoso.com\x01auth=Bearer eyJ0eXAi.abc.def\x01\x01"
        );
        assert_eq!(response.to_string(), crate::secret::MASK);
        assert!(xoauth2_initial_response("a\x01b@c", &token).is_none());
        assert!(xoauth2_initial_response("a@b", &Secret::new("x y")).is_none());
    }

    #[test]
    fn xoauth2_challenges_become_loggable() {
        let json = br#"{"status":"401","schemes":"bearer","scope":"https://outlook.office.com/SMTP.Send"}"#;
        let challenge = decode_xoauth2_challenge(&b64(json));
        assert_eq!(challenge.status.as_deref(), Some("401"));
        assert_eq!(challenge.schemes.as_deref(), Some("bearer"));
        assert_eq!(
            challenge.to_string(),
            "status 401, scope https://outlook.office.com/SMTP.Send"
        );
        let hostile = decode_xoauth2_challenge(&b64(b"{\"status\":\"400\\n\\u001b[31mFAKE\"}"));
        assert_eq!(hostile.status.as_deref(), Some("400\\n\\x1b[31mFAKE"));
        let text = decode_xoauth2_challenge(&b64(b"plain\nwords"));
        assert_eq!(text.status, None);
        assert_eq!(text.to_string(), "no status: plain\\nwords");
        let garbage = decode_xoauth2_challenge(b"%%%\x1b");
        assert!(garbage.text.starts_with("not base64"), "{}", garbage.text);
        assert!(!garbage.text.contains('\x1b'));
    }
}
