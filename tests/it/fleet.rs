//! A fleet of instances: tlsbridge instances, each with its own devices, scraped as Prometheus
//! would. The per-device series of the instances add up to what the devices did across the
//! fleet, each instance exports only the devices it served and never more than its inventory
//! bound, and `tlsbridge inventory --from` merges the instances' inventories with the same
//! totals. Devices are told apart by their source address (any of 127.0.0.0/8 on loopback).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::ca::Pki;
use crate::support::device::{connect_from, tls_connect, write_shutdown_read, Legacy};
use crate::support::lines::Close;
use crate::support::ops::{self, scrape_until, Exposition, Series};
use crate::support::proxy::{Proxy, Route, Settings};
use crate::support::upstream::{EchoMode, FakeUpstream, Service, UpstreamTls};
use serde_json::Value;

const DEVICE_CONNECTIONS: &str = "tlsbridge_legacy_client_connections_total";
const LAST_SEEN: &str = "tlsbridge_legacy_client_last_seen_timestamp_seconds";
const LEGACY: &str = "tlsbridge_legacy_clients";
const CONNECTIONS: &str = "tlsbridge_connections_total";

/// Every instance has this one route, as a fleet shares one configuration.
const ROUTE: &str = "relay";

/// Bound on one device session (a guard against hanging only).
const SESSION_LIMIT: Duration = Duration::from_secs(30);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

/// The echo upstream every instance relays to, rustls TLS 1.2+.
async fn echo_upstream(pki: &Pki) -> FakeUpstream {
    FakeUpstream::start(
        Service::Echo(EchoMode::Streaming),
        UpstreamTls::Modern,
        &pki.localhost,
    )
    .await
    .expect("start the echo upstream")
}

/// An instance with its admin endpoint and the `relay` route: TLS on the device leg, TLS 1.2+
/// to `upstream`.
async fn instance(
    pki: &Pki,
    upstream: &FakeUpstream,
    max_inventory_clients: Option<usize>,
) -> Proxy {
    let mut settings = Settings::new(pki, vec![Route::tcp(ROUTE, "tls", &upstream.host_port())]);
    settings.max_inventory_clients = max_inventory_clients;
    Proxy::start_with(&settings)
        .await
        .expect("start an instance")
}

/// `sessions` TLS 1.0 sessions of the device at `source` through `proxy`: each a handshake, a
/// line echoed back by the upstream and a clean close on both legs.
async fn device_sessions(
    proxy: &Proxy,
    upstream: &mut FakeUpstream,
    source: &str,
    sessions: usize,
) {
    for n in 0..sessions {
        let tcp = connect_from(ip(source), proxy.addr(ROUTE))
            .await
            .expect("connect from the device address");
        let stream = tls_connect(tcp, Legacy::Tls10, &proxy.verify(), "localhost")
            .await
            .unwrap_or_else(|e| panic!("TLS 1.0 handshake of device {source}: {e:#}"));
        let line = format!("device {source}, session {n}\n");
        let (received, close) = write_shutdown_read(stream, line.as_bytes(), SESSION_LIMIT)
            .await
            .unwrap_or_else(|e| panic!("session {n} of device {source}: {e:#}"));
        assert_eq!(
            String::from_utf8_lossy(&received),
            line,
            "device {source} got back"
        );
        assert_eq!(close, Close::Clean, "how session {n} of {source} ended");
        let report = upstream.next_session().await.expect("upstream session");
        assert_eq!(report.outcome, "ok", "{report:?}");
        assert!(
            matches!(report.tls_version.as_deref(), Some("TLSv1.2" | "TLSv1.3")),
            "the upstream leg: {report:?}"
        );
    }
}

/// The per-device connection series of a scrape.
fn device_series(scrape: &Exposition) -> BTreeMap<&Series, f64> {
    scrape
        .samples
        .iter()
        .filter(|(s, _)| s.name == DEVICE_CONNECTIONS)
        .map(|(s, v)| (s, *v))
        .collect()
}

