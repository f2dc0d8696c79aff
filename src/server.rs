//! The running proxy: shared TLS state, one listener per route, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::certs::{self, Provision};
use crate::config::{Config, ConfigError};
use crate::listener::{self, Admission, RouteCtx};
use crate::tls::legacy::LegacyAcceptor;
use crate::tls::modern::ModernConnector;

/// What every session shares.
pub struct Shared {
    pub config: Config,
    pub acceptor: LegacyAcceptor,
    pub connector: Arc<ModernConnector>,
    pub admission: Admission,
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
}

/// A proxy whose listeners are bound, ready to `run`.
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<(Arc<RouteCtx>, TcpListener)>,
}

impl Server {
    /// Prepares certificates and TLS state and binds every route's listener.
    pub async fn bind(config: Config) -> Result<Server> {
        let setup = |err| ConfigError::from_anyhow(err);
        match certs::ensure(&config.device_tls).map_err(setup)? {
            Provision::Existing => {}
            Provision::Generated { new_ca } => info!(
                cert = %config.device_tls.cert.display(),
                new_ca,
                ca = %certs::ca_paths(&config.device_tls).0.display(),
                "generated the device certificate from the local CA"
            ),
        }
        let acceptor = LegacyAcceptor::new(&config.device_tls).map_err(setup)?;
        let connector = Arc::new(ModernConnector::new(&config.upstream_tls).map_err(setup)?);
        let mut listeners = Vec::new();
        for route in &config.routes {
            let listener = TcpListener::bind(route.listen).await.with_context(|| {
                format!("route {}: cannot listen on {}", route.name, route.listen)
            })?;
            listeners.push((Arc::new(RouteCtx::new(route.clone())), listener));
        }
        let admission = Admission::new(
            config.limits.max_connections,
            config.limits.max_connections_per_ip,
        );
        let shared = Shared {
            config,
            acceptor,
            connector,
            admission,
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
        };
        Ok(Server {
            shared: Arc::new(shared),
            listeners,
        })
    }

    /// The address a route's listener is bound to (useful with port 0).
    pub fn local_addr(&self, route: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(ctx, _)| ctx.route.name == route)
            .and_then(|(_, listener)| listener.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then stops accepting, gives open sessions
    /// `limits.drain_timeout` to finish, and closes the rest.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let stop = CancellationToken::new();
        let mut accept_loops = Vec::new();
        for (ctx, listener) in self.listeners {
            let r = &ctx.route;
            info!(
                route = %r.name,
                listen = %listener.local_addr()?,
                protocol = %r.protocol,
                device_tls = %r.device_tls,
                upstream = %r.upstream,
                upstream_tls = %r.upstream_tls,
                "listening"
            );
            accept_loops.push(tokio::spawn(listener::serve(
                listener,
                ctx,
                self.shared.clone(),
                stop.child_token(),
            )));
        }
        shutdown.await;
        stop.cancel();
        for accept_loop in accept_loops {
            let _ = accept_loop.await;
        }
        let shared = &self.shared;
        shared.tracker.close();
        let open = shared.tracker.len();
        if open > 0 {
            info!(open, drain_timeout = ?shared.config.limits.drain_timeout, "draining open sessions");
        }
        if tokio::time::timeout(shared.config.limits.drain_timeout, shared.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open = shared.tracker.len(),
                "drain time over; closing the remaining sessions"
            );
            shared.cancel.cancel();
            shared.tracker.wait().await;
        }
        info!("stopped");
        Ok(())
    }
}
