//! The downgrade log: one `legacy_client` event when a device leg turns out weaker than the
//! upstream leg, and one `session_closed` event for every connection. Both go to the target
//! `tlsbridge::audit` with flat fields (see the README for the contract). The same facts feed
//! the metrics and the inventory.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn, Span};

use crate::config::{Protocol, Route};
use crate::inventory::{Inventory, Sighting};
use crate::metrics::Metrics;
use crate::tls::legacy::DeviceTls;
use crate::upstream::UpstreamLeg;

/// The tracing target of audit events, for filters such as `RUST_LOG=tlsbridge::audit=info`.
pub const TARGET: &str = "tlsbridge::audit";

/// Where audit facts go besides the log.
pub struct Sinks {
    pub metrics: Metrics,
    pub inventory: Inventory,
    refusals: RateLimit,
}

impl Sinks {
    pub fn new(inventory: Inventory) -> Sinks {
        Sinks {
            metrics: Metrics::default(),
            inventory,
            refusals: RateLimit::new(10),
        }
    }

    /// A connection refused before any dialog: counted always, logged at a bounded rate so a
    /// flood cannot flood the log too.
    pub fn refused(&self, route: &Route, peer: SocketAddr, outcome: &str, why: &str) {
        self.metrics.refused(&route.name, outcome);
        match self.refusals.allow() {
            Allowed::Yes { suppressed } => {
                if suppressed > 0 {
                    warn!(target: TARGET, suppressed, "refused connections not logged one by one in the last second");
                }
                let record = SessionRecord::unopened(route, peer);
                record.log_closed(0, 0, outcome, Some(why));
            }
            Allowed::No => {}
        }
    }
}

/// What is known about one connection, filled in phase by phase.
pub struct SessionRecord {
    pub route: String,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    pub upstream: String,
    /// `SSLv3`/`TLSv1`/.../`plain`, or empty until the device leg is established.
    pub device_tls: &'static str,
    pub cipher: String,
    pub sni: String,
    /// The SMTP EHLO/HELO name the device sent before STARTTLS.
    pub client_name: Option<String>,
    pub upstream_tls: &'static str,
    pub upstream_cipher: String,
    pub downgraded: bool,
    started: Instant,
    sinks: Option<Arc<Sinks>>,
}

impl SessionRecord {
    /// Starts the record of an admitted connection (counted as active until `closed`).
    pub fn open(route: &Route, peer: SocketAddr, sinks: Arc<Sinks>) -> SessionRecord {
        sinks.metrics.opened(&route.name);
        SessionRecord {
            sinks: Some(sinks),
            ..SessionRecord::unopened(route, peer)
        }
    }

    fn unopened(route: &Route, peer: SocketAddr) -> SessionRecord {
        SessionRecord {
            route: route.name.clone(),
            peer,
            protocol: route.protocol,
            upstream: route.upstream.to_string(),
            device_tls: "",
            cipher: String::new(),
            sni: String::new(),
            client_name: None,
            upstream_tls: "",
            upstream_cipher: String::new(),
            downgraded: false,
            started: Instant::now(),
            sinks: None,
        }
    }

    /// Records the device leg (`None`: plaintext) and logs `legacy_client` when it was weaker
    /// than TLS 1.2 with forward secrecy.
    pub fn device_established(&mut self, tls: Option<&DeviceTls>) {
        match tls {
            Some(tls) => {
                self.device_tls = tls.version;
                self.cipher = tls.cipher.clone();
                self.sni = tls.sni.clone().unwrap_or_default();
                self.downgraded = tls.downgraded();
            }
            None => {
                self.device_tls = "plain";
                self.downgraded = true;
            }
        }
        let span = Span::current();
        span.record("device_tls", self.device_tls);
        span.record("cipher", self.cipher.as_str());
        if let Some(sinks) = &self.sinks {
            sinks.metrics.connection(&self.route, self.device_tls);
            if let Some(tls) = tls {
                sinks
                    .metrics
                    .handshake_took(&self.route, "device", tls.handshake);
            }
            if self.downgraded {
                sinks.inventory.record(&Sighting {
                    ip: self.peer.ip(),
                    route: &self.route,
                    version: self.device_tls,
                    cipher: &self.cipher,
                    sni: &self.sni,
                    ehlo: self.client_name.as_deref(),
                });
            }
        }
        if self.downgraded {
            info!(
                target: TARGET,
                event = "legacy_client",
                route = %self.route,
                peer = %self.peer,
                device_tls = self.device_tls,
                cipher = %self.cipher,
                sni = %self.sni,
                protocol = %self.protocol,
                upstream = %self.upstream,
                client_name = self.client_name.as_deref().unwrap_or(""),
                "legacy_client"
            );
        }
    }

