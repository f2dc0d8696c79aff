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
pub mod upstream;

/// Installs the tracing subscriber (once per process): the proxy's log in the test's captured
/// output, so a failing test shows it, and the [`capture`] of `session_closed` audit events.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let output = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tlsbridge=debug")),
        );
    let audit = capture::Capture.with_filter(
        tracing_subscriber::filter::Targets::new()
            .with_target("tlsbridge::audit", tracing::Level::INFO),
    );
    let _ = tracing_subscriber::registry()
        .with(output)
        .with(audit)
        .try_init();
}
