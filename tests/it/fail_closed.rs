//! Fail closed, as one table: whatever goes wrong upstream, a device of every mode gets its
//! protocol's transient error and then a clean close, never a silent one, and nothing it says
//! reaches the upstream.
//!
//! Each row is an upstream behaviour for one protocol: the fake upstream (or none: a released
//! port), the route's upstream leg, and the check that the upstream really failed where the row
//! means it to (so a passing row cannot come from a different failure). Every row runs a device
//! of each mode against its own route to that upstream and expects:
//!
//! | protocol | `starttls` device: its dialog, then to STARTTLS | `tls`, `plain` device: greeting |
//! |----------|-------------------------------------------------|---------------------------------|
//! | smtp     | `454 4.7.0`                                     | `421 4.4.0`                     |
//! | imap     | `* BYE` and a tagged `NO`                       | `* BYE`                         |
//! | pop3     | `-ERR` (to STLS)                                | `-ERR`                          |
//!
//! then nothing more (in particular none of the upstream's injected bytes) and a clean close;
//! and at the upstream, for each device: none of the device's bytes and no TLS session carrying
//! anything.

use crate::imap_pop3::{assert_no_early_bytes, imap_pre_tls, pop3_pre_tls, ImapClient, Pop3Client};
use crate::smtp::assert_no_device_bytes;
use crate::support::ca::Pki;
use crate::support::device::{connect, tls_connect, Legacy, Reply, SmtpClient, DEVICE_EHLO};
use crate::support::lines::{contains, contains_ci, preview, Close};
use crate::support::proxy::{Proxy, Route};
use crate::support::upstream::{
    dead_port, FakeUpstream, MailBehaviour, Mailbox, Service, SessionReport, Smtp, SmtpBehaviour,
    UpstreamTls, IMAP_INJECTED, INJECTED, POP3_INJECTED,
};

#[derive(Clone, Copy, Debug)]
enum Protocol {
    Smtp,
    Imap,
    Pop3,
}

/// The upstream's certificate.
#[derive(Clone, Copy, Debug)]
enum Cert {
    /// Valid for "localhost", from the CA the proxy trusts.
    Localhost,
    /// Valid for "localhost", from a CA the proxy does not trust.
    UnknownCa,
    /// From the trusted CA, for another name.
    WrongName,
}

/// What listens at the route's upstream address.
enum Upstream {
    /// Nothing: a port just released.
    Down,
    /// A fake upstream serving `Service` over `UpstreamTls` with `Cert`.
    Fake(Service, UpstreamTls, Cert),
}

/// One row of the table.
struct Scenario {
    protocol: Protocol,
    upstream: Upstream,
    /// The routes' `upstream_tls`.
    upstream_tls: &'static str,
    /// Where the upstream saw the failure happen.
    check: fn(&SessionReport),
}

fn smtp(behaviour: SmtpBehaviour) -> Service {
    Service::Smtp(Smtp::new(behaviour))
}

fn imap(behaviour: MailBehaviour) -> Service {
    Service::Mailbox(Mailbox::imap_starttls(behaviour))
}

fn pop3(behaviour: MailBehaviour) -> Service {
    Service::Mailbox(Mailbox::pop3_stls(behaviour))
}

/// The table: one test per row.
macro_rules! scenarios {
    ($($name:ident: $protocol:ident, $upstream:expr, $upstream_tls:literal, $check:expr;)*) => {
        $(
            #[tokio::test]
            async fn $name() {
                fails_closed(Scenario {
                    protocol: Protocol::$protocol,
                    upstream: $upstream,
                    upstream_tls: $upstream_tls,
                    check: $check,
                })
                .await;
            }
        )*
    };
}

use Cert::{Localhost, UnknownCa, WrongName};
use Upstream::{Down, Fake};

