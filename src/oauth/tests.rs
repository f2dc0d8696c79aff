//! The token source against a local token endpoint: hyper over rustls with a test CA trusted
//! through `extra_roots`, issuing short-lived tokens for the client-credentials grant, checking
//! the client secret or the JWT assertion's signature, and counting requests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use openssl::x509::X509;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::*;
use crate::config::{ModernVersion, UpstreamTlsConfig};

const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const SECRET: &str = "Qx8~test.client-secret_value";
const SCOPE: &str = "https://outlook.office365.com/.default";

/// What the endpoint accepts as the client's proof.
#[derive(Clone)]
enum Accepts {
    Secret(String),
    Certificate(X509),
}

/// How the endpoint behaves for the next requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Issue,
    Unavailable,
}

struct EndpointState {
    url: String,
    accepts: Accepts,
    behaviour: Mutex<Behaviour>,
    lifetime_secs: u64,
    requests: AtomicUsize,
    /// Replies wait for a permit while the gate is closed, so tests can hold a refresh open.
    gate: Semaphore,
    rejections: Mutex<Vec<String>>,
}

struct TestEndpoint {
    state: Arc<EndpointState>,
    tls: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

impl TestEndpoint {
    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    fn set(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().unwrap() = behaviour;
    }

    fn close_gate(&self) {
        self.state.gate.forget_permits(usize::MAX >> 4);
    }

    fn open_gate(&self) {
        self.state.gate.add_permits(Semaphore::MAX_PERMITS >> 1);
    }

    fn rejections(&self) -> Vec<String> {
        self.state.rejections.lock().unwrap().clone()
    }

