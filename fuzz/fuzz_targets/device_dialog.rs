//! The server role of each protocol's pre-TLS dialog, fed arbitrary device bytes over an
//! in-memory stream. The first byte picks the protocol. It must end (Ok or an error), never
//! panic, and never hand back more than one line's worth of pipelined bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsbridge::protocol::{self, Dialect, LineConn};

mod peer;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let dialect = [Dialect::Smtp, Dialect::Imap, Dialect::Pop3][usize::from(pick % 3)];
    peer::against(input, |ours| async move {
        let mut conn = LineConn::new(ours);
        let _ = protocol::device_until_starttls(dialect, &mut conn, "fuzz").await;
        let (_, pipelined) = conn.into_parts();
        assert!(pipelined.len() <= protocol::MAX_LINE);
    });
});
