//! The upstream leg: DNS, TCP, the upstream's STARTTLS dialog (client role) and the rustls
//! handshake, in its own task, in parallel with the device leg.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::task::JoinHandle;

mod dns;

use crate::outcome::{Failure, Outcome, UpstreamFailure};
use crate::protocol::{self, Dialect, LineConn, UpstreamDialogError};
use crate::tls::client::ClientStream;
use crate::tls::modern::{self, ModernConnector, UpstreamTls};

/// An established upstream leg, ready for the greeting phase and the relay.
pub struct UpstreamLeg {
    pub stream: ClientStream,
    /// The greeting the upstream sent (before STARTTLS, or first thing after implicit TLS).
    pub greeting: Vec<u8>,
    /// Bytes after an implicit-TLS greeting: inside TLS, so they belong to the session.
    pub leftover: Vec<u8>,
    pub addr: SocketAddr,
    pub tls: UpstreamTls,
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
    pub fn cause(&self) -> UpstreamFailure {
        match self {
            UpstreamError::Resolve { .. } => UpstreamFailure::Dns,
            UpstreamError::Connect { source, .. }
                if source.kind() == io::ErrorKind::ConnectionRefused =>
            {
                UpstreamFailure::Refused
            }
            UpstreamError::Connect { .. } => UpstreamFailure::ConnectFailed,
            UpstreamError::Timeout(_) => UpstreamFailure::Timeout,
            UpstreamError::Tls { source, .. } => modern::failure_cause(source),
            UpstreamError::Dialog(err) => err.cause(),
            UpstreamError::Internal => UpstreamFailure::Internal,
        }
    }

    /// The session's failure: the typed cause and the full chain for the log.
    pub fn failure(&self) -> Failure {
        Failure::new(Outcome::Upstream(self.cause()), format!("{self:#}"))
    }
}

/// How the upstream leg starts its TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The protocol's plaintext dialog, then STARTTLS.
    Starttls(Dialect),
    /// TLS at once; a protocol with a dialog then sends its greeting.
    Tls(Option<Dialect>),
}

/// Everything the upstream task needs, owned so it can run on its own.
pub struct Target {
    pub host: String,
    pub port: u16,
    pub start: Start,
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
    let (stream, greeting, leftover) = match target.start {
        Start::Starttls(dialect) => {
            let mut conn = LineConn::new(tcp);
            let greeting =
                protocol::upstream_starttls(dialect, &mut conn, &target.client_name).await?;
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
        Start::Tls(dialect) => {
            started = Instant::now();
            let tls = connector
                .connect(&target.host, tcp)
                .await
                .map_err(tls_error)?;
            match dialect {
                Some(dialect) => {
                    let mut conn = LineConn::new(tls);
                    let greeting = protocol::upstream_greeting(dialect, &mut conn).await?;
                    let (tls, leftover) = conn.into_parts();
                    (tls, greeting, leftover)
                }
                None => (tls, Vec::new(), Vec::new()),
            }
        }
    };
    let tls = UpstreamTls::of(stream.tls_state(), started.elapsed());
    Ok(UpstreamLeg {
        stream,
        greeting,
        leftover,
        addr,
        tls,
    })
}

/// Resolves `host` (cached, with a bound on concurrent lookups: see `dns`) and tries its
/// addresses in order.
async fn connect(host: &str, port: u16) -> Result<TcpStream, UpstreamError> {
    let addrs: Vec<SocketAddr> =
        dns::resolve(host, port)
            .await
            .map_err(|source| UpstreamError::Resolve {
                host: host.to_string(),
                source,
            })?;
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

/// The upstream leg of one session, started on demand (at most once) and awaited later.
pub struct LazyUpstream {
    target: Option<Target>,
    connector: Arc<ModernConnector>,
    pending: Option<PendingUpstream>,
}

impl LazyUpstream {
    /// `target` is `None` when the host is not known yet (SNI routing): see `aim`.
    pub fn new(target: Option<Target>, connector: Arc<ModernConnector>) -> LazyUpstream {
        LazyUpstream {
            target,
            connector,
            pending: None,
        }
    }

    /// Starts the leg if it is not running yet.
    pub fn start(&mut self) {
        if self.pending.is_none() {
            if let Some(target) = self.target.take() {
                self.pending = Some(PendingUpstream::start(target, self.connector.clone()));
            }
        }
    }

    /// Gives a leg whose host was not known at accept (SNI routing) its target.
    pub fn aim(&mut self, target: Target) {
        if self.pending.is_none() {
            self.target = Some(target);
        }
    }

    /// Waits for the leg, starting it first if needed.
    pub async fn wait(&mut self) -> Result<UpstreamLeg, UpstreamError> {
        self.start();
        match &mut self.pending {
            Some(pending) => pending.wait().await,
            None => Err(UpstreamError::Internal),
        }
    }
}
