//! Helpers for the dialog unit tests: a scripted peer over `tokio::io::duplex`.

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Reads from `peer` until `needle` has been seen; panics if the stream closes first.
pub async fn read_until(peer: &mut DuplexStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = peer.read(&mut buf).await.expect("read from the dialog");
        assert!(
            n > 0,
            "closed before {needle:?}; got {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(seen).expect("dialog output is text")
}

/// Plays a scripted server: for each step, waits for a line starting with the expected
/// command (none for the first greeting), then sends the reply. Keeps reading afterwards so
/// the dialog under test never sees a premature close.
pub fn scripted_server(mut server: DuplexStream, script: Vec<(&'static str, &'static str)>) {
    tokio::spawn(async move {
        for (expect, reply) in script {
            if !expect.is_empty() {
                let got = read_until(&mut server, "\r\n").await;
                assert!(got.starts_with(expect), "expected {expect:?}, got {got:?}");
            }
            server
                .write_all(reply.as_bytes())
                .await
                .expect("scripted reply");
        }
        let mut rest = Vec::new();
        let _ = server.read_to_end(&mut rest).await;
    });
}