/// Connections by device address, summed over the address's series (as `sum by (address)`).
fn by_address(scrape: &Exposition) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (series, value) in device_series(scrape) {
        let address = series.labels.get("address").cloned().unwrap_or_default();
        *out.entry(address).or_insert(0.0) += value;
    }
    out
}

fn show(series: &BTreeMap<&Series, f64>) -> String {
    series.iter().map(|(s, v)| format!("  {s} {v}\n")).collect()
}

fn totals(entries: &[(&str, f64)]) -> BTreeMap<String, f64> {
    entries.iter().map(|(a, n)| (a.to_string(), *n)).collect()
}

/// Scrapes `proxy` until its per-device series count `total` connections (bounded).
async fn scrape_devices(proxy: &Proxy, what: &str, total: f64) -> Exposition {
    scrape_until(proxy.admin(), what, |m| {
        by_address(m).values().sum::<f64>() >= total
    })
    .await
    .expect("the per-device series of the instance's sessions")
}

/// Every per-device series has the labels of the contract, one `last_seen` companion with a
/// plausible time, and comes from this test's TLS 1.0 sessions on the `relay` route.
fn assert_device_labels(instance: &str, scrape: &Exposition) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let all = device_series(scrape);
    for series in all.keys() {
        let names: Vec<&str> = series.labels.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["address", "client_name", "device_tls", "route"],
            "labels of {series} on instance {instance}"
        );
        assert_eq!(series.labels["device_tls"], "TLSv1", "{series}");
        assert_eq!(series.labels["route"], ROUTE, "{series}");
        // No EHLO on a TCP route: the device is named by the SNI it sent.
        assert_eq!(series.labels["client_name"], "localhost", "{series}");
        let mut seen = (*series).clone();
        seen.name = LAST_SEEN.to_string();
        let at = scrape.samples.get(&seen).copied();
        assert!(
            at.is_some_and(|t| (now - 600.0..now + 600.0).contains(&t)),
            "{seen} = {at:?} on instance {instance} (now {now}):\n{scrape}"
        );
    }
    let last_seen = scrape
        .samples
        .keys()
        .filter(|s| s.name == LAST_SEEN)
        .count();
    assert_eq!(
        last_seen,
        all.len(),
        "one last-seen series per connection series on instance {instance}:\n{scrape}"
    );
}

/// A device entry of `inventory --json` or /clients, by address.
fn entries(list: &[Value]) -> BTreeMap<String, &Value> {
    list.iter()
        .map(|e| (e["ip"].as_str().unwrap_or_default().to_string(), e))
        .collect()
}

fn text<'a>(entry: &'a Value, key: &str) -> &'a str {
    entry[key].as_str().unwrap_or_default()
}

