//! Helpers for the operations tests: a configuration with every operational knob (admin
//! endpoint, limits, ACL, PROXY protocol, timeouts), tlsbridge in-process with its admin address,
//! the real binary with its JSON log read line by line, a Prometheus text parser, a small HTTP
//! client for the admin endpoint, signals and the CLI.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

use super::ca::Pki;
use super::device::{self, Legacy, Mail, SmtpClient, Verify};
use super::lines::Close;
use super::peers::{self, Output};

/// Bound on a process start (certificate generation included) and on most single waits.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on a polled condition (metrics, readiness).
pub const POLL_TIMEOUT: Duration = Duration::from_secs(15);

/// Pause between two polls of a condition the proxy reaches on its own.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// One `[[route]]`; it always listens on 127.0.0.1:0.
#[derive(Clone, Debug)]
pub struct Route {
    pub name: String,
    pub protocol: String,
    pub device_tls: String,
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
    /// SMTP with device `device_tls` (starttls, tls, plain) to a STARTTLS upstream at
    /// `localhost:port`.
    pub fn smtp(name: &str, device_tls: &str, port: u16) -> Route {
        Route {
            name: name.to_string(),
            protocol: "smtp".to_string(),
            device_tls: device_tls.to_string(),
            upstream: format!("localhost:{port}"),
            upstream_tls: "starttls".to_string(),
            allow: None,
            proxy_protocol: false,
            proxy_from: Vec::new(),
            sni_allow: Vec::new(),
        }
    }

