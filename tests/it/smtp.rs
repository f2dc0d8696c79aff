//! SMTP end to end: a legacy device (OpenSSL, TLS 1.0..1.2) -> tlsbridge -> a fake Microsoft 365
//! (rustls, TLS 1.2+, STARTTLS), all on 127.0.0.1:0 with real TLS on both legs.

use crate::support::ca::Pki;
use crate::support::device::{
    connect, smtp_session, tls_connect, DeviceMode, Legacy, Mail, SmtpClient, Verify, DEVICE_EHLO,
    DEVICE_TIMEOUT, RSA_KX_CIPHERS,
};
use crate::support::lines::{contains, contains_ci, preview, Close};
use crate::support::proxy::{Proxy, Route};
use crate::support::upstream::{
    FakeUpstream, Service, SessionReport, Smtp, SmtpBehaviour, UpstreamTls, INJECTED,
};
use tokio::io::AsyncWriteExt;

/// Asserts that nothing the device said reached the upstream, in plaintext or otherwise.
pub(crate) fn assert_no_device_bytes(report: &SessionReport) {
    assert!(
        report.unexpected_plaintext.is_empty(),
        "the upstream received plaintext outside the proxy's own dialog: {report:?}"
    );
    assert!(
        !contains_ci(&report.plaintext, DEVICE_EHLO.as_bytes()),
        "the device's EHLO reached the upstream in plaintext: {report:?}"
    );
    assert!(
        !contains_ci(&report.after_tls, DEVICE_EHLO.as_bytes()),
        "the device's EHLO reached the upstream: {report:?}"
    );
    assert!(
        report.messages.is_empty(),
        "the upstream accepted a message: {report:?}"
    );
}

/// Asserts a full session: byte-exact in both directions, one message equal to `mail`.
fn assert_delivered(report: &SessionReport, sent: &[u8], received: &[u8], mail: &Mail) {
    assert!(
        report.unexpected_plaintext.is_empty(),
        "unexpected plaintext at the upstream: {report:?}"
    );
    assert!(
        !contains_ci(&report.plaintext, DEVICE_EHLO.as_bytes()),
        "the device's plaintext EHLO reached the upstream: {report:?}"
    );
    assert!(
        report.after_tls == sent,
        "the upstream received other bytes than the device sent after TLS\n\
         upstream got: {}\ndevice sent:  {}",
        preview(&report.after_tls),
        preview(sent)
    );
    assert!(
        report.sent_after_tls == received,
        "the device received other bytes than the upstream sent\n\
         upstream sent: {}\ndevice got:    {}",
        preview(&report.sent_after_tls),
        preview(received)
    );
    assert_eq!(report.messages.len(), 1, "one message expected: {report:?}");
    let message = &report.messages[0];
    assert_eq!(message.mail_from, mail.from);
    assert_eq!(message.rcpt_to, mail.to);
    assert!(
        message.data == mail.body,
        "the message body changed on the way\nupstream: {}\ndevice:   {}",
        preview(&message.data),
        preview(&mail.body)
    );
}

/// The normal fake upstream plus a proxy with one route of each device mode to it.
async fn normal_setup(pki: &Pki) -> (FakeUpstream, Proxy) {
    let upstream = FakeUpstream::smtp(SmtpBehaviour::Normal, &pki.localhost)
        .await
        .expect("start the fake upstream");
    let proxy = three_routes(pki, upstream.port()).await;
    (upstream, proxy)
}

/// Routes `smtp` (starttls), `smtps` (tls) and `plain` to `localhost:port`.
async fn three_routes(pki: &Pki, port: u16) -> Proxy {
    Proxy::start(
        pki,
        &[
            Route::smtp("smtp", "starttls", port),
            Route::smtp("smtps", "tls", port),
            Route::smtp("plain", "plain", port),
        ],
    )
    .await
    .expect("start the proxy")
}

