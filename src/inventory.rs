//! The legacy-device inventory: downgraded clients aggregated by device address, persisted
//! atomically to `state_dir/inventory.json` and loaded at start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

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

/// The in-memory inventory, bounded to `max_clients` entries (the least recently seen go first).
pub struct Inventory {
    clients: Mutex<HashMap<IpAddr, Client>>,
    max_clients: usize,
    path: PathBuf,
}

impl Inventory {
    /// Loads `state_dir/inventory.json` when present.
    pub fn load(state_dir: &Path, max_clients: usize) -> Result<Inventory> {
        let path = state_dir.join("inventory.json");
        let clients = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Vec<Client>>(&bytes)
                .with_context(|| format!("{} is not a tlsbridge inventory", path.display()))?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let clients = clients.into_iter().map(|c| (c.ip, c)).collect();
        Ok(Inventory {
            clients: Mutex::new(clients),
            max_clients: max_clients.max(1),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&self, s: &Sighting) {
        let now = now();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let client = clients.entry(s.ip).or_insert_with(|| Client {
            ip: s.ip,
            first_seen: now.clone(),
            last_seen: now.clone(),
            connections: 0,
            versions: BTreeMap::new(),
            ciphers: BTreeMap::new(),
            routes: BTreeSet::new(),
            last_sni: String::new(),
            ehlo: String::new(),
        });
        client.last_seen = now;
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
        if clients.len() > self.max_clients {
            let oldest = clients
                .values()
                .min_by(|a, b| a.last_seen.cmp(&b.last_seen))
                .map(|c| c.ip);
            if let Some(ip) = oldest {
                clients.remove(&ip);
            }
        }
    }

    /// Records the EHLO name of a device already in the inventory.
    pub fn set_ehlo(&self, ip: IpAddr, name: &str) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get_mut(&ip) {
            client.ehlo = name.to_string();
        }
    }

    pub fn len(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every client, most recently seen first.
    pub fn snapshot(&self) -> Vec<Client> {
        let mut all: Vec<Client> = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.ip.cmp(&b.ip)));
        all
    }

    /// Writes the inventory atomically (temp file + rename).
    pub fn save(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.snapshot())?;
        // 0600: it lists vulnerable devices.
        crate::fsutil::write_atomic(&self.path, &json, 0o600)
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
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
}
