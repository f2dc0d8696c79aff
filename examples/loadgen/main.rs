//! Load generator and benchmark for tlsbridge, all on 127.0.0.1: connection set-up rate and
//! latency (directly against the upstream and through the proxy), the SMTP STARTTLS overlap of
//! the two legs, throughput both ways, and memory per idle relayed connection.
//!
//! The loadgen starts its own upstreams in this process (rustls pinned to TLS 1.2, a throwaway
//! ECDSA P-256 CA from rcgen: echo, sink, source and a minimal SMTP server with STARTTLS), writes
//! a configuration into a tempdir and runs the release binary `tlsbridge run` as a child process.
//! The devices are OpenSSL clients pinned to TLS 1.0 (ECDHE-RSA-AES128-SHA, security level 0)
//! or TLS 1.2. Every scenario is bounded in count and time; the proxy is killed on every path
//! out (a guard with `Drop`, Ctrl-C and SIGTERM included). Results go to stdout as Markdown,
//! progress to stderr.
//!
//! `--scenarios compare` (the default of scripts/bench.sh) runs one load against tlsbridge and,
//! when installed, nginx (stream), HAProxy and stunnel, each pinned to CPU 0: see compare.rs.
//!
//! ```text
//! cargo build --release --bin tlsbridge --example loadgen
//! cargo run --release --example loadgen -- --help
//! scripts/bench.sh       # builds, raises `ulimit -n`, pins, runs the comparison, prints Markdown
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_openssl::SslStream;
use tokio_rustls::TlsAcceptor;

mod compare;

/// Any single wait on a peer (connect, handshake, one reply, a close).
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an upstream echo waits for the next byte: idle connections stay open that long.
const IDLE_READ_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the proxy may take to print its `listening` lines (it may generate RSA keys first).
const PROXY_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Clock ticks per second in /proc/PID/stat: USER_HZ, 100 on every mainstream Linux ABI.
const USER_HZ: f64 = 100.0;
/// The small round trip after each handshake (32 bytes).
const ECHO_PAYLOAD: &[u8] = b"tlsbridge loadgen echo payload\r\n";
/// Bulk transfers write and read this much at once: one TLS record.
const CHUNK: usize = 16 * 1024;
/// Connections used to warm up a fresh proxy before measuring (upstream session cache, threads).
const WARM_UP: usize = 8;

/// The proxy's routes and the upstream service behind each.
const ROUTE_ECHO: &str = "echo";
const ROUTE_SINK: &str = "sink";
const ROUTE_SOURCE: &str = "source";
const ROUTE_SMTP: &str = "smtp";
const ROUTE_SMTP_SLOW: &str = "smtp-slow";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadgen",
    about = "Benchmark tlsbridge on 127.0.0.1: handshakes/s and set-up latency, SMTP leg overlap, \
             throughput, memory per idle connection. Prints Markdown to stdout."
)]
struct Args {
    /// The tlsbridge binary to run as the proxy [default: `tlsbridge` in the directory above this
    /// example's, i.e. target/release/tlsbridge].
    #[arg(long, value_name = "PATH")]
    proxy_bin: Option<PathBuf>,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "compare")]
    scenarios: Vec<Scenario>,
    /// Other proxies to compare against when installed, and `tlsbridge-ecdsa` (tlsbridge with an
    /// ECDSA certificate), comma-separated (compare scenario; `none`: tlsbridge alone).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "nginx,haproxy,stunnel,tlsbridge-ecdsa",
        value_name = "NAME,.."
    )]
    contenders: Vec<String>,
    /// Let nginx, HAProxy and stunnel offer TLS 1.3 as well as 1.2 upstream, as tlsbridge does
    /// (compare scenario). Without it they offer TLS 1.2 only and send no TLS 1.3 key share.
    #[arg(long)]
    contenders_offer_tls13: bool,
    /// Idle relayed connections for the memory-per-connection figure (compare scenario).
    #[arg(long, default_value_t = 2000, value_name = "N")]
    compare_idle: usize,
    /// Connections open at once in the burst (compare scenario; 0 skips it).
    #[arg(long, default_value_t = 8000, value_name = "N")]
    burst: usize,
    /// Prefix for the proxy's command line, split at spaces (scripts/callgrind.sh passes
    /// `valgrind --tool=callgrind ...`).
    #[arg(long, value_name = "CMD")]
    proxy_wrapper: Option<String>,
    /// Echo sessions, one at a time, after one warm-up session (count scenario).
    #[arg(long, default_value_t = 100, value_name = "N")]
    count_handshakes: usize,
    /// MiB relayed over one extra connection after the sessions (count scenario).
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    count_mib: u64,
    /// Relayed connections held open together for 2 s at the end (count scenario), for a heap
    /// profile of idle connections (`valgrind --tool=massif`).
    #[arg(long, default_value_t = 0, value_name = "N")]
    count_idle: usize,
    /// Seconds to wait after those idle connections close, before SIGTERM (count scenario): a
    /// heap profile then shows what outlives a burst.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    count_settle: u64,
    /// Direction of those MiB: up (device to upstream) or down.
    #[arg(long, default_value = "down", value_name = "up|down")]
    count_direction: String,
    /// Seconds after the burst closes before RSS is read again.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    burst_settle: u64,
    /// Seconds each loaded handshake scenario runs (and the cap of each one-at-a-time run).
    #[arg(long, default_value_t = 8.0, value_name = "SECS")]
    duration: f64,
    /// Connections in flight at once in the loaded handshake scenarios.
    #[arg(long, default_value_t = 32, value_name = "N")]
    concurrency: usize,
    /// Connections, one at a time, for the unloaded set-up latency (concurrency 1).
    #[arg(long, default_value_t = 500, value_name = "N")]
    serial: usize,
    /// Upper bound on connections per loaded handshake scenario.
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    max_connections: usize,
    /// Device think time before EHLO and upstream banner delay for the SMTP overlap check.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    smtp_delay_ms: u64,
    /// Connections, one at a time, per SMTP overlap variant.
    #[arg(long, default_value_t = 20, value_name = "N")]
    smtp_count: usize,
    /// Bytes per throughput scenario (split evenly across its connections).
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    bulk_mib: u64,
    /// Time cap per throughput scenario.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    bulk_secs: f64,
    /// Parallel connections of the throughput scenarios, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,8",
        value_name = "N,.."
    )]
    bulk_conns: Vec<usize>,
    /// Device TLS of the throughput and idle scenarios.
    #[arg(long, value_enum, default_value = "tls10")]
    device: DeviceTls,
    /// Idle relayed connections to hold open, cumulative steps, comma-separated (capped by
    /// `ulimit -n`: each connection takes two descriptors here and two in the proxy).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,4000",
        value_name = "N,.."
    )]
    idle: Vec<usize>,
    /// Host name the proxy's routes use for the upstream: `localhost` (resolved by the proxy for
    /// every connection, like a real upstream name) or a loopback address.
    #[arg(long, default_value = "localhost")]
    upstream_host: String,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Give up (and kill the proxy) after this many seconds in all.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    max_secs: u64,
    /// Keep the tempdir (proxy configuration, certificates, log) and print its path.
    #[arg(long)]
    keep: bool,
    /// The command line to print in the report (scripts/bench.sh passes its own).
    #[arg(long, hide = true)]
    command_line: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Handshakes/s and set-up latency: direct, TLS 1.0 and TLS 1.2 through the tcp route, SMTP.
    Handshake,
    /// SMTP STARTTLS on both legs, with and without device think time and upstream delay.
    Smtp,
    /// One and several connections streaming each way.
    Throughput,
    /// Memory per idle relayed connection (on a fresh proxy process).
    Idle,
    /// tlsbridge beside nginx, HAProxy and stunnel: CPU per handshake, throughput, idle memory,
    /// RSS after a burst.
    Compare,
    /// A fixed amount of work for an instruction count (scripts/callgrind.sh): one warm-up
    /// session, `--count-handshakes` sessions, `--count-mib` over one connection, then SIGTERM.
    Count,
}

/// The device's TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceTls {
    /// TLS 1.0, ECDHE-RSA-AES128-SHA, security level 0: an old printer.
    Tls10,
    /// TLS 1.2, ECDHE-RSA-AES128-GCM-SHA256.
    Tls12,
    /// TLS 1.2, ECDHE-ECDSA-AES128-GCM-SHA256: for the direct baseline against the upstream.
    Tls12Ecdsa,
    /// TLS 1.0, ECDHE-ECDSA-AES128-SHA: an old device with an ECDSA-capable stack.
    Tls10Ecdsa,
}

