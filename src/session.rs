//! One connection's way through the phases: the device leg and the upstream leg in parallel,
//! then the greeting, the relay and the closing audit event.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::either::Either;
use tracing::{debug, field, Span};

use crate::audit::SessionRecord;
use crate::config::{AuthMode, DeviceMode, Upstream, UpstreamMode};
use crate::context::{RouteCtx, Shared};
use crate::device::{self, DeviceLeg, DeviceStream};
use crate::greeting::{self, Legs};
use crate::login;
use crate::outcome::{Failure, Outcome, Refusal, Stall};
use crate::protocol::goodbye::Goodbye;
use crate::protocol::{self, smtp, Dialect};
use crate::proxy_protocol;
use crate::relay::{self, Close, End, Keep, Relayed};
use crate::upstream::{LazyUpstream, Start, Target, UpstreamLeg};

/// How long a last reply or close towards a device may take: it may have stopped reading.
const LAST_WORDS_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one session to its end and logs `session_closed`. `_permit` is the session's place
/// under `limits.max_connections`, held until the end.
pub async fn run(
    route: Arc<RouteCtx>,
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let deadline = Instant::now() + shared.config.device_tls.handshake_timeout;
    let Some(peer) = device_address(&route, &shared, &mut tcp, peer, deadline).await else {
        return;
    };
    Span::current().record("peer", field::display(peer));
    if route.route.proxy_protocol && !shared.admission.rate_allows(peer.ip()) {
        let why = "limits.connect_rate_per_ip reached (the address in the PROXY header)";
        shared.sinks.refused(
            &route.route,
            &route.metrics,
            peer,
            Refusal::RateLimited,
            why,
        );
        return;
    }
    let Some(_place) = shared.admission.per_ip(peer.ip()) else {
        refuse_busy(&route, &shared, tcp, peer);
        return;
    };
    let mut record = SessionRecord::open(&route.route, peer, &route.metrics, &shared.sinks);
    match drive(&route, &shared, tcp, deadline, &mut record).await {
        Ok((up, down)) => record.closed(up, down, Outcome::Ok, ""),
        Err(failure) => {
            let (up, down) = failure.bytes;
            record.closed(up, down, failure.outcome, &failure.detail);
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
    deadline: Instant,
) -> Option<SocketAddr> {
    if !route.route.proxy_protocol {
        return Some(peer);
    }
    let refuse = |addr, refusal, why: &str| {
        shared
            .sinks
            .refused(&route.route, &route.metrics, addr, refusal, why)
    };
    let header = tokio::time::timeout_at(deadline, proxy_protocol::read_header(tcp)).await;
    let real = match header {
        Ok(Ok(real)) => real.map_or(peer, |a| SocketAddr::new(a.ip().to_canonical(), a.port())),
        Ok(Err(err)) => {
            refuse(peer, Refusal::ProxyHeader, &err.to_string());
            return None;
        }
        Err(_) => {
            refuse(peer, Refusal::ProxyHeader, Stall::ProxyHeader.describe());
            return None;
        }
    };
    if !route.allows(real.ip()) {
        refuse(
            real,
            Refusal::AclDenied,
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
    deadline: Instant,
    record: &mut SessionRecord<'_>,
) -> Result<(u64, u64), Failure> {
    // Boxed: the set-up's states (dialog, handshakes, the upstream wait) are freed once it is
    // done, so the task of a long idle session holds only what the relay needs. The upstream leg
    // (rustls' connection, 1.2 KiB) is boxed too: moved by value through the async calls it
    // would take several places in the task (measured: 4.2 KiB -> 1.1 KiB).
    let (device, leg) = Box::pin(set_up(route, shared, tcp, deadline, record)).await?;
    let dialect = Dialect::of(route.route.protocol);
    relay_session(route, shared, dialect, device, leg, record).await
}

/// Both legs up: the device phase and the upstream leg, started with the device's first byte.
async fn set_up(
    route: &RouteCtx,
    shared: &Shared,
    tcp: TcpStream,
    deadline: Instant,
    record: &mut SessionRecord<'_>,
) -> Result<(DeviceStream, Box<UpstreamLeg>), Failure> {
    let config = &route.route;
    let dialect = Dialect::of(config.protocol);
    let target = match &config.upstream {
        Upstream::Fixed { host, port } => Some(target(shared, route, host, *port)),
        Upstream::Sni { .. } => None,
    };
    // The upstream leg starts with the device's first byte (see each device mode), so a
    // connection that sends nothing costs the upstream nothing.
    let mut upstream = LazyUpstream::new(target, route.connector(shared));
    let (mut device, ready) = match (config.device_tls, dialect) {
        (DeviceMode::Starttls, Some(dialect)) => {
            let (device, leg) =
                device::starttls(dialect, shared, tcp, deadline, &mut upstream, record).await?;
            (device, Some(leg))
        }
        (DeviceMode::Starttls, None) => {
            // Config validation refuses STARTTLS on tcp routes; never reached.
            return Err(Failure::new(
                Outcome::Upstream(crate::outcome::UpstreamFailure::Internal),
                "a tcp route cannot do STARTTLS",
            ));
        }
        (DeviceMode::Tls, _) => {
            let sni_allow = route.sni_allow.clone();
            let acceptor = &shared.acceptor;
            (
                device::implicit_tls(acceptor, tcp, sni_allow, deadline, &mut upstream, record)
                    .await?,
                None,
            )
        }
        (DeviceMode::Plain, Some(_)) => {
            // The device waits for a greeting, which waits for the upstream: start at once.
            upstream.start();
            (device::plain(tcp), None)
        }
        (DeviceMode::Plain, None) => {
            device::first_byte(&tcp, deadline).await?;
            upstream.start();
            (device::plain(tcp), None)
        }
    };
    // A plain device that waits for its greeting is known once it speaks after it.
    let known_later = device.tls.is_none() && dialect.is_some();
    if !known_later {
        record.device_established(device.tls.as_ref());
    }
    let leg = match ready {
        Some(leg) => leg,
        None => upstream_for(route, shared, &mut upstream, &mut device, dialect).await?,
    };
    record.upstream_established(&leg.tls);
    Ok((device.stream, Box::new(leg)))
}

/// Waits for the upstream leg of a device on implicit TLS or plaintext (aiming it at the SNI
/// first on an SNI route). A failure gives the device its protocol's transient error.
async fn upstream_for(
    route: &RouteCtx,
    shared: &Shared,
    upstream: &mut LazyUpstream,
    device: &mut DeviceLeg,
    dialect: Option<Dialect>,
) -> Result<UpstreamLeg, Failure> {
    if let Upstream::Sni { port } = route.route.upstream {
        let sni = device
            .tls
            .as_ref()
            .and_then(|t| t.sni.clone())
            .unwrap_or_default();
        upstream.aim(target(shared, route, &sni, port));
    }
    match upstream.wait().await {
        Ok(leg) => Ok(leg),
        Err(err) => {
            let failure = err.failure();
            if let (Some(dialect), Outcome::Upstream(cause)) = (dialect, failure.outcome) {
                let reply = protocol::unavailable(dialect, cause.reason());
                let _ = last_words(device.stream.write_all(&reply)).await;
            }
            let _ = last_words(device.stream.shutdown()).await;
            Err(failure)
        }
    }
}

/// The greeting, the relay, and the way it ended.
async fn relay_session(
    route: &RouteCtx,
    shared: &Shared,
    dialect: Option<Dialect>,
    mut device: DeviceStream,
    mut leg: Box<UpstreamLeg>,
    record: &mut SessionRecord<'_>,
) -> Result<(u64, u64), Failure> {
    let legs = Legs {
        dialect,
        device: route.route.device_tls,
        upstream: route.route.upstream_tls,
    };
    let greeting = greeting::for_device(legs, shared.server_name(), &leg.greeting, &leg.leftover);
    match last_words(greeting::send(&mut device, &greeting)).await {
        Some(Ok(_)) => {}
        Some(Err(err)) => return Err(Failure::new(Outcome::DeviceClosed, err)),
        None => return Err(Failure::stalled(Stall::Write)),
    }
    let idle = shared.config.limits.idle_timeout;
    if let Either::Right(tcp) = &device {
        if dialect.is_some() {
            // A plain device that never speaks after the greeting is not a device.
            device::first_byte(tcp, Instant::now() + idle).await?;
            record.device_established(None);
        }
    }
    if let (AuthMode::Xoauth2, Some(dialect)) = (route.route.auth, dialect) {
        // Boxed like the set-up: its token and dialog states are gone once logged in.
        Box::pin(login::run(
            route,
            shared,
            dialect,
            &mut device,
            &mut leg,
            record,
        ))
        .await?;
    }
    let mut goodbye = Goodbye::new(dialect);
    let relayed = relay::run(
        &mut device,
        &mut leg.stream,
        idle,
        &shared.cancel,
        &mut goodbye,
        keep(route, dialect),
    )
    .await;
    if dialect == Some(Dialect::Smtp) {
        if let Some(name) = smtp::client_name(&relayed.up.head) {
            record.learned_client_name(name);
        }
    }
    let refusal = login::basic_auth_refusal(route, dialect, &relayed.down.head);
    let ended = relay_outcome(relayed);
    match refusal {
        Some(reply) => Err(login::basic_auth_disabled(
            route, shared, record, &reply, ended,
        )),
        None => ended,
    }
}

/// What the session reads back from the relay's first bytes: on SMTP the device's EHLO (its
/// name), and on passthrough SMTP the upstream's first replies (a Basic-auth refusal).
fn keep(route: &RouteCtx, dialect: Option<Dialect>) -> Keep {
    match dialect {
        Some(Dialect::Smtp) => Keep {
            up: smtp::CLIENT_NAME_HEAD,
            down: match route.route.auth {
                AuthMode::Passthrough => smtp::BASIC_AUTH_REFUSAL_HEAD,
                AuthMode::Xoauth2 => 0,
            },
        },
        _ => Keep::default(),
    }
}

/// The session's outcome from the way the relay ended; the relay has already carried the end
/// to the other leg.
fn relay_outcome(relayed: Relayed) -> Result<(u64, u64), Failure> {
    let bytes = (relayed.up.bytes, relayed.down.bytes);
    let failure = match relayed.end {
        // A device that ends with a bare FIN after a complete exchange is a normal end (legacy
        // devices often do); the upstream saw the same bare FIN.
        End::Finished {
            upstream: Close::Clean | Close::Goodbye,
            ..
        } => return Ok(bytes),
        End::Finished {
            upstream: Close::Bare,
            ..
        } => Failure::new(
            Outcome::UpstreamTruncated,
            "upstream leg ended without close_notify and without the protocol's goodbye \
             (carried to the device as an end without close_notify)",
        ),
        End::Upstream(err) => Failure::new(
            Outcome::UpstreamAborted,
            format!("upstream leg ended abnormally: {err}"),
        ),
        End::Device(err) => Failure::new(
            Outcome::DeviceAborted,
            format!("device leg ended abnormally: {err}"),
        ),
        End::Idle => Failure::new(
            Outcome::IdleTimeout,
            "no data either way for limits.idle_timeout",
        ),
        End::Cancelled => Failure::new(Outcome::Shutdown, "closed at the end of the drain time"),
    };
    Err(Failure { bytes, ..failure })
}

/// A last write or close towards a peer that may have stopped reading: never wait long.
async fn last_words<T>(io: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(LAST_WORDS_TIMEOUT, io).await.ok()
}

fn target(shared: &Shared, route: &RouteCtx, host: &str, port: u16) -> Target {
    let dialect = Dialect::of(route.route.protocol);
    let start = match (route.route.upstream_tls, dialect) {
        (UpstreamMode::Starttls, Some(dialect)) => Start::Starttls(dialect),
        _ => Start::Tls(dialect),
    };
    debug!(upstream = %format!("{host}:{port}"), "starting upstream leg");
    Target {
        host: host.to_string(),
        port,
        start,
        client_name: shared.server_name().to_string(),
        timeout: shared.config.upstream_tls.connect_timeout,
    }
}

/// Over a limit: plaintext protocols get their "try later" reply without waiting (a fresh
/// socket's send buffer is empty, so `try_write` does not block), then the socket closes.
pub fn refuse_busy(route: &RouteCtx, shared: &Shared, tcp: TcpStream, peer: SocketAddr) {
    if route.route.device_tls != DeviceMode::Tls {
        if let Some(dialect) = Dialect::of(route.route.protocol) {
            let _ = tcp.try_write(protocol::busy(dialect));
        }
    }
    let why = "limits.max_connections or limits.max_connections_per_ip reached";
    shared.sinks.refused(
        &route.route,
        &route.metrics,
        peer,
        Refusal::TooManyConnections,
        why,
    );
}
