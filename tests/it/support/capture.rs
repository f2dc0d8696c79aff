//! Keeps every in-process audit event (`legacy_client`, `session_closed`), so a test can check
//! a session's `outcome` and `sni`. Installed by [`super::init_logging`] beside the test output, since a
//! process has one global subscriber.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tracing_subscriber::Layer;

/// How long a test waits for the proxy's `session_closed` event of a finished session.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `session_closed` events seen so far, each as its fields (values as logged).
fn events() -> &'static Mutex<Vec<HashMap<String, String>>> {
    static EVENTS: OnceLock<Mutex<Vec<HashMap<String, String>>>> = OnceLock::new();
    EVENTS.get_or_init(|| Mutex::new(Vec::new()))
}

fn new_event() -> &'static Notify {
    static NOTIFY: OnceLock<Notify> = OnceLock::new();
    NOTIFY.get_or_init(Notify::new)
}

/// Collects an event's fields: strings as they are, everything else as logged.
struct Fields(HashMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

/// Keeps every `session_closed` event of target `tlsbridge::audit`.
pub struct Capture;

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target() != "tlsbridge::audit" {
            return;
        }
        let mut fields = Fields(HashMap::new());
        event.record(&mut fields);
        if let Ok(mut list) = events().lock() {
            list.push(fields.0);
        }
        new_event().notify_waiters();
    }
}

/// The audit events `name` (`session_closed`, `legacy_client`) of `route` seen so far.
pub fn audit(name: &str, route: &str) -> Vec<HashMap<String, String>> {
    let list = events().lock().unwrap_or_else(|p| p.into_inner());
    list.iter()
        .filter(|e| {
            e.get("event").map(String::as_str) == Some(name)
                && e.get("route").map(String::as_str) == Some(route)
        })
        .cloned()
        .collect()
}

/// Waits (at most [`AUDIT_TIMEOUT`]) for the `session_closed` event of the device at `peer` on
/// `route`. Both must match: devices of different routes may share a port.
pub async fn session_closed(route: &str, peer: std::net::SocketAddr) -> HashMap<String, String> {
    let deadline = tokio::time::Instant::now() + AUDIT_TIMEOUT;
    let peer = peer.to_string();
    loop {
        let notified = new_event().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let found = events().lock().ok().and_then(|list| {
            list.iter()
                .find(|e| {
                    e.get("event").map(String::as_str) == Some("session_closed")
                        && e.get("peer") == Some(&peer)
                        && e.get("route").map(String::as_str) == Some(route)
                })
                .cloned()
        });
        if let Some(event) = found {
            return event;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            panic!(
                "no session_closed event for peer {peer} on route {route} within {AUDIT_TIMEOUT:?}"
            );
        }
    }
}