#[tokio::test]
async fn starttls_to_starttls_delivers_byte_exact() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;
    let mail = Mail::sample();

    let transcript = smtp_session(
        proxy.addr("smtp"),
        DeviceMode::Starttls(Legacy::Tls10),
        &proxy.verify(),
        &mail,
    )
    .await
    .expect("device session through the starttls route");
    let report = upstream.next_session().await.expect("upstream session");

    let banner = &transcript.greeting.lines[0];
    assert!(
        banner.starts_with("220 ") && banner.ends_with("ESMTP tlsbridge ready"),
        "the proxy's own banner expected, got {banner:?}"
    );
    let ehlo = transcript.plaintext_ehlo.as_ref().expect("plaintext EHLO");
    assert_eq!(
        ehlo.lines.last().map(String::as_str),
        Some("250 STARTTLS"),
        "EHLO reply {ehlo:?}"
    );
    assert_eq!(transcript.tls.as_ref().map(|t| t.0.as_str()), Some("TLSv1"));
    assert!(
        matches!(report.tls_version.as_deref(), Some("TLSv1.2" | "TLSv1.3")),
        "upstream leg must be TLS 1.2+: {report:?}"
    );
    assert_delivered(
        &report,
        &transcript.sent_relayed,
        &transcript.received_relayed,
        &mail,
    );
    assert_eq!(
        transcript.close,
        Close::Clean,
        "the upstream closed cleanly after 221: the device must get close_notify"
    );
    proxy.stop().await.expect("the proxy shuts down cleanly");
}

#[tokio::test]
async fn tls_to_starttls_delivers_byte_exact() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;
    let mail = Mail::sample();

    let transcript = smtp_session(
        proxy.addr("smtps"),
        DeviceMode::Tls(Legacy::Tls10),
        &proxy.verify(),
        &mail,
    )
    .await
    .expect("device session through the implicit TLS route");
    let report = upstream.next_session().await.expect("upstream session");

    assert_eq!(
        transcript.greeting.text(),
        OWN_BANNER,
        "the device gets tlsbridge's own banner, never the upstream's pre-TLS one"
    );
    // The device received tlsbridge's banner, then exactly what the upstream sent inside TLS.
    let replies = transcript
        .received_relayed
        .strip_prefix(OWN_BANNER.as_bytes())
        .expect("the greeting comes first");
    assert_delivered(&report, &transcript.sent_relayed, replies, &mail);
    assert_eq!(transcript.close, Close::Clean);
}

/// tlsbridge's own greeting, shown in place of a STARTTLS upstream's pre-TLS banner.
const OWN_BANNER: &str = "220 localhost ESMTP tlsbridge ready\r\n";

#[tokio::test]
async fn plain_to_starttls_delivers_byte_exact() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;
    let mail = Mail::sample();

    let transcript = smtp_session(
        proxy.addr("plain"),
        DeviceMode::Plain,
        &proxy.verify(),
        &mail,
    )
    .await
    .expect("device session through the plain route");
    let report = upstream.next_session().await.expect("upstream session");

    assert_eq!(transcript.greeting.text(), OWN_BANNER);
    let replies = transcript
        .received_relayed
        .strip_prefix(OWN_BANNER.as_bytes())
        .expect("the greeting comes first");
    assert!(
        report.tls_established(),
        "upstream leg without TLS: {report:?}"
    );
    assert_delivered(&report, &transcript.sent_relayed, replies, &mail);
    assert_eq!(transcript.close, Close::Clean);
}

