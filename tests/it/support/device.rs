//! The legacy device: an OpenSSL client pinned to old protocol versions, and an SMTP client that
//! records what it sent and received.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_openssl::SslStream;

use super::lines::{preview, Close, Conn, EndOfStream};

/// Bound on every wait of the device.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(15);

/// What the legacy device's TLS stack can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Legacy {
    /// TLS 1.0 only, `DEFAULT:@SECLEVEL=0`.
    Tls10,
    /// TLS 1.1 only, `DEFAULT:@SECLEVEL=0`.
    Tls11,
    /// TLS 1.2 only, `DEFAULT:@SECLEVEL=0`.
    Tls12,
    /// TLS 1.2 offering only RSA key exchange suites (no forward secrecy).
    Tls12RsaKx,
    /// A current client: TLS 1.3 only (not a legacy device; must get through unlogged).
    Tls13,
}

/// The RSA key exchange suites of [`Legacy::Tls12RsaKx`].
pub const RSA_KX_CIPHERS: &str = "AES128-SHA:AES256-SHA:AES128-SHA256";

impl Legacy {
    fn version(self) -> SslVersion {
        match self {
            Legacy::Tls10 => SslVersion::TLS1,
            Legacy::Tls11 => SslVersion::TLS1_1,
            Legacy::Tls12 | Legacy::Tls12RsaKx => SslVersion::TLS1_2,
            Legacy::Tls13 => SslVersion::TLS1_3,
        }
    }

    /// OpenSSL's name of the version this profile must negotiate.
    pub fn version_name(self) -> &'static str {
        match self {
            Legacy::Tls10 => "TLSv1",
            Legacy::Tls11 => "TLSv1.1",
            Legacy::Tls12 | Legacy::Tls12RsaKx => "TLSv1.2",
            Legacy::Tls13 => "TLSv1.3",
        }
    }

    fn ciphers(self) -> &'static str {
        match self {
            Legacy::Tls12RsaKx => RSA_KX_CIPHERS,
            _ => "DEFAULT:@SECLEVEL=0",
        }
    }
}

/// How the device checks the proxy's certificate.
#[derive(Clone, Debug)]
pub enum Verify {
    /// Verify the chain against this CA file (the proxy's `certs/ca.crt`) and the name.
    Ca(PathBuf),
    /// Accept anything, like many printers do.
    None,
}

/// An OpenSSL connector pinned to `legacy`.
pub fn connector(legacy: Legacy, verify: &Verify) -> Result<SslConnector> {
    let mut builder = SslConnector::builder(SslMethod::tls_client()).context("SslConnector")?;
    builder
        .set_min_proto_version(Some(legacy.version()))
        .context("set min version")?;
    builder
        .set_max_proto_version(Some(legacy.version()))
        .context("set max version")?;
    builder
        .set_cipher_list(legacy.ciphers())
        .with_context(|| format!("cipher list {}", legacy.ciphers()))?;
    match verify {
        Verify::Ca(path) => {
            builder
                .set_ca_file(path)
                .with_context(|| format!("load device CA {}", path.display()))?;
            builder.set_verify(SslVerifyMode::PEER);
        }
        Verify::None => builder.set_verify(SslVerifyMode::NONE),
    }
    Ok(builder.build())
}

/// Runs the client handshake over `tcp` with SNI `server_name`.
pub async fn tls_connect(
    tcp: TcpStream,
    legacy: Legacy,
    verify: &Verify,
    server_name: &str,
) -> Result<SslStream<TcpStream>> {
    let connector = connector(legacy, verify)?;
    let mut config = connector.configure().context("connect configuration")?;
    if matches!(verify, Verify::None) {
        config.set_verify_hostname(false);
    }
    let ssl = config.into_ssl(server_name).context("Ssl for the device")?;
    let mut stream = SslStream::new(ssl, tcp).context("device SslStream")?;
    tokio::time::timeout(DEVICE_TIMEOUT, Pin::new(&mut stream).connect())
        .await
        .context("device TLS handshake timed out")?
        .with_context(|| format!("device TLS handshake ({legacy:?})"))?;
    ensure!(
        stream.ssl().version_str() == legacy.version_name(),
        "device negotiated {} but is pinned to {}",
        stream.ssl().version_str(),
        legacy.version_name()
    );
    Ok(stream)
}

