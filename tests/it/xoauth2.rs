//! Routes with `auth = "xoauth2"` end to end: a legacy TLS 1.0 device logs in with a password,
//! tlsbridge checks it against the users file, gets a client-credentials token from a local
//! token endpoint (hyper over rustls, test CA) and logs in to fake Microsoft 365 servers that
//! accept only XOAUTH2 with a currently valid token for the mapped mailbox.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use openssl::hash::MessageDigest;
use openssl::rsa::Padding;
use openssl::sign::{RsaPssSaltlen, Verifier};
use openssl::x509::X509;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::support::ca::{Leaf, Pki};
use crate::support::device::{connect, tls_connect, Legacy, Verify};
use crate::support::peers::{require, run, PROGRAM_TIMEOUT};

const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_SECRET: &str = "Qx8~e2e.client-secret_value";
const DEVICE_USER: &str = "scanner1";
const DEVICE_PASSWORD: &str = "Sc4nner-pa55word";
const MAILBOX: &str = "scanner@contoso.com";
const LEGACY_CIPHERS: &str = "DEFAULT:@SECLEVEL=0";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Waits (bounded) until the captured log contains all of `needles` on one line.
async fn log_line_with(needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = crate::support::json_log_text();
        if let Some(line) = text
            .lines()
            .find(|line| needles.iter().all(|n| line.contains(n)))
        {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The token endpoint and what it issued (the fake upstreams check tokens against it).
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Tokens {
    requests: AtomicUsize,
    down: AtomicBool,
    lifetime_secs: AtomicUsize,
    issued: Mutex<HashMap<String, Instant>>,
    /// The fake upstreams refuse every token (a missing permission).
    refuse_all: AtomicBool,
    /// The endpoint's own URL: the audience a client assertion must name.
    url: Mutex<String>,
    /// The certificate registered on the app: client assertions must be signed by its key and
    /// carry its thumbprint. None: every assertion is refused.
    app_cert: Mutex<Option<X509>>,
    /// Client assertions that passed every check, in the order received.
    assertions: Mutex<Vec<String>>,
    /// The `jti` of every assertion seen, so that a replay is refused.
    jtis: Mutex<HashSet<String>>,
}

impl Tokens {
    fn valid(&self, token: &str) -> bool {
        self.issued
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|until| Instant::now() < *until)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn all_issued(&self) -> Vec<String> {
        self.issued.lock().unwrap().keys().cloned().collect()
    }

    fn assertions(&self) -> Vec<String> {
        self.assertions.lock().unwrap().clone()
    }

    fn register(&self, cert: &X509) {
        *self.app_cert.lock().unwrap() = Some(cert.clone());
    }
}

fn rustls_server(leaf: &Leaf) -> tokio_rustls::TlsAcceptor {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(leaf.chain.clone(), leaf.key())
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn json(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn token_answer(
    tokens: &Tokens,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let n = tokens.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if tokens.down.load(Ordering::SeqCst) {
        return json(503, serde_json::json!({"error": "temporarily_unavailable"}));
    }
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if field("grant_type") != "client_credentials"
        || field("client_id") != CLIENT_ID
        || field("scope") != "https://outlook.office365.com/.default"
    {
        return json(400, serde_json::json!({"error": "invalid_request"}));
    }
    let credential = match (form.get("client_secret"), form.get("client_assertion")) {
        (Some(secret), None) if secret == CLIENT_SECRET => Ok(()),
        (Some(_), None) => Err((7000215, "Invalid client secret provided.".to_string())),
        (None, Some(assertion)) => {
            check_assertion(tokens, field("client_assertion_type"), assertion)
        }
        _ => return json(400, serde_json::json!({"error": "invalid_request"})),
    };
    if let Err((code, description)) = credential {
        return json(
            401,
            serde_json::json!({
                "error": "invalid_client",
                "error_description": format!("AADSTS{code}: {description}"),
                "error_codes": [code],
            }),
        );
    }
    let lifetime = tokens.lifetime_secs.load(Ordering::SeqCst) as u64;
    let token = format!(
        "eyJ0eXAiOiJKV1Qi.e2e-token-{n}-{}.sig",
        rand::random::<u32>()
    );
    tokens.issued.lock().unwrap().insert(
        token.clone(),
        Instant::now() + Duration::from_secs(lifetime),
    );
    json(
        200,
        serde_json::json!({"token_type": "Bearer", "expires_in": lifetime, "access_token": token}),
    )
}

/// An Entra refusal: its AADSTS number and what it says.
type Refusal = (u64, String);

/// What Entra checks in the certificate credential's client assertion (RFC 7523): its type,
/// the registered certificate's thumbprint and key, the claims, and that it is not a replay.
fn check_assertion(tokens: &Tokens, kind: &str, assertion: &str) -> Result<(), Refusal> {
    if kind != JWT_BEARER {
        return Err((50027, format!("client_assertion_type is {kind:?}.")));
    }
    let Some(cert) = tokens.app_cert.lock().unwrap().clone() else {
        return Err((
            700027,
            "No certificate is registered on the application.".into(),
        ));
    };
    let claims = verify_jwt(assertion, &cert)?;
    check_claims(tokens, &claims)?;
    tokens
        .assertions
        .lock()
        .unwrap()
        .push(assertion.to_string());
    Ok(())
}

/// The claims of a JWT signed (PS256 or RS256) by `cert`'s key, carrying its `x5t#S256`.
fn verify_jwt(jwt: &str, cert: &X509) -> Result<serde_json::Value, Refusal> {
    let malformed = |what: &str| (50027, format!("JWT token is invalid or malformed: {what}."));
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err(malformed("not three parts"));
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| malformed("base64"))
    };
    let json = |bytes: Vec<u8>| {
        serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|_| malformed("JSON"))
    };
    let header_json = json(decode(header)?)?;
    if header_json["typ"] != "JWT" {
        return Err(malformed("typ is not JWT"));
    }
    // The signature first, then the thumbprint: a certificate with another key fails the
    // first, a renewal that kept the key the second.
    let signed = format!("{header}.{claims}");
    let alg = header_json["alg"].as_str().unwrap_or_default();
    if !signature_verifies(alg, cert, signed.as_bytes(), &decode(signature)?) {
        return Err((
            700027,
            "Client assertion failed signature validation.".into(),
        ));
    }
    let thumbprint = URL_SAFE_NO_PAD.encode(openssl::sha::sha256(&cert.to_der().unwrap()));
    if header_json["x5t#S256"] != thumbprint.as_str() {
        return Err((
            700027,
            "The certificate with identifier used to sign the client assertion is not \
             registered on application."
                .into(),
        ));
    }
    json(decode(claims)?)
}

/// True when `signature` over `signed` verifies with `cert`'s public key under `alg`.
fn signature_verifies(alg: &str, cert: &X509, signed: &[u8], signature: &[u8]) -> bool {
    let public = cert.public_key().unwrap();
    let mut verifier = Verifier::new(MessageDigest::sha256(), &public).unwrap();
    match alg {
        "RS256" => {}
        "PS256" => {
            verifier.set_rsa_padding(Padding::PKCS1_PSS).unwrap();
            verifier
                .set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)
                .unwrap();
            verifier.set_rsa_mgf1_md(MessageDigest::sha256()).unwrap();
        }
        _ => return false,
    }
    verifier.verify_oneshot(signature, signed).unwrap_or(false)
}

