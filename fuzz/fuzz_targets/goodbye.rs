//! The goodbye watcher (IMAP literals, POP3 reply matching, SMTP replies), fed arbitrary bytes
//! in both directions with arbitrary chunk boundaries. Memory stays bounded and it never
//! panics; splitting the same bytes differently gives the same answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsbridge::protocol::goodbye::Goodbye;
use tlsbridge::protocol::Dialect;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let dialect = match pick % 4 {
        0 => None,
        1 => Some(Dialect::Smtp),
        2 => Some(Dialect::Imap),
        _ => Some(Dialect::Pop3),
    };
    // Bytes below 0x08 in the control stream switch direction; the rest is payload.
    let mut chunked = Goodbye::new(dialect);
    let mut whole = Goodbye::new(dialect);
    let (mut up, mut down) = (Vec::new(), Vec::new());
    let mut to_device = true;
    let mut start = 0;
    for (i, &b) in rest.iter().enumerate() {
        if b < 0x08 {
            let chunk = &rest[start..i];
            if to_device {
                chunked.from_upstream(chunk);
                down.extend_from_slice(chunk);
            } else {
                chunked.from_device(chunk);
                up.extend_from_slice(chunk);
            }
            to_device = b & 1 == 0;
            start = i + 1;
        }
    }
    let chunk = &rest[start..];
    if to_device {
        chunked.from_upstream(chunk);
        down.extend_from_slice(chunk);
    } else {
        chunked.from_device(chunk);
        up.extend_from_slice(chunk);
    }
    let _ = chunked.upstream_said_goodbye();
    // Order-independent protocols (SMTP, IMAP, opaque) do not depend on chunking.
    if dialect != Some(Dialect::Pop3) {
        whole.from_device(&up);
        whole.from_upstream(&down);
        assert_eq!(
            chunked.upstream_said_goodbye(),
            whole.upstream_said_goodbye()
        );
    }
});
