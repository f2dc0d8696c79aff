//! The two TLS ends: OpenSSL for the device leg (legacy protocols welcome), rustls for the
//! upstream leg (TLS 1.2+ only, always verified).

pub mod client;
pub mod legacy;
pub mod modern;
