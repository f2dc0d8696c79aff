//! One connection's way through the phases: the device leg and the upstream leg in parallel,
//! then the greeting, the relay and the closing audit event.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, field, warn, Span};

use crate::audit::SessionRecord;
use crate::config::{DeviceMode, Route, Upstream};
use crate::device::{self, DeviceStream};
use crate::greeting;
use crate::listener::{self, RouteCtx};
use crate::protocol::{self, DialogError};
use crate::proxy_protocol;
use crate::relay::{self, End, Relayed};
use crate::server::Shared;
use crate::tls::legacy::{DeviceTls, HandshakeError};
use crate::upstream::{PendingUpstream, Target, UpstreamError, UpstreamLeg};

/// Why a session ended early: a short outcome for logs and metrics, and the full cause.
#[derive(Debug)]
struct Failure {
    outcome: &'static str,
    detail: String,
    bytes: (u64, u64),
    /// The leg that failed to come up and why, for the handshake failure metric.
    leg: Option<(&'static str, &'static str)>,
}

impl Failure {
    fn new(outcome: &'static str, detail: impl ToString) -> Failure {
        Failure {
            outcome,
            detail: detail.to_string(),
            bytes: (0, 0),
            leg: None,
        }
    }

    fn device(outcome: &'static str, detail: impl ToString) -> Failure {
        Failure {
            leg: Some(("device", outcome)),
            ..Failure::new(outcome, detail)
        }
    }

    fn upstream(err: &UpstreamError) -> Failure {
        let failure = Failure::new(upstream_outcome(err), format!("{err:#}"));
        Failure {
            leg: Some(("upstream", err.reason())),
            ..failure
        }
    }
}

/// Runs one session to its end and logs `session_closed`. `_permit` is the session's place
/// under `limits.max_connections`, held until the end.
pub async fn run(
    route: Arc<RouteCtx>,
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let Some(peer) = device_address(&route, &shared, &mut tcp, peer).await else {
        return;
    };
    Span::current().record("peer", field::display(peer));
    let Some(_place) = shared.admission.per_ip(peer.ip()) else {
        listener::refuse_busy(&route, &shared, tcp, peer);
        return;
    };
    let mut record = SessionRecord::open(&route.route, peer, shared.sinks.clone());
    match drive(&route, &shared, tcp, &mut record).await {
        Ok((up, down)) => record.closed(up, down, "ok", None),
        Err(failure) => {
            if let Some((leg, reason)) = failure.leg {
                record.leg_failed(leg, reason);
            }
            let (up, down) = failure.bytes;
            record.closed(up, down, failure.outcome, Some(&failure.detail));
        }
    }
}

/// The device's address: the socket's peer, or the one a trusted balancer's PROXY header
/// names (which must then pass the route's ACL). `None` when the connection was refused.
async fn device_address(
    route: &RouteCtx,
    shared: &Shared,
    tcp: &mut TcpStream,
    peer: SocketAddr,
) -> Option<SocketAddr> {
    if !route.route.proxy_protocol {
        return Some(peer);
    }
    let refuse = |addr, outcome, why: &str| shared.sinks.refused(&route.route, addr, outcome, why);
    let wait = shared.config.device_tls.handshake_timeout;
    let real = match tokio::time::timeout(wait, proxy_protocol::read_header(tcp)).await {
        Ok(Ok(real)) => real.map_or(peer, |a| SocketAddr::new(a.ip().to_canonical(), a.port())),
        Ok(Err(err)) => {
            refuse(peer, "proxy_header", &err.to_string());
            return None;
        }
        Err(_) => {
            refuse(
                peer,
                "proxy_header",
                "no PROXY header within device_tls.handshake_timeout",
            );
            return None;
        }
    };
    if !route.allows(real.ip()) {
        refuse(
            real,
            "acl_denied",
            "device address (from the PROXY header) is not allowed",
        );
        return None;
    }
    Some(real)
}

