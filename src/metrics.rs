//! Prometheus metrics, kept in memory and rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bounds of the handshake duration histograms, in seconds.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

type Labels = Vec<(&'static str, String)>;

/// A family of counters or gauges keyed by label values.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    values: Mutex<BTreeMap<Labels, f64>>,
}

impl Family {
    const fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    fn add(&self, labels: Labels, delta: f64) {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        *values.entry(labels).or_insert(0.0) += delta;
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} {}",
            self.name, self.help, self.name, self.kind
        );
        for (labels, value) in self.values.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "{}{} {}", self.name, label_text(labels, None), value);
        }
    }
}

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Every metric tlsbridge exports.
pub struct Metrics {
    started: SystemTime,
    connections: Family,
    active: Family,
    refused: Family,
    handshake_failures: Family,
    bytes: Family,
    legacy_clients: Mutex<usize>,
    handshakes: Mutex<BTreeMap<Labels, Histogram>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: SystemTime::now(),
            connections: Family::new(
                "tlsbridge_connections_total",
                "counter",
                "Connections whose device leg was established, by route and device TLS version.",
            ),
            active: Family::new("tlsbridge_active_connections", "gauge", "Connections open now, by route."),
            refused: Family::new(
                "tlsbridge_refused_connections_total",
                "counter",
                "Connections refused before any dialog (acl, limit, proxy_protocol), by route and reason.",
            ),
            handshake_failures: Family::new(
                "tlsbridge_handshake_failures_total",
                "counter",
                "Failed legs, by route, leg (device|upstream) and reason.",
            ),
            bytes: Family::new(
                "tlsbridge_bytes_total",
                "counter",
                "Payload bytes relayed, by route and direction (up: device to upstream).",
            ),
            legacy_clients: Mutex::new(0),
            handshakes: Mutex::new(BTreeMap::new()),
        }
    }
}

fn route(route: &str) -> Labels {
    vec![("route", route.to_string())]
}

impl Metrics {
    pub fn connection(&self, r: &str, device_tls: &str) {
        self.connections.add(
            vec![("route", r.into()), ("device_tls", device_tls.into())],
            1.0,
        );
    }

    pub fn opened(&self, r: &str) {
        self.active.add(route(r), 1.0);
    }

    pub fn closed(&self, r: &str, bytes_up: u64, bytes_down: u64) {
        self.active.add(route(r), -1.0);
        self.bytes.add(
            vec![("route", r.into()), ("direction", "up".into())],
            bytes_up as f64,
        );
        self.bytes.add(
            vec![("route", r.into()), ("direction", "down".into())],
            bytes_down as f64,
        );
    }

    pub fn refused(&self, r: &str, reason: &str) {
        self.refused
            .add(vec![("route", r.into()), ("reason", reason.into())], 1.0);
    }

    pub fn handshake_failed(&self, r: &str, leg: &str, reason: &str) {
        let labels = vec![
            ("route", r.into()),
            ("leg", leg.into()),
            ("reason", reason.into()),
        ];
        self.handshake_failures.add(labels, 1.0);
    }

    pub fn handshake_took(&self, r: &str, leg: &str, took: Duration) {
        let seconds = took.as_secs_f64();
        let mut all = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        let histogram = all
            .entry(vec![("route", r.into()), ("leg", leg.into())])
            .or_default();
        for (bucket, bound) in histogram.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        histogram.count += 1;
        histogram.sum += seconds;
    }

    pub fn set_legacy_clients(&self, count: usize) {
        *self
            .legacy_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = count;
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for family in [
            &self.connections,
            &self.active,
            &self.refused,
            &self.handshake_failures,
            &self.bytes,
        ] {
            family.render(&mut out);
        }
        let legacy = *self
            .legacy_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            out,
            "# HELP tlsbridge_legacy_clients Distinct device addresses seen with a downgraded leg (the inventory).\n\
             # TYPE tlsbridge_legacy_clients gauge\ntlsbridge_legacy_clients {legacy}"
        );
        let name = "tlsbridge_handshake_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} TLS handshake time, by route and leg.\n# TYPE {name} histogram"
        );
        for (labels, h) in self
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            for (count, bound) in h.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {count}",
                    label_text(labels, Some(&bound.to_string()))
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{} {}",
                label_text(labels, Some("+Inf")),
                h.count
            );
            let _ = writeln!(out, "{name}_sum{} {}", label_text(labels, None), h.sum);
            let _ = writeln!(out, "{name}_count{} {}", label_text(labels, None), h.count);
        }
        let start = self
            .started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let _ = writeln!(
            out,
            "# HELP process_start_time_seconds Start time of the process since the Unix epoch.\n\
             # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {start}"
        );
        out
    }
}

fn label_text(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        m.opened("smtp");
        m.connection("smtp", "TLSv1");
        m.handshake_took("smtp", "device", Duration::from_millis(20));
        m.handshake_failed("smtp", "upstream", "certificate_invalid");
        m.closed("smtp", 10, 20);
        let text = m.render();
        for line in [
            "tlsbridge_connections_total{route=\"smtp\",device_tls=\"TLSv1\"} 1",
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