scenarios! {
    smtp_unknown_ca: Smtp,
        Fake(smtp(SmtpBehaviour::Normal), UpstreamTls::Modern, UnknownCa),
        "starttls", handshake_refused;
    smtp_wrong_name: Smtp,
        Fake(smtp(SmtpBehaviour::Normal), UpstreamTls::Modern, WrongName),
        "starttls", handshake_refused;
    smtp_tls11_only_upstream: Smtp,
        Fake(smtp(SmtpBehaviour::Normal), UpstreamTls::OpensslTls11Only, Localhost),
        "starttls", handshake_refused;
    smtp_without_starttls: Smtp,
        Fake(smtp(SmtpBehaviour::NoStartTls), UpstreamTls::Modern, Localhost),
        "starttls", no_tls;
    smtp_starttls_refused_with_454: Smtp,
        Fake(smtp(SmtpBehaviour::Refuse454), UpstreamTls::Modern, Localhost),
        "starttls", starttls_refused;
    smtp_bytes_injected_after_upstream_220: Smtp,
        Fake(smtp(SmtpBehaviour::InjectAfterReady), UpstreamTls::Modern, Localhost),
        "starttls", starttls_accepted_no_tls;
    smtp_upstream_down: Smtp, Down, "starttls", |_| {};

    imap_unknown_ca: Imap,
        Fake(Service::Imap, UpstreamTls::Modern, UnknownCa),
        "tls", certificate_refused;
    imap_unknown_ca_after_starttls: Imap,
        Fake(imap(MailBehaviour::Normal), UpstreamTls::Modern, UnknownCa),
        "starttls", certificate_refused_after_starttls;
    imap_upstream_down: Imap, Down, "tls", |_| {};
    imap_without_starttls: Imap,
        Fake(imap(MailBehaviour::NoStartTls), UpstreamTls::Modern, Localhost),
        "starttls", starttls_not_attempted;
    imap_starttls_refused: Imap,
        Fake(imap(MailBehaviour::Refuse), UpstreamTls::Modern, Localhost),
        "starttls", starttls_asked;
    imap_preauth_greeting_before_starttls: Imap,
        Fake(imap(MailBehaviour::Preauth), UpstreamTls::Modern, Localhost),
        "starttls", nothing_after_preauth;
    imap_bytes_injected_after_the_tagged_ok: Imap,
        Fake(imap(MailBehaviour::InjectAfterReady), UpstreamTls::Modern, Localhost),
        "starttls", starttls_asked;

    pop3_unknown_ca: Pop3,
        Fake(Service::Pop3, UpstreamTls::Modern, UnknownCa),
        "tls", certificate_refused;
    pop3_unknown_ca_after_stls: Pop3,
        Fake(pop3(MailBehaviour::Normal), UpstreamTls::Modern, UnknownCa),
        "starttls", certificate_refused_after_starttls;
    pop3_upstream_down: Pop3, Down, "tls", |_| {};
    pop3_without_stls: Pop3,
        Fake(pop3(MailBehaviour::NoStartTls), UpstreamTls::Modern, Localhost),
        "starttls", starttls_not_attempted;
    pop3_stls_refused: Pop3,
        Fake(pop3(MailBehaviour::Refuse), UpstreamTls::Modern, Localhost),
        "starttls", starttls_asked;
    pop3_bytes_injected_after_the_ok: Pop3,
        Fake(pop3(MailBehaviour::InjectAfterReady), UpstreamTls::Modern, Localhost),
        "starttls", starttls_asked;
}

/// The device modes, each with its own route.
const MODES: [&str; 3] = ["starttls", "tls", "plain"];

/// Runs one row: a route per device mode to the row's upstream, one device on each.
async fn fails_closed(scenario: Scenario) {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let mut upstream = match scenario.upstream {
        Down => None,
        Fake(service, tls, cert) => {
            let leaf = match cert {
                Localhost => &pki.localhost,
                UnknownCa => &pki.unknown_ca,
                WrongName => &pki.wrong_name,
            };
            let fake = FakeUpstream::start(service, tls, leaf)
                .await
                .expect("start the fake upstream");
            Some(fake)
        }
    };
    let port = match &upstream {
        Some(fake) => fake.port(),
        None => dead_port().await.expect("a released port"),
    };
    let (protocol, injected) = match scenario.protocol {
        Protocol::Smtp => ("smtp", INJECTED),
        Protocol::Imap => ("imap", IMAP_INJECTED),
        Protocol::Pop3 => ("pop3", POP3_INJECTED),
    };
    let target = format!("localhost:{port}");
    let routes: Vec<Route> = MODES
        .iter()
        .map(|mode| Route::new(mode, protocol, mode, &target, scenario.upstream_tls))
        .collect();
    let proxy = Proxy::start(&pki, &routes).await.expect("start the proxy");

    for mode in MODES {
        let what = format!("{protocol} {mode} device");
        let (rest, close) = match scenario.protocol {
            Protocol::Smtp => smtp_device(&proxy, mode).await,
            Protocol::Imap => imap_device(&proxy, mode).await,
            Protocol::Pop3 => pop3_device(&proxy, mode).await,
        };
        assert!(
            rest.is_empty(),
            "{what}: nothing after the error: {}",
            preview(&rest)
        );
        assert_eq!(close, Close::Clean, "{what}: then a clean close");
        assert!(
            !contains(&rest, injected),
            "{what}: injected upstream bytes reached the device"
        );
        if let Some(upstream) = upstream.as_mut() {
            let report = upstream.next_session().await.expect("upstream session");
            match scenario.protocol {
                Protocol::Smtp => assert_no_device_bytes(&report),
                Protocol::Imap | Protocol::Pop3 => assert_no_early_bytes(&report),
            }
            assert!(
                report.after_tls.is_empty() && !report.tls_established(),
                "{what}: no TLS session may carry anything: {report:?}"
            );
            (scenario.check)(&report);
        }
    }
}

