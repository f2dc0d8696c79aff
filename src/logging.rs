//! Log output: human-readable text, or one flat JSON object per event that also carries the
//! fields of the connection's span (`route`, `peer`, ...), so every event of a session can be
//! traced to its device.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
pub fn init(level: &str, format: LogFormat) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    init_with(
        level,
        format,
        std::io::stdout().is_terminal(),
        std::io::stdout,
    )
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .try_init(),
    };
    result.map_err(|err| anyhow::anyhow!("cannot install the logger: {err}"))
}

/// One JSON object per event: timestamp, level, the event's fields, the enclosing spans' fields
/// (an event's own field wins over a span's of the same name), and the target.
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut object = Map::new();
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        object.insert("timestamp".into(), now.to_string().into());
        object.insert("level".into(), event.metadata().level().as_str().into());
        event.record(&mut JsonVisitor(&mut object));
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                // JsonFields keeps a span's fields as a JSON object.
                if let Ok(Value::Object(span_fields)) = serde_json::from_str(fields) {
                    for (key, value) in span_fields {
                        object.entry(key).or_insert(value);
                    }
                }
            }
        }
        object.insert("target".into(), event.metadata().target().into());
        writeln!(writer, "{}", Value::Object(object))
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
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

    #[test]
    fn json_events_carry_the_span_fields_flat() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", route = "smtp", peer = tracing::field::Empty);
            let _entered = span.enter();
            span.record("peer", "10.0.0.7:5000");
            tracing::warn!(bytes = 12u64, "discarded bytes");
            tracing::info!(route = "event-wins", "own field");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["message"], "discarded bytes");
        assert_eq!(lines[0]["bytes"], 12);
        assert_eq!(lines[0]["route"], "smtp");
        assert_eq!(lines[0]["peer"], "10.0.0.7:5000");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[1]["route"], "event-wins");
    }
}