    /// A device on implicit TLS or plaintext says EHLO inside the relay: its name (which
    /// usually names the model) still belongs in the inventory.
    pub fn first_device_command(&mut self, head: &[u8]) {
        if self.protocol != Protocol::Smtp || self.client_name.is_some() || !self.downgraded {
            return;
        }
        let Some(name) = crate::protocol::smtp::client_name(head) else {
            return;
        };
        if let Some(sinks) = &self.sinks {
            sinks.inventory.set_ehlo(self.peer.ip(), &name);
        }
        self.client_name = Some(name);
    }

    pub fn upstream_established(&mut self, leg: &UpstreamLeg) {
        self.upstream_tls = leg.tls_version;
        self.upstream_cipher = leg.cipher.clone();
        Span::current().record("upstream_tls", self.upstream_tls);
        if let Some(sinks) = &self.sinks {
            sinks
                .metrics
                .handshake_took(&self.route, "upstream", leg.handshake);
        }
    }

    /// A leg that failed to come up, for `tlsbridge_handshake_failures_total`.
    pub fn leg_failed(&self, leg: &str, reason: &str) {
        if let Some(sinks) = &self.sinks {
            sinks.metrics.handshake_failed(&self.route, leg, reason);
        }
    }

    /// Ends the record: logs `session_closed`; `error` carries the full cause when the outcome
    /// is not `ok`.
    pub fn closed(self, bytes_up: u64, bytes_down: u64, outcome: &str, error: Option<&str>) {
        if let Some(sinks) = &self.sinks {
            sinks.metrics.closed(&self.route, bytes_up, bytes_down);
        }
        self.log_closed(bytes_up, bytes_down, outcome, error);
    }

    fn log_closed(&self, bytes_up: u64, bytes_down: u64, outcome: &str, error: Option<&str>) {
        info!(
            target: TARGET,
            event = "session_closed",
            route = %self.route,
            peer = %self.peer,
            device_tls = self.device_tls,
            cipher = %self.cipher,
            sni = %self.sni,
            protocol = %self.protocol,
            upstream = %self.upstream,
            upstream_tls = self.upstream_tls,
            upstream_cipher = %self.upstream_cipher,
            bytes_up,
            bytes_down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            outcome,
            error = error.unwrap_or(""),
            "session_closed"
        );
    }
}

/// At most `per_second` events a second; counts the rest.
struct RateLimit {
    per_second: u64,
    epoch: Instant,
    /// (second since epoch << 32) | events in that second
    window: AtomicU64,
    suppressed: AtomicU64,
}

enum Allowed {
    Yes { suppressed: u64 },
    No,
}

impl RateLimit {
    fn new(per_second: u64) -> RateLimit {
        RateLimit {
            per_second,
            epoch: Instant::now(),
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    fn allow(&self) -> Allowed {
        let second = self.epoch.elapsed().as_secs();
        let update = self
            .window
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                let (s, n) = (w >> 32, w & 0xffff_ffff);
                if s != second {
                    Some(second << 32 | 1)
                } else if n < self.per_second {
                    Some(w + 1)
                } else {
                    None
                }
            });
        match update {
            Ok(_) => Allowed::Yes {
                suppressed: self.suppressed.swap(0, Ordering::Relaxed),
            },
            Err(_) => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                Allowed::No
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_what_it_suppresses() {
        let limit = RateLimit::new(3);
        let allowed = (0..10)
            .filter(|_| matches!(limit.allow(), Allowed::Yes { .. }))
            .count();
        assert!((3..10).contains(&allowed), "{allowed}");
        assert!(limit.suppressed.load(Ordering::Relaxed) > 0);
    }
}