/// The claims Entra requires: `aud` the token URL, `iss` = `sub` = client id, a live `exp`, an
/// `nbf` not ahead (5 minutes of skew) and a `jti` not seen before.
fn check_claims(tokens: &Tokens, claims: &serde_json::Value) -> Result<(), Refusal> {
    let refused = |what: &str| Err((700027, format!("Client assertion {what}.")));
    if claims["aud"] != tokens.url.lock().unwrap().as_str() {
        return refused("has the wrong audience");
    }
    if claims["iss"] != CLIENT_ID || claims["sub"] != CLIENT_ID {
        return refused("does not name the client as iss and sub");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (exp, nbf) = (claims["exp"].as_u64(), claims["nbf"].as_u64());
    if !exp.is_some_and(|exp| exp > now) || !nbf.is_some_and(|nbf| nbf <= now + 300) {
        return Err((
            700024,
            "Client assertion is not within its valid time range.".into(),
        ));
    }
    let jti = claims["jti"].as_str().unwrap_or_default();
    if jti.is_empty() || !tokens.jtis.lock().unwrap().insert(jti.to_string()) {
        return refused("has no jti or replays one");
    }
    Ok(())
}

/// Serves the token endpoint on 127.0.0.1 as "localhost"; returns its URL.
async fn token_endpoint(pki: &Pki, tokens: Arc<Tokens>) -> String {
    let acceptor = rustls_server(&pki.localhost);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("https://localhost:{port}/contoso.onmicrosoft.com/oauth2/v2.0/token");
    *tokens.url.lock().unwrap() = url.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tokens) = (acceptor.clone(), tokens.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request| {
                    let tokens = tokens.clone();
                    async move { Ok::<_, Infallible>(token_answer(&tokens, request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    url
}

// ---------------------------------------------------------------------------------------------
// Fake Microsoft 365: SMTP, IMAP and POP3 over implicit TLS (rustls, TLS 1.2+), XOAUTH2 only.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Service {
    Smtp,
    Imap,
    Pop3,
}

#[derive(Default)]
struct Upstream {
    logins: AtomicUsize,
    /// (mailbox, message body) per delivered message.
    messages: Mutex<Vec<(String, String)>>,
}

/// Checks a base64 XOAUTH2 initial response: `Ok(mailbox)` or the JSON error challenge.
fn check_xoauth2(tokens: &Tokens, b64: &str) -> Result<String, String> {
    let challenge = |status: &str| {
        STANDARD.encode(format!(
            r#"{{"status":"{status}","schemes":"bearer","scope":"https://outlook.office.com/SMTP.Send"}}"#
        ))
    };
    let Ok(raw) = STANDARD.decode(b64.trim()) else {
        return Err(challenge("400"));
    };
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let mut user = None;
    let mut token = None;
    for part in raw.split('\x01') {
        if let Some(u) = part.strip_prefix("user=") {
            user = Some(u.to_string());
        }
        if let Some(t) = part.strip_prefix("auth=Bearer ") {
            token = Some(t.to_string());
        }
    }
    if tokens.refuse_all.load(Ordering::SeqCst) {
        return Err(challenge("403"));
    }
    match (user, token) {
        (Some(user), Some(token)) if user == MAILBOX && tokens.valid(&token) => Ok(user),
        _ => Err(challenge("401")),
    }
}

async fn serve_upstream<S: AsyncRead + AsyncWrite + Unpin>(
    service: Service,
    stream: S,
    tokens: &Tokens,
    upstream: &Upstream,
) -> std::io::Result<()> {
    let mut io = BufReader::new(stream);
    let greeting: &[u8] = match service {
        Service::Smtp => b"220 fake.outlook.test Microsoft ESMTP MAIL Service ready\r\n",
        Service::Imap => b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n",
        Service::Pop3 => b"+OK The Microsoft Exchange POP3 service is ready.\r\n",
    };
    io.write_all(greeting).await?;
    let mut mailbox: Option<String> = None;
    loop {
        let mut line = String::new();
        if io.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let line = line.trim_end().to_string();
        let (tag, rest) = match service {
            Service::Imap => line.split_once(' ').unwrap_or((line.as_str(), "")),
            _ => ("", line.as_str()),
        };
        let upper = rest.to_ascii_uppercase();
        let reply = if let Some(b64) = rest
            .strip_prefix("AUTH XOAUTH2 ")
            .or_else(|| rest.strip_prefix("AUTHENTICATE XOAUTH2 "))
        {
            match check_xoauth2(tokens, b64) {
                Ok(user) => {
                    upstream.logins.fetch_add(1, Ordering::SeqCst);
                    mailbox = Some(user);
                    match service {
                        Service::Smtp => "235 2.7.0 Authentication successful\r\n".to_string(),
                        Service::Imap => format!("{tag} OK AUTHENTICATE completed.\r\n"),
                        Service::Pop3 => "+OK User successfully authenticated.\r\n".to_string(),
                    }
                }
                Err(challenge) => {
                    let prompt = match service {
                        Service::Smtp => format!("334 {challenge}\r\n"),
                        _ => format!("+ {challenge}\r\n"),
                    };
                    io.write_all(prompt.as_bytes()).await?;
                    let mut empty = String::new();
                    io.read_line(&mut empty).await?;
                    match service {
                        Service::Smtp => "535 5.7.3 Authentication unsuccessful\r\n".to_string(),
                        Service::Imap => format!("{tag} NO AUTHENTICATE failed.\r\n"),
                        Service::Pop3 => {
                            "-ERR Authentication failure: unknown user name or bad password.\r\n"
                                .to_string()
                        }
                    }
                }
            }
        } else {
            match (service, upper.split(' ').next().unwrap_or("")) {
                (Service::Smtp, "EHLO") => "250-fake.outlook.test Hello\r\n250-SIZE 157286400\r\n250-AUTH LOGIN XOAUTH2\r\n250 8BITMIME\r\n".to_string(),
                (Service::Smtp, "AUTH") => "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.\r\n".to_string(),
                (Service::Smtp, "MAIL" | "RCPT") if mailbox.is_none() => "530 5.7.57 Client not authenticated to send mail.\r\n".to_string(),
                (Service::Smtp, "MAIL" | "RCPT" | "RSET" | "NOOP") => "250 2.1.0 OK\r\n".to_string(),
                (Service::Smtp, "DATA") => {
                    io.write_all(b"354 Start mail input\r\n").await?;
                    let mut body = String::new();
                    loop {
                        let mut l = String::new();
                        if io.read_line(&mut l).await? == 0 {
                            return Ok(());
                        }
                        if l == ".\r\n" {
                            break;
                        }
                        body.push_str(&l);
                    }
                    upstream
                        .messages
                        .lock()
                        .unwrap()
                        .push((mailbox.clone().unwrap_or_default(), body));
                    "250 2.0.0 OK queued\r\n".to_string()
                }
                (Service::Smtp, "QUIT") => {
                    io.write_all(b"221 2.0.0 Service closing transmission channel\r\n").await?;
                    return io.shutdown().await;
                }
                (Service::Imap, "CAPABILITY") => format!("* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR\r\n{tag} OK CAPABILITY completed.\r\n"),
                (Service::Imap, "LIST") if mailbox.is_some() => format!("* LIST (\\HasNoChildren) \"/\" INBOX\r\n{tag} OK LIST completed.\r\n"),
                (Service::Imap, "SELECT" | "EXAMINE") if mailbox.is_some() => format!("* 1 EXISTS\r\n{tag} OK [READ-WRITE] SELECT completed.\r\n"),
                (Service::Imap, "LOGOUT") => {
                    io.write_all(format!("* BYE\r\n{tag} OK LOGOUT completed.\r\n").as_bytes()).await?;
                    return io.shutdown().await;
                }
                (Service::Imap, _) => format!("{tag} BAD Command Error.\r\n"),
                (Service::Pop3, "STAT") if mailbox.is_some() => "+OK 1 42\r\n".to_string(),
                (Service::Pop3, "LIST") if mailbox.is_some() => "+OK 1 messages\r\n1 42\r\n.\r\n".to_string(),
                (Service::Pop3, "QUIT") => {
                    io.write_all(b"+OK Microsoft Exchange Server POP3 server signing off.\r\n").await?;
                    return io.shutdown().await;
                }
                (Service::Pop3, _) => "-ERR Protocol error.\r\n".to_string(),
                (Service::Smtp, _) => "500 5.3.3 Unrecognized command\r\n".to_string(),
            }
        };
        io.write_all(reply.as_bytes()).await?;
        io.flush().await?;
    }
}

async fn fake_upstream(pki: &Pki, service: Service, tokens: Arc<Tokens>) -> (u16, Arc<Upstream>) {
    let acceptor = rustls_server(&pki.localhost);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = Arc::new(Upstream::default());
    let state = upstream.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tokens, state) = (acceptor.clone(), tokens.clone(), state.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = serve_upstream(service, tls, &tokens, &state).await;
                }
            });
        }
    });
    (port, upstream)
}

