//! The one in-process harness: a test configuration ([`Settings`] with its [`Route`]s), written
//! as TOML into a tempdir, and tlsbridge started from it inside the test's runtime ([`Proxy`]).
//! The real binary started from the same [`Settings`] is `ops::Process`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::ca::Pki;
use super::device::Verify;

/// One `[[route]]`; it always listens on 127.0.0.1:0.
#[derive(Clone, Debug)]
pub struct Route {
    pub name: String,
    pub protocol: String,
    pub device_tls: String,
    /// `host:port` (`localhost:PORT` for the fake upstreams) or `sni:PORT`.
    pub upstream: String,
    pub upstream_tls: String,
    /// `None`: the default ACL (loopback and private ranges).
    pub allow: Option<Vec<String>>,
    pub proxy_protocol: bool,
    pub proxy_from: Vec<String>,
    /// `sni_allow`; empty: not written.
    pub sni_allow: Vec<String>,
}

impl Route {
    pub fn new(
        name: &str,
        protocol: &str,
        device_tls: &str,
        upstream: &str,
        upstream_tls: &str,
    ) -> Route {
        Route {
            name: name.to_string(),
            protocol: protocol.to_string(),
            device_tls: device_tls.to_string(),
            upstream: upstream.to_string(),
            upstream_tls: upstream_tls.to_string(),
            allow: None,
            proxy_protocol: false,
            proxy_from: Vec::new(),
            sni_allow: Vec::new(),
        }
    }

    /// SMTP with device `device_tls` (starttls, tls, plain) to a STARTTLS upstream at
    /// `localhost:port`.
    pub fn smtp(name: &str, device_tls: &str, port: u16) -> Route {
        Route::new(
            name,
            "smtp",
            device_tls,
            &format!("localhost:{port}"),
            "starttls",
        )
    }

    /// A `tcp` route with device `device_tls` to `upstream` (`host:port` or `sni:port`) over
    /// implicit TLS.
    pub fn tcp(name: &str, device_tls: &str, upstream: &str) -> Route {
        Route::new(name, "tcp", device_tls, upstream, "tls")
    }

    /// Sets `sni_allow`.
    pub fn sni_allow(mut self, names: &[&str]) -> Route {
        self.sni_allow = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// Replaces the ACL.
    pub fn allow(mut self, nets: &[&str]) -> Route {
        self.allow = Some(nets.iter().map(|n| n.to_string()).collect());
        self
    }

    /// Expects a PROXY protocol header from peers in `from`.
    pub fn proxy_from(mut self, from: &[&str]) -> Route {
        self.proxy_protocol = true;
        self.proxy_from = from.iter().map(|n| n.to_string()).collect();
        self
    }
}

/// Everything a test sets in a configuration file. `None` leaves a key out (the built-in
/// default applies).
#[derive(Clone, Debug)]
pub struct Settings {
    /// `admin.listen`: `"127.0.0.1:0"`, an address, or `""` (disabled).
    pub admin: String,
    pub log_level: String,
    pub handshake_timeout: String,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub drain_timeout: Option<String>,
    /// `limits.idle_timeout`; `None`: the built-in default.
    pub idle_timeout: Option<String>,
    /// `limits.max_inventory_clients`: the bound on the inventory (and so on the per-device
    /// series); `None`: the built-in default.
    pub max_inventory_clients: Option<usize>,
    /// `state_save_interval`: how often the inventory is written.
    pub state_save_interval: String,
    pub extra_roots: Vec<PathBuf>,
    /// `device_tls.names`: the names on the device certificate.
    pub names: Vec<String>,
    pub routes: Vec<Route>,
}

fn quoted(value: &str) -> String {
    // A JSON string is a valid TOML basic string.
    serde_json::to_string(value).unwrap_or_else(|_| format!("{value:?}"))
}

fn quoted_path(path: &Path) -> String {
    quoted(&path.display().to_string())
}

fn quoted_list<S: AsRef<str>>(values: &[S]) -> String {
    let items: Vec<String> = values.iter().map(|v| quoted(v.as_ref())).collect();
    format!("[{}]", items.join(", "))
}

impl Settings {
    /// The operations profile: admin endpoint on 127.0.0.1:0, explicit limits (100
    /// connections, none per address, a 10 s drain), the test CA as the upstream root.
    pub fn new(pki: &Pki, routes: Vec<Route>) -> Settings {
        Settings {
            max_connections: Some(100),
            max_connections_per_ip: Some(0),
            drain_timeout: Some("10s".to_string()),
            admin: "127.0.0.1:0".to_string(),
            ..Settings::routes_only(pki, routes)
        }
    }

    /// Just the routes: no admin endpoint, the built-in limits, the test CA as the upstream
    /// root, a device certificate for "localhost".
    pub fn routes_only(pki: &Pki, routes: Vec<Route>) -> Settings {
        Settings {
            admin: String::new(),
            log_level: "debug".to_string(),
            handshake_timeout: "10s".to_string(),
            max_connections: None,
            max_connections_per_ip: None,
            drain_timeout: None,
            idle_timeout: None,
            max_inventory_clients: None,
            state_save_interval: "1m".to_string(),
            extra_roots: vec![pki.ca_path.clone()],
            names: vec!["localhost".to_string()],
            routes,
        }
    }

