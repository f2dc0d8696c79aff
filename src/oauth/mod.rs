//! Access tokens for SASL XOAUTH2: the OAuth 2.0 client-credentials grant against Microsoft
//! Entra ID, with a client secret or a JWT client assertion signed by the app's certificate.
//!
//! One [`TokenSource`] serves every session. A token is cached until shortly before it
//! expires; refresh is single-flight (N sessions needing a token cause one request); a failed
//! refresh backs off, growing up to a cap, and during the back-off sessions that still hold a
//! valid token keep it while the others get the error at once instead of waiting.

pub mod http;
pub mod jwt;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::ClientConfig;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{ConfigError, OAuthConfig};
use crate::secret::Secret;
use http::Endpoint;
use jwt::AssertionSigner;

/// Refresh this long before a token expires, in the background while it still serves.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);

/// A token with less than this left is not handed out: the session still has to log in with
/// it upstream.
pub const MIN_REMAINING: Duration = Duration::from_secs(60);

/// The first wait after a failed refresh; it doubles with each failure in a row.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// The longest wait between refresh attempts while the endpoint keeps failing.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Longest lifetime believed from `expires_in`; Entra's tokens live 60 to 90 minutes.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Why no token could be had. Never carries the secret, the assertion or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No TCP or TLS connection to the endpoint (transient).
    #[error("token endpoint {host} unreachable: {reason}")]
    Unreachable { host: String, reason: String },
    /// The endpoint did not answer in time (transient).
    #[error("token endpoint {host} did not answer within {}", humantime::format_duration(*after))]
    Timeout { host: String, after: Duration },
    /// The endpoint answered 5xx or 429 (transient).
    #[error("token endpoint {host} unavailable: HTTP {status}{detail}")]
    Unavailable {
        host: String,
        status: u16,
        detail: String,
    },
    /// The endpoint refused the grant, e.g. `invalid_client` (AADSTS7000215, a wrong secret):
    /// the admin has to fix the app registration or the credential.
    #[error(
        "token endpoint refused the request: HTTP {status} {error}{}: {description}",
        code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
    )]
    Refused {
        status: u16,
        /// The OAuth error, e.g. `invalid_client`, `unauthorized_client`, `invalid_scope`.
        error: String,
        /// Entra's code, e.g. `AADSTS7000215`.
        code: Option<String>,
        /// The first line of `error_description`, sanitised.
        description: String,
    },
    /// The endpoint answered something that is not a token response.
    #[error("token endpoint {host} sent a bad response: {reason}")]
    BadResponse { host: String, reason: String },
    /// The client credential could not be used (e.g. signing the assertion failed).
    #[error("client credential unusable: {0}")]
    Credential(String),
}

impl TokenError {
    /// True when a retry may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TokenError::Unreachable { .. }
                | TokenError::Timeout { .. }
                | TokenError::Unavailable { .. }
        )
    }

    /// Entra's `AADSTSnnnn` code, when the endpoint gave one.
    pub fn aadsts(&self) -> Option<&str> {
        match self {
            TokenError::Refused { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// A short, stable name for logs and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Unreachable { .. } => "token_endpoint_unreachable",
            TokenError::Timeout { .. } => "token_endpoint_timeout",
            TokenError::Unavailable { .. } => "token_endpoint_unavailable",
            TokenError::Refused { .. } => "token_refused",
            TokenError::BadResponse { .. } => "token_bad_response",
            TokenError::Credential(_) => "token_credential",
        }
    }
}

/// An access token and when it stops being handed out.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub token: Secret,
    /// After this, with [`MIN_REMAINING`] kept in hand, the token is no longer given out.
    pub usable_until: Instant,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &self.token)
            .field(
                "usable_for",
                &self.usable_until.saturating_duration_since(Instant::now()),
            )
            .finish()
    }
}

/// How the app proves who it is.
#[derive(Debug)]
pub enum ClientCredential {
    Secret(Secret),
    Certificate(Box<AssertionSigner>),
}

impl ClientCredential {
    /// Reads the credential the config names: the secret from the environment or its file, or
    /// the certificate and key. Files readable by group or others get a warning.
    pub fn from_config(oauth: &OAuthConfig) -> Result<ClientCredential, ConfigError> {
        if let Some(secret) = &oauth.client_secret {
            return Ok(ClientCredential::Secret(secret.clone()));
        }
        if let Some(path) = &oauth.client_secret_file {
            warn_if_loose("oauth.client_secret_file", path);
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|err| {
                ConfigError(format!(
                    "oauth.client_secret_file: cannot read {}: {err}",
                    path.display()
                ))
            })?);
            let secret = text.trim();
            if secret.is_empty() {
                return Err(ConfigError(format!(
                    "oauth.client_secret_file: {} is empty",
                    path.display()
                )));
            }
            return Ok(ClientCredential::Secret(Secret::new(secret)));
        }
        if let (Some(cert), Some(key)) = (&oauth.client_cert, &oauth.client_key) {
            warn_if_loose("oauth.client_key", key);
            let signer = AssertionSigner::load(cert, key).map_err(ConfigError)?;
            return Ok(ClientCredential::Certificate(Box::new(signer)));
        }
        Err(ConfigError(
            "oauth.client_secret_file: no client secret or certificate is configured".into(),
        ))
    }
}

