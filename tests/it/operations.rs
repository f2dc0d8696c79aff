//! Operations: the admin endpoint (metrics that move by exactly what happened, /clients, status
//! codes), `tlsbridge inventory` against a running instance, connection limits and the PROXY
//! protocol. Real sockets on 127.0.0.1:0, real TLS on both legs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::ca::Pki;
use crate::support::device::{
    self, connect, smtp_session, DeviceMode, Legacy, Mail, SmtpClient, Verify, DEVICE_EHLO,
};
use crate::support::lines::Close;
use crate::support::ops::{
    self, field, is_audit, number, read_until_closed, scrape, scrape_until, series, Exposition,
    Process, Series,
};
use crate::support::proxy::{Proxy, Route, Settings};
use crate::support::upstream::{FakeUpstream, SmtpBehaviour};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const CONNECTIONS: &str = "tlsbridge_connections_total";
const ACTIVE: &str = "tlsbridge_active_connections";
const REFUSED: &str = "tlsbridge_refused_connections_total";
const FAILURES: &str = "tlsbridge_handshake_failures_total";
const BYTES: &str = "tlsbridge_bytes_total";
const LEGACY: &str = "tlsbridge_legacy_clients";
const HANDSHAKE_COUNT: &str = "tlsbridge_handshake_duration_seconds_count";
const HANDSHAKE_INF: &str = "tlsbridge_handshake_duration_seconds_bucket";
const DEVICE_CONNECTIONS: &str = "tlsbridge_legacy_client_connections_total";
const LAST_SEEN: &str = "tlsbridge_legacy_client_last_seen_timestamp_seconds";
const CERT_EXPIRY: &str = "tlsbridge_upstream_certificate_expiry_timestamp_seconds";

/// Bound on a refused connection's close.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

fn expect(entries: &[(Series, f64)]) -> BTreeMap<Series, f64> {
    entries.iter().cloned().collect()
}

fn show(changes: &BTreeMap<Series, f64>) -> String {
    changes
        .iter()
        .map(|(s, v)| format!("  {s} {v:+}\n"))
        .collect()
}

async fn normal_upstream(pki: &Pki) -> FakeUpstream {
    FakeUpstream::smtp(SmtpBehaviour::Normal, &pki.localhost)
        .await
        .expect("start the fake upstream")
}

#[test]
fn the_exposition_parser_is_strict() {
    let good = "# HELP a_total x\n# TYPE a_total counter\n\
                a_total{route=\"s\\\"q\",b=\"x,y}\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n\
                # TYPE g gauge\ng 1.5e3\n";
    let parsed = Exposition::parse(good).expect("valid text");
    assert_eq!(
        parsed.get("a_total", &[("route", "s\"q"), ("b", "x,y}")]),
        3.0
    );
    assert_eq!(parsed.get("g", &[]), 1500.0);
    parsed.check_histograms().expect("cumulative buckets");
    for bad in [
        "a_total 1\n",                                              // no TYPE
        "# TYPE a counter\na{x=1} 1\n",                             // unquoted label
        "# TYPE a counter\na{x=\"1\"}\n",                           // no value
        "# TYPE a counter\na 1\na 2\n",                             // duplicate
        "# TYPE h histogram\nh 1\n",                                // bare histogram sample
        "# TYPE a counter\na{x=\"1\" 1\n",                          // unterminated
        "# TYPE a counter\na one\n",                                // not a number
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n", // +Inf != count
    ] {
        let result = Exposition::parse(bad).and_then(|e| e.check_histograms());
        assert!(result.is_err(), "accepted {bad:?}");
    }
}

