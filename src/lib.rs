//! tlsbridge: a TLS upgrade proxy. Devices that only speak legacy TLS (or none) connect to it;
//! it terminates their TLS with OpenSSL, opens its own TLS 1.2+ connection to the upstream
//! (Microsoft 365) with rustls, always verifying it, relays the bytes, and logs every
//! downgraded device.
//!
//! # Layout
//! docs/architecture.md is the map: the layers, which may use which, and one connection's way
//! through the files. In short, a connection's way, one module per phase:
//! - [`listener`]: accept, ACL, the global limit, one task per connection.
//! - [`session`]: strings the phases together; PROXY header, per-address limit.
//! - [`device`]: the device's dialog (STARTTLS server role), the answer to STARTTLS once the
//!   upstream resolves, and the OpenSSL handshake, under one pre-TLS deadline.
//! - [`upstream`]: connect, the upstream dialog (STARTTLS client role), the rustls handshake,
//!   in its own task in parallel with the device leg.
//! - [`greeting`]: reconciles who expects a greeting.
//! - [`relay`]: both directions with half-close, idle timeout and byte counts.
//! - [`audit`]: the `legacy_client` and `session_closed` events, metrics and inventory.
//!
//! Below them: [`context`] (what sessions share), [`limits`], [`outcome`] (typed causes),
//! [`protocol`] (SMTP, IMAP and POP3 dialogs, both roles, over any async stream), [`tls`]
//! (both TLS ends), [`metrics`], [`inventory`] (with the [`dashboard`] page), [`certs`], [`proxy_protocol`], [`config`],
//! [`text`] (the sanitiser) and [`fsutil`]. Above them: [`server`], [`admin`], [`signals`],
//! [`logging`] and [`cli`].
//!
//! Authentication after Basic auth: [`credentials`] (device users and password hashes),
//! [`oauth`] (Entra ID tokens), [`protocol::sasl`] (PLAIN, LOGIN, XOAUTH2), and [`secret`], the
//! masked type every secret value travels in.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod config;
pub mod context;
pub mod credentials;
pub mod dashboard;
pub mod device;
pub mod fsutil;
pub mod greeting;
pub mod inventory;
#[cfg(test)]
mod layering;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod login;
pub mod metrics;
pub mod oauth;
pub mod outcome;
pub mod protocol;
pub mod proxy_protocol;
pub mod relay;
pub mod secret;
pub mod server;
pub mod session;
pub mod signals;
pub mod text;
pub mod tls;
pub mod upstream;
