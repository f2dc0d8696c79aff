//! Starts tlsbridge in-process from a TOML file written into a tempdir.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::ca::Pki;
use super::device::Verify;

/// One `[[route]]` of the test configuration; it always listens on 127.0.0.1:0.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    pub name: String,
    pub protocol: String,
    pub device_tls: String,
    /// `host:port`; `localhost:PORT` for the fake upstreams.
    pub upstream: String,
    pub upstream_tls: String,
}

#[allow(dead_code)]
impl RouteSpec {
    pub fn new(
        name: &str,
        protocol: &str,
        device_tls: &str,
        upstream: &str,
        upstream_tls: &str,
    ) -> RouteSpec {
        RouteSpec {
            name: name.to_string(),
            protocol: protocol.to_string(),
            device_tls: device_tls.to_string(),
            upstream: upstream.to_string(),
            upstream_tls: upstream_tls.to_string(),
        }
    }

    /// SMTP, device `device_tls`, upstream STARTTLS at `localhost:port`.
    pub fn smtp(name: &str, device_tls: &str, port: u16) -> RouteSpec {
        RouteSpec::new(
            name,
            "smtp",
            device_tls,
            &format!("localhost:{port}"),
            "starttls",
        )
    }
}

/// A running proxy. Dropping it signals shutdown.
pub struct Proxy {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    addrs: HashMap<String, SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

fn toml_str(value: &str) -> String {
    // A JSON string is a valid TOML basic string.
    serde_json::to_string(value).unwrap_or_else(|_| format!("{value:?}"))
}

fn path_str(path: &std::path::Path) -> String {
    toml_str(&path.display().to_string())
}

/// The TOML for `routes`, with state and certificates in `dir`.
pub fn config_toml(dir: &std::path::Path, pki: &Pki, routes: &[RouteSpec]) -> String {
    let mut toml = String::new();
    let _ = writeln!(toml, "state_dir = {}", path_str(&dir.join("state")));
    let _ = writeln!(toml, "\n[log]\nlevel = \"debug\"");
    let _ = writeln!(toml, "\n[admin]\nlisten = \"\"");
    let _ = writeln!(toml, "\n[device_tls]");
    let _ = writeln!(
        toml,
        "cert = {}",
        path_str(&dir.join("certs/tlsbridge.crt"))
    );
    let _ = writeln!(toml, "key = {}", path_str(&dir.join("certs/tlsbridge.key")));
    let _ = writeln!(toml, "names = [\"localhost\"]");
    let _ = writeln!(toml, "handshake_timeout = \"10s\"");
    let _ = writeln!(toml, "\n[upstream_tls]");
    let _ = writeln!(toml, "extra_roots = [{}]", path_str(&pki.ca_path));
    let _ = writeln!(toml, "connect_timeout = \"5s\"");
    // Tests open connections in quick loops from one address.
    let _ = writeln!(toml, "\n[limits]\nconnect_rate_per_ip = 0");
    for route in routes {
        let _ = writeln!(toml, "\n[[route]]");
        let _ = writeln!(toml, "name = {}", toml_str(&route.name));
        let _ = writeln!(toml, "listen = \"127.0.0.1:0\"");
        let _ = writeln!(toml, "protocol = {}", toml_str(&route.protocol));
        let _ = writeln!(toml, "device_tls = {}", toml_str(&route.device_tls));
        let _ = writeln!(toml, "upstream = {}", toml_str(&route.upstream));
        let _ = writeln!(toml, "upstream_tls = {}", toml_str(&route.upstream_tls));
    }
    toml
}

#[allow(dead_code)]
impl Proxy {
    /// Writes the config, binds the server and spawns `run` with a oneshot as shutdown.
    pub async fn start(pki: &Pki, routes: &[RouteSpec]) -> Result<Proxy> {
        let dir = tempfile::tempdir().context("tempdir for the proxy")?;
        let config_path = dir.path().join("tlsbridge.toml");
        std::fs::write(&config_path, config_toml(dir.path(), pki, routes))
            .context("write the proxy config")?;
        let config = tlsbridge::config::Config::load_from(
            Some(&config_path),
            std::iter::empty::<(String, String)>(),
        )
        .context("load the proxy config")?;
        let server = tlsbridge::server::Server::bind(config)
            .await
            .context("bind the proxy")?;
        let mut addrs = HashMap::new();
        for route in routes {
            let addr = server
                .local_addr(&route.name)
                .with_context(|| format!("no local address for route {}", route.name))?;
            addrs.insert(route.name.clone(), addr);
        }
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Ok(Proxy {
            dir,
            config_path,
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

    /// The CA that signed the proxy's device certificate.
    pub fn device_ca(&self) -> PathBuf {
        self.dir.path().join("certs/ca.crt")
    }

    /// Verification against the proxy's CA (and the name "localhost").
    pub fn verify(&self) -> Verify {
        Verify::Ca(self.device_ca())
    }

    /// Signals shutdown and waits for `run` to return.
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