#[tokio::test]
async fn a_legacy_session_moves_the_metrics_by_exactly_what_happened() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let mut upstream = normal_upstream(&pki).await;
    let proxy = Proxy::start_with(&Settings::new(
        &pki,
        vec![Route::smtp("smtp", "starttls", upstream.port())],
    ))
    .await
    .expect("start the proxy");
    let admin = proxy.admin();
    let before = scrape(admin).await.expect("first scrape");
    assert!(
        before
            .value("process_start_time_seconds", &[])
            .unwrap_or(0.0)
            > 1.6e9,
        "process_start_time_seconds missing or implausible:\n{before}"
    );

    let tcp = connect(proxy.addr("smtp")).await.expect("connect");
    let run = ops::starttls_mail(tcp, "scanner-mx3070", Legacy::Tls10, &proxy.verify())
        .await
        .expect("a TLS 1.0 STARTTLS session through the proxy");
    assert_eq!(run.version, "TLSv1");
    let report = upstream.next_session().await.expect("upstream session");
    assert_eq!(report.messages.len(), 1, "{report:?}");

    let after = scrape_until(admin, "the session's end", |m| {
        m.get(CONNECTIONS, &[("route", "smtp"), ("device_tls", "TLSv1")]) >= 1.0
            && m.value(ACTIVE, &[("route", "smtp")]) == Some(0.0)
            && m.get(BYTES, &[("route", "smtp"), ("direction", "down")]) > 0.0
    })
    .await
    .expect("metrics after the session");
    let exposition = ops::http(admin, "GET", "/metrics").await.expect("/metrics");
    promtool_accepts(&exposition.body);
    let mut changes = after.changes_since(&before);
    let smtp = ("route", "smtp");
    // Series whose value is a time: checked for plausibility, not as a delta.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    for (name, low, high) in [
        (LAST_SEEN, now - 600.0, now + 600.0),
        (CERT_EXPIRY, now, f64::INFINITY),
    ] {
        let found: Vec<_> = changes.keys().filter(|k| k.name == name).cloned().collect();
        assert_eq!(found.len(), 1, "one {name} series: {found:?}");
        let value = changes.remove(&found[0]).unwrap_or_default();
        assert!((low..high).contains(&value), "{name} = {value}");
    }
    let wanted = expect(&[
        (series(CONNECTIONS, &[smtp, ("device_tls", "TLSv1")]), 1.0),
        (
            series(BYTES, &[smtp, ("direction", "up")]),
            run.sent.len() as f64,
        ),
        (
            series(BYTES, &[smtp, ("direction", "down")]),
            run.received.len() as f64,
        ),
        (series(HANDSHAKE_COUNT, &[smtp, ("leg", "device")]), 1.0),
        (series(HANDSHAKE_COUNT, &[smtp, ("leg", "upstream")]), 1.0),
        (
            series(HANDSHAKE_INF, &[smtp, ("leg", "device"), ("le", "+Inf")]),
            1.0,
        ),
        (
            series(HANDSHAKE_INF, &[smtp, ("leg", "upstream"), ("le", "+Inf")]),
            1.0,
        ),
        (series(LEGACY, &[]), 1.0),
        (
            series(
                DEVICE_CONNECTIONS,
                &[
                    ("address", "127.0.0.1"),
                    ("client_name", "scanner-mx3070"),
                    ("device_tls", "TLSv1"),
                    smtp,
                ],
            ),
            1.0,
        ),
    ]);
    assert_eq!(
        changes,
        wanted,
        "metric changes after one TLS 1.0 session:\n{}expected:\n{}",
        show(&changes),
        show(&wanted)
    );
    assert_eq!(after.value(ACTIVE, &[smtp]), Some(0.0), "active back to 0");
    assert_eq!(
        after.types.get(CONNECTIONS).map(String::as_str),
        Some("counter")
    );
    assert_eq!(after.types.get(ACTIVE).map(String::as_str), Some("gauge"));
    assert_eq!(
        after
            .types
            .get("tlsbridge_handshake_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    proxy.stop().await.expect("stop the proxy");
}

#[tokio::test]
async fn an_upstream_with_an_unknown_ca_counts_a_certificate_failure() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let mut upstream = FakeUpstream::smtp(SmtpBehaviour::Normal, &pki.unknown_ca)
        .await
        .expect("start the fake upstream");
    let proxy = Proxy::start_with(&Settings::new(
        &pki,
        vec![Route::smtp("bad", "starttls", upstream.port())],
    ))
    .await
    .expect("start the proxy");
    let admin = proxy.admin();
    let before = scrape(admin).await.expect("first scrape");

    let mut device = SmtpClient::connect(proxy.addr("bad"))
        .await
        .expect("connect");
    device.greeting().await.expect("banner");
    device
        .expect("EHLO scanner-mx3070", 250)
        .await
        .expect("EHLO");
    let refused = device.command("STARTTLS").await.expect("STARTTLS reply");
    assert!(
        refused.code == 454 && refused.text().starts_with("454 4.7.0"),
        "STARTTLS with a failed upstream leg must get 454 4.7.0, got {refused:?}"
    );
    let (_, close) = device.read_to_close().await.expect("close");
    assert_eq!(close, Close::Clean);
    let report = upstream.next_session().await.expect("upstream session");
    assert!(!report.tls_established(), "{report:?}");

    let failure = [
        ("route", "bad"),
        ("leg", "upstream"),
        ("reason", "certificate_invalid"),
    ];
    let after = scrape_until(admin, "the certificate failure", |m| {
        m.get(FAILURES, &failure) >= 1.0 && m.value(ACTIVE, &[("route", "bad")]) == Some(0.0)
    })
    .await
    .expect("metrics after the failure");
    let changes = after.changes_since(&before);
    let wanted = expect(&[(series(FAILURES, &failure), 1.0)]);
    assert_eq!(
        changes,
        wanted,
        "metric changes after one failed upstream leg:\n{}",
        show(&changes)
    );
    proxy.stop().await.expect("stop the proxy");
}

