//! A fake Microsoft 365 on 127.0.0.1:0: SMTP with STARTTLS, echo over implicit TLS, IMAP and
//! POP3 over implicit TLS or STARTTLS/STLS, with knobs for the ways a real upstream can
//! misbehave. Each connection ends with a [`SessionReport`] of everything it saw, delivered
//! through [`FakeUpstream::next_session`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use openssl::pkey::PKey;
use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslVersion};
use openssl::x509::X509;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::ca::Leaf;
use super::lines::{classify, preview, Close, Conn, EndOfStream};

/// How long the fake upstream waits for its peer before giving up on a session.
const UPSTREAM_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test waits for the upstream to report a finished session.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(20);

/// What the fake upstream speaks.
#[derive(Clone, Debug)]
pub enum Service {
    /// SMTP submission with STARTTLS (port 587 style).
    Smtp(Smtp),
    /// Implicit TLS, echoes what it receives.
    Echo(EchoMode),
    /// IMAP over implicit TLS (993 style), greeting [`IMAP_TLS_GREETING`].
    Imap,
    /// POP3 over implicit TLS (995 style), greeting [`POP3_TLS_GREETING`].
    Pop3,
    /// IMAP or POP3 with the leg, greeting and misbehaviour of the test's choosing.
    Mailbox(Mailbox),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EchoMode {
    /// Writes back each chunk as it arrives; close_notify after the peer's EOF.
    Streaming,
    /// Reads everything until the peer's EOF, then writes it all back, then close_notify.
    AfterEof,
    /// Echoes the first N bytes once they all arrived, then closes the TCP connection without
    /// close_notify: a truncated reply the device must be able to tell from a complete one.
    AbortAfter(usize),
}

/// The SMTP dialog of the fake upstream.
#[derive(Clone, Debug)]
pub struct Smtp {
    /// The pre-TLS greeting, CRLF-terminated line(s).
    pub banner: String,
    pub behaviour: SmtpBehaviour,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpBehaviour {
    /// Like smtp.office365.com: STARTTLS offered and accepted.
    Normal,
    /// EHLO does not offer STARTTLS (STARTTLS anyway gets a 500).
    NoStartTls,
    /// STARTTLS is answered with `454 4.7.0 TLS not available`.
    Refuse454,
    /// STARTTLS is answered with `220 ...` and `250 injected` in the same write.
    InjectAfterReady,
}

pub const SMTP_BANNER: &str = "220 fake.m365 ESMTP\r\n";
pub const INJECTED: &[u8] = b"250 injected\r\n";

impl Smtp {
    pub fn new(behaviour: SmtpBehaviour) -> Smtp {
        Smtp {
            banner: SMTP_BANNER.to_string(),
            behaviour,
        }
    }
    pub fn normal() -> Smtp {
        Smtp::new(SmtpBehaviour::Normal)
    }
}

/// Which mail access protocol a [`Mailbox`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailProtocol {
    Imap,
    Pop3,
}

/// How a [`Mailbox`] secures its leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// TLS first thing, then the greeting inside TLS (993/995).
    ImplicitTls,
    /// Greeting and dialog in plaintext, then IMAP STARTTLS / POP3 STLS; no greeting inside
    /// TLS (143/110).
    Starttls,
}

/// The ways an IMAP/POP3 upstream misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailBehaviour {
    /// STARTTLS / STLS offered and accepted.
    Normal,
    /// IMAP only: the greeting is [`IMAP_PREAUTH_GREETING`] (on a STARTTLS leg, TLS would be
    /// skipped altogether). A POP3 mailbox with this knob ends the session at once.
    Preauth,
    /// CAPABILITY / CAPA does not offer STARTTLS / STLS (asked anyway: `BAD` / `-ERR`).
    NoStartTls,
    /// STARTTLS is answered `tag NO ...`, STLS `-ERR ...`.
    Refuse,
    /// The tagged `OK` / `+OK` to STARTTLS / STLS is followed, in the same write, by
    /// [`IMAP_INJECTED`] / [`POP3_INJECTED`].
    InjectAfterReady,
}

/// An IMAP or POP3 upstream.
#[derive(Clone, Debug)]
pub struct Mailbox {
    pub protocol: MailProtocol,
    pub leg: Leg,
    /// The greeting line, CRLF included: sent before STARTTLS on a STARTTLS leg, first thing
    /// inside TLS on an implicit-TLS leg. (Replaced by [`IMAP_PREAUTH_GREETING`] under
    /// [`MailBehaviour::Preauth`].)
    pub greeting: String,
    pub behaviour: MailBehaviour,
}

/// Greeting of the implicit-TLS IMAP upstream (Microsoft 365's, as on outlook.office365.com).
pub const IMAP_TLS_GREETING: &str =
    "* OK The Microsoft Exchange IMAP4 service is ready. [ZmFrZS5tMzY1]\r\n";
/// Pre-TLS greeting of the STARTTLS IMAP upstream: it carries pre-TLS capabilities.
pub const IMAP_STARTTLS_GREETING: &str =
    "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] fake.m365 IMAP4 service ready\r\n";
/// A PREAUTH greeting: the session is authenticated before any TLS.
pub const IMAP_PREAUTH_GREETING: &str =
    "* PREAUTH [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake.m365 logged in as device\r\n";
