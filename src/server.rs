//! The running proxy: sets up the shared state, binds one listener per route and the admin
//! endpoint, persists the inventory, and shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminState};
use crate::audit::Sinks;
use crate::certs::{self, Provision};
use crate::config::{Config, ConfigError, LogFormat};
use crate::context::{AuthShared, RouteCtx, Shared};
use crate::inventory::Inventory;
use crate::limits::Admission;
use crate::listener;
use crate::tls::legacy::LegacyAcceptor;
use crate::tls::modern::ModernConnector;

/// A proxy whose listeners are bound, ready to `run`.
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<(Arc<RouteCtx>, TcpListener)>,
    admin: Option<TcpListener>,
}

impl Server {
    /// Prepares certificates, TLS state and the inventory, and binds every listener.
    pub async fn bind(config: Config) -> Result<Server> {
        raise_descriptor_limit(config.limits.max_connections);
        let setup = ConfigError::from_anyhow;
        // Refuse an impossible protocol setting before anything is written to disk.
        crate::tls::legacy::check_protocol_settings(&config.device_tls).map_err(setup)?;
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
        let inventory = Inventory::load(&config.state_dir, config.limits.max_inventory_clients)
            .map_err(setup)?;
        let sinks = Arc::new(Sinks::new(inventory, config.admin.per_device_metrics));
        let mut listeners = Vec::new();
        for route in &config.routes {
            let listener = TcpListener::bind(route.listen).await.with_context(|| {
                format!("route {}: cannot listen on {}", route.name, route.listen)
            })?;
            let ctx = RouteCtx::new(route.clone(), &sinks).with_identity(&config)?;
            listeners.push((Arc::new(ctx), listener));
        }
        let admin = match config.admin.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("admin.listen: cannot listen on {addr}"))?,
            ),
            None => None,
        };
        let limits = &config.limits;
        let admission = Admission::new(
            limits.max_connections,
            limits.max_connections_per_ip,
            limits.connect_rate_per_ip,
        );
        let auth = AuthShared::for_config(&config)?;
        let shared = Shared {
            auth,
            acceptor,
            connector,
            admission,
            sinks,
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            config,
        };
        Ok(Server {
            shared: Arc::new(shared),
            listeners,
            admin,
        })
    }

    /// The address a route's listener is bound to (useful with port 0).
    pub fn local_addr(&self, route: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(ctx, _)| ctx.route.name == route)
            .and_then(|(_, listener)| listener.local_addr().ok())
    }

    /// The admin endpoint's address, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The shared state, e.g. to `reload` from a signal handler.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, turns `/readyz` to 503, gives
    /// open sessions `limits.drain_timeout` to finish, closes the rest and saves the inventory.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let shared = self.shared;
        let stop = CancellationToken::new();
        let admin_state = Arc::new(AdminState {
            sinks: shared.sinks.clone(),
            ready: false.into(),
            token: shared.config.admin.token.clone(),
        });
        let admin_task = self.admin.map(|listener| {
            info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin endpoint listening");
            tokio::spawn(admin::serve(listener, admin_state.clone(), stop.child_token()))
        });
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
            let serve = listener::serve(listener, ctx, shared.clone(), stop.child_token());
            accept_loops.push(tokio::spawn(serve));
        }
        admin_state.ready.store(true, Ordering::Relaxed);
        let saver = tokio::spawn(save_periodically(shared.clone(), stop.child_token()));

        shutdown.await;
        admin_state.ready.store(false, Ordering::Relaxed);
        for accept_loop in accept_loops.drain(..) {
            accept_loop.abort();
            let _ = accept_loop.await;
        }
        shared.tracker.close();
        let open = shared.tracker.len();
        if open > 0 {
            let drain = shared.config.limits.drain_timeout;
            info!(open, drain_timeout = ?drain, "no longer accepting; draining open sessions");
            if tokio::time::timeout(drain, shared.tracker.wait())
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
        }
        stop.cancel();
        let _ = saver.await;
        if let Some(admin_task) = admin_task {
            let _ = admin_task.await;
        }
        let last = shared.clone();
        let _ = tokio::task::spawn_blocking(move || save(&last)).await;
        info!("stopped");
        Ok(())
    }
}

/// `tlsbridge run`: logging, a runtime, the server, and the signals that reload and stop it.
pub fn run_until_signalled(config: Config, log_format: Option<LogFormat>) -> Result<()> {
    crate::logging::init(&config.log.level, log_format.unwrap_or(config.log.format))
        .map_err(ConfigError::from_anyhow)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        let shutdown = crate::signals::shutdown();
        let server = Server::bind(config).await?;
        crate::signals::reload_on_hangup(server.shared());
        server.run(shutdown).await
    });
    drop(runtime);
    crate::logging::flush();
    result
}

/// A full house needs two descriptors per session (device and upstream) plus a few: raise the
/// soft open-file limit that far (within the hard limit), and say so when it cannot be.
fn raise_descriptor_limit(max_connections: usize) {
    let wanted = max_connections as u64 * 2 + 64;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => warn!(
            limit,
            wanted,
            "the open-file limit is too low for limits.max_connections; raise it (ulimit -n, \
             LimitNOFILE=) or lower limits.max_connections"
        ),
        Ok(limit) => debug!(limit, "open-file limit"),
        Err(err) => warn!(error = %err, "cannot read or raise the open-file limit"),
    }
}

async fn save_periodically(shared: Arc<Shared>, stop: CancellationToken) {
    let mut every = tokio::time::interval(shared.config.state_save_interval);
    every.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {
                // JSON and fsync are blocking work: off the async workers.
                let shared = shared.clone();
                let _ = tokio::task::spawn_blocking(move || save(&shared)).await;
            }
        }
    }
}

fn save(shared: &Shared) {
    let inventory = &shared.sinks.inventory;
    if let Err(err) = inventory.save() {
        error!(error = %format!("{err:#}"), path = %inventory.path().display(), "cannot save the inventory");
    }
}