// ---------------------------------------------------------------------------------------------
// tlsbridge with xoauth2 routes.
// ---------------------------------------------------------------------------------------------

struct Bridge {
    dir: tempfile::TempDir,
    addrs: HashMap<String, SocketAddr>,
    admin: Option<SocketAddr>,
    _shutdown: oneshot::Sender<()>,
    config_path: std::path::PathBuf,
    users_file: std::path::PathBuf,
    shared: Arc<tlsbridge::context::Shared>,
}

impl Bridge {
    fn addr(&self, route: &str) -> SocketAddr {
        self.addrs[route]
    }
    fn device_ca(&self) -> std::path::PathBuf {
        self.dir.path().join("certs/ca.crt")
    }
}

/// A route: (name, protocol, upstream port, extra keys).
type RouteDef<'a> = (&'a str, &'a str, u16, &'a str);

/// How the bridge's app proves who it is to the token endpoint.
#[derive(Clone, Copy)]
enum Credential<'a> {
    /// `client_secret_file` holding [`CLIENT_SECRET`].
    Secret,
    /// `client_cert` and `client_key`: a signed client assertion.
    Certificate(&'a AppCert),
}

async fn bridge(pki: &Pki, token_url: &str, routes: &[RouteDef<'_>]) -> Bridge {
    bridge_with(pki, token_url, routes, Credential::Secret).await
}

async fn bridge_with(
    pki: &Pki,
    token_url: &str,
    routes: &[RouteDef<'_>],
    credential: Credential<'_>,
) -> Bridge {
    crate::support::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let mut toml = crate::support::proxy::Settings::new(pki, Vec::new()).toml(dir.path());
    let quote = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap();
    for (name, protocol, port, extra) in routes {
        let extra = if extra.contains("auth =") {
            extra.to_string()
        } else {
            format!("auth = \"xoauth2\"\n{extra}")
        };
        let extra = if extra.contains("device_tls =") {
            extra
        } else {
            format!("device_tls = \"tls\"\n{extra}")
        };
        toml.push_str(&format!(
            "\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\n\
             upstream = \"localhost:{port}\"\nupstream_tls = \"tls\"\n\
             {extra}\n"
        ));
    }
    let credential = match credential {
        Credential::Secret => {
            let secret = dir.path().join("client_secret");
            std::fs::write(&secret, CLIENT_SECRET).unwrap();
            format!("client_secret_file = {}", quote(&secret))
        }
        Credential::Certificate(app) => format!(
            "client_cert = {}\nclient_key = {}",
            quote(&app.cert_path),
            quote(&app.key_path)
        ),
    };
    let users = dir.path().join("users.toml");
    let mut credentials = tlsbridge::credentials::Credentials::default();
    credentials
        .set(
            DEVICE_USER,
            &tlsbridge::secret::Secret::new(DEVICE_PASSWORD),
            Some(MAILBOX),
        )
        .unwrap();
    credentials.save(&users).unwrap();
    toml.push_str(&format!(
        "\n[oauth]\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"{CLIENT_ID}\"\n\
         {credential}\ntoken_url = \"{token_url}\"\nusers_file = {}\n",
        quote(&users)
    ));
    let config_path = dir.path().join("tlsbridge.toml");
    std::fs::File::create(&config_path)
        .unwrap()
        .write_all(toml.as_bytes())
        .unwrap();
    let config = tlsbridge::config::Config::load_from(
        Some(&config_path),
        std::iter::empty::<(String, String)>(),
    )
    .unwrap();
    let server = tlsbridge::server::Server::bind(config).await.unwrap();
    let addrs = routes
        .iter()
        .map(|(name, ..)| (name.to_string(), server.local_addr(name).unwrap()))
        .collect();
    let admin = server.admin_addr();
    let shared = server.shared();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Bridge {
        dir,
        addrs,
        admin,
        _shutdown: tx,
        config_path,
        users_file: users,
        shared,
    }
}

struct World {
    pki: Pki,
    tokens: Arc<Tokens>,
    token_url: String,
}

async fn world(lifetime_secs: usize) -> World {
    let pki = Pki::new().unwrap();
    let tokens = Arc::new(Tokens::default());
    tokens.lifetime_secs.store(lifetime_secs, Ordering::SeqCst);
    let token_url = token_endpoint(&pki, tokens.clone()).await;
    World {
        pki,
        tokens,
        token_url,
    }
}

/// A TLS 1.0 device's SMTP session: the lines it sends after the greeting, one reply each; returns
/// all replies as text.
async fn device_smtp(addr: SocketAddr, ca: &Path, script: &[&str]) -> Vec<String> {
    let tcp = connect(addr).await.unwrap();
    let tls = tls_connect(
        tcp,
        Legacy::Tls10,
        &Verify::Ca(ca.to_path_buf()),
        "localhost",
    )
    .await
    .unwrap();
    let mut io = BufReader::new(tls);
    let mut replies = vec![read_smtp_reply(&mut io).await];
    for line in script {
        io.write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        io.flush().await.unwrap();
        if line.starts_with("DATA-BODY") {
            continue;
        }
        replies.push(read_smtp_reply(&mut io).await);
    }
    replies
}

async fn read_smtp_reply<R: AsyncBufReadExt + Unpin>(io: &mut R) -> String {
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(15), io.read_line(&mut line))
            .await
            .expect("reply within 15s")
            .unwrap();
        reply.push_str(&line);
        if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
            return reply;
        }
    }
}