/// Version and cipher of an established device stream.
pub fn tls_info(stream: &SslStream<TcpStream>) -> (String, String) {
    let ssl = stream.ssl();
    (
        ssl.version_str().to_string(),
        ssl.current_cipher()
            .map(|c| c.name().to_string())
            .unwrap_or_default(),
    )
}

pub async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    tokio::time::timeout(DEVICE_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))
}

/// Connects to `addr` from `source` (port chosen by the system): on Linux every address of
/// 127.0.0.0/8 is loopback, so one host can play several devices.
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("socket")?;
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("bind the source address {source}"))?;
    tokio::time::timeout(DEVICE_TIMEOUT, socket.connect(addr))
        .await
        .with_context(|| format!("connect from {source} to {addr} timed out"))?
        .with_context(|| format!("connect from {source} to {addr}"))
}

/// An SMTP reply (one or more lines).
#[derive(Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
    pub raw: Vec<u8>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reply({:?})", self.lines)
    }
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
    /// Whether one of the lines offers `keyword` (e.g. STARTTLS).
    pub fn offers(&self, keyword: &str) -> bool {
        self.lines.iter().any(|l| {
            l.get(4..)
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|w| w.eq_ignore_ascii_case(keyword))
        })
    }
}

/// A mail to send: the body is sent as is between DATA and `.\r\n`, so it must end with CRLF
/// and be dot-stuffed already.
#[derive(Clone, Debug)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub body: Vec<u8>,
}

impl Mail {
    /// A scan-to-email style message with a dot-stuffed line and 8-bit bytes.
    pub fn sample() -> Mail {
        let mut body = b"From: Scanner <scanner@example.com>\r\n\
            To: Office <office@example.com>\r\n\
            Subject: Scan 0001\r\n\
            MIME-Version: 1.0\r\n\
            Content-Type: text/plain; charset=utf-8\r\n\
            \r\n\
            Scanned page attached.\r\n\
            ..a line that starts with a dot (dot-stuffed)\r\n\
            caf\xc3\xa9 8-bit bytes\r\n"
            .to_vec();
        for i in 0..200 {
            body.extend_from_slice(format!("line {i:04} of the scanned document\r\n").as_bytes());
        }
        Mail {
            from: "<scanner@example.com>".to_string(),
            to: vec![
                "<office@example.com>".to_string(),
                "<archive@example.com>".to_string(),
            ],
            body,
        }
    }
}

/// The EHLO name the device uses: it must never show up in the upstream's plaintext.
pub const DEVICE_EHLO: &str = "legacy-printer.device.test";

/// An SMTP client over any stream.
pub struct SmtpClient<S> {
    pub conn: Conn<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + EndOfStream> SmtpClient<S> {
    pub fn new(io: S) -> SmtpClient<S> {
        SmtpClient {
            conn: Conn::new(io, DEVICE_TIMEOUT),
        }
    }

    /// Reads one (possibly multi-line) reply.
    pub async fn read_reply(&mut self) -> Result<Reply> {
        let mut raw = Vec::new();
        let mut lines = Vec::new();
        loop {
            let Some(line) = self.conn.read_line().await? else {
                bail!(
                    "connection closed while waiting for a reply (got {:?})",
                    String::from_utf8_lossy(&raw)
                );
            };
            raw.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            let last = text.as_bytes().get(3) != Some(&b'-');
            lines.push(text);
            if last {
                break;
            }
        }
        let code = lines[0]
            .get(..3)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an SMTP reply: {:?}", String::from_utf8_lossy(&raw)))?;
        Ok(Reply { code, lines, raw })
    }

    /// Sends `line` + CRLF and reads the reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply> {
        self.conn
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.read_reply()
            .await
            .with_context(|| format!("reply to {line:?}"))
    }