impl DeviceTls {
    fn label(self) -> &'static str {
        match self {
            DeviceTls::Tls10 => "TLS 1.0 ECDHE-RSA-AES128-SHA",
            DeviceTls::Tls12 => "TLS 1.2 ECDHE-RSA-AES128-GCM-SHA256",
            DeviceTls::Tls12Ecdsa => "TLS 1.2 ECDHE-ECDSA-AES128-GCM-SHA256",
            DeviceTls::Tls10Ecdsa => "TLS 1.0 ECDHE-ECDSA-AES128-SHA",
        }
    }

    fn version(self) -> SslVersion {
        match self {
            DeviceTls::Tls10 | DeviceTls::Tls10Ecdsa => SslVersion::TLS1,
            DeviceTls::Tls12 | DeviceTls::Tls12Ecdsa => SslVersion::TLS1_2,
        }
    }

    fn ciphers(self) -> &'static str {
        match self {
            DeviceTls::Tls10 => "ECDHE-RSA-AES128-SHA:@SECLEVEL=0",
            DeviceTls::Tls12 => "ECDHE-RSA-AES128-GCM-SHA256:@SECLEVEL=0",
            DeviceTls::Tls12Ecdsa => "ECDHE-ECDSA-AES128-GCM-SHA256",
            DeviceTls::Tls10Ecdsa => "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0",
        }
    }

    /// An OpenSSL client pinned to this version and suite. Like many devices it does not verify
    /// the server (that would only add client CPU on the shared cores); no session resumption.
    fn connector(self) -> Result<SslConnector> {
        let mut builder = SslConnector::builder(SslMethod::tls_client()).context("SslConnector")?;
        builder
            .set_min_proto_version(Some(self.version()))
            .context("device min version")?;
        builder
            .set_max_proto_version(Some(self.version()))
            .context("device max version")?;
        builder
            .set_cipher_list(self.ciphers())
            .with_context(|| format!("device cipher list {}", self.ciphers()))?;
        builder.set_verify(SslVerifyMode::NONE);
        Ok(builder.build())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let limit = Duration::from_secs(args.max_secs);
    // Leaving this select drops `run`'s future and with it the proxy guard, which kills the child.
    let result = tokio::select! {
        result = tokio::time::timeout(limit, run(args)) => {
            result.unwrap_or_else(|_| Err(anyhow!("gave up after --max-secs {}", limit.as_secs())))
        }
        signal = interrupted() => Err(anyhow!("interrupted by {signal}")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("loadgen: some connections failed; see the Errors columns and notes");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("loadgen: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Everything measured, for the Markdown and JSON output.
#[derive(Default)]
struct Report {
    /// `tlsbridge --version`, first lines joined.
    proxy_version: String,
    handshakes: Vec<LoadRow>,
    handshake_peak_rss_kib: Option<u64>,
    smtp: Vec<SmtpRow>,
    bulk: Vec<BulkRow>,
    idle: Vec<IdleRow>,
    idle_after_close_kib: Option<u64>,
    idle_after_close_fds: Option<usize>,
    proxy_threads: Option<u64>,
    compare: Vec<compare::CompareRow>,
    notes: Vec<String>,
    errors: usize,
}

/// Runs the selected scenarios; `Ok(false)` when some connections failed.
async fn run(args: Args) -> Result<bool> {
    validate(&args)?;
    let proxy_bin = proxy_binary(&args)?;
    let upstream_host = loopback_host(&args.upstream_host)?;
    let mut report = Report {
        proxy_version: proxy_version(&proxy_bin),
        ..Report::default()
    };
    let idle_steps = capped_idle_steps(&args.idle, &mut report.notes)?;

    let dir = tempfile::Builder::new()
        .prefix("tlsbridge-bench-")
        .tempdir()
        .context("tempdir for the proxy")?;
    let pki = Pki::new().context("test CA for the upstreams")?;
    let ca_path = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).context("write the upstream CA")?;

    let stats = Arc::new(UpstreamStats::default());
    let acceptor = TlsAcceptor::from(pki.server_config()?);
    let slow = Duration::from_millis(args.smtp_delay_ms);
    let mut upstreams = Vec::new();
    for (route, service) in [
        (ROUTE_ECHO, Service::Echo),
        (ROUTE_SINK, Service::Sink),
        (ROUTE_SOURCE, Service::Source),
        (ROUTE_SMTP, Service::Smtp(Duration::ZERO)),
        (ROUTE_SMTP_SLOW, Service::Smtp(slow)),
    ] {
        let addr = start_upstream(service, acceptor.clone(), stats.clone()).await?;
        upstreams.push((route, service, addr));
    }
    let counting = args.scenarios.contains(&Scenario::Count);
    let settings = ProxySettings {
        // Counting instructions: the default level, so the downgrade log is part of the count.
        log_level: if counting { "info" } else { "warn" },
        key_type: "rsa2048",
        max_connections: idle_steps.last().copied().unwrap_or(0) + args.concurrency + 1024,
    };
    let config_path = dir.path().join("tlsbridge.toml");
    std::fs::write(
        &config_path,
        proxy_config(dir.path(), &ca_path, &upstream_host, &upstreams, &settings),
    )
    .context("write the proxy configuration")?;
    // The direct baseline gets an upstream of its own: its full handshakes would otherwise
    // push the proxy's session out of the shared server session cache.
    let direct_acceptor = TlsAcceptor::from(pki.server_config()?);
    let direct_echo = start_upstream(Service::Echo, direct_acceptor, stats.clone()).await?;
    let routes: Vec<&str> = upstreams.iter().map(|(r, _, _)| *r).collect();
    let log_path = dir.path().join("proxy.log");

    let wants = |s| args.scenarios.contains(&s);
    if wants(Scenario::Handshake) || wants(Scenario::Smtp) || wants(Scenario::Throughput) {
        progress("starting the proxy");
        let proxy = ProxyProcess::start(&proxy_bin, &config_path, &log_path, &routes).await?;
        warm_up(&proxy).await?;
        if wants(Scenario::Handshake) {
            handshake_scenarios(&args, &proxy, direct_echo, &stats, &mut report).await?;
            report.handshake_peak_rss_kib = proc_status(proxy.pid(), "VmHWM");
        }
        if wants(Scenario::Smtp) {
            smtp_scenarios(&args, &proxy, &stats, &mut report).await?;
        }
        if wants(Scenario::Throughput) {
            bulk_scenarios(&args, &proxy, &mut report).await?;
        }
        report.proxy_threads = proc_status(proxy.pid(), "Threads");
        proxy.finish(&mut report.notes);
    }
    if wants(Scenario::Idle) && !idle_steps.is_empty() {
        progress("starting a fresh proxy for the idle-memory scenario");
        let proxy = ProxyProcess::start(&proxy_bin, &config_path, &log_path, &routes).await?;
        idle_scenario(&args, &proxy, &idle_steps, &mut report).await?;
        proxy.finish(&mut report.notes);
    }
    if wants(Scenario::Count) {
        count_scenario(&args, &proxy_bin, &config_path, &log_path, &routes).await?;
        return Ok(true);
    }
    if wants(Scenario::Compare) {
        let addr = |route| {
            upstreams
                .iter()
                .find(|(r, _, _)| *r == route)
                .map(|(_, _, a)| *a)
                .ok_or_else(|| anyhow!("no upstream for {route}"))
        };
        let up = compare::Upstreams {
            echo: addr(ROUTE_ECHO)?,
            sink: addr(ROUTE_SINK)?,
            source: addr(ROUTE_SOURCE)?,
        };
        let fds_needed = 2 * args.burst + 512;
        let limit = open_files_limit().unwrap_or(1024);
        if fds_needed > limit {
            bail!(
                "--burst {} needs about {fds_needed} open files here, the limit is {limit} \
                 (scripts/bench.sh raises it; or lower --burst)",
                args.burst
            );
        }
        compare::run_compare(
            &args,
            &proxy_bin,
            dir.path(),
            &ca_path,
            &up,
            &stats,
            &mut report,
        )
        .await?;
    }

    let (full, resumed) = stats.handshakes();
    report.notes.push(format!(
        "Upstream TLS handshakes seen by the fake upstreams: {full} full, {resumed} resumed \
         (the proxy's rustls client resumes TLS 1.2 sessions; the direct OpenSSL client never does)."
    ));
    if let Some(err) = stats.first_error() {
        report.notes.push(format!(
            "Fake upstream errors: {} (first: {err})",
            stats.errors.load(Ordering::Relaxed)
        ));
    }
    let markdown = render(&args, &report);
    println!("{markdown}");
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&to_json(&args, &report))?;
        std::fs::write(path, json).with_context(|| format!("write {}", path.display()))?;
    }
    if args.keep {
        let kept = dir.keep();
        eprintln!("loadgen: kept {}", kept.display());
    }
    Ok(report.errors == 0)
}

fn validate(args: &Args) -> Result<()> {
    if !(args.duration > 0.0 && args.bulk_secs > 0.0) {
        bail!("--duration and --bulk-secs must be positive");
    }
    if args.concurrency == 0 || args.serial == 0 || args.smtp_count == 0 {
        bail!("--concurrency, --serial and --smtp-count must be at least 1");
    }
    if args.bulk_conns.contains(&0) {
        bail!("--bulk-conns must be at least 1");
    }
    Ok(())
}

fn progress(message: &str) {
    eprintln!("loadgen: {message}");
}

/// The proxy binary: `--proxy-bin`, else `tlsbridge` next to the directory holding this example
/// (`target/release/examples/loadgen` -> `target/release/tlsbridge`).
fn proxy_binary(args: &Args) -> Result<PathBuf> {
    let path = match &args.proxy_bin {
        Some(path) => path.clone(),
        None => {
            let exe = std::env::current_exe().context("path of the loadgen")?;
            exe.parent()
                .and_then(Path::parent)
                .map(|dir| dir.join("tlsbridge"))
                .ok_or_else(|| anyhow!("cannot derive the proxy path from {}", exe.display()))?
        }
    };
    if !path.is_file() {
        bail!(
            "no proxy binary at {} (build it with `cargo build --release --bin tlsbridge`, or \
             pass --proxy-bin)",
            path.display()
        );
    }
    Ok(path)
}

/// `tlsbridge --version` on one line.
fn proxy_version(bin: &Path) -> String {
    match Command::new(bin).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        _ => "unknown (tlsbridge --version failed)".to_string(),
    }
}

