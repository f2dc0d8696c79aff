//! Prometheus metrics as typed `prometheus-client` families, exposed in the Prometheus text
//! format. Each route resolves its handles once (`RouteMetrics`), so a session's hot path only
//! touches atomics; families with a free-form reason are looked up on failures only.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::outcome::Leg;

/// The content type of `render`'s output: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Upper bounds of the handshake duration histograms, in seconds.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The device TLS versions a route counts connections for; anything else is counted as it is.
const DEVICE_TLS: [&str; 6] = ["SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "plain"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteTls {
    route: String,
    device_tls: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteReason {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLegReason {
    route: String,
    leg: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteDirection {
    route: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLeg {
    route: String,
    leg: &'static str,
}

#[derive(Clone)]
struct HandshakeBuckets;

impl MetricConstructor<Histogram> for HandshakeBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(BUCKETS)
    }
}

/// Every metric tlsbridge exports.
pub struct Metrics {
    registry: Registry,
    connections: Family<RouteTls, Counter>,
    active: Family<RouteLabel, Gauge>,
    refused: Family<RouteReason, Counter>,
    handshake_failures: Family<RouteLegReason, Counter>,
    bytes: Family<RouteDirection, Counter>,
    handshakes: Family<RouteLeg, Histogram, HandshakeBuckets>,
    legacy_clients: Gauge,
    basic_auth_disabled: Family<RouteLabel, Counter>,
}

/// One route's handles, resolved when the route is set up.
pub struct RouteMetrics {
    route: String,
    active: Gauge,
    bytes_up: Counter,
    bytes_down: Counter,
    device_handshake: Histogram,
    upstream_handshake: Histogram,
    /// Linked into the family on first use, so only versions really seen are exported.
    connections: [OnceLock<Counter>; DEVICE_TLS.len()],
    families: Families,
}

/// The families a route still looks up by label (failures, refusals, rare versions).
#[derive(Clone)]
struct Families {
    connections: Family<RouteTls, Counter>,
    refused: Family<RouteReason, Counter>,
    handshake_failures: Family<RouteLegReason, Counter>,
    basic_auth_disabled: Family<RouteLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let connections = Family::<RouteTls, Counter>::default();
        registry.register(
            "tlsbridge_connections",
            "Connections whose device leg was established, by route and device TLS version",
            connections.clone(),
        );
        let active = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "tlsbridge_active_connections",
            "Connections open now, by route",
            active.clone(),
        );
        let refused = Family::<RouteReason, Counter>::default();
        registry.register(
            "tlsbridge_refused_connections",
            "Connections refused before any dialog (acl, limit, proxy_protocol), by route and reason",
            refused.clone(),
        );
        let handshake_failures = Family::<RouteLegReason, Counter>::default();
        registry.register(
            "tlsbridge_handshake_failures",
            "Failed legs, by route, leg (device|upstream) and reason",
            handshake_failures.clone(),
        );
        let bytes = Family::<RouteDirection, Counter>::default();
        registry.register(
            "tlsbridge_bytes",
            "Payload bytes relayed, by route and direction (up: device to upstream)",
            bytes.clone(),
        );
        let legacy_clients = Gauge::default();
        registry.register(
            "tlsbridge_legacy_clients",
            "Distinct device addresses seen with a downgraded leg (the inventory)",
            legacy_clients.clone(),
        );
        let basic_auth_disabled = Family::<RouteLabel, Counter>::default();
        registry.register(
            "tlsbridge_upstream_basic_auth_disabled",
            "Passthrough sessions whose login the upstream refused because Basic auth is disabled, by route",
            basic_auth_disabled.clone(),
        );
        let handshakes = Family::new_with_constructor(HandshakeBuckets);
        registry.register(
            "tlsbridge_handshake_duration_seconds",
            "TLS handshake duration, by route and leg",
            handshakes.clone(),
        );
        let start = Gauge::<f64, AtomicU64>::default();
        start.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            start,
        );
        Metrics {
            registry,
            connections,
            active,
            refused,
            handshake_failures,
            bytes,
            handshakes,
            legacy_clients,
            basic_auth_disabled,
        }
    }
}

