//! The real binary under signals: SIGTERM/SIGINT drain and save the inventory (which the next
//! start loads), a second SIGTERM ends the drain at once, SIGHUP reloads the device certificate
//! without touching open sessions.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::ca::Pki;
use crate::support::device::{connect, Legacy, Mail, SmtpClient, Verify};
use crate::support::lines::Close;
use crate::support::ops::{self, field, is_audit, message, number, Process};
use crate::support::proxy::{Route, Settings};
use crate::support::upstream::{FakeUpstream, SmtpBehaviour};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

const EXIT_LIMIT: Duration = Duration::from_secs(20);

async fn normal_upstream(pki: &Pki) -> FakeUpstream {
    FakeUpstream::smtp(SmtpBehaviour::Normal, &pki.localhost)
        .await
        .expect("start the fake upstream")
}

fn verify(dir: &Path) -> Verify {
    Verify::Ca(dir.join("certs/ca.crt"))
}

/// A device inside TLS on a STARTTLS route, after its EHLO there; returns the session and the
/// serial number of the certificate the proxy presented.
async fn open_session(
    addr: std::net::SocketAddr,
    verify: &Verify,
) -> (SmtpClient<SslStream<TcpStream>>, String) {
    let mut plain = SmtpClient::connect(addr).await.expect("connect");
    plain.greeting().await.expect("banner");
    plain
        .expect("EHLO scanner-mx3070", 250)
        .await
        .expect("EHLO");
    plain.expect("STARTTLS", 220).await.expect("STARTTLS");
    let mut tls = plain
        .start_tls(Legacy::Tls10, verify)
        .await
        .expect("TLS 1.0 handshake");
    let serial = ops::serial(tls.conn.get_ref()).expect("serial");
    tls.expect("EHLO scanner-mx3070", 250)
        .await
        .expect("EHLO inside TLS");
    (tls, serial)
}

/// MAIL, RCPT, DATA, QUIT and the close, on a session where EHLO was done.
async fn finish_mail(mut tls: SmtpClient<SslStream<TcpStream>>) {
    let mail = Mail::sample();
    tls.expect(&format!("MAIL FROM:{}", mail.from), 250)
        .await
        .expect("MAIL");
    for to in &mail.to {
        tls.expect(&format!("RCPT TO:{to}"), 250)
            .await
            .expect("RCPT");
    }
    tls.expect("DATA", 354).await.expect("DATA");
    let mut payload = mail.body.clone();
    payload.extend_from_slice(b".\r\n");
    tls.conn.write_all(&payload).await.expect("body");
    let reply = tls.read_reply().await.expect("reply to the message");
    assert_eq!(reply.code, 250, "{reply:?}");
    tls.expect("QUIT", 221).await.expect("QUIT");
    let (_, close) = tls.read_to_close().await.expect("close");
    assert_eq!(close, Close::Clean);
}

fn inventory_entry<'a>(clients: &'a [Value], ip: &str) -> &'a Value {
    clients
        .iter()
        .find(|c| field(c, "ip") == ip)
        .unwrap_or_else(|| panic!("no {ip} in {clients:#?}"))
}

/// Killed without warning, the proxy loses at most `state_save_interval` of the inventory.
#[tokio::test]
async fn the_inventory_survives_a_crash() {
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    settings.state_save_interval = "1s".to_string();
    let mut first = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge");
    let tcp = connect(first.addr("smtp")).await.expect("connect");
    ops::starttls_mail(tcp, "scanner-mx3070", Legacy::Tls10, &verify(dir.path()))
        .await
        .expect("a TLS 1.0 session");
    let state = dir.path().join("state/inventory.json");
    let saved = async {
        loop {
            let listed: Vec<Value> = std::fs::read(&state)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
                .and_then(|state| serde_json::from_value(state["clients"].clone()).ok())
                .unwrap_or_default();
            if listed.iter().any(|c| field(c, "ip") == "127.0.0.1") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), saved)
        .await
        .expect("the periodic save writes the device within a few intervals");
    first.signal("KILL").expect("SIGKILL");
    let status = first.wait_exit(EXIT_LIMIT).await.expect("exit");
    assert_eq!(status.code(), None, "killed by a signal: {status}");

    let mut second = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge again");
    let clients = ops::clients(second.admin()).await.expect("/clients");
    let entry = inventory_entry(&clients, "127.0.0.1");
    assert_eq!(entry["ehlo"], "scanner-mx3070", "{entry:#}");
    assert_eq!(entry["versions"]["TLSv1"], 1, "{entry:#}");
    second.signal("TERM").expect("SIGTERM");
    let status = second.wait_exit(EXIT_LIMIT).await.expect("exit");
    assert_eq!(status.code(), Some(0), "{}", second.output());
}

