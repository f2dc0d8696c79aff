//! The downgrade log: one `legacy_client` event when a device leg turns out weaker than the
//! upstream leg, and one `session_closed` event for every connection. Both go to the target
//! `tlsbridge::audit` with flat fields (see the README for the contract).

use std::net::SocketAddr;
use std::time::Instant;

use tracing::{info, Span};

use crate::config::Protocol;
use crate::tls::legacy::DeviceTls;
use crate::upstream::UpstreamLeg;

/// The tracing target of audit events, for filters such as `RUST_LOG=tlsbridge::audit=info`.
pub const TARGET: &str = "tlsbridge::audit";

/// What is known about one connection, filled in phase by phase.
#[derive(Debug)]
pub struct SessionRecord {
    pub route: String,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    pub upstream: String,
    /// `SSLv3`/`TLSv1`/.../`plain`, or empty until the device leg is established.
    pub device_tls: &'static str,
    pub cipher: String,
    pub sni: String,
    /// The SMTP EHLO/HELO name the device sent before STARTTLS.
    pub client_name: Option<String>,
    pub upstream_tls: &'static str,
    pub upstream_cipher: String,
    pub downgraded: bool,
    started: Instant,
}

impl SessionRecord {
    pub fn new(
        route: &str,
        peer: SocketAddr,
        protocol: Protocol,
        upstream: String,
    ) -> SessionRecord {
        SessionRecord {
            route: route.to_string(),
            peer,
            protocol,
            upstream,
            device_tls: "",
            cipher: String::new(),
            sni: String::new(),
            client_name: None,
            upstream_tls: "",
            upstream_cipher: String::new(),
            downgraded: false,
            started: Instant::now(),
        }
    }

    /// Records the device leg (`None`: plaintext) and logs `legacy_client` when it was weaker
    /// than TLS 1.2 with forward secrecy.
    pub fn device_established(&mut self, tls: Option<&DeviceTls>) {
        match tls {
            Some(tls) => {
                self.device_tls = tls.version;
                self.cipher = tls.cipher.clone();
                self.sni = tls.sni.clone().unwrap_or_default();
                self.downgraded = tls.downgraded();
            }
            None => {
                self.device_tls = "plain";
                self.downgraded = true;
            }
        }
        let span = Span::current();
        span.record("device_tls", self.device_tls);
        span.record("cipher", self.cipher.as_str());
        if self.downgraded {
            info!(
                target: TARGET,
                event = "legacy_client",
                route = %self.route,
                peer = %self.peer,
                device_tls = self.device_tls,
                cipher = %self.cipher,
                sni = %self.sni,
                protocol = %self.protocol,
                upstream = %self.upstream,
                client_name = self.client_name.as_deref().unwrap_or(""),
                "legacy_client"
            );
        }
    }

    pub fn upstream_established(&mut self, leg: &UpstreamLeg) {
        self.upstream_tls = leg.tls_version;
        self.upstream_cipher = leg.cipher.clone();
        Span::current().record("upstream_tls", self.upstream_tls);
    }

    /// Logs `session_closed`; `error` carries the full cause when the outcome is not `ok`.
    pub fn closed(&self, bytes_up: u64, bytes_down: u64, outcome: &str, error: Option<&str>) {
        info!(
            target: TARGET,
            event = "session_closed",
            route = %self.route,
            peer = %self.peer,
            device_tls = self.device_tls,
            cipher = %self.cipher,
            sni = %self.sni,
            protocol = %self.protocol,
            upstream = %self.upstream,
            upstream_tls = self.upstream_tls,
            upstream_cipher = %self.upstream_cipher,
            bytes_up,
            bytes_down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            outcome,
            error = error.unwrap_or(""),
            "session_closed"
        );
    }
}
