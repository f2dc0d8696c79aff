//! The device phase: everything from the first byte to an established device leg, under the
//! device's one pre-TLS deadline (`device_tls.handshake_timeout`): the plaintext dialog
//! (STARTTLS server role), the answer to STARTTLS once the upstream leg resolves, discarding
//! what the device pipelined after STARTTLS, and the OpenSSL handshake (with its SNI).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_openssl::SslStream;
use tokio_util::either::Either;
use tracing::warn;

use crate::audit::SessionRecord;
use crate::context::Shared;
use crate::outcome::{Failure, Outcome, Stall};
use crate::protocol::{self, Dialect, DialogError, LineConn};
use crate::tls::legacy::{DeviceTls, HandshakeError, LegacyAcceptor};
use crate::upstream::{LazyUpstream, UpstreamLeg};

/// The device's connection once its leg is set up: TLS, or plain where the route opts in.
pub type DeviceStream = Either<Box<SslStream<TcpStream>>, TcpStream>;

/// The TCP connection under a device stream.
pub fn tcp(stream: &DeviceStream) -> &TcpStream {
    match stream {
        Either::Left(tls) => tls.get_ref(),
        Either::Right(tcp) => tcp,
    }
}

/// An established device leg.
pub struct DeviceLeg {
    pub stream: DeviceStream,
    /// `None` for a plaintext device.
    pub tls: Option<DeviceTls>,
}

/// Waits (within the deadline) until the device has sent its first byte, without consuming it.
/// A device that closes without sending anything is not a device: `Outcome::DeviceSilent`.
pub async fn first_byte(tcp: &TcpStream, deadline: Instant) -> Result<(), Failure> {
    let mut byte = [0u8; 1];
    match timeout_at(deadline, tcp.peek(&mut byte)).await {
        Err(_) => Err(Failure::stalled(Stall::FirstByte)),
        Ok(Ok(0)) | Ok(Err(_)) => Err(Failure::new(
            Outcome::DeviceSilent,
            "closed without sending anything",
        )),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Implicit TLS: the upstream leg starts with the device's first byte (its ClientHello), then
/// the handshake. A refused SNI is recorded (sanitised) for the log.
pub async fn implicit_tls(
    acceptor: &LegacyAcceptor,
    tcp: TcpStream,
    sni_allow: Option<Arc<[String]>>,
    deadline: Instant,
    upstream: &mut LazyUpstream,
    record: &mut SessionRecord<'_>,
) -> Result<DeviceLeg, Failure> {
    first_byte(&tcp, deadline).await?;
    upstream.start();
    let (stream, tls) = handshake(acceptor, tcp, sni_allow, deadline, record).await?;
    Ok(DeviceLeg {
        stream,
        tls: Some(tls),
    })
}

/// A plaintext device (an opt-in route).
pub fn plain(tcp: TcpStream) -> DeviceLeg {
    DeviceLeg {
        stream: Either::Right(tcp),
        tls: None,
    }
}

/// STARTTLS: the dialog up to the device's STARTTLS (the upstream leg starts with the device's
/// first command after the greeting); then, once the upstream leg resolves, the answer (a
/// transient refusal if the upstream failed, and the session ends there), and the handshake.
/// A device that sent anything after STARTTLS before the go-ahead is closed at once: those
/// bytes never reach TLS. Every write has the device's one pre-TLS deadline.
pub async fn starttls(
    dialect: Dialect,
    shared: &Shared,
    tcp: TcpStream,
    deadline: Instant,
    upstream: &mut LazyUpstream,
    record: &mut SessionRecord<'_>,
) -> Result<(DeviceLeg, UpstreamLeg), Failure> {
    let mut conn = LineConn::new(StartOnFirstByte {
        tcp,
        upstream: &mut *upstream,
    });
    let dialog = protocol::device_until_starttls(dialect, &mut conn, shared.server_name());
    let start = timeout_at(deadline, dialog)
        .await
        .map_err(|_| Failure::stalled(Stall::Dialog))?
        .map_err(dialog_failure)?;
    record.client_name = start.client_name.clone();
    let (StartOnFirstByte { tcp, .. }, pipelined) = conn.into_parts();
    refuse_injection(&tcp, pipelined.len())?;
    let mut conn = LineConn::new(tcp);
    let leg = match upstream.wait().await {
        Ok(leg) => leg,
        Err(err) => {
            let failure = err.failure();
            let reason = match failure.outcome {
                Outcome::Upstream(cause) => cause.reason(),
                _ => "internal",
            };
            let refusal = protocol::starttls_refused(dialect, &start, reason);
            let _ = timeout_at(deadline, conn.send(&refusal)).await;
            return Err(failure);
        }
    };
    let (tcp, _) = conn.into_parts();
    // Bytes that arrived while the upstream leg was on its way are injected too.
    refuse_injection(&tcp, 0)?;
    let mut conn = LineConn::new(tcp);
    timeout_at(
        deadline,
        conn.send(&protocol::starttls_accepted(dialect, &start)),
    )
    .await
    .map_err(|_| Failure::stalled(Stall::Write))?
    .map_err(|err| Failure::new(Outcome::DeviceClosed, err))?;
    let (tcp, _) = conn.into_parts();
    let (stream, tls) = handshake(&shared.acceptor, tcp, None, deadline, record).await?;
    let device = DeviceLeg {
        stream,
        tls: Some(tls),
    };
    Ok((device, leg))
}

/// Closes a session whose device sent bytes after STARTTLS and before the go-ahead: `buffered`
/// already read, or more waiting on the socket.
fn refuse_injection(tcp: &TcpStream, buffered: usize) -> Result<(), Failure> {
    let mut byte = [0u8; 1];
    let waiting = matches!(tcp.try_read(&mut byte), Ok(n) if n > 0);
    if buffered == 0 && !waiting {
        return Ok(());
    }
    warn!(
        bytes = buffered + usize::from(waiting),
        "the device sent bytes after STARTTLS (injection attempt?): closed"
    );
    Err(Failure::new(
        Outcome::DeviceProtocolError,
        "bytes after STARTTLS before the go-ahead (STARTTLS injection): closed",
    ))
}

/// The device's TCP stream during the dialog: its first byte starts the upstream leg.
struct StartOnFirstByte<'a> {
    tcp: TcpStream,
    upstream: &'a mut LazyUpstream,
}

impl AsyncRead for StartOnFirstByte<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.upstream.start();
        }
        read
    }
}

