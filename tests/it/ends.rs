//! How sessions end, over real sockets: every byte the upstream sent reaches the device, and the
//! end is carried as it happened (clean, bare FIN, reset, idle timeout), in both directions; a
//! protocol goodbye counts only when it is one; the device never sees the upstream's pre-TLS
//! text.

use std::sync::Arc;
use std::time::Duration;

use crate::support::ca::Pki;
use crate::support::device::{connect, tls_connect, Legacy};
use crate::support::lines::{Close, Conn};
use crate::support::proxy::{Proxy, Route};
use crate::support::scripted::{
    audit, bare_fin, bridge, closed, read_to_end, reset, Script, Scripted, Start,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

const READ_LIMIT: Duration = Duration::from_secs(30);

fn script<F, Fut>(f: F) -> Script
where
    F: Fn(TlsStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    Arc::new(move |tls| Box::pin(f(tls)))
}

/// Reads from the upstream's side until `needle` has been seen.
async fn read_until(tls: &mut TlsStream<TcpStream>, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.windows(needle.len()).any(|w| w == needle) {
        match tls.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    got
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

async fn device(proxy: &Proxy, route: &str) -> Conn<tokio_openssl::SslStream<TcpStream>> {
    let tcp = connect(proxy.addr(route)).await.expect("connect");
    let tls = tls_connect(tcp, Legacy::Tls10, &proxy.verify(), "localhost")
        .await
        .expect("TLS 1.0 device handshake");
    Conn::new(tls, READ_LIMIT)
}

async fn setup(
    pki: &Pki,
    protocol: &str,
    start: Start,
    script: Script,
    idle_timeout: Option<&str>,
) -> (Scripted, Proxy) {
    let upstream_tls = match start {
        Start::Tls => "tls",
        Start::ImapStarttls(_) => "starttls",
    };
    let upstream = Scripted::start(&pki.localhost, start, script)
        .await
        .expect("scripted upstream");
    let proxy = bridge(
        pki,
        &[Route::new(
            protocol,
            protocol,
            "tls",
            &upstream.host_port(),
            upstream_tls,
        )],
        idle_timeout,
    )
    .await
    .expect("start tlsbridge");
    (upstream, proxy)
}

fn unique(protocol: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{protocol}{}", N.fetch_add(1, Ordering::SeqCst))
}

/// Like `setup`, with a route name unique in this binary so its audit events are its own.
async fn route(
    pki: &Pki,
    protocol: &str,
    start: Start,
    script: Script,
    idle_timeout: Option<&str>,
) -> (Scripted, Proxy, String) {
    let name = unique(protocol);
    let upstream_tls = match start {
        Start::Tls => "tls",
        Start::ImapStarttls(_) => "starttls",
    };
    let upstream = Scripted::start(&pki.localhost, start, script)
        .await
        .expect("scripted upstream");
    let proxy = bridge(
        pki,
        &[Route::new(
            &name,
            protocol,
            "tls",
            &upstream.host_port(),
            upstream_tls,
        )],
        idle_timeout,
    )
    .await
    .expect("start tlsbridge");
    (upstream, proxy, name)
}

async fn outcome(route: &str) -> String {
    let events = closed(route, 1).await.expect("session_closed");
    events[0].get("outcome").cloned().unwrap_or_default()
}

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_bare_fin_after_1mib_gives_the_device_every_byte_then_no_close_notify() {
    let pki = Pki::new().expect("PKI");
    let (mut upstream, proxy, name) = route(
        &pki,
        "tcp",
        Start::Tls,
        script(|mut tls| async move {
            tls.write_all(&payload(MIB)).await.expect("send");
            bare_fin(&mut tls).await;
            let (_, end) = read_to_end(&mut tls).await;
            end
        }),
        None,
    )
    .await;
    let mut device = device(&proxy, &name).await;
    // A slow reader: the proxy's buffers fill while the upstream has long finished.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (got, close) = device.read_to_close().await.expect("read");
    assert_eq!(got.len(), MIB, "every byte reaches the device");
    assert!(got == payload(MIB), "byte-exact");
    assert_eq!(
        close,
        Close::UnexpectedEof,
        "an end without close_notify, not a reset"
    );
    drop(device);
    let _ = upstream.next_report().await;
    assert_eq!(outcome(&name).await, "upstream_truncated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_never_sends_close_notify() {
    let pki = Pki::new().expect("PKI");
    let (_upstream, proxy, name) = route(
        &pki,
        "tcp",
        Start::Tls,
        script(|mut tls| async move {
            tls.write_all(&payload(64 << 10)).await.expect("send");
            tls.flush().await.expect("flush");
            // Stalls: half a reply, then nothing.
            let (_, end) = read_to_end(&mut tls).await;
            end
        }),
        Some("1s"),
    )
    .await;
    let mut device = device(&proxy, &name).await;
    let (got, close) = device.read_to_close().await.expect("read");
    assert_eq!(got.len(), 64 << 10);
    assert_ne!(
        close,
        Close::Clean,
        "an idle timeout must not look like a complete reply"
    );
    assert_eq!(outcome(&name).await, "idle_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_after_64kib_resets_the_device_after_the_bytes() {
    let pki = Pki::new().expect("PKI");
    let (_upstream, proxy, name) = route(
        &pki,
        "tcp",
        Start::Tls,
        script(|mut tls| async move {
            tls.write_all(&payload(64 << 10)).await.expect("send");
            tls.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_millis(200)).await;
            reset(tls);
            "reset".to_string()
        }),
        None,
    )
    .await;
    let mut device = device(&proxy, &name).await;
    let (got, close) = device.read_to_close().await.expect("read");
    assert!(got.len() <= 64 << 10 && got[..] == payload(64 << 10)[..got.len()]);
    assert_eq!(close, Close::Reset, "a reset is carried as a reset");
    assert_eq!(outcome(&name).await, "upstream_aborted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_literal_holding_bye_cut_by_a_bare_fin_is_not_clean() {
    let pki = Pki::new().expect("PKI");
    let (_upstream, proxy, name) = route(
        &pki,
        "imap",
        Start::Tls,
        script(|mut tls| async move {
            tls.write_all(b"* OK ready\r\n").await.expect("greeting");
            read_until(&mut tls, b"\r\n").await;
            tls.write_all(b"* 1 FETCH (BODY[] {4000}\r\nSubject: hi\r\n\r\n* BYE not really\r\n")
                .await
                .expect("literal");
            bare_fin(&mut tls).await;
            read_to_end(&mut tls).await.1
        }),
        None,
    )
    .await;
    let mut device = device(&proxy, &name).await;
    assert_eq!(
        device.read_line().await.expect("greeting"),
        Some(b"* OK ready\r\n".to_vec())
    );
    device
        .write_all(b"a1 FETCH 1 BODY[]\r\n")
        .await
        .expect("fetch");
    let (got, close) = device.read_to_close().await.expect("read");
    assert!(got.ends_with(b"* BYE not really\r\n"));
    assert_eq!(close, Close::UnexpectedEof, "a cut literal is no goodbye");
    drop(device);
    assert_eq!(outcome(&name).await, "upstream_truncated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_real_bye_then_a_bare_fin_is_a_clean_end() {
    let pki = Pki::new().expect("PKI");
    let (_upstream, proxy, name) = route(
        &pki,
        "imap",
        Start::Tls,
        script(|mut tls| async move {
            tls.write_all(b"* OK ready\r\n").await.expect("greeting");
            read_until(&mut tls, b"\r\n").await;
            tls.write_all(b"* BYE logging out\r\na1 OK LOGOUT completed\r\n")
                .await
                .expect("bye");
            bare_fin(&mut tls).await;
            read_to_end(&mut tls).await.1
        }),
        None,
    )
    .await;
    let mut device = device(&proxy, &name).await;
    device.read_line().await.expect("greeting");
    device.write_all(b"a1 LOGOUT\r\n").await.expect("logout");
    let (_, close) = device.read_to_close().await.expect("read");
    assert_eq!(
        close,
        Close::Clean,
        "the protocol's goodbye is a complete end"
    );
    drop(device);
    assert_eq!(outcome(&name).await, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_ok_inside_a_pipelined_body_cut_by_a_bare_fin_is_not_clean() {
    let pki = Pki::new().expect("PKI");
    let (_upstream, proxy, name) = route(
        &pki,
        "pop3",
        Start::Tls,
        script(|mut tls| async move {
            tls.write_all(b"+OK ready\r\n").await.expect("greeting");
            read_until(&mut tls, b"QUIT\r\n").await;
            tls.write_all(b"+OK 5000 octets\r\nSubject: hi\r\n\r\n+OK bye\r\n")
                .await
                .expect("body");
            bare_fin(&mut tls).await;
            read_to_end(&mut tls).await.1
        }),
        None,
    )
    .await;
    let mut device = device(&proxy, &name).await;
    device.read_line().await.expect("greeting");
    device
        .write_all(b"RETR 1\r\nQUIT\r\n")
        .await
        .expect("pipelined");
    let (got, close) = device.read_to_close().await.expect("read");
    assert!(got.ends_with(b"+OK bye\r\n"));
    assert_eq!(
        close,
        Close::UnexpectedEof,
        "a body line is not the reply to QUIT"
    );
    drop(device);
    assert_eq!(outcome(&name).await, "upstream_truncated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_bare_fin_reaches_the_upstream_without_close_notify_and_the_reply_comes_back() {
    let pki = Pki::new().expect("PKI");
    let (mut upstream, proxy, name) = route(
        &pki,
        "tcp",
        Start::Tls,
        script(|mut tls| async move {
            let (got, end) = read_to_end(&mut tls).await;
            tls.write_all(format!("got {} bytes", got.len()).as_bytes())
                .await
                .expect("reply");
            tls.shutdown().await.expect("close_notify");
            end
        }),
        None,
    )
    .await;
    let device = device(&proxy, &name).await;
    let (mut tls, _) = device.into_inner();
    tls.write_all(&payload(100_000)).await.expect("send");
    tls.flush().await.expect("flush");
    // A FIN without close_notify, as legacy devices often end.
    tls.get_mut().shutdown().await.expect("FIN");
    let mut conn = Conn::new(tls, READ_LIMIT);
    let (reply, close) = conn.read_to_close().await.expect("reply");
    assert_eq!(reply, b"got 100000 bytes", "the reply still comes back");
    assert_eq!(close, Close::Clean);
    assert_eq!(
        upstream.next_report().await.expect("report"),
        "unexpected_eof"
    );
    assert_eq!(
        outcome(&name).await,
        "ok",
        "a device's bare FIN is a normal end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_pre_tls_greeting_never_reaches_the_device() {
    let pki = Pki::new().expect("PKI");
    let forged = "* ok [capability IMAP4rev1 STARTTLS AUTH=PLAIN] forged on the path\r\n";
    let (_upstream, proxy) = setup(
        &pki,
        "imap",
        Start::ImapStarttls(forged.to_string()),
        script(|mut tls| async move {
            read_until(&mut tls, b"a1 LOGOUT\r\n").await;
            tls.write_all(b"* BYE bye\r\na1 OK done\r\n")
                .await
                .expect("bye");
            let _ = tls.shutdown().await;
            "done".to_string()
        }),
        None,
    )
    .await;
    let mut device = device(&proxy, "imap").await;
    let greeting = device.read_line().await.expect("greeting").expect("a line");
    assert_eq!(greeting, b"* OK localhost tlsbridge ready\r\n");
    device.write_all(b"a1 LOGOUT\r\n").await.expect("logout");
    let (rest, _) = device.read_to_close().await.expect("read");
    let all = [greeting, rest].concat().to_ascii_lowercase();
    assert!(!crate::support::lines::contains(&all, b"forged"));
    assert!(!crate::support::lines::contains(&all, b"auth=plain"));
    assert!(audit("legacy_client", "imap").len() <= 1);
}

/// A connection that closes without sending anything (a port scan, a balancer's TCP check)
/// costs the upstream no session, on implicit-TLS and on STARTTLS routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_close_cycles_cost_the_upstream_no_session() {
    let pki = Pki::new().expect("PKI");
    let upstream = Scripted::start(
        &pki.localhost,
        Start::Tls,
        script(|mut tls| async move {
            let _ = tls.write_all(b"* OK ready\r\n").await;
            read_to_end(&mut tls).await.1
        }),
    )
    .await
    .expect("scripted upstream");
    let (implicit, starttls) = (unique("tcp"), unique("imap"));
    let proxy = bridge(
        &pki,
        &[
            Route::new(&implicit, "tcp", "tls", &upstream.host_port(), "tls"),
            Route::new(&starttls, "imap", "starttls", &upstream.host_port(), "tls"),
        ],
        None,
    )
    .await
    .expect("start tlsbridge");
    for _ in 0..500 {
        drop(connect(proxy.addr(&implicit)).await.expect("connect"));
    }
    for _ in 0..100 {
        let mut tcp = connect(proxy.addr(&starttls)).await.expect("connect");
        // Reads the greeting, then goes away without a command.
        let mut greeting = [0u8; 64];
        let _ = tcp.read(&mut greeting).await;
    }
    let implicit_closed = closed(&implicit, 500).await.expect("500 ends");
    closed(&starttls, 100).await.expect("100 ends");
    assert_eq!(
        upstream.accepted(),
        0,
        "no upstream session for silent connections"
    );
    assert!(implicit_closed
        .iter()
        .all(|e| e.get("outcome").map(String::as_str) == Some("device_silent")));
    assert!(audit("legacy_client", &implicit).is_empty());
    assert!(audit("legacy_client", &starttls).is_empty());

    // A real device still gets through, and costs exactly one.
    let mut device = device(&proxy, &implicit).await;
    device.write_all(b"ping").await.expect("write");
    tokio::time::timeout(READ_LIMIT, async {
        while upstream.accepted() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the real device reaches the upstream");
    assert_eq!(upstream.accepted(), 1);
}

/// A bare connect to a plain route is not a plain legacy device: no `legacy_client` event (so
/// no inventory entry), a quiet outcome of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_connect_to_a_plain_route_is_not_a_device() {
    let pki = Pki::new().expect("PKI");
    let upstream = Scripted::start(
        &pki.localhost,
        Start::Tls,
        script(|mut tls| async move {
            let _ = tls.write_all(b"* OK ready\r\n").await;
            read_to_end(&mut tls).await.1
        }),
    )
    .await
    .expect("scripted upstream");
    let (opaque, imap) = (unique("tcp"), unique("imap"));
    let proxy = bridge(
        &pki,
        &[
            Route::new(&opaque, "tcp", "plain", &upstream.host_port(), "tls"),
            Route::new(&imap, "imap", "plain", &upstream.host_port(), "tls"),
        ],
        None,
    )
    .await
    .expect("start tlsbridge");
    drop(connect(proxy.addr(&opaque)).await.expect("connect"));
    let mut tcp = connect(proxy.addr(&imap)).await.expect("connect");
    let mut greeting = [0u8; 64];
    let n = tcp.read(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting[..n], b"* OK ready\r\n");
    drop(tcp);
    for route in [&opaque, &imap] {
        let ends = closed(route, 1).await.expect("session_closed");
        assert_eq!(
            ends[0].get("outcome").map(String::as_str),
            Some("device_silent"),
            "{route}"
        );
        assert!(audit("legacy_client", route).is_empty(), "{route}");
    }
    assert_eq!(
        upstream.accepted(),
        1,
        "only the plain IMAP device, which waits for a greeting, started an upstream leg"
    );
}
