//! One token request: a fresh HTTP/1.1 connection over rustls (the token is cached for an hour,
//! so no pool is worth keeping), a form POST, and the reading of Entra's reply.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsConnector;

use super::{usable_lifetime, AccessToken, TokenError};
use crate::secret::Secret;
use crate::text::printable;

/// Deadline for the TCP connection and TLS handshake to the token endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline for the whole request: connection, handshake, request and reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest reply body read; a token response is a few kilobytes.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Longest access token accepted (Entra's are 1.5 to 3 KB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The token endpoint, parsed once.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl Endpoint {
    /// An `https://` URL; anything else is refused (the request carries the credential).
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let uri: Uri = url
            .parse()
            .map_err(|err| format!("{url:?} is not a URL: {err}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{url:?} must be an https:// URL"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        Ok(Endpoint {
            url: url.to_string(),
            host,
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_string(),
            path: uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string()),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }
}

/// A reply: status and body, when the exchange itself worked.
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

/// POSTs the form `body` to the endpoint, bounded by [`CONNECT_TIMEOUT`] and
/// [`REQUEST_TIMEOUT`].
pub async fn post_form(
    endpoint: &Endpoint,
    tls: &Arc<ClientConfig>,
    body: Secret,
) -> Result<Reply, TokenError> {
    timeout(REQUEST_TIMEOUT, exchange(endpoint, tls, body))
        .await
        .unwrap_or_else(|_| {
            Err(TokenError::Timeout {
                host: endpoint.host.clone(),
                after: REQUEST_TIMEOUT,
            })
        })
}

async fn exchange(
    endpoint: &Endpoint,
    tls: &Arc<ClientConfig>,
    body: Secret,
) -> Result<Reply, TokenError> {
    let unreachable = |reason: String| TokenError::Unreachable {
        host: endpoint.host.clone(),
        reason,
    };
    let name = ServerName::try_from(endpoint.host.clone())
        .map_err(|err| unreachable(format!("not a server name: {err}")))?;
    let connect = async {
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|err| unreachable(format!("connect: {err}")))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|err| unreachable(format!("TLS: {err}")))
    };
    let stream = timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| TokenError::Timeout {
            host: endpoint.host.clone(),
            after: CONNECT_TIMEOUT,
        })??;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| unreachable(format!("HTTP: {err}")))?;
    // Drives the connection; it ends when the reply is read and `sender` is dropped.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::post(endpoint.path.as_str())
        .header(HOST, endpoint.authority.as_str())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json")
        .header(USER_AGENT, concat!("tlsbridge/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body.expose().as_bytes().to_vec())))
        .map_err(|err| unreachable(format!("cannot build the request: {err}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| unreachable(format!("HTTP: {err}")))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|err| TokenError::BadResponse {
            host: endpoint.host.clone(),
            reason: format!("reading the body: {err}"),
        })?
        .to_bytes();
    Ok(Reply { status, body })
}

#[derive(Deserialize)]
struct TokenReply {
    access_token: String,
    expires_in: Seconds,
    #[serde(default)]
    token_type: Option<String>,
}

/// `expires_in` is a number in v2.0 replies and a string in some older ones.
#[derive(Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(u64),
    Text(String),
}

#[derive(Deserialize)]
struct ErrorReply {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Option<Vec<u64>>,
}

/// Turns the endpoint's reply into a token or a typed error. `secret` (the client secret or
/// assertion sent) is scrubbed from anything quoted, in case an endpoint echoes it.
pub fn parse_reply(
    endpoint: &Endpoint,
    reply: Reply,
    secret: &Secret,
    sent: Instant,
) -> Result<AccessToken, TokenError> {
    let host = endpoint.host.clone();
    let bad = |reason: &str| TokenError::BadResponse {
        host: host.clone(),
        reason: reason.to_string(),
    };
    let quote = |text: &str| {
        let line = text.lines().next().unwrap_or_default();
        let line = if secret.is_empty() {
            line.to_string()
        } else {
            line.replace(secret.expose(), crate::secret::MASK)
        };
        printable(&line)
    };
    let status = reply.status;
    if status == StatusCode::OK {
        let token: TokenReply =
            serde_json::from_slice(&reply.body).map_err(|_| bad("HTTP 200 without a token"))?;
        if let Some(kind) = &token.token_type {
            if !kind.eq_ignore_ascii_case("bearer") {
                return Err(bad("the token is not a bearer token"));
            }
        }
        let expires_in = match token.expires_in {
            Seconds::Number(n) => n,
            Seconds::Text(text) => text
                .parse()
                .map_err(|_| bad("expires_in is not a number"))?,
        };
        if expires_in == 0 {
            return Err(bad("expires_in is 0"));
        }
        let value = token.access_token;
        if value.is_empty()
            || value.len() > MAX_TOKEN_BYTES
            || !value.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(bad("the access token is empty, too long or not printable"));
        }
        return Ok(AccessToken {
            token: Secret::new(value),
            usable_until: sent + usable_lifetime(Duration::from_secs(expires_in)),
        });
    }
    let error: Option<ErrorReply> = serde_json::from_slice(&reply.body).ok();
    let transient = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || error
            .as_ref()
            .is_some_and(|e| e.error == "temporarily_unavailable");
    if transient {
        let detail = error
            .map(|e| format!(" {}", quote(&e.error)))
            .unwrap_or_default();
        return Err(TokenError::Unavailable {
            host,
            status: status.as_u16(),
            detail,
        });
    }
    let Some(error) = error else {
        return Err(bad(&format!(
            "HTTP {} without an OAuth error",
            status.as_u16()
        )));
    };
    let description = error.error_description.as_deref().map(quote);
    let code = error
        .error_codes
        .as_ref()
        .and_then(|codes| codes.first())
        .map(|code| format!("AADSTS{code}"))
        .or_else(|| description.as_deref().and_then(aadsts_in));
    Err(TokenError::Refused {
        status: status.as_u16(),
        error: quote(&error.error),
        code,
        description: description.unwrap_or_default(),
    })
}