impl Metrics {
    /// Resolves a route's handles; its active gauge and byte counters show from the start.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let name = route.to_string();
        let direction = |direction| RouteDirection {
            route: name.clone(),
            direction,
        };
        let leg = |leg: Leg| RouteLeg {
            route: name.clone(),
            leg: leg.as_str(),
        };
        RouteMetrics {
            active: self.active.get_or_create_owned(&RouteLabel {
                route: name.clone(),
            }),
            bytes_up: self.bytes.get_or_create_owned(&direction("up")),
            bytes_down: self.bytes.get_or_create_owned(&direction("down")),
            device_handshake: self.handshakes.get_or_create_owned(&leg(Leg::Device)),
            upstream_handshake: self.handshakes.get_or_create_owned(&leg(Leg::Upstream)),
            connections: Default::default(),
            families: Families {
                connections: self.connections.clone(),
                refused: self.refused.clone(),
                handshake_failures: self.handshake_failures.clone(),
                basic_auth_disabled: self.basic_auth_disabled.clone(),
            },
            route: name,
        }
    }

    pub fn set_legacy_clients(&self, count: usize) {
        self.legacy_clients.set(count as i64);
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

impl RouteMetrics {
    /// A passthrough login the upstream refused because Basic auth is disabled.
    pub fn basic_auth_disabled(&self) {
        self.families
            .basic_auth_disabled
            .get_or_create(&RouteLabel {
                route: self.route.clone(),
            })
            .inc();
    }

    pub fn opened(&self) {
        self.active.inc();
    }

    pub fn closed(&self, bytes_up: u64, bytes_down: u64) {
        self.active.dec();
        self.bytes_up.inc_by(bytes_up);
        self.bytes_down.inc_by(bytes_down);
    }

    /// A device leg established with `device_tls` (a TLS version or `plain`).
    pub fn connection(&self, device_tls: &str) {
        let labels = || RouteTls {
            route: self.route.clone(),
            device_tls: device_tls.to_string(),
        };
        match DEVICE_TLS.iter().position(|v| *v == device_tls) {
            Some(i) => self.connections[i]
                .get_or_init(|| self.families.connections.get_or_create_owned(&labels()))
                .inc(),
            None => self.families.connections.get_or_create(&labels()).inc(),
        };
    }

    pub fn refused(&self, reason: &'static str) {
        let labels = RouteReason {
            route: self.route.clone(),
            reason,
        };
        self.families.refused.get_or_create(&labels).inc();
    }

    pub fn handshake_failed(&self, leg: Leg, reason: &'static str) {
        let labels = RouteLegReason {
            route: self.route.clone(),
            leg: leg.as_str(),
            reason,
        };
        self.families
            .handshake_failures
            .get_or_create(&labels)
            .inc();
    }

    pub fn handshake_took(&self, leg: Leg, took: Duration) {
        let histogram = match leg {
            Leg::Device => &self.device_handshake,
            Leg::Upstream => &self.upstream_handshake,
        };
        histogram.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        let r = m.route("smtp");
        r.opened();
        r.connection("TLSv1");
        r.connection("TLSv1");
        r.handshake_took(Leg::Device, Duration::from_millis(20));
        r.handshake_failed(Leg::Upstream, "certificate_invalid");
        r.closed(10, 20);
        let text = m.render();
        for line in [
            "tlsbridge_connections_total{route=\"smtp\",device_tls=\"TLSv1\"} 2",
            "tlsbridge_active_connections{route=\"smtp\"} 0",
            "tlsbridge_bytes_total{route=\"smtp\",direction=\"down\"} 20",
            "tlsbridge_handshake_failures_total{route=\"smtp\",leg=\"upstream\",reason=\"certificate_invalid\"} 1",
            "tlsbridge_handshake_duration_seconds_bucket{route=\"smtp\",leg=\"device\",le=\"0.01\"} 0",
            "tlsbridge_handshake_duration_seconds_bucket{route=\"smtp\",leg=\"device\",le=\"0.025\"} 1",
            "tlsbridge_handshake_duration_seconds_count{route=\"smtp\",leg=\"device\"} 1",
            "tlsbridge_legacy_clients 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
