//! Prometheus metrics as typed `prometheus-client` families, exposed in the Prometheus text
//! format. Each route resolves its handles once (`RouteMetrics`), so a session's hot path only
//! touches atomics; families with a free-form reason are looked up on failures only.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::inventory::Client;
use crate::outcome::Leg;

/// Per-device series are on by default while the inventory holds fewer devices than this
/// (`admin.per_device_metrics` unset); beyond it they would burden Prometheus.
pub const PER_DEVICE_AUTO_LIMIT: usize = 2_000;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    address: String,
    client_name: String,
    device_tls: String,
    route: String,
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
    certificate_expiry: Family<RouteLabel, Gauge>,
    /// What the dashboard shows per route, in route order.
    routes: Mutex<Vec<Arc<RouteRecent>>>,
}

/// The window of "upstream failures in the last hour", in one-minute buckets.
const RECENT_MINUTES: u64 = 60;

/// A route's recent state for the dashboard: counters cannot tell "the last hour" by themselves.
struct RouteRecent {
    route: String,
    active: Gauge,
    certificate_expiry: Gauge,
    /// (minute since the epoch, reason, failures), oldest first; bounded by the window and the
    /// number of distinct reasons.
    failures: Mutex<VecDeque<(u64, &'static str, u64)>>,
}

/// A route as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSnapshot {
    pub route: String,
    pub active_sessions: u64,
    pub upstream_failures_last_hour: BTreeMap<String, u64>,
    /// notAfter of the upstream certificate (Unix seconds) as the last session saw it.
    pub certificate_expiry: Option<i64>,
}

fn minute_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 60
}

impl RouteRecent {
    fn failed(&self, reason: &'static str) {
        let minute = minute_now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        while failures
            .front()
            .is_some_and(|(m, _, _)| m + RECENT_MINUTES <= minute)
        {
            failures.pop_front();
        }
        match failures
            .iter_mut()
            .rev()
            .take_while(|(m, _, _)| *m == minute)
            .find(|(_, r, _)| *r == reason)
        {
            Some((_, _, count)) => *count += 1,
            None => failures.push_back((minute, reason, 1)),
        }
    }

    fn snapshot(&self) -> RouteSnapshot {
        let since = minute_now().saturating_sub(RECENT_MINUTES - 1);
        let mut by_reason = BTreeMap::new();
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for (_, reason, count) in failures.iter().filter(|(m, _, _)| *m >= since) {
            *by_reason.entry(reason.to_string()).or_insert(0) += count;
        }
        let expiry = self.certificate_expiry.get();
        RouteSnapshot {
            route: self.route.clone(),
            active_sessions: self.active.get().max(0) as u64,
            upstream_failures_last_hour: by_reason,
            certificate_expiry: (expiry != 0).then_some(expiry),
        }
    }
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
    /// Shown once an upstream certificate was seen.
    certificate_expiry: OnceLock<Gauge>,
    families: Families,
    recent: Arc<RouteRecent>,
}

/// The families a route still looks up by label (failures, refusals, rare versions).
#[derive(Clone)]
struct Families {
    connections: Family<RouteTls, Counter>,
    refused: Family<RouteReason, Counter>,
    handshake_failures: Family<RouteLegReason, Counter>,
    certificate_expiry: Family<RouteLabel, Gauge>,
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
        let certificate_expiry = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "tlsbridge_upstream_certificate_expiry_timestamp_seconds",
            "When the upstream's certificate expires (notAfter, Unix time), as the last session of the route saw it",
            certificate_expiry.clone(),
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
            certificate_expiry,
            routes: Mutex::default(),
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
        let active = self.active.get_or_create_owned(&RouteLabel {
            route: name.clone(),
        });
        let recent = Arc::new(RouteRecent {
            route: name.clone(),
            active: active.clone(),
            certificate_expiry: Gauge::default(),
            failures: Mutex::default(),
        });
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(recent.clone());
        RouteMetrics {
            recent,
            active,
            bytes_up: self.bytes.get_or_create_owned(&direction("up")),
            bytes_down: self.bytes.get_or_create_owned(&direction("down")),
            device_handshake: self.handshakes.get_or_create_owned(&leg(Leg::Device)),
            upstream_handshake: self.handshakes.get_or_create_owned(&leg(Leg::Upstream)),
            connections: Default::default(),
            certificate_expiry: OnceLock::new(),
            families: Families {
                connections: self.connections.clone(),
                refused: self.refused.clone(),
                handshake_failures: self.handshake_failures.clone(),
                certificate_expiry: self.certificate_expiry.clone(),
                basic_auth_disabled: self.basic_auth_disabled.clone(),
            },
            route: name,
        }
    }

    /// Every route's recent state, for the dashboard.
    pub fn routes(&self) -> Vec<RouteSnapshot> {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.iter().map(|r| r.snapshot()).collect()
    }

    pub fn set_legacy_clients(&self, count: usize) {
        self.legacy_clients.set(count as i64);
    }

    /// The text exposition format (version 0.0.4). With `devices`, the per-device series
    /// follow, made from the inventory at scrape time (so they cost nothing between scrapes and
    /// are bounded by `limits.max_inventory_clients`).
    pub fn render(&self, devices: Option<&[Client]>) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        if let Some(devices) = devices {
            let _ = prometheus_text::encode(&mut out, &device_registry(devices));
        }
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
        if leg == Leg::Upstream {
            self.recent.failed(reason);
        }
    }

    /// The upstream certificate's notAfter, in Unix seconds.
    pub fn certificate_expires(&self, not_after: i64) {
        self.certificate_expiry
            .get_or_init(|| {
                let labels = RouteLabel {
                    route: self.route.clone(),
                };
                self.families
                    .certificate_expiry
                    .get_or_create_owned(&labels)
            })
            .set(not_after);
        self.recent.certificate_expiry.set(not_after);
    }

    pub fn handshake_took(&self, leg: Leg, took: Duration) {
        let histogram = match leg {
            Leg::Device => &self.device_handshake,
            Leg::Upstream => &self.upstream_handshake,
        };
        histogram.observe(took.as_secs_f64());
    }
}

