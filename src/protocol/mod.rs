//! The plaintext dialogs before TLS. Each protocol module owns both roles of its dialog: the
//! server role towards the device (`device_*`) and the client role towards the upstream
//! (`upstream_*`). Everything here runs over any `AsyncRead + AsyncWrite`, so it is tested over
//! `tokio::io::duplex` without sockets.

pub mod imap;
pub mod pop3;
pub mod sasl;
pub mod smtp;
#[cfg(test)]
mod testing;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Protocol;

/// Longest line accepted before TLS, CRLF included (SMTP's limit is 512 octets; IMAP and POP3
/// get the same, which every real pre-TLS command fits in).
pub const MAX_LINE: usize = 512;

/// Commands a device may send before STARTTLS; a real device needs three or four.
pub const MAX_COMMANDS: usize = 16;

/// Lines in one multi-line upstream reply before it counts as hostile.
pub const MAX_REPLY_LINES: usize = 64;

/// Why a pre-TLS dialog ended without reaching TLS.
#[derive(Debug, thiserror::Error)]
pub enum DialogError {
    #[error("peer closed the connection during the dialog")]
    Closed,
    #[error("line longer than {MAX_LINE} octets")]
    LineTooLong,
    #[error("more than {MAX_COMMANDS} commands before STARTTLS")]
    TooManyCommands,
    #[error("device quit before STARTTLS")]
    Quit,
    #[error("{0}")]
    Protocol(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// What the device side of a STARTTLS dialog learned.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StartTls {
    /// The IMAP tag of the STARTTLS command, needed for the tagged reply.
    pub tag: Option<String>,
    /// The name the device gave in SMTP EHLO/HELO (it often names the device model).
    pub client_name: Option<String>,
}

/// A line-oriented connection with a bounded buffer. `into_parts` hands back the stream and any
/// bytes read past the last line, so the caller can refuse to carry them into TLS.
pub struct LineConn<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LineConn<S> {
    pub fn new(stream: S) -> Self {
        LineConn {
            stream,
            buf: Vec::with_capacity(MAX_LINE),
        }
    }

    /// Reads one line, terminator included.
    pub async fn read_line(&mut self) -> Result<Vec<u8>, DialogError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                if end + 1 > MAX_LINE {
                    return Err(DialogError::LineTooLong);
                }
                return Ok(self.buf.drain(..=end).collect());
            }
            if self.buf.len() >= MAX_LINE {
                return Err(DialogError::LineTooLong);
            }
            let mut chunk = [0u8; MAX_LINE];
            let n = self
                .stream
                .read(&mut chunk[..MAX_LINE - self.buf.len()])
                .await?;
            if n == 0 {
                return Err(DialogError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads one line as text without its terminator; non-UTF-8 bytes become U+FFFD.
    pub async fn read_text(&mut self) -> Result<String, DialogError> {
        let line = self.read_line().await?;
        Ok(String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_string())
    }

    /// Consumes exactly `n` octets (an IMAP literal's data).
    pub async fn skip(&mut self, mut n: usize) -> Result<(), DialogError> {
        loop {
            let buffered = n.min(self.buf.len());
            self.buf.drain(..buffered);
            n -= buffered;
            if n == 0 {
                return Ok(());
            }
            let mut chunk = [0u8; MAX_LINE];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return Err(DialogError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..read]);
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The stream and the bytes that were read but not consumed.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }
}

/// Why the upstream dialog failed: each maps to a short reason for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamDialogError {
    #[error("upstream does not offer STARTTLS")]
    NoStarttls,
    #[error("upstream refused STARTTLS: {0}")]
    StarttlsRefused(String),
    #[error("upstream sent {0} bytes after its STARTTLS reply (injection attempt)")]
    Injection(usize),
    #[error("upstream greeting refused the session: {0}")]
    Greeting(String),
    #[error("unexpected upstream reply: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Dialog(#[from] DialogError),
}

impl UpstreamDialogError {
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamDialogError::NoStarttls => "no_starttls",
            UpstreamDialogError::StarttlsRefused(_) => "starttls_refused",
            UpstreamDialogError::Injection(_) => "starttls_injection",
            UpstreamDialogError::Greeting(_) => "greeting_refused",
            UpstreamDialogError::Unexpected(_) | UpstreamDialogError::Dialog(_) => "dialog_failed",
        }
    }
}

/// Runs the device side of the dialog until the device asks for STARTTLS (not yet answered).
pub async fn device_until_starttls<S: AsyncRead + AsyncWrite + Unpin>(
    protocol: Protocol,
    conn: &mut LineConn<S>,
    server_name: &str,
) -> Result<StartTls, DialogError> {
    match protocol {
        Protocol::Smtp => smtp::device_until_starttls(conn, server_name).await,
        Protocol::Imap => imap::device_until_starttls(conn, server_name).await,
        Protocol::Pop3 => pop3::device_until_starttls(conn, server_name).await,
        Protocol::Tcp => Err(DialogError::Protocol("tcp has no STARTTLS".into())),
    }
}

/// The positive answer to the device's STARTTLS.
pub fn starttls_accepted(protocol: Protocol, start: &StartTls) -> Vec<u8> {
    match protocol {
        Protocol::Smtp => b"220 2.0.0 Ready to start TLS\r\n".to_vec(),
        Protocol::Imap => imap::tagged(start, "OK Begin TLS negotiation now"),
        Protocol::Pop3 => b"+OK Begin TLS negotiation\r\n".to_vec(),
        Protocol::Tcp => Vec::new(),
    }
}

