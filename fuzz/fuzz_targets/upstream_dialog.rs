//! The client role of each protocol's STARTTLS dialog (and the implicit-TLS greeting reader),
//! fed arbitrary upstream bytes over an in-memory stream. The first byte picks the protocol and
//! the reader. It must end without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsbridge::protocol::{self, Dialect, LineConn};

mod peer;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let dialect = [Dialect::Smtp, Dialect::Imap, Dialect::Pop3][usize::from(pick % 3)];
    let greeting_only = pick & 0x80 != 0;
    peer::against(input, |ours| async move {
        let mut conn = LineConn::new(ours);
        if greeting_only {
            let _ = protocol::upstream_greeting(dialect, &mut conn).await;
        } else {
            let _ = protocol::upstream_starttls(dialect, &mut conn, "fuzz.example").await;
        }
    });
});
