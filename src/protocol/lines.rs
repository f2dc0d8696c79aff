//! A line-oriented connection for the plaintext dialogs: bounded lines, and the bytes read past
//! the last line handed back so the caller can refuse to carry them into TLS.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{DialogError, MAX_LINE};

/// A line-oriented connection with a bounded buffer. `into_parts` hands back the stream and any
/// bytes read past the last line, so the caller can refuse to carry them into TLS.
pub struct LineConn<S> {
    stream: S,
    buf: Vec<u8>,
    max: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LineConn<S> {
    pub fn new(stream: S) -> Self {
        LineConn::with_max_line(stream, MAX_LINE)
    }

    /// A connection whose lines may be up to `max` octets, terminator included (the login
    /// dialogs after TLS carry base64 SASL responses longer than a pre-TLS command).
    pub fn with_max_line(stream: S, max: usize) -> Self {
        LineConn {
            stream,
            buf: Vec::with_capacity(MAX_LINE),
            max,
        }
    }

    /// Reads one line, terminator included.
    pub async fn read_line(&mut self) -> Result<Vec<u8>, DialogError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                if end + 1 > self.max {
                    return Err(DialogError::LineTooLong);
                }
                return Ok(self.buf.drain(..=end).collect());
            }
            if self.buf.len() >= self.max {
                return Err(DialogError::LineTooLong);
            }
            let mut chunk = [0u8; MAX_LINE];
            let room = (self.max - self.buf.len()).min(MAX_LINE);
            let n = self.stream.read(&mut chunk[..room]).await?;
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