/// `tlsbridge_legacy_client_last_seen_timestamp_seconds` and
/// `tlsbridge_legacy_client_connections_total`: one series per device and TLS version it was
/// seen with. `client_name` is the EHLO name, else the last SNI; `route` lists the device's
/// routes, comma-separated. N replicas each export their own devices; Prometheus adds them up.
fn device_registry(devices: &[Client]) -> Registry {
    let mut registry = Registry::default();
    let last_seen = Family::<DeviceLabels, Gauge>::default();
    registry.register(
        "tlsbridge_legacy_client_last_seen_timestamp_seconds",
        "When a legacy device was last seen (Unix time), by address, name, TLS version and routes",
        last_seen.clone(),
    );
    let connections = Family::<DeviceLabels, Counter>::default();
    registry.register(
        "tlsbridge_legacy_client_connections",
        "Legacy connections of a device, by address, name, TLS version and routes",
        connections.clone(),
    );
    for device in devices {
        let seen = humantime::parse_rfc3339(&device.last_seen)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        let name = if device.ehlo.is_empty() {
            &device.last_sni
        } else {
            &device.ehlo
        };
        let routes = device.routes.iter().cloned().collect::<Vec<_>>().join(",");
        for (version, count) in &device.versions {
            let labels = DeviceLabels {
                address: device.ip.to_string(),
                client_name: name.clone(),
                device_tls: version.clone(),
                route: routes.clone(),
            };
            last_seen.get_or_create(&labels).set(seen);
            connections.get_or_create(&labels).inc_by(*count);
        }
    }
    registry
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
        r.certificate_expires(1_900_000_000);
        let text = m.render(None);
        for line in [
            "tlsbridge_connections_total{route=\"smtp\",device_tls=\"TLSv1\"} 2",
            "tlsbridge_active_connections{route=\"smtp\"} 0",
            "tlsbridge_bytes_total{route=\"smtp\",direction=\"down\"} 20",
            "tlsbridge_handshake_failures_total{route=\"smtp\",leg=\"upstream\",reason=\"certificate_invalid\"} 1",
            "tlsbridge_handshake_duration_seconds_bucket{route=\"smtp\",leg=\"device\",le=\"0.01\"} 0",
            "tlsbridge_handshake_duration_seconds_bucket{route=\"smtp\",leg=\"device\",le=\"0.025\"} 1",
            "tlsbridge_handshake_duration_seconds_count{route=\"smtp\",leg=\"device\"} 1",
            "tlsbridge_legacy_clients 0",
            "tlsbridge_upstream_certificate_expiry_timestamp_seconds{route=\"smtp\"} 1900000000",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn per_device_series_come_from_the_inventory() {
        let device: Client = serde_json::from_value(serde_json::json!({
            "ip": "10.0.0.7", "first_seen": "2026-11-01T08:00:00Z",
            "last_seen": "2026-11-02T08:00:00Z", "connections": 3,
            "versions": {"TLSv1": 2, "plain": 1}, "ciphers": {}, "routes": ["smtp", "smtps"],
            "ehlo": "MX-3070"
        }))
        .unwrap();
        let text = Metrics::default().render(Some(&[device]));
        for line in [
            "tlsbridge_legacy_client_connections_total{address=\"10.0.0.7\",client_name=\"MX-3070\",device_tls=\"TLSv1\",route=\"smtp,smtps\"} 2",
            "tlsbridge_legacy_client_last_seen_timestamp_seconds{address=\"10.0.0.7\",client_name=\"MX-3070\",device_tls=\"plain\",route=\"smtp,smtps\"} 1793606400",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn the_dashboard_sees_recent_upstream_failures_and_the_expiry() {
        let m = Metrics::default();
        let r = m.route("imaps");
        r.opened();
        r.handshake_failed(Leg::Upstream, "certificate_invalid");
        r.handshake_failed(Leg::Upstream, "certificate_invalid");
        r.handshake_failed(Leg::Upstream, "dns");
        r.handshake_failed(Leg::Device, "device_timeout");
        r.certificate_expires(1_900_000_000);
        let [route] = m.routes().try_into().unwrap();
        assert_eq!(route.route, "imaps");
        assert_eq!(route.active_sessions, 1);
        assert_eq!(
            route.upstream_failures_last_hour,
            BTreeMap::from([("certificate_invalid".into(), 2), ("dns".into(), 1)])
        );
        assert_eq!(route.certificate_expiry, Some(1_900_000_000));
    }
}
