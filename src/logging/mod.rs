//! Log output: human-readable text, or one flat JSON object per event that also carries the
//! fields of the connection's span (`route`, `peer`, ...), so every event of a session can be
//! traced to its device.
//!
//! The layer keeps each open span's fields in its own table and drops them when the span
//! closes. tracing-subscriber's fmt layer keeps them in the span registry's per-slot extensions
//! instead, whose small table stays allocated for every slot ever used: a burst of connections
//! scatters thousands of them through the heap, each pinning a page the burst had freed
//! (measured: RSS 10 s after an 8,000-connection burst 40 MiB with them, 15 MiB without; the
//! baseline is 13 MiB).

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::{Mutex, PoisonError};

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

mod batch;

/// Installs the global subscriber, writing to standard output in batches (`flush` before the
/// process ends). `RUST_LOG`, when set, wins over `level`.
pub fn init(level: &str, format: LogFormat) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let stdout = batch::stdout()?;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        stdout.try_flush();
        previous(info)
    }));
    init_with(
        level,
        format,
        std::io::stdout().is_terminal(),
        batch::Lines(stdout),
    )
}

/// Writes out the log lines not yet written.
pub fn flush() {
    batch::flush_stdout();
}

/// Like `init`, with colours only when `ansi` (a terminal, not a log file or journald).
pub fn init_with<W>(level: &str, format: LogFormat, ansi: bool, writer: W) -> anyhow::Result<()>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|err| anyhow::anyhow!("log.level: {err}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(LogLayer::new(Text { ansi }, writer))
            .try_init(),
        LogFormat::Json => registry.with(LogLayer::new(FlatJson, writer)).try_init(),
    };
    result.map_err(|err| anyhow::anyhow!("cannot install the logger: {err}"))
}

/// How events become lines, and how a span's fields are kept in between.
trait LineFormat: Send + Sync + 'static {
    /// A span's fields as kept until it closes.
    type Kept: Send + Sync + 'static;
    fn keep(&self, attrs: &Attributes<'_>) -> Self::Kept;
    /// Adds fields recorded after the span was created.
    fn add(&self, kept: &mut Self::Kept, values: &Record<'_>);
    /// One line, newline included; `spans` from the outermost in.
    fn line(&self, event: &Event<'_>, spans: &[(&'static str, &Self::Kept)]) -> String;
}

/// Writes every event as one line, with the fields of the spans it is in.
struct LogLayer<F: LineFormat, W> {
    format: F,
    writer: W,
    spans: Mutex<HashMap<Id, F::Kept>>,
}

impl<F: LineFormat, W> LogLayer<F, W> {
    fn new(format: F, writer: W) -> Self {
        LogLayer {
            format,
            writer,
            spans: Mutex::new(HashMap::new()),
        }
    }

