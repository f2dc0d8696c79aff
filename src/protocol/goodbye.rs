//! Watches a relayed session for the protocol's own goodbye, so that an upstream that then ends
//! without close_notify still counts as a complete end, and nothing else does.
//!
//! The goodbye must be a complete line at a line start, outside any literal or multi-line
//! body: SMTP `221`/`421`; IMAP an untagged `* BYE` (server literals `{N}` are skipped byte for
//! byte); POP3 `+OK` as the reply to the device's own `QUIT` (pipelined commands are matched to
//! their replies in order, multi-line bodies skipped to their `.` line). Memory is bounded: a
//! few bytes of the current line on each side and a bounded queue of pending POP3 commands.

use super::Dialect;

/// Bytes of a line kept to recognise it: its start and, for IMAP, the `{N}` at its end.
const KEEP: usize = 24;

/// POP3 commands awaiting a reply; a device pipelining more than this loses the goodbye
/// (its end is then carried as truncated, never the other way round).
const MAX_PENDING: usize = 64;

/// The goodbye watcher of one session.
#[derive(Debug)]
pub struct Goodbye {
    kind: Kind,
    /// Upstream to device.
    down: Lines,
    /// Device to upstream.
    up: Lines,
    /// The goodbye was seen and nothing followed it but complete lines.
    said: bool,
    /// IMAP: octets of a server literal still to skip.
    literal: u64,
    /// IMAP: the current line continues after a literal, so it does not start a response.
    continued: bool,
    /// POP3: the device's commands awaiting their reply, oldest first.
    pending: std::collections::VecDeque<Pop3Command>,
    /// POP3: inside a multi-line reply body.
    body: bool,
    /// POP3: lines the device sends in answer to `+ ` continuations, not commands.
    continuations: u32,
    /// Lost track (POP3 queue overflow, a reply with no command): never claim a goodbye.
    lost: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    None,
    Smtp,
    Imap,
    Pop3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pop3Command {
    Quit,
    /// A command whose `+OK` reply is followed by lines up to `.`.
    MultiLine,
    Other,
}

/// One direction's line splitter: the first and last bytes of the current line.
#[derive(Debug, Default)]
struct Lines {
    head: Vec<u8>,
    tail: Vec<u8>,
    /// Bytes in the current line so far (0: at a line start).
    len: u64,
}

impl Lines {
    fn push(&mut self, b: u8) {
        if self.head.len() < KEEP {
            self.head.push(b);
        }
        if self.tail.len() == KEEP {
            self.tail.remove(0);
        }
        self.tail.push(b);
        self.len += 1;
    }