/// The capabilities the STARTTLS IMAP upstream announces before TLS.
pub const IMAP_PRE_TLS_CAPABILITY: &str = "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n";
/// The capabilities either IMAP upstream announces inside TLS (no STARTTLS, logins allowed).
pub const IMAP_CAPABILITY: &str = "* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR \
     UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+\r\n";
/// What [`MailBehaviour::InjectAfterReady`] puts behind the IMAP tagged OK.
pub const IMAP_INJECTED: &[u8] = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n";

/// Greeting of the implicit-TLS POP3 upstream (Microsoft 365's).
pub const POP3_TLS_GREETING: &str =
    "+OK The Microsoft Exchange POP3 service is ready. [ZmFrZS5tMzY1]\r\n";
/// Pre-TLS greeting of the STLS POP3 upstream (with an APOP timestamp).
pub const POP3_STLS_GREETING: &str =
    "+OK fake.m365 POP3 service ready <4242.1700000000@fake.m365>\r\n";
/// What [`MailBehaviour::InjectAfterReady`] puts behind the POP3 +OK.
pub const POP3_INJECTED: &[u8] = b"+OK injected\r\n";

/// The one message in every fake mailbox, as IMAP FETCH BODY[] and POP3 RETR (after
/// un-stuffing) return it: a line that starts with a dot, 8-bit bytes, CRLF line ends.
pub const MAILBOX_MESSAGE: &[u8] = b"From: Microsoft 365 <no-reply@fake.m365>\r\n\
To: Scanner <scanner@example.com>\r\n\
Subject: Scan job 0042\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
Your scan job has been delivered.\r\n\
.a line that starts with a dot\r\n\
..and one with two\r\n\
caf\xc3\xa9 8-bit bytes\r\n";

impl Mailbox {
    fn new(protocol: MailProtocol, leg: Leg, behaviour: MailBehaviour) -> Mailbox {
        let greeting = match (protocol, leg) {
            (MailProtocol::Imap, Leg::ImplicitTls) => IMAP_TLS_GREETING,
            (MailProtocol::Imap, Leg::Starttls) => IMAP_STARTTLS_GREETING,
            (MailProtocol::Pop3, Leg::ImplicitTls) => POP3_TLS_GREETING,
            (MailProtocol::Pop3, Leg::Starttls) => POP3_STLS_GREETING,
        };
        Mailbox {
            protocol,
            leg,
            greeting: greeting.to_string(),
            behaviour,
        }
    }
    /// IMAP over implicit TLS (993 style).
    pub fn imap_tls() -> Mailbox {
        Mailbox::new(MailProtocol::Imap, Leg::ImplicitTls, MailBehaviour::Normal)
    }
    /// IMAP with STARTTLS (143 style) and the given behaviour.
    pub fn imap_starttls(behaviour: MailBehaviour) -> Mailbox {
        Mailbox::new(MailProtocol::Imap, Leg::Starttls, behaviour)
    }
    /// POP3 over implicit TLS (995 style).
    pub fn pop3_tls() -> Mailbox {
        Mailbox::new(MailProtocol::Pop3, Leg::ImplicitTls, MailBehaviour::Normal)
    }
    /// POP3 with STLS (110 style) and the given behaviour.
    pub fn pop3_stls(behaviour: MailBehaviour) -> Mailbox {
        Mailbox::new(MailProtocol::Pop3, Leg::Starttls, behaviour)
    }
    /// The same mailbox with another greeting line (CRLF included).
    pub fn with_greeting(mut self, greeting: &str) -> Mailbox {
        self.greeting = greeting.to_string();
        self
    }
    /// The greeting this mailbox really sends.
    pub fn effective_greeting(&self) -> &str {
        match (self.protocol, self.behaviour) {
            (MailProtocol::Imap, MailBehaviour::Preauth) => IMAP_PREAUTH_GREETING,
            _ => &self.greeting,
        }
    }
}

/// The TLS the fake upstream offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamTls {
    /// rustls, TLS 1.2 and 1.3.
    Modern,
    /// rustls, TLS 1.2 only.
    Tls12Only,
    /// rustls, TLS 1.3 only.
    Tls13Only,
    /// OpenSSL pinned to TLS 1.1 (rustls has nothing below 1.2): a server the proxy must refuse.
    OpensslTls11Only,
}

/// One message accepted by the fake SMTP server.
#[derive(Clone, Default)]
pub struct Message {
    /// The argument of `MAIL FROM:` as received (e.g. `<a@b>`), without CRLF.
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The DATA bytes exactly as on the wire (dot-stuffed, CRLFs), without the final `.\r\n`.
    pub data: Vec<u8>,
}