#[tokio::test]
async fn an_acl_refusal_is_counted_and_never_reaches_the_upstream() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let proxy = Proxy::start_with(&Settings::new(
        &pki,
        vec![Route::smtp("acl", "starttls", upstream.port()).allow(&["10.0.0.0/8"])],
    ))
    .await
    .expect("start the proxy");
    let admin = proxy.admin();
    let before = scrape(admin).await.expect("first scrape");

    let mut tcp = connect(proxy.addr("acl")).await.expect("connect");
    let (got, _) = read_until_closed(&mut tcp, CLOSE_LIMIT)
        .await
        .expect("a refused peer is closed at once");
    assert!(
        got.is_empty(),
        "a refused peer must get nothing, not even a banner: {:?}",
        String::from_utf8_lossy(&got)
    );
    let refused = [("route", "acl"), ("reason", "acl_denied")];
    let after = scrape_until(admin, "the ACL refusal", |m| {
        m.get(REFUSED, &refused) >= 1.0
    })
    .await
    .expect("metrics after the refusal");
    let changes = after.changes_since(&before);
    assert_eq!(
        changes,
        expect(&[(series(REFUSED, &refused), 1.0)]),
        "metric changes after one ACL refusal:\n{}",
        show(&changes)
    );
    assert_eq!(
        upstream.accepted(),
        0,
        "a refused device must not cause an upstream connection"
    );
    proxy.stop().await.expect("stop the proxy");
}

#[tokio::test]
async fn the_admin_endpoint_answers_known_paths_and_methods_only() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let proxy = Proxy::start_with(&Settings::new(
        &pki,
        vec![Route::smtp("smtp", "starttls", upstream.port())],
    ))
    .await
    .expect("start the proxy");
    let admin = proxy.admin();

    let health = ops::http(admin, "GET", "/healthz").await.expect("/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    ops::poll_status(admin, "/readyz", 200)
        .await
        .expect("/readyz once the listeners are bound");
    let metrics = ops::http(admin, "GET", "/metrics").await.expect("/metrics");
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4"),
        "{metrics:?}"
    );
    let clients = ops::clients(admin).await.expect("/clients");
    assert!(clients.is_empty(), "no device yet: {clients:?}");

    let page = ops::http(admin, "GET", "/").await.expect("GET /");
    assert_eq!(page.status, 200, "the dashboard: {page:?}");
    for path in ["/nope", "/metrics/x", "/clients.json"] {
        let response = ops::http(admin, "GET", path).await.expect("GET");
        assert_eq!(response.status, 404, "GET {path}: {response:?}");
    }
    for path in ["/metrics", "/clients", "/healthz", "/readyz"] {
        let response = ops::http(admin, "POST", path).await.expect("POST");
        assert_eq!(response.status, 405, "POST {path}: {response:?}");
        let allow = response.header("allow").unwrap_or("");
        assert!(
            allow.contains("GET"),
            "405 without Allow: GET: {response:?}"
        );
    }
    let delete = ops::http(admin, "DELETE", "/clients")
        .await
        .expect("DELETE");
    assert_eq!(delete.status, 405, "{delete:?}");
    proxy.stop().await.expect("stop the proxy");
}