    /// A `tcp` route with device `device_tls` to `upstream` (`host:port` or `sni:port`) over
    /// implicit TLS.
    pub fn tcp(name: &str, device_tls: &str, upstream: &str) -> Route {
        Route {
            protocol: "tcp".to_string(),
            upstream: upstream.to_string(),
            upstream_tls: "tls".to_string(),
            ..Route::smtp(name, device_tls, 0)
        }
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

/// Everything the operations tests set in a configuration file.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `admin.listen`: `"127.0.0.1:0"`, an address, or `""` (disabled).
    pub admin: String,
    pub log_level: String,
    pub handshake_timeout: String,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub drain_timeout: String,
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
    /// Admin endpoint on 127.0.0.1:0, generous limits, the test CA as the upstream root.
    pub fn new(pki: &Pki, routes: Vec<Route>) -> Settings {
        Settings {
            admin: "127.0.0.1:0".to_string(),
            log_level: "debug".to_string(),
            handshake_timeout: "10s".to_string(),
            max_connections: 100,
            max_connections_per_ip: 0,
            drain_timeout: "10s".to_string(),
            state_save_interval: "1m".to_string(),
            extra_roots: vec![pki.ca_path.clone()],
            names: vec!["localhost".to_string()],
            routes,
        }
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
        let _ = writeln!(toml, "max_connections = {}", self.max_connections);
        let _ = writeln!(
            toml,
            "max_connections_per_ip = {}",
            self.max_connections_per_ip
        );
        // Tests open connections in quick loops from one address.
        let _ = writeln!(toml, "connect_rate_per_ip = 0");
        let _ = writeln!(toml, "drain_timeout = {}", quoted(&self.drain_timeout));
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

/// tlsbridge running in-process, with its admin endpoint. Dropping it signals shutdown.
pub struct InProcess {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    admin: Option<SocketAddr>,
    addrs: HashMap<String, SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl InProcess {
    pub async fn start(settings: &Settings) -> Result<InProcess> {
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
        Ok(InProcess {
            dir,
            config_path,
            admin,
            addrs,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    pub fn addr(&self, route: &str) -> SocketAddr {
        *self
            .addrs
            .get(route)
            .unwrap_or_else(|| panic!("the test proxy has no route {route:?}"))
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("the admin endpoint is enabled")
    }

    /// The CA that signed the device certificate.
    pub fn verify(&self) -> Verify {
        Verify::Ca(self.dir.path().join("certs/ca.crt"))
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

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The real binary, `run --config FILE --log-format json`, its stdout read line by line.
/// Dropping it kills the process.
pub struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    seen: watch::Receiver<usize>,
    reader: Option<JoinHandle<()>>,
    stderr_path: PathBuf,
    addrs: HashMap<String, SocketAddr>,
    admin: Option<SocketAddr>,
}

/// The `message` of a JSON log event.
pub fn message(event: &Value) -> &str {
    event.get("message").and_then(Value::as_str).unwrap_or("")
}

/// A string field of a JSON log event ("" when absent).
pub fn field<'a>(event: &'a Value, name: &str) -> &'a str {
    event.get(name).and_then(Value::as_str).unwrap_or("")
}

/// A number field of a JSON log event.
pub fn number(event: &Value, name: &str) -> Option<u64> {
    event.get(name).and_then(Value::as_u64)
}

/// Whether `event` is the audit event `name` (`legacy_client`, `session_closed`).
pub fn is_audit(event: &Value, name: &str) -> bool {
    field(event, "event") == name
}

impl Process {
    /// Writes the configuration into `dir`, starts the binary there and waits until every route
    /// and (when enabled) the admin endpoint logged the address they are bound to.
    pub async fn start(dir: &Path, settings: &Settings) -> Result<Process> {
        Process::start_via(dir, settings, &[]).await
    }

    /// [`start`](Self::start), with the binary run by `wrapper` (a program and its first
    /// arguments, e.g. `unshare -m sh -c SCRIPT`): the command line is `wrapper... tlsbridge run
    /// ...`. The wrapper must `exec` the binary, so signals reach it.
    pub async fn start_via(dir: &Path, settings: &Settings, wrapper: &[String]) -> Result<Process> {
        let config_path = settings.write(dir)?;
        let stderr_path = dir.join(format!("stderr-{}.log", unique()));
        let stderr = std::fs::File::create(&stderr_path)
            .with_context(|| format!("create {}", stderr_path.display()))?;
        let binary = env!("CARGO_BIN_EXE_tlsbridge");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(["--log-format", "json"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        clean_env(&mut command);
        let mut child = command.spawn().context("start tlsbridge")?;
        let stdout = child.stdout.take().context("tlsbridge stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, seen) = watch::channel(0usize);
        let store = lines.clone();
        let reader = tokio::spawn(async move {
            let mut stdout = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = stdout.next_line().await {
                let count = {
                    let mut all = store.lock().unwrap_or_else(|p| p.into_inner());
                    all.push(line);
                    all.len()
                };
                let _ = tx.send(count);
            }
        });
        let mut process = Process {
            child,
            lines,
            seen,
            reader: Some(reader),
            stderr_path,
            addrs: HashMap::new(),
            admin: None,
        };
        for route in &settings.routes {
            let name = route.name.clone();
            let event = process
                .wait_event(
                    &format!("`listening` for route {name}"),
                    START_TIMEOUT,
                    |e| message(e) == "listening" && field(e, "route") == name,
                )
                .await?;
            let addr: SocketAddr = field(&event, "listen")
                .parse()
                .with_context(|| format!("listen field of {event}"))?;
            process.addrs.insert(route.name.clone(), addr);
        }
        if !settings.admin.is_empty() {
            let event = process
                .wait_event("`admin endpoint listening`", START_TIMEOUT, |e| {
                    message(e) == "admin endpoint listening"
                })
                .await?;
            let addr: SocketAddr = field(&event, "listen")
                .parse()
                .with_context(|| format!("listen field of {event}"))?;
            process.admin = Some(addr);
        }
        Ok(process)
    }

    pub fn addr(&self, route: &str) -> SocketAddr {
        *self
            .addrs
            .get(route)
            .unwrap_or_else(|| panic!("the process has no route {route:?}"))
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("the admin endpoint is enabled")
    }

    pub fn pid(&self) -> Result<u32> {
        self.child.id().context("the process has exited")
    }

    /// Sends `signal` (`TERM`, `HUP`, `INT`) with kill(1).
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid()?;
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .context("run kill")?;
        ensure!(status.success(), "kill -{signal} {pid} failed: {status}");
        Ok(())
    }

    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every stdout line that is a JSON object, parsed.
    pub fn events(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// Everything the process wrote (stdout, then stderr), for failure messages and searches.
    pub fn output(&self) -> String {
        let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{stderr}",
            self.lines().join("\n")
        )
    }

    /// Waits until a JSON line matches `pred` (bounded by `limit`) and returns it. Lines seen
    /// before the call count too.
    pub async fn wait_event<F: Fn(&Value) -> bool>(
        &self,
        what: &str,
        limit: Duration,
        pred: F,
    ) -> Result<Value> {
        let deadline = Instant::now() + limit;
        let mut seen = self.seen.clone();
        let mut checked = 0;
        loop {
            seen.borrow_and_update();
            {
                let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
                for line in &lines[checked..] {
                    if let Ok(event) = serde_json::from_str::<Value>(line) {
                        if pred(&event) {
                            return Ok(event);
                        }
                    }
                }
                checked = lines.len();
            }
            match timeout_at(deadline, seen.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => {
                    // The reader ended: one last look at what it stored.
                    let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(event) = lines[checked..]
                        .iter()
                        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                        .find(|e| pred(e))
                    {
                        return Ok(event);
                    }
                    drop(lines);
                    bail!(
                        "tlsbridge closed its stdout before logging {what}\n{}",
                        self.output()
                    );
                }
                Err(_) => bail!(
                    "tlsbridge logged no {what} within {limit:?}\n{}",
                    self.output()
                ),
            }
        }
    }

    /// Waits (bounded) for the process to exit and for its stdout to be read to the end.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        let status = match timeout_at(deadline, self.child.wait()).await {
            Ok(status) => status.context("wait for tlsbridge")?,
            Err(_) => bail!("tlsbridge did not exit within {limit:?}\n{}", self.output()),
        };
        if let Some(reader) = self.reader.take() {
            let _ = timeout_at(deadline + Duration::from_secs(5), reader).await;
        }
        Ok(status)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// No TLSBRIDGE__ variables or RUST_LOG from the test's environment.
fn clean_env(command: &mut Command) {
    for (key, _) in std::env::vars() {
        if key.starts_with("TLSBRIDGE__") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
}

/// Runs `tlsbridge args` to its end (bounded), without TLSBRIDGE__ variables or RUST_LOG.
pub async fn cli(args: &[&str]) -> Result<Output> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let program = env!("CARGO_BIN_EXE_tlsbridge");
    let mut command = Command::new(program);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    clean_env(&mut command);
    let child = command
        .spawn()
        .with_context(|| format!("start {program}"))?;
    let output = tokio::time::timeout(peers::PROGRAM_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("tlsbridge {args:?} did not finish (killed)"))?
        .context("wait for tlsbridge")?;
    Ok(Output {
        command: format!("tlsbridge {}", args.join(" ")),
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// An HTTP response from the admin endpoint.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Http {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close`; the whole exchange bounded.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> Result<Http> {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to the admin endpoint {addr}"))?;
        let body = if method == "POST" { "x=1" } else { "" };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("{method} {path} on {addr} timed out"))??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("incomplete HTTP response: {text:?}"))?;
    let mut head_lines = head.lines();
    let status = head_lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {text:?}"))?;
    let headers = head_lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Http {
        status,
        headers,
        body: body.to_string(),
    })
}

/// One time series: metric name and labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Display for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        write!(f, "{}{{{}}}", self.name, labels.join(","))
    }
}

/// `name{k="v",...}` for lookups and expectations.
pub fn series(name: &str, labels: &[(&str, &str)]) -> Series {
    Series {
        name: name.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// A parsed Prometheus text exposition (format 0.0.4).
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub samples: BTreeMap<Series, f64>,
    /// Metric family -> `counter`, `gauge`, `histogram`, ...
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parses the text strictly: every sample line must be `name{labels} value` or
    /// `name value`, belong to a family with a `# TYPE` line, and appear once.
    pub fn parse(text: &str) -> Result<Exposition> {
        let mut out = Exposition::default();
        for (number, line) in text.lines().enumerate() {
            let context = || format!("line {}: {line:?}", number + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let words: Vec<&str> = comment.split_whitespace().collect();
                if words.first() == Some(&"TYPE") {
                    ensure!(words.len() == 3, "malformed TYPE, {}", context());
                    out.types.insert(words[1].to_string(), words[2].to_string());
                }
                continue;
            }
            let (series, value) = parse_sample(line).with_context(context)?;
            let family = family_of(&series.name, &out.types)
                .with_context(|| format!("no # TYPE for this sample, {}", context()))?;
            if out.types.get(family).map(String::as_str) == Some("histogram") {
                ensure!(
                    series.name != family,
                    "a histogram sample needs _bucket/_sum/_count, {}",
                    context()
                );
            }
            ensure!(
                out.samples.insert(series, value).is_none(),
                "duplicate series, {}",
                context()
            );
        }
        Ok(out)
    }

    /// The value of a series, 0 when absent (a counter never incremented is not rendered).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .get(&series(name, labels))
            .copied()
            .unwrap_or(0.0)
    }

    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&series(name, labels)).copied()
    }

    /// Every series whose value differs from `before`, with the difference. Leaves out what
    /// depends on timing: the process start time, histogram sums and finite buckets.
    pub fn changes_since(&self, before: &Exposition) -> BTreeMap<Series, f64> {
        let mut keys: Vec<&Series> = self.samples.keys().collect();
        keys.extend(before.samples.keys());
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|s| s.name != "process_start_time_seconds")
            .filter(|s| !s.name.ends_with("_sum"))
            .filter(|s| {
                !(s.name.ends_with("_bucket")
                    && s.labels.get("le").map(String::as_str) != Some("+Inf"))
            })
            .filter_map(|s| {
                let now = self.samples.get(s).copied().unwrap_or(0.0);
                let then = before.samples.get(s).copied().unwrap_or(0.0);
                (now != then).then(|| (s.clone(), now - then))
            })
            .collect()
    }

    /// Histogram buckets are cumulative: non-decreasing in `le`, `+Inf` equal to `_count`.
    pub fn check_histograms(&self) -> Result<()> {
        let mut groups: BTreeMap<Series, Vec<(f64, f64)>> = BTreeMap::new();
        for (s, value) in &self.samples {
            let Some(base) = s.name.strip_suffix("_bucket") else {
                continue;
            };
            let le = s.labels.get("le").context("bucket without le")?;
            let bound = match le.as_str() {
                "+Inf" => f64::INFINITY,
                other => other.parse().with_context(|| format!("le {other:?}"))?,
            };
            let mut key = s.clone();
            key.name = base.to_string();
            key.labels.remove("le");
            groups.entry(key).or_default().push((bound, *value));
        }
        for (key, mut buckets) in groups {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            for pair in buckets.windows(2) {
                ensure!(
                    pair[0].1 <= pair[1].1,
                    "{key}: buckets decrease: {buckets:?}"
                );
            }
            let count_series = Series {
                name: format!("{}_count", key.name),
                labels: key.labels.clone(),
            };
            let count = self.samples.get(&count_series).copied();
            let inf = buckets.last().map(|b| b.1);
            ensure!(
                buckets.last().map(|b| b.0) == Some(f64::INFINITY) && count == inf,
                "{key}: +Inf bucket {inf:?} differs from _count {count:?}"
            );
        }
        Ok(())
    }
}

impl std::fmt::Display for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (s, value) in &self.samples {
            writeln!(f, "  {s} {value}")?;
        }
        Ok(())
    }
}

fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find(|base| types.contains_key(*base))
}

fn parse_sample(line: &str) -> Result<(Series, f64)> {
    let name_end = line.find(['{', ' ']).context("no value")?;
    let name = &line[..name_end];
    ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit()),
        "bad metric name {name:?}"
    );
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end;
        loop {
            let Some(&(start, c)) = chars.peek() else {
                bail!("unterminated label set");
            };
            if c == '}' {
                end = start + 1;
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            ensure!(
                !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad label name {key:?}"
            );
            ensure!(
                chars.next().map(|(_, c)| c) == Some('"'),
                "label {key} value not quoted"
            );
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        other => bail!("bad escape {other:?}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                }
            }
            ensure!(
                labels.insert(key.clone(), value).is_none(),
                "label {key} twice"
            );
            match chars.peek() {
                Some((_, ',')) => {
                    chars.next();
                }
                Some((_, '}')) => {}
                other => bail!("expected , or }} after a label, got {other:?}"),
            }
        }
        rest = &after[end..];
    }
    let value_text = rest
        .strip_prefix(' ')
        .context("no space before the value")?;
    let value_text = value_text.split(' ').next().unwrap_or("");
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse::<f64>()
            .with_context(|| format!("bad value {other:?}"))?,
    };
    Ok((
        Series {
            name: name.to_string(),
            labels,
        },
        value,
    ))
}