    fn source(&self, credential: ClientCredential) -> TokenSource {
        TokenSource::new(
            &self.state.url,
            CLIENT_ID,
            SCOPE,
            credential,
            self.tls.clone(),
        )
        .unwrap()
    }
}

/// A test CA, a leaf for 127.0.0.1, and the client configuration the product builds for the
/// upstream leg with the CA in `extra_roots`.
fn test_pki(dir: &std::path::Path) -> (rustls::ServerConfig, Arc<rustls::ClientConfig>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "token endpoint test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let roots = dir.join("ca.pem");
    std::fs::write(&roots, ca_cert.pem()).unwrap();
    let client = crate::tls::modern::client_config(&UpstreamTlsConfig {
        min_version: ModernVersion::Tls12,
        extra_roots: vec![roots],
        connect_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(leaf.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
    .unwrap();
    (server, client)
}

async fn token_endpoint(accepts: Accepts, lifetime_secs: u64) -> TestEndpoint {
    let dir = tempfile::tempdir().unwrap();
    let (server, tls) = test_pki(dir.path());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/contoso.onmicrosoft.com/oauth2/v2.0/token",
        listener.local_addr().unwrap().port()
    );
    let state = Arc::new(EndpointState {
        url,
        accepts,
        behaviour: Mutex::new(Behaviour::Issue),
        lifetime_secs,
        requests: AtomicUsize::new(0),
        gate: Semaphore::new(Semaphore::MAX_PERMITS >> 1),
        rejections: Mutex::new(Vec::new()),
    });
    let served = state.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, state) = (acceptor.clone(), served.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(&state, request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    TestEndpoint {
        state,
        tls,
        _dir: dir,
    }
}

fn json(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Entra's answer to a wrong client secret.
fn invalid_client(reason: &str) -> Response<Full<Bytes>> {
    json(
        401,
        serde_json::json!({
            "error": "invalid_client",
            "error_description": format!("AADSTS7000215: Invalid client secret provided. {reason}\r\nTrace ID: 0f0f"),
            "error_codes": [7000215],
        }),
    )
}

async fn answer(state: &EndpointState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let path_ok = state.url.ends_with(request.uri().path());
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if let Ok(permit) = state.gate.acquire().await {
        drop(permit);
    }
    if *state.behaviour.lock().unwrap() == Behaviour::Unavailable {
        return json(503, serde_json::json!({"error": "temporarily_unavailable"}));
    }
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if !path_ok
        || field("grant_type") != "client_credentials"
        || field("client_id") != CLIENT_ID
        || field("scope") != SCOPE
    {
        return json(400, serde_json::json!({"error": "invalid_request"}));
    }
    let verdict = match &state.accepts {
        Accepts::Secret(expected) => (field("client_secret") == expected)
            .then_some(())
            .ok_or("wrong secret".to_string()),
        Accepts::Certificate(cert) => check_assertion(state, &form, cert),
    };
    if let Err(reason) = verdict {
        state.rejections.lock().unwrap().push(reason.clone());
        return invalid_client(&reason);
    }
    json(
        200,
        serde_json::json!({
            "token_type": "Bearer",
            "expires_in": state.lifetime_secs,
            "ext_expires_in": state.lifetime_secs,
            "access_token": format!("eyJ0eXAiOiJKV1Qi.token-{n}.sig"),
        }),
    )
}

/// What Entra checks in a client assertion: type, signature with the registered certificate's
/// key, the thumbprint header, audience, issuer, subject and time.
fn check_assertion(
    state: &EndpointState,
    form: &HashMap<String, String>,
    cert: &X509,
) -> Result<(), String> {
    if form.get("client_assertion_type").map(String::as_str) != Some(jwt::ASSERTION_TYPE) {
        return Err("no jwt-bearer assertion type".into());
    }
    if form.contains_key("client_secret") {
        return Err("a secret beside the assertion".into());
    }
    let assertion = form.get("client_assertion").ok_or("no assertion")?;
    let (header, claims) = jwt::verify::verify(assertion, cert)?;
    let thumbprint = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        openssl::sha::sha256(&cert.to_der().unwrap()),
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let checks = [
        (header["alg"] == "PS256", "alg"),
        (header["x5t#S256"] == thumbprint.as_str(), "x5t#S256"),
        (claims["aud"] == state.url.as_str(), "aud"),
        (claims["iss"] == CLIENT_ID, "iss"),
        (claims["sub"] == CLIENT_ID, "sub"),
        (claims["exp"].as_u64().is_some_and(|exp| exp > now), "exp"),
        (
            claims["nbf"].as_u64().is_some_and(|nbf| nbf <= now + 5),
            "nbf",
        ),
        (claims["jti"].as_str().is_some_and(|j| !j.is_empty()), "jti"),
    ];
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, claim)) => Err(format!("assertion {claim} wrong")),
        None => Ok(()),
    }
}

fn secret() -> ClientCredential {
    ClientCredential::Secret(Secret::new(SECRET))
}

fn oauth_config(url: &str) -> crate::config::OAuthConfig {
    crate::config::OAuthConfig {
        tenant: "contoso.onmicrosoft.com".into(),
        client_id: CLIENT_ID.into(),
        client_secret_file: None,
        client_secret: None,
        client_cert: None,
        client_key: None,
        token_url: Some(url.into()),
        scope: SCOPE.into(),
        users_file: PathBuf::from("secrets/users"),
    }
}

/// Polls `condition` (state another task changes) for at most five seconds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn the_secret_grant_from_a_secret_file_succeeds_and_the_token_is_reused() {
    let endpoint = token_endpoint(Accepts::Secret(SECRET.into()), 3600).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client_secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let mut config = oauth_config(&endpoint.state.url);
    config.client_secret_file = Some(file);
    let source = TokenSource::from_config(&config, endpoint.tls.clone()).unwrap();

    let first = source.token().await.unwrap();
    assert_eq!(first.token.expose(), "eyJ0eXAiOiJKV1Qi.token-1.sig");
    let left = first.usable_until - Instant::now();
    assert!(left > Duration::from_secs(3400), "{left:?}");
    for _ in 0..5 {
        assert_eq!(source.token().await.unwrap(), first);
    }
    assert_eq!(endpoint.requests(), 1, "the cached token is reused");
    assert_eq!(source.requests(), 1);

    // An upstream refusing the token: it is dropped once; a stale rejection drops nothing.
    source.invalidate(&first);
    let second = source.token().await.unwrap();
    assert_ne!(second, first);
    source.invalidate(&first);
    assert_eq!(source.token().await.unwrap(), second);
    assert_eq!(endpoint.requests(), 2);
}

#[tokio::test]
async fn the_certificate_grant_signs_an_assertion_the_endpoint_verifies() {
    let (cert, key) = jwt::tests::app_certificate();
    let endpoint = token_endpoint(Accepts::Certificate(cert.clone()), 3600).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("app.crt"), dir.path().join("app.key"));
    std::fs::write(&cert_path, cert.to_pem().unwrap()).unwrap();
    crate::fsutil::write_atomic(&key_path, &key.private_key_to_pem_pkcs8().unwrap(), 0o600)
        .unwrap();
    let mut config = oauth_config(&endpoint.state.url);
    config.client_cert = Some(cert_path);
    config.client_key = Some(key_path);
    let source = TokenSource::from_config(&config, endpoint.tls.clone()).unwrap();

    let token = source.token().await.unwrap();
    assert_eq!(endpoint.rejections(), Vec::<String>::new());
    assert!(token.token.expose().contains("token-1"));