impl AsyncWrite for StartOnFirstByte<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The OpenSSL handshake on a raw device connection, within the deadline.
async fn handshake(
    acceptor: &LegacyAcceptor,
    tcp: TcpStream,
    sni_allow: Option<Arc<[String]>>,
    deadline: Instant,
    record: &mut SessionRecord<'_>,
) -> Result<(DeviceStream, DeviceTls), Failure> {
    let accepted = timeout_at(deadline, acceptor.accept(tcp, sni_allow))
        .await
        .map_err(|_| Failure::stalled(Stall::Handshake))?;
    match accepted {
        Ok((tls, info)) => Ok((Either::Left(Box::new(tls)), info)),
        Err(err) => {
            let outcome = match &err {
                HandshakeError::SniRefused(name) => {
                    record.sni = name
                        .as_deref()
                        .map(crate::text::printable)
                        .unwrap_or_default();
                    Outcome::SniRefused
                }
                HandshakeError::Failed(_) => Outcome::DeviceHandshakeFailed,
            };
            Err(Failure::new(outcome, err))
        }
    }
}

fn dialog_failure(err: DialogError) -> Failure {
    let outcome = match err {
        // A device that says goodbye before STARTTLS ended normally: no error to report.
        DialogError::Quit => return Failure::new(Outcome::DeviceQuit, ""),
        DialogError::Closed | DialogError::Io(_) => Outcome::DeviceClosed,
        DialogError::LineTooLong | DialogError::TooManyCommands | DialogError::Protocol(_) => {
            Outcome::DeviceProtocolError
        }
    };
    Failure::new(outcome, err)
}