fn b64(text: &str) -> String {
    STANDARD.encode(text)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_auth_login_and_plain_log_in_with_xoauth2_and_deliver() {
    let w = world(3600).await;
    let (port, upstream) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let bridge = bridge(&w.pki, &w.token_url, &[("smtp", "smtp", port, "")]).await;
    let login = [
        "EHLO legacy-scanner",
        "AUTH LOGIN",
        &b64(DEVICE_USER),
        &b64(DEVICE_PASSWORD),
        "MAIL FROM:<scanner@contoso.com>",
        "RCPT TO:<office@contoso.com>",
        "DATA",
        "Subject: scan\r\n\r\npage one\r\n.",
        "QUIT",
    ];
    let replies = device_smtp(bridge.addr("smtp"), &bridge.device_ca(), &login).await;
    assert!(replies[1].contains("250 AUTH PLAIN LOGIN"), "{replies:?}");
    assert!(!replies[1].contains("XOAUTH2"), "{replies:?}");
    assert!(replies[4].starts_with("235 "), "{replies:?}");
    assert!(replies[8].starts_with("250 2.0.0"), "{replies:?}");
    let plain = b64(&format!("\0{DEVICE_USER}\0{DEVICE_PASSWORD}"));
    let replies = device_smtp(
        bridge.addr("smtp"),
        &bridge.device_ca(),
        &[
            "EHLO legacy-scanner",
            &format!("AUTH PLAIN {plain}"),
            "MAIL FROM:<scanner@contoso.com>",
            "RCPT TO:<office@contoso.com>",
            "DATA",
            "second page\r\n.",
            "QUIT",
        ],
    )
    .await;
    assert!(replies[2].starts_with("235 "), "{replies:?}");
    let messages = upstream.messages.lock().unwrap().clone();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages.iter().all(|(mailbox, _)| mailbox == MAILBOX));
    assert_eq!(w.tokens.requests(), 1, "one token serves both sessions");
    let closed = log_line_with(&[
        "session_closed",
        "\"device_user\":\"scanner1\"",
        "\"mailbox\":\"scanner@contoso.com\"",
    ])
    .await;
    assert!(closed.contains("\"auth\":\"xoauth2\""), "{closed}");
    let device = inventory_auth(bridge.admin.expect("admin endpoint"), "xoauth2").await;
    assert_eq!(device["connections"], 2, "{device}");
    assert_eq!(device["routes"], serde_json::json!(["smtp"]), "{device}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_auth_login_and_plain_over_tls10() {
    if !require("swaks", &["--version"]) {
        return;
    }
    let w = world(3600).await;
    let (port, upstream) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let bridge = bridge(
        &w.pki,
        &w.token_url,
        &[
            ("smtp", "smtp", port, ""),
            ("submission", "smtp", port, "device_tls = \"starttls\""),
        ],
    )
    .await;
    for (route, mechanism, mode) in [
        ("smtp", "LOGIN", "--tlsc"),
        ("smtp", "PLAIN", "--tlsc"),
        ("submission", "LOGIN", "--tls"),
    ] {
        let args: Vec<String> = [
            "--server",
            "127.0.0.1",
            "--port",
            &bridge.addr(route).port().to_string(),
            "--from",
            "scanner@contoso.com",
            "--to",
            "office@contoso.com",
            "--auth",
            mechanism,
            "--auth-user",
            DEVICE_USER,
            "--auth-password",
            DEVICE_PASSWORD,
            mode,
            "--tls-protocol",
            "tlsv1",
            "--tls-cipher",
            LEGACY_CIPHERS,
            "--timeout",
            "20",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = run("swaks", &args, b"", PROGRAM_TIMEOUT).await.unwrap();
        assert!(out.success(), "swaks {mode} --auth {mechanism}: {out:?}");
    }
    assert_eq!(upstream.messages.lock().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_imap_and_pop3_logins_over_tls10() {
    if !require("curl", &["--version"]) {
        return;
    }
    let w = world(3600).await;
    let (imap_port, imap) = fake_upstream(&w.pki, Service::Imap, w.tokens.clone()).await;
    let (pop3_port, pop3) = fake_upstream(&w.pki, Service::Pop3, w.tokens.clone()).await;
    let bridge = bridge(
        &w.pki,
        &w.token_url,
        &[
            ("imaps", "imap", imap_port, ""),
            ("pop3s", "pop3", pop3_port, ""),
        ],
    )
    .await;
    for (route, scheme) in [("imaps", "imaps"), ("pop3s", "pop3s")] {
        let port = bridge.addr(route).port();
        let args: Vec<String> = vec![
            "--silent".into(),
            "--show-error".into(),
            "--verbose".into(),
            "--tlsv1.0".into(),
            "--tls-max".into(),
            "1.0".into(),
            "--ciphers".into(),
            LEGACY_CIPHERS.into(),
            "--max-time".into(),
            "30".into(),
            "--cacert".into(),
            bridge.device_ca().display().to_string(),
            "--user".into(),
            format!("{DEVICE_USER}:{DEVICE_PASSWORD}"),
            format!("{scheme}://localhost:{port}/"),
        ];
        let out = run("curl", &args, b"", PROGRAM_TIMEOUT).await.unwrap();
        assert!(out.success(), "curl {scheme}: {out:?}");
    }
    assert_eq!(imap.logins.load(Ordering::SeqCst), 1);
    assert_eq!(pop3.logins.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_gets_535_and_no_token_is_requested() {
    let w = world(3600).await;
    let (port, upstream) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let bridge = bridge(&w.pki, &w.token_url, &[("smtp", "smtp", port, "")]).await;
    let plain = b64(&format!("\0{DEVICE_USER}\0not-the-password"));
    let replies = device_smtp(
        bridge.addr("smtp"),
        &bridge.device_ca(),
        &["EHLO x", &format!("AUTH PLAIN {plain}")],
    )
    .await;
    assert!(replies[2].starts_with("535 5.7.8"), "{replies:?}");
    assert_eq!(w.tokens.requests(), 0, "the token endpoint saw a request");
    assert_eq!(upstream.logins.load(Ordering::SeqCst), 0);
    // MAIL before AUTH is refused.
    let replies = device_smtp(
        bridge.addr("smtp"),
        &bridge.device_ca(),
        &["EHLO x", "MAIL FROM:<a@contoso.com>", "QUIT"],
    )
    .await;
    assert!(replies[2].starts_with("530 5.7.0"), "{replies:?}");
    let device = inventory_entry(bridge.admin.expect("admin endpoint"))
        .await
        .expect("the device is in the inventory");
    assert!(device.get("auth").is_none(), "not logged in: {device}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_added_with_passwd_logs_in_after_a_reload() {
    let w = world(3600).await;
    let (port, upstream) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let bridge = bridge(&w.pki, &w.token_url, &[("smtp", "smtp", port, "")]).await;
    let login = |user: &str| {
        format!(
            "AUTH PLAIN {}",
            b64(&format!("\0{user}\0{DEVICE_PASSWORD}"))
        )
    };
    let (addr, ca) = (bridge.addr("smtp"), bridge.device_ca());
    let replies = device_smtp(addr, &ca, &["EHLO x", &login("scanner2")]).await;
    assert!(
        replies[2].starts_with("535 5.7.8"),
        "not a user yet: {replies:?}"
    );
    // What `tlsbridge passwd scanner2` does to the file, then what SIGHUP does.
    let file = &bridge.users_file;
    let mut credentials = tlsbridge::credentials::Credentials::load(file)
        .unwrap()
        .credentials;
    let password = tlsbridge::secret::Secret::new(DEVICE_PASSWORD);
    credentials
        .set("scanner2", &password, Some(MAILBOX))
        .unwrap();
    credentials.save(file).unwrap();
    bridge.shared.reload();
    let replies = device_smtp(addr, &ca, &["EHLO x", &login("scanner2"), "QUIT"]).await;
    assert!(replies[2].starts_with("235 "), "{replies:?}");
    assert_eq!(upstream.logins.load(Ordering::SeqCst), 1);
    // A broken file keeps the users there were.
    std::fs::write(file, "not = [valid").unwrap();
    bridge.shared.reload();
    let replies = device_smtp(addr, &ca, &["EHLO x", &login("scanner2"), "QUIT"]).await;
    assert!(replies[2].starts_with("235 "), "{replies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_token_endpoint_gets_454() {
    let w = world(3600).await;
    w.tokens.down.store(true, Ordering::SeqCst);
    let (port, _) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let bridge = bridge(&w.pki, &w.token_url, &[("smtp", "smtp", port, "")]).await;
    let plain = b64(&format!("\0{DEVICE_USER}\0{DEVICE_PASSWORD}"));
    let replies = device_smtp(
        bridge.addr("smtp"),
        &bridge.device_ca(),
        &["EHLO x", &format!("AUTH PLAIN {plain}")],
    )
    .await;
    assert!(replies[2].starts_with("454 4.7.0"), "{replies:?}");
    log_line_with(&["session_closed", "auth_token_unavailable", "HTTP 503"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_the_token_gets_a_transient_reply_and_a_log_line() {
    let w = world(3600).await;
    w.tokens.refuse_all.store(true, Ordering::SeqCst);
    let (port, _) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let bridge = bridge(&w.pki, &w.token_url, &[("smtp", "smtp", port, "")]).await;
    let plain = b64(&format!("\0{DEVICE_USER}\0{DEVICE_PASSWORD}"));
    let replies = device_smtp(
        bridge.addr("smtp"),
        &bridge.device_ca(),
        &["EHLO x", &format!("AUTH PLAIN {plain}")],
    )
    .await;
    assert!(replies[2].starts_with("454 4.7.0"), "{replies:?}");
    log_line_with(&[
        "session_closed",
        "auth_upstream_rejected",
        "535 5.7.3",
        "status 403",
    ])
    .await;
    // The rejected token was dropped: the admin fixes the permission, the retry gets a new one.
    w.tokens.refuse_all.store(false, Ordering::SeqCst);
    let replies = device_smtp(
        bridge.addr("smtp"),
        &bridge.device_ca(),
        &["EHLO x", &format!("AUTH PLAIN {plain}"), "QUIT"],
    )
    .await;
    assert!(replies[2].starts_with("235 "), "{replies:?}");
    assert_eq!(w.tokens.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_under_20_concurrent_sessions_is_refreshed_once() {
    // 6 s tokens are handed out for 4.5 s.
    let w = world(6).await;
    let (port, upstream) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let bridge = bridge(&w.pki, &w.token_url, &[("smtp", "smtp", port, "")]).await;
    let plain = b64(&format!("\0{DEVICE_USER}\0{DEVICE_PASSWORD}"));
    let auth = format!("AUTH PLAIN {plain}");
    let replies = device_smtp(bridge.addr("smtp"), &bridge.device_ca(), &["EHLO x", &auth]).await;
    assert!(replies[2].starts_with("235 "), "{replies:?}");
    assert_eq!(w.tokens.requests(), 1);
    // Let the token's usable life run out (expiry is time, not synchronisation).
    tokio::time::sleep(Duration::from_millis(4700)).await;
    let sessions: Vec<_> = (0..20)
        .map(|_| {
            let (addr, ca, auth) = (bridge.addr("smtp"), bridge.device_ca(), auth.clone());
            tokio::spawn(async move { device_smtp(addr, &ca, &["EHLO x", &auth, "QUIT"]).await })
        })
        .collect();
    for session in sessions {
        let replies = session.await.unwrap();
        assert!(replies[2].starts_with("235 "), "{replies:?}");
    }
    assert_eq!(
        w.tokens.requests(),
        2,
        "exactly one refresh for 20 sessions"
    );
    assert_eq!(upstream.logins.load(Ordering::SeqCst), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_credential_gets_the_token_and_the_mail_through() {
    let w = world(3600).await;
    let app = AppCert::new();
    w.tokens.register(&app.cert);
    let (port, upstream) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let routes = [("certsmtp", "smtp", port, "")];
    let bridge = bridge_with(&w.pki, &w.token_url, &routes, Credential::Certificate(&app)).await;
    let plain = b64(&format!("\0{DEVICE_USER}\0{DEVICE_PASSWORD}"));
    let replies = device_smtp(
        bridge.addr("certsmtp"),
        &bridge.device_ca(),
        &[
            "EHLO legacy-scanner",
            &format!("AUTH PLAIN {plain}"),
            "MAIL FROM:<scanner@contoso.com>",
            "RCPT TO:<office@contoso.com>",
            "DATA",
            "signed page\r\n.",
            "QUIT",
        ],
    )
    .await;
    assert!(replies[2].starts_with("235 "), "{replies:?}");
    assert!(replies[6].starts_with("250 2.0.0"), "{replies:?}");
    let messages = upstream.messages.lock().unwrap().clone();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0].0, MAILBOX);
    assert_eq!(w.tokens.requests(), 1);
    assert_eq!(
        w.tokens.assertions().len(),
        1,
        "the token was not had with a verified client assertion"
    );
    inventory_auth(bridge.admin.expect("admin endpoint"), "xoauth2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_expecting_another_certificate_refuses() {
    let w = world(3600).await;
    let app = AppCert::new();
    let (port, upstream) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let plain = b64(&format!("\0{DEVICE_USER}\0{DEVICE_PASSWORD}"));
    // The app registration holds a certificate with another key, then a renewal of ours that
    // kept the key (its thumbprint differs).
    for (route, registered, cause) in [
        (
            "certotherkey",
            AppCert::new(),
            "failed signature validation",
        ),
        (
            "certrenewed",
            app.renewed(),
            "is not registered on application",
        ),
    ] {
        w.tokens.register(&registered.cert);
        let routes = [(route, "smtp", port, "")];
        let bridge =
            bridge_with(&w.pki, &w.token_url, &routes, Credential::Certificate(&app)).await;
        let replies = device_smtp(
            bridge.addr(route),
            &bridge.device_ca(),
            &["EHLO x", &format!("AUTH PLAIN {plain}")],
        )
        .await;
        assert!(replies[2].starts_with("454 4.7.0"), "{replies:?}");
        log_line_with(&[
            "session_closed",
            &format!("\"route\":\"{route}\""),
            "auth_token_unavailable",
            "invalid_client (AADSTS700027)",
            cause,
        ])
        .await;
        let device = inventory_entry(bridge.admin.expect("admin endpoint"))
            .await
            .expect("the device is in the inventory");
        assert!(device.get("auth").is_none(), "not logged in: {device}");
    }
    assert_eq!(w.tokens.requests(), 2);
    assert!(w.tokens.assertions().is_empty());
    assert_eq!(upstream.logins.load(Ordering::SeqCst), 0);
}

/// `tlsbridge check` on `config`: stdout and stderr.
fn check_output(config: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tlsbridge"))
        .arg("--config")
        .arg(config)
        .arg("check")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_or_check_output() {
    let w = world(3600).await;
    let app = AppCert::new();
    w.tokens.register(&app.cert);
    let (port, _) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let with_secret = bridge(&w.pki, &w.token_url, &[("secretsmtp", "smtp", port, "")]).await;
    let with_cert = bridge_with(
        &w.pki,
        &w.token_url,
        &[("keysmtp", "smtp", port, "")],
        Credential::Certificate(&app),
    )
    .await;
    let plain = b64(&format!("\0{DEVICE_USER}\0{DEVICE_PASSWORD}"));
    let (mut check, mut admin) = (String::new(), String::new());
    for (bridge, route) in [(&with_secret, "secretsmtp"), (&with_cert, "keysmtp")] {
        let replies = device_smtp(
            bridge.addr(route),
            &bridge.device_ca(),
            &["EHLO x", &format!("AUTH PLAIN {plain}"), "QUIT"],
        )
        .await;
        assert!(replies[2].starts_with("235 "), "{replies:?}");
        log_line_with(&[
            "session_closed",
            &format!("\"route\":\"{route}\""),
            "\"device_user\":\"scanner1\"",
        ])
        .await;
        let config = bridge.config_path.clone();
        check.push_str(
            &tokio::task::spawn_blocking(move || check_output(&config))
                .await
                .unwrap(),
        );
        for path in ["/clients", "/metrics"] {
            admin.push_str(&admin_get(bridge.admin.expect("admin endpoint"), path).await);
        }
    }
    assert!(
        admin.contains("tlsbridge_") && admin.contains("\"xoauth2\""),
        "{admin}"
    );
    assert_eq!(
        w.tokens.assertions().len(),
        1,
        "the key signed no assertion"
    );
    let logs = crate::support::json_log_text() + &crate::support::log_text();
    let mut secrets = vec![
        DEVICE_PASSWORD.to_string(),
        CLIENT_SECRET.to_string(),
        plain.clone(),
    ];
    secrets.extend(w.tokens.all_issued());
    secrets.extend(w.tokens.assertions());
    secrets.extend(app.key_body());
    for secret in &secrets {
        for (place, text) in [
            ("the log", &logs),
            ("`check` output", &check),
            ("/clients or /metrics", &admin),
        ] {
            assert!(!text.contains(secret.as_str()), "a secret is in {place}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_basic_auth_refusal_is_diagnosed() {
    let w = world(3600).await;
    let (port, _) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let bridge = bridge(
        &w.pki,
        &w.token_url,
        &[("legacy", "smtp", port, "auth = \"passthrough\"")],
    )
    .await;
    let replies = device_smtp(
        bridge.addr("legacy"),
        &bridge.device_ca(),
        &["EHLO x", "AUTH LOGIN", "QUIT"],
    )
    .await;
    assert!(replies[2].starts_with("535 5.7.139"), "{replies:?}");
    let closed = log_line_with(&[
        "session_closed",
        "\"route\":\"legacy\"",
        "upstream_basic_auth_disabled",
    ])
    .await;
    assert!(closed.contains("\"auth\":\"passthrough\""), "{closed}");
    assert_eq!(w.tokens.requests(), 0);
    let admin = bridge.admin.expect("admin endpoint");
    let metrics = admin_get(admin, "/metrics").await;
    assert!(
        metrics.contains("tlsbridge_upstream_basic_auth_disabled_total{route=\"legacy\"} 1"),
        "{metrics}"
    );
    let device = inventory_auth(admin, "upstream_basic_auth_disabled").await;
    assert_eq!(device["routes"], serde_json::json!(["legacy"]), "{device}");
}

/// The app registration's certificate credential: a self-signed RSA certificate and its key,
/// as PEM files (the key 0600).
struct AppCert {
    cert: X509,
    key_pem: String,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl AppCert {
    fn new() -> AppCert {
        let key =
            openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        AppCert::with_key(key)
    }

    /// Another certificate for the same key, as a renewal that keeps the key gives.
    fn renewed(&self) -> AppCert {
        AppCert::with_key(
            openssl::pkey::PKey::private_key_from_pem(self.key_pem.as_bytes()).unwrap(),
        )
    }

    fn with_key(key: openssl::pkey::PKey<openssl::pkey::Private>) -> AppCert {
        use openssl::asn1::{Asn1Integer, Asn1Time};
        use openssl::bn::BigNum;
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "tlsbridge e2e app")
            .unwrap();
        let name = name.build();
        let mut serial = BigNum::new().unwrap();
        serial
            .rand(64, openssl::bn::MsbOption::MAYBE_ZERO, false)
            .unwrap();
        let mut builder = X509::builder().unwrap();
        builder.set_version(2).unwrap();
        builder
            .set_serial_number(&Asn1Integer::from_bn(&serial).unwrap())
            .unwrap();
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
        let cert = builder.build();
        let key_pem = String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("app.crt");
        let key_path = dir.path().join("app.key");
        std::fs::write(&cert_path, cert.to_pem().unwrap()).unwrap();
        std::fs::write(&key_path, &key_pem).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        AppCert {
            cert,
            key_pem,
            cert_path,
            key_path,
            _dir: dir,
        }
    }

    /// The base64 lines of the key's PEM (long enough never to occur by chance), and all of
    /// them joined.
    fn key_body(&self) -> Vec<String> {
        let lines: Vec<&str> = self
            .key_pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        let mut body: Vec<String> = lines
            .iter()
            .filter(|line| line.len() >= 16)
            .map(|line| line.to_string())
            .collect();
        body.push(lines.concat());
        body
    }
}

/// A client CA, and a client certificate from it written as PEM (cert, key) into `dir`.
fn client_identity(
    dir: &Path,
) -> (
    rustls::pki_types::CertificateDer<'static>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "connector client CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["relay.contoso.com".to_string()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let cert_path = dir.join("connector.crt");
    let key_path = dir.join("connector.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (ca_cert.der().clone(), cert_path, key_path)
}

/// A fake SMTP upstream that requires a client certificate from `client_ca`; counts sessions
/// whose handshake succeeded.
async fn connector_upstream(
    pki: &Pki,
    client_ca: rustls::pki_types::CertificateDer<'static>,
    tokens: Arc<Tokens>,
) -> (u16, Arc<AtomicUsize>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.localhost.chain.clone(), pki.localhost.key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sessions = Arc::new(AtomicUsize::new(0));
    let counted = sessions.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tokens, counted) = (acceptor.clone(), tokens.clone(), counted.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let _ = serve_upstream(Service::Smtp, tls, &tokens, &Upstream::default()).await;
                }
            });
        }
    });
    (port, sessions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_certificate_is_presented_upstream() {
    let w = world(3600).await;
    let dir = tempfile::tempdir().unwrap();
    let (client_ca, cert, key) = client_identity(dir.path());
    let (port, sessions) = connector_upstream(&w.pki, client_ca, w.tokens.clone()).await;
    let quote = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap();
    let with_cert = format!(
        "auth = \"passthrough\"\nupstream_client_cert = {}\nupstream_client_key = {}",
        quote(&cert),
        quote(&key)
    );
    let bridge = bridge(
        &w.pki,
        &w.token_url,
        &[
            ("relay", "smtp", port, &with_cert),
            ("nocert", "smtp", port, "auth = \"passthrough\""),
        ],
    )
    .await;
    let replies = device_smtp(
        bridge.addr("relay"),
        &bridge.device_ca(),
        &["EHLO x", "QUIT"],
    )
    .await;
    assert!(replies[0].starts_with("220 "), "{replies:?}");
    assert!(replies[2].starts_with("221 "), "{replies:?}");
    assert_eq!(sessions.load(Ordering::SeqCst), 1);

    let tcp = connect(bridge.addr("nocert")).await.unwrap();
    let tls = tls_connect(
        tcp,
        Legacy::Tls10,
        &Verify::Ca(bridge.device_ca()),
        "localhost",
    )
    .await
    .unwrap();
    let mut io = BufReader::new(tls);
    let greeting = read_smtp_reply(&mut io).await;
    assert!(
        greeting.starts_with("421 ") || greeting.starts_with("454 "),
        "{greeting:?}"
    );
    assert_eq!(
        sessions.load(Ordering::SeqCst),
        1,
        "a session without the certificate was served"
    );
}

fn probe(config: &Path, route: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tlsbridge"))
        .arg("--config")
        .arg(config)
        .args(["probe", route, "--xoauth2", "--mailbox", MAILBOX])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_xoauth2_checks_the_app_registration() {
    let w = world(3600).await;
    let (port, upstream) = fake_upstream(&w.pki, Service::Smtp, w.tokens.clone()).await;
    let bridge = bridge(&w.pki, &w.token_url, &[("smtp", "smtp", port, "")]).await;
    let config = bridge.config_path.clone();
    let (ok, out) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || probe(&config, "smtp")
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("logged in as scanner@contoso.com"), "{out}");
    assert!(
        upstream.messages.lock().unwrap().is_empty(),
        "probe sent mail"
    );

    w.tokens.refuse_all.store(true, Ordering::SeqCst);
    let (ok, out) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || probe(&config, "smtp")
    })
    .await
    .unwrap();
    assert!(
        !ok && out.contains("REFUSED") && out.contains("status 403"),
        "{out}"
    );

    std::fs::write(bridge.dir.path().join("client_secret"), "wrong-secret").unwrap();
    let (ok, out) = tokio::task::spawn_blocking(move || probe(&config, "smtp"))
        .await
        .unwrap();
    assert!(!ok && out.contains("AADSTS7000215"), "{out}");
    assert!(
        !out.contains("wrong-secret") && !out.contains(CLIENT_SECRET),
        "{out}"
    );
}

/// The device's inventory entry: every in-process device connects from 127.0.0.1, and each
/// bridge keeps its own inventory.
async fn inventory_entry(admin: SocketAddr) -> Option<serde_json::Value> {
    let clients = crate::support::ops::clients(admin).await.unwrap();
    clients
        .into_iter()
        .find(|client| client["ip"] == "127.0.0.1")
}

/// Waits (bounded) until the device's inventory entry shows `auth`; returns the entry.
async fn inventory_auth(admin: SocketAddr, auth: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let entry = inventory_entry(admin).await;
        if let Some(entry) = entry.as_ref().filter(|entry| entry["auth"] == auth) {
            return entry.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the inventory does not show auth {auth:?}: {entry:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn admin_get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut body),
    )
    .await
    .unwrap()
    .unwrap();
    String::from_utf8_lossy(&body).into_owned()
}
