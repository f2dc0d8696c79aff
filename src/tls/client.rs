//! The upstream leg's TLS stream, on rustls' unbuffered API.
//!
//! rustls' buffered connection keeps a 4 KiB receive buffer for its whole life, idle or not:
//! the largest part of what an idle relayed connection held on the upstream side. Here the
//! stream owns its buffers and holds none while nothing moves: TLS bytes are read only once
//! the socket is readable, and each buffer is freed as soon as it is empty. A partial record
//! between two reads, or bytes the socket did not take, are all that is ever kept.

use std::cell::RefCell;
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

thread_local! {
    /// Where a write's records are sealed before they go to the socket: what the socket takes
    /// at once never touches the connection's own heap.
    static SEALED: RefCell<Vec<u8>> = RefCell::new(vec![0; WRITE_SIZE + 1024]);
}

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
            let stop = self.process(&[], None)?;
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
    /// for traffic, then encrypts what it can of `data` and offers it to the socket. Handshake
    /// records and what the socket did not take go to `outgoing`; decrypted bytes to `out` as
    /// far as it has room, the rest to `plaintext`.
    fn process(&mut self, data: &[u8], mut out: Option<&mut ReadBuf<'_>>) -> io::Result<Stop> {
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let state = match state {
                Ok(state) => state,
                Err(err) => {
                    self.send_alert();
                    return Err(tls_error(err));
                }
            };
            let stop = match state {
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
                        let mut payload = record.map_err(tls_error)?.payload;
                        if let Some(out) = out.as_deref_mut().filter(|_| self.plaintext.is_empty())
                        {
                            let direct = payload.len().min(out.remaining());
                            out.put_slice(&payload[..direct]);
                            payload = &payload[direct..];
                        }
                        self.plaintext.extend_from_slice(payload);
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
                        SEALED.with_borrow_mut(|sealed| {
                            let len = traffic.encrypt(data, sealed).map_err(|err| {
                                io::Error::other(format!("cannot encrypt: {err:?}"))
                            })?;
                            offer(&self.tcp, &mut self.outgoing, &sealed[..len])
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

    /// After an error: the alert rustls queued for the peer goes out if the socket takes it
    /// now (the connection is over either way).
    fn send_alert(&mut self) {
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) =
            self.conn.process_tls_records(&mut []).state
        {
            let _ = append(&mut self.outgoing, 64, |room| {
                encode.encode(room).map_err(|_| None)
            });
        }
        let _ = self.tcp.try_write(&self.outgoing[self.sent..]);
    }

    /// Writes `outgoing` to the socket; ready once it is all written (then it is freed).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let written =
                ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
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
            let filled = buf.filled().len();
            this.process(&[], Some(buf))?;
            // Handshake messages after the handshake (TLS 1.3 tickets, key updates) may want
            // an answer; never wait on it here, so a full send buffer cannot stall reading.
            if let Poll::Ready(Err(err)) = this.poll_send(cx) {
                return Poll::Ready(Err(err));
            }
            if buf.filled().len() > filled {
                return Poll::Ready(Ok(()));
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
        match this.process(data, None)? {
            Stop::Traffic(taken) => {
                // What the socket did not take waits for the next call; be woken when it can.
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
            this.process(&[], None)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Writes `sealed` records to `tcp` as far as it takes them now (nothing goes ahead of bytes
/// already waiting in `outgoing`); keeps the rest in `outgoing`.
fn offer(tcp: &TcpStream, outgoing: &mut Vec<u8>, sealed: &[u8]) -> io::Result<()> {
    let written = if outgoing.is_empty() {
        match tcp.try_write(sealed) {
            Ok(written) => written,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
            Err(err) => return Err(err),
        }
    } else {
        0
    };
    outgoing.extend_from_slice(&sealed[written..]);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A rustls server for `upstream.test` speaking `version`, and a client config trusting it.
    fn pki(version: &'static SupportedProtocolVersion) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let pair = rcgen::generate_simple_self_signed(vec!["upstream.test".into()]).unwrap();
        let cert = CertificateDer::from(pair.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("upstream.test").unwrap()
    }

    /// A rustls server for one connection; `then` gets it once the handshake is done.
    async fn serve_once<F, Fut>(server: Arc<ServerConfig>, then: F) -> std::net::SocketAddr
    where
        F: FnOnce(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .unwrap();
            then(tls).await;
        });
        addr
    }

    /// An echo server until close_notify, which it answers with its own.
    async fn echo_server(server: Arc<ServerConfig>) -> std::net::SocketAddr {
        serve_once(server, |mut tls| async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => tls.write_all(&buf[..n]).await.unwrap(),
                }
            }
            let _ = tls.shutdown().await;
        })
        .await
    }

    #[tokio::test]
    async fn an_idle_stream_holds_no_buffer_and_closes_cleanly() {
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let (server, client) = pki(version);
            let tcp = TcpStream::connect(echo_server(server).await).await.unwrap();
            let mut tls = ClientStream::connect(client, name(), tcp).await.unwrap();
            let sent: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
            let mut echoed = vec![0u8; sent.len()];
            let (mut reader, mut writer) = tokio::io::split(tls);
            let (write, read) =
                tokio::join!(writer.write_all(&sent), reader.read_exact(&mut echoed));
            write.unwrap();
            read.unwrap();
            assert_eq!(echoed, sent, "{version:?}");
            tls = reader.unsplit(writer);
            let held = (
                tls.incoming.capacity(),
                tls.plaintext.capacity(),
                tls.outgoing.capacity(),
            );
            assert_eq!(
                held,
                (0, 0, 0),
                "{version:?}: an idle stream holds no buffer"
            );
            tls.shutdown().await.unwrap();
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest).await.unwrap();
            assert!(
                rest.is_empty() && tls.peer_closed,
                "{version:?}: a clean end"
            );
        }
    }

    #[tokio::test]
    async fn a_bare_fin_garbage_and_an_untrusted_server_are_errors() {
        let (server, client) = pki(&rustls::version::TLS13);
        // A server that ends without close_notify, then one that sends bytes that are not TLS.
        for tail in [&b""[..], b"\x17\x03\x03\x00\x05hello"] {
            let addr = serve_once(server.clone(), move |mut tls| async move {
                tls.get_mut().0.write_all(tail).await.unwrap();
                tls.get_mut().0.shutdown().await.unwrap();
            })
            .await;
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = ClientStream::connect(client.clone(), name(), tcp)
                .await
                .unwrap();
            let err = tls.read(&mut [0u8; 64]).await.unwrap_err();
            let expected = match tail.is_empty() {
                true => io::ErrorKind::UnexpectedEof,
                false => io::ErrorKind::InvalidData,
            };
            assert_eq!(err.kind(), expected, "{err}");
        }
        // A server the client does not trust hears why, in an alert.
        let (untrusted, _) = pki(&rustls::version::TLS13);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heard = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let err = match tokio_rustls::TlsAcceptor::from(untrusted).accept(tcp).await {
                Ok(_) => panic!("an untrusted server's handshake succeeded"),
                Err(err) => err,
            };
            err.into_inner()
                .and_then(|e| e.downcast::<rustls::Error>().ok())
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let refused = ClientStream::connect(client.clone(), name(), tcp).await;
        assert_eq!(
            refused.err().map(|e| e.kind()),
            Some(io::ErrorKind::InvalidData)
        );
        let alert = heard.await.unwrap();
        assert!(
            matches!(alert.as_deref(), Some(rustls::Error::AlertReceived(_))),
            "the server got {alert:?}"
        );
        // Garbage instead of a ServerHello fails the handshake, without waiting.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let _ = tcp.write_all(b"220 smtp.example ESMTP\r\n").await;
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err = match ClientStream::connect(client, name(), tcp).await {
            Ok(_) => panic!("a handshake with a plaintext greeting succeeded"),
            Err(err) => err,
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }
}
