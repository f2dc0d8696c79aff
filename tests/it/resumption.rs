//! The upstream leg resumes its TLS sessions: after one full handshake to an upstream, the next
//! sessions' upstream handshakes are resumptions, as the upstream itself counts them (rustls'
//! handshake kind), over real sessions from TLS 1.0 devices.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::ca::Pki;
use crate::support::device::{connect, tls_connect, Legacy};
use crate::support::proxy::Route;
use crate::support::scripted::{bridge, read_to_end, Script, Scripted, Start};

/// Echoes the device's one line (so the proxy's client reads the upstream's session tickets),
/// waits for the end and reports how the handshake went.
fn echo_and_report_handshake() -> Script {
    Arc::new(|mut tls| {
        Box::pin(async move {
            let mut line = [0u8; 5];
            if tls.read_exact(&mut line).await.is_ok() {
                let _ = tls.write_all(&line).await;
                let _ = tls.flush().await;
            }
            let kind = format!("{:?}", tls.get_ref().1.handshake_kind());
            let _ = read_to_end(&mut tls).await;
            kind
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_one_full_handshake_the_upstream_leg_resumes() {
    let pki = Pki::new().expect("test PKI");
    let mut upstream = Scripted::start(&pki.localhost, Start::Tls, echo_and_report_handshake())
        .await
        .expect("scripted upstream");
    let route = Route::tcp("resumes", "tls", &upstream.host_port());
    let proxy = bridge(&pki, &[route], None).await.expect("start tlsbridge");
    let mut kinds = Vec::new();
    for _ in 0..5 {
        let tcp = connect(proxy.addr("resumes")).await.expect("connect");
        let mut device = tls_connect(tcp, Legacy::Tls10, &proxy.verify(), "localhost")
            .await
            .expect("TLS 1.0 device handshake");
        device.write_all(b"ping\n").await.expect("send");
        let mut echo = [0u8; 5];
        device.read_exact(&mut echo).await.expect("echo");
        assert_eq!(&echo, b"ping\n");
        let _ = device.shutdown().await;
        kinds.push(upstream.next_report().await.expect("upstream report"));
    }
    let full = kinds.iter().filter(|k| k.contains("Full")).count();
    let resumed = kinds.iter().filter(|k| *k == "Some(Resumed)").count();
    assert_eq!((full, resumed), (1, 4), "upstream handshakes: {kinds:?}");
    assert!(
        kinds[0].contains("Full"),
        "the first is the full one: {kinds:?}"
    );
}
