//! The upstream leg: DNS, TCP, the upstream's STARTTLS dialog (client role) and the rustls
//! handshake. Started at accept time in its own task, in parallel with the device leg.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

use crate::config::{Protocol, UpstreamMode};
use crate::protocol::{self, LineConn, UpstreamDialogError};
use crate::tls::modern::{self, ModernConnector};

/// An established upstream leg, ready for the greeting phase and the relay.
pub struct UpstreamLeg {
    pub stream: TlsStream<TcpStream>,
    /// The greeting the upstream sent (before STARTTLS, or first thing after implicit TLS).
    pub greeting: Vec<u8>,
    /// Bytes after an implicit-TLS greeting: inside TLS, so they belong to the session.
    pub leftover: Vec<u8>,
    pub addr: SocketAddr,
    pub tls_version: &'static str,
    pub cipher: String,
    /// Time from the start of the TLS handshake to its end.
    pub handshake: Duration,
}

/// Why the upstream leg could not be established.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("no complete upstream leg within {0:?} (upstream_tls.connect_timeout)")]
    Timeout(Duration),
    #[error("TLS handshake with {host} failed: {source}")]
    Tls { host: String, source: io::Error },
    #[error(transparent)]
    Dialog(#[from] UpstreamDialogError),
    #[error("upstream task ended unexpectedly")]
    Internal,
}

impl UpstreamError {
    /// A short, stable reason for the session outcome and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::Resolve { .. } => "dns",
            UpstreamError::Connect { source, .. }
                if source.kind() == io::ErrorKind::ConnectionRefused =>
            {
                "connection_refused"
            }
            UpstreamError::Connect { .. } => "connect_failed",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Tls { source, .. } => modern::failure_reason(source),
            UpstreamError::Dialog(err) => err.reason(),
            UpstreamError::Internal => "internal",
        }
    }
}

/// Everything the upstream task needs, owned so it can run on its own.
pub struct Target {
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: UpstreamMode,
    /// The name sent in SMTP EHLO.
    pub client_name: String,
    pub timeout: Duration,
}

/// An upstream leg being established in its own task; dropping it aborts the task.
pub struct PendingUpstream {
    task: JoinHandle<Result<UpstreamLeg, UpstreamError>>,
}

impl PendingUpstream {
    pub fn start(target: Target, connector: Arc<ModernConnector>) -> PendingUpstream {
        PendingUpstream {
            task: tokio::spawn(async move { establish(&target, &connector).await }),
        }
    }

    /// Waits for the leg (it may be ready already).
    pub async fn wait(&mut self) -> Result<UpstreamLeg, UpstreamError> {
        (&mut self.task)
            .await
            .unwrap_or(Err(UpstreamError::Internal))
    }
}

impl Drop for PendingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects, runs the dialog and the handshake, all within `target.timeout`.
pub async fn establish(
    target: &Target,
    connector: &ModernConnector,
) -> Result<UpstreamLeg, UpstreamError> {
    tokio::time::timeout(target.timeout, establish_inner(target, connector))
        .await
        .unwrap_or(Err(UpstreamError::Timeout(target.timeout)))
}

async fn establish_inner(
    target: &Target,
    connector: &ModernConnector,
) -> Result<UpstreamLeg, UpstreamError> {
    let tcp = connect(&target.host, target.port).await?;
    let addr = tcp.peer_addr().map_err(|source| UpstreamError::Connect {
        addr: target.host.clone(),
        source,
    })?;
    let tls_error = |source| UpstreamError::Tls {
        host: target.host.clone(),
        source,
    };
    let started;
    let (stream, greeting, leftover) = match target.mode {
        UpstreamMode::Starttls => {
            let mut conn = LineConn::new(tcp);
            let greeting =
                protocol::upstream_starttls(target.protocol, &mut conn, &target.client_name)
                    .await?;
            let (tcp, early) = conn.into_parts();
            // Bytes after the "go ahead" reply would be read as if inside TLS: refuse them.
            if !early.is_empty() {
                return Err(UpstreamDialogError::Injection(early.len()).into());
            }
            started = Instant::now();
            let tls = connector
                .connect(&target.host, tcp)
                .await
                .map_err(tls_error)?;
            (tls, greeting, Vec::new())
        }
        UpstreamMode::Tls => {
            started = Instant::now();
            let tls = connector
                .connect(&target.host, tcp)
                .await
                .map_err(tls_error)?;
            let mut conn = LineConn::new(tls);
            let greeting = protocol::upstream_greeting(target.protocol, &mut conn).await?;
            let (tls, leftover) = conn.into_parts();
            (tls, greeting, leftover)
        }
    };
    let handshake = started.elapsed();
    let session = stream.get_ref().1;
    let tls_version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    };
    let cipher = session
        .negotiated_cipher_suite()
        .map(|suite| format!("{:?}", suite.suite()))
        .unwrap_or_default();
    Ok(UpstreamLeg {
        stream,
        greeting,
        leftover,
        addr,
        tls_version,
        cipher,
        handshake,
    })
}

/// Resolves `host` and tries its addresses in order.
async fn connect(host: &str, port: u16) -> Result<TcpStream, UpstreamError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| UpstreamError::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(err) => last = Some((addr, err)),
        }
    }
    Err(match last {
        Some((addr, source)) => UpstreamError::Connect {
            addr: addr.to_string(),
            source,
        },
        None => UpstreamError::Resolve {
            host: host.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        },
    })
}
