//! The one sanitiser for text a peer chose (an EHLO name, an SNI, an upstream's reply) on its way
//! to a log line, the inventory, a table or `/clients`: control and other non-printable
//! characters become visible escapes (`\n`, `\x1b`, `\u{202e}`), printable ones stay as they
//! are, and the length is bounded. HTML pages escape for themselves on top of this.

/// Characters kept from a peer's text; anything longer is cut and marked with `...`.
pub const MAX_CHARS: usize = 200;

/// `text` made safe for a log line or a terminal.
pub fn printable(text: &str) -> String {
    printable_bytes(text.as_bytes())
}

/// Like [`printable`], for bytes that may not be UTF-8: invalid bytes become `\xHH`.
pub fn printable_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().min(MAX_CHARS));
    let mut kept = 0;
    let mut keep = |out: &mut String, piece: Piece| {
        if kept == MAX_CHARS {
            out.push_str("...");
            return false;
        }
        kept += 1;
        match piece {
            Piece::Char(c) => escape_into(out, c),
            Piece::Byte(b) => out.push_str(&format!("\\x{b:02x}")),
        }
        true
    };
    for chunk in bytes.utf8_chunks() {
        let pieces = chunk.valid().chars().map(Piece::Char);
        let pieces = pieces.chain(chunk.invalid().iter().map(|&b| Piece::Byte(b)));
        for piece in pieces {
            if !keep(&mut out, piece) {
                return out;
            }
        }
    }
    out
}

enum Piece {
    Char(char),
    Byte(u8),
}

fn escape_into(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
        c if c.is_ascii() => out.push(c),
        c if is_invisible(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        c => out.push(c),
    }
}

/// Non-ASCII characters that print nothing or reorder what follows: C1 controls, bidi
/// overrides and isolates, zero-width characters, the BOM, line and paragraph separators.
fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00ad}' | '\u{061c}' | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}')
}

/// The longest host name (RFC 1035) and the longest label.
const MAX_HOST_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// True when `name` is a DNS host name: dot-separated labels of ASCII letters, digits and
/// hyphens, 1 to 63 characters each, not starting or ending with a hyphen, 253 characters at
/// most in all (a trailing dot is not accepted). Underscores are refused too. A device's SNI
/// must pass this before it is matched, routed on or recorded.
pub fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOST_NAME
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_visible_escapes_and_printables_stay() {
        assert_eq!(printable("MX-3070 scanner"), "MX-3070 scanner");
        assert_eq!(
            printable("x\nFORGED INFO outcome=ok\x1b[31m.test"),
            "x\\nFORGED INFO outcome=ok\\x1b[31m.test"
        );
        assert_eq!(
            printable("a\\nb"),
            "a\\\\nb",
            "a backslash cannot fake an escape"
        );
        assert_eq!(printable("Drucker-Büro"), "Drucker-Büro");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(printable("\u{85}"), "\\u{85}");
    }

    #[test]
    fn length_is_bounded() {
        let long = "a".repeat(MAX_CHARS + 50);
        let out = printable(&long);
        assert_eq!(out.len(), MAX_CHARS + 3);
        assert!(out.ends_with("..."));
    }

    #[test]
    fn invalid_utf8_bytes_are_escaped() {
        assert_eq!(printable_bytes(b"ok\xff\n"), "ok\\xff\\n");
        assert_eq!(printable_bytes(b"plain"), "plain");
    }

    #[test]
    fn host_names_are_letters_digits_hyphens_and_dots_within_limits() {
        for good in ["a", "mail.example.com", "x-1.test", "A.B", &"a".repeat(63)] {
            assert!(is_host_name(good), "{good}");
        }
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(long.len() > 253);
        for bad in [
            "",
            ".",
            "a..b",
            "a.",
            ".a",
            "-a.test",
            "a-.test",
            "a_b.test",
            "*.test",
            "x\nFORGED.test",
            "x\u{1b}[31m.test",
            "caf\u{e9}.test",
            &"a".repeat(64),
            &long,
        ] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
    }
}
