//! The monitoring files in deploy/ agree with the metrics tlsbridge exports:
//!
//! - deploy/prometheus/tlsbridge-rules.yml passes `promtool check rules` (skipped where promtool
//!   is missing, unless `CI` is set) and its expressions name only metrics the design defines
//!   (or its own recording rules);
//! - deploy/kubernetes/prometheusrule.yaml is a PrometheusRule with the same groups, and is not
//!   in kustomization.yaml (its CRD exists only where the Prometheus Operator runs);
//! - deploy/grafana/tlsbridge-dashboard.json is valid JSON and every query names a tlsbridge
//!   metric the design defines.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value as Yaml;

/// The metrics the design and the README define.
const METRICS: &[&str] = &[
    "tlsbridge_connections_total",
    "tlsbridge_active_connections",
    "tlsbridge_refused_connections_total",
    "tlsbridge_handshake_failures_total",
    "tlsbridge_bytes_total",
    "tlsbridge_legacy_clients",
    "tlsbridge_handshake_duration_seconds",
    "tlsbridge_legacy_client_last_seen_timestamp_seconds",
    "tlsbridge_legacy_client_connections_total",
    "tlsbridge_upstream_certificate_expiry_timestamp_seconds",
];
/// Proposed with the rules (1 while `/readyz` answers 200): the alert rules may use it, the
/// dashboard does not.
const PROPOSED: &[&str] = &["tlsbridge_ready"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &str) -> Yaml {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The words of a PromQL expression that are tlsbridge metric or recording-rule names.
fn names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("tlsbridge_") || word.starts_with("tlsbridge:"))
        .map(str::to_string)
        .collect()
}

/// `name` is a defined metric, or one of a histogram's series.
fn defined(name: &str, metrics: &[&str]) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|base| metrics.contains(base))
        .unwrap_or(name);
    metrics.contains(&base)
}

const RULES: &str = "deploy/prometheus/tlsbridge-rules.yml";

fn promtool() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("promtool"))
        .find(|candidate| candidate.is_file())
}

#[test]
fn promtool_accepts_the_rules() {
    let Some(promtool) = promtool() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing (Debian: the prometheus package) and CI is set"
        );
        eprintln!("skipped: promtool is not installed");
        return;
    };
    let out = Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(root().join(RULES))
        .output()
        .expect("runs promtool");
    assert!(
        out.status.success(),
        "promtool check rules {RULES}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (record or alert name, expr) of every rule in `groups`.
fn rules(groups: &Yaml) -> Vec<(String, Option<String>, String)> {
    let mut all = Vec::new();
    for group in groups.as_sequence().expect("groups is a list") {
        for rule in group["rules"].as_sequence().expect("rules is a list") {
            let record = rule["record"].as_str().map(str::to_string);
            let alert = rule["alert"].as_str().map(str::to_string);
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            all.push((
                alert
                    .clone()
                    .or(record.clone())
                    .expect("a record or an alert"),
                record,
                expr.to_string(),
            ));
        }
    }
    all
}

#[test]
fn rules_use_defined_metrics_and_cover_the_alerts() {
    let file = yaml(RULES);
    let rules = rules(&file["groups"]);
    let recorded: BTreeSet<String> = rules.iter().filter_map(|(_, r, _)| r.clone()).collect();
    let allowed: Vec<&str> = METRICS.iter().chain(PROPOSED).copied().collect();
    for (name, _, expr) in &rules {
        let used = names(expr);
        assert!(!used.is_empty() || expr.contains("up{"), "{name}: {expr}");
        for metric in used {
            assert!(
                defined(&metric, &allowed) || recorded.contains(&metric),
                "{name} uses {metric}, which tlsbridge does not export"
            );
        }
    }
    let all: String = rules.iter().map(|(_, _, e)| e.as_str()).collect();
    for needed in [
        "tlsbridge_legacy_client_last_seen_timestamp_seconds",
        "reason=\"certificate_invalid\"",
        "tlsbridge_upstream_certificate_expiry_timestamp_seconds",
        "14 * 86400",
        "up{job=\"tlsbridge\"} == 0",
    ] {
        assert!(all.contains(needed), "no rule with {needed}");
    }
}

#[test]
fn the_prometheus_rule_has_the_same_groups_and_is_not_in_the_kustomization() {
    let rule = yaml("deploy/kubernetes/prometheusrule.yaml");
    assert_eq!(
        rule["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"));
    assert!(rule["metadata"]["name"].as_str().is_some());
    assert_eq!(
        rule["spec"]["groups"],
        yaml(RULES)["groups"],
        "prometheusrule.yaml and {RULES} differ"
    );
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let resources = kustomization["resources"].as_sequence().expect("resources");
    assert!(
        !resources
            .iter()
            .any(|r| r.as_str() == Some("prometheusrule.yaml")),
        "the PrometheusRule CRD may not exist in a cluster: keep it out of the kustomization"
    );
}

/// Every string under a key named `expr`, `query` or `definition`.
fn queries(value: &serde_json::Value, path: &str, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                let here = format!("{path}.{key}");
                match (key.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(q)) => {
                        out.push((here, q.clone()))
                    }
                    _ => queries(v, &here, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                queries(v, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_grafana_query_names_a_tlsbridge_metric() {
    let path = "deploy/grafana/tlsbridge-dashboard.json";
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(dashboard["title"].is_string() && dashboard["panels"].is_array());
    let mut found = Vec::new();
    queries(&dashboard, "", &mut found);
    // The datasource variable's query is the plugin type, not PromQL.
    found.retain(|(_, q)| q != "prometheus");
    assert!(found.len() >= 10, "{found:?}");
    let mut used = BTreeSet::new();
    for (at, query) in &found {
        let names = names(query);
        assert!(!names.is_empty(), "{at} names no tlsbridge metric: {query}");
        for name in names {
            assert!(
                defined(&name, METRICS),
                "{at}: {name} is not a tlsbridge metric"
            );
            used.insert(name);
        }
    }
    // The page's views: per-device series, per-route status, and the inventory size.
    for metric in [
        "tlsbridge_legacy_client_last_seen_timestamp_seconds",
        "tlsbridge_legacy_client_connections_total",
        "tlsbridge_active_connections",
        "tlsbridge_handshake_failures_total",
        "tlsbridge_upstream_certificate_expiry_timestamp_seconds",
        "tlsbridge_legacy_clients",
    ] {
        assert!(
            used.contains(metric),
            "the dashboard does not show {metric}"
        );
    }
    let ids: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| &p["id"])
        .collect();
    let unique: BTreeSet<String> = ids.iter().map(|id| id.to_string()).collect();
    assert_eq!(unique.len(), ids.len(), "panel ids are unique");
}

#[test]
fn the_name_extraction_sees_histogram_series_and_rejects_strangers() {
    assert_eq!(
        names("sum(rate(tlsbridge_handshake_duration_seconds_bucket{leg=\"device\"}[5m]))"),
        ["tlsbridge_handshake_duration_seconds_bucket"]
    );
    assert!(defined(
        "tlsbridge_handshake_duration_seconds_count",
        METRICS
    ));
    assert!(!defined("tlsbridge_connections", METRICS));
    assert!(!defined("tlsbridge_ready", METRICS));
    assert!(Path::new(&root().join(RULES)).is_file());
}
