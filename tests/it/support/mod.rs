//! Shared helpers for the integration tests: a test CA (`ca`), a fake Microsoft 365
//! (`upstream`), legacy device clients (`device`, `lines`), tlsbridge in-process from a test
//! configuration (`proxy`), the real binary, its admin endpoint and metrics (`ops`), outside
//! programs as peers (`peers`), and the audit events of in-process sessions (`capture`).

pub mod ca;
pub mod capture;
pub mod device;
pub mod lines;
pub mod ops;
pub mod peers;
pub mod proxy;
pub mod scripted;
pub mod upstream;

/// Installs the tracing subscriber (once per process): the proxy's log in the test's captured
/// output, so a failing test shows it, and the [`capture`] of `session_closed` audit events.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    // No colours: span fields are formatted once and shared by both text layers.
    let output = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_test_writer()
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tlsbridge=debug")),
        );
    let audit = capture::Capture.with_filter(
        tracing_subscriber::filter::Targets::new()
            .with_target("tlsbridge::audit", tracing::Level::INFO),
    );
    // The same log as plain text in memory, for tests that search what was logged.
    let memory = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(|| MemoryLog)
        .with_filter(tracing_subscriber::EnvFilter::new("tlsbridge=debug"));
    // And as JSON, for tests that look for a field's exact value.
    let json = tracing_subscriber::fmt::layer()
        .json()
        .with_writer(|| JsonLog)
        .with_filter(tracing_subscriber::EnvFilter::new("tlsbridge=debug"));
    let _ = tracing_subscriber::registry()
        .with(output)
        .with(audit)
        .with(memory)
        .with(json)
        .try_init();
}

type Buffer = std::sync::Mutex<Vec<u8>>;

fn text_log() -> &'static Buffer {
    static LOG: std::sync::OnceLock<Buffer> = std::sync::OnceLock::new();
    LOG.get_or_init(Default::default)
}

fn json_log() -> &'static Buffer {
    static LOG: std::sync::OnceLock<Buffer> = std::sync::OnceLock::new();
    LOG.get_or_init(Default::default)
}

fn append(buffer: &Buffer, bytes: &[u8]) -> std::io::Result<usize> {
    buffer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend_from_slice(bytes);
    Ok(bytes.len())
}

fn contents(buffer: &Buffer) -> String {
    let log = buffer.lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&log).into_owned()
}

struct MemoryLog;

impl std::io::Write for MemoryLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        append(text_log(), buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct JsonLog;

impl std::io::Write for JsonLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        append(json_log(), buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything in-process proxies have logged so far (all tests of this binary), as text.
pub fn log_text() -> String {
    contents(text_log())
}

/// The same log as JSON lines (tracing's own JSON format, span fields under `span`).
pub fn json_log_text() -> String {
    contents(json_log())
}
