//! The migration dashboard served at the admin endpoint's `/`: which devices still speak legacy
//! TLS, and are there fewer each week?
//!
//! [`render`] is a pure function from a [`View`] to one self-contained HTML page: inline CSS,
//! charts as inline SVG, no script, no external resource (the endpoint sends a
//! Content-Security-Policy that forbids both). Sorting is server-side through `?sort=` links, so
//! it works without JavaScript. Every value a device sent is HTML-escaped here, on top of the
//! [`crate::text::printable`] sanitising it had on its way into the inventory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::inventory::{self, Client, DayCounts};

/// What the page shows.
#[derive(Debug, Clone)]
pub struct View {
    /// The inventory (any order: the page sorts).
    pub clients: Vec<Client>,
    /// Daily counts keyed by UTC date (`YYYY-MM-DD`).
    pub days: BTreeMap<String, DayCounts>,
    /// One entry per route; empty until the server fills it.
    pub routes: Vec<RouteStatus>,
    pub now: SystemTime,
    pub sort: Sort,
}

/// What the page shows about one route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteStatus {
    pub route: String,
    /// Sessions open now.
    pub active_sessions: u64,
    /// Upstream handshake failures in the last hour, by reason (`certificate_invalid`, ...).
    pub upstream_failures_last_hour: BTreeMap<String, u64>,
    /// The upstream certificate's expiry (notAfter) as the route's last session saw it.
    pub upstream_certificate_expiry: Option<SystemTime>,
}

/// The device table's order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sort {
    /// Most recently seen first.
    #[default]
    LastSeen,
    /// Weakest TLS version first (plain, SSLv3, TLSv1, ...), then most recently seen.
    Version,
}

impl Sort {
    /// From a request's query string: `sort=version` or `sort=last_seen` (the default).
    pub fn from_query(query: Option<&str>) -> Sort {
        let value = query
            .unwrap_or("")
            .split('&')
            .find_map(|pair| pair.strip_prefix("sort="));
        match value {
            Some("version") => Sort::Version,
            _ => Sort::LastSeen,
        }
    }
}

/// The legacy versions, weakest first: inventory name, label, chart colour.
const VERSIONS: [(&str, &str, &str); 5] = [
    ("plain", "plain (no TLS)", "#b2182b"),
    ("SSLv3", "SSL 3.0", "#ef8a62"),
    ("TLSv1", "TLS 1.0", "#fdb863"),
    ("TLSv1.1", "TLS 1.1", "#67a9cf"),
    ("TLSv1.2", "TLS 1.2 without forward secrecy", "#2166ac"),
];
const OTHER_COLOUR: &str = "#999999";

/// Days in the chart.
pub const CHART_DAYS: u64 = 30;
const DAY: Duration = Duration::from_secs(86_400);

/// Where a version sorts: its index in [`VERSIONS`], unknown ones last.
fn rank(version: &str) -> usize {
    VERSIONS
        .iter()
        .position(|(name, _, _)| *name == version)
        .unwrap_or(VERSIONS.len())
}

fn label(version: &str) -> &str {
    VERSIONS
        .iter()
        .find(|(name, _, _)| *name == version)
        .map_or(version, |(_, label, _)| label)
}

/// Text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// How long ago `last_seen` was, `None` when it does not parse.
fn age(now: SystemTime, seen: &str) -> Option<Duration> {
    let at = humantime::parse_rfc3339(seen).ok()?;
    Some(now.duration_since(at).unwrap_or_default())
}

/// The whole page.
pub fn render(view: &View) -> String {
    let mut html = String::with_capacity(16 * 1024 + view.clients.len() * 512);
    html.push_str(HEAD);
    let _ = writeln!(
        html,
        "<header><h1>tlsbridge: legacy devices</h1><p class=\"muted\">{} devices in the \
         inventory &middot; generated {} &middot; tlsbridge {}</p></header>",
        view.clients.len(),
        escape(&humantime::format_rfc3339_seconds(view.now).to_string()),
        env!("CARGO_PKG_VERSION"),
    );
    summary(&mut html, view);
    charts(&mut html, view);
    routes(&mut html, view);
    devices(&mut html, view);
    html.push_str(
        "<footer class=\"muted\">Also: <a href=\"/clients\">/clients</a> (JSON), \
         <a href=\"/clients.csv\">/clients.csv</a>, <a href=\"/metrics\">/metrics</a>.</footer>\n\
         </body>\n</html>\n",
    );
    html
}

