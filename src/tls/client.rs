//! The upstream leg's TLS stream, on rustls' unbuffered API.
//!
//! rustls' buffered connection keeps a 4 KiB receive buffer for its whole life, idle or not:
//! the largest part of what an idle relayed connection held on the upstream side. Here the
//! stream owns its buffers and holds none while nothing moves: TLS bytes are read only once
//! the socket is readable, and each buffer is freed as soon as it is empty. A partial record
//! between two reads, or bytes the socket did not take, are all that is ever kept.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{ClientConfig, CommonState};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Room for one whole TLS record per socket read.
const READ_SIZE: usize = 16 * 1024 + 2048 + 5;
/// Plaintext encrypted per write call: one full record.
const WRITE_SIZE: usize = 16 * 1024;

/// A verified TLS client connection over TCP (the handshake is done by `connect`).
pub struct ClientStream {
    tcp: TcpStream,
    conn: UnbufferedClientConnection,
    /// TLS bytes read and not yet processed (a partial record).
    incoming: Vec<u8>,
    /// Decrypted bytes not yet read, from `taken` on.
    plaintext: Vec<u8>,
    taken: usize,
    /// TLS bytes not yet written to the socket, from `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer's close_notify arrived: reads return end of stream.
    peer_closed: bool,
    /// The socket reached end of stream.
    eof: bool,
    /// A close was asked for; `close_queued` once the close_notify is encrypted.
    closing: bool,
    close_queued: bool,
}

/// Where one round of record processing stopped.
enum Stop {
    /// The peer must send more bytes first.
    NeedBytes,
    /// The connection is established: `usize` bytes of the offered plaintext were encrypted.
    Traffic(usize),
    /// Both sides have closed.
    Closed,
}

impl ClientStream {
    /// The TLS handshake over `tcp`, verifying the server as `name` with `config`.
    pub async fn connect(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        tcp: TcpStream,
    ) -> io::Result<ClientStream> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
        let mut stream = ClientStream {
            tcp,
            conn,
            incoming: Vec::new(),
            plaintext: Vec::new(),
            taken: 0,
            outgoing: Vec::new(),
            sent: 0,
            peer_closed: false,
            eof: false,
            closing: false,
            close_queued: false,
        };
        poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    /// The negotiated version, suite and the server's certificates.
    pub fn tls_state(&self) -> &CommonState {
        &self.conn
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let stop = self.process(&[])?;
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match stop {
                Stop::NeedBytes | Stop::Traffic(_) => ready!(self.poll_receive(cx))?,
                Stop::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            }
        }
    }

    /// Processes the records in `incoming` until the connection waits for the peer or is ready
    /// for traffic, then encrypts what it can of `data`. Handshake records go to `outgoing`,
    /// decrypted ones to `plaintext`.
    fn process(&mut self, data: &[u8]) -> io::Result<Stop> {
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let stop = match state.map_err(tls_error)? {
                ConnectionState::EncodeTlsData(mut encode) => {
                    append(&mut self.outgoing, 512, |room| {
                        encode.encode(room).map_err(|err| match err {
                            EncodeError::InsufficientSize(size) => Some(size.required_size),
                            _ => None,
                        })
                    })?;
                    None
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // The bytes leave with the next `poll_send`, in order with everything else.
                    transmit.done();
                    None
                }
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        self.plaintext.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    Some(Stop::Closed)
                }
                ConnectionState::BlockedHandshake => Some(Stop::NeedBytes),
                ConnectionState::WriteTraffic(mut traffic) => {
                    let data = &data[..data.len().min(WRITE_SIZE)];
                    if !data.is_empty() {
                        append(&mut self.outgoing, data.len() + 256, |room| {
                            traffic.encrypt(data, room).map_err(needed)
                        })?;
                    } else if self.closing && !self.close_queued {
                        append(&mut self.outgoing, 64, |room| {
                            traffic.queue_close_notify(room).map_err(needed)
                        })?;
                        self.close_queued = true;
                    }
                    Some(Stop::Traffic(data.len()))
                }
                _ => return Err(io::Error::other("unexpected TLS connection state")),
            };
            self.incoming.drain(..discard);
            if self.incoming.is_empty() {
                self.incoming = Vec::new();
            }
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// Writes `outgoing` to the socket; ready once it is all written (then it is freed).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let written = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += written;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has into `incoming`, allocating only once it is readable.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.eof {
            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
        }
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            self.incoming.reserve(READ_SIZE);
            let before = self.incoming.len();
            match self.tcp.try_read_buf(&mut self.incoming) {
                Ok(0) => {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => return Poll::Ready(Ok(())),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if before == 0 {
                        self.incoming = Vec::new();
                    }
                }
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }

    /// Moves decrypted bytes to `buf`; frees `plaintext` once all of it is read.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.plaintext.len() - self.taken);
        buf.put_slice(&self.plaintext[self.taken..self.taken + n]);
        self.taken += n;
        if self.taken == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.taken = 0;
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.plaintext.len() {
                this.take_plaintext(buf);
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            this.process(&[])?;
            // Handshake messages after the handshake (TLS 1.3 tickets, key updates) may want
            // an answer; never wait on it here, so a full send buffer cannot stall reading.
            if let Poll::Ready(Err(err)) = this.poll_send(cx) {
                return Poll::Ready(Err(err));
            }
            if this.taken < this.plaintext.len() || this.peer_closed {
                continue;
            }
            if this.eof {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            ready!(this.poll_receive(cx))?;
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // At most one batch in flight: the socket takes the last one before more is encrypted.
        ready!(this.poll_send(cx))?;
        match this.process(data)? {
            Stop::Traffic(taken) => {
                // Start sending now; what the socket does not take waits for the next call.
                if let Poll::Ready(Err(err)) = this.poll_send(cx) {
                    return Poll::Ready(Err(err));
                }
                Poll::Ready(Ok(taken))
            }
            Stop::NeedBytes => Poll::Ready(Err(io::Error::other("TLS handshake not complete"))),
            Stop::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// Sends close_notify, then a FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            ready!(this.poll_send(cx))?;
            this.closing = true;
            this.process(&[])?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Lets `write` fill room at the end of `buf`: `guess` bytes first, then as many as it says it
/// needs (`Err(Some(n))`); `Err(None)` is a failure.
fn append(
    buf: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
    let start = buf.len();
    let mut room = guess;
    loop {
        buf.resize(start + room, 0);
        match write(&mut buf[start..]) {
            Ok(written) => {
                buf.truncate(start + written);
                return Ok(());
            }
            Err(Some(needed)) if needed > room => room = needed,
            Err(_) => {
                buf.truncate(start);
                return Err(io::Error::other("cannot encode a TLS record"));
            }
        }
    }
}

fn needed(err: EncryptError) -> Option<usize> {
    match err {
        EncryptError::InsufficientSize(size) => Some(size.required_size),
        _ => None,
    }
}

fn tls_error(err: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err)
}
