//! The downgrade log of the real binary with `--log-format json`: one flat JSON object per line,
//! `legacy_client` and `session_closed` with the contract's fields and exact byte counts, no
//! secrets anywhere; and stalled devices closed after `device_tls.handshake_timeout`.

use std::time::{Duration, Instant};

use crate::support::ca::Pki;
use crate::support::device::{connect, tls_info, Legacy, Mail, SmtpClient, Verify};
use crate::support::lines::Close;
use crate::support::ops::{self, base64, field, is_audit, number, read_until_closed, Process};
use crate::support::proxy::{Route, Settings};
use crate::support::upstream::{FakeUpstream, SmtpBehaviour};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const EVENT_LIMIT: Duration = Duration::from_secs(20);

const USER: &str = "scanner@example.com";
const PASSWORD: &str = "Hunter2-S3cr3t-Passw0rd";

async fn normal_upstream(pki: &Pki) -> FakeUpstream {
    FakeUpstream::smtp(SmtpBehaviour::Normal, &pki.localhost)
        .await
        .expect("start the fake upstream")
}

/// Whether `event` is the audit event `name` of the device at `peer` on `route`. Both must
/// match: devices of different routes may share a port.
fn is_session_event(event: &Value, name: &str, route: &str, peer: &str) -> bool {
    is_audit(event, name) && field(event, "route") == route && field(event, "peer") == peer
}

/// The one audit event `name` of the device at `peer` on `route`, waited for; fails if there
/// are two.
async fn audit_event(process: &Process, name: &str, route: &str, peer: &str) -> Value {
    let event = process
        .wait_event(&format!("{name} for {peer} on {route}"), EVENT_LIMIT, |e| {
            is_session_event(e, name, route, peer)
        })
        .await
        .expect("audit event");
    let count = process
        .events()
        .iter()
        .filter(|e| is_session_event(e, name, route, peer))
        .count();
    assert_eq!(count, 1, "one {name} per session:\n{}", process.output());
    event
}

