//! Reconciles who expects a greeting once both legs are encrypted.
//!
//! The device expects one when its leg was implicit TLS or plain (after STARTTLS it does not).
//! The upstream leg has already been read up to its greeting: before STARTTLS, or first thing
//! after implicit TLS. So the device gets that greeting when it expects one, and otherwise it is
//! dropped; from here on bytes flow untouched.

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::config::{Route, UpstreamMode};
use crate::protocol;
use crate::upstream::UpstreamLeg;

/// Writes what the device must see before the relay starts; returns the bytes written.
pub async fn reconcile<D: AsyncWrite + Unpin>(
    route: &Route,
    device: &mut D,
    upstream: &UpstreamLeg,
) -> std::io::Result<u64> {
    let mut out = Vec::new();
    if route.device_expects_greeting() {
        out = match route.upstream_tls {
            UpstreamMode::Starttls => {
                protocol::greeting_for_device(route.protocol, &upstream.greeting)
            }
            UpstreamMode::Tls => upstream.greeting.clone(),
        };
    }
    out.extend_from_slice(&upstream.leftover);
    if !out.is_empty() {
        device.write_all(&out).await?;
        device.flush().await?;
    }
    Ok(out.len() as u64)
}
