//! `--scenarios compare`: the same load against tlsbridge and, when they are installed, nginx
//! (stream module), HAProxy and stunnel, each configured for tlsbridge's job: TLS 1.0 and up from
//! devices with `DEFAULT:@SECLEVEL=0` and an RSA-2048 certificate, a verified TLS 1.2 connection
//! to the upstream (the others offer TLS 1.2 only, or 1.2 and 1.3 as tlsbridge does with
//! `--contenders-offer-tls13`). Each proxy is a fresh process pinned to CPU 0 (`taskset -c 0`);
//! the loadgen and its upstreams run on CPU 1 when scripts/bench.sh starts it.
//!
//! Per proxy, in this order: a warm-up, the RSS baseline, 2,000 idle relayed connections (RSS per
//! connection), a burst to 8,000 open connections (peak RSS), all closed, RSS 10 s later; then
//! CPU per device handshake under load (TLS 1.0 ECDHE, no device session reuse, the upstream leg
//! resumed) and throughput over 4 connections each way. CPU and RSS are the whole process tree's
//! (nginx: master and worker), from /proc.

use super::*;

/// How a contender is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// tlsbridge with its generated device certificate of this key type.
    Tlsbridge(&'static str),
    Nginx,
    Haproxy,
    Stunnel,
}

impl Kind {
    fn device(self) -> DeviceTls {
        match self {
            Kind::Tlsbridge("ecdsa-p256") => DeviceTls::Tls10Ecdsa,
            _ => DeviceTls::Tls10,
        }
    }
}

/// One row of the comparison.
pub(crate) struct CompareRow {
    pub name: String,
    pub device: &'static str,
    pub handshakes: usize,
    pub handshake_cpu_ms: Option<f64>,
    pub handshake_rate: f64,
    pub upstream_full: u64,
    pub upstream_resumed: u64,
    pub up_mib_s: Option<f64>,
    pub down_mib_s: Option<f64>,
    pub idle_open: usize,
    pub idle_kib_per_conn: Option<f64>,
    pub rss_before_kib: u64,
    pub burst: Option<Burst>,
    pub errors: usize,
    pub first_error: Option<String>,
    pub note: Option<String>,
    /// Upstream connections the proxy ended with a bare FIN instead of close_notify.
    pub bare_fins: u64,
}

pub(crate) struct Burst {
    pub open: usize,
    pub peak_kib: u64,
    pub after_kib: u64,
}

/// The files every contender shares.
struct Files<'a> {
    dir: &'a Path,
    /// The device certificate chain (leaf + local CA) and key, RSA-2048, made by tlsbridge.
    cert: PathBuf,
    key: PathBuf,
    /// The upstreams' CA.
    upstream_ca: &'a Path,
    /// The other proxies offer TLS 1.3 upstream as well as 1.2.
    offer_tls13: bool,
}

impl Files<'_> {
    /// The highest TLS version the other proxies offer upstream.
    fn upstream_max(&self) -> &'static str {
        match self.offer_tls13 {
            true => "TLSv1.3",
            false => "TLSv1.2",
        }
    }
}

/// A running contender; dropping it kills the process.
struct Running {
    child: Option<Child>,
    /// tlsbridge runs through `ProxyProcess` (its log is parsed for the listening addresses).
    tlsbridge: Option<ProxyProcess>,
    echo: SocketAddr,
    sink: SocketAddr,
    source: SocketAddr,
}

impl Running {
    fn pid(&self) -> u32 {
        match (&self.tlsbridge, &self.child) {
            (Some(proxy), _) => proxy.pid(),
            (None, Some(child)) => child.id(),
            (None, None) => 0,
        }
    }
}

impl Drop for Running {
    /// SIGTERM first, so that a master process (nginx) takes its workers with it; SIGKILL if
    /// it is still there 2 s later.
    fn drop(&mut self) {
        let Some(child) = &mut self.child else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: a plain kill(2) on our own child, which has not been waited for yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Where a program is, from PATH and the sbin directories (Debian puts haproxy and nginx there).
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file());
    found
}

