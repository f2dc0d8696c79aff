//! `tlsbridge probe`: connects like the upstream leg (the config's `extra_roots` as trust roots,
//! TLS 1.2+, the protocol's STARTTLS) and reports; exit 0 only when the leg would succeed.

use std::path::PathBuf;

use crate::support::ca::Pki;
use crate::support::ops;
use crate::support::peers::Output;
use crate::support::proxy::{Route, Settings};
use crate::support::upstream::{
    dead_port, EchoMode, FakeUpstream, Service, SmtpBehaviour, UpstreamTls,
};

/// A config (admin disabled) whose only route `smtp` goes to `localhost:smtp_port`.
fn config(pki: &Pki, dir: &tempfile::TempDir, smtp_port: u16) -> PathBuf {
    let mut settings = Settings::new(pki, vec![Route::smtp("smtp", "starttls", smtp_port)]);
    settings.admin = String::new();
    settings.write(dir.path()).expect("write the config")
}

async fn probe(config: &std::path::Path, args: &[&str]) -> Output {
    let mut all = vec!["probe"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", config.to_str().expect("UTF-8 path")]);
    ops::cli(&all).await.expect("run tlsbridge probe")
}

fn assert_verified(out: &Output, host_port: &str) {
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!("target:       {host_port}")),
        "{out:?}"
    );
    let protocol = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("protocol:"))
        .map(str::trim);
    assert!(
        matches!(protocol, Some("TLSv1.2" | "TLSv1.3")),
        "protocol line: {protocol:?}\n{out:?}"
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("cipher:") && l.len() > "cipher:".len() + 4),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("subject: CN=localhost"),
        "the leaf's subject: {out:?}"
    );
    assert!(
        out.stdout.contains("CN=tlsbridge test CA"),
        "the issuer: {out:?}"
    );
    assert!(out.stdout.contains("verification: ok"), "{out:?}");
}

fn assert_failed(out: &Output, reason: &str) {
    assert_eq!(out.code(), Some(1), "{out:?}");
    let verdict = out
        .stdout
        .lines()
        .find(|l| l.starts_with("verification:"))
        .unwrap_or_else(|| panic!("no verification line: {out:?}"));
    assert!(
        verdict.starts_with("verification: FAILED") && verdict.ends_with(&format!("[{reason}]")),
        "expected a FAILED verdict with [{reason}]: {out:?}"
    );
    assert!(
        out.stderr.contains("would fail") && out.stderr.lines().count() == 1,
        "one-line reason on stderr: {out:?}"
    );
}

#[tokio::test]
async fn probe_reports_a_verified_starttls_upstream() {
    let pki = Pki::new().expect("test PKI");
    let upstream = FakeUpstream::smtp(SmtpBehaviour::Normal, &pki.localhost)
        .await
        .expect("fake upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&pki, &dir, upstream.port());

    let out = probe(&config, &[&upstream.host_port(), "--starttls", "smtp"]).await;
    assert_verified(&out, &upstream.host_port());
    assert!(out.stdout.contains("STARTTLS (smtp)"), "{out:?}");

    // A route name: its upstream, protocol and TLS mode.
    let out = probe(&config, &["smtp"]).await;
    assert_verified(&out, &upstream.host_port());
    assert!(out.stdout.contains("STARTTLS (smtp)"), "{out:?}");
}

#[tokio::test]
async fn probe_reports_a_verified_implicit_tls_upstream_of_each_version() {
    let pki = Pki::new().expect("test PKI");
    let dir = tempfile::tempdir().expect("tempdir");
    for (tls, version) in [
        (UpstreamTls::Tls12Only, "TLSv1.2"),
        (UpstreamTls::Tls13Only, "TLSv1.3"),
    ] {
        let upstream = FakeUpstream::start(Service::Echo(EchoMode::Streaming), tls, &pki.localhost)
            .await
            .expect("fake upstream");
        let config = config(&pki, &dir, upstream.port());
        let out = probe(&config, &[&upstream.host_port()]).await;
        assert_verified(&out, &upstream.host_port());
        assert!(out.stdout.contains("implicit TLS"), "{out:?}");
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("protocol:") && l.trim_end().ends_with(version)),
            "{version}: {out:?}"
        );
    }
}