#[tokio::test]
async fn tls_route_never_replays_a_multiline_pre_tls_banner() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let banner = "220-fake.m365 Microsoft ESMTP MAIL Service ready\r\n\
                  220-second line of the banner\r\n\
                  220 fake.m365 ESMTP\r\n";
    let mut upstream = FakeUpstream::start(
        Service::Smtp(Smtp {
            banner: banner.to_string(),
            behaviour: SmtpBehaviour::Normal,
        }),
        UpstreamTls::Modern,
        &pki.localhost,
    )
    .await
    .expect("start the fake upstream");
    let proxy = three_routes(&pki, upstream.port()).await;
    let mail = Mail::sample();

    for (route, mode) in [
        ("smtps", DeviceMode::Tls(Legacy::Tls12)),
        ("plain", DeviceMode::Plain),
    ] {
        let transcript = smtp_session(proxy.addr(route), mode, &proxy.verify(), &mail)
            .await
            .unwrap_or_else(|err| panic!("device session on {route}: {err:#}"));
        assert_eq!(
            transcript.greeting.text(),
            OWN_BANNER,
            "greeting on {route}"
        );
        assert!(
            !contains(&transcript.received_relayed, b"second line of the banner"),
            "{route}: the pre-TLS banner reached the device"
        );
        let report = upstream.next_session().await.expect("upstream session");
        assert_eq!(report.messages.len(), 1, "{route}: {report:?}");
    }
}

/// One device profile through the starttls and the implicit TLS routes.
async fn legacy_profile_connects(legacy: Legacy) {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;
    let mail = Mail::sample();

    for (route, mode) in [
        ("smtp", DeviceMode::Starttls(legacy)),
        ("smtps", DeviceMode::Tls(legacy)),
    ] {
        let transcript = smtp_session(proxy.addr(route), mode, &proxy.verify(), &mail)
            .await
            .unwrap_or_else(|err| panic!("{legacy:?} device on route {route}: {err:#}"));
        let (version, cipher) = transcript.tls.clone().expect("device TLS info");
        assert_eq!(version, legacy.version_name(), "{legacy:?} on {route}");
        if legacy == Legacy::Tls12RsaKx {
            assert!(
                RSA_KX_CIPHERS.split(':').any(|c| c == cipher),
                "RSA key exchange suite expected, got {cipher}"
            );
        }
        let report = upstream.next_session().await.expect("upstream session");
        assert_eq!(
            report.messages.len(),
            1,
            "{legacy:?} on {route}: {report:?}"
        );
        assert!(report.messages[0].data == mail.body);
    }
}

#[tokio::test]
async fn device_tls10_connects() {
    legacy_profile_connects(Legacy::Tls10).await;
}

#[tokio::test]
async fn device_tls11_connects() {
    legacy_profile_connects(Legacy::Tls11).await;
}

#[tokio::test]
async fn device_tls12_connects() {
    legacy_profile_connects(Legacy::Tls12).await;
}

#[tokio::test]
async fn device_tls12_rsa_key_exchange_only_connects() {
    legacy_profile_connects(Legacy::Tls12RsaKx).await;
}

#[tokio::test]
async fn device_tls13_connects() {
    legacy_profile_connects(Legacy::Tls13).await;
}

#[tokio::test]
async fn device_without_verification_connects() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;
    let mail = Mail::sample();
    smtp_session(
        proxy.addr("smtp"),
        DeviceMode::Starttls(Legacy::Tls10),
        &Verify::None,
        &mail,
    )
    .await
    .expect("device session without verification");
    let report = upstream.next_session().await.expect("upstream session");
    assert_eq!(report.messages.len(), 1, "{report:?}");
}

/// Both upstream protocol versions the proxy must speak.
async fn upstream_version(tls: UpstreamTls, expected: &str) {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let mut upstream = FakeUpstream::start(Service::Smtp(Smtp::normal()), tls, &pki.localhost)
        .await
        .expect("start the fake upstream");
    let proxy = three_routes(&pki, upstream.port()).await;
    let mail = Mail::sample();
    let transcript = smtp_session(
        proxy.addr("smtp"),
        DeviceMode::Starttls(Legacy::Tls10),
        &proxy.verify(),
        &mail,
    )
    .await
    .expect("device session");
    let report = upstream.next_session().await.expect("upstream session");
    assert_eq!(report.tls_version.as_deref(), Some(expected), "{report:?}");
    assert_delivered(
        &report,
        &transcript.sent_relayed,
        &transcript.received_relayed,
        &mail,
    );
}

#[tokio::test]
async fn upstream_tls12_only() {
    upstream_version(UpstreamTls::Tls12Only, "TLSv1.2").await;
}

