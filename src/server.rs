//! The running proxy: shared TLS state, one listener per route, the admin endpoint, the
//! inventory's persistence, reload and graceful shutdown.

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
use crate::config::{Config, ConfigError};
use crate::inventory::Inventory;
use crate::listener::{self, Admission, RouteCtx};
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
        let mut listeners = Vec::new();
        for route in &config.routes {
            let listener = TcpListener::bind(route.listen).await.with_context(|| {
                format!("route {}: cannot listen on {}", route.name, route.listen)
            })?;
            listeners.push((Arc::new(RouteCtx::new(route.clone())), listener));
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
        let admission = Admission::new(limits.max_connections, limits.max_connections_per_ip);
        let shared = Shared {
            acceptor,
            connector,
            admission,
            sinks: Arc::new(Sinks::new(inventory)),
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
        save(&shared);
        info!("stopped");
        Ok(())
    }
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
            _ = every.tick() => save(&shared),
        }
    }
}

fn save(shared: &Shared) {
    let inventory = &shared.sinks.inventory;
    if let Err(err) = inventory.save() {
        error!(error = %format!("{err:#}"), path = %inventory.path().display(), "cannot save the inventory");
    }
}