    fn clear(&mut self) {
        self.head.clear();
        self.tail.clear();
        self.len = 0;
    }
}

/// A complete line: its start (terminator removed when short) and its end (CRLF removed).
struct Line {
    head: Vec<u8>,
    tail: Vec<u8>,
}

fn strip_eol(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

fn starts_with_ci(bytes: &[u8], prefix: &[u8]) -> bool {
    bytes.len() >= prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// `{N}` or `{N+}` at the end of an IMAP line: the literal's size.
fn literal_size(tail: &[u8]) -> Option<u64> {
    let inner = tail.strip_suffix(b"}")?;
    let inner = inner.strip_suffix(b"+").unwrap_or(inner);
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits
        .iter()
        .try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .or(Some(u64::MAX))
}

impl Goodbye {
    /// A watcher for `dialect`; `None` (opaque tcp) never sees a goodbye.
    pub fn new(dialect: Option<Dialect>) -> Goodbye {
        let kind = match dialect {
            None => Kind::None,
            Some(Dialect::Smtp) => Kind::Smtp,
            Some(Dialect::Imap) => Kind::Imap,
            Some(Dialect::Pop3) => Kind::Pop3,
        };
        Goodbye {
            kind,
            down: Lines::default(),
            up: Lines::default(),
            said: false,
            literal: 0,
            continued: false,
            pending: std::collections::VecDeque::new(),
            body: false,
            continuations: 0,
            lost: false,
        }
    }

    /// True when the upstream's last bytes completed its goodbye: an end without close_notify
    /// right now is a complete one.
    pub fn upstream_said_goodbye(&self) -> bool {
        self.said && !self.lost && self.down.len == 0 && self.literal == 0
    }

    /// Bytes the device sent (only POP3 needs them: replies are matched to commands).
    pub fn from_device(&mut self, bytes: &[u8]) {
        if self.kind != Kind::Pop3 {
            return;
        }
        for &b in bytes {
            self.up.push(b);
            if b == b'\n' {
                let head = strip_eol(&self.up.head).to_vec();
                self.up.clear();
                self.device_line(&head);
            }
        }
    }

    /// Bytes the upstream sent.
    pub fn from_upstream(&mut self, mut bytes: &[u8]) {
        if self.kind == Kind::None {
            return;
        }
        while !bytes.is_empty() {
            if self.literal > 0 {
                let skip = usize::try_from(self.literal)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.literal -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            let b = bytes[0];
            bytes = &bytes[1..];
            self.down.push(b);
            if b == b'\n' {
                let line = Line {
                    head: self.down.head.clone(),
                    tail: strip_eol(&self.down.tail).to_vec(),
                };
                self.down.clear();
                self.upstream_line(&line);
            }
        }
    }

    fn upstream_line(&mut self, line: &Line) {
        let head = strip_eol(&line.head);
        match self.kind {
            Kind::None => {}
            Kind::Smtp => {
                // The last line of a reply ("221 ..." or "221"): a goodbye; anything after it
                // is a new reply.
                let code = head.get(..3);
                let last = head.len() == 3 || head.get(3) == Some(&b' ');
                self.said = last && matches!(code, Some(b"221") | Some(b"421"));
            }
            Kind::Imap => {
                let starts_response = !self.continued;
                if starts_response && starts_with_ci(head, b"* BYE") {
                    self.said = true;
                }
                match literal_size(&line.tail) {
                    Some(n) => {
                        self.literal = n;
                        self.continued = true;
                    }
                    None => self.continued = false,
                }
            }
            Kind::Pop3 => self.pop3_reply_line(head),
        }
    }

    fn pop3_reply_line(&mut self, head: &[u8]) {
        if self.body {
            // Only a lone "." ends a body; byte-stuffed lines start with "..".
            if head == b"." {
                self.body = false;
            }
            return;
        }
        if starts_with_ci(head, b"+ ") || head == b"+" {
            // A SASL continuation: the device's next line answers it.
            self.continuations = self.continuations.saturating_add(1);
            return;
        }
        let Some(command) = self.pending.pop_front() else {
            // A reply to nothing we saw (the greeting is read before the relay): unknown.
            self.lost = true;
            return;
        };
        let ok = starts_with_ci(head, b"+OK");
        match command {
            Pop3Command::Quit if ok => self.said = true,
            Pop3Command::MultiLine if ok => self.body = true,
            _ => {}
        }
    }

    fn device_line(&mut self, head: &[u8]) {
        if self.continuations > 0 {
            self.continuations -= 1;
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            self.lost = true;
            return;
        }
        let text = String::from_utf8_lossy(head);
        let (verb, arg) = super::verb(&text);
        let command = match verb.as_str() {
            "QUIT" => Pop3Command::Quit,
            "RETR" | "TOP" | "CAPA" => Pop3Command::MultiLine,
            "LIST" | "UIDL" if arg.is_empty() => Pop3Command::MultiLine,
            "AUTH" if arg.is_empty() => Pop3Command::MultiLine,
            _ => Pop3Command::Other,
        };
        self.pending.push_back(command);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imap(down: &[&[u8]]) -> bool {
        let mut g = Goodbye::new(Some(Dialect::Imap));
        for chunk in down {
            g.from_upstream(chunk);
        }
        g.upstream_said_goodbye()
    }

    #[test]
    fn smtp_goodbye_is_a_final_221_line() {
        let mut g = Goodbye::new(Some(Dialect::Smtp));
        g.from_upstream(b"250 OK\r\n221 2.0.0 Bye\r\n");
        assert!(g.upstream_said_goodbye());
        let mut g = Goodbye::new(Some(Dialect::Smtp));
        g.from_upstream(b"221-more\r\n");
        assert!(!g.upstream_said_goodbye());
        let mut g = Goodbye::new(Some(Dialect::Smtp));
        g.from_upstream(b"221 Bye\r\n250 x");
        assert!(!g.upstream_said_goodbye(), "a partial line after it");
    }

    #[test]
    fn imap_bye_counts_only_outside_literals() {
        assert!(imap(&[
            b"* OK x\r\n",
            b"* BYE logging out\r\n",
            b"a1 OK done\r\n"
        ]));
        assert!(imap(&[b"* bye server shutting down\r\n"]));
        // A literal whose body holds "* BYE" lines, cut short.
        assert!(!imap(&[b"* 1 FETCH (BODY[] {100}\r\n* BYE fake\r\n"]));
        // The whole literal, then the rest of the response: still no goodbye.
        assert!(!imap(&[
            b"* 1 FETCH (BODY[] {12}\r\n",
            b"* BYE fake\r\n",
            b")\r\n"
        ]));
        // A BYE after the complete literal is real.
        assert!(imap(&[
            b"* 1 FETCH (BODY[] {12}\r\n* BYE fake\r\n)\r\n",
            b"* BYE bye\r\n"
        ]));
        // Split across chunks anywhere.
        let all = b"* 1 FETCH (BODY[] {12}\r\n* BYE fake\r\n)\r\n* BYE bye\r\n";
        for cut in 0..all.len() {
            assert!(imap(&[&all[..cut], &all[cut..]]), "cut at {cut}");
        }
        // "* BYE" not at a line start.
        assert!(!imap(&[b"* OK text * BYE\r\n"]));
        // A partial line after the BYE.
        assert!(!imap(&[b"* BYE bye\r\na1 OK"]));
        assert_eq!(literal_size(b"x {99999999999999999999999}"), Some(u64::MAX));
        assert_eq!(literal_size(b"{5+}"), Some(5));
        assert_eq!(literal_size(b"{}"), None);
    }

    #[test]
    fn pop3_ok_counts_only_as_the_reply_to_quit() {
        let mut g = Goodbye::new(Some(Dialect::Pop3));
        g.from_device(b"STAT\r\nQUIT\r\n");
        g.from_upstream(b"+OK 1 100\r\n+OK bye\r\n");
        assert!(g.upstream_said_goodbye());

        // Pipelined RETR + QUIT, the body cut short; a "+OK" line inside the body.
        let mut g = Goodbye::new(Some(Dialect::Pop3));
        g.from_device(b"RETR 1\r\nQUIT\r\n");
        g.from_upstream(b"+OK 500 octets\r\nline\r\n+OK bye\r\n");
        assert!(!g.upstream_said_goodbye());
        g.from_upstream(b".\r\n+OK bye\r\n");
        assert!(g.upstream_said_goodbye(), "after the body, the real reply");

        // Unknown replies never count.
        let mut g = Goodbye::new(Some(Dialect::Pop3));
        g.from_upstream(b"+OK bye\r\n");
        assert!(!g.upstream_said_goodbye());

        // A SASL exchange: the device's answer to "+ " is not a command.
        let mut g = Goodbye::new(Some(Dialect::Pop3));
        g.from_device(b"AUTH PLAIN\r\n");
        g.from_upstream(b"+ \r\n");
        g.from_device(b"AHVzZXIAcGFzcw==\r\nQUIT\r\n");
        g.from_upstream(b"+OK logged in\r\n+OK bye\r\n");
        assert!(g.upstream_said_goodbye());

        // Too many pipelined commands: lost track, never a goodbye.
        let mut g = Goodbye::new(Some(Dialect::Pop3));
        g.from_device("NOOP\r\n".repeat(MAX_PENDING + 1).as_bytes());
        g.from_device(b"QUIT\r\n");
        g.from_upstream("+OK\r\n".repeat(MAX_PENDING + 2).as_bytes());
        assert!(!g.upstream_said_goodbye());
    }

    #[test]
    fn opaque_tcp_never_says_goodbye() {
        let mut g = Goodbye::new(None);
        g.from_upstream(b"221 bye\r\n* BYE\r\n");
        assert!(!g.upstream_said_goodbye());
    }
}