/// Two instances share device .3; each serves one more of its own. Their per-device series add
/// up to the fleet's totals, and `inventory --from` merges their inventories with those totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_add_up_per_device_and_inventory_from_merges_them() {
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let mut upstream = echo_upstream(&pki).await;
    let a = instance(&pki, &upstream, None).await;
    let b = instance(&pki, &upstream, None).await;

    device_sessions(&a, &mut upstream, "127.0.0.2", 2).await;
    device_sessions(&a, &mut upstream, "127.0.0.3", 1).await;
    device_sessions(&b, &mut upstream, "127.0.0.3", 3).await;
    device_sessions(&b, &mut upstream, "127.0.0.4", 1).await;

    let scrape_a = scrape_devices(&a, "instance A's 3 device connections", 3.0).await;
    let scrape_b = scrape_devices(&b, "instance B's 4 device connections", 4.0).await;
    let seen = format!(
        "instance A:\n{}instance B:\n{}",
        show(&device_series(&scrape_a)),
        show(&device_series(&scrape_b))
    );
    assert_device_labels("A", &scrape_a);
    assert_device_labels("B", &scrape_b);

    // Each instance exports the devices it served, and only those.
    assert_eq!(
        by_address(&scrape_a),
        totals(&[("127.0.0.2", 2.0), ("127.0.0.3", 1.0)]),
        "instance A's per-device connections:\n{seen}"
    );
    assert_eq!(
        by_address(&scrape_b),
        totals(&[("127.0.0.3", 3.0), ("127.0.0.4", 1.0)]),
        "instance B's per-device connections:\n{seen}"
    );
    // Within an instance, the per-device series account for every legacy connection of the
    // route (all of them TLS 1.0 here).
    for (name, scrape, sessions) in [("A", &scrape_a, 3.0), ("B", &scrape_b, 4.0)] {
        let route = scrape.get(CONNECTIONS, &[("route", ROUTE), ("device_tls", "TLSv1")]);
        let devices: f64 = by_address(scrape).values().sum();
        assert_eq!(
            (route, devices),
            (sessions, sessions),
            "instance {name}: route connections vs per-device total:\n{seen}"
        );
        assert_eq!(
            scrape.value(LEGACY, &[]),
            Some(2.0),
            "instance {name}: {LEGACY}:\n{scrape}"
        );
    }

    // Across the fleet (sum by address over both scrapes).
    let mut fleet: BTreeMap<String, f64> = BTreeMap::new();
    for scrape in [&scrape_a, &scrape_b] {
        for (address, n) in by_address(scrape) {
            *fleet.entry(address).or_insert(0.0) += n;
        }
    }
    let expected = totals(&[("127.0.0.2", 2.0), ("127.0.0.3", 4.0), ("127.0.0.4", 1.0)]);
    assert_eq!(
        fleet, expected,
        "per-device connections across the fleet:\n{seen}"
    );

    // What each instance's inventory holds, to check the merge's times against.
    let clients_a = ops::clients(a.admin()).await.expect("/clients of A");
    let clients_b = ops::clients(b.admin()).await.expect("/clients of B");
    let (own_a, own_b) = (entries(&clients_a), entries(&clients_b));
    let shared_a = own_a
        .get("127.0.0.3")
        .copied()
        .unwrap_or_else(|| panic!("instance A's /clients lacks 127.0.0.3: {clients_a:#?}"));
    let shared_b = own_b
        .get("127.0.0.3")
        .copied()
        .unwrap_or_else(|| panic!("instance B's /clients lacks 127.0.0.3: {clients_b:#?}"));

    // The CLI merges the two inventories over their admin endpoints.
    let from = format!("http://{},http://{}", a.admin(), b.admin());
    let json = ops::cli(&["inventory", "--json", "--from", &from])
        .await
        .expect("tlsbridge inventory --json --from");
    assert!(json.success(), "{json:?}");
    assert!(
        json.stderr.contains("3 legacy device(s)")
            && json.stderr.contains("merged from 2 instance(s)"),
        "{json:?}"
    );
    let merged: Vec<Value> = serde_json::from_str(&json.stdout)
        .unwrap_or_else(|e| panic!("inventory --json is not a JSON array ({e}): {json:?}"));
    let listed = entries(&merged);
    assert_eq!(
        listed.keys().map(String::as_str).collect::<Vec<_>>(),
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"],
        "devices of the merged inventory: {merged:#?}"
    );
    assert_eq!(merged.len(), 3, "one entry per device: {merged:#?}");
    for (address, connections) in &expected {
        let entry = listed[address];
        assert_eq!(
            entry["connections"].as_f64(),
            Some(*connections),
            "merged connections of {address} (the fleet's series say {connections}): {entry:#}"
        );
        assert_eq!(
            entry["versions"],
            serde_json::json!({ "TLSv1": *connections as u64 }),
            "merged TLS versions of {address}: {entry:#}"
        );
        let ciphers: u64 = entry["ciphers"]
            .as_object()
            .map(|c| c.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        assert_eq!(
            ciphers as f64, *connections,
            "merged cipher counts of {address}: {entry:#}"
        );
        assert_eq!(entry["routes"], serde_json::json!([ROUTE]), "{entry:#}");
    }
    // The shared device: first seen on the earlier, last seen on the later of the two.
    let shared = listed["127.0.0.3"];
    let first = text(shared_a, "first_seen").min(text(shared_b, "first_seen"));
    let last = text(shared_a, "last_seen").max(text(shared_b, "last_seen"));
    assert_eq!(
        (text(shared, "first_seen"), text(shared, "last_seen")),
        (first, last),
        "merged times of 127.0.0.3 from A {shared_a:#} and B {shared_b:#}: {shared:#}"
    );
    // A device seen by one instance only is passed through as that instance has it.
    assert_eq!(listed["127.0.0.2"], own_a["127.0.0.2"], "{merged:#?}");
    assert_eq!(listed["127.0.0.4"], own_b["127.0.0.4"], "{merged:#?}");

    // The CSV, for spreadsheets, carries the same totals.
    let csv = ops::cli(&["inventory", "--csv", "--from", &from])
        .await
        .expect("tlsbridge inventory --csv --from");
    assert!(csv.success(), "{csv:?}");
    let mut rows = csv.stdout.lines();
    let header: Vec<&str> = rows.next().unwrap_or("").split(',').collect();
    let address = header.iter().position(|h| *h == "address");
    let connections = header.iter().position(|h| *h == "connections");
    let (Some(address), Some(connections)) = (address, connections) else {
        panic!("CSV header without address/connections: {csv:?}");
    };
    let csv_totals: BTreeMap<String, f64> = rows
        .map(|row| {
            let cells: Vec<&str> = row.split(',').collect();
            let get = |i: usize| cells.get(i).copied().unwrap_or_default();
            (
                get(address).to_string(),
                get(connections).parse().unwrap_or(f64::NAN),
            )
        })
        .collect();
    assert_eq!(csv_totals, expected, "inventory --csv --from: {csv:?}");

    a.stop().await.expect("stop instance A");
    b.stop().await.expect("stop instance B");
}

