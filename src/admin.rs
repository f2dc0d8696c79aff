//! The admin endpoint (hyper): `/healthz`, `/readyz`, `/metrics`, `/clients`, `/clients.csv`
//! and the migration dashboard at `/`.
//!
//! It must not become a way to starve the proxy: a request head must arrive within
//! [`HEADER_READ_TIMEOUT`] (also the keep-alive timeout between requests), a connection lives at
//! most [`CONNECTION_LIFETIME`], and at most [`MAX_CONNECTIONS`] are open at once (more are
//! closed at accept).
//! With `admin.token_file`, every page but the probes needs the token: `Authorization: Bearer
//! <token>`, or Basic credentials with the token as the password (a browser asks for them).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderName, HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_SECURITY_POLICY,
    CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::audit::Sinks;
use crate::dashboard::{self, Sort};
use crate::secret::Secret;

/// The dashboard runs no script and loads nothing: only its inline style is allowed.
const DASHBOARD_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; \
                             form-action 'none'; frame-ancestors 'none'";

/// Pause after a failed accept (out of descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A request head (request line and headers) must be complete this long after the connection
/// starts waiting for it, or the connection is closed. hyper starts this timer whenever it waits
/// for a request, so it is also the keep-alive timeout: an idle connection is closed this long
/// after its last response.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest an admin connection stays open, keep-alive included: then it is closed after the
/// response in progress (and at once [`CLOSE_GRACE`] later). Scrapers simply reconnect.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How long a response in progress gets at the end of [`CONNECTION_LIFETIME`].
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Admin connections open at once; a connection past it is closed at accept.
pub const MAX_CONNECTIONS: usize = 64;

/// Paths anyone who can reach the endpoint may ask: the probes.
const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// What the endpoint reports on.
pub struct AdminState {
    pub sinks: Arc<Sinks>,
    /// True once every listener is bound and until draining starts.
    pub ready: AtomicBool,
    /// `admin.token_file`'s token: required for everything but the probes when set.
    pub token: Option<Secret>,
}

