//! `tlsbridge inventory [--json|--csv] [--from URL,URL...]`: from the running instance's admin
//! endpoint or, when none answers, from the state file; or merged from several instances' admin
//! endpoints.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use super::admin_client::{self, Endpoint};
use crate::config::Config;
use crate::inventory::{self, Client, Inventory};

/// Returns the rendered inventory (a table, or JSON) and a line naming where it came from.
pub fn inventory(config: &Config, json: bool) -> Result<(String, String)> {
    let token = config.admin.token.as_ref().map(|t| t.expose());
    inventory_with(config, json, false, &[], token)
}

/// Returns the rendered inventory and a line naming where it came from.
///
/// `json` and `csv` pick the format (a table when neither; not both). With `from` (admin base
/// URLs such as `http://10.0.0.5:9480`) the inventories of those instances are fetched and
/// merged, and every one must answer; without, the local instance is asked, else the state file
/// read. `token` is sent as `Authorization: Bearer` to the admin endpoints.
pub fn inventory_with(
    config: &Config,
    json: bool,
    csv: bool,
    from: &[String],
    token: Option<&str>,
) -> Result<(String, String)> {
    if json && csv {
        bail!("--json and --csv exclude each other");
    }
    let (clients, source) = if from.is_empty() {
        local(config, token)?
    } else {
        fleet(from, token)?
    };
    let out = if json {
        serde_json::to_string_pretty(&clients)? + "\n"
    } else if csv {
        inventory::csv(&clients)
    } else {
        table(&clients)
    };
    Ok((out, format!("{} legacy device(s), {source}", clients.len())))
}

fn local(config: &Config, token: Option<&str>) -> Result<(Vec<Client>, String)> {
    if let Some(listen) = config.admin.listen {
        let admin = admin_client::local_address(listen);
        let endpoint = Endpoint {
            authority: admin.to_string(),
        };
        if let Ok((status, body)) = endpoint.get("/clients", token) {
            if status == 200 {
                let clients = parse(&body, &endpoint.authority)?;
                return Ok((clients, format!("from the running instance at {admin}")));
            }
        }
    }
    let stored = Inventory::load(&config.state_dir, usize::MAX)?;
    let path = stored.path().display().to_string();
    Ok((
        stored.snapshot(),
        format!("from {path} (no running instance answered)"),
    ))
}

/// Every instance's `/clients`, merged: an instance that does not answer is an error.
fn fleet(urls: &[String], token: Option<&str>) -> Result<(Vec<Client>, String)> {
    let endpoints = urls
        .iter()
        .flat_map(|list| list.split(','))
        .filter(|url| !url.trim().is_empty())
        .map(Endpoint::parse)
        .collect::<Result<Vec<_>>>()?;
    if endpoints.is_empty() {
        bail!("--from needs at least one admin base URL, e.g. http://10.0.0.5:9480");
    }
    let mut inventories = Vec::with_capacity(endpoints.len());
    for endpoint in &endpoints {
        let (status, body) = endpoint.get("/clients", token)?;
        match status {
            200 => inventories.push(parse(&body, &endpoint.authority)?),
            401 => bail!(
                "{} asks for the admin token (401 on /clients)",
                endpoint.authority
            ),
            other => bail!("{} answered {other} on /clients", endpoint.authority),
        }
    }
    let names: Vec<&str> = endpoints.iter().map(|e| e.authority.as_str()).collect();
    Ok((
        inventory::merge(inventories),
        format!(
            "merged from {} instance(s): {}",
            endpoints.len(),
            names.join(", ")
        ),
    ))
}

fn parse(body: &str, from: &str) -> Result<Vec<Client>> {
    serde_json::from_str(body)
        .with_context(|| format!("the admin endpoint's /clients at {from} is not an inventory"))
}

/// The inventory as a table for `tlsbridge inventory`.
fn table(clients: &[Client]) -> String {
    let join = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k}({v})"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let rows: Vec<[String; 8]> = clients
        .iter()
        .map(|c| {
            [
                c.ip.to_string(),
                c.last_seen.clone(),
                c.connections.to_string(),
                join(&c.versions),
                join(&c.ciphers),
                c.routes.iter().cloned().collect::<Vec<_>>().join(","),
                c.ehlo.clone(),
                c.last_sni.clone(),
            ]
        })
        .collect();
    let header = [
        "DEVICE",
        "LAST_SEEN",
        "CONNECTIONS",
        "TLS",
        "CIPHERS",
        "ROUTES",
        "EHLO",
        "SNI",
    ];
    super::table::table(&header, &rows)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// An admin endpoint that answers one request with `status` and `body`.
    fn instance(status: &'static str, body: String) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = write!(
                tcp,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        });
        url
    }

    fn clients(entries: &[(&str, u64, &str)]) -> String {
        let all: Vec<String> = entries
            .iter()
            .map(|(ip, n, version)| {
                format!(
                    r#"{{"ip":"{ip}","first_seen":"2025-01-01T00:00:00Z","last_seen":"2025-01-02T00:00:00Z",
                    "connections":{n},"versions":{{"{version}":{n}}},"ciphers":{{}},"routes":["smtp"]}}"#
                )
            })
            .collect();
        format!("[{}]", all.join(","))
    }

    #[test]
    fn from_merges_every_instance() {
        let a = instance(
            "200 OK",
            clients(&[("10.0.0.7", 2, "TLSv1"), ("10.0.0.8", 1, "plain")]),
        );
        let b = instance("200 OK", clients(&[("10.0.0.7", 5, "TLSv1.1")]));
        let (merged, source) = fleet(&[format!("{a},{b}")], None).unwrap();
        assert_eq!(merged.len(), 2);
        let seven = merged
            .iter()
            .find(|c| c.ip.to_string() == "10.0.0.7")
            .unwrap();
        assert_eq!(seven.connections, 7);
        assert_eq!(seven.versions.len(), 2);
        assert!(source.contains("2 instance(s)"), "{source}");
    }

    #[test]
    fn from_fails_when_an_instance_refuses() {
        let a = instance("200 OK", clients(&[("10.0.0.7", 2, "TLSv1")]));
        let b = instance("401 Unauthorized", String::new());
        let err = fleet(&[a, b.clone()], None).err().unwrap().to_string();
        assert!(
            err.contains("admin token") && err.contains(b.trim_start_matches("http://")),
            "{err}"
        );
        assert!(fleet(&[" , ".into()], None).is_err());
    }
}
