//! The server role of each protocol's login dialog after TLS (routes with `auth = "xoauth2"`),
//! fed arbitrary device bytes over an in-memory stream: the first byte picks the protocol and
//! whether a login is required. It must end (a login or an error), never panic, and never hand
//! back more than one line's worth of pipelined bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsbridge::protocol::{self, Dialect, LineConn, MAX_AUTH_LINE};

mod peer;

/// The upstream's EHLO reply after TLS, as the device is shown it (SMTP).
const UPSTREAM_EHLO: [&str; 3] = ["outlook.office365.com", "SIZE 157286400", "AUTH XOAUTH2"];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let dialect = [Dialect::Smtp, Dialect::Imap, Dialect::Pop3][usize::from(pick % 3)];
    let required = pick & 0x80 == 0;
    let ehlo: Vec<String> = UPSTREAM_EHLO.iter().map(|l| l.to_string()).collect();
    peer::against(input, |ours| async move {
        let mut conn = LineConn::with_max_line(ours, MAX_AUTH_LINE);
        let _ = protocol::device_until_login(dialect, &mut conn, "fuzz", &ehlo, required).await;
        let (_, pipelined) = conn.into_parts();
        assert!(pipelined.len() <= MAX_AUTH_LINE);
    });
});