/// Checks one inventory entry (from /clients or `inventory --json`) for the TLS 1.0 device.
fn assert_device_entry(entry: &Value, cipher: &str, ehlo: &str) {
    assert_eq!(entry["ip"], "127.0.0.1", "{entry:#}");
    assert_eq!(entry["connections"], 1, "{entry:#}");
    assert_eq!(entry["versions"]["TLSv1"], 1, "{entry:#}");
    assert_eq!(entry["ciphers"][cipher], 1, "{entry:#}");
    assert_eq!(entry["routes"], serde_json::json!(["smtp"]), "{entry:#}");
    assert_eq!(entry["ehlo"], ehlo, "{entry:#}");
    assert!(
        !field(entry, "first_seen").is_empty() && !field(entry, "last_seen").is_empty(),
        "{entry:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_the_inventory_command_show_the_legacy_device() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let proxy = Proxy::start_with(&Settings::new(
        &pki,
        vec![Route::smtp("smtp", "starttls", upstream.port())],
    ))
    .await
    .expect("start the proxy");
    let admin = proxy.admin();

    let tcp = connect(proxy.addr("smtp")).await.expect("connect");
    let run = ops::starttls_mail(tcp, "scanner-mx3070", Legacy::Tls10, &proxy.verify())
        .await
        .expect("a TLS 1.0 session");
    assert!(!run.cipher.is_empty());

    let clients = ops::clients(admin).await.expect("/clients");
    assert_eq!(clients.len(), 1, "{clients:#?}");
    assert_device_entry(&clients[0], &run.cipher, "scanner-mx3070");

    // The CLI, with a config whose admin.listen is the running instance and an empty state_dir
    // of its own: what it prints can only come from the admin endpoint.
    let cli_dir = tempfile::tempdir().expect("tempdir");
    let mut cli_settings = Settings::new(&pki, Vec::new());
    cli_settings.admin = admin.to_string();
    let cli_config = cli_settings.write(cli_dir.path()).expect("CLI config");
    let cli_config = cli_config.to_str().expect("UTF-8 path");

    let table = ops::cli(&["inventory", "--config", cli_config])
        .await
        .expect("tlsbridge inventory");
    assert!(table.success(), "{table:?}");
    assert!(
        table
            .stderr
            .contains(&format!("from the running instance at {admin}")),
        "{table:?}"
    );
    let mut rows = table.stdout.lines();
    let header: Vec<&str> = rows.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "DEVICE",
            "LAST_SEEN",
            "CONNECTIONS",
            "TLS",
            "CIPHERS",
            "ROUTES",
            "EHLO",
            "SNI"
        ],
        "{table:?}"
    );
    let row: Vec<&str> = rows.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(row.first(), Some(&"127.0.0.1"), "{table:?}");
    assert_eq!(row.get(2), Some(&"1"), "{table:?}");
    assert_eq!(row.get(3), Some(&"TLSv1(1)"), "{table:?}");
    assert_eq!(
        row.get(4).copied(),
        Some(format!("{}(1)", run.cipher).as_str()),
        "{table:?}"
    );
    assert_eq!(row.get(5), Some(&"smtp"), "{table:?}");
    assert_eq!(row.get(6), Some(&"scanner-mx3070"), "{table:?}");
    assert_eq!(rows.next(), None, "one device only: {table:?}");

    let json = ops::cli(&["inventory", "--json", "--config", cli_config])
        .await
        .expect("tlsbridge inventory --json");
    assert!(json.success(), "{json:?}");
    let listed: Vec<Value> = serde_json::from_str(&json.stdout).expect("JSON array");
    assert_eq!(listed.len(), 1, "{json:?}");
    assert_device_entry(&listed[0], &run.cipher, "scanner-mx3070");
    assert_eq!(listed, clients, "the CLI prints what /clients serves");
    proxy.stop().await.expect("stop the proxy");
}