/// What one upstream connection saw, reported when it ends.
#[derive(Clone, Default)]
pub struct SessionReport {
    pub peer: Option<SocketAddr>,
    /// Every byte received before the TLS handshake (STARTTLS legs only; empty for implicit
    /// TLS).
    pub plaintext: Vec<u8>,
    /// Every byte sent before the TLS handshake (STARTTLS legs only).
    pub sent_plaintext: Vec<u8>,
    /// Plaintext bytes outside the expected dialog (SMTP EHLO/HELO/STARTTLS/QUIT, IMAP
    /// CAPABILITY/NOOP/STARTTLS/LOGOUT, POP3 CAPA/NOOP/STLS/QUIT lines), including bytes
    /// pipelined after STARTTLS before the go-ahead was sent.
    pub unexpected_plaintext: Vec<u8>,
    /// The server name the peer's ClientHello carried (SNI), once a handshake got that far.
    pub sni: Option<String>,
    /// `TLSv1.2`, `TLSv1.3`, ... once the handshake succeeded.
    pub tls_version: Option<String>,
    pub tls_cipher: Option<String>,
    /// Why the TLS handshake failed, if it did.
    pub tls_error: Option<String>,
    /// Every byte received inside TLS.
    pub after_tls: Vec<u8>,
    /// Every byte sent inside TLS.
    pub sent_after_tls: Vec<u8>,
    pub messages: Vec<Message>,
    /// How the peer ended the session: `Some(Close::Clean)` for close_notify / FIN.
    pub peer_close: Option<Close>,
    /// `ok` or the error that ended the session.
    pub outcome: String,
}

impl SessionReport {
    pub fn tls_established(&self) -> bool {
        self.tls_version.is_some()
    }
    pub fn after_tls_text(&self) -> String {
        String::from_utf8_lossy(&self.after_tls).into_owned()
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("mail_from", &self.mail_from)
            .field("rcpt_to", &self.rcpt_to)
            .field("data", &preview(&self.data))
            .finish()
    }
}

impl std::fmt::Debug for SessionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionReport")
            .field("peer", &self.peer)
            .field("plaintext", &preview(&self.plaintext))
            .field("sent_plaintext", &preview(&self.sent_plaintext))
            .field("unexpected_plaintext", &preview(&self.unexpected_plaintext))
            .field("sni", &self.sni)
            .field("tls_version", &self.tls_version)
            .field("tls_cipher", &self.tls_cipher)
            .field("tls_error", &self.tls_error)
            .field("after_tls", &preview(&self.after_tls))
            .field("sent_after_tls", &preview(&self.sent_after_tls))
            .field("messages", &self.messages)
            .field("peer_close", &self.peer_close)
            .field("outcome", &self.outcome)
            .finish()
    }
}

