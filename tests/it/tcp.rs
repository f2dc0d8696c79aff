//! Opaque TCP routes: implicit TLS on both legs, bytes relayed untouched, half-close carried.

use std::time::Duration;

use crate::support::ca::Pki;
use crate::support::device::{
    connect, tls_connect, write_shutdown_read, write_shutdown_read_concurrently, Legacy,
};
use crate::support::lines::Close;
use crate::support::proxy::{Proxy, Route};
use crate::support::upstream::{EchoMode, FakeUpstream, Service, UpstreamTls};
use rand::Rng;
use sha2::{Digest, Sha256};

const PAYLOAD: usize = 16 << 20;
/// Generous for a debug build on two cores; only a guard against hanging.
const TRANSFER_LIMIT: Duration = Duration::from_secs(240);

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_payload() -> Vec<u8> {
    let mut payload = vec![0u8; PAYLOAD];
    rand::rng().fill(&mut payload[..]);
    payload
}

async fn echo_setup(pki: &Pki, mode: EchoMode) -> (FakeUpstream, Proxy) {
    let upstream = FakeUpstream::start(Service::Echo(mode), UpstreamTls::Modern, &pki.localhost)
        .await
        .expect("start the echo upstream");
    let proxy = Proxy::start(
        pki,
        &[Route::new(
            "https",
            "tcp",
            "tls",
            &upstream.host_port(),
            "tls",
        )],
    )
    .await
    .expect("start the proxy");
    (upstream, proxy)
}

/// The device writes 16 MiB, sends close_notify + FIN, and only then reads: the upstream echoes
/// only after it saw the device's end, so this passes only if the half-close crosses the proxy
/// and the other direction stays open until the upstream is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_16mib_round_trip_with_half_close() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = echo_setup(&pki, EchoMode::AfterEof).await;
    let payload = random_payload();

    let tcp = connect(proxy.addr("https")).await.expect("connect");
    let stream = tls_connect(tcp, Legacy::Tls10, &proxy.verify(), "localhost")
        .await
        .expect("TLS 1.0 device handshake");
    let (received, close) = write_shutdown_read(stream, &payload, TRANSFER_LIMIT)
        .await
        .expect("device round trip");
    let report = upstream.next_session().await.expect("upstream session");

    assert_eq!(
        report.after_tls.len(),
        payload.len(),
        "bytes at the upstream ({report:?})"
    );
    assert_eq!(
        sha256(&report.after_tls),
        sha256(&payload),
        "device -> upstream SHA-256"
    );
    assert_eq!(
        report.peer_close,
        Some(Close::Clean),
        "the device's close_notify must reach the upstream as a clean end"
    );
    assert_eq!(received.len(), payload.len(), "bytes back at the device");
    assert_eq!(
        sha256(&received),
        sha256(&payload),
        "upstream -> device SHA-256"
    );
    assert_eq!(
        close,
        Close::Clean,
        "the upstream's close_notify must reach the device as a clean close"
    );
    assert_eq!(report.outcome, "ok", "{report:?}");
}

/// Same payload with a streaming echo and a device that reads while it writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_16mib_streaming_echo() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (mut upstream, proxy) = echo_setup(&pki, EchoMode::Streaming).await;
    let payload = random_payload();

    let tcp = connect(proxy.addr("https")).await.expect("connect");
    let stream = tls_connect(tcp, Legacy::Tls10, &proxy.verify(), "localhost")
        .await
        .expect("TLS 1.0 device handshake");
    let (received, close) = write_shutdown_read_concurrently(stream, &payload, TRANSFER_LIMIT)
        .await
        .expect("device round trip");
    let report = upstream.next_session().await.expect("upstream session");

    assert_eq!(
        sha256(&report.after_tls),
        sha256(&payload),
        "device -> upstream"
    );
    assert_eq!(received.len(), payload.len(), "bytes back at the device");
    assert_eq!(sha256(&received), sha256(&payload), "upstream -> device");
    assert_eq!(close, Close::Clean);
    assert_eq!(report.peer_close, Some(Close::Clean));
}

/// An upstream that ends with a bare FIN (no close_notify) after part of the reply must not look
/// like a clean end to the device: it gets the bytes, then an end without close_notify.
#[tokio::test]
async fn tcp_truncated_upstream_is_not_a_clean_close() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    const SENT: usize = 4096;
    let (mut upstream, proxy) = echo_setup(&pki, EchoMode::AbortAfter(SENT)).await;
    let payload = vec![0x5au8; SENT];

    let tcp = connect(proxy.addr("https")).await.expect("connect");
    let stream = tls_connect(tcp, Legacy::Tls10, &proxy.verify(), "localhost")
        .await
        .expect("TLS 1.0 device handshake");
    let mut device = crate::support::lines::Conn::new(stream, Duration::from_secs(15));
    device.write_all(&payload).await.expect("device write");
    let (received, close) = device
        .read_to_close()
        .await
        .expect("the proxy ends the stream");
    let report = upstream.next_session().await.expect("upstream session");

    assert_eq!(report.after_tls.len(), SENT, "{report:?}");
    assert_eq!(
        received.len(),
        SENT,
        "the device gets what the upstream sent"
    );
    assert_ne!(
        close,
        Close::Clean,
        "an upstream FIN without close_notify must not become a close_notify to the device"
    );
}

/// TLS 1.0 with a CBC suite: each write to the device is one record, with no empty record
/// before it (the BEAST countermeasure some old device stacks cannot parse; the acceptor sets
/// `DONT_INSERT_EMPTY_FRAGMENTS`). A tap between device and proxy records what the device gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls10_records_to_the_device_come_without_empty_fragments() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let (_upstream, proxy) = echo_setup(&pki, EchoMode::Streaming).await;
    let tap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tap_addr = tap.local_addr().unwrap();
    let proxy_addr = proxy.addr("https");
    let recorded = tokio::spawn(async move {
        let (device, _) = tap.accept().await.unwrap();
        let to_proxy = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
        let (mut device_read, mut device_write) = device.into_split();
        let (mut proxy_read, mut proxy_write) = to_proxy.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut device_read, &mut proxy_write).await;
            let _ = proxy_write.shutdown().await;
        });
        let mut to_device = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = proxy_read.read(&mut buf).await {
            if n == 0 || device_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
            to_device.extend_from_slice(&buf[..n]);
        }
        let _ = device_write.shutdown().await;
        to_device
    });
    let tcp = connect(tap_addr).await.expect("connect to the tap");
    let mut stream = tls_connect(tcp, Legacy::Tls10, &proxy.verify(), "localhost")
        .await
        .expect("TLS 1.0 handshake");
    let (_, cipher) = crate::support::device::tls_info(&stream);
    assert!(
        cipher.contains("SHA") && !cipher.contains("GCM"),
        "a CBC suite: {cipher}"
    );
    stream.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello");
    drop(stream);
    let bytes = tokio::time::timeout(Duration::from_secs(10), recorded)
        .await
        .expect("the tap ends")
        .unwrap();
    // TLS records: type, version (2), length (2), body. Count application data (23).
    let (mut at, mut application) = (0, 0);
    while at + 5 <= bytes.len() {
        if bytes[at] == 23 {
            application += 1;
        }
        at += 5 + usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
    }
    assert_eq!(
        application, 1,
        "one record for one echo, no empty record before it"
    );
}
