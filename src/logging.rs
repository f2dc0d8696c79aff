//! Log output: human-readable text or one flat JSON object per event.

use tracing_subscriber::fmt::MakeWriter;
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
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|err| anyhow::anyhow!("cannot install the logger: {err}"))
}
