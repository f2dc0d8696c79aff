//! Process signals: SIGTERM/SIGINT start a graceful shutdown (a second one exits at once);
//! SIGHUP reloads the certificate files.

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// Installs the SIGTERM/SIGINT handlers now (so a signal right after start is never fatal) and
/// returns a future that resolves at the first one; afterwards, a second one ends the process.
pub fn shutdown() -> impl std::future::Future<Output = ()> {
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            error!("cannot install signal handlers; stop the process with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => info!(signal = "SIGINT", "shutting down"),
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            warn!("second signal: exiting now");
            crate::logging::flush();
            std::process::exit(1);
        });
    }
}

/// Reloads the device certificate and the upstream roots at every SIGHUP.
pub fn reload_on_hangup(shared: Arc<crate::context::Shared>) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        error!("cannot install the SIGHUP handler; reload needs a restart");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!(signal = "SIGHUP", "reloading certificates");
            shared.reload();
        }
    });
}