#[tokio::test]
async fn the_inventory_survives_a_restart() {
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    let mut first = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge");
    let tcp = connect(first.addr("smtp")).await.expect("connect");
    let run = ops::starttls_mail(tcp, "scanner-mx3070", Legacy::Tls10, &verify(dir.path()))
        .await
        .expect("a TLS 1.0 session");
    let peer = run.local.to_string();
    first
        .wait_event("session_closed", EXIT_LIMIT, |e| {
            is_audit(e, "session_closed") && field(e, "peer") == peer
        })
        .await
        .expect("session_closed");

    first.signal("TERM").expect("SIGTERM");
    let status = first.wait_exit(EXIT_LIMIT).await.expect("exit");
    assert_eq!(status.code(), Some(0), "{}", first.output());
    let state = dir.path().join("state/inventory.json");
    let saved: Value = serde_json::from_slice(
        &std::fs::read(&state).unwrap_or_else(|err| panic!("{}: {err}", state.display())),
    )
    .expect("the state file is JSON");
    let saved: Vec<Value> =
        serde_json::from_value(saved["clients"].clone()).expect("the state file lists clients");
    let entry = inventory_entry(&saved, "127.0.0.1");
    assert_eq!(entry["ehlo"], "scanner-mx3070", "{entry:#}");
    assert_eq!(entry["versions"]["TLSv1"], 1, "{entry:#}");
    assert!(
        !dir.path().join("state/inventory.tmp").exists(),
        "the atomic write left its temp file behind"
    );

    // Start again, admin endpoint on another port.
    let mut second = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge again");
    let clients = ops::clients(second.admin()).await.expect("/clients");
    let entry = inventory_entry(&clients, "127.0.0.1");
    assert_eq!(entry["connections"], 1, "{entry:#}");
    assert_eq!(entry["ciphers"][run.cipher.as_str()], 1, "{entry:#}");
    assert_eq!(entry["ehlo"], "scanner-mx3070", "{entry:#}");
    assert_eq!(entry["routes"], serde_json::json!(["smtp"]), "{entry:#}");

    // `inventory` with no admin endpoint to ask reads the state file.
    let mut offline = settings.clone();
    offline.admin = String::new();
    let cli_dir = tempfile::tempdir().expect("tempdir");
    let cli_config = cli_dir.path().join("offline.toml");
    std::fs::write(&cli_config, offline.toml(dir.path())).expect("write the CLI config");
    let out = ops::cli(&[
        "inventory",
        "--json",
        "--config",
        cli_config.to_str().expect("UTF-8 path"),
    ])
    .await
    .expect("tlsbridge inventory --json");
    assert!(out.success(), "{out:?}");
    assert!(
        out.stderr.contains("no running instance answered")
            && out.stderr.contains("inventory.json"),
        "{out:?}"
    );
    let listed: Vec<Value> = serde_json::from_str(&out.stdout).expect("JSON array");
    assert_eq!(
        listed, saved,
        "the state file fallback prints the saved inventory"
    );
    second.signal("TERM").expect("SIGTERM");
    let status = second.wait_exit(EXIT_LIMIT).await.expect("exit");
    assert_eq!(status.code(), Some(0), "{}", second.output());
}

#[tokio::test]
async fn sighup_reloads_the_device_certificate_and_keeps_open_sessions() {
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    let process = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge");
    let addr = process.addr("smtp");
    let verify = verify(dir.path());
    let (mut old, old_serial) = open_session(addr, &verify).await;

    // A new leaf from the same local CA, made by the CLI, then SIGHUP.
    let cert = dir.path().join("certs/tlsbridge.crt");
    let key = dir.path().join("certs/tlsbridge.key");
    std::fs::remove_file(&cert).expect("remove the certificate");
    std::fs::remove_file(&key).expect("remove the key");
    let config = dir.path().join("tlsbridge.toml");
    let init = ops::cli(&[
        "certs",
        "init",
        "--config",
        config.to_str().expect("UTF-8 path"),
    ])
    .await
    .expect("tlsbridge certs init");
    assert!(
        init.success() && init.stdout.contains("from the existing local CA"),
        "{init:?}"
    );
    process.signal("HUP").expect("SIGHUP");
    process
        .wait_event("`reloaded the device certificate`", EXIT_LIMIT, |e| {
            message(e) == "reloaded the device certificate"
        })
        .await
        .expect("reload log line");

    let (fresh, new_serial) = open_session(addr, &verify).await;
    assert_ne!(
        new_serial, old_serial,
        "a new connection after SIGHUP must see the new certificate"
    );
    finish_mail(fresh).await;
    // The old session still relays, and completes.
    old.expect("NOOP", 250)
        .await
        .expect("NOOP on the old session");
    finish_mail(old).await;

    // A broken replacement keeps the current certificate and says why.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").expect("break the cert");
    process.signal("HUP").expect("SIGHUP");
    let failed = process
        .wait_event("`reload failed`", EXIT_LIMIT, |e| {
            message(e) == "reload failed; keeping the previous device certificate"
        })
        .await
        .expect("reload failure log line");
    assert_eq!(field(&failed, "level"), "ERROR", "{failed}");
    assert!(
        !field(&failed, "error").is_empty(),
        "the failure names its reason: {failed}"
    );
    let (still, serial) = open_session(addr, &verify).await;
    assert_eq!(
        serial, new_serial,
        "after a failed reload the last good certificate stays"
    );
    finish_mail(still).await;
}

