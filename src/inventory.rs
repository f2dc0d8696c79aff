//! The legacy-device inventory: downgraded clients aggregated by device address, with daily
//! counts (legacy connections by TLS version and distinct devices, per UTC day, the last
//! [`MAX_DAYS`] days), persisted atomically to `state_dir/inventory.json` and loaded at start.
//!
//! The file is `{"clients": [...], "days": {"YYYY-MM-DD": {...}}}`; the older plain array of
//! clients still loads (with no daily counts).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One device address and what it was seen doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    pub ip: IpAddr,
    /// RFC 3339, UTC, seconds: sorts chronologically as text.
    pub first_seen: String,
    pub last_seen: String,
    pub connections: u64,
    /// TLS version (or `plain`) -> connections.
    pub versions: BTreeMap<String, u64>,
    /// Cipher -> connections.
    pub ciphers: BTreeMap<String, u64>,
    pub routes: BTreeSet<String>,
    #[serde(default)]
    pub last_sni: String,
    /// The SMTP EHLO name the device sent before STARTTLS: often its model name.
    #[serde(default)]
    pub ehlo: String,
    /// How the device's sessions authenticate upstream (e.g. `XOAUTH2`), once that is known;
    /// `None` until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}

/// Daily counts are kept for this many UTC days (today included); older days are dropped.
pub const MAX_DAYS: u64 = 90;

const DAY: Duration = Duration::from_secs(86_400);

/// One UTC day's legacy traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayCounts {
    /// TLS version (`plain`, `SSLv3`, `TLSv1`, `TLSv1.1`, `TLSv1.2` without forward secrecy) ->
    /// legacy connections that day.
    #[serde(default)]
    pub connections: BTreeMap<String, u64>,
    /// Distinct device addresses seen that day.
    #[serde(default)]
    pub devices: u64,
}

impl DayCounts {
    /// Legacy connections that day, all versions.
    pub fn total(&self) -> u64 {
        self.connections.values().sum()
    }
}

/// Where the time comes from: the system clock, or a test's.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// `inventory.json` as written.
#[derive(Serialize)]
struct StateOut<'a> {
    clients: &'a [Client],
    days: &'a BTreeMap<String, DayCounts>,
}

/// `inventory.json` as read: the current object or the older plain array.
#[derive(Deserialize)]
#[serde(untagged)]
enum StateIn {
    Current {
        clients: Vec<Client>,
        #[serde(default)]
        days: BTreeMap<String, DayCounts>,
    },
    Clients(Vec<Client>),
}

/// What one downgraded session contributes.
pub struct Sighting<'a> {
    pub ip: IpAddr,
    pub route: &'a str,
    pub version: &'a str,
    pub cipher: &'a str,
    pub sni: &'a str,
    pub ehlo: Option<&'a str>,
}

/// Entries one IPv4 address... one IPv6 /64 may hold: a host with many addresses cannot fill the
/// inventory.
pub const MAX_CLIENTS_PER_PREFIX: usize = 16;

/// New entries admitted per second (a token bucket, [`NEW_CLIENTS_BURST`] at once): a site's
/// devices arriving together are all recorded, a flood of new addresses cannot flush the known
/// ones. Entries already in the inventory are always updated.
pub const NEW_CLIENTS_PER_SECOND: f64 = 10.0;
pub const NEW_CLIENTS_BURST: f64 = 50.0;

/// The key entries are counted under for [`MAX_CLIENTS_PER_PREFIX`]: an IPv4 address (IPv4-mapped
/// included) as is, an IPv6 address as its /64.
fn prefix_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !((1u128 << 64) - 1),
        )),
        v4 => v4,
    }
}

/// The in-memory inventory, bounded to `max_clients` entries (the least recently seen go first),
/// [`MAX_CLIENTS_PER_PREFIX`] per IPv6 /64, with new entries admitted at a bounded rate.
pub struct Inventory {
    state: Mutex<State>,
    max_clients: usize,
    path: PathBuf,
    clock: Clock,
}

