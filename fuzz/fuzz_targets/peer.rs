//! The harness the dialog targets share: the code under test gets one end of an in-memory
//! stream; the peer at the other end writes the input, ends its side and reads every reply (so
//! replies never block the dialog). On a single-threaded runtime.

use std::future::Future;

use tokio::io::{AsyncWriteExt, DuplexStream};

pub fn against<F, Fut>(input: &[u8], dialog: F)
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let input = input.to_vec();
        let peer = tokio::spawn(async move {
            let _ = theirs.write_all(&input).await;
            let _ = theirs.shutdown().await;
            let _ = tokio::io::copy(&mut theirs, &mut tokio::io::sink()).await;
        });
        dialog(ours).await;
        let _ = peer.await;
    });
}