fn warn_if_loose(key: &str, path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                key,
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "a secret file is readable by others than its owner; chmod 600 it"
            );
        }
    }
}

/// The shared token cache and refresher. Cheap to clone.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("endpoint", &self.inner.endpoint.url)
            .field("client_id", &self.inner.client_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    endpoint: Endpoint,
    client_id: String,
    scope: String,
    credential: ClientCredential,
    tls: Arc<ClientConfig>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    token: Option<Cached>,
    failure: Option<Failure>,
    /// The refresh in flight; every caller that needs its outcome subscribes to it.
    refreshing: Option<Arc<watch::Sender<Option<Outcome>>>>,
    requests: u64,
}

type Outcome = Result<AccessToken, TokenError>;

#[derive(Clone)]
struct Cached {
    token: AccessToken,
    /// From here on, a refresh starts (in the background while the token is usable).
    refresh_at: Instant,
}

struct Failure {
    error: TokenError,
    retry_at: Instant,
    in_a_row: u32,
}

impl TokenSource {
    /// A source for the `[oauth]` section; `tls` is the client configuration for the token
    /// host (see [`crate::tls::modern::client_config`]: web PKI plus `extra_roots`, verified).
    pub fn from_config(
        oauth: &OAuthConfig,
        tls: Arc<ClientConfig>,
    ) -> Result<TokenSource, ConfigError> {
        let credential = ClientCredential::from_config(oauth)?;
        TokenSource::new(
            &oauth.token_endpoint(),
            &oauth.client_id,
            &oauth.scope,
            credential,
            tls,
        )
    }

