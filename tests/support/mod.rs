//! Shared helpers for the integration tests: a test CA, a fake Microsoft 365, a legacy device
//! client and a harness that runs tlsbridge in-process. Each test binary uses a different subset,
//! hence the `dead_code` allowances.

#![allow(dead_code)]

pub mod ca;
pub mod device;
pub mod lines;
pub mod ops;
pub mod peers;
pub mod proxy;
pub mod upstream;

/// Installs a tracing subscriber writing to the test's captured output (once per binary), so a
/// failing test shows the proxy's log.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tlsbridge=debug")),
        )
        .with_test_writer()
        .try_init();
}
