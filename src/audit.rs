//! The downgrade log: one `legacy_client` event when a device leg turns out weaker than the
//! upstream leg, and one `session_closed` event for every connection. Both go to the target
//! `tlsbridge::audit` with flat fields (see the README for the contract). The same facts feed
//! the metrics and the inventory.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tracing::{info, warn, Span};

use crate::config::{Protocol, Route};
use crate::inventory::{Inventory, Sighting};
use crate::metrics::{Metrics, RouteMetrics};
use crate::outcome::{Leg, Outcome, Refusal};
use crate::tls::legacy::DeviceTls;
use crate::tls::modern::UpstreamTls;

/// The tracing target of audit events, for filters such as `RUST_LOG=tlsbridge::audit=info`.
pub const TARGET: &str = "tlsbridge::audit";

/// Refused connections logged one by one per second; the rest are counted and summarised.
const REFUSALS_LOGGED_PER_SECOND: u64 = 10;

/// Where audit facts go besides the log.
pub struct Sinks {
    pub metrics: Metrics,
    pub inventory: Inventory,
    refusals: RateLimit,
    /// `admin.per_device_metrics`: `None` means on while the inventory is small.
    per_device_metrics: Option<bool>,
}

impl Sinks {
    pub fn new(inventory: Inventory, per_device_metrics: Option<bool>) -> Sinks {
        Sinks {
            metrics: Metrics::default(),
            inventory,
            refusals: RateLimit::new(REFUSALS_LOGGED_PER_SECOND),
            per_device_metrics,
        }
    }

    /// The Prometheus exposition, with the per-device series when they are switched on.
    pub fn metrics_text(&self) -> String {
        let devices = self.inventory.len();
        self.metrics.set_legacy_clients(devices);
        let per_device = self
            .per_device_metrics
            .unwrap_or(devices < crate::metrics::PER_DEVICE_AUTO_LIMIT);
        match per_device {
            true => self.metrics.render(Some(&self.inventory.snapshot())),
            false => self.metrics.render(None),
        }
    }

    /// A connection refused before any dialog: counted always, logged at a bounded rate so a
    /// flood cannot flood the log too.
    pub fn refused(
        &self,
        route: &Route,
        metrics: &RouteMetrics,
        peer: SocketAddr,
        refusal: Refusal,
        why: &str,
    ) {
        metrics.refused(refusal.label());
        match self.refusals.allow() {
            Allowed::Yes { suppressed } => {
                if suppressed > 0 {
                    warn!(target: TARGET, suppressed, "refused connections not logged one by one in the last second");
                }
                let record = SessionRecord::unopened(route, peer, metrics, self);
                record.log_closed(0, 0, Outcome::Refused(refusal), why);
            }
            Allowed::No => {}
        }
    }
}

/// What is known about one connection, filled in phase by phase.
pub struct SessionRecord<'a> {
    pub route: &'a str,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    pub upstream: String,
    /// `SSLv3`/`TLSv1`/.../`plain`, or empty until the device leg is established.
    pub device_tls: &'static str,
    pub cipher: String,
    pub sni: String,
    /// The SMTP EHLO/HELO name the device sent.
    pub client_name: Option<String>,
    pub upstream_tls: &'static str,
    pub upstream_cipher: String,
    pub downgraded: bool,
    /// `passthrough` or `xoauth2`: who does the device's login.
    pub auth: &'static str,
    /// xoauth2: the device user that logged in (never its password).
    pub device_user: Option<String>,
    /// xoauth2: the mailbox logged in as upstream.
    pub mailbox: Option<String>,
    started: Instant,
    metrics: &'a RouteMetrics,
    sinks: &'a Sinks,
    /// Counted as active until `closed`.
    opened: bool,
}

impl<'a> SessionRecord<'a> {
    /// Starts the record of an admitted connection (counted as active until `closed`).
    pub fn open(
        route: &'a Route,
        peer: SocketAddr,
        metrics: &'a RouteMetrics,
        sinks: &'a Sinks,
    ) -> SessionRecord<'a> {
        metrics.opened();
        SessionRecord {
            opened: true,
            ..SessionRecord::unopened(route, peer, metrics, sinks)
        }
    }

    fn unopened(
        route: &'a Route,
        peer: SocketAddr,
        metrics: &'a RouteMetrics,
        sinks: &'a Sinks,
    ) -> SessionRecord<'a> {
        SessionRecord {
            route: &route.name,
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
            auth: route.auth.as_str(),
            device_user: None,
            mailbox: None,
            started: Instant::now(),
            metrics,
            sinks,
            opened: false,
        }
    }

    /// Records the device leg (`None`: plaintext) and logs `legacy_client` when it was weaker
    /// than TLS 1.2 with forward secrecy.
    pub fn device_established(&mut self, tls: Option<&DeviceTls>) {
        match tls {
            Some(tls) => {
                self.device_tls = tls.version;
                self.cipher = tls.cipher.clone();
                self.sni = tls
                    .sni
                    .as_deref()
                    .map(crate::text::printable)
                    .unwrap_or_default();
                self.downgraded = tls.downgraded();
                self.metrics.handshake_took(Leg::Device, tls.handshake);
            }
            None => {
                self.device_tls = "plain";
                self.downgraded = true;
            }
        }
        let span = Span::current();
        span.record("device_tls", self.device_tls);
        span.record("cipher", self.cipher.as_str());
        self.metrics.connection(self.device_tls);
        if !self.downgraded {
            return;
        }
        self.sinks.inventory.record(&Sighting {
            ip: self.peer.ip(),
            route: self.route,
            version: self.device_tls,
            cipher: &self.cipher,
            sni: &self.sni,
            ehlo: self.client_name.as_deref(),
        });
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

    /// A device on implicit TLS or plaintext says EHLO inside the relay: its name (which
    /// usually names the model) still belongs in the inventory.
    pub fn learned_client_name(&mut self, name: String) {
        if self.client_name.is_some() {
            return;
        }
        if self.downgraded {
            self.sinks.inventory.set_ehlo(self.peer.ip(), &name);
        }
        self.client_name = Some(name);
    }

    pub fn upstream_established(&mut self, tls: &UpstreamTls) {
        self.upstream_tls = tls.version;
        self.upstream_cipher = tls.cipher.to_string();
        Span::current().record("upstream_tls", self.upstream_tls);
        self.metrics.handshake_took(Leg::Upstream, tls.handshake);
        if let Some(not_after) = tls.certificate_expiry {
            self.metrics.certificate_expires(not_after);
        }
    }

    /// Ends the record: counts a leg that failed to come up, logs `session_closed`; `detail`
    /// carries the full cause when the outcome is not `ok`.
    pub fn closed(self, bytes_up: u64, bytes_down: u64, outcome: Outcome, detail: &str) {
        if let Some((leg, reason)) = outcome.failed_leg() {
            self.metrics.handshake_failed(leg, reason);
        }
        if self.opened {
            self.metrics.closed(bytes_up, bytes_down);
        }
        self.log_closed(bytes_up, bytes_down, outcome, detail);
    }

    fn log_closed(&self, bytes_up: u64, bytes_down: u64, outcome: Outcome, detail: &str) {
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
            outcome = outcome.label(),
            error = detail,
            auth = self.auth,
            device_user = self.device_user.as_deref().unwrap_or(""),
            mailbox = self.mailbox.as_deref().unwrap_or(""),
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