    // A certificate the app registration does not hold is refused.
    let (other_cert, other_key) = jwt::tests::app_certificate();
    let signer = AssertionSigner::from_pem(
        &other_cert.to_pem().unwrap(),
        &other_key.private_key_to_pem_pkcs8().unwrap(),
    )
    .unwrap();
    let stranger = endpoint.source(ClientCredential::Certificate(Box::new(signer)));
    let err = stranger.token().await.unwrap_err();
    assert_eq!(err.aadsts(), Some("AADSTS7000215"), "{err}");
    assert_eq!(endpoint.rejections(), ["bad signature"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_under_20_concurrent_callers_causes_one_request() {
    let endpoint = token_endpoint(Accepts::Secret(SECRET.into()), 3600).await;
    let source = endpoint.source(secret());
    let old = source.token().await.unwrap();
    source.expire();
    endpoint.close_gate();

    let callers: Vec<_> = (0..20)
        .map(|_| {
            let source = source.clone();
            tokio::spawn(async move { source.token().await })
        })
        .collect();
    // All 20 wait on the one refresh the endpoint is holding open.
    eventually("20 callers waiting on one refresh", || {
        source.waiting() == 20
    })
    .await;
    eventually("the refresh to reach the endpoint", || {
        endpoint.requests() == 2
    })
    .await;
    endpoint.open_gate();
    for caller in callers {
        let token = caller.await.unwrap().unwrap();
        assert_ne!(token, old);
        assert!(token.token.expose().contains("token-2"));
    }
    assert_eq!(endpoint.requests(), 2, "one refresh for 20 callers");
}

#[tokio::test]
async fn a_token_near_expiry_is_served_while_a_failing_refresh_backs_off() {
    let endpoint = token_endpoint(Accepts::Secret(SECRET.into()), 3600).await;
    let source = endpoint.source(secret());
    let held = source.token().await.unwrap();
    endpoint.set(Behaviour::Unavailable);
    source.age();

    // Due for refresh but still usable: served at once, the refresh runs behind it.
    assert_eq!(source.token().await.unwrap(), held);
    eventually("the background refresh to fail", || source.failures() == 1).await;
    assert_eq!(endpoint.requests(), 2);
    for _ in 0..10 {
        assert_eq!(
            source.token().await.unwrap(),
            held,
            "no stall during back-off"
        );
    }
    assert_eq!(endpoint.requests(), 2, "back-off: no new request");

    // Once the token is unusable, callers get the failure at once, still without a request.
    source.expire();
    let started = Instant::now();
    let err = source.token().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(err.reason(), "token_endpoint_unavailable");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(endpoint.requests(), 2);
}

#[tokio::test]
async fn a_down_endpoint_fails_fast_and_back_off_avoids_hammering() {
    let (_, tls) = test_pki(tempfile::tempdir().unwrap().path());
    // A port with nothing listening: connection refused.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let source = TokenSource::new(
        &format!("https://127.0.0.1:{port}/t/oauth2/v2.0/token"),
        CLIENT_ID,
        SCOPE,
        secret(),
        tls.clone(),
    )
    .unwrap();
    let started = Instant::now();
    let err = source.token().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "{err}");
    assert!(err.is_transient(), "{err}");
    assert_eq!(err.reason(), "token_endpoint_unreachable");

    // An endpoint that accepts and hangs up, counting connections.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/t/oauth2/v2.0/token",
        listener.local_addr().unwrap().port()
    );
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    let source = TokenSource::new(&url, CLIENT_ID, SCOPE, secret(), tls).unwrap();
    for _ in 0..20 {
        let err = source.token().await.unwrap_err();
        assert!(err.is_transient(), "{err}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one attempt, then back-off"
    );
    assert_eq!(source.requests(), 1);
}

#[tokio::test]
async fn invalid_client_surfaces_the_aadsts_code_and_never_the_secret() {
    let endpoint = token_endpoint(Accepts::Secret("the-right-one".into()), 3600).await;
    let source = endpoint.source(secret());
    let err = source.token().await.unwrap_err();
    assert!(!err.is_transient());
    assert_eq!(err.reason(), "token_refused");
    assert_eq!(err.aadsts(), Some("AADSTS7000215"));
    let shown = format!("{err} {err:?} {source:?} {:?}", secret());
    assert!(shown.contains("invalid_client"), "{shown}");
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(!shown.contains("Trace ID"), "{shown}");
}

#[tokio::test]
async fn nothing_secret_shows_in_debug_output() {
    let endpoint = token_endpoint(Accepts::Secret(SECRET.into()), 3600).await;
    let source = endpoint.source(secret());
    let token = source.token().await.unwrap();
    let mut config = oauth_config(&endpoint.state.url);
    config.client_secret = Some(Secret::new(SECRET));
    let shown = format!("{token:?} {source:?} {config:?} {:?}", secret());
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(!shown.contains("token-1"), "{shown}");
}

#[test]
fn lifetimes_margins_and_back_off() {
    let hour = Duration::from_secs(3600);
    assert_eq!(usable_lifetime(hour), hour - MIN_REMAINING);
    assert_eq!(
        usable_lifetime(Duration::from_secs(4)),
        Duration::from_secs(3)
    );
    assert_eq!(
        usable_lifetime(hour * 1000),
        MAX_TOKEN_LIFETIME - MIN_REMAINING
    );
    assert_eq!(refresh_margin(hour), REFRESH_BEFORE_EXPIRY);
    assert_eq!(
        refresh_margin(Duration::from_secs(4)),
        Duration::from_secs(2)
    );
    let waits: Vec<_> = (1..=9).map(backoff).collect();
    assert_eq!(waits[0], BACKOFF_FIRST);
    assert_eq!(waits[1], BACKOFF_FIRST * 2);
    assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(backoff(8), BACKOFF_MAX);
    assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
}