struct State {
    clients: HashMap<IpAddr, Client>,
    days: BTreeMap<String, DayCounts>,
    /// `(last_seen, ip)` of every client: the least recently seen is the first, found without a
    /// scan.
    by_last_seen: BTreeSet<(String, IpAddr)>,
    /// Entries per [`prefix_of`].
    per_prefix: HashMap<IpAddr, usize>,
    /// Tokens for new entries, and when they were counted.
    new_tokens: f64,
    new_tokens_at: SystemTime,
}

impl State {
    fn new(clients: Vec<Client>, days: BTreeMap<String, DayCounts>, now: SystemTime) -> State {
        let mut state = State {
            clients: HashMap::new(),
            days,
            by_last_seen: BTreeSet::new(),
            per_prefix: HashMap::new(),
            new_tokens: NEW_CLIENTS_BURST,
            new_tokens_at: now,
        };
        for client in clients {
            if state.clients.contains_key(&client.ip) {
                continue;
            }
            state
                .by_last_seen
                .insert((client.last_seen.clone(), client.ip));
            *state.per_prefix.entry(prefix_of(client.ip)).or_insert(0) += 1;
            state.clients.insert(client.ip, client);
        }
        state
    }

    /// True when a new entry for `ip` may be added now (and takes its token).
    fn admit_new(&mut self, ip: IpAddr, now: SystemTime) -> bool {
        if self.per_prefix.get(&prefix_of(ip)).copied().unwrap_or(0) >= MAX_CLIENTS_PER_PREFIX {
            return false;
        }
        let elapsed = now
            .duration_since(self.new_tokens_at)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        self.new_tokens =
            (self.new_tokens + elapsed * NEW_CLIENTS_PER_SECOND).min(NEW_CLIENTS_BURST);
        // A clock that went back refills nothing, and counting restarts from its new time.
        self.new_tokens_at = now;
        if self.new_tokens < 1.0 {
            return false;
        }
        self.new_tokens -= 1.0;
        true
    }

    fn remove(&mut self, ip: IpAddr) {
        if let Some(client) = self.clients.remove(&ip) {
            self.by_last_seen.remove(&(client.last_seen, ip));
            let prefix = prefix_of(ip);
            if let Some(count) = self.per_prefix.get_mut(&prefix) {
                *count -= 1;
                if *count == 0 {
                    self.per_prefix.remove(&prefix);
                }
            }
        }
    }
}

impl Inventory {
    /// Loads `state_dir/inventory.json` when present.
    pub fn load(state_dir: &Path, max_clients: usize) -> Result<Inventory> {
        Inventory::load_with_clock(state_dir, max_clients, Arc::new(SystemTime::now))
    }

