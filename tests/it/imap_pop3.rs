//! IMAP and POP3 end to end: a legacy device (OpenSSL pinned to TLS 1.0) -> tlsbridge -> a fake
//! Microsoft 365 mailbox (rustls, TLS 1.2+, implicit TLS or STARTTLS/STLS), all on 127.0.0.1:0
//! with real TLS on both legs. Every route combination, the greeting rule, the pre-TLS dialog,
//! fail-closed behaviour and STARTTLS injection in both directions.

use std::net::SocketAddr;

use crate::support::ca::Pki;
use crate::support::device::{connect, tls_connect, DeviceMode, Legacy, Verify, DEVICE_TIMEOUT};
use crate::support::lines::{contains, contains_ci, preview, Close, Conn, EndOfStream};
use crate::support::proxy::{Proxy, Route};
use crate::support::upstream::{
    pop3_retr_body, FakeUpstream, MailBehaviour, Mailbox, Service, SessionReport, UpstreamTls,
    IMAP_CAPABILITY, IMAP_STARTTLS_GREETING, MAILBOX_MESSAGE, POP3_TLS_GREETING,
};
use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// What the proxy greets a STARTTLS IMAP device with, up to its server name.
const PROXY_IMAP_GREETING: &str = "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ";
/// The proxy's answer to CAPABILITY before TLS.
const PROXY_IMAP_CAPABILITY: &str = "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n";

/// Credentials a device sends before TLS: they must never reach the upstream.
const EARLY_USER: &str = "early-user";
const EARLY_SECRET: &str = "early-secret";
/// base64("\0early-user\0early-secret"), an AUTHENTICATE PLAIN initial response.
const EARLY_SASL: &str = "AGVhcmx5LXVzZXIAZWFybHktc2VjcmV0";

/// An implicit-TLS IMAP greeting with a capability code: a TLS device must get it as sent.
const IMAPS_GREETING_WITH_CAPS: &str =
    "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID] fake.m365 IMAPS ready\r\n";
/// [`IMAP_STARTTLS_GREETING`] with its pre-TLS `[CAPABILITY ...]` code taken out.
/// tlsbridge's own greetings, shown in place of a STARTTLS upstream's pre-TLS text.
const OWN_IMAP_GREETING: &str = "* OK localhost tlsbridge ready\r\n";
const OWN_POP3_GREETING: &str = "+OK localhost tlsbridge ready\r\n";

// ---------------------------------------------------------------------------------------------
// Device-side clients.

/// A tagged IMAP response: the untagged lines (literals included, raw) and the tagged line.
#[derive(Debug, Default)]
pub(crate) struct ImapResponse {
    pub(crate) untagged: Vec<String>,
    /// The tagged line without the tag and the CRLF, e.g. `OK LOGIN completed.`.
    pub(crate) status: String,
    /// Literal data in the untagged lines, in order.
    literals: Vec<Vec<u8>>,
}

/// An IMAP client over any stream, recording every byte.
pub(crate) struct ImapClient<S> {
    pub(crate) conn: Conn<S>,
}

/// The size of a literal announced at the end of `line` (`... {N}\r\n`).
fn literal_size(line: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    let open = text.strip_suffix('}')?.rfind('{')?;
    text[open + 1..text.len() - 1].parse().ok()
}

impl<S: AsyncRead + AsyncWrite + Unpin + EndOfStream> ImapClient<S> {
    pub(crate) fn new(io: S) -> ImapClient<S> {
        ImapClient {
            conn: Conn::new(io, DEVICE_TIMEOUT),
        }
    }

    /// The next line, CRLF included; an error at EOF.
    pub(crate) async fn line(&mut self) -> Result<String> {
        match self.conn.read_line().await? {
            Some(line) => Ok(String::from_utf8_lossy(&line).into_owned()),
            None => bail!(
                "the proxy closed the connection (received so far: {})",
                preview(&self.conn.received)
            ),
        }
    }