/// A running fake upstream. Dropping it stops accepting.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    reports: mpsc::UnboundedReceiver<SessionReport>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// Reports handed out so far.
    consumed: usize,
    task: JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    /// Binds 127.0.0.1:0 and serves `service` with the given TLS and certificate.
    pub async fn start(service: Service, tls: UpstreamTls, leaf: &Leaf) -> Result<FakeUpstream> {
        let acceptor = Acceptor::new(tls, leaf)?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the fake upstream")?;
        let addr = listener.local_addr().context("fake upstream address")?;
        let (tx, reports) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                let acceptor = acceptor.clone();
                let service = service.clone();
                tokio::spawn(async move {
                    let mut report = SessionReport {
                        peer: Some(peer),
                        ..SessionReport::default()
                    };
                    let result = serve(tcp, &service, &acceptor, &mut report).await;
                    report.outcome = match result {
                        Ok(()) => "ok".to_string(),
                        Err(err) => format!("{err:#}"),
                    };
                    let _ = tx.send(report);
                });
            }
        });
        Ok(FakeUpstream {
            addr,
            reports,
            accepted,
            consumed: 0,
            task,
        })
    }

    /// SMTP with the given behaviour, rustls TLS 1.2+, certificate for "localhost".
    pub async fn smtp(behaviour: SmtpBehaviour, leaf: &Leaf) -> Result<FakeUpstream> {
        FakeUpstream::start(
            Service::Smtp(Smtp::new(behaviour)),
            UpstreamTls::Modern,
            leaf,
        )
        .await
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `localhost:PORT`, the form routes use so the certificate name matches.
    pub fn host_port(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// The report of the next connection to end, waiting at most [`REPORT_TIMEOUT`].
    pub async fn next_session(&mut self) -> Result<SessionReport> {
        let report = tokio::time::timeout(REPORT_TIMEOUT, self.reports.recv())
            .await
            .map_err(|_| {
                anyhow!(
                    "the fake upstream saw no session end within {REPORT_TIMEOUT:?} \
                     ({} accepted, {} reported)",
                    self.accepted(),
                    self.consumed
                )
            })?
            .ok_or_else(|| anyhow!("the fake upstream stopped"))?;
        self.consumed += 1;
        Ok(report)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until every connection accepted so far has ended and returns the reports not
    /// handed out yet. For cases where the proxy may or may not have reached the upstream (it
    /// may cancel its upstream leg before connecting); a connection still in flight is missed.
    pub async fn settle(&mut self) -> Result<Vec<SessionReport>> {
        let mut out = Vec::new();
        while self.consumed < self.accepted() {
            out.push(self.next_session().await?);
        }
        Ok(out)
    }
}

/// A port that was bound and released: connecting to it is refused.
pub async fn dead_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind a port to release")?;
    let port = listener.local_addr().context("released port")?.port();
    drop(listener);
    Ok(port)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// rustls reports a missing close_notify as an error, so `Ok(0)` is a clean end. (The OpenSSL
/// TLS 1.1 server never gets that far with the proxy.)
impl EndOfStream for Box<dyn Io> {}

#[derive(Clone)]
enum Acceptor {
    Rustls(tokio_rustls::TlsAcceptor),
    Openssl(Arc<SslAcceptor>),
}

impl Acceptor {
    fn new(tls: UpstreamTls, leaf: &Leaf) -> Result<Acceptor> {
        let versions: &[&'static rustls::SupportedProtocolVersion] = match tls {
            UpstreamTls::Modern => &[&rustls::version::TLS13, &rustls::version::TLS12],
            UpstreamTls::Tls12Only => &[&rustls::version::TLS12],
            UpstreamTls::Tls13Only => &[&rustls::version::TLS13],
            UpstreamTls::OpensslTls11Only => return Acceptor::openssl_tls11(leaf),
        };
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .context("fake upstream TLS versions")?
        .with_no_client_auth()
        .with_single_cert(leaf.chain.clone(), leaf.key())
        .context("fake upstream certificate")?;
        Ok(Acceptor::Rustls(tokio_rustls::TlsAcceptor::from(Arc::new(
            config,
        ))))
    }

    fn openssl_tls11(leaf: &Leaf) -> Result<Acceptor> {
        let mut builder = SslAcceptor::mozilla_intermediate(SslMethod::tls_server())
            .context("openssl acceptor")?;
        builder.set_security_level(0);
        builder
            .set_cipher_list("DEFAULT:@SECLEVEL=0")
            .context("openssl cipher list")?;
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_1))
            .context("openssl min version")?;
        builder
            .set_max_proto_version(Some(SslVersion::TLS1_1))
            .context("openssl max version")?;
        let mut certs = X509::stack_from_pem(leaf.chain_pem.as_bytes()).context("leaf PEM")?;
        if certs.is_empty() {
            bail!("no certificate in the leaf PEM");
        }
        let cert = certs.remove(0);
        builder.set_certificate(&cert).context("set certificate")?;
        for extra in certs {
            builder
                .add_extra_chain_cert(extra)
                .context("add chain certificate")?;
        }
        let key = PKey::private_key_from_pem(leaf.key_pem.as_bytes()).context("leaf key PEM")?;
        builder.set_private_key(&key).context("set private key")?;
        builder.check_private_key().context("key matches cert")?;
        Ok(Acceptor::Openssl(Arc::new(builder.build())))
    }

    /// Runs the server handshake; returns the stream, the version and the cipher. The SNI the
    /// ClientHello carried goes into `report` as soon as it is known, even if the handshake
    /// fails later.
    async fn accept(
        &self,
        tcp: TcpStream,
        report: &mut SessionReport,
    ) -> Result<(Box<dyn Io>, String, String)> {
        match self {
            Acceptor::Rustls(acceptor) => {
                let start =
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
                let handshake = async {
                    let start = start.await.context("read the ClientHello")?;
                    report.sni = start.client_hello().server_name().map(str::to_string);
                    start
                        .into_stream(acceptor.config().clone())
                        .await
                        .context("rustls server handshake")
                };
                let stream = tokio::time::timeout(UPSTREAM_READ_TIMEOUT, handshake)
                    .await
                    .context("TLS handshake timed out")??;
                let (_, conn) = stream.get_ref();
                let version = match conn.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
                    Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
                    other => format!("{other:?}"),
                };
                let cipher = conn
                    .negotiated_cipher_suite()
                    .map(|s| format!("{:?}", s.suite()))
                    .unwrap_or_default();
                Ok((Box::new(stream), version, cipher))
            }
            Acceptor::Openssl(acceptor) => {
                let ssl = Ssl::new(acceptor.context()).context("openssl Ssl")?;
                let mut stream =
                    tokio_openssl::SslStream::new(ssl, tcp).context("openssl stream")?;
                let accepted =
                    tokio::time::timeout(UPSTREAM_READ_TIMEOUT, Pin::new(&mut stream).accept())
                        .await
                        .context("TLS handshake timed out")?;
                report.sni = stream
                    .ssl()
                    .servername(openssl::ssl::NameType::HOST_NAME)
                    .map(str::to_string);
                accepted.context("openssl server handshake")?;
                let version = stream.ssl().version_str().to_string();
                let cipher = stream
                    .ssl()
                    .current_cipher()
                    .map(|c| c.name().to_string())
                    .unwrap_or_default();
                Ok((Box::new(stream), version, cipher))
            }
        }
    }
}

