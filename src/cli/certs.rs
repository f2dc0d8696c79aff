//! `tlsbridge certs init|show|export-ca`.

use anyhow::{bail, Result};

use crate::certs::{self, Provision};
use crate::config::DeviceTlsConfig;

pub fn init(tls: &DeviceTlsConfig) -> Result<String> {
    let done = match certs::ensure(tls)? {
        Provision::Existing => {
            "certificate and key already present; nothing generated\n".to_string()
        }
        Provision::Generated { new_ca: true } => {
            "generated a local CA and a device certificate\n".to_string()
        }
        Provision::Generated { new_ca: false } => {
            "generated a device certificate from the existing local CA\n".to_string()
        }
    };
    Ok(done + &show(tls)?)
}

pub fn show(tls: &DeviceTlsConfig) -> Result<String> {
    let mut out = certs::describe(&tls.cert)?;
    let (ca, _) = certs::ca_paths(tls);
    if ca.exists() {
        out += &certs::describe(&ca)?;
        out += &format!(
            "devices that verify their server: import {} (tlsbridge certs export-ca)\n",
            ca.display()
        );
    }
    Ok(out)
}

pub fn export_ca(tls: &DeviceTlsConfig) -> Result<String> {
    let (ca, _) = certs::ca_paths(tls);
    if !ca.exists() {
        bail!(
            "no local CA at {}; run `tlsbridge certs init` first",
            ca.display()
        );
    }
    Ok(std::fs::read_to_string(&ca)?)
}