/// Serves until `stop` is cancelled. Each connection gets its own task.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    debug!(error = %err, "admin accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(
                max = MAX_CONNECTIONS,
                "admin connection closed at accept: too many open"
            );
            continue;
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = stop.cancelled() => return,
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn => {}
                () = stop.cancelled() => {}
                () = tokio::time::sleep(CLOSE_GRACE) => {}
            }
        });
    }
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let known = [
        "/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/clients",
        "/clients.csv",
    ];
    let path = req.uri().path();
    if !known.contains(&path) {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    if let Some(token) = &state.token {
        if !OPEN_PATHS.contains(&path) && !authorized(req, token) {
            let mut response = reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "the admin token is required (admin.token_file)\n".into(),
            );
            // Basic too, so a browser asks for it (any user name, the token as the password).
            let headers = response.headers_mut();
            for challenge in ["Bearer realm=\"tlsbridge\"", "Basic realm=\"tlsbridge\""] {
                headers.append(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            return response;
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if state.ready.load(Ordering::Relaxed) => {
            reply(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        "/metrics" => reply(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            state.sinks.metrics_text(),
        ),
        "/" => {
            let inventory = &state.sinks.inventory;
            let view = dashboard::View {
                clients: inventory.snapshot(),
                days: inventory.daily(),
                routes: route_status(&state.sinks),
                now: inventory.now(),
                sort: Sort::from_query(req.uri().query()),
            };
            let response = reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                dashboard::render(&view),
            );
            private(
                response,
                &[
                    (CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
                    (REFERRER_POLICY, "no-referrer"),
                ],
            )
        }
        "/clients.csv" => {
            let csv = crate::inventory::csv(&state.sinks.inventory.snapshot());
            let response = reply(
                StatusCode::OK,
                "text/csv; charset=utf-8; header=present",
                csv,
            );
            private(
                response,
                &[(
                    CONTENT_DISPOSITION,
                    "attachment; filename=\"tlsbridge-inventory.csv\"",
                )],
            )
        }
        _ => {
            let json = serde_json::to_string_pretty(&state.sinks.inventory.snapshot())
                .unwrap_or_else(|_| "[]".into());
            reply(StatusCode::OK, "application/json", json + "\n")
        }
    }
}

/// True when the request carries the right token: `Authorization: Bearer <token>`, or Basic
/// credentials (a browser's login prompt) whose password is the token, whatever the user name.
fn authorized(req: &Request<Incoming>, token: &Secret) -> bool {
    use base64::Engine;
    let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) else {
        return false;
    };
    let token = token.expose().as_bytes();
    if let Some(given) = credentials(value.as_bytes(), b"bearer ") {
        return constant_time_eq(given, token);
    }
    let Some(encoded) = credentials(value.as_bytes(), b"basic ") else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return false;
    };
    let decoded = zeroize::Zeroizing::new(decoded);
    match decoded.iter().position(|&b| b == b':') {
        Some(colon) => constant_time_eq(&decoded[colon + 1..], token),
        None => false,
    }
}

/// What follows `scheme` (case-insensitive) in an Authorization value, trimmed.
fn credentials<'a>(value: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    let head = value.get(..scheme.len())?;
    head.eq_ignore_ascii_case(scheme)
        .then(|| value[scheme.len()..].trim_ascii())
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was
/// right (only, at most, whether its length was).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let longest = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..longest {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// Headers for a page that lists vulnerable devices: not cached, not sniffed, plus `extra`.
fn private(
    mut response: Response<Full<Bytes>>,
    extra: &[(HeaderName, &'static str)],
) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    for (name, value) in extra {
        headers.insert(name.clone(), HeaderValue::from_static(value));
    }
    response
}

/// The dashboard's per-route block, from the metrics' recent view of each route.
fn route_status(sinks: &Sinks) -> Vec<dashboard::RouteStatus> {
    let at = |seconds: i64| {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds.max(0) as u64)
    };
    sinks
        .metrics
        .routes()
        .into_iter()
        .map(|r| dashboard::RouteStatus {
            route: r.route,
            active_sessions: r.active_sessions,
            upstream_failures_last_hour: r.upstream_failures_last_hour,
            upstream_certificate_expiry: r.certificate_expiry.map(at),
        })
        .collect()
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::inventory::{Inventory, Sighting};

    /// One raw HTTP/1.1 exchange: the response head (lower-cased) and body.
    fn exchange(port: u16, request: &str) -> (String, String) {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        write!(tcp, "{request}").unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.to_ascii_lowercase(), body.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_the_dashboard_and_the_csv() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = Inventory::load(dir.path(), 10).unwrap();
        inventory.record(&Sighting {
            ip: "10.0.0.7".parse().unwrap(),
            route: "smtp",
            version: "TLSv1",
            cipher: "AES128-SHA",
            sni: "",
            ehlo: Some("<script>alert(1)</script>"),
        });
        let state = Arc::new(AdminState {
            sinks: Arc::new(Sinks::new(inventory, None)),
            ready: AtomicBool::new(true),
            token: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, state, stop.clone()));

        let get = |path: &str, method: &str| {
            let request =
                format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            tokio::task::spawn_blocking(move || exchange(port, &request))
        };
        let (head, body) = get("/?sort=version", "GET").await.unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains("content-type: text/html; charset=utf-8"),
            "{head}"
        );
        assert!(
            head.contains("content-security-policy: default-src 'none'"),
            "{head}"
        );
        assert!(head.contains("cache-control: no-store"), "{head}");
        assert!(body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!body.contains("<script"));

        let (head, body) = get("/clients.csv", "GET").await.unwrap();
        assert!(head.contains("content-type: text/csv"), "{head}");
        assert!(head.contains("content-disposition: attachment"), "{head}");
        assert!(body.starts_with("address,client_name,sni,"), "{body}");
        assert!(
            body.contains("\r\n10.0.0.7,<script>alert(1)</script>,,TLSv1 (1),"),
            "{body}"
        );

        let (head, body) = get("/", "HEAD").await.unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(body.is_empty(), "{body}");
        let (head, _) = get("/clients.csv", "POST").await.unwrap();
        assert!(head.starts_with("http/1.1 405"), "{head}");
        stop.cancel();
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        for wrong in [&b""[..], b"secre", b"secret!", b"Secret", b"\0ecret"] {
            assert!(!constant_time_eq(wrong, b"secret"), "{wrong:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_guards_everything_but_the_probes() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(AdminState {
            sinks: Arc::new(Sinks::new(Inventory::load(dir.path(), 10).unwrap(), None)),
            ready: AtomicBool::new(true),
            token: Some(Secret::new("s3cret-token")),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, state, stop.clone()));
        let get = |path: &str, auth: &str| {
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
            tokio::task::spawn_blocking(move || exchange(port, &request).0)
        };
        for path in ["/", "/metrics", "/clients", "/clients.csv"] {
            for auth in [
                "",
                "Authorization: Bearer wrong\r\n",
                "Authorization: Basic s3cret-token\r\n",
                // admin:wrong, and the token as a user name
                "Authorization: Basic YWRtaW46d3Jvbmc=\r\n",
                "Authorization: Basic czNjcmV0LXRva2VuOg==\r\n",
            ] {
                let head = get(path, auth).await.unwrap();
                assert!(head.starts_with("http/1.1 401"), "{path} {auth:?}: {head}");
                assert!(head.contains("www-authenticate: bearer"), "{head}");
                assert!(head.contains("www-authenticate: basic"), "{head}");
            }
            for auth in [
                "Authorization: Bearer s3cret-token\r\n",
                // admin:s3cret-token, as a browser sends it after its login prompt
                "Authorization: Basic YWRtaW46czNjcmV0LXRva2Vu\r\n",
            ] {
                let head = get(path, auth).await.unwrap();
                assert!(head.starts_with("http/1.1 200"), "{path} {auth:?}: {head}");
            }
        }
        for path in ["/healthz", "/readyz"] {
            let head = get(path, "").await.unwrap();
            assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        }
        stop.cancel();
    }
}