/// GET /metrics, parsed.
pub async fn scrape(admin: SocketAddr) -> Result<Exposition> {
    let response = http(admin, "GET", "/metrics").await?;
    ensure!(response.status == 200, "/metrics answered {response:?}");
    let exposition = Exposition::parse(&response.body)
        .with_context(|| format!("/metrics is not valid exposition text:\n{}", response.body))?;
    exposition.check_histograms()?;
    Ok(exposition)
}

/// Scrapes until `pred` holds (bounded by [`POLL_TIMEOUT`]); returns that scrape.
pub async fn scrape_until<F: Fn(&Exposition) -> bool>(
    admin: SocketAddr,
    what: &str,
    pred: F,
) -> Result<Exposition> {
    let deadline = Instant::now() + POLL_TIMEOUT;
    loop {
        let now = scrape(admin).await?;
        if pred(&now) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!("/metrics never showed {what} within {POLL_TIMEOUT:?}; last scrape:\n{now}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// GET /clients as JSON.
pub async fn clients(admin: SocketAddr) -> Result<Vec<Value>> {
    let response = http(admin, "GET", "/clients").await?;
    ensure!(response.status == 200, "/clients answered {response:?}");
    ensure!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "/clients content type: {response:?}"
    );
    serde_json::from_str(&response.body)
        .with_context(|| format!("/clients is not a JSON array: {}", response.body))
}

/// Polls `path` until it answers `status` (bounded by [`POLL_TIMEOUT`]).
pub async fn poll_status(admin: SocketAddr, path: &str, status: u16) -> Result<()> {
    let deadline = Instant::now() + POLL_TIMEOUT;
    loop {
        let last = http(admin, "GET", path).await;
        if matches!(&last, Ok(r) if r.status == status) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{path} never answered {status} within {POLL_TIMEOUT:?}; last: {last:?}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// What a device saw of one STARTTLS SMTP session.
#[derive(Debug)]
pub struct DeviceRun {
    /// The device's own address (the proxy's `peer`).
    pub local: SocketAddr,
    pub version: String,
    pub cipher: String,
    /// The serial number (hex) of the certificate the proxy presented.
    pub serial: String,
    /// Bytes sent and received inside TLS.
    pub sent: Vec<u8>,
    pub received: Vec<u8>,
    pub close: Close,
}

/// A full STARTTLS SMTP session over `tcp` (already connected, a PROXY header already written
/// if any): banner, `EHLO ehlo`, STARTTLS, a TLS handshake as `legacy`, a mail, QUIT, close.
pub async fn starttls_mail(
    tcp: TcpStream,
    ehlo: &str,
    legacy: Legacy,
    verify: &Verify,
) -> Result<DeviceRun> {
    let local = tcp.local_addr().context("device local address")?;
    let mut plain = SmtpClient::new(tcp);
    plain.greeting().await?;
    plain.expect(&format!("EHLO {ehlo}"), 250).await?;
    plain.expect("STARTTLS", 220).await?;
    let mut tls = plain.start_tls(legacy, verify).await?;
    let (version, cipher) = device::tls_info(tls.conn.get_ref());
    let serial = serial(tls.conn.get_ref())?;
    tls.send_mail(&Mail::sample()).await?;
    let (_, close) = tls.read_to_close().await?;
    Ok(DeviceRun {
        local,
        version,
        cipher,
        serial,
        sent: tls.conn.sent.clone(),
        received: tls.conn.received.clone(),
        close,
    })
}

/// The serial number (hex) of the peer's certificate.
pub fn serial(stream: &tokio_openssl::SslStream<TcpStream>) -> Result<String> {
    let cert = stream
        .ssl()
        .peer_certificate()
        .context("the proxy presented no certificate")?;
    let hex = cert
        .serial_number()
        .to_bn()
        .and_then(|bn| bn.to_hex_str().map(|s| s.to_string()))
        .context("serial number")?;
    Ok(hex)
}

/// Standard base64 with padding (for AUTH PLAIN).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads from `tcp` until the peer closes it (bounded by `limit`); returns what came and how it
/// ended.
pub async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> Result<(Vec<u8>, Close)> {
    let work = async {
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) => return (got, Close::Clean),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(err) => return (got, super::lines::classify(&err)),
            }
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .with_context(|| format!("the proxy did not close the connection within {limit:?}"))
}