/// The device side on route `mode`: checks the error reply, returns what followed until the
/// close. Likewise [`imap_device`] and [`pop3_device`].
async fn smtp_device(proxy: &Proxy, mode: &str) -> (Vec<u8>, Close) {
    let addr = proxy.addr(mode);
    match mode {
        "starttls" => {
            // The proxy's own dialog, then 454 in answer to STARTTLS.
            let mut device = SmtpClient::connect(addr)
                .await
                .expect("connect to the starttls route");
            device.greeting().await.expect("proxy banner");
            device
                .expect(&format!("EHLO {DEVICE_EHLO}"), 250)
                .await
                .expect("EHLO");
            let reply = device.command("STARTTLS").await.expect("reply to STARTTLS");
            assert!(
                reply.code == 454 && reply.lines[0].starts_with("454 4.7.0"),
                "STARTTLS must get 454 4.7.0 when the upstream fails, got {reply:?}"
            );
            device.read_to_close().await.expect("the proxy closes")
        }
        "tls" => {
            let tcp = connect(addr).await.expect("connect smtps");
            let stream = tls_connect(tcp, Legacy::Tls10, &proxy.verify(), "localhost")
                .await
                .expect("device handshake on the tls route");
            let mut device = SmtpClient::new(stream);
            let reply = device
                .read_reply()
                .await
                .expect("greeting on the tls route");
            assert_smtp_421(mode, &reply);
            device.read_to_close().await.expect("the proxy closes")
        }
        _ => {
            let mut device = SmtpClient::connect(addr)
                .await
                .expect("connect to the plain route");
            let reply = device
                .read_reply()
                .await
                .expect("greeting on the plain route");
            assert_smtp_421(mode, &reply);
            device.read_to_close().await.expect("the proxy closes")
        }
    }
}

/// An SMTP device that expects a greeting gets `421 4.4.0` instead.
fn assert_smtp_421(mode: &str, reply: &Reply) {
    assert!(
        reply.code == 421 && reply.lines[0].starts_with("421 4.4.0"),
        "a {mode} device must get 421 4.4.0 when the upstream fails, got {reply:?}"
    );
}

async fn imap_device(proxy: &Proxy, mode: &str) -> (Vec<u8>, Close) {
    let addr = proxy.addr(mode);
    match mode {
        "starttls" => {
            // The proxy's dialog, then `* BYE` and a tagged NO in answer to STARTTLS.
            let mut device = ImapClient::new(connect(addr).await.expect("connect"));
            let start = imap_pre_tls(&mut device, "a4")
                .await
                .expect("pre-TLS dialog and a response to STARTTLS");
            assert!(
                start.untagged.len() == 1
                    && start.untagged[0].starts_with("* BYE ")
                    && start.status.starts_with("NO "),
                "STARTTLS must get `* BYE` and a tagged NO when the upstream fails: {start:?}"
            );
            device.conn.read_to_close().await.expect("the proxy closes")
        }
        "tls" => {
            let stream = tls_connect(
                connect(addr).await.expect("connect"),
                Legacy::Tls10,
                &proxy.verify(),
                "localhost",
            )
            .await
            .expect("device handshake on the tls route");
            let mut device = ImapClient::new(stream);
            let first = device.line().await.expect("a greeting, not a silent close");
            assert!(first.starts_with("* BYE "), "tls device: {first:?}");
            device.conn.read_to_close().await.expect("the proxy closes")
        }
        _ => {
            let mut device = ImapClient::new(connect(addr).await.expect("connect"));
            let first = device.line().await.expect("a greeting, not a silent close");
            assert!(first.starts_with("* BYE "), "plain device: {first:?}");
            device.conn.read_to_close().await.expect("the proxy closes")
        }
    }
}