    fn spans(&self) -> std::sync::MutexGuard<'_, HashMap<Id, F::Kept>> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S, F, W> Layer<S> for LogLayer<F, W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    F: LineFormat,
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        let fields = self.format.keep(attrs);
        self.spans().insert(id.clone(), fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        if let Some(fields) = self.spans().get_mut(id) {
            self.format.add(fields, values);
        }
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        let mut spans = self.spans();
        spans.remove(&id);
        // After a burst the table gives its room back as the spans close.
        if spans.capacity() > 64 && spans.len() * 4 < spans.capacity() {
            let keep = spans.len() * 2;
            spans.shrink_to(keep);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let line = {
            let spans = self.spans();
            let scope: Vec<(&'static str, &F::Kept)> = ctx
                .event_scope(event)
                .into_iter()
                .flat_map(|scope| scope.from_root())
                .filter_map(|span| Some((span.name(), spans.get(&span.id())?)))
                .collect();
            self.format.line(event, &scope)
        };
        let mut writer = self.writer.make_writer_for(event.metadata());
        let _ = writer.write_all(line.as_bytes());
    }
}

fn timestamp() -> impl fmt::Display {
    humantime::format_rfc3339_micros(std::time::SystemTime::now())
}

/// tracing's own text layout: `time LEVEL conn{route=smtp peer=...}: target: message fields`.
struct Text {
    ansi: bool,
}

impl Text {
    fn level(&self, level: &Level) -> String {
        let colour = match *level {
            Level::ERROR => "31",
            Level::WARN => "33",
            Level::INFO => "32",
            Level::DEBUG => "34",
            Level::TRACE => "35",
        };
        if self.ansi {
            format!("\x1b[{colour}m{level:>5}\x1b[0m")
        } else {
            format!("{level:>5}")
        }
    }
}

impl LineFormat for Text {
    type Kept = FormattedFields<DefaultFields>;

    fn keep(&self, attrs: &Attributes<'_>) -> Self::Kept {
        let mut fields = FormattedFields::new(String::new());
        let _ = DefaultFields::new().format_fields(fields.as_writer(), attrs);
        fields
    }

    fn add(&self, kept: &mut Self::Kept, values: &Record<'_>) {
        let _ = DefaultFields::new().add_fields(kept, values);
    }

    fn line(&self, event: &Event<'_>, spans: &[(&'static str, &Self::Kept)]) -> String {
        let meta = event.metadata();
        let mut line = format!("{} {} ", timestamp(), self.level(meta.level()));
        for (name, fields) in spans {
            line.push_str(name);
            if !fields.fields.is_empty() {
                let _ = write!(line, "{{{}}}", fields.fields);
            }
            line.push(':');
        }
        if !spans.is_empty() {
            line.push(' ');
        }
        let _ = write!(line, "{}: ", meta.target());
        let _ = DefaultFields::new().format_fields(Writer::new(&mut line), event);
        line.push('\n');
        line
    }
}

/// One JSON object per event: timestamp, level, the event's fields, the enclosing spans' fields
/// (an event's own field wins over a span's of the same name, an outer span's over an inner
/// one's), and the target; keys in alphabetical order.
///
/// Written straight into the line: a span's fields are kept as JSON text, one value per name,
/// and never parsed again (two events per session made this a visible part of its cost).
struct FlatJson;

/// Fields with their values as JSON text, in one string: `name NUL value NUL` for each, one
/// value per name. Neither part holds a raw NUL (names come from the code; JSON escapes it),
/// and one string per span is the least it can keep while the connection stays open.
#[derive(Default)]
struct JsonFields(String);

impl JsonFields {
    fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut parts = self.0.split_terminator('\0');
        std::iter::from_fn(move || Some((parts.next()?, parts.next()?)))
    }

    /// Starts a field; its value follows (`push_str`), then `end`.
    fn start(&mut self, name: &str) -> &mut String {
        self.0.push_str(name);
        self.0.push('\0');
        &mut self.0
    }

    fn end(&mut self) {
        self.0.push('\0');
    }

    /// Adds `from`'s fields, replacing any of the same name.
    fn merge(&mut self, from: &JsonFields) {
        for (name, value) in from.iter() {
            if self.iter().any(|(have, _)| have == name) {
                let mut kept = JsonFields::default();
                for (other, value) in self.iter().filter(|(other, _)| *other != name) {
                    kept.start(other).push_str(value);
                    kept.end();
                }
                *self = kept;
            }
            self.start(name).push_str(value);
            self.end();
        }
    }
}

impl LineFormat for FlatJson {
    type Kept = JsonFields;

    fn keep(&self, attrs: &Attributes<'_>) -> JsonFields {
        let mut fields = JsonFields::default();
        attrs.record(&mut JsonVisitor(&mut fields));
        fields
    }

    fn add(&self, kept: &mut JsonFields, values: &Record<'_>) {
        let mut added = JsonFields::default();
        values.record(&mut JsonVisitor(&mut added));
        kept.merge(&added);
    }

