//! What sessions share, created by the server and handed down: the configuration, both TLS
//! ends, admission, the sinks, the task tracker and the drain signal. Nothing below the server
//! names the server.

use std::net::IpAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::audit::Sinks;
use crate::config::{AuthMode, Config, ConfigError, Route, Upstream};
use crate::credentials::{Credentials, Verifier};
use crate::limits::Admission;
use crate::metrics::RouteMetrics;
use crate::oauth::TokenSource;
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
    /// What routes with `auth = "xoauth2"` need; `None` when no route has it.
    pub auth: Option<AuthShared>,
}

/// The device credentials and the token source, shared by every xoauth2 session.
pub struct AuthShared {
    pub verifier: Verifier,
    pub tokens: TokenSource,
}

impl AuthShared {
    /// Loads the users file and the client credential when a route uses `auth = "xoauth2"`.
    /// A missing or unreadable file is a config error naming its key.
    pub fn for_config(config: &Config) -> Result<Option<AuthShared>, ConfigError> {
        if !config.routes.iter().any(|r| r.auth == AuthMode::Xoauth2) {
            return Ok(None);
        }
        let loaded = Credentials::load(&config.oauth.users_file)?;
        if let Some(mode) = loaded.loose_mode {
            tracing::warn!(
                key = "oauth.users_file",
                path = %config.oauth.users_file.display(),
                mode = format!("{mode:04o}"),
                "the users file is readable by others than its owner; chmod 600 it"
            );
        }
        if loaded.credentials.is_empty() {
            tracing::warn!(
                key = "oauth.users_file",
                "the users file has no users yet; add them with `tlsbridge passwd`"
            );
        }
        let tls = crate::tls::modern::client_config(&config.upstream_tls)
            .map_err(|err| ConfigError(format!("upstream_tls: {err:#}")))?;
        let tokens = TokenSource::from_config(&config.oauth, tls)?;
        Ok(Some(AuthShared {
            verifier: Verifier::new(loaded.credentials),
            tokens,
        }))
    }
}

impl AuthShared {
    /// Re-reads the users file (after `tlsbridge passwd`); sessions already logged in are not
    /// affected. A bad file keeps the old table.
    pub fn reload_users(&self, path: &std::path::Path) {
        match Credentials::load(path) {
            Ok(loaded) => {
                let users = loaded.credentials.len();
                self.verifier.replace(loaded.credentials);
                info!(users, path = %path.display(), "reloaded the users file");
            }
            Err(err) => {
                error!(error = %err, "reload failed; keeping the previous users")
            }
        }
    }
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

    /// Re-reads the device certificate and key, the upstream `extra_roots` and, with xoauth2
    /// routes, the users file. New connections use the new files; open sessions keep what they
    /// have. A bad file keeps the old state.
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
        if let Some(auth) = &self.auth {
            auth.reload_users(&self.config.oauth.users_file);
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
    /// A connector presenting the route's `upstream_client_cert`; `None`: the shared one.
    pub connector: Option<Arc<ModernConnector>>,
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
            connector: None,
        }
    }

    /// Builds the route's own connector when it presents a client certificate upstream (a
    /// Microsoft 365 relay connector); warns when the key file is looser than 0600.
    pub fn with_identity(mut self, config: &Config) -> Result<RouteCtx, ConfigError> {
        let (Some(cert), Some(key)) = (
            &self.route.upstream_client_cert,
            &self.route.upstream_client_key,
        ) else {
            return Ok(self);
        };
        let (client, loose) =
            crate::tls::modern::client_config_with_identity(&config.upstream_tls, cert, key)
                .map_err(|err| ConfigError(format!("route {:?}: {err:#}", self.route.name)))?;
        if let Some(mode) = loose {
            tracing::warn!(
                route = %self.route.name,
                key = "upstream_client_key",
                path = %key.display(),
                mode = format!("{mode:04o}"),
                "the connector key is readable by others than its owner; chmod 600 it"
            );
        }
        self.connector = Some(Arc::new(ModernConnector::from_config(client)));
        Ok(self)
    }

    /// The connector for this route's upstream leg.
    pub fn connector(&self, shared: &Shared) -> Arc<ModernConnector> {
        self.connector
            .clone()
            .unwrap_or_else(|| shared.connector.clone())
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.route.allow.iter().any(|net| net.contains(&ip))
    }
}