#[tokio::test]
async fn the_json_log_records_the_legacy_session_exactly_and_no_secrets() {
    let pki = Pki::new().expect("test PKI");
    let mut upstream = normal_upstream(&pki).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    // Everything tlsbridge and its libraries can log.
    settings.log_level = "trace".to_string();
    settings.admin = String::new();
    let mut process = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge");
    let verify = Verify::Ca(dir.path().join("certs/ca.crt"));

    let plain_payload = base64(format!("\0{USER}\0{PASSWORD}").as_bytes());
    let auth_plain = format!("AUTH PLAIN {plain_payload}");
    let tcp = connect(process.addr("smtp")).await.expect("connect");
    let local = tcp.local_addr().expect("local address").to_string();
    let mut plain = SmtpClient::new(tcp);
    plain.greeting().await.expect("banner");
    plain
        .expect("EHLO scanner-mx3070", 250)
        .await
        .expect("EHLO");
    plain
        .expect(&auth_plain, 530)
        .await
        .expect("AUTH before STARTTLS is refused");
    plain.expect("STARTTLS", 220).await.expect("STARTTLS");
    let mut tls = plain
        .start_tls(Legacy::Tls10, &verify)
        .await
        .expect("TLS 1.0 handshake");
    let (version, cipher) = tls_info(tls.conn.get_ref());
    tls.expect("EHLO scanner-mx3070", 250)
        .await
        .expect("EHLO inside TLS");
    // The fake upstream answers every AUTH with 504 and unknown lines with 500: what matters is
    // that the credentials crossed the proxy.
    tls.command(&auth_plain)
        .await
        .expect("AUTH PLAIN inside TLS");
    tls.command("AUTH LOGIN").await.expect("AUTH LOGIN");
    tls.command(&base64(USER.as_bytes())).await.expect("user");
    tls.command(&base64(PASSWORD.as_bytes()))
        .await
        .expect("password");
    tls.send_mail(&Mail::sample()).await.expect("a mail");
    let (_, close) = tls.read_to_close().await.expect("close");
    assert_eq!(close, Close::Clean);
    let sent = tls.conn.sent.clone();
    let received = tls.conn.received.clone();
    // The device closes its side too (the proxy carries half-closes: until then the upstream
    // leg stays open for the device's direction).
    drop(tls);
    let report = upstream.next_session().await.expect("upstream session");
    assert!(
        report.after_tls_text().contains(&plain_payload),
        "the credentials reached the upstream: {report:?}"
    );

    let legacy = audit_event(&process, "legacy_client", "smtp", &local).await;
    assert_eq!(field(&legacy, "level"), "INFO", "{legacy}");
    assert_eq!(field(&legacy, "target"), "tlsbridge::audit", "{legacy}");
    assert_eq!(field(&legacy, "route"), "smtp", "{legacy}");
    assert_eq!(field(&legacy, "peer"), local, "{legacy}");
    assert_eq!(field(&legacy, "device_tls"), "TLSv1", "{legacy}");
    assert_eq!(version, "TLSv1");
    assert!(!cipher.is_empty());
    assert_eq!(field(&legacy, "cipher"), cipher, "{legacy}");
    assert_eq!(field(&legacy, "sni"), "localhost", "{legacy}");
    assert_eq!(field(&legacy, "protocol"), "smtp", "{legacy}");
    assert_eq!(field(&legacy, "upstream"), upstream.host_port(), "{legacy}");

    let closed = audit_event(&process, "session_closed", "smtp", &local).await;
    assert_eq!(field(&closed, "target"), "tlsbridge::audit", "{closed}");
    for (key, want) in [
        ("route", "smtp"),
        ("device_tls", "TLSv1"),
        ("cipher", cipher.as_str()),
        ("sni", "localhost"),
        ("protocol", "smtp"),
        ("outcome", "ok"),
        ("error", ""),
    ] {
        assert_eq!(field(&closed, key), want, "{key} in {closed}");
    }
    assert_eq!(field(&closed, "upstream"), upstream.host_port());
    assert!(
        matches!(field(&closed, "upstream_tls"), "TLSv1.2" | "TLSv1.3"),
        "{closed}"
    );
    assert!(!field(&closed, "upstream_cipher").is_empty(), "{closed}");
    assert_eq!(
        number(&closed, "bytes_up"),
        Some(sent.len() as u64),
        "bytes_up is what the device sent inside TLS: {closed}"
    );
    assert_eq!(
        number(&closed, "bytes_down"),
        Some(received.len() as u64),
        "bytes_down is what the device received inside TLS: {closed}"
    );
    assert!(number(&closed, "duration_ms").is_some(), "{closed}");

    process.signal("TERM").expect("SIGTERM");
    let status = process.wait_exit(EVENT_LIMIT).await.expect("exit");
    assert_eq!(status.code(), Some(0), "{}", process.output());

    // One flat JSON object per stdout line.
    for line in process.lines() {
        let value: Value =
            serde_json::from_str(&line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"));
        assert!(value.is_object(), "{line:?}");
        assert!(
            value.get("fields").is_none(),
            "fields must be flat: {line:?}"
        );
    }
    let output = process.output();
    for secret in [
        PASSWORD,
        plain_payload.as_str(),
        &base64(PASSWORD.as_bytes()),
        &base64(USER.as_bytes()),
        "AUTH PLAIN",
    ] {
        assert!(
            !output.contains(secret),
            "the log contains {secret:?}:\n{output}"
        );
    }
}

/// How a stalled device's connection ended.
#[derive(Debug)]
struct Stalled {
    what: &'static str,
    route: &'static str,
    local: String,
    after: Duration,
    got: Vec<u8>,
}

async fn stall(
    what: &'static str,
    route: &'static str,
    mut tcp: TcpStream,
    started: Instant,
) -> Stalled {
    let local = tcp.local_addr().expect("local").to_string();
    let (got, _) = read_until_closed(&mut tcp, Duration::from_secs(8))
        .await
        .unwrap_or_else(|err| panic!("{what}: {err:#}"));
    Stalled {
        what,
        route,
        local,
        after: started.elapsed(),
        got,
    }
}

/// A TLS 1.0 ClientHello cut short: the record header promises more than is sent.
const PARTIAL_CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x01";

async fn stalled_devices(process: &Process) -> Vec<Stalled> {
    let tls = process.addr("smtps");
    let starttls = process.addr("smtp");
    let silent = async {
        let started = Instant::now();
        let tcp = connect(tls).await.expect("connect");
        stall("tls route, nothing sent", "smtps", tcp, started).await
    };
    let partial = async {
        let started = Instant::now();
        let mut tcp = connect(tls).await.expect("connect");
        tcp.write_all(PARTIAL_CLIENT_HELLO).await.expect("write");
        stall("tls route, partial ClientHello", "smtps", tcp, started).await
    };
    let mid_dialog = async {
        let started = Instant::now();
        let tcp = connect(starttls).await.expect("connect");
        let mut device = SmtpClient::new(tcp);
        device.greeting().await.expect("banner");
        device
            .expect("EHLO scanner-mx3070", 250)
            .await
            .expect("EHLO");
        let (tcp, _) = device.conn.into_inner();
        stall("starttls route, silent after EHLO", "smtp", tcp, started).await
    };
    let no_handshake = async {
        let started = Instant::now();
        let tcp = connect(starttls).await.expect("connect");
        let mut device = SmtpClient::new(tcp);
        device.greeting().await.expect("banner");
        device
            .expect("EHLO scanner-mx3070", 250)
            .await
            .expect("EHLO");
        device.expect("STARTTLS", 220).await.expect("STARTTLS");
        let (tcp, _) = device.conn.into_inner();
        stall(
            "starttls route, no handshake after 220",
            "smtp",
            tcp,
            started,
        )
        .await
    };
    let (a, b, c, d) = tokio::join!(silent, partial, mid_dialog, no_handshake);
    vec![a, b, c, d]
}

async fn stalled_setup(pki: &Pki, dir: &tempfile::TempDir) -> (FakeUpstream, Process) {
    let upstream = normal_upstream(pki).await;
    let mut settings = Settings::new(
        pki,
        vec![
            Route::smtp("smtps", "tls", upstream.port()),
            Route::smtp("smtp", "starttls", upstream.port()),
        ],
    );
    settings.handshake_timeout = "1s".to_string();
    let process = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge");
    (upstream, process)
}

#[tokio::test]
async fn stalled_devices_are_closed_after_the_handshake_timeout() {
    let pki = Pki::new().expect("test PKI");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_upstream, process) = stalled_setup(&pki, &dir).await;

    for stalled in stalled_devices(&process).await {
        assert!(
            stalled.after >= Duration::from_millis(900) && stalled.after < Duration::from_secs(6),
            "{}: closed after {:?}, expected about the 1s handshake_timeout",
            stalled.what,
            stalled.after
        );
        let event = audit_event(&process, "session_closed", stalled.route, &stalled.local).await;
        assert_eq!(
            field(&event, "outcome"),
            "device_timeout",
            "{}: {event}\n(device got {:?})",
            stalled.what,
            String::from_utf8_lossy(&stalled.got)
        );
        assert!(
            !process.events().iter().any(|e| is_session_event(
                e,
                "legacy_client",
                stalled.route,
                &stalled.local
            )),
            "{}: no legacy_client for a device leg that never came up",
            stalled.what
        );
    }
}

/// `tlsbridge_handshake_failures_total` is "failed legs by route, leg and reason"; a device leg
/// that never completes its dialog and handshake is a failed device leg, but
/// `session::drive` builds its `device_timeout` failure with `Failure::new` (no leg), so the
/// metric never counts it, while a device handshake error (`Failure::device`) is counted.
#[tokio::test]
async fn stalled_devices_count_as_device_handshake_failures() {
    let pki = Pki::new().expect("test PKI");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_upstream, process) = stalled_setup(&pki, &dir).await;
    let stalled = stalled_devices(&process).await;
    for s in &stalled {
        audit_event(&process, "session_closed", s.route, &s.local).await;
    }
    let metrics = ops::scrape(process.admin()).await.expect("metrics");
    let count = |route: &str| {
        metrics.get(
            "tlsbridge_handshake_failures_total",
            &[
                ("route", route),
                ("leg", "device"),
                ("reason", "device_timeout"),
            ],
        )
    };
    assert_eq!(
        (count("smtps"), count("smtp")),
        (2.0, 2.0),
        "device timeouts by route:\n{metrics}"
    );
}