    /// Reads untagged lines (and their literals) until the line tagged `tag`.
    async fn response(&mut self, tag: &str) -> Result<ImapResponse> {
        let mut response = ImapResponse::default();
        loop {
            let Some(line) = self.conn.read_line().await? else {
                bail!(
                    "the proxy closed the connection while {tag} waited for its reply \
                     (received so far: {})",
                    preview(&self.conn.received)
                );
            };
            let mut raw = line.clone();
            let mut last = line;
            // A line that announces a literal continues after the literal's data.
            while let Some(size) = literal_size(&last) {
                let mut data = Vec::new();
                while data.len() < size {
                    let Some(part) = self.conn.read_line().await? else {
                        bail!("EOF inside a {size}-octet literal");
                    };
                    data.extend_from_slice(&part);
                }
                ensure!(
                    data.len() == size,
                    "a literal of {size} octets not followed by a line end: {}",
                    preview(&data)
                );
                raw.extend_from_slice(&data);
                response.literals.push(data);
                let Some(rest) = self.conn.read_line().await? else {
                    bail!("EOF after a literal");
                };
                raw.extend_from_slice(&rest);
                last = rest;
            }
            let text = String::from_utf8_lossy(&raw).into_owned();
            if let Some(status) = text.strip_prefix(&format!("{tag} ")) {
                response.status = status.trim_end().to_string();
                return Ok(response);
            }
            ensure!(
                text.starts_with("* "),
                "neither untagged nor tagged {tag}: {text:?}"
            );
            response.untagged.push(text);
        }
    }

    /// Sends `tag command` and reads the response.
    async fn command(&mut self, tag: &str, command: &str) -> Result<ImapResponse> {
        self.conn
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .await?;
        self.response(tag)
            .await
            .with_context(|| format!("response to {tag} {command}"))
    }

    /// Like [`command`](Self::command), failing unless the status is `OK`.
    async fn ok(&mut self, tag: &str, command: &str) -> Result<ImapResponse> {
        let response = self.command(tag, command).await?;
        ensure!(
            response.status.starts_with("OK"),
            "{tag} {command} got {response:?}"
        );
        Ok(response)
    }
}

impl ImapClient<TcpStream> {
    /// Starts TLS after `OK` to STARTTLS; fails if anything came after the OK.
    async fn start_tls(
        self,
        legacy: Legacy,
        verify: &Verify,
    ) -> Result<ImapClient<SslStream<TcpStream>>> {
        let (tcp, leftover) = self.conn.into_inner();
        ensure!(
            leftover.is_empty(),
            "the proxy sent bytes after its OK to STARTTLS: {}",
            preview(&leftover)
        );
        Ok(ImapClient::new(
            tls_connect(tcp, legacy, verify, "localhost").await?,
        ))
    }
}