/// An instance whose inventory holds at most 2 devices, serving 4: it never exports more
/// per-device series than that, keeps the most recently seen device, and still counts every
/// connection on the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_device_series_stay_within_the_inventory_bound() {
    crate::support::init_logging();
    const BOUND: usize = 2;
    let pki = Pki::new().expect("test PKI");
    let mut upstream = echo_upstream(&pki).await;
    let proxy = instance(&pki, &upstream, Some(BOUND)).await;

    let devices = ["127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"];
    for device in devices {
        device_sessions(&proxy, &mut upstream, device, 1).await;
    }

    let scrape = scrape_until(proxy.admin(), "the route's 4 connections", |m| {
        m.get(CONNECTIONS, &[("route", ROUTE), ("device_tls", "TLSv1")]) >= 4.0
    })
    .await
    .expect("metrics after the sessions");
    let series = device_series(&scrape);
    assert_device_labels("bounded", &scrape);
    let addresses: BTreeSet<&str> = series
        .keys()
        .filter_map(|s| s.labels.get("address").map(String::as_str))
        .collect();
    assert!(
        series.len() <= BOUND && addresses.len() <= BOUND,
        "at most {BOUND} per-device series with limits.max_inventory_clients = {BOUND}, got:\n{}",
        show(&series)
    );
    assert_eq!(
        addresses.len(),
        BOUND,
        "a full inventory exports {BOUND} devices:\n{}",
        show(&series)
    );
    assert!(
        addresses.contains("127.0.0.8"),
        "the device seen last is kept:\n{}",
        show(&series)
    );
    assert!(
        addresses.iter().all(|a| devices.contains(a)),
        "only the instance's own devices:\n{}",
        show(&series)
    );
    assert_eq!(
        scrape.value(LEGACY, &[]),
        Some(BOUND as f64),
        "{LEGACY}:\n{scrape}"
    );
    assert_eq!(
        scrape.get(CONNECTIONS, &[("route", ROUTE), ("device_tls", "TLSv1")]),
        4.0,
        "every connection is counted on the route, bound or not:\n{scrape}"
    );
    let clients = ops::clients(proxy.admin()).await.expect("/clients");
    assert_eq!(clients.len(), BOUND, "/clients: {clients:#?}");
    proxy.stop().await.expect("stop the proxy");
}
