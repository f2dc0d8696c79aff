//! A scripted upstream (rustls, TLS 1.2+) whose every end is chosen by the test: a clean close,
//! a bare FIN, a reset or a stall; tlsbridge in-process with a chosen idle timeout; and a
//! capture of the audit events, so a test can read its session's outcome.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;

use crate::support::ca::{Leaf, Pki};
use crate::support::proxy::{Proxy, Route, Settings};

/// What the upstream's script reports back.
pub type Report = String;

/// The script run on each accepted connection once TLS is up.
pub type Script =
    Arc<dyn Fn(TlsStream<TcpStream>) -> Pin<Box<dyn Future<Output = Report> + Send>> + Send + Sync>;

/// How the scripted upstream starts its TLS.
#[derive(Clone, Debug)]
pub enum Start {
    Tls,
    /// IMAP STARTTLS with this pre-TLS greeting.
    ImapStarttls(String),
}

/// A running scripted upstream.
pub struct Scripted {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    reports: mpsc::UnboundedReceiver<Report>,
    task: JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    pub async fn start(leaf: &Leaf, start: Start, script: Script) -> Result<Scripted> {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("versions")?
        .with_no_client_auth()
        .with_single_cert(leaf.chain.clone(), leaf.key())
        .context("certificate")?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let (tx, reports) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let (acceptor, script, tx, start) =
                    (acceptor.clone(), script.clone(), tx.clone(), start.clone());
                tokio::spawn(async move {
                    if let Start::ImapStarttls(greeting) = &start {
                        if let Err(err) = imap_pre_tls(&mut tcp, greeting).await {
                            let _ = tx.send(format!("pre-TLS dialog failed: {err:#}"));
                            return;
                        }
                    }
                    match acceptor.accept(tcp).await {
                        Ok(tls) => {
                            let _ = tx.send(script(tls).await);
                        }
                        Err(err) => {
                            let _ = tx.send(format!("TLS failed: {err}"));
                        }
                    }
                });
            }
        });
        Ok(Scripted {
            addr,
            accepted,
            reports,
            task,
        })
    }

    pub fn host_port(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub async fn next_report(&mut self) -> Result<Report> {
        tokio::time::timeout(Duration::from_secs(20), self.reports.recv())
            .await
            .map_err(|_| anyhow!("no upstream report within 20s"))?
            .ok_or_else(|| anyhow!("the scripted upstream stopped"))
    }
}

/// The server side of IMAP up to STARTTLS, byte-exact.
async fn imap_pre_tls(tcp: &mut TcpStream, greeting: &str) -> Result<()> {
    tcp.write_all(greeting.as_bytes()).await?;
    let mut seen = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = tcp.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "closed before STARTTLS");
        seen.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&seen).to_string();
        if text.contains("t1 CAPABILITY\r\n") && !text.contains("t1 done") {
            tcp.write_all(b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\nt1 OK done\r\n")
                .await?;
            seen.extend_from_slice(b"t1 done");
        }
        if text.contains("t2 STARTTLS\r\n") {
            tcp.write_all(b"t2 OK Begin TLS\r\n").await?;
            return Ok(());
        }
    }
}

/// Ends a TLS stream with a FIN and no close_notify, after flushing what was written.
pub async fn bare_fin(tls: &mut TlsStream<TcpStream>) {
    let _ = tls.flush().await;
    let _ = tls.get_mut().0.shutdown().await;
}

/// Ends a TLS stream with a reset after flushing what was written.
pub fn reset(tls: TlsStream<TcpStream>) {
    let (tcp, _) = tls.into_inner();
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

/// Reads until the peer ends; returns the bytes and how it ended (`clean`, `unexpected_eof`,
/// `reset` or the error).
pub async fn read_to_end(tls: &mut TlsStream<TcpStream>) -> (Vec<u8>, String) {
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), tls.read(&mut chunk)).await {
            Err(_) => return (got, "stalled".to_string()),
            Ok(Ok(0)) => return (got, "clean".to_string()),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                return (got, "unexpected_eof".to_string())
            }
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                return (got, "reset".to_string())
            }
            Ok(Err(err)) => return (got, format!("error: {err}")),
        }
    }
}

/// Audit events `name` (`session_closed`, `legacy_client`) of route `route` so far.
pub fn audit(name: &str, route: &str) -> Vec<HashMap<String, String>> {
    crate::support::capture::audit(name, route)
}

/// Waits for `count` `session_closed` events of `route`.
pub async fn closed(route: &str, count: usize) -> Result<Vec<HashMap<String, String>>> {
    for _ in 0..1000 {
        let got = audit("session_closed", route);
        if got.len() >= count {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(anyhow!(
        "{count} session_closed for {route} not seen within 20s"
    ))
}

/// tlsbridge in-process with `routes`, and `limits.idle_timeout` when given.
pub async fn bridge(pki: &Pki, routes: &[Route], idle_timeout: Option<&str>) -> Result<Proxy> {
    crate::support::init_logging();
    let mut settings = Settings::routes_only(pki, routes.to_vec());
    settings.idle_timeout = idle_timeout.map(str::to_string);
    Proxy::start_with(&settings).await
}