/// The answer to the device's STARTTLS when the upstream leg failed: a transient error.
pub fn starttls_refused(protocol: Protocol, start: &StartTls, reason: &str) -> Vec<u8> {
    match protocol {
        Protocol::Smtp => {
            format!("454 4.7.0 TLS not available: upstream unavailable ({reason})\r\n").into_bytes()
        }
        Protocol::Imap => {
            let mut reply = failure_reply(protocol, reason).unwrap_or_default();
            reply.extend(imap::tagged(
                start,
                &format!("NO [UNAVAILABLE] upstream unavailable ({reason})"),
            ));
            reply
        }
        Protocol::Pop3 | Protocol::Tcp => failure_reply(protocol, reason).unwrap_or_default(),
    }
}

/// The protocol's transient error for a device that expects a greeting when the upstream leg
/// failed; `None` for opaque TCP, which has no such reply.
pub fn failure_reply(protocol: Protocol, reason: &str) -> Option<Vec<u8>> {
    let text = match protocol {
        Protocol::Smtp => format!("421 4.4.0 upstream unavailable ({reason}), try again later\r\n"),
        Protocol::Imap => {
            format!("* BYE [UNAVAILABLE] upstream unavailable ({reason}), try again later\r\n")
        }
        Protocol::Pop3 => {
            format!("-ERR [SYS/TEMP] upstream unavailable ({reason}), try again later\r\n")
        }
        Protocol::Tcp => return None,
    };
    Some(text.into_bytes())
}

/// The client side of the upstream's dialog up to its positive STARTTLS answer. Returns the
/// greeting the upstream sent, to hand to a device that expects one.
pub async fn upstream_starttls<S: AsyncRead + AsyncWrite + Unpin>(
    protocol: Protocol,
    conn: &mut LineConn<S>,
    client_name: &str,
) -> Result<Vec<u8>, UpstreamDialogError> {
    match protocol {
        Protocol::Smtp => smtp::upstream_starttls(conn, client_name).await,
        Protocol::Imap => imap::upstream_starttls(conn).await,
        Protocol::Pop3 => pop3::upstream_starttls(conn).await,
        Protocol::Tcp => Err(UpstreamDialogError::Unexpected(
            "tcp has no STARTTLS".into(),
        )),
    }
}

/// Reads the greeting an implicit-TLS upstream sends first (none for opaque TCP).
pub async fn upstream_greeting<S: AsyncRead + AsyncWrite + Unpin>(
    protocol: Protocol,
    conn: &mut LineConn<S>,
) -> Result<Vec<u8>, UpstreamDialogError> {
    match protocol {
        Protocol::Smtp => smtp::read_greeting(conn).await,
        Protocol::Imap => imap::read_greeting(conn, false).await,
        Protocol::Pop3 => pop3::read_greeting(conn).await,
        Protocol::Tcp => Ok(Vec::new()),
    }
}

/// The greeting to show a device that expects one, from a greeting the upstream sent before
/// STARTTLS: capabilities seen before TLS are not carried across.
pub fn greeting_for_device(protocol: Protocol, pre_tls_greeting: &[u8]) -> Vec<u8> {
    match protocol {
        Protocol::Imap => imap::strip_capabilities(pre_tls_greeting),
        _ => pre_tls_greeting.to_vec(),
    }
}

/// The first word of a command line, upper-cased, and the rest.
pub(crate) fn verb(line: &str) -> (String, &str) {
    let line = line.trim_start();
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    (verb.to_ascii_uppercase(), rest.trim())
}

/// True when the last bytes each side sent are the protocol's own goodbye (SMTP 221/421 after
/// QUIT, IMAP `* BYE`, POP3 `+OK` after QUIT): an upstream that then closes without
/// close_notify has still ended the session cleanly.
pub fn said_goodbye(protocol: Protocol, from_device: &[u8], from_upstream: &[u8]) -> bool {
    let last_line = |bytes: &[u8]| -> Vec<u8> {
        let trimmed = bytes
            .strip_suffix(b"\r\n")
            .or_else(|| bytes.strip_suffix(b"\n"))
            .unwrap_or(bytes);
        let start = trimmed
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        trimmed[start..].to_ascii_uppercase()
    };
    let (device, upstream) = (last_line(from_device), last_line(from_upstream));
    match protocol {
        Protocol::Smtp => upstream.starts_with(b"221") || upstream.starts_with(b"421"),
        Protocol::Imap => from_upstream.windows(5).any(|w| w == b"* BYE"),
        Protocol::Pop3 => device == b"QUIT" && upstream.starts_with(b"+OK"),
        Protocol::Tcp => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goodbyes_are_recognised_per_protocol() {
        assert!(said_goodbye(
            Protocol::Smtp,
            b"QUIT\r\n",
            b"250 OK\r\n221 2.0.0 Bye\r\n"
        ));
        assert!(!said_goodbye(
            Protocol::Smtp,
            b"DATA\r\n",
            b"354 go ahead\r\n"
        ));
        assert!(said_goodbye(
            Protocol::Imap,
            b"a LOGOUT\r\n",
            b"* BYE bye\r\na OK done\r\n"
        ));
        assert!(said_goodbye(Protocol::Pop3, b"QUIT\r\n", b"+OK bye\r\n"));
        assert!(!said_goodbye(
            Protocol::Pop3,
            b"RETR 1\r\n",
            b"+OK 120 octets\r\n"
        ));
        assert!(!said_goodbye(Protocol::Tcp, b"", b""));
    }
}