/// Reads everything a refused connection gets until the proxy closes it (bounded); returns it
/// as text, and how the connection ended.
/// A device on implicit TLS says EHLO inside TLS: the inventory still learns its name.
#[tokio::test]
async fn the_inventory_learns_the_ehlo_name_of_an_implicit_tls_device() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let proxy = Proxy::start_with(&Settings::new(
        &pki,
        vec![Route::smtp("smtps", "tls", upstream.port())],
    ))
    .await
    .expect("start the proxy");
    let mode = DeviceMode::Tls(Legacy::Tls10);
    smtp_session(proxy.addr("smtps"), mode, &proxy.verify(), &Mail::sample())
        .await
        .expect("a TLS 1.0 session on the implicit TLS route");
    let clients = ops::clients(proxy.admin()).await.expect("/clients");
    assert_eq!(clients.len(), 1, "{clients:#?}");
    assert_eq!(clients[0]["ehlo"], DEVICE_EHLO, "{:#}", clients[0]);
    assert_eq!(clients[0]["routes"], serde_json::json!(["smtps"]));
    proxy.stop().await.expect("stop the proxy");
}

async fn first_line_then_close(mut tcp: TcpStream) -> (String, Close) {
    let (got, close) = read_until_closed(&mut tcp, CLOSE_LIMIT)
        .await
        .expect("a refused connection is closed");
    (String::from_utf8_lossy(&got).into_owned(), close)
}

/// Connects until the proxy answers with a 220 banner (a place frees up only once the previous
/// session task ends, just after the device saw its close); bounded.
async fn admitted_again(addr: SocketAddr) -> SmtpClient<TcpStream> {
    let deadline = tokio::time::Instant::now() + ops::POLL_TIMEOUT;
    loop {
        let mut device = SmtpClient::connect(addr).await.expect("connect");
        let reply = device.read_reply().await.expect("first reply");
        if reply.code == 220 {
            return device;
        }
        assert!(
            reply.text().starts_with("421 4.7.0"),
            "unexpected first reply {reply:?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused {:?} after the first session ended",
            ops::POLL_TIMEOUT
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn quit(mut device: SmtpClient<TcpStream>) {
    device.expect("QUIT", 221).await.expect("QUIT");
    let (_, close) = device.read_to_close().await.expect("close after QUIT");
    assert_eq!(close, Close::Clean);
}

#[tokio::test]
async fn max_connections_refuses_with_421_until_a_place_frees_up() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let mut settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    settings.max_connections = Some(1);
    let proxy = Proxy::start_with(&settings).await.expect("start the proxy");
    let addr = proxy.addr("smtp");
    let before = scrape(proxy.admin()).await.expect("first scrape");

    let mut first = SmtpClient::connect(addr).await.expect("connect");
    first
        .greeting()
        .await
        .expect("the first connection is admitted");
    let (text, close) = first_line_then_close(connect(addr).await.expect("connect")).await;
    assert!(
        text.starts_with("421 4.7.0 ") && text.ends_with("\r\n") && text.lines().count() == 1,
        "over max_connections: one 421 4.7.0 line then close, got {text:?}"
    );
    assert_eq!(close, Close::Clean, "{text:?}");
    let busy = [("route", "smtp"), ("reason", "too_many_connections")];
    let after = scrape_until(proxy.admin(), "the refusal", |m| {
        m.get(REFUSED, &busy) >= 1.0
    })
    .await
    .expect("metrics");
    assert_eq!(after.get(REFUSED, &busy) - before.get(REFUSED, &busy), 1.0);
    assert_eq!(after.get(ACTIVE, &[("route", "smtp")]), 1.0);

    quit(first).await;
    let again = admitted_again(addr).await;
    quit(again).await;
    proxy.stop().await.expect("stop the proxy");
}

/// A TCP connection from `source` (any 127.0.0.0/8 address works on Linux loopback).
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let source = source.parse().expect("source address");
    device::connect_from(source, addr)
        .await
        .expect("connect from the source address")
}

#[tokio::test]
async fn max_connections_per_ip_refuses_the_same_address_only() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let mut settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    settings.max_connections_per_ip = Some(1);
    let proxy = Proxy::start_with(&settings).await.expect("start the proxy");
    let addr = proxy.addr("smtp");

    let mut first = SmtpClient::new(connect_from("127.0.0.1", addr).await);
    first
        .greeting()
        .await
        .expect("the first connection is admitted");
    let (text, close) = first_line_then_close(connect_from("127.0.0.1", addr).await).await;
    assert!(
        text.starts_with("421 4.7.0 ") && text.lines().count() == 1,
        "over max_connections_per_ip: one 421 4.7.0 line then close, got {text:?}"
    );
    assert_eq!(close, Close::Clean);

    // Another address is not affected.
    let mut other = SmtpClient::new(connect_from("127.0.0.2", addr).await);
    other
        .greeting()
        .await
        .expect("another device address is admitted");
    quit(other).await;

    quit(first).await;
    let again = admitted_again(addr).await;
    quit(again).await;
    let busy = [("route", "smtp"), ("reason", "too_many_connections")];
    let after = scrape(proxy.admin()).await.expect("metrics");
    assert!(
        after.get(REFUSED, &busy) >= 1.0,
        "the per-IP refusal is counted:\n{after}"
    );
    proxy.stop().await.expect("stop the proxy");
}