async fn pop3_device(proxy: &Proxy, mode: &str) -> (Vec<u8>, Close) {
    let addr = proxy.addr(mode);
    match mode {
        "starttls" => {
            let mut device = Pop3Client::new(connect(addr).await.expect("connect"));
            let status = pop3_pre_tls(&mut device)
                .await
                .expect("pre-TLS dialog and a reply to STLS");
            assert!(
                status.starts_with("-ERR "),
                "STLS must get -ERR when the upstream fails: {status:?}"
            );
            device.conn.read_to_close().await.expect("the proxy closes")
        }
        "tls" => {
            let stream = tls_connect(
                connect(addr).await.expect("connect"),
                Legacy::Tls10,
                &proxy.verify(),
                "localhost",
            )
            .await
            .expect("device handshake on the tls route");
            let mut device = Pop3Client::new(stream);
            let first = device.line().await.expect("a greeting, not a silent close");
            assert!(first.starts_with("-ERR "), "tls device: {first:?}");
            device.conn.read_to_close().await.expect("the proxy closes")
        }
        _ => {
            let mut device = Pop3Client::new(connect(addr).await.expect("connect"));
            let first = device.line().await.expect("a greeting, not a silent close");
            assert!(first.starts_with("-ERR "), "plain device: {first:?}");
            device.conn.read_to_close().await.expect("the proxy closes")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Where the upstream saw the failure.

/// SMTP: the proxy got as far as the TLS handshake and refused it.
fn handshake_refused(report: &SessionReport) {
    assert!(
        contains(&report.plaintext, b"STARTTLS\r\n") && report.tls_error.is_some(),
        "the proxy should have failed the upstream TLS handshake: {report:?}"
    );
    assert!(!report.tls_established(), "{report:?}");
}

/// SMTP: the proxy never got a TLS session.
fn no_tls(report: &SessionReport) {
    assert!(!report.tls_established(), "{report:?}");
}

/// SMTP: the proxy asked for STARTTLS and got the refusal.
fn starttls_refused(report: &SessionReport) {
    assert!(
        contains(&report.plaintext, b"STARTTLS\r\n"),
        "the proxy should have tried STARTTLS: {report:?}"
    );
    assert!(!report.tls_established(), "{report:?}");
}

/// SMTP: STARTTLS was accepted (with injected bytes behind the 220), and the proxy then refused
/// to start TLS on that stream.
fn starttls_accepted_no_tls(report: &SessionReport) {
    assert!(
        contains(&report.plaintext, b"STARTTLS\r\n"),
        "the proxy should have sent STARTTLS: {report:?}"
    );
    assert!(
        !report.tls_established(),
        "the proxy went on with TLS after injected bytes: {report:?}"
    );
}

/// IMAP/POP3: the proxy refused the upstream's certificate during the handshake.
fn certificate_refused(report: &SessionReport) {
    assert!(
        report.tls_error.is_some() && report.sni.as_deref() == Some("localhost"),
        "the proxy should have failed the upstream TLS handshake: {report:?}"
    );
}

/// Same, after a STARTTLS dialog.
fn certificate_refused_after_starttls(report: &SessionReport) {
    certificate_refused(report);
    assert!(
        contains(&report.plaintext, b"STARTTLS\r\n") || contains(&report.plaintext, b"STLS\r\n"),
        "{report:?}"
    );
}

/// The upstream offered no STARTTLS/STLS: the proxy must not even try it.
fn starttls_not_attempted(report: &SessionReport) {
    assert!(
        contains_ci(&report.plaintext, b"CAPA"),
        "the proxy should have asked for capabilities: {report:?}"
    );
    assert!(
        !contains(&report.plaintext, b"STARTTLS") && !contains(&report.plaintext, b"STLS"),
        "the proxy asked for STARTTLS that was not offered: {report:?}"
    );
}

/// The proxy asked for STARTTLS/STLS and was refused (or went no further after the go-ahead).
fn starttls_asked(report: &SessionReport) {
    assert!(
        contains(&report.plaintext, b"STARTTLS\r\n") || contains(&report.plaintext, b"STLS\r\n"),
        "the proxy should have asked for STARTTLS: {report:?}"
    );
}

/// After a PREAUTH greeting the session is authenticated in plaintext: nothing may be sent.
fn nothing_after_preauth(report: &SessionReport) {
    assert!(
        report.plaintext.is_empty(),
        "the proxy sent commands into a PREAUTH (plaintext, authenticated) session: {report:?}"
    );
}