/// The version number a program prints (`nginx version: nginx/1.22.1` -> `1.22.1`).
fn program_version(program: &Path, arg: &str) -> String {
    let text = Command::new(program)
        .arg(arg)
        .output()
        .map(|out| {
            let text = [out.stdout, out.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| l.contains(|c: char| c.is_ascii_digit()) && !l.starts_with("Init"))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    text.split([' ', '/', '-'])
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()) && word.contains('.'))
        .unwrap_or("?")
        .to_string()
}

/// A free port on 127.0.0.1 (bound and released: the proxy binds it right after).
fn free_port() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    listener.local_addr().context("free port address")
}

/// `taskset -c 0 PROGRAM ARGS...` with output to `log`.
fn pinned(program: &Path, args: &[&str], log: &Path) -> Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new("taskset")
        .args(["-c", "0"])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("start {} under taskset", program.display()))
}

async fn wait_listening(child: &mut Child, addrs: &[SocketAddr], log: &Path) -> Result<()> {
    let deadline = Instant::now() + PROXY_START_TIMEOUT;
    for addr in addrs {
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                bail!("exited with {status} before listening on {addr}:\n{text}");
            }
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("nothing listens on {addr} after {PROXY_START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn nginx_config(f: &Files, up: &Upstreams, ports: &[SocketAddr; 3]) -> String {
    let mut conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes 1; worker_rlimit_nofile 20000; daemon off; master_process on;\n\
         pid {dir}/nginx.pid; error_log {dir}/nginx-error.log warn;\n\
         events {{ worker_connections 18000; }}\nstream {{\n",
        dir = f.dir.display()
    );
    for (listen, upstream) in ports.iter().zip(up.all()) {
        let _ = writeln!(
            conf,
            "  server {{\n    listen {listen} ssl; ssl_certificate {cert}; ssl_certificate_key {key};\n    \
             ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3; ssl_ciphers DEFAULT:@SECLEVEL=0;\n    \
             proxy_pass {upstream}; proxy_timeout 600s; proxy_half_close on;\n    \
             proxy_ssl on; proxy_ssl_protocols {protocols}; proxy_ssl_verify on;\n    \
             proxy_ssl_trusted_certificate {ca}; proxy_ssl_name localhost; proxy_ssl_server_name on;\n  }}",
            cert = f.cert.display(),
            key = f.key.display(),
            ca = f.upstream_ca.display(),
            protocols = match f.offer_tls13 {
                true => "TLSv1.2 TLSv1.3",
                false => "TLSv1.2",
            },
        );
    }
    conf.push_str("}\n");
    conf
}

fn haproxy_config(f: &Files, pem: &Path, up: &Upstreams, ports: &[SocketAddr; 3]) -> String {
    // maxconn: 8,000 in the reference settings; a little headroom so the burst's last
    // connections never wait behind ones still closing from the warm-up.
    let mut conf = String::from(
        "global\n  nbthread 1\n  maxconn 8100\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
         timeout client 10m\n  timeout server 10m\n",
    );
    for ((name, listen), upstream) in ["echo", "sink", "source"].iter().zip(ports).zip(up.all()) {
        let _ = writeln!(
            conf,
            "frontend {name}\n  bind {listen} ssl crt {pem} ssl-min-ver TLSv1.0 ciphers DEFAULT:@SECLEVEL=0\n  \
             default_backend up_{name}\nbackend up_{name}\n  server up {upstream} ssl verify required \
             ca-file {ca} verifyhost localhost sni str(localhost) ssl-min-ver TLSv1.2 ssl-max-ver {max}",
            pem = pem.display(),
            ca = f.upstream_ca.display(),
            max = f.upstream_max(),
        );
    }
    conf
}

fn stunnel_config(f: &Files, up: &Upstreams, ports: &[SocketAddr; 3]) -> String {
    let mut conf = format!(
        "foreground = yes\npid =\noutput = {}/stunnel-service.log\ndebug = 4\n",
        f.dir.display()
    );
    for ((name, listen), upstream) in ["echo", "sink", "source"].iter().zip(ports).zip(up.all()) {
        let hop = f.dir.join(format!("hop-{name}.sock"));
        let _ = writeln!(
            conf,
            "[device-{name}]\naccept = {listen}\nconnect = {hop}\ncert = {cert}\nkey = {key}\n\
             sslVersionMin = TLSv1\nsecurityLevel = 0\nciphers = DEFAULT:@SECLEVEL=0\n\
             [upstream-{name}]\nclient = yes\naccept = {hop}\nconnect = {upstream}\n\
             sslVersionMin = TLSv1.2\nsslVersionMax = {max}\nverifyChain = yes\nCAfile = {ca}\n\
             checkHost = localhost\nsni = localhost",
            hop = hop.display(),
            cert = f.cert.display(),
            key = f.key.display(),
            ca = f.upstream_ca.display(),
            max = f.upstream_max(),
        );
    }
    conf
}

/// The three upstream services of the comparison.
#[derive(Clone, Copy)]
pub(crate) struct Upstreams {
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    pub source: SocketAddr,
}

impl Upstreams {
    fn all(&self) -> [SocketAddr; 3] {
        [self.echo, self.sink, self.source]
    }
}

async fn start(
    kind: Kind,
    args: &Args,
    proxy_bin: &Path,
    files: &Files<'_>,
    up: &Upstreams,
    tag: &str,
) -> Result<Running> {
    let dir = files.dir;
    let log = dir.join(format!("{tag}.log"));
    let ports = [free_port()?, free_port()?, free_port()?];
    let (program, config_args, config_text) = match kind {
        Kind::Tlsbridge(key_type) => {
            let dir = dir.join(tag);
            std::fs::create_dir_all(dir.join("certs"))?;
            if key_type == "rsa2048" {
                // Every contender shows the devices the same RSA-2048 chain.
                std::fs::copy(&files.cert, dir.join("certs/tlsbridge.crt"))?;
                std::fs::copy(&files.key, dir.join("certs/tlsbridge.key"))?;
            }
            let routes = [
                (ROUTE_ECHO, Service::Echo, up.echo),
                (ROUTE_SINK, Service::Sink, up.sink),
                (ROUTE_SOURCE, Service::Source, up.source),
            ];
            let settings = ProxySettings {
                log_level: "info",
                key_type,
                max_connections: 9000,
            };
            let config = dir.join("tlsbridge.toml");
            let text = proxy_config(
                &dir,
                files.upstream_ca,
                &args.upstream_host,
                &routes,
                &settings,
            );
            std::fs::write(&config, text)?;
            let proxy = ProxyProcess::start_with(
                proxy_bin,
                &config,
                &log,
                &[ROUTE_ECHO, ROUTE_SINK, ROUTE_SOURCE],
                Launch {
                    pin_cpu: Some("0"),
                    rust_log: None,
                    wrapper: Vec::new(),
                },
            )
            .await?;
            return Ok(Running {
                echo: proxy.addr(ROUTE_ECHO)?,
                sink: proxy.addr(ROUTE_SINK)?,
                source: proxy.addr(ROUTE_SOURCE)?,
                child: None,
                tlsbridge: Some(proxy),
            });
        }
        Kind::Nginx => {
            let conf = dir.join("nginx.conf");
            let args = vec![
                "-p".to_string(),
                dir.display().to_string(),
                "-e".to_string(),
                dir.join("nginx-error.log").display().to_string(),
                "-c".to_string(),
                conf.display().to_string(),
            ];
            ("nginx", args, (conf, nginx_config(files, up, &ports)))
        }
        Kind::Haproxy => {
            let pem = dir.join("haproxy-device.pem");
            let chain = std::fs::read_to_string(&files.cert)?;
            let key = std::fs::read_to_string(&files.key)?;
            std::fs::write(&pem, format!("{chain}{key}"))?;
            let conf = dir.join("haproxy.cfg");
            let args = vec![
                "-db".to_string(),
                "-f".to_string(),
                conf.display().to_string(),
            ];
            (
                "haproxy",
                args,
                (conf, haproxy_config(files, &pem, up, &ports)),
            )
        }
        Kind::Stunnel => {
            let conf = dir.join("stunnel.conf");
            let args = vec![conf.display().to_string()];
            ("stunnel", args, (conf, stunnel_config(files, up, &ports)))
        }
    };
    let program = which(program).ok_or_else(|| anyhow!("{program} is not installed"))?;
    std::fs::write(&config_text.0, &config_text.1)?;
    let refs: Vec<&str> = config_args.iter().map(String::as_str).collect();
    let mut child = pinned(&program, &refs, &log)?;
    if let Err(err) = wait_listening(&mut child, &ports, &log).await {
        let _ = child.kill();
        let _ = child.wait();
        return Err(err);
    }
    Ok(Running {
        child: Some(child),
        tlsbridge: None,
        echo: ports[0],
        sink: ports[1],
        source: ports[2],
    })
}

// ---------------------------------------------------------------------------------------------
// The process tree in /proc.

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `root` and its descendants.
fn tree(root: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                if let Some(parent) = parent_of(pid) {
                    all.push((pid, parent));
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(all.iter().filter(|(_, p)| *p == parent).map(|(c, _)| *c));
        i += 1;
    }
    out
}

fn tree_rss_kib(root: u32) -> u64 {
    tree(root)
        .iter()
        .filter_map(|&pid| proc_status(pid, "VmRSS"))
        .sum()
}

fn tree_cpu_seconds(root: u32) -> f64 {
    tree(root)
        .iter()
        .filter_map(|pid| cpu_seconds(&pid.to_string()))
        .sum()
}

// ---------------------------------------------------------------------------------------------
// The measurements.

const BULK_CONNS: usize = 4;
const OPEN_CONCURRENCY: usize = 32;

#[allow(clippy::too_many_arguments)]
async fn measure(
    kind: Kind,
    name: String,
    args: &Args,
    proxy_bin: &Path,
    files: &Files<'_>,
    up: &Upstreams,
    stats: &UpstreamStats,
    tag: &str,
) -> Result<CompareRow> {
    progress(&format!("compare: {name}: starting (pinned to CPU 0)"));
    let running = start(kind, args, proxy_bin, files, up, tag).await?;
    let pid = running.pid();
    let device = kind.device();
    let connector = device.connector()?;
    let mut row = CompareRow {
        name,
        device: device.label(),
        handshakes: 0,
        handshake_cpu_ms: None,
        handshake_rate: 0.0,
        upstream_full: 0,
        upstream_resumed: 0,
        up_mib_s: None,
        down_mib_s: None,
        idle_open: 0,
        idle_kib_per_conn: None,
        rss_before_kib: 0,
        burst: None,
        errors: 0,
        first_error: None,
        note: None,
        bare_fins: 0,
    };
    let fins0 = BARE_FINS.load(Ordering::Relaxed);
    let fail = |row: &mut CompareRow, errors: usize, first: Option<String>| {
        row.errors += errors;
        if row.first_error.is_none() {
            row.first_error = first;
        }
    };

    for _ in 0..WARM_UP * 2 {
        echo_session(connector.clone(), running.echo)
            .await
            .with_context(|| format!("{}: warm-up", row.name))?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    row.rss_before_kib = tree_rss_kib(pid);

    // Idle memory, then the burst on top of it.
    let burst = args.burst > args.compare_idle && kind != Kind::Stunnel;
    let idle_target = args.compare_idle;
    progress(&format!(
        "compare: {}: {idle_target} idle connections",
        row.name
    ));
    let mut open = Vec::new();
    let (errors, first) = open_many(
        &connector,
        running.echo,
        idle_target,
        OPEN_CONCURRENCY,
        &mut open,
    )
    .await;
    fail(&mut row, errors, first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    row.idle_open = open.len();
    let idle_rss = tree_rss_kib(pid);
    row.idle_kib_per_conn = (!open.is_empty())
        .then(|| idle_rss.saturating_sub(row.rss_before_kib) as f64 / open.len() as f64);
    if burst {
        let more = args.burst.saturating_sub(open.len());
        progress(&format!(
            "compare: {}: burst to {} open connections",
            row.name, args.burst
        ));
        let (errors, first) =
            open_many(&connector, running.echo, more, OPEN_CONCURRENCY, &mut open).await;
        fail(&mut row, errors, first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let peak_open = open.len();
        let peak = tree_rss_kib(pid);
        let errors = close_many(std::mem::take(&mut open), OPEN_CONCURRENCY * 2).await;
        fail(
            &mut row,
            errors,
            (errors > 0).then(|| "unclean close".into()),
        );
        progress(&format!(
            "compare: {}: all closed; RSS again in {} s",
            row.name, args.burst_settle
        ));
        tokio::time::sleep(Duration::from_secs(args.burst_settle)).await;
        row.burst = Some(Burst {
            open: peak_open,
            peak_kib: peak,
            after_kib: tree_rss_kib(pid),
        });
    } else {
        let errors = close_many(std::mem::take(&mut open), OPEN_CONCURRENCY * 2).await;
        fail(
            &mut row,
            errors,
            (errors > 0).then(|| "unclean close".into()),
        );
        if kind == Kind::Stunnel {
            row.note = Some(format!(
                "stunnel: no burst (4 descriptors and 2 threads per connection: {} descriptors \
                 for {} connections)",
                4 * args.burst,
                args.burst
            ));
        }
    }

    // CPU per device handshake.
    progress(&format!(
        "compare: {}: handshakes, concurrency {}, {:.0} s",
        row.name, args.concurrency, args.duration
    ));
    let (full0, resumed0) = stats.handshakes();
    let cpu0 = tree_cpu_seconds(pid);
    let started = Instant::now();
    let echo = running.echo;
    let connector2 = connector.clone();
    let sample = run_load(
        args.concurrency,
        args.max_connections,
        Duration::from_secs_f64(args.duration),
        move || echo_session(connector2.clone(), echo),
    )
    .await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = tree_cpu_seconds(pid) - cpu0;
    let (full1, resumed1) = stats.handshakes();
    fail(&mut row, sample.errors, sample.first_error);
    row.handshakes = sample.setups.len();
    row.handshake_rate = row.handshakes as f64 / wall.max(1e-9);
    row.handshake_cpu_ms = (row.handshakes > 0).then(|| 1000.0 * cpu / row.handshakes as f64);
    row.upstream_full = full1 - full0;
    row.upstream_resumed = resumed1 - resumed0;

    // Throughput over 4 connections, each way.
    let cap = Duration::from_secs_f64(args.bulk_secs);
    let quota = args.bulk_mib * 1024 * 1024 / BULK_CONNS as u64;
    for direction in [Direction::Up, Direction::Down] {
        progress(&format!(
            "compare: {}: throughput {direction:?}, {BULK_CONNS} connections",
            row.name
        ));
        let started = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..BULK_CONNS {
            let connector = connector.clone();
            let (sink, source) = (running.sink, running.source);
            set.spawn(tokio::time::timeout(cap + IO_TIMEOUT * 2, async move {
                match direction {
                    Direction::Up => bulk_up(connector, sink, quota, cap).await,
                    Direction::Down => bulk_down(connector, source, quota, cap).await,
                }
            }));
        }
        let mut bytes = 0u64;
        while let Some(done) = set.join_next().await {
            match done {
                Ok(Ok(Ok(n))) => bytes += n,
                Ok(Ok(Err(err))) => fail(&mut row, 1, Some(format!("{err:#}"))),
                Ok(Err(_)) => fail(&mut row, 1, Some("throughput timed out".into())),
                Err(err) => fail(&mut row, 1, Some(format!("task failed: {err}"))),
            }
        }
        let mib_s = bytes as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64();
        match direction {
            Direction::Up => row.up_mib_s = Some(mib_s),
            Direction::Down => row.down_mib_s = Some(mib_s),
        }
    }
    row.bare_fins = BARE_FINS.load(Ordering::Relaxed) - fins0;
    if let Some(proxy) = running.tlsbridge.as_ref() {
        let warnings = proxy.log.warnings.load(Ordering::Relaxed);
        if warnings > 0 {
            row.note = Some(format!("tlsbridge logged {warnings} warning lines"));
        }
    }
    Ok(row)
}

/// Runs the comparison; the rows go into `report.compare`.
pub(crate) async fn run_compare(
    args: &Args,
    proxy_bin: &Path,
    dir: &Path,
    upstream_ca: &Path,
    up: &Upstreams,
    stats: &UpstreamStats,
    report: &mut Report,
) -> Result<()> {
    // The loadgen and its upstreams on CPU 1, every proxy on CPU 0 (all threads, and the
    // threads started later inherit it).
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    if !matches!(pinned, Ok(status) if status.success()) {
        bail!("`taskset -a -p -c 1` failed: the comparison needs taskset (util-linux) and 2 CPUs");
    }
    // The device certificate: RSA-2048, generated once by tlsbridge and shown by every proxy.
    let certs = dir.join("device");
    std::fs::create_dir_all(&certs)?;
    let config = certs.join("certs.toml");
    let q = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "state_dir = {}\n[device_tls]\ncert = {}\nkey = {}\nkey_type = \"rsa2048\"\n",
            q(&certs.join("state")),
            q(&certs.join("tlsbridge.crt")),
            q(&certs.join("tlsbridge.key"))
        ),
    )?;
    let out = Command::new(proxy_bin)
        .args(["certs", "init", "--config"])
        .arg(&config)
        .output()
        .context("tlsbridge certs init")?;
    if !out.status.success() {
        bail!(
            "tlsbridge certs init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let files = Files {
        dir,
        cert: certs.join("tlsbridge.crt"),
        key: certs.join("tlsbridge.key"),
        upstream_ca,
        offer_tls13: args.contenders_offer_tls13,
    };
    let mut kinds = vec![(
        Kind::Tlsbridge("rsa2048"),
        "tlsbridge (RSA-2048)".to_string(),
        "tlsbridge-rsa",
    )];
    for (kind, program, arg, tag) in [
        (Kind::Nginx, "nginx", "-v", "nginx"),
        (Kind::Haproxy, "haproxy", "-v", "haproxy"),
        (Kind::Stunnel, "stunnel", "-version", "stunnel"),
    ] {
        if !args.contenders.iter().any(|c| c == tag) {
            continue;
        }
        match which(program) {
            Some(path) if kind != Kind::Nginx || nginx_stream_module() => {
                let version = program_version(&path, arg);
                let name = match kind {
                    Kind::Nginx => format!("nginx {version} (stream)"),
                    Kind::Haproxy => format!("HAProxy {version}"),
                    _ => format!("stunnel {version}"),
                };
                kinds.push((kind, name, tag));
            }
            _ => report.notes.push(format!(
                "{program}: not installed (or no stream module), skipped"
            )),
        }
    }
    if args.contenders.iter().any(|c| c == "tlsbridge-ecdsa") {
        kinds.push((
            Kind::Tlsbridge("ecdsa-p256"),
            "tlsbridge (ECDSA P-256, `device_tls.key_type = \"ecdsa-p256\"`)".to_string(),
            "tlsbridge-ecdsa",
        ));
    }
    for (kind, name, tag) in kinds {
        match measure(kind, name.clone(), args, proxy_bin, &files, up, stats, tag).await {
            Ok(row) => {
                report.errors += row.errors;
                report.compare.push(row);
            }
            Err(err) => {
                report.errors += 1;
                report.notes.push(format!("{name}: {err:#}"));
            }
        }
    }
    Ok(())
}

fn nginx_stream_module() -> bool {
    Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").is_file()
}

pub(crate) fn render(md: &mut String, rows: &[CompareRow], args: &Args) {
    let _ = writeln!(md, "\n### Side by side (each proxy pinned to CPU 0)\n");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        md,
        "TLS 1.0 devices (no session reuse) -> proxy on CPU 0 -> verified TLS 1.2 to a rustls \
         echo/sink/source upstream; devices and upstreams share CPU 1. tlsbridge logs at info \
         (the downgrade log) in JSON with `max_connections_per_ip = 0`. CPU and RSS are the \
         proxy's whole process tree from /proc. CPU per handshake counts the whole connection \
         (handshake, a 32-byte echo, close). Load average at the end: {}. Throughput and \
         handshakes/s move with other load on the machine; CPU per handshake and RSS much less. \
         {offer}\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        offer = match args.contenders_offer_tls13 {
            true => "The other proxies offer TLS 1.2 and 1.3 upstream, as tlsbridge does.",
            false =>
                "The other proxies offer TLS 1.2 only upstream (tlsbridge offers 1.2 and \
                      1.3, so it also computes a TLS 1.3 key share; `--contenders-offer-tls13` \
                      makes them do the same).",
        }
    );
    let _ = writeln!(
        md,
        "| proxy | CPU ms per device handshake | MiB/s relayed, {BULK_CONNS} connections (up / down) | \
         KiB RSS per idle relayed connection ({} open) | RSS before → with {} open → {} s after they close (MiB) |",
        args.compare_idle, args.burst, args.burst_settle
    );
    let _ = writeln!(md, "|---|--:|--:|--:|--:|");
    let mib = |kib: u64| format!("{:.0}", kib as f64 / 1024.0);
    for r in rows {
        let burst = match &r.burst {
            Some(b) => format!(
                "{} → {} → {}{}",
                mib(r.rss_before_kib),
                mib(b.peak_kib),
                mib(b.after_kib),
                if b.open < args.burst {
                    format!(" ({} open)", b.open)
                } else {
                    String::new()
                }
            ),
            None => "—".to_string(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} / {} | {} | {} |",
            r.name,
            r.handshake_cpu_ms.map_or("-".into(), |v| format!("{v:.2}")),
            r.up_mib_s.map_or("-".into(), |v| format!("{v:.0}")),
            r.down_mib_s.map_or("-".into(), |v| format!("{v:.0}")),
            r.idle_kib_per_conn
                .map_or("-".into(), |v| format!("{v:.1}")),
            burst
        );
    }
    let _ = writeln!(
        md,
        "\n| proxy | device TLS | handshakes measured | handshakes/s (noisy) | upstream resumed | upstream legs ended without close_notify | errors |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {}/{} | {} | {}{} |",
            r.name,
            r.device,
            r.handshakes,
            r.handshake_rate,
            r.upstream_resumed,
            r.upstream_full + r.upstream_resumed,
            r.bare_fins,
            r.errors,
            r.first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    for r in rows {
        if let Some(note) = &r.note {
            let _ = writeln!(md, "\n- {note}");
        }
    }
}

pub(crate) fn to_json(rows: &[CompareRow]) -> Value {
    rows.iter()
        .map(|r| {
            json!({
                "proxy": r.name,
                "device_tls": r.device,
                "cpu_ms_per_handshake": r.handshake_cpu_ms,
                "handshakes": r.handshakes,
                "handshakes_per_s": r.handshake_rate,
                "upstream_full": r.upstream_full,
                "upstream_resumed": r.upstream_resumed,
                "mib_s_up": r.up_mib_s,
                "mib_s_down": r.down_mib_s,
                "idle_open": r.idle_open,
                "idle_kib_per_connection": r.idle_kib_per_conn,
                "rss_before_kib": r.rss_before_kib,
                "burst_open": r.burst.as_ref().map(|b| b.open),
                "burst_peak_kib": r.burst.as_ref().map(|b| b.peak_kib),
                "burst_after_kib": r.burst.as_ref().map(|b| b.after_kib),
                "upstream_bare_fins": r.bare_fins,
                "errors": r.errors,
                "first_error": r.first_error,
            })
        })
        .collect::<Vec<_>>()
        .into()
}