async fn serve(
    tcp: TcpStream,
    service: &Service,
    acceptor: &Acceptor,
    report: &mut SessionReport,
) -> Result<()> {
    let mailbox = match service {
        Service::Imap => Some(Mailbox::imap_tls()),
        Service::Pop3 => Some(Mailbox::pop3_tls()),
        Service::Mailbox(mailbox) => Some(mailbox.clone()),
        Service::Smtp(_) | Service::Echo(_) => None,
    };
    if let Some(mailbox) = &mailbox {
        if mailbox.protocol == MailProtocol::Pop3 && mailbox.behaviour == MailBehaviour::Preauth {
            bail!("PREAUTH is an IMAP greeting; a POP3 mailbox has none");
        }
    }
    let tcp = match (service, &mailbox) {
        (Service::Smtp(smtp), _) => match smtp_plaintext(tcp, smtp, report).await? {
            Some(tcp) => tcp,
            None => return Ok(()),
        },
        (_, Some(mailbox)) if mailbox.leg == Leg::Starttls => {
            match mail_plaintext(tcp, mailbox, report).await? {
                Some(tcp) => tcp,
                None => return Ok(()),
            }
        }
        _ => tcp,
    };
    let io = match acceptor.accept(tcp, report).await {
        Ok((io, version, cipher)) => {
            report.tls_version = Some(version);
            report.tls_cipher = Some(cipher);
            io
        }
        Err(err) => {
            report.tls_error = Some(format!("{err:#}"));
            return Ok(());
        }
    };
    match service {
        Service::Echo(mode) => echo(io, *mode, report).await,
        _ => {
            let mut conn = Conn::new(io, UPSTREAM_READ_TIMEOUT);
            let result = match &mailbox {
                None => smtp_in_tls(&mut conn, report).await,
                Some(mailbox) => {
                    // A STARTTLS leg has greeted already, before TLS.
                    let greeting =
                        (mailbox.leg == Leg::ImplicitTls).then(|| mailbox.effective_greeting());
                    match mailbox.protocol {
                        MailProtocol::Imap => imap(&mut conn, greeting).await,
                        MailProtocol::Pop3 => pop3(&mut conn, greeting).await,
                    }
                }
            };
            report.after_tls = std::mem::take(&mut conn.received);
            report.sent_after_tls = std::mem::take(&mut conn.sent);
            let (peer_close, result) = match result {
                Ok(close) => (close, Ok(())),
                Err(err) => (None, Err(err)),
            };
            report.peer_close = peer_close;
            result
        }
    }
}

