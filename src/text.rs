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
}