    fn line(&self, event: &Event<'_>, spans: &[(&'static str, &JsonFields)]) -> String {
        let meta = event.metadata();
        let mut own = JsonFields::default();
        event.record(&mut JsonVisitor(&mut own));
        let target = json_str(meta.target());
        let level = json_str(meta.level().as_str());
        // RFC 3339: nothing in it needs escaping.
        let timestamp = format!("\"{}\"", timestamp());
        // Highest precedence first: the target, the event's own fields (the last of a name),
        // level and timestamp, then the spans' from the outermost in. The sort is stable, so
        // the first of each name is the one kept.
        let mut fields: Vec<(&str, &str)> = vec![("target", &target)];
        fields.extend(own.iter());
        fields[1..].reverse();
        fields.extend([("level", level.as_str()), ("timestamp", timestamp.as_str())]);
        for (_, kept) in spans {
            fields.extend(kept.iter());
        }
        fields.sort_by_key(|(name, _)| *name);
        fields.dedup_by_key(|(name, _)| *name);

        let mut line = String::with_capacity(512);
        for (name, value) in fields {
            line.push(if line.is_empty() { '{' } else { ',' });
            push_json_str(&mut line, name);
            line.push(':');
            line.push_str(value);
        }
        line.push_str("}\n");
        line
    }
}

fn json_str(text: &str) -> String {
    let mut json = String::with_capacity(text.len() + 2);
    push_json_str(&mut json, text);
    json
}

/// Appends `text` as a JSON string, escaped as serde_json escapes it.
fn push_json_str(out: &mut String, text: &str) {
    out.push('"');
    let _ = JsonEscaped(out).write_str(text);
    out.push('"');
}

/// Writes what it is given escaped for the inside of a JSON string.
struct JsonEscaped<'a>(&'a mut String);

impl fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some(at) = rest.find(|c: char| c < ' ' || c == '"' || c == '\\') {
            self.0.push_str(&rest[..at]);
            let c = rest.as_bytes()[at];
            match c {
                b'"' => self.0.push_str("\\\""),
                b'\\' => self.0.push_str("\\\\"),
                b'\n' => self.0.push_str("\\n"),
                b'\r' => self.0.push_str("\\r"),
                b'\t' => self.0.push_str("\\t"),
                0x08 => self.0.push_str("\\b"),
                0x0c => self.0.push_str("\\f"),
                _ => {
                    let _ = write!(self.0, "\\u{:04x}", c);
                }
            }
            rest = &rest[at + 1..];
        }
        self.0.push_str(rest);
        Ok(())
    }
}

/// Collects fields as JSON text: strings escaped, numbers and booleans as they are, anything
/// else by its `Debug` form (the `Display` form for `%` fields and the message) as a string.
struct JsonVisitor<'a>(&'a mut JsonFields);

