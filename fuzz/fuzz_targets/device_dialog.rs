//! The server role of each protocol's pre-TLS dialog, fed arbitrary device bytes over an
//! in-memory stream. The first byte picks the protocol. It must end (Ok or an error), never
//! panic, and never hand back more than one line's worth of pipelined bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsbridge::protocol::{self, Dialect, LineConn};
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let dialect = [Dialect::Smtp, Dialect::Imap, Dialect::Pop3][usize::from(pick % 3)];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (ours, mut device) = tokio::io::duplex(64 * 1024);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            let _ = device.write_all(&input).await;
            let _ = device.shutdown().await;
            // Keep reading so replies never block the dialog.
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut device, &mut sink).await;
        });
        let mut conn = LineConn::new(ours);
        let _ = protocol::device_until_starttls(dialect, &mut conn, "fuzz").await;
        let (_, pipelined) = conn.into_parts();
        assert!(pipelined.len() <= protocol::MAX_LINE);
        let _ = writer.await;
    });
});