const HEAD: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tlsbridge: legacy devices</title>
<style>
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 .2em; }
h2 { font-size: 1.15em; margin: 1.6em 0 .5em; }
.muted { color: #666; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em .9em; min-width: 9em; }
.card .n { font-size: 1.6em; font-weight: 600; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #f6f6f6; }
td.num, th.num { text-align: right; }
tr.stale td { color: #888; }
td.when { white-space: nowrap; }
.warn { color: #b2182b; font-weight: 600; }
.legend span { display: inline-block; margin-right: 1em; }
.legend i { display: inline-block; width: .8em; height: .8em; margin-right: .3em; vertical-align: middle; }
svg { max-width: 100%; height: auto; }
svg text { font: 10px system-ui, sans-serif; fill: #555; }
code { font-size: .95em; }
@media (prefers-color-scheme: dark) {
  body { color: #ddd; background: #161616; }
  th { background: #262626; }
  th, td { border-color: #333; }
  .card { border-color: #444; }
  svg text { fill: #aaa; }
  a { color: #8ab4f8; }
}
</style>
</head>
<body>
"#;

fn summary(html: &mut String, view: &View) {
    let ages: Vec<Option<Duration>> = view
        .clients
        .iter()
        .map(|c| age(view.now, &c.last_seen))
        .collect();
    let within = |d: Duration| ages.iter().filter(|a| a.is_some_and(|a| a <= d)).count();
    let stale = ages
        .iter()
        .filter(|a| a.is_some_and(|a| a > DAY * 30))
        .count();
    html.push_str("<h2>Devices still downgrading</h2>\n<div class=\"cards\">\n");
    for (id, n, what) in [
        ("seen-24h", within(DAY), "seen in the last 24 h"),
        ("seen-7d", within(DAY * 7), "seen in the last 7 days"),
        ("seen-30d", within(DAY * 30), "seen in the last 30 days"),
        (
            "not-seen-30d",
            stale,
            "not seen for 30 days: probably migrated or retired",
        ),
    ] {
        let _ = writeln!(
            html,
            "<div class=\"card\" id=\"{id}\"><div class=\"n\">{n}</div>{what}</div>"
        );
    }
    html.push_str("</div>\n");

    // By version: devices that used it (seen in the last 30 days / ever) and its connections
    // over the chart's days.
    let chart_days = inventory::last_days(view.now, CHART_DAYS);
    let mut names: Vec<String> = VERSIONS.iter().map(|(v, _, _)| v.to_string()).collect();
    for c in &view.clients {
        for v in c.versions.keys() {
            if !names.contains(v) {
                names.push(v.clone());
            }
        }
    }
    html.push_str(
        "<h2>By TLS version</h2>\n<table id=\"by-version\"><thead><tr><th>version</th>\
         <th class=\"num\">devices seen in the last 30 days</th><th class=\"num\">devices ever</th>\
         <th class=\"num\">connections in the last 30 days</th></tr></thead><tbody>\n",
    );
    for version in &names {
        let users: Vec<&Option<Duration>> = view
            .clients
            .iter()
            .zip(&ages)
            .filter(|(c, _)| c.versions.contains_key(version))
            .map(|(_, a)| a)
            .collect();
        let recent = users
            .iter()
            .filter(|a| a.is_some_and(|a| a <= DAY * 30))
            .count();
        let connections: u64 = chart_days
            .iter()
            .filter_map(|d| view.days.get(d))
            .filter_map(|d| d.connections.get(version))
            .sum();
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td class=\"num\">{recent}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{connections}</td></tr>",
            escape(label(version)),
            users.len(),
        );
    }
    html.push_str("</tbody></table>\n");
}

/// Chart geometry.
const LEFT: u64 = 44;
const BAR: u64 = 18;
const STEP: u64 = 24;
const PLOT: u64 = 160;
const TOP: u64 = 12;

fn charts(html: &mut String, view: &View) {
    let days = inventory::last_days(view.now, CHART_DAYS);
    let counts: Vec<Option<&DayCounts>> = days.iter().map(|d| view.days.get(d)).collect();
    let width = LEFT + STEP * CHART_DAYS + 8;

    html.push_str("<h2>Legacy connections per day, last 30 days</h2>\n<p class=\"legend\">");
    for (_, label, colour) in VERSIONS {
        let _ = write!(
            html,
            "<span><i style=\"background:{colour}\"></i>{label}</span>"
        );
    }
    let _ = writeln!(
        html,
        "<span><i style=\"background:{OTHER_COLOUR}\"></i>other</span></p>"
    );
    let max = counts
        .iter()
        .map(|d| d.map_or(0, DayCounts::total))
        .max()
        .unwrap_or(0);
    open_chart(html, "connections-chart", width, max, &days);
    for (i, (day, counts)) in days.iter().zip(&counts).enumerate() {
        let Some(counts) = counts.filter(|c| c.total() > 0) else {
            continue;
        };
        let x = LEFT + STEP * i as u64 + (STEP - BAR) / 2;
        let mut parts: Vec<(&String, &u64)> =
            counts.connections.iter().filter(|(_, n)| **n > 0).collect();
        parts.sort_by_key(|(v, _)| rank(v));
        let title: Vec<String> = parts
            .iter()
            .map(|(v, n)| format!("{} {n}", label(v)))
            .collect();
        let _ = write!(
            html,
            "<g class=\"day\" data-day=\"{}\"><title>{}: {} legacy connections ({})</title>",
            escape(day),
            escape(day),
            counts.total(),
            escape(&title.join(", ")),
        );
        // Stacked from the bottom, weakest version lowest.
        let mut below = 0u64;
        for (version, n) in parts {
            let y0 = scale(below, max);
            below += n;
            let y1 = scale(below, max);
            let colour = VERSIONS
                .iter()
                .find(|(v, _, _)| v == version)
                .map_or(OTHER_COLOUR, |(_, _, c)| c);
            let _ = write!(
                html,
                "<rect x=\"{x}\" y=\"{y1}\" width=\"{BAR}\" height=\"{}\" fill=\"{colour}\"/>",
                (y0 - y1).max(1)
            );
        }
        html.push_str("</g>\n");
    }
    html.push_str("</svg>\n");

    html.push_str("<h2>Distinct devices per day, last 30 days</h2>\n");
    let max = counts
        .iter()
        .map(|d| d.map_or(0, |d| d.devices))
        .max()
        .unwrap_or(0);
    open_chart(html, "devices-chart", width, max, &days);
    for (i, (day, counts)) in days.iter().zip(&counts).enumerate() {
        let Some(counts) = counts.filter(|c| c.devices > 0) else {
            continue;
        };
        let x = LEFT + STEP * i as u64 + (STEP - BAR) / 2;
        let y = scale(counts.devices, max);
        let _ = writeln!(
            html,
            "<g class=\"devices\" data-day=\"{}\"><title>{}: {} devices</title>\
             <rect x=\"{x}\" y=\"{y}\" width=\"{BAR}\" height=\"{}\" fill=\"#5e3c99\"/></g>",
            escape(day),
            escape(day),
            counts.devices,
            (TOP + PLOT - y).max(1),
        );
    }
    html.push_str("</svg>\n");
}

/// The y coordinate of `value` on a plot whose top is `max`.
fn scale(value: u64, max: u64) -> u64 {
    let max = max.max(1);
    TOP + PLOT - (value.min(max) * PLOT / max)
}

/// The `<svg>` element, the axes, the top value and a date every five days.
fn open_chart(html: &mut String, id: &str, width: u64, max: u64, days: &[String]) {
    let height = TOP + PLOT + 22;
    let base = TOP + PLOT;
    let _ = writeln!(
        html,
        "<svg id=\"{id}\" role=\"img\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" \
         height=\"{height}\" viewBox=\"0 0 {width} {height}\">\
         <line x1=\"{LEFT}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#888\"/>\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{base}\" stroke=\"#888\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max}</text>\
         <text x=\"{}\" y=\"{base}\" text-anchor=\"end\">0</text>",
        width - 8,
        LEFT - 4,
        TOP + 4,
        LEFT - 4,
    );
    for (i, day) in days.iter().enumerate() {
        if i % 5 == 4 || i + 1 == days.len() {
            let x = LEFT + STEP * i as u64 + STEP / 2;
            let _ = write!(
                html,
                "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                base + 14,
                escape(day.get(5..).unwrap_or(day)),
            );
        }
    }
    html.push('\n');
}

fn routes(html: &mut String, view: &View) {
    html.push_str("<h2>Routes</h2>\n");
    if view.routes.is_empty() {
        html.push_str("<p class=\"muted\" id=\"routes\">No per-route data yet.</p>\n");
        return;
    }
    html.push_str(
        "<table id=\"routes\"><thead><tr><th>route</th><th class=\"num\">active sessions</th>\
         <th>upstream failures in the last hour</th><th>upstream certificate expires</th></tr>\
         </thead><tbody>\n",
    );
    for route in &view.routes {
        let failures: Vec<String> = route
            .upstream_failures_last_hour
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| format!("{} {n}", escape(reason)))
            .collect();
        let failures = match failures.is_empty() {
            true => "none".to_string(),
            false => format!("<span class=\"warn\">{}</span>", failures.join(", ")),
        };
        let expiry = match route.upstream_certificate_expiry {
            None => "<span class=\"muted\">not seen yet</span>".to_string(),
            Some(at) => {
                let date = escape(&inventory::day_of(at));
                match at.duration_since(view.now) {
                    Ok(left) if left >= DAY * 14 => {
                        format!("{date} (in {} days)", left.as_secs() / 86_400)
                    }
                    Ok(left) => format!(
                        "<span class=\"warn\">{date} (in {} days)</span>",
                        left.as_secs() / 86_400
                    ),
                    Err(_) => format!("<span class=\"warn\">{date} (expired)</span>"),
                }
            }
        };
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td class=\"num\">{}</td><td>{failures}</td><td>{expiry}</td></tr>",
            escape(&route.route),
            route.active_sessions,
        );
    }
    html.push_str("</tbody></table>\n");
}

fn devices(html: &mut String, view: &View) {
    let mut clients: Vec<&Client> = view.clients.iter().collect();
    let weakest = |c: &Client| {
        c.versions
            .keys()
            .map(|v| rank(v))
            .min()
            .unwrap_or(usize::MAX)
    };
    match view.sort {
        Sort::LastSeen => {
            clients.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.ip.cmp(&b.ip)));
        }
        Sort::Version => clients.sort_by(|a, b| {
            weakest(a)
                .cmp(&weakest(b))
                .then(b.last_seen.cmp(&a.last_seen))
                .then(a.ip.cmp(&b.ip))
        }),
    }
    let header = |sort: Sort, key: &str, text: &str| match view.sort == sort {
        true => format!("<th aria-sort=\"descending\">{text} &#9660;</th>"),
        false => format!("<th><a href=\"?sort={key}\">{text}</a></th>"),
    };
    let _ = writeln!(
        html,
        "<h2>Devices</h2>\n<table id=\"devices\"><thead><tr><th>address</th>\
         <th>name (EHLO / SNI)</th>{}<th>ciphers</th><th>routes</th><th>first seen</th>{}\
         <th class=\"num\">connections</th><th>XOAUTH2</th></tr></thead><tbody>",
        header(Sort::Version, "version", "TLS versions"),
        header(Sort::LastSeen, "last_seen", "last seen"),
    );
    if clients.is_empty() {
        html.push_str(
            "<tr><td colspan=\"9\" class=\"muted\">No legacy device seen yet.</td></tr>\n",
        );
    }
    let counts = |m: &BTreeMap<String, u64>, label_of: &dyn Fn(&str) -> String| {
        let mut items: Vec<(&String, &u64)> = m.iter().collect();
        items.sort_by_key(|(k, _)| rank(k));
        items
            .iter()
            .map(|(k, n)| format!("{} ({n})", escape(&label_of(k))))
            .collect::<Vec<_>>()
            .join("<br>")
    };
    for c in clients {
        let age = age(view.now, &c.last_seen);
        let stale = age.is_some_and(|a| a > DAY * 30);
        let names: Vec<String> = [("EHLO", &c.ehlo), ("SNI", &c.last_sni)]
            .iter()
            .filter(|(_, n)| !n.is_empty())
            .map(|(what, n)| format!("{} <span class=\"muted\">{what}</span>", escape(n)))
            .collect();
        let routes: Vec<String> = c.routes.iter().map(|r| escape(r)).collect();
        let auth = match &c.auth {
            Some(auth) => escape(auth),
            None => "<span class=\"muted\">&ndash;</span>".to_string(),
        };
        let last_seen = match (age, stale) {
            (Some(_), true) => format!(
                "{}<br><span class=\"muted\">probably migrated or retired</span>",
                escape(&c.last_seen)
            ),
            (Some(a), false) => format!(
                "{}<br><span class=\"muted\">{} ago</span>",
                escape(&c.last_seen),
                ago(a)
            ),
            (None, _) => escape(&c.last_seen),
        };
        let _ = writeln!(
            html,
            "<tr{}><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"when\">{}</td><td class=\"when\">{last_seen}</td>\
             <td class=\"num\">{}</td><td>{auth}</td></tr>",
            if stale { " class=\"stale\"" } else { "" },
            escape(&c.ip.to_string()),
            names.join("<br>"),
            counts(&c.versions, &|v| label(v).to_string()),
            counts(&c.ciphers, &|c| c.to_string()),
            routes.join(", "),
            escape(&c.first_seen),
            c.connections,
        );
    }
    html.push_str("</tbody></table>\n");
}

fn ago(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..=119 => "a minute".to_string(),
        120..=7_199 => format!("{} minutes", secs / 60),
        7_200..=172_799 => format!("{} hours", secs / 3_600),
        _ => format!("{} days", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2025-03-31T12:00:00Z").unwrap()
    }

    fn client(ip: &str, last_seen: &str, versions: &[(&str, u64)]) -> Client {
        Client {
            ip: ip.parse().unwrap(),
            first_seen: "2025-01-01T00:00:00Z".into(),
            last_seen: last_seen.into(),
            connections: versions.iter().map(|(_, n)| n).sum(),
            versions: versions.iter().map(|(v, n)| (v.to_string(), *n)).collect(),
            ciphers: BTreeMap::from([("AES128-SHA".to_string(), 1)]),
            routes: BTreeSet::from(["smtp".to_string()]),
            last_sni: String::new(),
            ehlo: String::new(),
            auth: None,
        }
    }

    fn day(connections: &[(&str, u64)], devices: u64) -> DayCounts {
        DayCounts {
            connections: connections
                .iter()
                .map(|(v, n)| (v.to_string(), *n))
                .collect(),
            devices,
        }
    }

    fn view(clients: Vec<Client>) -> View {
        View {
            clients,
            days: BTreeMap::new(),
            routes: Vec::new(),
            now: now(),
            sort: Sort::LastSeen,
        }
    }

    #[test]
    fn a_device_sent_name_is_text_not_markup() {
        let mut evil = client("10.0.0.7", "2025-03-31T11:00:00Z", &[("TLSv1", 1)]);
        evil.ehlo = "<script>alert(1)</script>".into();
        evil.last_sni = "\"><img src=x onerror=alert(2)>".into();
        evil.ciphers = BTreeMap::from([("<b>bold</b>".to_string(), 1)]);
        evil.routes = BTreeSet::from(["<i>r</i>".to_string()]);
        evil.auth = Some("<u>XOAUTH2</u>".into());
        let mut page = view(vec![evil]);
        page.routes.push(RouteStatus {
            route: "<script>r</script>".into(),
            upstream_failures_last_hour: BTreeMap::from([("<x>".to_string(), 1)]),
            ..RouteStatus::default()
        });
        let html = render(&page);
        assert!(!html.to_ascii_lowercase().contains("<script"), "{html}");
        for markup in ["<img", "<b>", "<i>r", "<u>", "<x>"] {
            assert!(!html.contains(markup), "{markup} in {html}");
        }
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
    }

    #[test]
    fn one_bar_per_day_with_traffic_in_the_last_30_days() {
        let mut page = view(Vec::new());
        page.days = BTreeMap::from([
            ("2025-02-01".to_string(), day(&[("TLSv1", 9)], 1)), // older than 30 days
            (
                "2025-03-02".to_string(),
                day(&[("TLSv1", 2), ("plain", 1)], 2),
            ), // the first day
            ("2025-03-10".to_string(), day(&[], 0)),
            (
                "2025-03-20".to_string(),
                day(&[("TLSv1.1", 4), ("SSLv3", 1)], 3),
            ),
            ("2025-03-31".to_string(), day(&[("TLSv1.2", 1)], 1)),
        ]);
        let html = render(&page);
        assert_eq!(html.matches("<g class=\"day\"").count(), 3, "{html}");
        assert_eq!(html.matches("<g class=\"devices\"").count(), 3, "{html}");
        for d in ["2025-03-02", "2025-03-20", "2025-03-31"] {
            assert!(
                html.contains(&format!("<g class=\"day\" data-day=\"{d}\">")),
                "{d}"
            );
        }
        assert!(!html.contains("data-day=\"2025-02-01\""));
        // Stacked: one rectangle per version that day.
        let march_20 = html.split("data-day=\"2025-03-20\"").nth(1).unwrap();
        let bar = march_20.split("</g>").next().unwrap();
        assert_eq!(bar.matches("<rect").count(), 2, "{bar}");
        assert!(
            bar.contains("5 legacy connections (SSL 3.0 1, TLS 1.1 4)"),
            "{bar}"
        );
    }

    #[test]
    fn summary_counts() {
        let page = view(vec![
            client("10.0.0.1", "2025-03-31T11:00:00Z", &[("TLSv1", 3)]),
            client(
                "10.0.0.2",
                "2025-03-27T11:00:00Z",
                &[("plain", 1), ("TLSv1", 1)],
            ),
            client("10.0.0.3", "2025-03-10T11:00:00Z", &[("TLSv1.1", 1)]),
            client("10.0.0.4", "2025-01-10T11:00:00Z", &[("SSLv3", 1)]),
        ]);
        let html = render(&page);
        let card = |id: &str| {
            let rest = html
                .split(&format!("id=\"{id}\"><div class=\"n\">"))
                .nth(1)
                .unwrap();
            rest.split('<').next().unwrap().to_string()
        };
        assert_eq!(card("seen-24h"), "1");
        assert_eq!(card("seen-7d"), "2");
        assert_eq!(card("seen-30d"), "3");
        assert_eq!(card("not-seen-30d"), "1");
        assert!(
            html.contains("<tr><td>TLS 1.0</td><td class=\"num\">2</td><td class=\"num\">2</td>")
        );
        assert!(html.contains("<tr class=\"stale\"><td><code>10.0.0.4</code>"));
        assert!(html.contains("probably migrated or retired"));
    }

    #[test]
    fn devices_sort_by_last_seen_or_by_weakest_version() {
        let mut page = view(vec![
            client("10.0.0.1", "2025-03-31T11:00:00Z", &[("TLSv1.1", 3)]),
            client("10.0.0.2", "2025-03-20T11:00:00Z", &[("plain", 1)]),
            client(
                "10.0.0.3",
                "2025-03-30T11:00:00Z",
                &[("TLSv1", 1), ("TLSv1.2", 1)],
            ),
        ]);
        let order = |html: &str| -> Vec<String> {
            html.split("<td><code>")
                .skip(1)
                .map(|r| r.split('<').next().unwrap().to_string())
                .collect()
        };
        let html = render(&page);
        assert_eq!(order(&html), ["10.0.0.1", "10.0.0.3", "10.0.0.2"]);
        assert!(html.contains("<a href=\"?sort=version\">"));
        page.sort = Sort::from_query(Some("x=1&sort=version"));
        let html = render(&page);
        assert_eq!(order(&html), ["10.0.0.2", "10.0.0.3", "10.0.0.1"]);
        assert!(html.contains("<a href=\"?sort=last_seen\">"));
        assert_eq!(Sort::from_query(None), Sort::LastSeen);
        assert_eq!(Sort::from_query(Some("sort=bogus")), Sort::LastSeen);
    }

    #[test]
    fn routes_show_failures_and_a_certificate_about_to_expire() {
        let mut page = view(Vec::new());
        assert!(render(&page).contains("No per-route data yet."));
        page.routes = vec![
            RouteStatus {
                route: "smtp".into(),
                active_sessions: 4,
                upstream_failures_last_hour: BTreeMap::from([("certificate_invalid".into(), 2)]),
                upstream_certificate_expiry: Some(now() + DAY * 10),
            },
            RouteStatus {
                route: "imap".into(),
                upstream_certificate_expiry: Some(now() + DAY * 200),
                ..RouteStatus::default()
            },
        ];
        let html = render(&page);
        assert!(html.contains("<td>smtp</td><td class=\"num\">4</td>"));
        assert!(html.contains("<span class=\"warn\">certificate_invalid 2</span>"));
        assert!(html.contains("<span class=\"warn\">2025-04-10 (in 10 days)</span>"));
        assert!(html.contains("<td>none</td><td>2025-10-17 (in 200 days)</td>"));
    }

    #[test]
    fn the_page_is_self_contained() {
        let html = render(&view(vec![client(
            "10.0.0.1",
            "2025-03-31T11:00:00Z",
            &[("TLSv1", 1)],
        )]));
        for external in ["<script", "<link", "src=", "@import", "url(", "https://"] {
            assert!(!html.contains(external), "{external}");
        }
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.trim_end().ends_with("</html>"));
    }
}
