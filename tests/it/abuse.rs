//! Abuse: what a hostile or broken peer can make the proxy do. Half-sent admin requests, a
//! forged SNI, connection storms from one address and floods of IPv6 addresses from one /64
//! must neither starve the proxy nor reach its log or inventory raw.
//!
//! The proxy runs in-process; the shared test subscriber keeps the text log in memory so a test
//! can search it.

use std::io::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::ca::Pki;
use crate::support::device::{connect, tls_connect, Legacy, Verify};
use crate::support::upstream::{EchoMode, FakeUpstream, Service, UpstreamTls};
use anyhow::{Context, Result};
use tlsbridge::context::Shared;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Generous for a debug build on two shared cores; only a guard against hanging.
const LIMIT: Duration = Duration::from_secs(30);

use crate::support::{init_logging, log_text};

/// A proxy running in-process from `toml`.
struct Running {
    _dir: tempfile::TempDir,
    shared: Arc<Shared>,
    route: SocketAddr,
    admin: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Running {
    /// One route named `r` with `route` (its keys after `name`), plus `extra` top-level TOML
    /// tables (before the route).
    async fn start(pki: &Pki, extra: &str, route: &str) -> Result<Running> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let q = |p: &std::path::Path| format!("{:?}", p.display().to_string());
        let toml = format!(
            "state_dir = {state}\n{extra}\n[device_tls]\ncert = {cert}\nkey = {key}\n\
             names = [\"localhost\"]\nhandshake_timeout = \"10s\"\n\n\
             [upstream_tls]\nextra_roots = [{ca}]\nconnect_timeout = \"5s\"\n\n\
             [[route]]\nname = \"r\"\n{route}",
            state = q(&d.join("state")),
            cert = q(&d.join("certs/tlsbridge.crt")),
            key = q(&d.join("certs/tlsbridge.key")),
            ca = q(&pki.ca_path),
        );
        let path = d.join("tlsbridge.toml");
        std::fs::write(&path, &toml)?;
        let config = tlsbridge::config::Config::load_from(
            Some(&path),
            std::iter::empty::<(String, String)>(),
        )
        .with_context(|| format!("load:\n{toml}"))?;
        let server = tlsbridge::server::Server::bind(config).await?;
        let route = server.local_addr("r").context("route address")?;
        let admin = server.admin_addr();
        let shared = server.shared();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Ok(Running {
            _dir: dir,
            shared,
            route,
            admin,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().context("already stopped")?;
        tokio::time::timeout(Duration::from_secs(40), task).await???;
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The fewest descriptors open over half a second: tests running beside this one in the same
/// process open and close sockets of their own, but a descriptor the proxy kept stays.
async fn settled_descriptors() -> usize {
    let mut fewest = open_descriptors();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fewest = fewest.min(open_descriptors());
    }
    fewest
}

async fn echo_upstream(pki: &Pki) -> FakeUpstream {
    FakeUpstream::start(
        Service::Echo(EchoMode::Streaming),
        UpstreamTls::Modern,
        &pki.localhost,
    )
    .await
    .expect("start the echo upstream")
}

/// Sends `ping` over `tcp` (plaintext route) and expects it back.
async fn ping(mut tcp: TcpStream) -> Result<()> {
    tcp.write_all(b"ping\n").await?;
    let mut back = [0u8; 5];
    tokio::time::timeout(LIMIT, tcp.read_exact(&mut back)).await??;
    anyhow::ensure!(&back == b"ping\n", "echo: {back:?}");
    Ok(())
}

/// Reads until EOF or an error (a reset): true when the peer closed within `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_admin_requests_are_closed_and_devices_are_still_served() {
    init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = echo_upstream(&pki).await;
    let proxy = Running::start(
        &pki,
        "[admin]\nlisten = \"127.0.0.1:0\"\n[limits]\nconnect_rate_per_ip = 0\n",
        &format!(
            "listen = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ndevice_tls = \"plain\"\n\
             upstream = {:?}\nupstream_tls = \"tls\"\n",
            upstream.host_port()
        ),
    )
    .await
    .expect("start the proxy");
    let admin = proxy.admin.expect("admin endpoint");
    let before = open_descriptors();

    // A complete request on a kept-alive connection: answered, then the idle connection is
    // closed like a half-sent one (the header-read timer runs while waiting for a request).
    let mut kept_alive = connect(admin).await.expect("connect to the admin endpoint");
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("a request");
    let mut head = [0u8; 12];
    kept_alive.read_exact(&mut head).await.expect("a response");
    assert_eq!(&head, b"HTTP/1.1 200");

    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut tcp = connect(admin).await.expect("connect to the admin endpoint");
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("half a request");
        stalled.push(tcp);
    }
    // The proxy keeps serving devices meanwhile.
    for _ in 0..3 {
        ping(connect(proxy.route).await.unwrap())
            .await
            .expect("a device is served while the admin endpoint is flooded");
    }
    // Every half-sent request is closed within the header-read timeout (plus slack).
    let limit = tlsbridge::admin::HEADER_READ_TIMEOUT + Duration::from_secs(5);
    let started = Instant::now();
    for tcp in std::iter::once(&mut kept_alive).chain(&mut stalled) {
        let left = limit.saturating_sub(started.elapsed());
        assert!(
            closed_within(tcp, left).await,
            "a half-sent admin request was still open after {limit:?}"
        );
    }
    // Only this side's 300 sockets are still open: the proxy gave its descriptors back.
    let during = settled_descriptors().await;
    assert!(
        during <= before + 301 + 8,
        "descriptors: {before} before, {during} with the 301 client sockets"
    );
    drop((stalled, kept_alive));
    let (status, _) = tokio::task::spawn_blocking(move || {
        tlsbridge::cli::admin_client::get(admin, "/healthz").unwrap()
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "the admin endpoint answers again");
    proxy.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_the_device_list_and_leaves_the_probes_open() {
    init_logging();
    let pki = Pki::new().expect("test PKI");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "  t0ken-for-tests\n").unwrap();
    let proxy = Running::start(
        &pki,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\n",
            token_file.display().to_string()
        ),
        "listen = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ndevice_tls = \"tls\"\n\
         upstream = \"localhost:1\"\nupstream_tls = \"tls\"\n",
    )
    .await
    .expect("start the proxy");
    let admin = proxy.admin.expect("admin endpoint");
    let endpoint = tlsbridge::cli::admin_client::Endpoint::parse(&format!("http://{admin}"))
        .expect("endpoint");
    let results = tokio::task::spawn_blocking(move || {
        let mut results = Vec::new();
        for path in [
            "/",
            "/metrics",
            "/clients",
            "/clients.csv",
            "/healthz",
            "/readyz",
        ] {
            for token in [None, Some("wrong"), Some("t0ken-for-tests")] {
                let (status, _) = endpoint.get(path, token).unwrap();
                results.push((path, token, status));
            }
        }
        results
    })
    .await
    .unwrap();
    for (path, token, status) in results {
        let open = matches!(path, "/healthz" | "/readyz");
        let expected = if open || token == Some("t0ken-for-tests") {
            200
        } else {
            401
        };
        assert_eq!(status, expected, "{path} with {token:?}");
    }
    proxy.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_sni_is_refused_and_nothing_raw_reaches_the_log_or_the_inventory() {
    init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = echo_upstream(&pki).await;
    let proxy = Running::start(
        &pki,
        "[admin]\nlisten = \"\"\n",
        &format!(
            "listen = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ndevice_tls = \"tls\"\n\
             upstream = \"sni:{}\"\nupstream_tls = \"tls\"\nsni_allow = [\"*.test\"]\n",
            upstream.port()
        ),
    )
    .await
    .expect("start the proxy");
    let forged = "x\nFORGED INFO tlsbridge::audit: session_closed outcome=ok\u{1b}[31m.test";
    let tcp = connect(proxy.route).await.unwrap();
    let peer = format!("peer={}", tcp.local_addr().unwrap());
    let result = tls_connect(tcp, Legacy::Tls10, &Verify::None, forged).await;
    assert!(result.is_err(), "the forged SNI must be refused");
    // The refusal is logged (the session's end), then nothing raw may be in the log.
    let deadline = Instant::now() + LIMIT;
    while !log_text().contains("sni_refused") {
        assert!(Instant::now() < deadline, "no sni_refused in the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Other tests log into the same buffer: look at this session's lines (and forged ones).
    let text = log_text();
    let ours = text
        .lines()
        .filter(|l| l.contains(&peer) || l.starts_with("FORGED"));
    for line in ours {
        assert!(
            !line.contains('\u{1b}'),
            "a raw escape reached the log: {line:?}"
        );
    }
    for line in text.lines() {
        assert!(
            !line.starts_with("FORGED"),
            "a forged line reached the log: {line:?}"
        );
    }
    let clients = proxy.shared.sinks.inventory.snapshot();
    let json = serde_json::to_string(&clients).unwrap();
    assert!(!json.contains("FORGED"), "{json}");
    proxy.stop().await.expect("stop");
}

/// A plain tcp route to `upstream` with `limits.connect_rate_per_ip = 2` and `extra` route keys.
async fn rate_limited_route(pki: &Pki, upstream: &FakeUpstream, extra: &str) -> Running {
    let route = format!(
        "listen = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ndevice_tls = \"plain\"\n\
         upstream = {:?}\nupstream_tls = \"tls\"\n{extra}",
        upstream.host_port()
    );
    let limits = "[admin]\nlisten = \"\"\n[limits]\nconnect_rate_per_ip = 2\n";
    Running::start(pki, limits, &route)
        .await
        .expect("start the proxy")
}

/// Connections refused as `rate_limited` so far, and the metric line that says so.
fn rate_limited(proxy: &Running) -> (usize, String) {
    let metrics = proxy.shared.sinks.metrics.render(None);
    let refused = metrics
        .lines()
        .find(|l| {
            l.starts_with("tlsbridge_refused_connections_total")
                && l.contains("reason=\"rate_limited\"")
        })
        .unwrap_or_else(|| panic!("no rate_limited series:\n{metrics}"));
    let count: f64 = refused.rsplit(' ').next().unwrap().parse().unwrap();
    (count as usize, refused.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_storm_from_one_address_is_rate_limited_and_counted() {
    init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = echo_upstream(&pki).await;
    let proxy = rate_limited_route(&pki, &upstream, "").await;
    let mut served = 0;
    for _ in 0..20 {
        let tcp = connect(proxy.route).await.unwrap();
        if ping(tcp).await.is_ok() {
            served += 1;
        }
    }
    // A burst of twice the rate, plus what refills while the loop runs.
    assert!((4..20).contains(&served), "{served} of 20 served");
    let (count, refused) = rate_limited(&proxy);
    assert_eq!(count, 20 - served, "{refused}");
    assert!(log_text().contains("rate_limited"));
    proxy.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_balancer_the_rate_limit_counts_the_address_in_the_proxy_header() {
    init_logging();
    let pki = Pki::new().expect("test PKI");
    let upstream = echo_upstream(&pki).await;
    let balancer = "proxy_protocol = true\nproxy_from = [\"127.0.0.0/8\"]\n";
    let proxy = rate_limited_route(&pki, &upstream, balancer).await;
    // Every connection comes from the balancer (127.0.0.1); the header names the device.
    let from = |device: &str| {
        let route = proxy.route;
        let header = format!("PROXY TCP4 {device} 127.0.0.1 5000 {}\r\n", route.port());
        async move {
            let mut tcp = connect(route).await?;
            tcp.write_all(header.as_bytes()).await?;
            ping(tcp).await
        }
    };
    let mut served = 0;
    for _ in 0..20 {
        if from("10.1.2.3").await.is_ok() {
            served += 1;
        }
    }
    assert!((4..20).contains(&served), "{served} of 20 served");
    from("10.9.9.9")
        .await
        .expect("another device behind the same balancer is not limited");
    let (count, refused) = rate_limited(&proxy);
    assert_eq!(count, 20 - served, "{refused}");
    proxy.stop().await.expect("stop");
}

/// IPv6 addresses added to `lo` for a test, removed when dropped.
struct LoopbackAddrs(Vec<Ipv6Addr>);

impl LoopbackAddrs {
    fn add(addrs: Vec<Ipv6Addr>) -> Result<LoopbackAddrs> {
        let added = LoopbackAddrs(addrs);
        added.batch("add")?;
        Ok(added)
    }

    fn batch(&self, verb: &str) -> Result<()> {
        let mut child = std::process::Command::new("ip")
            .args(["-6", "-force", "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("run ip")?;
        let mut stdin = child.stdin.take().context("ip stdin")?;
        for addr in &self.0 {
            let nodad = if verb == "add" { " nodad" } else { "" };
            writeln!(stdin, "addr {verb} {addr}/128 dev lo{nodad}")?;
        }
        drop(stdin);
        let status = child.wait()?;
        anyhow::ensure!(
            status.success() || verb == "del",
            "ip addr {verb}: {status}"
        );
        Ok(())
    }
}

impl Drop for LoopbackAddrs {
    fn drop(&mut self) {
        let _ = self.batch("del");
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_addresses_of_one_ipv6_64_leave_the_known_devices_in_the_inventory() {
    init_logging();
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root: adding addresses to lo needs it"
        );
        eprintln!("SKIP: adding IPv6 addresses to lo needs root");
        return;
    }
    // One /64 of our own, so parallel tests on this host cannot collide with it.
    let siblings: Vec<Ipv6Addr> = (1..=300u16)
        .map(|n| Ipv6Addr::new(0xfd00, 0, 0, 0xab5e, 0, 0, 0, n))
        .collect();
    let _added = LoopbackAddrs::add(siblings.clone()).expect("add the addresses to lo");
    let pki = Pki::new().expect("test PKI");
    let upstream = echo_upstream(&pki).await;
    let proxy = Running::start(
        &pki,
        "[admin]\nlisten = \"\"\n[limits]\nconnect_rate_per_ip = 0\nmax_inventory_clients = 20\n",
        &format!(
            "listen = \"[::]:0\"\nprotocol = \"tcp\"\ndevice_tls = \"plain\"\n\
             upstream = {:?}\nupstream_tls = \"tls\"\n",
            upstream.host_port()
        ),
    )
    .await
    .expect("start the proxy");
    let port = proxy.route.port();
    // The devices known before the flood.
    let known: [IpAddr; 2] = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    for ip in known {
        ping(connect(SocketAddr::new(ip, port)).await.unwrap())
            .await
            .expect("a known device");
    }
    for source in &siblings {
        let socket = TcpSocket::new_v6().unwrap();
        socket
            .bind(SocketAddr::new(IpAddr::V6(*source), 0))
            .unwrap();
        let tcp = tokio::time::timeout(LIMIT, socket.connect(SocketAddr::new(known[1], port)))
            .await
            .expect("connect in time")
            .expect("connect from a sibling address");
        ping(tcp).await.expect("a flood connection is relayed");
    }
    let clients = proxy.shared.sinks.inventory.snapshot();
    for ip in known {
        assert!(
            clients.iter().any(|c| c.ip == ip),
            "{ip} was flushed from the inventory: {:?}",
            clients.iter().map(|c| c.ip).collect::<Vec<_>>()
        );
    }
    let flood = clients
        .iter()
        .filter(|c| matches!(c.ip, IpAddr::V6(v6) if v6.segments()[3] == 0xab5e))
        .count();
    assert_eq!(flood, tlsbridge::inventory::MAX_CLIENTS_PER_PREFIX);
    proxy.stop().await.expect("stop");
}