async fn drive(
    route: &RouteCtx,
    shared: &Shared,
    tcp: TcpStream,
    record: &mut SessionRecord,
) -> Result<(u64, u64), Failure> {
    let config = &route.route;
    let mut pending = match &config.upstream {
        Upstream::Fixed { host, port } => Some(start_upstream(shared, route, host, *port)),
        Upstream::Sni { .. } => None,
    };
    let deadline = Instant::now() + shared.config.device_tls.handshake_timeout;
    let (mut device, tls, ready) = match config.device_tls {
        DeviceMode::Starttls => {
            let (device, tls, leg) =
                starttls_device(route, shared, tcp, pending.as_mut(), record, deadline).await?;
            (device, Some(tls), Some(leg))
        }
        DeviceMode::Tls => {
            let handshake = device::handshake(&shared.acceptor, tcp, route.sni_allow.clone());
            let (device, tls) = timeout_at(deadline, handshake)
                .await
                .map_err(|_| device_timeout())?
                .map_err(|err| {
                    if let HandshakeError::SniRefused(Some(name)) = &err {
                        record.sni = crate::text::printable(name);
                    }
                    handshake_failure(err)
                })?;
            (device, Some(tls), None)
        }
        DeviceMode::Plain => (DeviceStream::Plain(tcp), None, None),
    };
    record.device_established(tls.as_ref());
    let leg = match ready {
        Some(leg) => Ok(leg),
        None => {
            // SNI routing: only now is the upstream host known.
            let port = match config.upstream {
                Upstream::Fixed { port, .. } | Upstream::Sni { port } => port,
            };
            let sni = tls.as_ref().and_then(|t| t.sni.clone()).unwrap_or_default();
            pending
                .get_or_insert_with(|| start_upstream(shared, route, &sni, port))
                .wait()
                .await
        }
    };
    let mut leg = match leg {
        Ok(leg) => leg,
        Err(err) => {
            if let Some(reply) = protocol::failure_reply(config.protocol, err.reason()) {
                let _ = bounded(device.write_all(&reply)).await;
            }
            let _ = bounded(device.shutdown()).await;
            return Err(Failure::upstream(&err));
        }
    };
    record.upstream_established(&leg);
    greeting::reconcile(config, &mut device, &leg)
        .await
        .map_err(|err| Failure::new("device_closed", err))?;
    let idle = shared.config.limits.idle_timeout;
    let relayed = relay::run(&mut device, &mut leg.stream, idle, &shared.cancel).await;
    record.first_device_command(&relayed.up.head);
    relay_outcome(relayed, config, &mut device, &leg).await
}

/// The device side of a STARTTLS route: the dialog, then, once the upstream leg stands, the
/// answer to STARTTLS and the handshake. A failed upstream gets the protocol's "TLS not
/// available" reply in plaintext, and the session ends there.
async fn starttls_device(
    route: &RouteCtx,
    shared: &Shared,
    tcp: TcpStream,
    pending: Option<&mut PendingUpstream>,
    record: &mut SessionRecord,
    deadline: Instant,
) -> Result<(DeviceStream, DeviceTls, UpstreamLeg), Failure> {
    let protocol = route.route.protocol;
    let dialog = device::dialog(protocol, tcp, shared.server_name());
    let (mut conn, start) = timeout_at(deadline, dialog)
        .await
        .map_err(|_| device_timeout())?
        .map_err(dialog_failure)?;
    record.client_name = start.client_name.clone();
    let leg = match pending {
        Some(pending) => pending.wait().await,
        None => Err(UpstreamError::Internal),
    };
    let leg = match leg {
        Ok(leg) => leg,
        Err(err) => {
            let refusal = protocol::starttls_refused(protocol, &start, err.reason());
            let _ = bounded(conn.send(&refusal)).await;
            return Err(Failure::upstream(&err));
        }
    };
    conn.send(&protocol::starttls_accepted(protocol, &start))
        .await
        .map_err(|err| Failure::new("device_closed", err))?;
    let (tcp, pipelined) = conn.into_parts();
    if !pipelined.is_empty() {
        warn!(
            bytes = pipelined.len(),
            "discarded bytes the device sent after STARTTLS (injection attempt?)"
        );
    }
    let (device, tls) = timeout_at(deadline, device::handshake(&shared.acceptor, tcp, None))
        .await
        .map_err(|_| device_timeout())?
        .map_err(handshake_failure)?;
    Ok((device, tls, leg))
}