#[tokio::test]
async fn upstream_tls13_only() {
    upstream_version(UpstreamTls::Tls13Only, "TLSv1.3").await;
}

#[tokio::test]
async fn concurrent_devices_all_deliver() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;
    const DEVICES: usize = 8;
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let addr = proxy.addr(if i % 2 == 0 { "smtp" } else { "smtps" });
        let verify = proxy.verify();
        let mut mail = Mail::sample();
        mail.body
            .extend_from_slice(format!("device number {i}\r\n").as_bytes());
        tasks.push(tokio::spawn(async move {
            let mode = if i % 2 == 0 {
                DeviceMode::Starttls(Legacy::Tls10)
            } else {
                DeviceMode::Tls(Legacy::Tls11)
            };
            smtp_session(addr, mode, &verify, &mail)
                .await
                .map(|_| mail.body)
        }));
    }
    let mut sent = Vec::new();
    for task in tasks {
        let body = task
            .await
            .expect("device task")
            .unwrap_or_else(|err| panic!("concurrent device: {err:#}"));
        sent.push(body);
    }
    let mut received = Vec::new();
    for _ in 0..DEVICES {
        let report = upstream.next_session().await.expect("upstream session");
        assert_eq!(report.messages.len(), 1, "{report:?}");
        received.push(report.messages[0].data.clone());
    }
    sent.sort();
    received.sort();
    assert!(sent == received, "every device's message arrives intact");
}

// ---------------------------------------------------------------------------------------------
// Fail closed: the table of upstream failures is in `fail_closed`.

/// The injected reply must never reach a device either, on any route.
#[tokio::test]
async fn upstream_injection_never_reaches_the_device() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = FakeUpstream::smtp(SmtpBehaviour::InjectAfterReady, &pki.localhost)
        .await
        .expect("start the fake upstream");
    let proxy = three_routes(&pki, upstream.port()).await;
    let tcp = connect(proxy.addr("smtps")).await.expect("connect smtps");
    let stream = tls_connect(tcp, Legacy::Tls12, &proxy.verify(), "localhost")
        .await
        .expect("device handshake");
    let mut device = SmtpClient::new(stream);
    let (all, _) = device.read_to_close().await.expect("the proxy closes");
    assert!(
        !contains(&all, INJECTED),
        "injected bytes reached the device: {}",
        preview(&all)
    );
}

// ---------------------------------------------------------------------------------------------
// The device side of the dialog.

/// Bytes pipelined behind STARTTLS close the session at once: no go-ahead, no TLS, and the
/// bytes never reach the upstream.
#[tokio::test]
async fn device_pipelined_bytes_after_starttls_close_the_session() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;

    let mut device = SmtpClient::connect(proxy.addr("smtp"))
        .await
        .expect("connect");
    device.greeting().await.expect("banner");
    device
        .expect(&format!("EHLO {DEVICE_EHLO}"), 250)
        .await
        .expect("EHLO");
    device
        .conn
        .write_all(b"STARTTLS\r\nRSET\r\n")
        .await
        .expect("write STARTTLS and RSET in one segment");
    let (rest, _) = device.read_to_close().await.expect("closed");
    assert!(
        !contains(&rest, b"220"),
        "no go-ahead after injected bytes: {}",
        String::from_utf8_lossy(&rest)
    );
    for report in upstream.settle().await.expect("upstream sessions") {
        assert!(
            !contains(&report.after_tls, b"RSET") && !contains(&report.plaintext, b"RSET"),
            "the pipelined RSET reached the upstream: {report:?}"
        );
    }
}

