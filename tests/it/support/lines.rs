//! A line-oriented connection that records every byte in both directions; shared by the fake
//! upstream and the device client.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest line either side accepts (DATA lines included).
const MAX_LINE: usize = 1 << 20;

/// A stream with a read buffer and a record of what went through it.
pub struct Conn<S> {
    io: S,
    buf: Vec<u8>,
    /// Every byte read from the peer, in order.
    pub received: Vec<u8>,
    /// Every byte written to the peer, in order.
    pub sent: Vec<u8>,
    /// Bound on each single read: a stalled peer fails the test instead of hanging it.
    pub read_timeout: Duration,
}

/// How the peer ended the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// TCP FIN on a plain stream, close_notify on a TLS stream.
    Clean,
    /// A TLS stream ended without close_notify.
    UnexpectedEof,
    /// TCP reset.
    Reset,
    /// Any other read error.
    Error(String),
}

/// Tells how a stream ended after a read returned 0. The openssl crate reports a TLS stream
/// that ended without close_notify as a plain `Ok(0)`, so the TLS stream asks OpenSSL again.
pub trait EndOfStream {
    fn poll_end_kind(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Close> {
        std::task::Poll::Ready(Close::Clean)
    }
}

impl EndOfStream for tokio::net::TcpStream {}

impl EndOfStream for tokio_openssl::SslStream<tokio::net::TcpStream> {
    fn poll_end_kind(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Close> {
        use openssl::ssl::ErrorCode;
        let mut byte = [0u8; 1];
        let close = match std::task::ready!(std::pin::Pin::new(self).poll_peek(cx, &mut byte)) {
            Err(err) if err.code() == ErrorCode::ZERO_RETURN => Close::Clean,
            Err(err) if err.code() == ErrorCode::SYSCALL => match err.io_error() {
                Some(io) => classify(io),
                None => Close::UnexpectedEof,
            },
            Err(err) => Close::Error(format!("after EOF: {err}")),
            Ok(n) => Close::Error(format!("{n} bytes readable after EOF")),
        };
        std::task::Poll::Ready(close)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + EndOfStream> Conn<S> {
    pub fn new(io: S, read_timeout: Duration) -> Conn<S> {
        Conn {
            io,
            buf: Vec::new(),
            received: Vec::new(),
            sent: Vec::new(),
            read_timeout,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Reads more bytes into the buffer; `Ok(false)` at EOF.
    async fn fill(&mut self) -> Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(self.read_timeout, self.io.read(&mut chunk))
            .await
            .with_context(|| format!("no data from the peer within {:?}", self.read_timeout))?
            .context("read from the peer")?;
        self.buf.extend_from_slice(&chunk[..n]);
        self.received.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next line including its LF; `None` at EOF. A partial line before EOF is returned as
    /// is (it is still recorded in `received`).
    pub async fn read_line(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(Some(self.buf.drain(..=pos).collect()));
            }
            if self.buf.len() > MAX_LINE {
                bail!("line longer than {MAX_LINE} bytes");
            }
            if !self.fill().await? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(std::mem::take(&mut self.buf)));
            }
        }
    }

    /// Bytes read from the peer but not consumed yet.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.sent.extend_from_slice(bytes);
        self.io
            .write_all(bytes)
            .await
            .context("write to the peer")?;
        self.io.flush().await.context("flush to the peer")?;
        Ok(())
    }

    /// Shuts the write side down (close_notify on TLS, FIN on TCP).
    pub async fn shutdown(&mut self) -> Result<()> {
        self.io.shutdown().await.context("shut down the write side")
    }

    /// Reads until the peer ends the stream; returns what came (after anything buffered) and how
    /// it ended.
    pub async fn read_to_close(&mut self) -> Result<(Vec<u8>, Close)> {
        let mut rest = self.take_buffered();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let read = tokio::time::timeout(self.read_timeout, self.io.read(&mut chunk))
                .await
                .with_context(|| {
                    format!(
                        "the peer did not close within {:?} (got so far: {:?})",
                        self.read_timeout,
                        String::from_utf8_lossy(&rest)
                    )
                })?;
            match read {
                Ok(0) => {
                    let close = std::future::poll_fn(|cx| self.io.poll_end_kind(cx)).await;
                    return Ok((rest, close));
                }
                Ok(n) => {
                    rest.extend_from_slice(&chunk[..n]);
                    self.received.extend_from_slice(&chunk[..n]);
                }
                Err(err) => return Ok((rest, classify(&err))),
            }
        }
    }

    pub fn into_inner(self) -> (S, Vec<u8>) {
        (self.io, self.buf)
    }
}

/// Names a read error by how the stream ended.
pub fn classify(err: &std::io::Error) -> Close {
    let text = err.to_string().to_lowercase();
    match err.kind() {
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => Close::Reset,
        std::io::ErrorKind::UnexpectedEof => Close::UnexpectedEof,
        _ if text.contains("unexpected eof") => Close::UnexpectedEof,
        _ if text.contains("connection reset") => Close::Reset,
        _ => Close::Error(err.to_string()),
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Case-insensitive variant of [`contains`].
pub fn contains_ci(haystack: &[u8], needle: &[u8]) -> bool {
    contains(&haystack.to_ascii_uppercase(), &needle.to_ascii_uppercase())
}

/// Bytes as text for failure messages: lossy UTF-8, CR/LF escaped, long runs elided.
pub fn preview(bytes: &[u8]) -> String {
    const HEAD: usize = 600;
    const TAIL: usize = 200;
    let text = |b: &[u8]| String::from_utf8_lossy(b).escape_debug().to_string();
    if bytes.len() <= HEAD + TAIL {
        return format!("\"{}\" ({} bytes)", text(bytes), bytes.len());
    }
    format!(
        "\"{}\" ... \"{}\" ({} bytes)",
        text(&bytes[..HEAD]),
        text(&bytes[bytes.len() - TAIL..]),
        bytes.len()
    )
}