/// Accepts `localhost` or a loopback address, and only when it resolves to loopback alone.
fn loopback_host(host: &str) -> Result<String> {
    let addrs: Vec<SocketAddr> = (host, 9)
        .to_socket_addrs()
        .with_context(|| format!("--upstream-host {host}: cannot resolve"))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!("--upstream-host {host}: must resolve to loopback addresses only, got {addrs:?}");
    }
    Ok(host.to_string())
}

/// The idle steps, capped so both processes stay under `ulimit -n` (2 descriptors per
/// connection each, plus headroom).
fn capped_idle_steps(steps: &[usize], notes: &mut Vec<String>) -> Result<Vec<usize>> {
    let limit = open_files_limit().unwrap_or(1024);
    let max = limit.saturating_sub(256) / 2;
    let mut out: Vec<usize> = Vec::new();
    for &step in steps {
        let step = step.min(max);
        let larger = match out.last() {
            Some(&last) => step > last,
            None => true,
        };
        if step > 0 && larger {
            out.push(step);
        }
    }
    if steps.iter().any(|&s| s > max) {
        notes.push(format!(
            "Idle connections capped at {max} by the open-files limit ({limit}); raise it with \
             `ulimit -n` (scripts/bench.sh raises it to the hard limit)."
        ));
    }
    Ok(out)
}

fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    match soft {
        "unlimited" => Some(1 << 20),
        n => n.parse().ok(),
    }
}

// ---------------------------------------------------------------------------------------------
// The test CA and the upstream's TLS.

/// A throwaway CA (ECDSA P-256: rcgen's ring backend cannot generate RSA keys) and a leaf for
/// `localhost` and 127.0.0.1.
struct Pki {
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Pki {
    fn new() -> Result<Pki> {
        let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        ca.distinguished_name
            .push(DnType::CommonName, "tlsbridge loadgen CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().context("CA key")?)
            .context("self-sign the CA")?;
        let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
            .context("leaf params")?;
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("leaf key")?;
        let cert = leaf.signed_by(&key, &issuer).context("sign the leaf")?;
        Ok(Pki {
            ca_pem: issuer.pem(),
            chain: vec![cert.der().clone(), issuer.der().clone()],
            key_der: key.serialize_der(),
        })
    }

    /// rustls pinned to TLS 1.2 (the ring provider), with its default session cache so the
    /// proxy can resume.
    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .context("upstream TLS versions")?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .context("upstream certificate")?;
        Ok(Arc::new(config))
    }
}

// ---------------------------------------------------------------------------------------------
// The fake upstreams.

#[derive(Debug, Clone, Copy)]
enum Service {
    /// Echoes each chunk; close_notify after the peer's.
    Echo,
    /// Reads to the peer's close_notify, then answers the byte count (8 bytes, big-endian).
    Sink,
    /// Reads a request (u64 bytes, u32 milliseconds, big-endian), sends that many bytes or for
    /// that long, then close_notify.
    Source,
    /// SMTP: banner after the delay, EHLO offering STARTTLS, STARTTLS, then inside TLS `250` to
    /// everything and `221` to QUIT.
    Smtp(Duration),
}

#[derive(Default)]
struct UpstreamStats {
    full: AtomicU64,
    resumed: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl UpstreamStats {
    fn handshakes(&self) -> (u64, u64) {
        (
            self.full.load(Ordering::Relaxed),
            self.resumed.load(Ordering::Relaxed),
        )
    }

    fn error(&self, err: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| format!("{err:#}"));
    }

    fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Binds 127.0.0.1:0 and serves `service` until the runtime ends.
async fn start_upstream(
    service: Service,
    acceptor: TlsAcceptor,
    stats: Arc<UpstreamStats>,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind a fake upstream")?;
    let addr = listener.local_addr().context("fake upstream address")?;
    tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, stats) = (acceptor.clone(), stats.clone());
            tokio::spawn(async move {
                if let Err(err) = serve(tcp, service, &acceptor, &stats).await {
                    stats.error(&err);
                }
            });
        }
    });
    Ok(addr)
}

async fn serve(
    tcp: TcpStream,
    service: Service,
    acceptor: &TlsAcceptor,
    stats: &UpstreamStats,
) -> Result<()> {
    let tcp = match service {
        Service::Smtp(delay) => smtp_plaintext(tcp, delay).await?,
        _ => tcp,
    };
    let mut tls = within(IO_TIMEOUT, "upstream TLS handshake", acceptor.accept(tcp)).await?;
    match tls.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => &stats.resumed,
        _ => &stats.full,
    }
    .fetch_add(1, Ordering::Relaxed);
    match service {
        Service::Echo => echo(&mut tls).await,
        Service::Sink => sink(&mut tls).await,
        Service::Source => source(&mut tls).await,
        Service::Smtp(_) => smtp_in_tls(&mut tls).await,
    }
}

/// Upstream connections whose proxy side ended with a bare FIN (no close_notify). nginx does
/// that, so the fake upstreams take it as the end of the data and count it here.
static BARE_FINS: AtomicU64 = AtomicU64::new(0);

/// A read where a bare FIN counts as the end (and in `BARE_FINS`).
async fn read_end<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut [u8],
    limit: Duration,
    what: &str,
) -> Result<usize> {
    match tokio::time::timeout(limit, io.read(buf)).await {
        Err(_) => bail!("{what}: timed out after {limit:?}"),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            BARE_FINS.fetch_add(1, Ordering::Relaxed);
            Ok(0)
        }
        Ok(Err(err)) => Err(err).context(what.to_string()),
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_end(io, &mut buf, IDLE_READ_TIMEOUT, "echo read").await?;
        if n == 0 {
            break;
        }
        io.write_all(&buf[..n]).await.context("echo write")?;
        io.flush().await.context("echo flush")?;
    }
    within(IO_TIMEOUT, "echo close_notify", io.shutdown()).await
}

async fn sink<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = read_end(io, &mut buf, IO_TIMEOUT, "sink read").await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    io.write_all(&total.to_be_bytes())
        .await
        .context("sink count")?;
    io.flush().await.context("sink flush")?;
    within(IO_TIMEOUT, "sink close_notify", io.shutdown()).await
}

async fn source<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Result<()> {
    let mut request = [0u8; 12];
    within(IO_TIMEOUT, "source request", io.read_exact(&mut request)).await?;
    let (bytes, millis) = request.split_at(8);
    let quota = u64::from_be_bytes(bytes.try_into()?);
    let cap = Duration::from_millis(u32::from_be_bytes(millis.try_into()?).into());
    let buf = random_chunk();
    let (start, mut sent) = (Instant::now(), 0u64);
    while sent < quota && start.elapsed() < cap {
        let n = (quota - sent).min(CHUNK as u64) as usize;
        within(IO_TIMEOUT, "source write", io.write_all(&buf[..n])).await?;
        sent += n as u64;
    }
    within(IO_TIMEOUT, "source flush", io.flush()).await?;
    within(IO_TIMEOUT, "source close_notify", io.shutdown()).await?;
    let mut rest = [0u8; 512];
    match read_end(io, &mut rest, IO_TIMEOUT, "source: the device's close").await? {
        0 => Ok(()),
        n => bail!("source: {n} unexpected bytes after the request"),
    }
}

/// The pre-TLS SMTP dialog; returns the connection once STARTTLS was answered.
async fn smtp_plaintext(mut tcp: TcpStream, delay: Duration) -> Result<TcpStream> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    tcp.write_all(b"220 upstream.loadgen ESMTP\r\n")
        .await
        .context("smtp banner")?;
    let mut lines = LineReader::default();
    for _ in 0..8 {
        let line = lines.read_line(&mut tcp).await?;
        match verb(&line).as_str() {
            "EHLO" => {
                tcp.write_all(b"250-upstream.loadgen\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
                    .await?
            }
            "STARTTLS" => {
                if !lines.buf.is_empty() {
                    bail!("smtp upstream: bytes pipelined after STARTTLS");
                }
                tcp.write_all(b"220 2.0.0 ready for TLS\r\n").await?;
                return Ok(tcp);
            }
            other => bail!("smtp upstream: unexpected {other:?} before STARTTLS"),
        }
    }
    bail!("smtp upstream: no STARTTLS")
}