fn verb(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    text.split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// The pre-TLS SMTP dialog. Returns the TCP stream when TLS should start.
async fn smtp_plaintext(
    tcp: TcpStream,
    smtp: &Smtp,
    report: &mut SessionReport,
) -> Result<Option<TcpStream>> {
    let mut conn = Conn::new(tcp, UPSTREAM_READ_TIMEOUT);
    let result = smtp_plaintext_dialog(&mut conn, smtp, report).await;
    report.plaintext = std::mem::take(&mut conn.received);
    report.sent_plaintext = std::mem::take(&mut conn.sent);
    match result? {
        true => Ok(Some(conn.into_inner().0)),
        false => Ok(None),
    }
}

async fn smtp_plaintext_dialog(
    conn: &mut Conn<TcpStream>,
    smtp: &Smtp,
    report: &mut SessionReport,
) -> Result<bool> {
    conn.write_all(smtp.banner.as_bytes()).await?;
    let mut commands = 0;
    loop {
        let Some(line) = conn.read_line().await? else {
            report.peer_close = Some(Close::Clean);
            return Ok(false);
        };
        commands += 1;
        if commands > 50 {
            bail!("too many commands before STARTTLS");
        }
        match verb(&line).as_str() {
            "EHLO" => {
                let mut reply = String::from("250-fake.m365 Hello [127.0.0.1]\r\n");
                reply.push_str("250-SIZE 157286400\r\n250-PIPELINING\r\n");
                reply.push_str("250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n");
                if smtp.behaviour != SmtpBehaviour::NoStartTls {
                    reply.push_str("250-STARTTLS\r\n");
                }
                reply.push_str("250-8BITMIME\r\n250-BINARYMIME\r\n250-CHUNKING\r\n");
                reply.push_str("250 SMTPUTF8\r\n");
                conn.write_all(reply.as_bytes()).await?;
            }
            "HELO" => conn.write_all(b"250 fake.m365 Hello\r\n").await?,
            "QUIT" => {
                conn.write_all(b"221 2.0.0 Service closing transmission channel\r\n")
                    .await?;
                return Ok(false);
            }
            "STARTTLS" => {
                // Anything already buffered was sent before our answer: pipelined plaintext.
                let pipelined = conn.take_buffered();
                report.unexpected_plaintext.extend_from_slice(&pipelined);
                match smtp.behaviour {
                    SmtpBehaviour::Normal => {
                        conn.write_all(b"220 2.0.0 SMTP server ready\r\n").await?;
                        return Ok(true);
                    }
                    SmtpBehaviour::InjectAfterReady => {
                        let mut reply = b"220 2.0.0 SMTP server ready\r\n".to_vec();
                        reply.extend_from_slice(INJECTED);
                        conn.write_all(&reply).await?;
                        return Ok(true);
                    }
                    SmtpBehaviour::Refuse454 => {
                        conn.write_all(b"454 4.7.0 TLS not available\r\n").await?;
                    }
                    SmtpBehaviour::NoStartTls => {
                        conn.write_all(b"500 5.3.3 Unrecognized command\r\n")
                            .await?;
                    }
                }
            }
            _ => {
                report.unexpected_plaintext.extend_from_slice(&line);
                conn.write_all(b"530 5.7.57 Client not authenticated to send mail\r\n")
                    .await?;
            }
        }
    }
}

/// The SMTP server inside TLS. Returns how the peer ended the session.
async fn smtp_in_tls(
    conn: &mut Conn<Box<dyn Io>>,
    report: &mut SessionReport,
) -> Result<Option<Close>> {
    let mut current: Option<Message> = None;
    loop {
        let Some(line) = conn.read_line().await? else {
            return Ok(Some(Close::Clean));
        };
        let text = String::from_utf8_lossy(&line).into_owned();
        match verb(&line).as_str() {
            "EHLO" => {
                conn.write_all(
                    b"250-fake.m365 Hello [127.0.0.1]\r\n250-SIZE 157286400\r\n\
                      250-PIPELINING\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n\
                      250-AUTH LOGIN XOAUTH2\r\n250-8BITMIME\r\n250-BINARYMIME\r\n\
                      250-CHUNKING\r\n250 SMTPUTF8\r\n",
                )
                .await?;
            }
            "HELO" => conn.write_all(b"250 fake.m365 Hello\r\n").await?,
            "MAIL" => {
                let from = text
                    .trim_end()
                    .split_once(':')
                    .map(|(_, arg)| arg.trim().to_string())
                    .unwrap_or_default();
                current = Some(Message {
                    mail_from: from,
                    ..Message::default()
                });
                conn.write_all(b"250 2.1.0 Sender OK\r\n").await?;
            }
            "RCPT" => match current.as_mut() {
                Some(message) => {
                    let to = text
                        .trim_end()
                        .split_once(':')
                        .map(|(_, arg)| arg.trim().to_string())
                        .unwrap_or_default();
                    message.rcpt_to.push(to);
                    conn.write_all(b"250 2.1.5 Recipient OK\r\n").await?;
                }
                None => conn.write_all(b"503 5.5.1 Need MAIL command\r\n").await?,
            },
            "DATA" => {
                let ready = current.as_ref().is_some_and(|m| !m.rcpt_to.is_empty());
                if !ready {
                    conn.write_all(b"503 5.5.1 Need RCPT command\r\n").await?;
                    continue;
                }
                conn.write_all(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")
                    .await?;
                let mut data = Vec::new();
                loop {
                    let Some(line) = conn.read_line().await? else {
                        bail!("EOF inside DATA");
                    };
                    if line == b".\r\n" {
                        break;
                    }
                    data.extend_from_slice(&line);
                }
                let mut message = current.take().unwrap_or_default();
                message.data = data;
                report.messages.push(message);
                conn.write_all(
                    b"250 2.6.0 <fake-1@fake.m365> [Hostname=fake.m365] Queued mail for delivery\r\n",
                )
                .await?;
            }
            "RSET" => {
                current = None;
                conn.write_all(b"250 2.0.0 Resetting\r\n").await?;
            }
            "NOOP" => conn.write_all(b"250 2.0.0 OK\r\n").await?,
            "QUIT" => {
                conn.write_all(b"221 2.0.0 Service closing transmission channel\r\n")
                    .await?;
                conn.shutdown().await?;
                let (_, close) = conn.read_to_close().await?;
                return Ok(Some(close));
            }
            "STARTTLS" => conn.write_all(b"503 5.5.1 TLS already active\r\n").await?,
            "AUTH" => {
                conn.write_all(b"504 5.7.4 Unrecognized authentication type\r\n")
                    .await?
            }
            _ => {
                conn.write_all(b"500 5.3.3 Unrecognized command\r\n")
                    .await?
            }
        }
    }
}

async fn echo(mut io: Box<dyn Io>, mode: EchoMode, report: &mut SessionReport) -> Result<()> {
    if let EchoMode::AbortAfter(n) = mode {
        let mut data = vec![0u8; n];
        tokio::time::timeout(UPSTREAM_READ_TIMEOUT, io.read_exact(&mut data))
            .await
            .context("echo: no data from the peer")?
            .context("echo: read")?;
        report.after_tls = data.clone();
        io.write_all(&data).await.context("echo write")?;
        io.flush().await.context("echo flush")?;
        report.sent_after_tls = data;
        // Dropped without shutdown(): FIN without close_notify.
        drop(io);
        return Ok(());
    }
    let mut chunk = vec![0u8; 64 * 1024];
    let close = loop {
        let read = tokio::time::timeout(UPSTREAM_READ_TIMEOUT, io.read(&mut chunk))
            .await
            .context("echo: no data from the peer")?;
        match read {
            Ok(0) => break Close::Clean,
            Ok(n) => {
                report.after_tls.extend_from_slice(&chunk[..n]);
                if mode == EchoMode::Streaming {
                    io.write_all(&chunk[..n]).await.context("echo write")?;
                    report.sent_after_tls.extend_from_slice(&chunk[..n]);
                }
            }
            Err(err) => break classify(&err),
        }
    };
    report.peer_close = Some(close.clone());
    if close != Close::Clean {
        bail!("echo: the peer ended without close_notify: {close:?}");
    }
    if mode == EchoMode::AfterEof {
        let all = report.after_tls.clone();
        io.write_all(&all).await.context("echo write after EOF")?;
        report.sent_after_tls = all;
    }
    io.flush().await.context("echo flush")?;
    io.shutdown().await.context("echo close_notify")?;
    Ok(())
}

/// The IMAP tag and upper-cased command of a command line.
fn imap_command(line: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_whitespace();
    let tag = words.next().unwrap_or("*").to_string();
    let command = words.next().unwrap_or("").to_ascii_uppercase();
    (tag, command)
}

/// The plaintext dialog of a STARTTLS/STLS mailbox. Returns the TCP stream when TLS should
/// start.
async fn mail_plaintext(
    tcp: TcpStream,
    mailbox: &Mailbox,
    report: &mut SessionReport,
) -> Result<Option<TcpStream>> {
    let mut conn = Conn::new(tcp, UPSTREAM_READ_TIMEOUT);
    let result = match mailbox.protocol {
        MailProtocol::Imap => imap_plaintext_dialog(&mut conn, mailbox, report).await,
        MailProtocol::Pop3 => pop3_plaintext_dialog(&mut conn, mailbox, report).await,
    };
    report.plaintext = std::mem::take(&mut conn.received);
    report.sent_plaintext = std::mem::take(&mut conn.sent);
    match result? {
        true => Ok(Some(conn.into_inner().0)),
        false => Ok(None),
    }
}

async fn imap_plaintext_dialog(
    conn: &mut Conn<TcpStream>,
    mailbox: &Mailbox,
    report: &mut SessionReport,
) -> Result<bool> {
    conn.write_all(mailbox.effective_greeting().as_bytes())
        .await?;
    for _ in 0..50 {
        let Some(line) = conn.read_line().await? else {
            report.peer_close = Some(Close::Clean);
            return Ok(false);
        };
        let (tag, command) = imap_command(&line);
        match command.as_str() {
            "CAPABILITY" => {
                let caps = match mailbox.behaviour {
                    MailBehaviour::NoStartTls => "* CAPABILITY IMAP4rev1 LOGINDISABLED\r\n",
                    _ => IMAP_PRE_TLS_CAPABILITY,
                };
                conn.write_all(format!("{caps}{tag} OK CAPABILITY completed.\r\n").as_bytes())
                    .await?;
            }
            "NOOP" => {
                conn.write_all(format!("{tag} OK NOOP completed.\r\n").as_bytes())
                    .await?
            }
            "LOGOUT" => {
                conn.write_all(
                    format!("* BYE fake.m365 signing off\r\n{tag} OK LOGOUT completed.\r\n")
                        .as_bytes(),
                )
                .await?;
                return Ok(false);
            }
            "STARTTLS" => {
                // Anything already buffered was sent before our answer: pipelined plaintext.
                let pipelined = conn.take_buffered();
                report.unexpected_plaintext.extend_from_slice(&pipelined);
                let ready = format!("{tag} OK Begin TLS negotiation now\r\n");
                match mailbox.behaviour {
                    MailBehaviour::Normal | MailBehaviour::Preauth => {
                        conn.write_all(ready.as_bytes()).await?;
                        return Ok(true);
                    }
                    MailBehaviour::InjectAfterReady => {
                        let mut reply = ready.into_bytes();
                        reply.extend_from_slice(IMAP_INJECTED);
                        conn.write_all(&reply).await?;
                        return Ok(true);
                    }
                    MailBehaviour::Refuse => {
                        conn.write_all(
                            format!("{tag} NO STARTTLS is not available now\r\n").as_bytes(),
                        )
                        .await?
                    }
                    MailBehaviour::NoStartTls => {
                        conn.write_all(format!("{tag} BAD Command Error. 12\r\n").as_bytes())
                            .await?
                    }
                }
            }
            "LOGIN" | "AUTHENTICATE" => {
                report.unexpected_plaintext.extend_from_slice(&line);
                conn.write_all(format!("{tag} NO LOGINDISABLED\r\n").as_bytes())
                    .await?;
            }
            _ => {
                report.unexpected_plaintext.extend_from_slice(&line);
                conn.write_all(format!("{tag} BAD Command Error. 12\r\n").as_bytes())
                    .await?;
            }
        }
    }
    bail!("too many IMAP commands before STARTTLS")
}

async fn pop3_plaintext_dialog(
    conn: &mut Conn<TcpStream>,
    mailbox: &Mailbox,
    report: &mut SessionReport,
) -> Result<bool> {
    conn.write_all(mailbox.effective_greeting().as_bytes())
        .await?;
    for _ in 0..50 {
        let Some(line) = conn.read_line().await? else {
            report.peer_close = Some(Close::Clean);
            return Ok(false);
        };
        match verb(&line).as_str() {
            "CAPA" => {
                let caps = match mailbox.behaviour {
                    MailBehaviour::NoStartTls => "+OK\r\nTOP\r\nUIDL\r\n.\r\n",
                    _ => "+OK\r\nTOP\r\nUIDL\r\nSTLS\r\n.\r\n",
                };
                conn.write_all(caps.as_bytes()).await?;
            }
            "NOOP" => conn.write_all(b"+OK\r\n").await?,
            "QUIT" => {
                conn.write_all(b"+OK fake.m365 signing off\r\n").await?;
                return Ok(false);
            }
            "STLS" => {
                let pipelined = conn.take_buffered();
                report.unexpected_plaintext.extend_from_slice(&pipelined);
                let ready = b"+OK Begin TLS negotiation\r\n";
                match mailbox.behaviour {
                    MailBehaviour::Normal | MailBehaviour::Preauth => {
                        conn.write_all(ready).await?;
                        return Ok(true);
                    }
                    MailBehaviour::InjectAfterReady => {
                        let mut reply = ready.to_vec();
                        reply.extend_from_slice(POP3_INJECTED);
                        conn.write_all(&reply).await?;
                        return Ok(true);
                    }
                    MailBehaviour::Refuse => {
                        conn.write_all(b"-ERR STLS is not available now\r\n")
                            .await?
                    }
                    MailBehaviour::NoStartTls => {
                        conn.write_all(b"-ERR Protocol error. 14\r\n").await?
                    }
                }
            }
            _ => {
                report.unexpected_plaintext.extend_from_slice(&line);
                conn.write_all(b"-ERR Command is not valid in this state.\r\n")
                    .await?;
            }
        }
    }
    bail!("too many POP3 commands before STLS")
}

/// The IMAP server inside TLS, with one mailbox (INBOX) holding [`MAILBOX_MESSAGE`]. Sends
/// `greeting` first when there is one (implicit TLS). Returns how the peer ended the session.
async fn imap(conn: &mut Conn<Box<dyn Io>>, greeting: Option<&str>) -> Result<Option<Close>> {
    if let Some(greeting) = greeting {
        conn.write_all(greeting.as_bytes()).await?;
    }
    let size = MAILBOX_MESSAGE.len();
    loop {
        let Some(line) = conn.read_line().await? else {
            return Ok(Some(Close::Clean));
        };
        let (tag, command) = imap_command(&line);
        let reply = match command.as_str() {
            "CAPABILITY" => format!("{IMAP_CAPABILITY}{tag} OK CAPABILITY completed.\r\n"),
            "NOOP" => format!("{tag} OK NOOP completed.\r\n"),
            "LOGIN" | "AUTHENTICATE" => format!("{tag} OK LOGIN completed.\r\n"),
            "LIST" => format!(
                "* LIST (\\HasNoChildren) \"/\" INBOX\r\n\
                 * LIST (\\HasNoChildren \\Sent) \"/\" \"Sent Items\"\r\n\
                 {tag} OK LIST completed.\r\n"
            ),
            "SELECT" | "EXAMINE" => format!(
                "* 1 EXISTS\r\n* 0 RECENT\r\n\
                 * FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft)\r\n\
                 * OK [UIDVALIDITY 14] UIDVALIDITY value\r\n\
                 * OK [UIDNEXT 2] The next unique identifier value\r\n\
                 {tag} OK [READ-WRITE] SELECT completed.\r\n"
            ),
            "FETCH" => {
                let mut reply =
                    format!("* 1 FETCH (UID 1 RFC822.SIZE {size} BODY[] {{{size}}}\r\n")
                        .into_bytes();
                reply.extend_from_slice(MAILBOX_MESSAGE);
                reply.extend_from_slice(format!(")\r\n{tag} OK FETCH completed.\r\n").as_bytes());
                conn.write_all(&reply).await?;
                continue;
            }
            "STARTTLS" => format!("{tag} BAD TLS is already active.\r\n"),
            "LOGOUT" => {
                let reply = format!(
                    "* BYE Microsoft Exchange Server IMAP4 server signing off.\r\n\
                     {tag} OK LOGOUT completed.\r\n"
                );
                conn.write_all(reply.as_bytes()).await?;
                conn.shutdown().await?;
                let (_, close) = conn.read_to_close().await?;
                return Ok(Some(close));
            }
            _ => format!("{tag} BAD Command Error. 12\r\n"),
        };
        conn.write_all(reply.as_bytes()).await?;
    }
}

/// [`MAILBOX_MESSAGE`] as POP3 RETR sends it: dot-stuffed, then the terminating `.`.
pub fn pop3_retr_body() -> Vec<u8> {
    let mut out = Vec::new();
    for line in MAILBOX_MESSAGE.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The POP3 server inside TLS, with [`MAILBOX_MESSAGE`] as message 1. Sends `greeting` first
/// when there is one (implicit TLS). Returns how the peer ended the session.
async fn pop3(conn: &mut Conn<Box<dyn Io>>, greeting: Option<&str>) -> Result<Option<Close>> {
    if let Some(greeting) = greeting {
        conn.write_all(greeting.as_bytes()).await?;
    }
    let size = MAILBOX_MESSAGE.len();
    loop {
        let Some(line) = conn.read_line().await? else {
            return Ok(Some(Close::Clean));
        };
        let reply = match verb(&line).as_str() {
            "CAPA" => "+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n.\r\n".to_string(),
            "USER" => "+OK\r\n".to_string(),
            "PASS" => "+OK User successfully authenticated.\r\n".to_string(),
            "STAT" => format!("+OK 1 {size}\r\n"),
            "LIST" => format!("+OK 1 {size}\r\n1 {size}\r\n.\r\n"),
            "UIDL" => "+OK\r\n1 AAMkAGI2fake\r\n.\r\n".to_string(),
            "RETR" => {
                let mut reply = format!("+OK {size} octets\r\n").into_bytes();
                reply.extend_from_slice(&pop3_retr_body());
                conn.write_all(&reply).await?;
                continue;
            }
            "NOOP" => "+OK\r\n".to_string(),
            "STLS" => "-ERR Command is not valid in this state.\r\n".to_string(),
            "QUIT" => {
                conn.write_all(b"+OK Microsoft Exchange Server POP3 server signing off.\r\n")
                    .await?;
                conn.shutdown().await?;
                let (_, close) = conn.read_to_close().await?;
                return Ok(Some(close));
            }
            _ => "-ERR Protocol error. 14\r\n".to_string(),
        };
        conn.write_all(reply.as_bytes()).await?;
    }
}