    /// Like [`Inventory::load`], with the time taken from `clock`.
    pub fn load_with_clock(
        state_dir: &Path,
        max_clients: usize,
        clock: Clock,
    ) -> Result<Inventory> {
        let path = state_dir.join("inventory.json");
        let (clients, mut days) = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<StateIn>(&bytes)
                .with_context(|| format!("{} is not a tlsbridge inventory", path.display()))?
            {
                StateIn::Current { clients, days } => (clients, days),
                StateIn::Clients(clients) => (clients, BTreeMap::new()),
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => (Vec::new(), BTreeMap::new()),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let now = clock();
        prune_days(&mut days, now);
        Ok(Inventory {
            state: Mutex::new(State::new(clients, days, now)),
            max_clients: max_clients.max(1),
            path,
            clock,
        })
    }

    /// The inventory's idea of now (the system clock outside tests).
    pub fn now(&self) -> SystemTime {
        (self.clock)()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&self, s: &Sighting) {
        let at = self.now();
        let now = rfc3339(at);
        let today = day_of(at);
        let mut state = self.lock();
        // A device counts once a day: it is new today unless it was last seen earlier today.
        let new_today = match state.clients.get(&s.ip) {
            Some(c) => c.last_seen.get(..10) != Some(today.as_str()),
            None => true,
        };
        // The oldest day can only fall out of the window when a new one comes in.
        let first_of_day = !state.days.contains_key(&today);
        let day = state.days.entry(today).or_default();
        *day.connections.entry(s.version.to_string()).or_insert(0) += 1;
        if new_today {
            day.devices += 1;
        }
        if first_of_day {
            prune_days(&mut state.days, at);
        }
        let known = state.clients.contains_key(&s.ip);
        if !known && !state.admit_new(s.ip, at) {
            // Counted in the day's numbers, but no new entry: a flood must not flush the
            // devices already known.
            return;
        }
        let client = state.clients.entry(s.ip).or_insert_with(|| Client {
            ip: s.ip,
            first_seen: now.clone(),
            last_seen: now.clone(),
            connections: 0,
            versions: BTreeMap::new(),
            ciphers: BTreeMap::new(),
            routes: BTreeSet::new(),
            last_sni: String::new(),
            ehlo: String::new(),
            auth: None,
        });
        let previous = std::mem::replace(&mut client.last_seen, now.clone());
        client.connections += 1;
        *client.versions.entry(s.version.to_string()).or_insert(0) += 1;
        if !s.cipher.is_empty() {
            *client.ciphers.entry(s.cipher.to_string()).or_insert(0) += 1;
        }
        client.routes.insert(s.route.to_string());
        if !s.sni.is_empty() {
            client.last_sni = s.sni.to_string();
        }
        if let Some(ehlo) = s.ehlo.filter(|e| !e.is_empty()) {
            client.ehlo = ehlo.to_string();
        }
        if known {
            state.by_last_seen.remove(&(previous, s.ip));
        } else {
            *state.per_prefix.entry(prefix_of(s.ip)).or_insert(0) += 1;
        }
        state.by_last_seen.insert((now, s.ip));
        while state.clients.len() > self.max_clients {
            // The device just seen stays, even when others were last seen in the same second.
            let Some(&(_, oldest)) = state.by_last_seen.iter().find(|(_, ip)| *ip != s.ip) else {
                break;
            };
            state.remove(oldest);
        }
    }

    /// Records the EHLO name of a device already in the inventory.
    pub fn set_ehlo(&self, ip: IpAddr, name: &str) {
        if let Some(client) = self.lock().clients.get_mut(&ip) {
            client.ehlo = name.to_string();
        }
    }

    /// Records how a device already in the inventory authenticates (e.g. `XOAUTH2`).
    pub fn set_auth(&self, ip: IpAddr, auth: &str) {
        if let Some(client) = self.lock().clients.get_mut(&ip) {
            client.auth = Some(auth.to_string());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every client, most recently seen first.
    pub fn snapshot(&self) -> Vec<Client> {
        let mut all: Vec<Client> = self.lock().clients.values().cloned().collect();
        sort_clients(&mut all);
        all
    }

    /// The daily counts, oldest day first, keyed by UTC date (`YYYY-MM-DD`); the last
    /// [`MAX_DAYS`] days at most.
    pub fn daily(&self) -> BTreeMap<String, DayCounts> {
        let at = self.now();
        let mut days = self.lock().days.clone();
        prune_days(&mut days, at);
        days
    }

    /// Writes the inventory atomically (temp file + rename).
    pub fn save(&self) -> Result<()> {
        let clients = self.snapshot();
        let days = self.daily();
        let json = serde_json::to_vec_pretty(&StateOut {
            clients: &clients,
            days: &days,
        })?;
        // 0600: it lists vulnerable devices.
        crate::fsutil::write_atomic(&self.path, &json, 0o600)
    }
}

/// Most recently seen first, then by address.
fn sort_clients(clients: &mut [Client]) {
    clients.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.ip.cmp(&b.ip)));
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The UTC date of `at` as `YYYY-MM-DD` (dates before 1970 read as 1970-01-01).
pub fn day_of(at: SystemTime) -> String {
    let at = at.max(SystemTime::UNIX_EPOCH);
    let mut text = rfc3339(at);
    text.truncate(10);
    text
}

/// The `n` UTC dates ending with the day of `at`, oldest first.
pub fn last_days(at: SystemTime, n: u64) -> Vec<String> {
    (0..n)
        .rev()
        .map(|back| {
            day_of(
                at.checked_sub(DAY * back as u32)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            )
        })
        .collect()
}

/// Drops the days older than the last [`MAX_DAYS`] (and any key that is not a date).
fn prune_days(days: &mut BTreeMap<String, DayCounts>, at: SystemTime) {
    let oldest = day_of(
        at.checked_sub(DAY * (MAX_DAYS as u32 - 1))
            .unwrap_or(SystemTime::UNIX_EPOCH),
    );
    days.retain(|day, _| day.as_str() >= oldest.as_str() && is_date(day));
}

fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// The inventories of several instances as one: a device seen by several gets its connections
/// and per-version and per-cipher counts added up, the earliest `first_seen`, the latest
/// `last_seen` and the union of routes; its names and `auth` come from the instance that saw it
/// last (the other's when that one has none). Most recently seen first.
pub fn merge(inventories: impl IntoIterator<Item = Vec<Client>>) -> Vec<Client> {
    let mut merged: HashMap<IpAddr, Client> = HashMap::new();
    for client in inventories.into_iter().flatten() {
        let Some(have) = merged.get_mut(&client.ip) else {
            merged.insert(client.ip, client);
            continue;
        };
        let add = |into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>| {
            for (key, n) in from {
                let count = into.entry(key).or_insert(0);
                *count = count.saturating_add(n);
            }
        };
        add(&mut have.versions, client.versions);
        add(&mut have.ciphers, client.ciphers);
        have.routes.extend(client.routes);
        have.connections = have.connections.saturating_add(client.connections);
        if client.first_seen < have.first_seen {
            have.first_seen = client.first_seen;
        }
        let newer = client.last_seen > have.last_seen;
        let pick = |have: &mut String, theirs: String| {
            if have.is_empty() || (newer && !theirs.is_empty()) {
                *have = theirs;
            }
        };
        pick(&mut have.last_sni, client.last_sni);
        pick(&mut have.ehlo, client.ehlo);
        if have.auth.is_none() || (newer && client.auth.is_some()) {
            have.auth = client.auth;
        }
        if newer {
            have.last_seen = client.last_seen;
        }
    }
    let mut all: Vec<Client> = merged.into_values().collect();
    sort_clients(&mut all);
    all
}

/// The CSV columns of [`csv`].
pub const CSV_HEADER: [&str; 9] = [
    "address",
    "client_name",
    "sni",
    "versions",
    "ciphers",
    "routes",
    "first_seen",
    "last_seen",
    "connections",
];

/// The inventory as CSV (RFC 4180: CRLF line ends, fields quoted where needed), a header row and
/// one row per device, for spreadsheets. A cell that a spreadsheet would read as a formula
/// (starting with `=`, `+`, `-`, `@`, a tab or a carriage return) gets a leading apostrophe.
pub fn csv(clients: &[Client]) -> String {
    let counts = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} ({v})"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut out = String::new();
    let mut row = |cells: &[&str]| {
        let cells: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    };
    row(&CSV_HEADER);
    for c in clients {
        row(&[
            &c.ip.to_string(),
            &c.ehlo,
            &c.last_sni,
            &counts(&c.versions),
            &counts(&c.ciphers),
            &c.routes.iter().cloned().collect::<Vec<_>>().join("; "),
            &c.first_seen,
            &c.last_seen,
            &c.connections.to_string(),
        ]);
    }
    out
}

fn csv_cell(text: &str) -> String {
    let guarded = match text.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{text}"),
        _ => text.to_string(),
    };
    if guarded.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", guarded.replace('"', "\"\""))
    } else {
        guarded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sighting(ip: &str, version: &'static str) -> (IpAddr, &'static str) {
        (ip.parse().unwrap(), version)
    }

    #[test]
    fn aggregates_persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = Inventory::load(dir.path(), 10).unwrap();
        for (ip, version) in [
            sighting("10.0.0.7", "TLSv1"),
            sighting("10.0.0.7", "TLSv1.1"),
            sighting("10.0.0.8", "plain"),
        ] {
            inventory.record(&Sighting {
                ip,
                route: "smtp",
                version,
                cipher: if version == "plain" { "" } else { "AES128-SHA" },
                sni: "",
                ehlo: Some("MX-3070"),
            });
        }
        inventory.save().unwrap();
        let again = Inventory::load(dir.path(), 10).unwrap();
        assert_eq!(again.snapshot(), inventory.snapshot());
        let seven = again
            .snapshot()
            .into_iter()
            .find(|c| c.ip.to_string() == "10.0.0.7")
            .unwrap();
        assert_eq!(seven.connections, 2);
        assert_eq!(seven.versions.get("TLSv1"), Some(&1));
        assert_eq!(seven.ciphers.get("AES128-SHA"), Some(&2));
        assert_eq!(seven.ehlo, "MX-3070");
    }

    #[test]
    fn bounded_by_dropping_the_least_recently_seen() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = Inventory::load(dir.path(), 2).unwrap();
        for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            std::thread::sleep(Duration::from_millis(1));
            let ip: IpAddr = ip.parse().unwrap();
            inventory.record(&Sighting {
                ip,
                route: "r",
                version: "TLSv1",
                cipher: "",
                sni: "",
                ehlo: None,
            });
        }
        assert_eq!(inventory.len(), 2);
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("inventory.json"), b"{not json").unwrap();
        let err = Inventory::load(dir.path(), 10).err().unwrap().to_string();
        assert!(err.contains("inventory.json"), "{err}");
    }

    /// A clock the test moves by hand.
    fn test_clock(start: SystemTime) -> (Arc<Mutex<SystemTime>>, Clock) {
        let at = Arc::new(Mutex::new(start));
        let read = at.clone();
        (at, Arc::new(move || *read.lock().unwrap()))
    }

    fn day_one() -> SystemTime {
        humantime::parse_rfc3339("2025-03-01T10:00:00Z").unwrap()
    }

    fn seen(inventory: &Inventory, ip: &str, version: &str) {
        inventory.record(&Sighting {
            ip: ip.parse().unwrap(),
            route: "smtp",
            version,
            cipher: "",
            sni: "",
            ehlo: None,
        });
    }

    #[test]
    fn daily_counts_by_version_and_distinct_devices_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (at, clock) = test_clock(day_one());
        let inventory = Inventory::load_with_clock(dir.path(), 10, clock.clone()).unwrap();
        seen(&inventory, "10.0.0.7", "TLSv1");
        seen(&inventory, "10.0.0.7", "TLSv1");
        seen(&inventory, "10.0.0.8", "plain");
        *at.lock().unwrap() += DAY;
        seen(&inventory, "10.0.0.7", "TLSv1.1");
        inventory.save().unwrap();

        let again = Inventory::load_with_clock(dir.path(), 10, clock).unwrap();
        let days = again.daily();
        assert_eq!(days, inventory.daily());
        let first = &days["2025-03-01"];
        assert_eq!(first.connections.get("TLSv1"), Some(&2));
        assert_eq!(first.connections.get("plain"), Some(&1));
        assert_eq!((first.total(), first.devices), (3, 2));
        let second = &days["2025-03-02"];
        assert_eq!((second.total(), second.devices), (1, 1));
        // The device seen before the restart is not counted again the same day.
        seen(&again, "10.0.0.7", "TLSv1.1");
        assert_eq!(again.daily()["2025-03-02"].devices, 1);
        assert_eq!(again.daily()["2025-03-02"].total(), 2);
    }

    #[test]
    fn daily_counts_age_out_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (at, clock) = test_clock(day_one());
        let inventory = Inventory::load_with_clock(dir.path(), 10, clock.clone()).unwrap();
        seen(&inventory, "10.0.0.7", "TLSv1");
        *at.lock().unwrap() += DAY * (MAX_DAYS as u32 - 1);
        seen(&inventory, "10.0.0.7", "TLSv1");
        let days = inventory.daily();
        assert_eq!(days.len(), 2, "{days:?}");
        inventory.save().unwrap();

        // A day later the first day is past the bound: gone at load, and from a running one.
        *at.lock().unwrap() += DAY;
        let again = Inventory::load_with_clock(dir.path(), 10, clock).unwrap();
        assert_eq!(again.daily().keys().collect::<Vec<_>>(), ["2025-05-29"]);
        assert_eq!(inventory.daily().len(), 1);
        seen(&inventory, "10.0.0.9", "plain");
        assert_eq!(inventory.daily().len(), 2);
        assert!(inventory.lock().days.len() <= MAX_DAYS as usize);
    }

    #[test]
    fn the_older_array_format_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"[{"ip":"10.0.0.7","first_seen":"2025-01-01T00:00:00Z",
            "last_seen":"2025-01-02T00:00:00Z","connections":3,"versions":{"TLSv1":3},
            "ciphers":{},"routes":["smtp"]}]"#;
        std::fs::write(dir.path().join("inventory.json"), old).unwrap();
        let inventory = Inventory::load(dir.path(), 10).unwrap();
        let clients = inventory.snapshot();
        assert_eq!(clients.len(), 1);
        assert_eq!((clients[0].connections, clients[0].auth.clone()), (3, None));
        assert!(inventory.daily().is_empty());
        // Written back in the current format, which loads too.
        inventory.save().unwrap();
        let text = std::fs::read_to_string(dir.path().join("inventory.json")).unwrap();
        assert!(text.trim_start().starts_with('{'), "{text}");
        assert_eq!(Inventory::load(dir.path(), 10).unwrap().snapshot(), clients);
    }

    #[test]
    fn the_clients_json_has_no_auth_until_one_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = Inventory::load(dir.path(), 10).unwrap();
        seen(&inventory, "10.0.0.7", "TLSv1");
        let json = serde_json::to_string(&inventory.snapshot()).unwrap();
        assert!(!json.contains("auth"), "{json}");
        inventory.set_auth("10.0.0.7".parse().unwrap(), "XOAUTH2");
        assert_eq!(inventory.snapshot()[0].auth.as_deref(), Some("XOAUTH2"));
    }

    fn client(ip: &str, first: &str, last: &str, n: u64, version: &str, route: &str) -> Client {
        Client {
            ip: ip.parse().unwrap(),
            first_seen: first.into(),
            last_seen: last.into(),
            connections: n,
            versions: BTreeMap::from([(version.to_string(), n)]),
            ciphers: BTreeMap::from([("AES128-SHA".to_string(), n)]),
            routes: BTreeSet::from([route.to_string()]),
            last_sni: String::new(),
            ehlo: format!("{route}-name"),
            auth: None,
        }
    }

    #[test]
    fn merging_instances_adds_up_a_device_seen_by_several() {
        let a = vec![
            client(
                "10.0.0.7",
                "2025-01-02T00:00:00Z",
                "2025-02-01T00:00:00Z",
                3,
                "TLSv1",
                "smtp",
            ),
            client(
                "10.0.0.8",
                "2025-01-01T00:00:00Z",
                "2025-01-05T00:00:00Z",
                1,
                "plain",
                "smtp",
            ),
        ];
        let b = vec![client(
            "10.0.0.7",
            "2025-01-01T00:00:00Z",
            "2025-03-01T00:00:00Z",
            4,
            "TLSv1.1",
            "imap",
        )];
        let merged = merge([a, b]);
        assert_eq!(merged.len(), 2);
        let seven = &merged[0];
        assert_eq!(seven.ip.to_string(), "10.0.0.7");
        assert_eq!(seven.connections, 7);
        assert_eq!(seven.first_seen, "2025-01-01T00:00:00Z");
        assert_eq!(seven.last_seen, "2025-03-01T00:00:00Z");
        assert_eq!(seven.versions.get("TLSv1"), Some(&3));
        assert_eq!(seven.versions.get("TLSv1.1"), Some(&4));
        assert_eq!(seven.ciphers.get("AES128-SHA"), Some(&7));
        assert_eq!(seven.routes.iter().collect::<Vec<_>>(), ["imap", "smtp"]);
        assert_eq!(seven.ehlo, "imap-name", "the name from the latest sighting");
        assert_eq!(merged[1].connections, 1);
        assert!(merge(Vec::<Vec<Client>>::new()).is_empty());
    }

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let mut c = client(
            "10.0.0.7",
            "2025-01-01T00:00:00Z",
            "2025-01-02T00:00:00Z",
            2,
            "TLSv1",
            "smtp",
        );
        c.ehlo = "=HYPERLINK(\"http://x\",\"a,b\")".into();
        c.last_sni = "@sum".into();
        let text = csv(&[c]);
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert_eq!(lines[0], CSV_HEADER.join(","));
        assert_eq!(lines.len(), 2, "{text}");
        assert!(text.ends_with("\r\n"));
        assert!(
            lines[1]
                .starts_with(r#"10.0.0.7,"'=HYPERLINK(""http://x"",""a,b"")",'@sum,TLSv1 (2),"#),
            "{}",
            lines[1]
        );
        assert!(lines[1].ends_with(",2025-01-01T00:00:00Z,2025-01-02T00:00:00Z,2"));
        for cell in ["-1", "+1", "\tx", "\rx"] {
            assert!(
                csv_cell(cell).trim_start_matches('"').starts_with('\''),
                "{cell}"
            );
        }
        assert_eq!(csv_cell("plain"), "plain");
    }

    #[test]
    fn a_flood_of_new_addresses_cannot_flush_known_devices() {
        let dir = tempfile::tempdir().unwrap();
        let (at, clock) = test_clock(day_one());
        let inventory = Inventory::load_with_clock(dir.path(), 100, clock).unwrap();
        seen(&inventory, "10.0.0.7", "TLSv1");
        seen(&inventory, "fd00:1::7", "TLSv1");
        *at.lock().unwrap() += Duration::from_secs(10);
        // 300 siblings in one /64 at once: at most 16 entries for the /64.
        for n in 1..=300u16 {
            seen(&inventory, &format!("fd00::{n:x}"), "TLSv1");
        }
        let of_64 = |inv: &Inventory| {
            inv.snapshot()
                .iter()
                .filter(|c| prefix_of(c.ip) == prefix_of("fd00::1".parse().unwrap()))
                .count()
        };
        assert_eq!(of_64(&inventory), MAX_CLIENTS_PER_PREFIX);
        // 300 distinct IPv4 addresses at once: the burst, then nothing until tokens come back.
        for n in 0..300u32 {
            let ip = std::net::Ipv4Addr::from(0x0a01_0000 + n);
            seen(&inventory, &ip.to_string(), "TLSv1");
        }
        let burst = NEW_CLIENTS_BURST as usize;
        assert_eq!(
            inventory.len(),
            2 + MAX_CLIENTS_PER_PREFIX + burst - MAX_CLIENTS_PER_PREFIX
        );
        // Known devices always update, and stay.
        seen(&inventory, "10.0.0.7", "TLSv1.1");
        let seven = inventory
            .snapshot()
            .into_iter()
            .find(|c| c.ip.to_string() == "10.0.0.7")
            .unwrap();
        assert_eq!(seven.connections, 2);
        assert!(inventory
            .snapshot()
            .iter()
            .any(|c| c.ip.to_string() == "fd00:1::7"));
        // A second later, ten more new entries are admitted.
        *at.lock().unwrap() += Duration::from_secs(1);
        let before = inventory.len();
        for n in 1000..1100u32 {
            let ip = std::net::Ipv4Addr::from(0x0a01_0000 + n);
            seen(&inventory, &ip.to_string(), "TLSv1");
        }
        assert_eq!(inventory.len(), before + NEW_CLIENTS_PER_SECOND as usize);
    }

    #[test]
    fn a_new_device_is_kept_when_it_ties_with_older_ones_on_the_second() {
        let dir = tempfile::tempdir().unwrap();
        let (_at, clock) = test_clock(day_one());
        let inventory = Inventory::load_with_clock(dir.path(), 2, clock).unwrap();
        for ip in ["10.0.0.9", "10.0.0.8", "10.0.0.1"] {
            seen(&inventory, ip, "TLSv1");
        }
        let ips: Vec<String> = inventory
            .snapshot()
            .iter()
            .map(|c| c.ip.to_string())
            .collect();
        assert_eq!(inventory.len(), 2);
        assert!(ips.contains(&"10.0.0.1".to_string()), "{ips:?}");
    }

    #[test]
    fn eviction_drops_the_least_recently_seen_by_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (at, clock) = test_clock(day_one());
        let inventory = Inventory::load_with_clock(dir.path(), 3, clock).unwrap();
        for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            seen(&inventory, ip, "TLSv1");
            *at.lock().unwrap() += Duration::from_secs(1);
        }
        seen(&inventory, "10.0.0.1", "TLSv1");
        *at.lock().unwrap() += Duration::from_secs(1);
        seen(&inventory, "10.0.0.4", "TLSv1");
        let mut ips: Vec<String> = inventory
            .snapshot()
            .iter()
            .map(|c| c.ip.to_string())
            .collect();
        ips.sort();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.3", "10.0.0.4"]);
        let state = inventory.lock();
        assert_eq!(state.by_last_seen.len(), 3);
        assert_eq!(state.per_prefix.values().sum::<usize>(), 3);
    }
}