    /// Like [`command`](Self::command), failing unless the reply code is `code`.
    pub async fn expect(&mut self, line: &str, code: u16) -> Result<Reply> {
        let reply = self.command(line).await?;
        ensure!(
            reply.code == code,
            "{line:?} got {:?}, expected {code}",
            reply.text()
        );
        Ok(reply)
    }

    /// Reads the greeting, failing unless it is a 220.
    pub async fn greeting(&mut self) -> Result<Reply> {
        let reply = self.read_reply().await.context("greeting")?;
        ensure!(
            reply.code == 220,
            "greeting {:?}, expected 220",
            reply.text()
        );
        Ok(reply)
    }

    /// EHLO, MAIL, RCPT..., DATA, body, QUIT; every reply checked.
    pub async fn send_mail(&mut self, mail: &Mail) -> Result<()> {
        self.expect(&format!("EHLO {DEVICE_EHLO}"), 250).await?;
        self.expect(&format!("MAIL FROM:{}", mail.from), 250)
            .await?;
        for to in &mail.to {
            self.expect(&format!("RCPT TO:{to}"), 250).await?;
        }
        self.expect("DATA", 354).await?;
        let mut payload = mail.body.clone();
        payload.extend_from_slice(b".\r\n");
        self.conn.write_all(&payload).await?;
        let reply = self.read_reply().await.context("reply to the message")?;
        ensure!(reply.code == 250, "message got {:?}", reply.text());
        self.expect("QUIT", 221).await?;
        Ok(())
    }

    /// Reads until the proxy closes; returns what came and how it ended.
    pub async fn read_to_close(&mut self) -> Result<(Vec<u8>, Close)> {
        self.conn.read_to_close().await
    }
}

impl SmtpClient<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Result<SmtpClient<TcpStream>> {
        Ok(SmtpClient::new(connect(addr).await?))
    }

    /// Starts TLS on this connection after a 220 to STARTTLS. Fails if the server sent anything
    /// after its 220 before the handshake.
    pub async fn start_tls(
        self,
        legacy: Legacy,
        verify: &Verify,
    ) -> Result<SmtpClient<SslStream<TcpStream>>> {
        let (tcp, leftover) = self.conn.into_inner();
        ensure!(
            leftover.is_empty(),
            "the server sent bytes after its 220 to STARTTLS: {:?}",
            String::from_utf8_lossy(&leftover)
        );
        let stream = tls_connect(tcp, legacy, verify, "localhost").await?;
        Ok(SmtpClient::new(stream))
    }
}

/// How the device reaches the proxy.
#[derive(Clone, Copy, Debug)]
pub enum DeviceMode {
    /// Plaintext dialog, then STARTTLS.
    Starttls(Legacy),
    /// Implicit TLS (SMTPS, 465).
    Tls(Legacy),
    /// No TLS at all.
    Plain,
}

/// Everything one device session saw.
pub struct SmtpTranscript {
    /// The pre-TLS banner (starttls), or the greeting received after the handshake (tls), or the
    /// greeting (plain).
    pub greeting: Reply,
    /// The reply to the pre-TLS EHLO (starttls only).
    pub plaintext_ehlo: Option<Reply>,
    /// Negotiated version and cipher (None for plain).
    pub tls: Option<(String, String)>,
    /// Bytes the device sent on the encrypted (or, for plain, the relayed) part of the session.
    pub sent_relayed: Vec<u8>,
    /// Bytes the device received on that part, greeting included for tls/plain.
    pub received_relayed: Vec<u8>,
    pub close: Close,
}

impl std::fmt::Debug for SmtpTranscript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTranscript")
            .field("greeting", &self.greeting)
            .field("plaintext_ehlo", &self.plaintext_ehlo)
            .field("tls", &self.tls)
            .field("sent_relayed", &preview(&self.sent_relayed))
            .field("received_relayed", &preview(&self.received_relayed))
            .field("close", &self.close)
            .finish()
    }
}

