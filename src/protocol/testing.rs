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

/// One step of a scripted server: the line it waits for (its start; `""` waits for nothing,
/// [`EMPTY_LINE`] for an empty line) and the reply it then sends.
pub type Step = (&'static str, &'static str);

/// The step's expectation of an empty line, e.g. the answer to an XOAUTH2 error challenge.
pub const EMPTY_LINE: &str = "\r\n";

/// Plays a scripted server: for each step, waits for a line starting with the expected
/// command (none for the first greeting), then sends the reply. Keeps reading afterwards so
/// the dialog under test never sees a premature close.
pub fn scripted_server(server: DuplexStream, script: Vec<Step>) {
    tokio::spawn(async move {
        let mut server = play(server, script).await;
        let mut rest = Vec::new();
        let _ = server.read_to_end(&mut rest).await;
    });
}

/// Like [`scripted_server`], but hangs up once the script has run.
pub fn scripted_then_closed(server: DuplexStream, script: Vec<Step>) {
    tokio::spawn(play(server, script));
}

async fn play(mut server: DuplexStream, script: Vec<Step>) -> DuplexStream {
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
    server
}

/// Bounds a dialog under test: one left waiting for a line that never comes fails the test
/// instead of hanging it.
pub async fn bounded<T>(dialog: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(10), dialog)
        .await
        .expect("the dialog ended within 10 s")
}