    pub fn new(
        token_url: &str,
        client_id: &str,
        scope: &str,
        credential: ClientCredential,
        tls: Arc<ClientConfig>,
    ) -> Result<TokenSource, ConfigError> {
        let endpoint = Endpoint::parse(token_url)
            .map_err(|reason| ConfigError(format!("oauth.token_url: {reason}")))?;
        Ok(TokenSource {
            inner: Arc::new(Inner {
                endpoint,
                client_id: client_id.to_string(),
                scope: scope.to_string(),
                credential,
                tls,
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// The token endpoint's URL, for logs and `probe`.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint.url
    }

    /// Token requests sent so far (for logs and tests).
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    /// A usable token: the cached one, or the outcome of the (single) refresh in flight.
    /// During a back-off after a failed refresh this returns at once: the cached token while it
    /// is usable, else the failure.
    pub async fn token(&self) -> Result<AccessToken, TokenError> {
        let mut waiting = {
            let mut state = self.lock();
            let now = Instant::now();
            let usable = state
                .token
                .as_ref()
                .filter(|cached| now < cached.token.usable_until)
                .cloned();
            if let Some(cached) = &usable {
                if now < cached.refresh_at {
                    return Ok(cached.token.clone());
                }
            }
            if let Some(failure) = &state.failure {
                if now < failure.retry_at {
                    return usable
                        .map(|cached| cached.token)
                        .ok_or_else(|| failure.error.clone());
                }
            }
            let waiting = match &state.refreshing {
                Some(refresh) => refresh.subscribe(),
                None => self.start_refresh(&mut state),
            };
            if let Some(cached) = usable {
                // Near expiry but still usable: the refresh runs in the background.
                return Ok(cached.token);
            }
            waiting
        };
        let outcome = match waiting.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        };
        outcome.unwrap_or_else(|| {
            Err(TokenError::Credential(
                "the token refresh was abandoned".into(),
            ))
        })
    }

    /// Forgets `rejected` when it is still the cached token, e.g. after the upstream refused it
    /// as expired or revoked; the next caller fetches a new one (subject to the back-off).
    /// Sessions that saw the same rejection drop it once, not a newer token another fetched.
    pub fn invalidate(&self, rejected: &AccessToken) {
        let mut state = self.lock();
        if state.token.as_ref().is_some_and(|c| &c.token == rejected) {
            state.token = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.inner.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Spawns the refresh, so that a caller giving up (its session closed) never cancels it
    /// for the others.
    fn start_refresh(&self, state: &mut State) -> watch::Receiver<Option<Outcome>> {
        let (done, waiting) = watch::channel(None);
        let done = Arc::new(done);
        state.refreshing = Some(done.clone());
        state.requests += 1;
        let source = self.clone();
        tokio::spawn(async move {
            let outcome = source.fetch().await;
            source.settle(&outcome);
            let _ = done.send(Some(outcome));
        });
        waiting
    }

    /// Records a refresh's outcome: the new token, or the failure and the next retry time.
    fn settle(&self, outcome: &Outcome) {
        let mut state = self.lock();
        state.refreshing = None;
        let now = Instant::now();
        match outcome {
            Ok(token) => {
                let lifetime = token.usable_until.saturating_duration_since(now);
                state.failure = None;
                state.token = Some(Cached {
                    token: token.clone(),
                    refresh_at: now + lifetime.saturating_sub(refresh_margin(lifetime)),
                });
            }
            Err(error) => {
                let in_a_row = state.failure.as_ref().map_or(0, |f| f.in_a_row) + 1;
                let wait = backoff(in_a_row);
                tracing::warn!(
                    endpoint = %self.inner.endpoint.url,
                    reason = error.reason(),
                    aadsts = error.aadsts(),
                    retry_in = %humantime::format_duration(wait),
                    "token refresh failed: {error}"
                );
                state.failure = Some(Failure {
                    error: error.clone(),
                    retry_at: now + wait,
                    in_a_row,
                });
            }
        }
    }

    /// One token request, bounded by the request timeout.
    async fn fetch(&self) -> Outcome {
        let (body, secret) = self.form()?;
        let sent = Instant::now();
        let reply = http::post_form(&self.inner.endpoint, &self.inner.tls, body).await?;
        http::parse_reply(&self.inner.endpoint, reply, &secret, sent)
    }

    /// The request body, and the secret in it (the client secret or the signed assertion).
    fn form(&self) -> Result<(Secret, Secret), TokenError> {
        let inner = &self.inner;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &inner.client_id)
            .append_pair("scope", &inner.scope);
        let secret;
        match &inner.credential {
            ClientCredential::Secret(value) => {
                secret = value.clone();
                form.append_pair("client_secret", secret.expose());
            }
            ClientCredential::Certificate(signer) => {
                secret = signer
                    .assertion(&inner.client_id, &inner.endpoint.url, SystemTime::now())
                    .map_err(TokenError::Credential)?;
                form.append_pair("client_assertion_type", jwt::ASSERTION_TYPE)
                    .append_pair("client_assertion", secret.expose());
            }
        }
        Ok((Secret::new(form.finish()), secret))
    }

    /// Test hook: callers waiting on the refresh in flight.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lock()
            .refreshing
            .as_ref()
            .map_or(0, |refresh| refresh.receiver_count())
    }

    /// Test hook: failed refreshes in a row.
    #[cfg(test)]
    fn failures(&self) -> u32 {
        self.lock().failure.as_ref().map_or(0, |f| f.in_a_row)
    }

    /// Test hook: makes the cached token due for refresh, still usable.
    #[cfg(test)]
    fn age(&self) {
        if let Some(cached) = &mut self.lock().token {
            cached.refresh_at = Instant::now();
        }
    }

    /// Test hook: makes the cached token unusable, as if its lifetime had run out.
    #[cfg(test)]
    fn expire(&self) {
        let mut state = self.lock();
        if let Some(cached) = &mut state.token {
            let past = Instant::now() - Duration::from_millis(1);
            cached.token.usable_until = past;
            cached.refresh_at = past;
        }
    }
}

/// How long before the end of its usable life a token is refreshed: [`REFRESH_BEFORE_EXPIRY`],
/// or half the lifetime of a short-lived one.
fn refresh_margin(lifetime: Duration) -> Duration {
    REFRESH_BEFORE_EXPIRY.min(lifetime / 2)
}

/// How long a token from a response with `expires_in` is handed out: its lifetime less
/// [`MIN_REMAINING`] (a quarter of a short lifetime), counted from when the request was sent.
pub fn usable_lifetime(expires_in: Duration) -> Duration {
    let lifetime = expires_in.min(MAX_TOKEN_LIFETIME);
    lifetime.saturating_sub(MIN_REMAINING.min(lifetime / 4))
}

/// The wait before retry number `in_a_row`: doubling from [`BACKOFF_FIRST`], capped.
fn backoff(in_a_row: u32) -> Duration {
    let factor = 1u32 << in_a_row.saturating_sub(1).min(16);
    BACKOFF_FIRST.saturating_mul(factor).min(BACKOFF_MAX)
}
