//! tlsbridge: a TLS upgrade proxy. Devices that only speak legacy TLS (or none) connect to it;
//! it terminates their TLS with OpenSSL, opens its own TLS 1.2+ connection to the upstream
//! (Microsoft 365) with rustls, always verifying it, relays the bytes, and logs every
//! downgraded device.
//!
//! # Layout
//! A connection's way, one module per phase:
//! - [`listener`]: accept, ACL, limits, one task per connection.
//! - [`device`]: the device-side dialog (STARTTLS server role) and the OpenSSL handshake.
//! - [`upstream`]: connect, the upstream dialog (STARTTLS client role), the rustls handshake;
//!   started at accept time in parallel with the device leg.
//! - [`greeting`]: reconciles who expects a greeting.
//! - [`relay`]: both directions with half-close, idle timeout and byte counts.
//! - [`audit`]: the `legacy_client` and `session_closed` events.
//!
//! [`session`] strings the phases together (and reads a [`proxy_protocol`] header first where a
//! route asks for one); [`server`] owns the shared state, reload and shutdown.
//! Around them: [`config`] (layered TOML), [`certs`] (the local CA), [`tls`] (both TLS ends),
//! [`protocol`] (SMTP, IMAP and POP3 dialogs, both roles, over any async stream), [`admin`]
//! (the hyper endpoint) with [`metrics`], [`inventory`] and the [`dashboard`] page, [`signals`], [`logging`], and
//! [`cli`] (the subcommands other than `run`).
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod device;
pub mod fsutil;
pub mod greeting;
pub mod inventory;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod proxy_protocol;
pub mod relay;
pub mod server;
pub mod session;
pub mod signals;
pub mod text;
pub mod tls;
pub mod upstream;