/// A POP3 client over any stream, recording every byte.
pub(crate) struct Pop3Client<S> {
    pub(crate) conn: Conn<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + EndOfStream> Pop3Client<S> {
    pub(crate) fn new(io: S) -> Pop3Client<S> {
        Pop3Client {
            conn: Conn::new(io, DEVICE_TIMEOUT),
        }
    }

    /// The next line without CRLF; an error at EOF.
    pub(crate) async fn line(&mut self) -> Result<String> {
        match self.conn.read_line().await? {
            Some(line) => Ok(String::from_utf8_lossy(&line).trim_end().to_string()),
            None => bail!(
                "the proxy closed the connection (received so far: {})",
                preview(&self.conn.received)
            ),
        }
    }

    /// Sends `line` and reads the one-line status.
    async fn command(&mut self, line: &str) -> Result<String> {
        self.conn
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.line()
            .await
            .with_context(|| format!("reply to {line:?}"))
    }

    /// Like [`command`](Self::command), failing unless the status is `+OK`.
    async fn ok(&mut self, line: &str) -> Result<String> {
        let status = self.command(line).await?;
        ensure!(status.starts_with("+OK"), "{line:?} got {status:?}");
        Ok(status)
    }

    /// A multi-line command: the `+OK` status, then the un-stuffed body up to the `.` line.
    async fn multi(&mut self, line: &str) -> Result<(String, Vec<u8>)> {
        let status = self.ok(line).await?;
        let mut body = Vec::new();
        loop {
            let Some(part) = self.conn.read_line().await? else {
                bail!("EOF inside the reply to {line:?}");
            };
            if part == b".\r\n" {
                return Ok((status, body));
            }
            body.extend_from_slice(part.strip_prefix(b".").unwrap_or(&part));
        }
    }
}

impl Pop3Client<TcpStream> {
    /// Starts TLS after `+OK` to STLS; fails if anything came after the +OK.
    async fn start_tls(
        self,
        legacy: Legacy,
        verify: &Verify,
    ) -> Result<Pop3Client<SslStream<TcpStream>>> {
        let (tcp, leftover) = self.conn.into_inner();
        ensure!(
            leftover.is_empty(),
            "the proxy sent bytes after its +OK to STLS: {}",
            preview(&leftover)
        );
        Ok(Pop3Client::new(
            tls_connect(tcp, legacy, verify, "localhost").await?,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions.

/// Everything one device session saw.
struct Transcript {
    /// The first line the device got: the proxy's own greeting (starttls) or the greeting after
    /// the handshake (tls) or on connect (plain).
    greeting: String,
    /// Negotiated device version and cipher (None for plain).
    tls: Option<(String, String)>,
    /// The capability line(s) after TLS: IMAP `* CAPABILITY ...`, POP3 the CAPA body.
    capability: String,
    /// The message as fetched (IMAP BODY[] literal, POP3 RETR un-stuffed).
    fetched: Vec<u8>,
    /// Bytes the device sent on the encrypted (or, for plain, relayed) part of the session.
    sent_relayed: Vec<u8>,
    /// Bytes the device received on that part, greeting included for tls/plain.
    received_relayed: Vec<u8>,
    close: Close,
}

impl std::fmt::Debug for Transcript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcript")
            .field("greeting", &self.greeting)
            .field("tls", &self.tls)
            .field("capability", &self.capability)
            .field("fetched", &preview(&self.fetched))
            .field("sent_relayed", &preview(&self.sent_relayed))
            .field("received_relayed", &preview(&self.received_relayed))
            .field("close", &self.close)
            .finish()
    }
}

/// The proxy's pre-TLS IMAP dialog as a careful device walks it: CAPABILITY, a LOGIN and an
/// AUTHENTICATE that must be refused, then `tag STARTTLS` (whose response is returned).
pub(crate) async fn imap_pre_tls(
    device: &mut ImapClient<TcpStream>,
    starttls_tag: &str,
) -> Result<ImapResponse> {
    let greeting = device.line().await.context("proxy greeting")?;
    ensure!(
        greeting.starts_with(PROXY_IMAP_GREETING) && greeting.ends_with("\r\n"),
        "the proxy's own greeting expected, got {greeting:?}"
    );
    let caps = device.ok("a1", "CAPABILITY").await?;
    ensure!(
        caps.untagged == [PROXY_IMAP_CAPABILITY],
        "the proxy answers CAPABILITY before TLS: {caps:?}"
    );
    let login = device
        .command("a2", &format!("LOGIN {EARLY_USER} {EARLY_SECRET}"))
        .await?;
    ensure!(
        login.status.starts_with("NO"),
        "LOGIN before TLS must get NO: {login:?}"
    );
    let auth = device
        .command("a3", &format!("AUTHENTICATE PLAIN {EARLY_SASL}"))
        .await?;
    ensure!(
        auth.status.starts_with("NO"),
        "AUTHENTICATE before TLS must get NO: {auth:?}"
    );
    device.command(starttls_tag, "STARTTLS").await
}

/// The mail part of an IMAP session, after TLS (or on a plain route after the greeting).
async fn imap_mail<S: AsyncRead + AsyncWrite + Unpin + EndOfStream>(
    device: &mut ImapClient<S>,
) -> Result<(String, Vec<u8>, Close)> {
    let caps = device.ok("c1", "CAPABILITY").await?;
    ensure!(caps.untagged.len() == 1, "one CAPABILITY line: {caps:?}");
    device.ok("c2", "LOGIN device-user device-secret").await?;
    let list = device.ok("c3", "LIST \"\" \"*\"").await?;
    ensure!(
        list.untagged
            .iter()
            .any(|l| l.trim_end().ends_with("INBOX")),
        "LIST shows INBOX: {list:?}"
    );
    let select = device.ok("c4", "SELECT INBOX").await?;
    ensure!(
        select.untagged.iter().any(|l| l == "* 1 EXISTS\r\n"),
        "SELECT: {select:?}"
    );
    let mut fetch = device.ok("c5", "FETCH 1 (UID RFC822.SIZE BODY[])").await?;
    ensure!(fetch.literals.len() == 1, "one literal: {fetch:?}");
    let body = fetch.literals.remove(0);
    let logout = device.ok("c6", "LOGOUT").await?;
    ensure!(
        logout.untagged.iter().any(|l| l.starts_with("* BYE")),
        "LOGOUT: {logout:?}"
    );
    let (rest, close) = device.conn.read_to_close().await?;
    ensure!(rest.is_empty(), "bytes after LOGOUT: {}", preview(&rest));
    Ok((caps.untagged[0].clone(), body, close))
}

/// One full IMAP session as a device.
async fn imap_session(addr: SocketAddr, mode: DeviceMode, verify: &Verify) -> Result<Transcript> {
    match mode {
        DeviceMode::Starttls(legacy) => {
            let mut plain = ImapClient::new(connect(addr).await?);
            let start = imap_pre_tls(&mut plain, "a4").await?;
            ensure!(
                start.untagged.is_empty() && start.status == "OK Begin TLS negotiation now",
                "STARTTLS got {start:?}"
            );
            let greeting = String::from_utf8_lossy(&plain.conn.received)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            let mut tls = plain.start_tls(legacy, verify).await?;
            let info = crate::support::device::tls_info(tls.conn.get_ref());
            let (capability, fetched, close) = imap_mail(&mut tls).await?;
            Ok(Transcript {
                greeting,
                tls: Some(info),
                capability,
                fetched,
                sent_relayed: tls.conn.sent.clone(),
                received_relayed: tls.conn.received.clone(),
                close,
            })
        }
        DeviceMode::Tls(legacy) => {
            let stream = tls_connect(connect(addr).await?, legacy, verify, "localhost").await?;
            let info = crate::support::device::tls_info(&stream);
            let mut tls = ImapClient::new(stream);
            let greeting = tls.line().await.context("greeting")?;
            let (capability, fetched, close) = imap_mail(&mut tls).await?;
            Ok(Transcript {
                greeting,
                tls: Some(info),
                capability,
                fetched,
                sent_relayed: tls.conn.sent.clone(),
                received_relayed: tls.conn.received.clone(),
                close,
            })
        }
        DeviceMode::Plain => {
            let mut plain = ImapClient::new(connect(addr).await?);
            let greeting = plain.line().await.context("greeting")?;
            let (capability, fetched, close) = imap_mail(&mut plain).await?;
            Ok(Transcript {
                greeting,
                tls: None,
                capability,
                fetched,
                sent_relayed: plain.conn.sent.clone(),
                received_relayed: plain.conn.received.clone(),
                close,
            })
        }
    }
}

/// The proxy's pre-TLS POP3 dialog as a careful device walks it: CAPA, USER and PASS that must
/// be refused, then STLS (whose status is returned).
pub(crate) async fn pop3_pre_tls(device: &mut Pop3Client<TcpStream>) -> Result<String> {
    let greeting = device.line().await.context("proxy greeting")?;
    ensure!(
        greeting.starts_with("+OK ") && !greeting.contains("fake.m365"),
        "the proxy's own +OK greeting expected, got {greeting:?}"
    );
    let (_, capa) = device.multi("CAPA").await?;
    ensure!(
        String::from_utf8_lossy(&capa).lines().any(|l| l == "STLS"),
        "CAPA before TLS must list STLS: {}",
        preview(&capa)
    );
    for command in [format!("USER {EARLY_USER}"), format!("PASS {EARLY_SECRET}")] {
        let status = device.command(&command).await?;
        ensure!(
            status.starts_with("-ERR"),
            "{command:?} before TLS must get -ERR, got {status:?}"
        );
    }
    device.command("STLS").await
}

/// The mail part of a POP3 session.
async fn pop3_mail<S: AsyncRead + AsyncWrite + Unpin + EndOfStream>(
    device: &mut Pop3Client<S>,
) -> Result<(String, Vec<u8>, Close)> {
    let (_, capa) = device.multi("CAPA").await?;
    device.ok("USER device-user").await?;
    device.ok("PASS device-secret").await?;
    let stat = device.ok("STAT").await?;
    ensure!(
        stat == format!("+OK 1 {}", MAILBOX_MESSAGE.len()),
        "STAT: {stat:?}"
    );
    device.multi("LIST").await?;
    let (_, body) = device.multi("RETR 1").await?;
    device.ok("QUIT").await?;
    let (rest, close) = device.conn.read_to_close().await?;
    ensure!(rest.is_empty(), "bytes after QUIT: {}", preview(&rest));
    Ok((String::from_utf8_lossy(&capa).into_owned(), body, close))
}

/// One full POP3 session as a device.
async fn pop3_session(addr: SocketAddr, mode: DeviceMode, verify: &Verify) -> Result<Transcript> {
    match mode {
        DeviceMode::Starttls(legacy) => {
            let mut plain = Pop3Client::new(connect(addr).await?);
            let status = pop3_pre_tls(&mut plain).await?;
            ensure!(status == "+OK Begin TLS negotiation", "STLS got {status:?}");
            let greeting = String::from_utf8_lossy(&plain.conn.received)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            let mut tls = plain.start_tls(legacy, verify).await?;
            let info = crate::support::device::tls_info(tls.conn.get_ref());
            let (capability, fetched, close) = pop3_mail(&mut tls).await?;
            Ok(Transcript {
                greeting,
                tls: Some(info),
                capability,
                fetched,
                sent_relayed: tls.conn.sent.clone(),
                received_relayed: tls.conn.received.clone(),
                close,
            })
        }
        DeviceMode::Tls(legacy) => {
            let stream = tls_connect(connect(addr).await?, legacy, verify, "localhost").await?;
            let info = crate::support::device::tls_info(&stream);
            let mut tls = Pop3Client::new(stream);
            let greeting = tls.line().await.context("greeting")?;
            let (capability, fetched, close) = pop3_mail(&mut tls).await?;
            Ok(Transcript {
                greeting,
                tls: Some(info),
                capability,
                fetched,
                sent_relayed: tls.conn.sent.clone(),
                received_relayed: tls.conn.received.clone(),
                close,
            })
        }
        DeviceMode::Plain => {
            let mut plain = Pop3Client::new(connect(addr).await?);
            let greeting = plain.line().await.context("greeting")?;
            let (capability, fetched, close) = pop3_mail(&mut plain).await?;
            Ok(Transcript {
                greeting,
                tls: None,
                capability,
                fetched,
                sent_relayed: plain.conn.sent.clone(),
                received_relayed: plain.conn.received.clone(),
                close,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// Nothing the device said before TLS (credentials, pipelined commands) reached the upstream.
pub(crate) fn assert_no_early_bytes(report: &SessionReport) {
    assert!(
        report.unexpected_plaintext.is_empty(),
        "the upstream received plaintext outside the proxy's own dialog: {report:?}"
    );
    for marker in [EARLY_USER, EARLY_SECRET, EARLY_SASL] {
        assert!(
            !contains_ci(&report.plaintext, marker.as_bytes())
                && !contains_ci(&report.after_tls, marker.as_bytes()),
            "{marker} (sent by the device before TLS) reached the upstream: {report:?}"
        );
    }
}

/// A full relayed session: upstream TLS 1.2+, device bytes after TLS arrive byte-exact, and the
/// device got `replayed` (a greeting the proxy shows it) followed by what the upstream sent
/// inside TLS minus `dropped` (a greeting the proxy must not show it).
fn assert_relayed(report: &SessionReport, t: &Transcript, replayed: &str, dropped: &str) {
    assert!(
        matches!(report.tls_version.as_deref(), Some("TLSv1.2" | "TLSv1.3")),
        "the upstream leg must be TLS 1.2+: {report:?}"
    );
    assert_eq!(report.outcome, "ok", "upstream session: {report:?}");
    assert_no_early_bytes(report);
    assert!(
        report.after_tls == t.sent_relayed,
        "the upstream received other bytes than the device sent after TLS\n\
         upstream got: {}\ndevice sent:  {}",
        preview(&report.after_tls),
        preview(&t.sent_relayed)
    );
    let from_upstream = report
        .sent_after_tls
        .strip_prefix(dropped.as_bytes())
        .unwrap_or_else(|| {
            panic!(
                "the upstream's TLS stream should start with {dropped:?}: {}",
                preview(&report.sent_after_tls)
            )
        });
    let mut expected = replayed.as_bytes().to_vec();
    expected.extend_from_slice(from_upstream);
    assert!(
        t.received_relayed == expected,
        "the device received other bytes than expected\n\
         expected:   {}\ndevice got: {}",
        preview(&expected),
        preview(&t.received_relayed)
    );
    assert!(
        t.fetched == MAILBOX_MESSAGE,
        "the message changed on the way: {}",
        preview(&t.fetched)
    );
    assert_eq!(
        t.close,
        Close::Clean,
        "the upstream ended cleanly: so must the device leg"
    );
    if let Some((version, _)) = &t.tls {
        assert_eq!(version, "TLSv1", "the device is pinned to TLS 1.0");
    }
}

fn imap_route(name: &str, device_tls: &str, upstream: &FakeUpstream, upstream_tls: &str) -> Route {
    Route::new(
        name,
        "imap",
        device_tls,
        &upstream.host_port(),
        upstream_tls,
    )
}

fn pop3_route(name: &str, device_tls: &str, upstream: &FakeUpstream, upstream_tls: &str) -> Route {
    Route::new(
        name,
        "pop3",
        device_tls,
        &upstream.host_port(),
        upstream_tls,
    )
}

async fn start_upstream(pki: &Pki, mailbox: Mailbox) -> FakeUpstream {
    FakeUpstream::start(
        Service::Mailbox(mailbox),
        UpstreamTls::Modern,
        &pki.localhost,
    )
    .await
    .expect("start the fake mailbox")
}

/// Runs one IMAP session through route `route` (device `mode`) to `mailbox`.
async fn imap_case(
    mailbox: Mailbox,
    device_tls: &str,
    mode: DeviceMode,
) -> (Transcript, SessionReport) {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream_tls = match mailbox.leg {
        crate::support::upstream::Leg::ImplicitTls => "tls",
        crate::support::upstream::Leg::Starttls => "starttls",
    };
    let mut upstream = start_upstream(&pki, mailbox).await;
    let proxy = Proxy::start(
        &pki,
        &[imap_route("imap", device_tls, &upstream, upstream_tls)],
    )
    .await
    .expect("start the proxy");
    let transcript = imap_session(proxy.addr("imap"), mode, &proxy.verify())
        .await
        .unwrap_or_else(|err| {
            panic!("IMAP device session ({device_tls} -> {upstream_tls}): {err:#}")
        });
    let report = upstream.next_session().await.expect("upstream session");
    proxy.stop().await.expect("the proxy shuts down cleanly");
    (transcript, report)
}

/// Runs one POP3 session through route `route` (device `mode`) to `mailbox`.
async fn pop3_case(
    mailbox: Mailbox,
    device_tls: &str,
    mode: DeviceMode,
) -> (Transcript, SessionReport) {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream_tls = match mailbox.leg {
        crate::support::upstream::Leg::ImplicitTls => "tls",
        crate::support::upstream::Leg::Starttls => "starttls",
    };
    let mut upstream = start_upstream(&pki, mailbox).await;
    let proxy = Proxy::start(
        &pki,
        &[pop3_route("pop3", device_tls, &upstream, upstream_tls)],
    )
    .await
    .expect("start the proxy");
    let transcript = pop3_session(proxy.addr("pop3"), mode, &proxy.verify())
        .await
        .unwrap_or_else(|err| {
            panic!("POP3 device session ({device_tls} -> {upstream_tls}): {err:#}")
        });
    let report = upstream.next_session().await.expect("upstream session");
    proxy.stop().await.expect("the proxy shuts down cleanly");
    (transcript, report)
}

/// The IMAP capability line after TLS is the upstream's own.
fn assert_upstream_imap_capability(t: &Transcript) {
    assert_eq!(
        t.capability, IMAP_CAPABILITY,
        "CAPABILITY after TLS must be answered by the upstream"
    );
    assert!(!t.capability.contains("STARTTLS"), "{t:?}");
}

/// The POP3 CAPA after TLS is the upstream's own (USER, SASL; no STLS).
fn assert_upstream_pop3_capa(t: &Transcript) {
    assert!(
        t.capability.lines().any(|l| l == "SASL PLAIN XOAUTH2")
            && t.capability.lines().any(|l| l == "USER")
            && !t.capability.lines().any(|l| l == "STLS"),
        "CAPA after TLS must be answered by the upstream: {t:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// IMAP: the route combinations.

#[tokio::test]
async fn imap_tls_to_tls_shows_the_upstream_greeting_as_sent() {
    let mailbox = Mailbox::imap_tls().with_greeting(IMAPS_GREETING_WITH_CAPS);
    let (t, report) = imap_case(mailbox, "tls", DeviceMode::Tls(Legacy::Tls10)).await;
    assert_eq!(t.greeting, IMAPS_GREETING_WITH_CAPS, "{t:?}");
    assert_upstream_imap_capability(&t);
    assert_relayed(&report, &t, "", "");
    assert!(report.plaintext.is_empty(), "{report:?}");
}

#[tokio::test]
async fn imap_starttls_to_tls_hides_the_upstream_greeting() {
    let (t, report) = imap_case(
        Mailbox::imap_tls(),
        "starttls",
        DeviceMode::Starttls(Legacy::Tls10),
    )
    .await;
    assert!(t.greeting.starts_with(PROXY_IMAP_GREETING), "{t:?}");
    assert_upstream_imap_capability(&t);
    assert_relayed(&report, &t, "", crate::support::upstream::IMAP_TLS_GREETING);
}

#[tokio::test]
async fn imap_starttls_to_starttls() {
    let (t, report) = imap_case(
        Mailbox::imap_starttls(MailBehaviour::Normal),
        "starttls",
        DeviceMode::Starttls(Legacy::Tls10),
    )
    .await;
    assert!(t.greeting.starts_with(PROXY_IMAP_GREETING), "{t:?}");
    assert_upstream_imap_capability(&t);
    assert_relayed(&report, &t, "", "");
    assert!(
        contains(&report.plaintext, b"STARTTLS\r\n"),
        "the proxy ran the upstream's STARTTLS dialog: {report:?}"
    );
}

#[tokio::test]
async fn imap_plain_to_tls_shows_the_upstream_greeting_as_sent() {
    let mailbox = Mailbox::imap_tls().with_greeting(IMAPS_GREETING_WITH_CAPS);
    let (t, report) = imap_case(mailbox, "plain", DeviceMode::Plain).await;
    assert_eq!(t.greeting, IMAPS_GREETING_WITH_CAPS, "{t:?}");
    assert_upstream_imap_capability(&t);
    assert_relayed(&report, &t, "", "");
}

#[tokio::test]
async fn imap_tls_to_starttls_gets_tlsbridges_own_greeting() {
    let (t, report) = imap_case(
        Mailbox::imap_starttls(MailBehaviour::Normal),
        "tls",
        DeviceMode::Tls(Legacy::Tls10),
    )
    .await;
    assert!(
        report
            .sent_plaintext
            .starts_with(IMAP_STARTTLS_GREETING.as_bytes()),
        "the upstream greeted with pre-TLS capabilities: {report:?}"
    );
    assert_eq!(t.greeting, OWN_IMAP_GREETING, "{t:?}");
    assert_upstream_imap_capability(&t);
    assert_relayed(&report, &t, OWN_IMAP_GREETING, "");
}

#[tokio::test]
async fn imap_plain_to_starttls_gets_tlsbridges_own_greeting() {
    let (t, report) = imap_case(
        Mailbox::imap_starttls(MailBehaviour::Normal),
        "plain",
        DeviceMode::Plain,
    )
    .await;
    assert_eq!(t.greeting, OWN_IMAP_GREETING, "{t:?}");
    assert_relayed(&report, &t, OWN_IMAP_GREETING, "");
}

// ---------------------------------------------------------------------------------------------
// POP3: the route combinations.

#[tokio::test]
async fn pop3_tls_to_tls_shows_the_upstream_greeting() {
    let (t, report) = pop3_case(Mailbox::pop3_tls(), "tls", DeviceMode::Tls(Legacy::Tls10)).await;
    assert_eq!(format!("{}\r\n", t.greeting), POP3_TLS_GREETING, "{t:?}");
    assert_upstream_pop3_capa(&t);
    assert_relayed(&report, &t, "", "");
}

#[tokio::test]
async fn pop3_starttls_to_tls_hides_the_upstream_greeting() {
    let (t, report) = pop3_case(
        Mailbox::pop3_tls(),
        "starttls",
        DeviceMode::Starttls(Legacy::Tls10),
    )
    .await;
    assert!(
        t.greeting.starts_with("+OK ") && !t.greeting.contains("Microsoft"),
        "{t:?}"
    );
    assert_upstream_pop3_capa(&t);
    assert_relayed(&report, &t, "", POP3_TLS_GREETING);
}

#[tokio::test]
async fn pop3_starttls_to_starttls() {
    let (t, report) = pop3_case(
        Mailbox::pop3_stls(MailBehaviour::Normal),
        "starttls",
        DeviceMode::Starttls(Legacy::Tls10),
    )
    .await;
    assert_upstream_pop3_capa(&t);
    assert_relayed(&report, &t, "", "");
    assert!(
        contains(&report.plaintext, b"STLS\r\n"),
        "the proxy ran the upstream's STLS dialog: {report:?}"
    );
}

#[tokio::test]
async fn pop3_plain_to_tls_shows_the_upstream_greeting() {
    let (t, report) = pop3_case(Mailbox::pop3_tls(), "plain", DeviceMode::Plain).await;
    assert_eq!(format!("{}\r\n", t.greeting), POP3_TLS_GREETING, "{t:?}");
    assert_upstream_pop3_capa(&t);
    assert_relayed(&report, &t, "", "");
}

#[tokio::test]
async fn pop3_tls_to_starttls_gets_tlsbridges_own_greeting() {
    let (t, report) = pop3_case(
        Mailbox::pop3_stls(MailBehaviour::Normal),
        "tls",
        DeviceMode::Tls(Legacy::Tls10),
    )
    .await;
    assert_eq!(format!("{}\r\n", t.greeting), OWN_POP3_GREETING, "{t:?}");
    assert_relayed(&report, &t, OWN_POP3_GREETING, "");
}

// ---------------------------------------------------------------------------------------------
// Fail closed: the table of upstream failures is in `fail_closed`.

// ---------------------------------------------------------------------------------------------
// Injection from the device: a command pipelined behind STARTTLS/STLS closes the session at
// once: no go-ahead, no TLS, and the command never reaches the upstream.

/// `a STARTTLS\r\na LOGIN x y\r\n` in one write: the session is closed.
async fn imap_pipelined_login_closes(mailbox: Mailbox, upstream_tls: &str) {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let mut upstream = start_upstream(&pki, mailbox).await;
    let proxy = Proxy::start(
        &pki,
        &[imap_route("imap", "starttls", &upstream, upstream_tls)],
    )
    .await
    .expect("start the proxy");
    let mut device = ImapClient::new(connect(proxy.addr("imap")).await.expect("connect"));
    let greeting = device.line().await.expect("greeting");
    assert!(greeting.starts_with(PROXY_IMAP_GREETING), "{greeting:?}");
    device
        .conn
        .write_all(b"a STARTTLS\r\na LOGIN x y\r\n")
        .await
        .expect("STARTTLS and LOGIN in one write");
    let (rest, _) = device.conn.read_to_close().await.expect("closed");
    assert!(
        !contains(&rest, b"Begin TLS"),
        "no go-ahead after injected bytes: {}",
        String::from_utf8_lossy(&rest)
    );
    for report in upstream.settle().await.expect("upstream sessions") {
        assert!(
            !contains(&report.after_tls, b"LOGIN x y")
                && !contains(&report.plaintext, b"LOGIN x y"),
            "the pipelined LOGIN reached the upstream: {report:?}"
        );
    }
}

#[tokio::test]
async fn imap_pipelined_login_after_starttls_closes_the_session_to_tls() {
    imap_pipelined_login_closes(Mailbox::imap_tls(), "tls").await;
}

#[tokio::test]
async fn imap_pipelined_login_after_starttls_closes_the_session_to_starttls() {
    imap_pipelined_login_closes(Mailbox::imap_starttls(MailBehaviour::Normal), "starttls").await;
}

/// `STLS\r\nUSER x\r\n` in one write: the session is closed.
async fn pop3_pipelined_user_closes(mailbox: Mailbox, upstream_tls: &str) {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let mut upstream = start_upstream(&pki, mailbox).await;
    let proxy = Proxy::start(
        &pki,
        &[pop3_route("pop3", "starttls", &upstream, upstream_tls)],
    )
    .await
    .expect("start the proxy");
    let mut device = Pop3Client::new(connect(proxy.addr("pop3")).await.expect("connect"));
    let greeting = device.line().await.expect("greeting");
    assert!(greeting.starts_with("+OK "), "{greeting:?}");
    device
        .conn
        .write_all(b"STLS\r\nUSER x\r\n")
        .await
        .expect("STLS and USER in one write");
    let (rest, _) = device.conn.read_to_close().await.expect("closed");
    assert!(
        !contains(&rest, b"Begin TLS"),
        "no go-ahead after injected bytes: {}",
        String::from_utf8_lossy(&rest)
    );
    for report in upstream.settle().await.expect("upstream sessions") {
        assert!(
            !contains(&report.after_tls, b"USER x\r\n")
                && !contains(&report.plaintext, b"USER x\r\n"),
            "the pipelined USER reached the upstream: {report:?}"
        );
    }
}

#[tokio::test]
async fn pop3_pipelined_user_after_stls_closes_the_session_to_tls() {
    pop3_pipelined_user_closes(Mailbox::pop3_tls(), "tls").await;
}

#[tokio::test]
async fn pop3_pipelined_user_after_stls_closes_the_session_to_starttls() {
    pop3_pipelined_user_closes(Mailbox::pop3_stls(MailBehaviour::Normal), "starttls").await;
}

/// The fake mailbox itself: RETR's dot-stuffing round-trips (guards the checks above).
#[test]
fn retr_body_unstuffs_to_the_message() {
    let body = pop3_retr_body();
    let mut unstuffed = Vec::new();
    for line in body.split_inclusive(|&b| b == b'\n') {
        if line == b".\r\n" {
            break;
        }
        unstuffed.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    assert_eq!(unstuffed, MAILBOX_MESSAGE);
    assert!(contains(&body, b"\r\n..a line that starts with a dot\r\n"));
}