#[tokio::test]
async fn probe_fails_on_an_unknown_ca_and_still_shows_the_chain() {
    let pki = Pki::new().expect("test PKI");
    let upstream = FakeUpstream::smtp(SmtpBehaviour::Normal, &pki.unknown_ca)
        .await
        .expect("fake upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&pki, &dir, upstream.port());
    let out = probe(&config, &[&upstream.host_port(), "--starttls", "smtp"]).await;
    assert_failed(&out, "certificate_invalid");
    assert!(
        out.stdout.contains("subject: CN=localhost") && out.stdout.contains("CN=unknown CA"),
        "the presented chain is shown even when it does not verify: {out:?}"
    );

    // The same through the route name.
    let out = probe(&config, &["smtp"]).await;
    assert_failed(&out, "certificate_invalid");
}

#[tokio::test]
async fn probe_fails_on_a_wrong_name() {
    let pki = Pki::new().expect("test PKI");
    let upstream = FakeUpstream::smtp(SmtpBehaviour::Normal, &pki.wrong_name)
        .await
        .expect("fake upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&pki, &dir, upstream.port());
    let out = probe(&config, &[&upstream.host_port(), "--starttls", "smtp"]).await;
    assert_failed(&out, "certificate_invalid");
}

#[tokio::test]
async fn probe_fails_on_a_tls_1_1_only_server() {
    let pki = Pki::new().expect("test PKI");
    let upstream = FakeUpstream::start(
        Service::Echo(EchoMode::Streaming),
        UpstreamTls::OpensslTls11Only,
        &pki.localhost,
    )
    .await
    .expect("fake upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&pki, &dir, upstream.port());
    let out = probe(&config, &[&upstream.host_port()]).await;
    assert_failed(&out, "protocol_version");
    assert!(!out.stdout.contains("protocol:"), "{out:?}");
}

#[tokio::test]
async fn probe_fails_when_the_server_offers_no_starttls() {
    let pki = Pki::new().expect("test PKI");
    let upstream = FakeUpstream::smtp(SmtpBehaviour::NoStartTls, &pki.localhost)
        .await
        .expect("fake upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&pki, &dir, upstream.port());
    let out = probe(&config, &[&upstream.host_port(), "--starttls", "smtp"]).await;
    assert_failed(&out, "no_starttls");
    assert!(
        out.stdout.contains("certificates: none received"),
        "{out:?}"
    );
}

#[tokio::test]
async fn probe_fails_on_a_refused_connection() {
    let pki = Pki::new().expect("test PKI");
    let port = dead_port().await.expect("a dead port");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&pki, &dir, port);
    let out = probe(&config, &[&format!("127.0.0.1:{port}")]).await;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout.contains("[connection_refused]"), "{out:?}");
}

#[tokio::test]
async fn probe_rejects_bad_usage_with_exit_2() {
    let pki = Pki::new().expect("test PKI");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&pki, &dir, 587);
    for args in [
        &["no-such-route"][..],
        &["localhost:notaport"],
        &["localhost:99999"],
        &["localhost:25", "--starttls", "ftp"],
    ] {
        let out = probe(&config, args).await;
        assert_eq!(out.code(), Some(2), "probe {args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "probe {args:?}: {out:?}");
        assert!(!out.stderr.trim().is_empty(), "probe {args:?}: {out:?}");
    }
    let out = ops::cli(&["probe", "--config", config.to_str().expect("UTF-8 path")])
        .await
        .expect("run tlsbridge probe");
    assert_eq!(out.code(), Some(2), "probe without a target: {out:?}");
}
