//! The device phase: everything from the first byte to an established device leg, under the
//! device's one pre-TLS deadline (`device_tls.handshake_timeout`): the plaintext dialog
//! (STARTTLS server role), the answer to STARTTLS once the upstream leg resolves, discarding
//! what the device pipelined after STARTTLS, and the OpenSSL handshake (with its SNI).

use std::sync::Arc;

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

/// Implicit TLS: the handshake. A refused SNI is recorded (sanitised) for the log.
pub async fn implicit_tls(
    acceptor: &LegacyAcceptor,
    tcp: TcpStream,
    sni_allow: Option<Arc<[String]>>,
    deadline: Instant,
    record: &mut SessionRecord<'_>,
) -> Result<DeviceLeg, Failure> {
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

/// STARTTLS: the dialog up to the device's STARTTLS; then, once the upstream leg resolves, the
/// answer (a transient refusal if the upstream failed, and the session ends there), and the
/// handshake. Bytes the device pipelined after STARTTLS never reach TLS.
pub async fn starttls(
    dialect: Dialect,
    shared: &Shared,
    tcp: TcpStream,
    deadline: Instant,
    upstream: &mut LazyUpstream,
    record: &mut SessionRecord<'_>,
) -> Result<(DeviceLeg, UpstreamLeg), Failure> {
    let mut conn = LineConn::new(tcp);
    let dialog = protocol::device_until_starttls(dialect, &mut conn, shared.server_name());
    let start = timeout_at(deadline, dialog)
        .await
        .map_err(|_| Failure::stalled(Stall::Dialog))?
        .map_err(dialog_failure)?;
    record.client_name = start.client_name.clone();
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
    timeout_at(
        deadline,
        conn.send(&protocol::starttls_accepted(dialect, &start)),
    )
    .await
    .map_err(|_| Failure::stalled(Stall::Write))?
    .map_err(|err| Failure::new(Outcome::DeviceClosed, err))?;
    let (tcp, pipelined) = conn.into_parts();
    if !pipelined.is_empty() {
        warn!(
            bytes = pipelined.len(),
            "discarded bytes the device sent after STARTTLS (injection attempt?)"
        );
    }
    let (stream, tls) = handshake(&shared.acceptor, tcp, None, deadline, record).await?;
    let device = DeviceLeg {
        stream,
        tls: Some(tls),
    };
    Ok((device, leg))
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