async fn smtp_in_tls<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Result<()> {
    let mut lines = LineReader::default();
    loop {
        let line = match lines.read_line(io).await {
            Ok(line) => line,
            // The device closed between commands: a clean end.
            Err(_) if lines.eof && lines.buf.is_empty() => return Ok(()),
            Err(err) => return Err(err),
        };
        if verb(&line) == "QUIT" {
            io.write_all(b"221 2.0.0 bye\r\n").await?;
            io.flush().await?;
            within(IO_TIMEOUT, "smtp close_notify", io.shutdown()).await?;
            return read_to_close(io, "smtp: the device's close").await;
        }
        io.write_all(b"250 2.0.0 OK\r\n").await?;
        io.flush().await?;
    }
}

fn verb(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

fn random_chunk() -> Vec<u8> {
    use rand::Rng;
    let mut buf = vec![0u8; CHUNK];
    rand::rng().fill(&mut buf[..]);
    buf
}

/// Lines for the plaintext dialogs, with what was read past the last line kept in `buf`.
#[derive(Default)]
struct LineReader {
    buf: Vec<u8>,
    eof: bool,
}

impl LineReader {
    async fn read_line<S: AsyncRead + Unpin>(&mut self, io: &mut S) -> Result<Vec<u8>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(self.buf.drain(..=end).collect());
            }
            if self.buf.len() > 4096 {
                bail!("line longer than 4096 bytes");
            }
            let mut chunk = [0u8; 1024];
            let n = within(IO_TIMEOUT, "read a line", io.read(&mut chunk)).await?;
            if n == 0 {
                self.eof = true;
                bail!("connection closed before a full line");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads an SMTP reply (possibly multi-line) and checks its code.
    async fn expect_reply<S: AsyncRead + Unpin>(&mut self, io: &mut S, code: &str) -> Result<()> {
        loop {
            let line = self.read_line(io).await?;
            let text = String::from_utf8_lossy(&line);
            if !text.starts_with(code) {
                bail!("expected {code}, got {:?}", text.trim_end());
            }
            if text.as_bytes().get(3) != Some(&b'-') {
                return Ok(());
            }
        }
    }
}

/// Reads until the peer's clean close; any byte or error in between is a failure.
async fn read_to_close<S: AsyncRead + Unpin>(io: &mut S, what: &str) -> Result<()> {
    let mut rest = [0u8; 512];
    let n = within(IO_TIMEOUT, what, io.read(&mut rest)).await?;
    if n != 0 {
        bail!("{what}: {n} unexpected bytes");
    }
    Ok(())
}

/// A named timeout around an I/O future.
async fn within<T, E>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow!("{what}: timed out after {limit:?}"))?
        .with_context(|| what.to_string())
}

// ---------------------------------------------------------------------------------------------
// The proxy as a child process.

/// What differs between the proxy configurations of the scenarios.
struct ProxySettings {
    /// `warn` for the detailed scenarios; `info` (the default: the downgrade log on) to compare.
    log_level: &'static str,
    /// `device_tls.key_type` of the generated certificate.
    key_type: &'static str,
    max_connections: usize,
}

/// The proxy's TOML: every route on 127.0.0.1:0, admin off, JSON log, limits raised.
fn proxy_config(
    dir: &Path,
    ca: &Path,
    host: &str,
    upstreams: &[(&str, Service, SocketAddr)],
    settings: &ProxySettings,
) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"));
    let p = |p: &Path| q(&p.display().to_string());
    let mut toml = String::new();
    let _ = writeln!(toml, "state_dir = {}", p(&dir.join("state")));
    let _ = writeln!(
        toml,
        "\n[log]\nlevel = \"{}\"\nformat = \"json\"",
        settings.log_level
    );
    let _ = writeln!(toml, "\n[admin]\nlisten = \"\"");
    let _ = writeln!(toml, "\n[device_tls]");
    let _ = writeln!(toml, "cert = {}", p(&dir.join("certs/tlsbridge.crt")));
    let _ = writeln!(toml, "key = {}", p(&dir.join("certs/tlsbridge.key")));
    let _ = writeln!(toml, "names = [\"localhost\"]");
    let _ = writeln!(toml, "min_version = \"TLSv1\"");
    let _ = writeln!(toml, "ciphers = \"DEFAULT:@SECLEVEL=0\"");
    let _ = writeln!(toml, "handshake_timeout = \"15s\"");
    let _ = writeln!(toml, "key_type = \"{}\"", settings.key_type);
    let _ = writeln!(toml, "\n[upstream_tls]\nextra_roots = [{}]", p(ca));
    let _ = writeln!(toml, "connect_timeout = \"15s\"");
    let _ = writeln!(toml, "\n[limits]");
    let _ = writeln!(toml, "max_connections = {}", settings.max_connections);
    let _ = writeln!(toml, "max_connections_per_ip = 0");
    // Every device of the load comes from 127.0.0.1.
    let _ = writeln!(toml, "connect_rate_per_ip = 0");
    let _ = writeln!(toml, "idle_timeout = \"10m\"\ndrain_timeout = \"1s\"");
    for (name, service, addr) in upstreams {
        let (protocol, device_tls, upstream_tls) = match service {
            Service::Smtp(_) => ("smtp", "starttls", "starttls"),
            _ => ("tcp", "tls", "tls"),
        };
        let _ = writeln!(toml, "\n[[route]]\nname = {}", q(name));
        let _ = writeln!(toml, "listen = \"127.0.0.1:0\"");
        let _ = writeln!(toml, "protocol = \"{protocol}\"");
        let _ = writeln!(toml, "device_tls = \"{device_tls}\"");
        let _ = writeln!(toml, "upstream = {}", q(&format!("{host}:{}", addr.port())));
        let _ = writeln!(toml, "upstream_tls = \"{upstream_tls}\"");
    }
    toml
}

/// What the proxy printed: warnings and errors counted, the first few kept, all of it in a file.
#[derive(Default)]
struct ProxyLog {
    warnings: AtomicUsize,
    first: Mutex<Vec<String>>,
    tail: Mutex<VecDeque<String>>,
}

impl ProxyLog {
    fn line(&self, line: &str, file: &Mutex<std::fs::File>, warning: bool) {
        {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(file, "{line}");
        }
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.push_back(line.to_string());
        if tail.len() > 20 {
            tail.pop_front();
        }
        if warning {
            self.warnings.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
            if first.len() < 3 {
                first.push(line.to_string());
            }
        }
    }