#[tokio::test]
async fn mail_before_starttls_gets_530() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;
    let mail = Mail::sample();

    let mut device = SmtpClient::connect(proxy.addr("smtp"))
        .await
        .expect("connect");
    device.greeting().await.expect("banner");
    device
        .expect(&format!("EHLO {DEVICE_EHLO}"), 250)
        .await
        .expect("EHLO");
    let reply = device
        .command("MAIL FROM:<too-early@device.test>")
        .await
        .expect("reply to MAIL");
    assert_eq!(
        reply.lines,
        vec!["530 5.7.0 Must issue a STARTTLS command first".to_string()]
    );
    device.expect("NOOP", 250).await.expect("NOOP before TLS");
    device.expect("RSET", 250).await.expect("RSET before TLS");
    device.expect("STARTTLS", 220).await.expect("STARTTLS");
    let mut tls = device
        .start_tls(Legacy::Tls10, &proxy.verify())
        .await
        .expect("TLS");
    tls.send_mail(&mail).await.expect("mail after TLS");
    let (_, close) = tls.read_to_close().await.expect("close");
    assert_eq!(close, Close::Clean);
    let (sent, received) = (tls.conn.sent.clone(), tls.conn.received.clone());
    drop(tls);

    let report = upstream.next_session().await.expect("upstream session");
    assert!(
        !contains_ci(&report.plaintext, b"too-early")
            && !contains_ci(&report.after_tls, b"too-early"),
        "the early MAIL reached the upstream: {report:?}"
    );
    assert_delivered(&report, &sent, &received, &mail);
}

#[tokio::test]
async fn quit_before_starttls_gets_221() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;
    let mut device = SmtpClient::connect(proxy.addr("smtp"))
        .await
        .expect("connect");
    device.greeting().await.expect("banner");
    device.expect("QUIT", 221).await.expect("QUIT");
    let (_, close) = device.read_to_close().await.expect("close after QUIT");
    assert_eq!(close, Close::Clean);
    drop(device);
    // The proxy may cancel its upstream leg before it connects: check what did arrive.
    for report in upstream.settle().await.expect("upstream sessions end") {
        assert_no_device_bytes(&report);
    }
}

#[tokio::test]
async fn garbage_instead_of_client_hello_is_closed() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;
    let mut tcp = connect(proxy.addr("smtps")).await.expect("connect");
    tcp.write_all(b"EHLO not-a-client-hello\r\nGARBAGE GARBAGE GARBAGE\r\n")
        .await
        .expect("write garbage");
    let mut device = SmtpClient::new(tcp);
    // Bounded by DEVICE_TIMEOUT: a proxy that waits for more would fail here, not hang.
    let (_, close) = device
        .read_to_close()
        .await
        .unwrap_or_else(|err| panic!("the proxy must close within {DEVICE_TIMEOUT:?}: {err:#}"));
    assert!(
        matches!(close, Close::Clean | Close::Reset),
        "closed, got {close:?}"
    );
    drop(device);
    for report in upstream.settle().await.expect("upstream sessions end") {
        assert!(
            !contains_ci(&report.after_tls, b"GARBAGE")
                && !contains_ci(&report.plaintext, b"GARBAGE"),
            "{report:?}"
        );
        assert_no_device_bytes(&report);
    }
}

#[tokio::test]
async fn garbage_after_starttls_is_closed() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = normal_setup(&pki).await;
    let mut device = SmtpClient::connect(proxy.addr("smtp"))
        .await
        .expect("connect");
    device.greeting().await.expect("banner");
    device
        .expect(&format!("EHLO {DEVICE_EHLO}"), 250)
        .await
        .expect("EHLO");
    device.expect("STARTTLS", 220).await.expect("STARTTLS");
    device
        .conn
        .write_all(b"MAIL FROM:<garbage@device.test>\r\n")
        .await
        .expect("write plaintext where TLS should start");
    let (_, close) = device
        .read_to_close()
        .await
        .unwrap_or_else(|err| panic!("the proxy must close within {DEVICE_TIMEOUT:?}: {err:#}"));
    assert!(
        matches!(close, Close::Clean | Close::Reset),
        "closed, got {close:?}"
    );
    drop(device);
    for report in upstream.settle().await.expect("upstream sessions end") {
        assert!(
            !contains_ci(&report.after_tls, b"garbage@")
                && !contains_ci(&report.plaintext, b"garbage@"),
            "{report:?}"
        );
        assert_no_device_bytes(&report);
    }
}