/// One full SMTP session as a device: dialog, TLS, a mail, QUIT, and the close.
pub async fn smtp_session(
    addr: SocketAddr,
    mode: DeviceMode,
    verify: &Verify,
    mail: &Mail,
) -> Result<SmtpTranscript> {
    match mode {
        DeviceMode::Starttls(legacy) => {
            let mut plain = SmtpClient::connect(addr).await?;
            let greeting = plain.greeting().await?;
            let ehlo = plain.expect(&format!("EHLO {DEVICE_EHLO}"), 250).await?;
            ensure!(
                ehlo.offers("STARTTLS"),
                "EHLO reply does not offer STARTTLS: {:?}",
                ehlo.text()
            );
            plain.expect("STARTTLS", 220).await?;
            let mut tls = plain.start_tls(legacy, verify).await?;
            let info = tls_info(tls.conn.get_ref());
            tls.send_mail(mail).await?;
            let (_, close) = tls.read_to_close().await?;
            Ok(SmtpTranscript {
                greeting,
                plaintext_ehlo: Some(ehlo),
                tls: Some(info),
                sent_relayed: tls.conn.sent.clone(),
                received_relayed: tls.conn.received.clone(),
                close,
            })
        }
        DeviceMode::Tls(legacy) => {
            let tcp = connect(addr).await?;
            let stream = tls_connect(tcp, legacy, verify, "localhost").await?;
            let info = tls_info(&stream);
            let mut tls = SmtpClient::new(stream);
            let greeting = tls.greeting().await?;
            tls.send_mail(mail).await?;
            let (_, close) = tls.read_to_close().await?;
            Ok(SmtpTranscript {
                greeting,
                plaintext_ehlo: None,
                tls: Some(info),
                sent_relayed: tls.conn.sent.clone(),
                received_relayed: tls.conn.received.clone(),
                close,
            })
        }
        DeviceMode::Plain => {
            let mut plain = SmtpClient::connect(addr).await?;
            let greeting = plain.greeting().await?;
            plain.send_mail(mail).await?;
            let (_, close) = plain.read_to_close().await?;
            Ok(SmtpTranscript {
                greeting,
                plaintext_ehlo: None,
                tls: None,
                sent_relayed: plain.conn.sent.clone(),
                received_relayed: plain.conn.received.clone(),
                close,
            })
        }
    }
}

/// Writes `payload`, shuts the write side down (close_notify, then FIN), then reads until the
/// peer ends the stream. The peer must buffer (or the proxy carry) the whole payload.
pub async fn write_shutdown_read(
    mut stream: SslStream<TcpStream>,
    payload: &[u8],
    limit: Duration,
) -> Result<(Vec<u8>, Close)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        stream.write_all(payload).await.context("device write")?;
        stream
            .shutdown()
            .await
            .context("device shutdown (close_notify)")?;
        let mut received = Vec::with_capacity(payload.len());
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => {
                    let close = std::future::poll_fn(|cx| stream.poll_end_kind(cx)).await;
                    return Ok((received, close));
                }
                Ok(n) => received.extend_from_slice(&chunk[..n]),
                Err(err) => return Ok((received, super::lines::classify(&err))),
            }
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .with_context(|| format!("write/shutdown/read did not finish within {limit:?}"))?
}

/// Like [`write_shutdown_read`], but reads while writing, for a peer that answers as data comes.
pub async fn write_shutdown_read_concurrently(
    stream: SslStream<TcpStream>,
    payload: &[u8],
    limit: Duration,
) -> Result<(Vec<u8>, Close)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        writer.write_all(payload).await.context("device write")?;
        writer
            .shutdown()
            .await
            .context("device shutdown (close_notify)")?;
        anyhow::Ok(())
    };
    let read = async {
        let mut received = Vec::with_capacity(payload.len());
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) => return anyhow::Ok((received, None)),
                Ok(n) => received.extend_from_slice(&chunk[..n]),
                Err(err) => return Ok((received, Some(super::lines::classify(&err)))),
            }
        }
    };
    let ((), (received, close)) =
        tokio::time::timeout(limit, async { tokio::try_join!(write, read) })
            .await
            .with_context(|| format!("concurrent write/read did not finish within {limit:?}"))??;
    let close = match close {
        Some(close) => close,
        None => {
            let mut stream = reader.unsplit(writer);
            std::future::poll_fn(|cx| stream.poll_end_kind(cx)).await
        }
    };
    Ok((received, close))
}
