//! The integration tests, in one test binary so that the shared support code compiles and links
//! once. Each module covers one area and runs on its own with `cargo test --test it MODULE::`.
//!
//! Every test uses real sockets on 127.0.0.1:0 and real TLS on both legs. Tests that drive
//! outside programs (swaks, dovecot, curl, openssl, aiosmtpd) skip when the program is missing,
//! unless `CI` is set, when they fail instead.

mod support;

mod abuse;
mod accept_backoff;
mod audit_log;
mod dashboard;
mod ends;
mod fail_closed;
mod fleet;
mod imap_pop3;
mod legacy_ciphers;
mod monitoring;
mod operations;
mod peers;
mod probe;
mod resumption;
mod shipped_configs;
mod signals;
mod smtp;
mod sni;
mod tcp;
mod xoauth2;