impl JsonVisitor<'_> {
    fn push(&mut self, field: &Field, value: impl fmt::Display) {
        let _ = write!(self.0.start(field.name()), "{value}");
        self.0.end();
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        push_json_str(self.0.start(field.name()), value);
        self.0.end();
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = self.0.start(field.name());
        text.push('"');
        let _ = write!(JsonEscaped(text), "{value:?}");
        text.push('"');
        self.0.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    fn capture<F: LineFormat>(format: F, work: impl FnOnce()) -> String {
        let captured = Captured::default();
        let subscriber =
            tracing_subscriber::registry().with(LogLayer::new(format, captured.clone()));
        tracing::subscriber::with_default(subscriber, work);
        let text = captured.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    fn session_events() {
        let span = tracing::info_span!("conn", route = "smtp", peer = tracing::field::Empty);
        let _entered = span.enter();
        span.record("peer", "10.0.0.7:5000");
        tracing::warn!(bytes = 12u64, "discarded bytes");
        tracing::info!(route = "event-wins", "own field");
    }

    #[test]
    fn json_events_carry_the_span_fields_flat() {
        let text = capture(FlatJson, session_events);
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["message"], "discarded bytes");
        assert_eq!(lines[0]["bytes"], 12);
        assert_eq!(lines[0]["route"], "smtp");
        assert_eq!(lines[0]["peer"], "10.0.0.7:5000");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["target"], module_path!());
        assert_eq!(lines[1]["route"], "event-wins");
    }

    #[test]
    fn json_lines_are_what_serde_json_writes_with_precedence_kept() {
        let text = capture(FlatJson, || {
            let outer = tracing::info_span!("conn", route = "smtp", peer = tracing::field::Empty);
            let _outer = outer.enter();
            outer.record("peer", "first");
            outer.record("peer", "10.0.0.7:5000");
            // A NUL in a value must not split what the span keeps.
            let inner = tracing::info_span!("leg", route = "inner", leg = "up\0stream");
            let _inner = inner.enter();
            let odd = "quote \" backslash \\ newline \n tab \t bell \x07 del \x7f é ✓";
            tracing::info!(
                odd,
                ratio = 0.5,
                ok = true,
                below = -3i64,
                nan = f64::NAN,
                "a {}",
                1
            );
            tracing::info!(level = "own", timestamp = 7u64, target = "own", "shadowing");
        });
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines {
            let value: Value = serde_json::from_str(line).unwrap();
            // serde_json writes keys in order and escapes as this layer does.
            assert_eq!(value.to_string(), *line);
        }
        let first: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["route"], "smtp", "the outer span's field wins");
        assert_eq!(first["peer"], "10.0.0.7:5000", "recorded twice: the last");
        assert_eq!(first["leg"], "up\0stream");
        assert!(first["odd"]
            .as_str()
            .unwrap()
            .ends_with("\x07 del \x7f é ✓"));
        assert_eq!(
            (
                &first["ratio"],
                &first["ok"],
                &first["below"],
                &first["nan"]
            ),
            (
                &Value::from(0.5),
                &Value::from(true),
                &Value::from(-3),
                &Value::Null
            )
        );
        assert_eq!(first["message"], "a 1");
        let second: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(
            (&second["level"], &second["timestamp"]),
            (&"own".into(), &7.into())
        );
        assert_eq!(
            second["target"],
            module_path!(),
            "the target is never shadowed"
        );
    }

    #[test]
    fn text_events_name_their_span_and_its_fields() {
        let text = capture(Text { ansi: false }, session_events);
        let first = text.lines().next().unwrap();
        let expected = format!(
            " WARN conn{{route=\"smtp\" peer=\"10.0.0.7:5000\"}}: {}: discarded bytes bytes=12",
            module_path!()
        );
        assert!(first.ends_with(&expected), "{first}");
        assert!(
            !text.contains('\x1b'),
            "no colour without a terminal: {text}"
        );
        let outside = capture(Text { ansi: false }, || tracing::error!("alone"));
        assert!(
            outside.ends_with(&format!("ERROR {}: alone\n", module_path!())),
            "{outside}"
        );
    }

    #[test]
    fn a_closed_span_leaves_nothing_behind() {
        type Json = LogLayer<FlatJson, Captured>;
        fn table<T>(look: impl Fn(&HashMap<Id, JsonFields>) -> T) -> T {
            tracing::dispatcher::get_default(|dispatch| {
                look(&dispatch.downcast_ref::<Json>().unwrap().spans())
            })
        }
        let layer = LogLayer::new(FlatJson, Captured::default());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let open: Vec<_> = (0..1000)
                .map(|i| tracing::info_span!("conn", n = i))
                .collect();
            assert_eq!(table(HashMap::len), 1000);
            drop(open);
            assert_eq!(table(HashMap::len), 0);
            let room = table(HashMap::capacity);
            assert!(room <= 64, "the table gave its room back: {room}");
        });
    }
}