#[tokio::test]
async fn sigterm_drains_an_open_session_then_exits_zero() {
    let pki = Pki::new().expect("test PKI");
    let mut upstream = normal_upstream(&pki).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    settings.drain_timeout = Some("10s".to_string());
    let mut process = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge");
    let addr = process.addr("smtp");
    let admin = process.admin();
    ops::poll_status(admin, "/readyz", 200)
        .await
        .expect("ready before the signal");
    let (session, _) = open_session(addr, &verify(dir.path())).await;

    process.signal("TERM").expect("SIGTERM");
    let signalled = Instant::now();
    ops::poll_status(admin, "/readyz", 503)
        .await
        .expect("/readyz turns 503 while draining");
    let draining = process
        .wait_event("`draining open sessions`", EXIT_LIMIT, |e| {
            message(e) == "no longer accepting; draining open sessions"
        })
        .await
        .expect("drain log line");
    assert_eq!(number(&draining, "open"), Some(1), "{draining}");
    let health = ops::http(admin, "GET", "/healthz").await.expect("/healthz");
    assert_eq!(health.status, 200, "still alive while draining");
    let refused = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect attempt");
    assert!(
        refused.is_err(),
        "no new connection is accepted once draining started"
    );

    // The open session completes its transaction within the drain time.
    finish_mail(session).await;
    let report = upstream.next_session().await.expect("upstream session");
    assert_eq!(report.messages.len(), 1, "{report:?}");
    let status = process.wait_exit(EXIT_LIMIT).await.expect("exit");
    assert_eq!(status.code(), Some(0), "{}", process.output());
    assert!(
        signalled.elapsed() < Duration::from_secs(9),
        "the process waited out the drain time although the session had ended"
    );
    let events = process.events();
    assert!(
        events
            .iter()
            .any(|e| is_audit(e, "session_closed") && field(e, "outcome") == "ok"),
        "{}",
        process.output()
    );
    assert!(events.iter().any(|e| message(e) == "stopped"));
    assert!(dir.path().join("state/inventory.json").exists());
}

#[tokio::test]
async fn a_second_sigterm_during_the_drain_exits_at_once() {
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    settings.drain_timeout = Some("60s".to_string());
    let mut process = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge");
    let (_session, _) = open_session(process.addr("smtp"), &verify(dir.path())).await;

    process.signal("TERM").expect("first SIGTERM");
    process
        .wait_event("`draining open sessions`", EXIT_LIMIT, |e| {
            message(e) == "no longer accepting; draining open sessions"
        })
        .await
        .expect("drain log line");
    let second = Instant::now();
    process.signal("TERM").expect("second SIGTERM");
    let status = process
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exit long before the 60s drain time");
    // Documented behaviour: the second signal exits with status 1 (no inventory save).
    assert_eq!(status.code(), Some(1), "{}", process.output());
    assert!(second.elapsed() < Duration::from_secs(10));
    assert!(
        process
            .events()
            .iter()
            .any(|e| message(e) == "second signal: exiting now"),
        "{}",
        process.output()
    );
}

#[tokio::test]
async fn sigint_without_open_sessions_stops_at_once_and_saves() {
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    settings.drain_timeout = Some("60s".to_string());
    let mut process = Process::start(dir.path(), &settings)
        .await
        .expect("start tlsbridge");
    // Not right after `listening`: the handlers are installed only after that line (and after
    // /readyz turns 200); see `a_sigterm_right_after_listening_is_handled_gracefully`.
    ops::poll_status(process.admin(), "/readyz", 200)
        .await
        .expect("ready");
    process.signal("INT").expect("SIGINT");
    let status = process
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exit without waiting for the drain time");
    assert_eq!(status.code(), Some(0), "{}", process.output());
    let saved = std::fs::read_to_string(dir.path().join("state/inventory.json"))
        .expect("inventory saved at shutdown");
    let saved: Value = serde_json::from_str(&saved).expect("the state file is JSON");
    assert_eq!(saved["clients"], serde_json::json!([]), "{saved}");
}

/// The process announces `listening` (and /readyz turns 200) before it installs its SIGTERM and
/// SIGINT handlers: `signals::shutdown()` registers them only when `Server::run` first polls the
/// shutdown future, after the listeners are logged and readiness is set. A SIGTERM in that
/// window kills the process with the default disposition (no drain, no inventory save, exit by
/// signal instead of 0). Timing-dependent: with the bug it fails in a fraction of the attempts
/// (about one suite run in four here under load).
#[tokio::test]
async fn a_sigterm_right_after_listening_is_handled_gracefully() {
    let pki = Pki::new().expect("test PKI");
    let upstream = normal_upstream(&pki).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    settings.admin = String::new();
    for attempt in 0..20 {
        let mut process = Process::start(dir.path(), &settings)
            .await
            .expect("start tlsbridge");
        process.signal("TERM").expect("SIGTERM");
        let status = process.wait_exit(EXIT_LIMIT).await.expect("exit");
        assert_eq!(
            status.code(),
            Some(0),
            "attempt {attempt}: SIGTERM right after `listening` ended the process with {status}\n{}",
            process.output()
        );
    }
}