/// The session_closed event of the device at `peer` (as the proxy logs it).
async fn closed_event(process: &Process, peer: &str) -> Value {
    let peer = peer.to_string();
    process
        .wait_event(
            &format!("session_closed for {peer}"),
            CLOSE_LIMIT * 3,
            |e| is_audit(e, "session_closed") && field(e, "peer") == peer,
        )
        .await
        .expect("session_closed")
}

#[tokio::test]
async fn the_proxy_protocol_names_the_device_and_is_only_taken_from_trusted_peers() {
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let port = upstream.port();
    let settings = Settings::new(
        &pki,
        vec![
            Route::smtp("balanced", "starttls", port)
                .allow(&["192.0.2.0/24", "198.51.100.0/24"])
                .proxy_from(&["127.0.0.0/8"]),
            Route::smtp("elsewhere", "starttls", port).proxy_from(&["10.0.0.0/8"]),
        ],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut process = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge");
    let verify = Verify::Ca(dir.path().join("certs/ca.crt"));
    let balanced = process.addr("balanced");

    // v1 from a trusted balancer.
    let mut tcp = connect(balanced).await.expect("connect");
    tcp.write_all(
        format!(
            "PROXY TCP4 192.0.2.10 127.0.0.1 51000 {}\r\n",
            balanced.port()
        )
        .as_bytes(),
    )
    .await
    .expect("v1 header");
    let v1 = ops::starttls_mail(tcp, "printer-v1", Legacy::Tls10, &verify)
        .await
        .expect("a session behind a v1 header");
    let event = closed_event(&process, "192.0.2.10:51000").await;
    assert_eq!(field(&event, "outcome"), "ok", "{event}");
    assert_eq!(number(&event, "bytes_up"), Some(v1.sent.len() as u64));
    process
        .wait_event("legacy_client for 192.0.2.10", CLOSE_LIMIT, |e| {
            is_audit(e, "legacy_client") && field(e, "peer") == "192.0.2.10:51000"
        })
        .await
        .expect("legacy_client names the address from the header");

    // v2 from a trusted balancer.
    let mut tcp = connect(balanced).await.expect("connect");
    let header = tlsbridge::proxy_protocol::v2_header(
        "198.51.100.7:40000".parse().expect("address"),
        balanced,
    );
    tcp.write_all(&header).await.expect("v2 header");
    let v2 = ops::starttls_mail(tcp, "printer-v2", Legacy::Tls10, &verify)
        .await
        .expect("a session behind a v2 header");
    let event = closed_event(&process, "198.51.100.7:40000").await;
    assert_eq!(field(&event, "outcome"), "ok", "{event}");

    // The socket's own address appears nowhere as the device.
    for local in [v1.local.to_string(), v2.local.to_string()] {
        assert!(
            !process.events().iter().any(|e| field(e, "peer") == local),
            "the balancer's address {local} was logged as a peer:\n{}",
            process.output()
        );
    }
    let clients = ops::clients(process.admin()).await.expect("/clients");
    let mut ips: Vec<&str> = clients.iter().map(|c| field(c, "ip")).collect();
    ips.sort_unstable();
    assert_eq!(ips, ["192.0.2.10", "198.51.100.7"], "{clients:#?}");

    // A header naming an address outside the route's allow list.
    let mut tcp = connect(balanced).await.expect("connect");
    tcp.write_all(
        format!(
            "PROXY TCP4 203.0.113.5 127.0.0.1 4444 {}\r\n",
            balanced.port()
        )
        .as_bytes(),
    )
    .await
    .expect("v1 header");
    let (got, _) = read_until_closed(&mut tcp, CLOSE_LIMIT)
        .await
        .expect("closed");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    let event = closed_event(&process, "203.0.113.5:4444").await;
    assert_eq!(field(&event, "outcome"), "acl_denied", "{event}");

    // No header, and a malformed one, on a PROXY route: closed without a banner.
    for first in [&b"EHLO printer\r\n"[..], b"PROXY TCP4 nonsense\r\n"] {
        let mut tcp = connect(balanced).await.expect("connect");
        let local = tcp.local_addr().expect("local").to_string();
        tcp.write_all(first).await.expect("write");
        let (got, _) = read_until_closed(&mut tcp, CLOSE_LIMIT)
            .await
            .expect("a missing or malformed header closes the connection");
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        let event = closed_event(&process, &local).await;
        assert_eq!(field(&event, "outcome"), "proxy_header", "{event}");
    }

    // A peer outside proxy_from is closed at once, header or not, well before the 10s
    // handshake timeout.
    let mut tcp = connect(process.addr("elsewhere")).await.expect("connect");
    let local = tcp.local_addr().expect("local").to_string();
    let started = std::time::Instant::now();
    let (got, _) = read_until_closed(&mut tcp, CLOSE_LIMIT)
        .await
        .expect("an untrusted balancer is closed at once");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(started.elapsed() < Duration::from_secs(3));
    let event = closed_event(&process, &local).await;
    assert_eq!(field(&event, "outcome"), "proxy_untrusted", "{event}");
    let metrics = scrape(process.admin()).await.expect("metrics");
    for (route, reason, count) in [
        ("elsewhere", "proxy_untrusted", 1.0),
        ("balanced", "proxy_header", 2.0),
        ("balanced", "acl_denied", 1.0),
    ] {
        assert_eq!(
            metrics.get(REFUSED, &[("route", route), ("reason", reason)]),
            count,
            "refused {route}/{reason}:\n{metrics}"
        );
    }

    process.signal("TERM").expect("SIGTERM");
    let status = process
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exit");
    assert!(status.success(), "{status}\n{}", process.output());
}

/// The exposition passes Prometheus' own parser and linter (`promtool check metrics`); skipped
/// where promtool is missing, unless `CI` is set.
fn promtool_accepts(exposition: &str) {
    use std::io::Write;
    let spawned = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            assert!(std::env::var_os("CI").is_none(), "promtool: {err}");
            eprintln!("skipped: promtool is not installed");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(exposition.as_bytes())
            .expect("feed promtool");
    }
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{exposition}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