/// `AADSTSnnnn` at the start of an error description, Entra's usual form.
fn aadsts_in(text: &str) -> Option<String> {
    let rest = text.strip_prefix("AADSTS")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!digits.is_empty()).then(|| format!("AADSTS{digits}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint::parse("https://login.example:8443/t/oauth2/v2.0/token").unwrap()
    }

    fn reply(status: u16, body: &str) -> Result<AccessToken, TokenError> {
        let reply = Reply {
            status: StatusCode::from_u16(status).unwrap(),
            body: Bytes::from(body.to_string()),
        };
        parse_reply(&endpoint(), reply, &Secret::new("s3cret"), Instant::now())
    }

    #[test]
    fn endpoints_must_be_https_and_keep_port_and_path() {
        let e = endpoint();
        assert_eq!((e.host(), e.port), ("login.example", 8443));
        assert_eq!(e.authority, "login.example:8443");
        assert_eq!(e.path, "/t/oauth2/v2.0/token");
        assert!(Endpoint::parse("http://login.example/token").is_err());
        assert_eq!(Endpoint::parse("https://[::1]/x").unwrap().host(), "::1");
    }

    #[test]
    fn token_replies_are_read_with_either_expires_in_form() {
        for body in [
            r#"{"token_type":"Bearer","expires_in":3599,"access_token":"eyJ.a.b"}"#,
            r#"{"token_type":"Bearer","expires_in":"3599","ext_expires_in":"3599","access_token":"eyJ.a.b"}"#,
        ] {
            let token = reply(200, body).unwrap();
            assert_eq!(token.token.expose(), "eyJ.a.b");
            let left = token.usable_until - Instant::now();
            assert!(left > Duration::from_secs(3500) && left < Duration::from_secs(3540));
        }
        for body in [
            r#"{"expires_in":3599}"#,
            r#"{"expires_in":0,"access_token":"x"}"#,
            r#"{"expires_in":10,"access_token":"x y"}"#,
            r#"{"expires_in":10,"access_token":"x","token_type":"mac"}"#,
            "<html>",
        ] {
            assert!(
                matches!(reply(200, body), Err(TokenError::BadResponse { .. })),
                "{body}"
            );
        }
    }

    #[test]
    fn entra_errors_surface_the_code_and_never_the_secret() {
        let err = reply(
            401,
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided: s3cret.\r\nTrace ID: 1","error_codes":[7000215]}"#,
        )
        .unwrap_err();
        assert_eq!(err.aadsts(), Some("AADSTS7000215"));
        assert!(!err.is_transient());
        let text = err.to_string();
        assert!(text.contains("invalid_client (AADSTS7000215)"), "{text}");
        assert!(
            !text.contains("s3cret") && !text.contains("Trace ID"),
            "{text}"
        );

        let err = reply(
            400,
            r#"{"error":"invalid_scope","error_description":"AADSTS70011: bad"}"#,
        )
        .unwrap_err();
        assert_eq!(err.aadsts(), Some("AADSTS70011"));
        for (status, body) in [
            (503, "busy"),
            (429, "{}"),
            (400, r#"{"error":"temporarily_unavailable"}"#),
        ] {
            assert!(reply(status, body).unwrap_err().is_transient(), "{status}");
        }
        assert!(matches!(
            reply(404, "not found"),
            Err(TokenError::BadResponse { .. })
        ));
    }
}