    /// Replaces `device_tls.names`.
    pub fn names(mut self, names: &[&str]) -> Settings {
        self.names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// The TOML, with `state_dir` and the device certificate under `dir`.
    pub fn toml(&self, dir: &Path) -> String {
        let mut toml = String::new();
        let _ = writeln!(toml, "state_dir = {}", quoted_path(&dir.join("state")));
        let _ = writeln!(
            toml,
            "state_save_interval = {}",
            quoted(&self.state_save_interval)
        );
        let _ = writeln!(toml, "\n[log]\nlevel = {}", quoted(&self.log_level));
        let _ = writeln!(toml, "\n[admin]\nlisten = {}", quoted(&self.admin));
        let _ = writeln!(toml, "\n[device_tls]");
        let _ = writeln!(
            toml,
            "cert = {}",
            quoted_path(&dir.join("certs/tlsbridge.crt"))
        );
        let _ = writeln!(
            toml,
            "key = {}",
            quoted_path(&dir.join("certs/tlsbridge.key"))
        );
        let _ = writeln!(toml, "names = {}", quoted_list(&self.names));
        let _ = writeln!(
            toml,
            "handshake_timeout = {}",
            quoted(&self.handshake_timeout)
        );
        let _ = writeln!(toml, "\n[upstream_tls]");
        let roots: Vec<String> = self
            .extra_roots
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let _ = writeln!(toml, "extra_roots = {}", quoted_list(&roots));
        let _ = writeln!(toml, "connect_timeout = \"5s\"");
        let _ = writeln!(toml, "\n[limits]");
        // Tests open connections in quick loops from one address.
        let _ = writeln!(toml, "connect_rate_per_ip = 0");
        if let Some(max) = self.max_connections {
            let _ = writeln!(toml, "max_connections = {max}");
        }
        if let Some(max) = self.max_connections_per_ip {
            let _ = writeln!(toml, "max_connections_per_ip = {max}");
        }
        if let Some(drain) = &self.drain_timeout {
            let _ = writeln!(toml, "drain_timeout = {}", quoted(drain));
        }
        if let Some(idle) = &self.idle_timeout {
            let _ = writeln!(toml, "idle_timeout = {}", quoted(idle));
        }
        if let Some(max) = self.max_inventory_clients {
            let _ = writeln!(toml, "max_inventory_clients = {max}");
        }
        for route in &self.routes {
            let _ = writeln!(toml, "\n[[route]]");
            let _ = writeln!(toml, "name = {}", quoted(&route.name));
            let _ = writeln!(toml, "listen = \"127.0.0.1:0\"");
            let _ = writeln!(toml, "protocol = {}", quoted(&route.protocol));
            let _ = writeln!(toml, "device_tls = {}", quoted(&route.device_tls));
            let _ = writeln!(toml, "upstream = {}", quoted(&route.upstream));
            let _ = writeln!(toml, "upstream_tls = {}", quoted(&route.upstream_tls));
            if let Some(allow) = &route.allow {
                let _ = writeln!(toml, "allow = {}", quoted_list(allow));
            }
            if route.proxy_protocol {
                let _ = writeln!(toml, "proxy_protocol = true");
                let _ = writeln!(toml, "proxy_from = {}", quoted_list(&route.proxy_from));
            }
            if !route.sni_allow.is_empty() {
                let _ = writeln!(toml, "sni_allow = {}", quoted_list(&route.sni_allow));
            }
        }
        toml
    }

    /// Writes `dir/tlsbridge.toml` and returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("tlsbridge.toml");
        std::fs::write(&path, self.toml(dir))
            .with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }
}

/// tlsbridge running in-process (its state and certificates in a tempdir). Dropping it signals
/// shutdown.
pub struct Proxy {
    pub dir: tempfile::TempDir,
    admin: Option<SocketAddr>,
    addrs: HashMap<String, SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Proxy {
    /// [`Settings::routes_only`]: just `routes`, no admin endpoint.
    pub async fn start(pki: &Pki, routes: &[Route]) -> Result<Proxy> {
        Proxy::start_with(&Settings::routes_only(pki, routes.to_vec())).await
    }

    /// Writes the config, binds the server and spawns `run` with a oneshot as shutdown.
    pub async fn start_with(settings: &Settings) -> Result<Proxy> {
        let dir = tempfile::tempdir().context("tempdir for the proxy")?;
        let config_path = settings.write(dir.path())?;
        let config = tlsbridge::config::Config::load_from(
            Some(&config_path),
            std::iter::empty::<(String, String)>(),
        )
        .with_context(|| format!("load the proxy config:\n{}", settings.toml(dir.path())))?;
        let server = tlsbridge::server::Server::bind(config)
            .await
            .context("bind the proxy")?;
        let mut addrs = HashMap::new();
        for route in &settings.routes {
            let addr = server
                .local_addr(&route.name)
                .with_context(|| format!("no local address for route {}", route.name))?;
            addrs.insert(route.name.clone(), addr);
        }
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Ok(Proxy {
            dir,
            admin,
            addrs,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The listening address of route `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs
            .get(name)
            .unwrap_or_else(|| panic!("the test proxy has no route {name:?}"))
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("the admin endpoint is enabled")
    }

    /// The CA that signed the proxy's device certificate.
    pub fn device_ca(&self) -> PathBuf {
        self.dir.path().join("certs/ca.crt")
    }

    /// Verification against the proxy's CA (and the name "localhost").
    pub fn verify(&self) -> Verify {
        Verify::Ca(self.device_ca())
    }

    /// Signals shutdown and waits (bounded) for `run` to return.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().ok_or_else(|| anyhow!("already stopped"))?;
        tokio::time::timeout(Duration::from_secs(40), task)
            .await
            .context("the proxy did not stop within 40s")?
            .context("the proxy task panicked")?
            .context("the proxy's run returned an error")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
