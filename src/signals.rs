//! Process signals: SIGTERM/SIGINT start a graceful shutdown (a second one exits at once);
//! SIGHUP reloads the certificate files.

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// Resolves at the first SIGTERM or SIGINT; afterwards, a second one ends the process at once.
pub async fn shutdown() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
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
        std::process::exit(1);
    });
}

/// Reloads the device certificate and the upstream roots at every SIGHUP.
pub fn reload_on_hangup(shared: Arc<crate::server::Shared>) {
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
