//! What sessions share, created by the server and handed down: the configuration, both TLS
//! ends, admission, the sinks, the task tracker and the drain signal. Nothing below the server
//! names the server.

use std::net::IpAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::audit::Sinks;
use crate::config::{Config, Route, Upstream};
use crate::limits::Admission;
use crate::metrics::RouteMetrics;
use crate::tls::legacy::LegacyAcceptor;
use crate::tls::modern::ModernConnector;

/// What every session shares.
pub struct Shared {
    pub config: Config,
    pub acceptor: LegacyAcceptor,
    pub connector: Arc<ModernConnector>,
    pub admission: Admission,
    pub sinks: Arc<Sinks>,
    /// Every session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the drain time is over: open relays stop.
    pub cancel: CancellationToken,
}

impl Shared {
    /// The name tlsbridge gives itself in banners and in EHLO: the first `device_tls.names`.
    pub fn server_name(&self) -> &str {
        self.config
            .device_tls
            .names
            .first()
            .map(String::as_str)
            .unwrap_or("localhost")
    }

    /// Re-reads the device certificate and key and the upstream `extra_roots`. New connections
    /// use the new files; open sessions keep what they have. A bad file keeps the old state.
    pub fn reload(&self) {
        match self.acceptor.reload(&self.config.device_tls) {
            Ok(()) => {
                info!(cert = %self.config.device_tls.cert.display(), "reloaded the device certificate")
            }
            Err(err) => {
                error!(error = %format!("{err:#}"), "reload failed; keeping the previous device certificate")
            }
        }
        match self.connector.reload(&self.config.upstream_tls) {
            Ok(()) => info!(
                extra_roots = self.config.upstream_tls.extra_roots.len(),
                "reloaded the upstream roots"
            ),
            Err(err) => {
                error!(error = %format!("{err:#}"), "reload failed; keeping the previous upstream roots")
            }
        }
    }
}

/// A route with what its sessions share.
pub struct RouteCtx {
    pub route: Route,
    /// The route's SNI allow list, handed to the acceptor for each handshake.
    pub sni_allow: Option<Arc<[String]>>,
    /// The route's metric handles, resolved once.
    pub metrics: RouteMetrics,
}

impl RouteCtx {
    pub fn new(route: Route, sinks: &Sinks) -> RouteCtx {
        let sni_allow = match route.upstream {
            Upstream::Sni { .. } => Some(route.sni_allow.clone().into()),
            Upstream::Fixed { .. } => None,
        };
        let metrics = sinks.metrics.route(&route.name);
        RouteCtx {
            route,
            sni_allow,
            metrics,
        }
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.route.allow.iter().any(|net| net.contains(&ip))
    }
}