    fn tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// `tlsbridge run` as a child; dropping it kills the process.
struct ProxyProcess {
    child: Child,
    routes: HashMap<String, SocketAddr>,
    log: Arc<ProxyLog>,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fixed workload for an instruction count, then a clean stop (SIGTERM) so a wrapper like
/// callgrind writes its results.
async fn count_scenario(
    args: &Args,
    bin: &Path,
    config: &Path,
    log_path: &Path,
    routes: &[&str],
) -> Result<()> {
    let wrapper: Vec<String> = args
        .proxy_wrapper
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    // The RSA keys first, outside any wrapper: key generation is not the work being counted.
    let init = Command::new(bin)
        .args(["certs", "init", "--config"])
        .arg(config)
        .output()
        .context("tlsbridge certs init")?;
    if !init.status.success() {
        bail!(
            "tlsbridge certs init: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    let launch = Launch {
        pin_cpu: None,
        rust_log: None,
        wrapper,
    };
    let mut proxy = ProxyProcess::start_with(bin, config, log_path, routes, launch).await?;
    let connector = DeviceTls::Tls10.connector()?;
    let echo = proxy.addr(ROUTE_ECHO)?;
    for _ in 0..=args.count_handshakes {
        echo_session(connector.clone(), echo)
            .await
            .context("count: echo session")?;
    }
    if args.count_mib > 0 {
        let bytes = args.count_mib * 1024 * 1024;
        let cap = Duration::from_secs(300);
        let moved = match args.count_direction.as_str() {
            "up" => bulk_up(connector, proxy.addr(ROUTE_SINK)?, bytes, cap).await?,
            _ => bulk_down(connector, proxy.addr(ROUTE_SOURCE)?, bytes, cap).await?,
        };
        if moved != bytes {
            bail!("count: relayed {moved} bytes instead of {bytes}");
        }
    }
    if args.count_idle > 0 {
        let mut open = Vec::new();
        let connector = DeviceTls::Tls10.connector()?;
        let (errors, first) = open_many(&connector, echo, args.count_idle, 8, &mut open).await;
        if let Some(err) = first {
            bail!("count: {errors} idle connections failed, first: {err}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        close_many(open, 8).await;
        tokio::time::sleep(Duration::from_secs(args.count_settle)).await;
    }
    let pid = proxy.pid().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status()?;
    if !status.success() {
        bail!("kill -TERM {pid} failed");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = proxy.child.try_wait()? {
            progress(&format!(
                "count: {} sessions + {} MiB {}; the proxy exited with {status}",
                args.count_handshakes + 1,
                args.count_mib,
                args.count_direction
            ));
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the proxy did not exit within 120 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How the proxy process is started.
struct Launch {
    /// Programs in front of the proxy (a profiler).
    wrapper: Vec<String>,
    /// `taskset -c CPU` in front of the proxy.
    pin_cpu: Option<&'static str>,
    /// `RUST_LOG` for the proxy; `None` leaves `log.level` in charge.
    rust_log: Option<&'static str>,
}

impl ProxyProcess {
    /// Starts the proxy and waits for the `listening` line of every route. The log level is
    /// warn, except for the `listening` lines (`RUST_LOG=tlsbridge::server=info,warn`).
    async fn start(
        bin: &Path,
        config: &Path,
        log_path: &Path,
        routes: &[&str],
    ) -> Result<ProxyProcess> {
        let launch = Launch {
            pin_cpu: None,
            rust_log: Some("tlsbridge::server=info,warn"),
            wrapper: Vec::new(),
        };
        Self::start_with(bin, config, log_path, routes, launch).await
    }

    async fn start_with(
        bin: &Path,
        config: &Path,
        log_path: &Path,
        routes: &[&str],
        launch: Launch,
    ) -> Result<ProxyProcess> {
        let mut line: Vec<std::ffi::OsString> = Vec::new();
        if let Some(cpu) = launch.pin_cpu {
            line.extend(["taskset".into(), "-c".into(), cpu.into()]);
        }
        line.extend(launch.wrapper.iter().map(Into::into));
        line.push(bin.into());
        let mut command = Command::new(&line[0]);
        command.args(&line[1..]);
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(["--log-format", "json"]);
        match launch.rust_log {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut proxy = ProxyProcess {
            child,
            routes: HashMap::new(),
            log: Arc::default(),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let file = Arc::new(Mutex::new(file));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, SocketAddr)>();
        if let Some(stdout) = proxy.child.stdout.take() {
            let (log, file) = (proxy.log.clone(), file.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    let level = event["level"].as_str().unwrap_or("");
                    log.line(&line, &file, matches!(level, "WARN" | "ERROR"));
                    if event["message"] == "listening" {
                        let route = event["route"].as_str().unwrap_or("").to_string();
                        if let Some(addr) = event["listen"].as_str().and_then(|a| a.parse().ok()) {
                            let _ = tx.send((route, addr));
                        }
                    }
                }
            });
        }
        if let Some(stderr) = proxy.child.stderr.take() {
            let (log, file) = (proxy.log.clone(), file.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.line(&line, &file, true);
                }
            });
        }
        let deadline = tokio::time::Instant::now() + PROXY_START_TIMEOUT;
        while routes.iter().any(|r| !proxy.routes.contains_key(*r)) {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bail!(
                    "the proxy exited with {status} before listening:\n{}",
                    proxy.log.tail()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the proxy did not print `listening` for every route within {:?}:\n{}",
                    PROXY_START_TIMEOUT,
                    proxy.log.tail()
                );
            }
            let wait = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
            if let Ok(Some((route, addr))) = wait {
                if !addr.ip().is_loopback() {
                    bail!("route {route} listens on {addr}, not on loopback");
                }
                proxy.routes.insert(route, addr);
            }
        }
        progress(&format!(
            "proxy pid {} listening on {} routes",
            proxy.pid(),
            proxy.routes.len()
        ));
        Ok(proxy)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn addr(&self, route: &str) -> Result<SocketAddr> {
        self.routes
            .get(route)
            .copied()
            .ok_or_else(|| anyhow!("the proxy has no route {route}"))
    }

    /// Kills the proxy and notes what it logged at warn or above.
    fn finish(self, notes: &mut Vec<String>) {
        let warnings = self.log.warnings.load(Ordering::Relaxed);
        if warnings > 0 {
            let first = self.log.first.lock().unwrap_or_else(|p| p.into_inner());
            notes.push(format!(
                "Proxy pid {} logged {warnings} warning/error lines; first: `{}`",
                self.pid(),
                first.first().map(String::as_str).unwrap_or("")
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readings.

/// A field of /proc/PID/status, the number before "kB" (or the count for `Threads`).
fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open file descriptors of a process (its sockets, here).
fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// CPU seconds (user + system) of a process, `self` for this one.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line (utime, stime) are 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// CPU and peak RSS of the proxy (and this process's CPU) over one scenario.
struct Meter {
    start: Instant,
    pid: Option<u32>,
    proxy_cpu: Option<f64>,
    self_cpu: Option<f64>,
    stop: Arc<AtomicBool>,
    sampler: Option<tokio::task::JoinHandle<u64>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    wall: f64,
    proxy_cpu: Option<f64>,
    self_cpu: Option<f64>,
    peak_rss_kib: Option<u64>,
}

impl Usage {
    fn proxy_pct(&self) -> Option<f64> {
        self.proxy_cpu.map(|c| 100.0 * c / self.wall.max(1e-9))
    }
    fn self_pct(&self) -> Option<f64> {
        self.self_cpu.map(|c| 100.0 * c / self.wall.max(1e-9))
    }
}

impl Meter {
    fn start(pid: Option<u32>) -> Meter {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = pid.map(|pid| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut peak = 0;
                while !stop.load(Ordering::Relaxed) {
                    peak = peak.max(proc_status(pid, "VmRSS").unwrap_or(0));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                peak.max(proc_status(pid, "VmRSS").unwrap_or(0))
            })
        });
        Meter {
            start: Instant::now(),
            pid,
            proxy_cpu: pid.and_then(|p| cpu_seconds(&p.to_string())),
            self_cpu: cpu_seconds("self"),
            stop,
            sampler,
        }
    }

    async fn stop(self) -> Usage {
        let wall = self.start.elapsed().as_secs_f64();
        let proxy_now = self.pid.and_then(|p| cpu_seconds(&p.to_string()));
        let self_now = cpu_seconds("self");
        self.stop.store(true, Ordering::Relaxed);
        let peak = match self.sampler {
            Some(sampler) => sampler.await.ok().filter(|&p| p > 0),
            None => None,
        };
        let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        Usage {
            wall,
            proxy_cpu: delta(self.proxy_cpu, proxy_now),
            self_cpu: delta(self.self_cpu, self_now),
            peak_rss_kib: peak,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Device sessions.

async fn device_tls(connector: &SslConnector, tcp: TcpStream) -> Result<SslStream<TcpStream>> {
    let mut config = connector
        .configure()
        .context("device connect configuration")?;
    config.set_verify_hostname(false);
    let ssl = config.into_ssl("localhost").context("device Ssl")?;
    let mut stream = SslStream::new(ssl, tcp).context("device SslStream")?;
    within(
        IO_TIMEOUT,
        "device TLS handshake",
        Pin::new(&mut stream).connect(),
    )
    .await?;
    Ok(stream)
}

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let tcp = within(IO_TIMEOUT, "TCP connect", TcpStream::connect(addr)).await?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    Ok(tcp)
}

/// Connect, handshake and one 32-byte echo round trip: returns the stream and the set-up time.
async fn open_echo(
    connector: &SslConnector,
    addr: SocketAddr,
) -> Result<(SslStream<TcpStream>, Duration)> {
    let start = Instant::now();
    let tcp = connect(addr).await?;
    let mut tls = device_tls(connector, tcp).await?;
    tls.write_all(ECHO_PAYLOAD).await.context("echo write")?;
    let mut back = [0u8; ECHO_PAYLOAD.len()];
    within(IO_TIMEOUT, "echo reply", tls.read_exact(&mut back)).await?;
    if back != ECHO_PAYLOAD {
        bail!("the echo came back different");
    }
    Ok((tls, start.elapsed()))
}

/// close_notify, then wait for the peer's.
async fn close_tls(mut tls: SslStream<TcpStream>) -> Result<()> {
    within(IO_TIMEOUT, "device close_notify", tls.shutdown()).await?;
    read_to_close(&mut tls, "device: the upstream's close").await
}

async fn echo_session(connector: SslConnector, addr: SocketAddr) -> Result<Duration> {
    let (tls, setup) = open_echo(&connector, addr).await?;
    close_tls(tls).await?;
    Ok(setup)
}

/// SMTP to the proxy: banner, (think time), EHLO, STARTTLS, TLS, QUIT -> 221, close. The set-up
/// time runs from connect to the 221.
async fn smtp_session(
    connector: SslConnector,
    addr: SocketAddr,
    think: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    let mut tcp = connect(addr).await?;
    let mut lines = LineReader::default();
    lines
        .expect_reply(&mut tcp, "220")
        .await
        .context("banner")?;
    if !think.is_zero() {
        tokio::time::sleep(think).await;
    }
    tcp.write_all(b"EHLO loadgen.local\r\n").await?;
    lines.expect_reply(&mut tcp, "250").await.context("EHLO")?;
    tcp.write_all(b"STARTTLS\r\n").await?;
    lines
        .expect_reply(&mut tcp, "220")
        .await
        .context("STARTTLS")?;
    if !lines.buf.is_empty() {
        bail!("the proxy sent bytes after its STARTTLS reply");
    }
    let mut tls = device_tls(&connector, tcp).await?;
    tls.write_all(b"QUIT\r\n").await?;
    let mut lines = LineReader::default();
    lines
        .expect_reply(&mut tls, "221")
        .await
        .context("QUIT inside TLS")?;
    let setup = start.elapsed();
    close_tls(tls).await?;
    Ok(setup)
}

// ---------------------------------------------------------------------------------------------
// Load runs.

struct Sample {
    setups: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

/// `concurrency` workers run `session` back to back until `count` sessions started or
/// `duration` passed.
async fn run_load<F, Fut>(
    concurrency: usize,
    count: usize,
    duration: Duration,
    session: F,
) -> Sample
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Duration>> + Send + 'static,
{
    let issued = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + duration;
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.min(count) {
        let (session, issued) = (session.clone(), issued.clone());
        workers.spawn(async move {
            let mut sample = Sample {
                setups: Vec::new(),
                errors: 0,
                first_error: None,
            };
            while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < count {
                match session().await {
                    Ok(setup) => sample.setups.push(setup),
                    Err(err) => {
                        sample.errors += 1;
                        sample.first_error.get_or_insert(format!("{err:#}"));
                    }
                }
            }
            sample
        });
    }
    let mut all = Sample {
        setups: Vec::new(),
        errors: 0,
        first_error: None,
    };
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(sample) => {
                all.setups.extend(sample.setups);
                all.errors += sample.errors;
                if all.first_error.is_none() {
                    all.first_error = sample.first_error;
                }
            }
            Err(err) => {
                all.errors += 1;
                all.first_error
                    .get_or_insert(format!("worker failed: {err}"));
            }
        }
    }
    all.setups.sort();
    all
}

/// Nearest-rank percentile in milliseconds.
fn percentile(sorted: &[Duration], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    Some(sorted[index].as_secs_f64() * 1000.0)
}

struct LoadRow {
    scenario: String,
    path: &'static str,
    device: &'static str,
    concurrency: usize,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    usage: Usage,
    upstream_full: u64,
    upstream_resumed: u64,
}

impl LoadRow {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.usage.wall.max(1e-9)
    }
    fn proxy_ms_per_conn(&self) -> Option<f64> {
        let cpu = self.usage.proxy_cpu?;
        (self.ok > 0).then(|| 1000.0 * cpu / self.ok as f64)
    }
}

/// What one handshake scenario connects to.
#[derive(Clone, Copy)]
enum Target {
    Direct(SocketAddr),
    Echo(SocketAddr),
    Smtp(SocketAddr, Duration),
}

#[allow(clippy::too_many_arguments)]
async fn measure_load(
    scenario: &str,
    path: &'static str,
    device: DeviceTls,
    target: Target,
    concurrency: usize,
    count: usize,
    duration: Duration,
    proxy_pid: Option<u32>,
    stats: &UpstreamStats,
) -> Result<LoadRow> {
    progress(&format!(
        "{scenario}: {} concurrency {concurrency}, up to {count} connections or {:.0?}",
        device.label(),
        duration
    ));
    let connector = device.connector()?;
    let (full0, resumed0) = stats.handshakes();
    let meter = Meter::start(proxy_pid);
    let sample = match target {
        Target::Direct(addr) | Target::Echo(addr) => {
            run_load(concurrency, count, duration, move || {
                echo_session(connector.clone(), addr)
            })
            .await
        }
        Target::Smtp(addr, think) => {
            run_load(concurrency, count, duration, move || {
                smtp_session(connector.clone(), addr, think)
            })
            .await
        }
    };
    let usage = meter.stop().await;
    let (full1, resumed1) = stats.handshakes();
    if let Some(err) = &sample.first_error {
        progress(&format!(
            "{scenario}: {} errors, first: {err}",
            sample.errors
        ));
    }
    Ok(LoadRow {
        scenario: scenario.to_string(),
        path,
        device: device.label(),
        concurrency,
        ok: sample.setups.len(),
        errors: sample.errors,
        first_error: sample.first_error,
        p50_ms: percentile(&sample.setups, 50.0),
        p99_ms: percentile(&sample.setups, 99.0),
        usage,
        upstream_full: full1 - full0,
        upstream_resumed: resumed1 - resumed0,
    })
}

/// A few sessions on each route so the proxy's lazy state (threads, the upstream session cache)
/// exists before anything is measured.
async fn warm_up(proxy: &ProxyProcess) -> Result<()> {
    let connector = DeviceTls::Tls10.connector()?;
    for _ in 0..WARM_UP {
        echo_session(connector.clone(), proxy.addr(ROUTE_ECHO)?)
            .await
            .context("warm-up on the echo route")?;
        smtp_session(connector.clone(), proxy.addr(ROUTE_SMTP)?, Duration::ZERO)
            .await
            .context("warm-up on the smtp route")?;
    }
    Ok(())
}

async fn handshake_scenarios(
    args: &Args,
    proxy: &ProxyProcess,
    direct: SocketAddr,
    stats: &UpstreamStats,
    report: &mut Report,
) -> Result<()> {
    let duration = Duration::from_secs_f64(args.duration);
    let pid = Some(proxy.pid());
    let cases = [
        (
            "direct to upstream",
            "direct",
            DeviceTls::Tls12Ecdsa,
            Target::Direct(direct),
        ),
        (
            "tcp route (tls -> tls)",
            "proxy",
            DeviceTls::Tls10,
            Target::Echo(proxy.addr(ROUTE_ECHO)?),
        ),
        (
            "tcp route (tls -> tls)",
            "proxy",
            DeviceTls::Tls12,
            Target::Echo(proxy.addr(ROUTE_ECHO)?),
        ),
        (
            "smtp route (starttls -> starttls)",
            "proxy",
            DeviceTls::Tls10,
            Target::Smtp(proxy.addr(ROUTE_SMTP)?, Duration::ZERO),
        ),
    ];
    for (concurrency, count) in [(1, args.serial), (args.concurrency, args.max_connections)] {
        for (scenario, path, device, target) in cases {
            let row = measure_load(
                scenario,
                path,
                device,
                target,
                concurrency,
                count,
                duration,
                if path == "proxy" { pid } else { None },
                stats,
            )
            .await?;
            report.errors += row.errors;
            report.handshakes.push(row);
        }
    }
    Ok(())
}

struct SmtpRow {
    think_ms: u64,
    delay_ms: u64,
    row: LoadRow,
}

async fn smtp_scenarios(
    args: &Args,
    proxy: &ProxyProcess,
    stats: &UpstreamStats,
    report: &mut Report,
) -> Result<()> {
    let d = args.smtp_delay_ms;
    let cap = Duration::from_secs_f64(args.duration.max(1.0) + 3.0 * d as f64 / 1000.0)
        .max(Duration::from_millis(d * 3 * args.smtp_count as u64));
    for (think_ms, delay_ms) in [(0, 0), (d, 0), (0, d), (d, d)] {
        let route = if delay_ms > 0 {
            ROUTE_SMTP_SLOW
        } else {
            ROUTE_SMTP
        };
        let target = Target::Smtp(proxy.addr(route)?, Duration::from_millis(think_ms));
        let row = measure_load(
            &format!("smtp overlap: think {think_ms} ms, upstream delay {delay_ms} ms"),
            "proxy",
            DeviceTls::Tls10,
            target,
            1,
            args.smtp_count,
            cap,
            Some(proxy.pid()),
            stats,
        )
        .await?;
        report.errors += row.errors;
        report.smtp.push(SmtpRow {
            think_ms,
            delay_ms,
            row,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Throughput.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Device -> upstream (the upstream sinks).
    Up,
    /// Upstream -> device (the upstream sources).
    Down,
}

struct BulkRow {
    direction: Direction,
    conns: usize,
    device: &'static str,
    bytes: u64,
    errors: usize,
    first_error: Option<String>,
    usage: Usage,
}

impl BulkRow {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.usage.wall.max(1e-9)
    }
}

/// Streams up to `quota` bytes for at most `cap` to the sink and checks its count.
async fn bulk_up(
    connector: SslConnector,
    addr: SocketAddr,
    quota: u64,
    cap: Duration,
) -> Result<u64> {
    let tcp = connect(addr).await?;
    let mut tls = device_tls(&connector, tcp).await?;
    let buf = random_chunk();
    let (start, mut sent) = (Instant::now(), 0u64);
    while sent < quota && start.elapsed() < cap {
        let n = (quota - sent).min(CHUNK as u64) as usize;
        within(IO_TIMEOUT, "bulk write", tls.write_all(&buf[..n])).await?;
        sent += n as u64;
    }
    within(IO_TIMEOUT, "bulk close_notify", tls.shutdown()).await?;
    let mut count = [0u8; 8];
    within(IO_TIMEOUT, "sink count", tls.read_exact(&mut count)).await?;
    let counted = u64::from_be_bytes(count);
    if counted != sent {
        bail!("sent {sent} bytes, the upstream counted {counted}");
    }
    read_to_close(&mut tls, "bulk: the upstream's close").await?;
    Ok(sent)
}

/// Asks the source for up to `quota` bytes for at most `cap` and reads them to the close.
async fn bulk_down(
    connector: SslConnector,
    addr: SocketAddr,
    quota: u64,
    cap: Duration,
) -> Result<u64> {
    let tcp = connect(addr).await?;
    let mut tls = device_tls(&connector, tcp).await?;
    let mut request = quota.to_be_bytes().to_vec();
    let millis = u32::try_from(cap.as_millis()).unwrap_or(u32::MAX);
    request.extend_from_slice(&millis.to_be_bytes());
    tls.write_all(&request).await.context("source request")?;
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = within(IO_TIMEOUT, "bulk read", tls.read(&mut buf)).await?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    within(IO_TIMEOUT, "bulk close_notify", tls.shutdown()).await?;
    Ok(received)
}

async fn bulk_scenarios(args: &Args, proxy: &ProxyProcess, report: &mut Report) -> Result<()> {
    let total = args.bulk_mib * 1024 * 1024;
    let cap = Duration::from_secs_f64(args.bulk_secs);
    for direction in [Direction::Up, Direction::Down] {
        for &conns in &args.bulk_conns {
            progress(&format!(
                "throughput {direction:?}: {conns} connection(s), {} MiB or {cap:.0?}",
                args.bulk_mib
            ));
            let connector = args.device.connector()?;
            let addr = proxy.addr(match direction {
                Direction::Up => ROUTE_SINK,
                Direction::Down => ROUTE_SOURCE,
            })?;
            let quota = total / conns as u64;
            let meter = Meter::start(Some(proxy.pid()));
            let mut set = JoinSet::new();
            for _ in 0..conns {
                let connector = connector.clone();
                let run = async move {
                    match direction {
                        Direction::Up => bulk_up(connector, addr, quota, cap).await,
                        Direction::Down => bulk_down(connector, addr, quota, cap).await,
                    }
                };
                set.spawn(tokio::time::timeout(cap + IO_TIMEOUT * 2, run));
            }
            let (mut bytes, mut errors, mut first_error) = (0u64, 0usize, None);
            while let Some(done) = set.join_next().await {
                match done {
                    Ok(Ok(Ok(n))) => bytes += n,
                    Ok(Ok(Err(err))) => {
                        errors += 1;
                        first_error.get_or_insert(format!("{err:#}"));
                    }
                    Ok(Err(_)) => {
                        errors += 1;
                        first_error.get_or_insert("timed out".to_string());
                    }
                    Err(err) => {
                        errors += 1;
                        first_error.get_or_insert(format!("task failed: {err}"));
                    }
                }
            }
            let usage = meter.stop().await;
            if let Some(err) = &first_error {
                progress(&format!("throughput: {errors} errors, first: {err}"));
            }
            report.errors += errors;
            report.bulk.push(BulkRow {
                direction,
                conns,
                device: args.device.label(),
                bytes,
                errors,
                first_error,
                usage,
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Memory per idle connection.

struct IdleRow {
    open: usize,
    errors: usize,
    first_error: Option<String>,
    baseline_kib: u64,
    rss_kib: u64,
    fds: Option<usize>,
    open_secs: f64,
}

impl IdleRow {
    fn kib_per_conn(&self) -> f64 {
        self.rss_kib.saturating_sub(self.baseline_kib) as f64 / self.open.max(1) as f64
    }
}

/// Opens `n` relayed echo connections (handshake + one round trip), `concurrency` at a time.
async fn open_many(
    connector: &SslConnector,
    addr: SocketAddr,
    n: usize,
    concurrency: usize,
    into: &mut Vec<SslStream<TcpStream>>,
) -> (usize, Option<String>) {
    let (mut errors, mut first_error) = (0, None);
    let mut set = JoinSet::new();
    let mut started = 0;
    while started < n || !set.is_empty() {
        while started < n && set.len() < concurrency {
            let connector = connector.clone();
            set.spawn(async move { open_echo(&connector, addr).await });
            started += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok((tls, _)))) => into.push(tls),
            Some(Ok(Err(err))) => {
                errors += 1;
                first_error.get_or_insert(format!("{err:#}"));
            }
            Some(Err(err)) => {
                errors += 1;
                first_error.get_or_insert(format!("task failed: {err}"));
            }
            None => break,
        }
    }
    (errors, first_error)
}

/// Closes every connection cleanly, `concurrency` at a time; returns the failures.
async fn close_many(streams: Vec<SslStream<TcpStream>>, concurrency: usize) -> usize {
    let mut errors = 0;
    let mut set = JoinSet::new();
    let mut streams = streams.into_iter();
    loop {
        while set.len() < concurrency {
            match streams.next() {
                Some(tls) => {
                    set.spawn(close_tls(tls));
                }
                None => break,
            }
        }
        match set.join_next().await {
            Some(Ok(Ok(()))) => {}
            Some(_) => errors += 1,
            None => return errors,
        }
    }
}

async fn idle_scenario(
    args: &Args,
    proxy: &ProxyProcess,
    steps: &[usize],
    report: &mut Report,
) -> Result<()> {
    let pid = proxy.pid();
    let addr = proxy.addr(ROUTE_ECHO)?;
    let connector = args.device.connector()?;
    // Warm up (threads, the upstream session cache, allocator arenas), then take the baseline.
    for _ in 0..WARM_UP * 2 {
        echo_session(connector.clone(), addr)
            .await
            .context("idle warm-up")?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = proc_status(pid, "VmRSS").ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))?;
    let mut open = Vec::new();
    let opening = Instant::now();
    for &step in steps {
        progress(&format!(
            "idle: opening connections up to {step} ({})",
            args.device.label()
        ));
        let (errors, first_error) = open_many(
            &connector,
            addr,
            step - open.len().min(step),
            args.concurrency,
            &mut open,
        )
        .await;
        if let Some(err) = &first_error {
            progress(&format!("idle: {errors} errors, first: {err}"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = proc_status(pid, "VmRSS").unwrap_or(0);
        report.errors += errors;
        report.idle.push(IdleRow {
            open: open.len(),
            errors,
            first_error,
            baseline_kib: baseline,
            rss_kib: rss,
            fds: fd_count(pid),
            open_secs: opening.elapsed().as_secs_f64(),
        });
    }
    progress(&format!("idle: closing {} connections", open.len()));
    let close_errors = close_many(open, args.concurrency * 2).await;
    if close_errors > 0 {
        report.errors += close_errors;
        report.notes.push(format!(
            "{close_errors} idle connections did not close cleanly (were they still relayed?)"
        ));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.idle_after_close_kib = proc_status(pid, "VmRSS");
    report.idle_after_close_fds = fd_count(pid);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Output.

fn machine() -> (usize, String, String) {
    // Counted from /proc/cpuinfo: the compare scenario pins the loadgen to one CPU.
    let nproc = std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| info.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    (nproc, cpu, kernel)
}

fn command_line(args: &Args) -> String {
    args.command_line.clone().unwrap_or_else(|| {
        let rest: Vec<String> = std::env::args().skip(1).collect();
        format!(
            "cargo run --release --example loadgen -- {}",
            rest.join(" ")
        )
        .trim_end()
        .to_string()
    })
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.1}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.0}%"))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// What the detailed scenarios measure and how.
fn detail_intro(md: &mut String) {
    let _ = writeln!(
        md,
        "- Everything on 127.0.0.1: loadgen devices (OpenSSL clients) -> `tlsbridge run` (child \
         process, log level warn) -> fake upstreams in the loadgen (rustls, TLS 1.2 only, \
         ECDSA P-256). The loadgen shares the CPUs with the proxy; \"Proxy CPU\" is the proxy's \
         user+system time over the wall time (100% = one core)."
    );
    let _ = writeln!(
        md,
        "- Set-up = TCP connect until the first reply inside TLS (a 32-byte echo; SMTP: from \
         connect through banner, EHLO, STARTTLS, handshake, to `221` for QUIT). Each connection \
         then closes cleanly (close_notify both ways)."
    );
}

fn render(args: &Args, r: &Report) -> String {
    let (nproc, cpu, kernel) = machine();
    let mut md = String::new();
    let _ = writeln!(md, "## tlsbridge benchmark\n");
    let _ = writeln!(
        md,
        "- Machine: {nproc} CPUs (nproc), {cpu}, Linux {kernel}, {}",
        openssl::version::version()
    );
    let _ = writeln!(md, "- Proxy: {}", r.proxy_version);
    let _ = writeln!(md, "- Command: `{}`", command_line(args));
    let detailed =
        !(r.handshakes.is_empty() && r.smtp.is_empty() && r.bulk.is_empty() && r.idle.is_empty());
    if detailed {
        detail_intro(&mut md);
    }

    if !r.handshakes.is_empty() {
        let _ = writeln!(md, "\n### Connection set-up (handshakes/s)\n");
        let _ = writeln!(
            md,
            "| Scenario | Device TLS | Concurrency | Connections | Errors | Conn/s | Set-up p50 (ms) | Set-up p99 (ms) | Proxy CPU | Proxy CPU ms/conn | Loadgen CPU | Upstream resumed |"
        );
        let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        for row in &r.handshakes {
            let resumed = match row.path {
                "proxy" => format!(
                    "{}/{}",
                    row.upstream_resumed,
                    row.upstream_full + row.upstream_resumed
                ),
                _ => "-".to_string(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
                row.scenario,
                row.device,
                row.concurrency,
                row.ok,
                row.errors,
                row.rate(),
                ms(row.p50_ms),
                ms(row.p99_ms),
                pct(row.usage.proxy_pct()),
                ms(row.proxy_ms_per_conn()),
                pct(row.usage.self_pct()),
                resumed
            );
        }
        let direct = r
            .handshakes
            .iter()
            .find(|row| row.path == "direct" && row.concurrency == 1)
            .and_then(|row| row.p50_ms);
        let mut added = Vec::new();
        for row in r
            .handshakes
            .iter()
            .filter(|row| row.path == "proxy" && row.concurrency == 1)
        {
            if let (Some(p), Some(d)) = (row.p50_ms, direct) {
                added.push(format!(
                    "{}, {}: {:+.1} ms",
                    row.scenario,
                    row.device,
                    p - d
                ));
            }
        }
        if !added.is_empty() {
            let _ = writeln!(
                md,
                "\nAdded set-up latency through the proxy at concurrency 1 (p50 minus the direct \
                 p50; the device leg is RSA-2048 where the direct one is ECDSA P-256): {}.",
                added.join("; ")
            );
        }
        if let Some(peak) = r.handshake_peak_rss_kib {
            let _ = writeln!(
                md,
                "Proxy peak RSS (VmHWM) after the handshake scenarios: {} MiB.",
                mib(peak)
            );
        }
    }

    if !r.smtp.is_empty() {
        let _ = writeln!(
            md,
            "\n### SMTP STARTTLS: the upstream leg runs while the device talks\n"
        );
        let _ = writeln!(
            md,
            "Device think time = pause before EHLO; upstream delay = the fake upstream waits \
             before its banner. Concurrency 1, TLS 1.0 device.\n"
        );
        let _ = writeln!(
            md,
            "| Device think (ms) | Upstream delay (ms) | Connections | Errors | Set-up p50 (ms) | Set-up p99 (ms) | If the legs ran one after the other (ms) |"
        );
        let _ = writeln!(md, "|--:|--:|--:|--:|--:|--:|--:|");
        let base = r.smtp.first().and_then(|s| s.row.p50_ms);
        for s in &r.smtp {
            let serial = base.map(|b| b + (s.think_ms + s.delay_ms) as f64);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                s.think_ms,
                s.delay_ms,
                s.row.ok,
                s.row.errors,
                ms(s.row.p50_ms),
                ms(s.row.p99_ms),
                ms(serial)
            );
        }
        if let (Some(base), Some(both)) = (base, r.smtp.last().and_then(|s| s.row.p50_ms)) {
            let d = args.smtp_delay_ms as f64;
            let hidden = (base + 2.0 * d - both) / d * 100.0;
            let _ = writeln!(
                md,
                "\nWith both delays the set-up took {both:.1} ms: {hidden:.0}% of the upstream \
                 delay was hidden behind the device's dialog (100% = fully parallel, 0% = serial)."
            );
        }
    }

    if !r.bulk.is_empty() {
        let _ = writeln!(
            md,
            "\n### Throughput (payload bytes, through the tcp route)\n"
        );
        let _ = writeln!(
            md,
            "| Direction | Connections | Device TLS | MiB moved | Seconds | MB/s | Errors | Proxy CPU | Loadgen CPU |"
        );
        let _ = writeln!(md, "|---|--:|---|--:|--:|--:|--:|--:|--:|");
        for b in &r.bulk {
            let direction = match b.direction {
                Direction::Up => "device -> upstream",
                Direction::Down => "upstream -> device",
            };
            let _ = writeln!(
                md,
                "| {direction} | {} | {} | {:.0} | {:.1} | {:.0} | {} | {} | {} |",
                b.conns,
                b.device,
                b.bytes as f64 / (1024.0 * 1024.0),
                b.usage.wall,
                b.mb_per_s(),
                b.errors,
                pct(b.usage.proxy_pct()),
                pct(b.usage.self_pct())
            );
        }
    }

    if !r.idle.is_empty() {
        let _ = writeln!(
            md,
            "\n### Memory per idle relayed connection (fresh proxy process)\n"
        );
        let _ = writeln!(
            md,
            "Each connection: {} handshake, one echo round trip, then idle (relay running). VmRSS \
             of the proxy from /proc/PID/status, 1 s after the last connection opened.\n",
            args.device.label()
        );
        let _ = writeln!(
            md,
            "| Idle connections | Errors | Proxy RSS before (MiB) | Proxy RSS with them open (MiB) | KiB per connection | Proxy fds | Open took (s) |"
        );
        let _ = writeln!(md, "|--:|--:|--:|--:|--:|--:|--:|");
        for i in &r.idle {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.1} | {} | {:.1} |",
                i.open,
                i.errors,
                mib(i.baseline_kib),
                mib(i.rss_kib),
                i.kib_per_conn(),
                i.fds.map_or("-".to_string(), |n| n.to_string()),
                i.open_secs
            );
        }
        if let Some(after) = r.idle_after_close_kib {
            let _ = writeln!(
                md,
                "\nProxy RSS 1 s after closing them all: {} MiB with {} fds open (freed memory \
                 the allocator keeps).",
                mib(after),
                r.idle_after_close_fds
                    .map_or("?".to_string(), |n| n.to_string())
            );
        }
    }

    if !r.compare.is_empty() {
        compare::render(&mut md, &r.compare, args);
    }

    let mut notes = r.notes.clone();
    if let Some(threads) = r.proxy_threads {
        notes.push(format!(
            "Proxy threads after the handshake and throughput scenarios: {threads} (tokio workers \
             plus blocking-pool threads, e.g. for name resolution)."
        ));
    }
    let errors = r
        .handshakes
        .iter()
        .chain(r.smtp.iter().map(|s| &s.row))
        .filter_map(|row| Some((row.scenario.as_str(), row.first_error.as_deref()?)))
        .chain(
            r.bulk
                .iter()
                .filter_map(|b| Some(("throughput", b.first_error.as_deref()?))),
        )
        .chain(
            r.idle
                .iter()
                .filter_map(|i| Some(("idle", i.first_error.as_deref()?))),
        );
    for (scenario, err) in errors {
        notes.push(format!("First error in {scenario}: {err}"));
    }
    if !notes.is_empty() {
        let _ = writeln!(md, "\nNotes:\n");
        for note in notes {
            let _ = writeln!(md, "- {note}");
        }
    }
    md
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "wall_s": u.wall,
        "proxy_cpu_s": u.proxy_cpu,
        "loadgen_cpu_s": u.self_cpu,
        "proxy_peak_rss_kib": u.peak_rss_kib,
    })
}

fn load_json(row: &LoadRow) -> Value {
    json!({
        "scenario": row.scenario,
        "path": row.path,
        "device_tls": row.device,
        "concurrency": row.concurrency,
        "connections": row.ok,
        "errors": row.errors,
        "first_error": row.first_error,
        "conn_per_s": row.rate(),
        "setup_p50_ms": row.p50_ms,
        "setup_p99_ms": row.p99_ms,
        "proxy_cpu_ms_per_conn": row.proxy_ms_per_conn(),
        "upstream_full": row.upstream_full,
        "upstream_resumed": row.upstream_resumed,
        "usage": usage_json(&row.usage),
    })
}

fn to_json(args: &Args, r: &Report) -> Value {
    let (nproc, cpu, kernel) = machine();
    json!({
        "machine": { "nproc": nproc, "cpu": cpu, "kernel": kernel, "openssl": openssl::version::version() },
        "command": command_line(args),
        "proxy_version": r.proxy_version,
        "handshakes": r.handshakes.iter().map(load_json).collect::<Vec<_>>(),
        "handshake_peak_rss_kib": r.handshake_peak_rss_kib,
        "smtp_overlap": r.smtp.iter().map(|s| json!({
            "device_think_ms": s.think_ms,
            "upstream_delay_ms": s.delay_ms,
            "result": load_json(&s.row),
        })).collect::<Vec<_>>(),
        "throughput": r.bulk.iter().map(|b| json!({
            "direction": format!("{:?}", b.direction).to_lowercase(),
            "connections": b.conns,
            "device_tls": b.device,
            "bytes": b.bytes,
            "mb_per_s": b.mb_per_s(),
            "errors": b.errors,
            "usage": usage_json(&b.usage),
        })).collect::<Vec<_>>(),
        "idle": r.idle.iter().map(|i| json!({
            "connections": i.open,
            "errors": i.errors,
            "rss_before_kib": i.baseline_kib,
            "rss_kib": i.rss_kib,
            "proxy_fds": i.fds,
            "kib_per_connection": i.kib_per_conn(),
        })).collect::<Vec<_>>(),
        "idle_rss_after_close_kib": r.idle_after_close_kib,
        "idle_fds_after_close": r.idle_after_close_fds,
        "proxy_threads": r.proxy_threads,
        "compare": compare::to_json(&r.compare),
        "notes": r.notes,
        "errors": r.errors,
    })
}