/// Carries the way the relay ended to the session's outcome, and to the other leg.
async fn relay_outcome(
    relayed: Relayed,
    config: &Route,
    device: &mut DeviceStream,
    leg: &UpstreamLeg,
) -> Result<(u64, u64), Failure> {
    let bytes = (relayed.up.bytes, relayed.down.bytes);
    let failure = match relayed.end {
        End::Clean => return Ok(bytes),
        End::Upstream(err)
            if err.kind() == std::io::ErrorKind::UnexpectedEof
                && protocol::said_goodbye(
                    config.protocol,
                    &relayed.up.tail,
                    &relayed.down.tail,
                ) =>
        {
            // A bare FIN after the protocol's own goodbye is a complete session.
            let _ = bounded(device.shutdown()).await;
            return Ok(bytes);
        }
        End::Upstream(err) => {
            // Not a clean end: reset the device leg rather than send close_notify, so the device
            // can tell a truncated reply from a complete one.
            let _ = device.tcp().set_zero_linger();
            Failure::new(
                "upstream_aborted",
                format!("upstream leg ended abnormally: {err}"),
            )
        }
        End::Device(err) => {
            let _ = leg.stream.get_ref().0.set_zero_linger();
            Failure::new(
                "device_aborted",
                format!("device leg ended abnormally: {err}"),
            )
        }
        End::Idle => {
            let _ = bounded(device.shutdown()).await;
            Failure::new("idle_timeout", "no data either way for limits.idle_timeout")
        }
        End::Cancelled => Failure::new("shutdown", "closed at the end of the drain time"),
    };
    Err(Failure { bytes, ..failure })
}

/// A last write or close towards a peer that may have stopped reading: never wait long.
async fn bounded<T>(io: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(5), io).await.ok()
}

fn device_timeout() -> Failure {
    Failure::device(
        "device_timeout",
        "device dialog and handshake exceeded device_tls.handshake_timeout",
    )
}

fn start_upstream(shared: &Shared, route: &RouteCtx, host: &str, port: u16) -> PendingUpstream {
    let target = Target {
        host: host.to_string(),
        port,
        protocol: route.route.protocol,
        mode: route.route.upstream_tls,
        client_name: shared.server_name().to_string(),
        timeout: shared.config.upstream_tls.connect_timeout,
    };
    debug!(upstream = %format!("{host}:{port}"), "starting upstream leg");
    PendingUpstream::start(target, shared.connector.clone())
}

fn upstream_outcome(err: &UpstreamError) -> &'static str {
    match err.reason() {
        "dns" => "upstream_dns",
        "connection_refused" => "upstream_refused",
        "connect_failed" => "upstream_connect_failed",
        "timeout" => "upstream_timeout",
        "certificate_invalid" => "upstream_certificate_invalid",
        "protocol_version" => "upstream_protocol_version",
        "no_starttls" => "upstream_no_starttls",
        "starttls_refused" => "upstream_starttls_refused",
        "starttls_injection" => "upstream_starttls_injection",
        "greeting_refused" => "upstream_greeting_refused",
        "dialog_failed" => "upstream_dialog_failed",
        _ => "upstream_tls_failed",
    }
}

fn dialog_failure(err: DialogError) -> Failure {
    let outcome = match err {
        // A device that says goodbye before STARTTLS ended normally: no error to report.
        DialogError::Quit => return Failure::new("device_quit", ""),
        DialogError::Closed | DialogError::Io(_) => "device_closed",
        DialogError::LineTooLong | DialogError::TooManyCommands | DialogError::Protocol(_) => {
            "device_protocol_error"
        }
    };
    Failure::new(outcome, err)
}

fn handshake_failure(err: HandshakeError) -> Failure {
    let outcome = match err {
        HandshakeError::SniRefused(_) => "sni_refused",
        HandshakeError::Failed(_) => "device_handshake_failed",
    };
    Failure::device(outcome, err)
}
