//! Reconciles who expects a greeting once both legs are encrypted.
//!
//! The device expects one when its leg was implicit TLS or plain (after STARTTLS it does not).
//! The upstream leg has already been read up to its greeting: first thing after implicit TLS,
//! or before STARTTLS. An implicit-TLS upstream's greeting came inside TLS, so a device that
//! expects one gets it. A STARTTLS upstream sends none after TLS, and its pre-TLS greeting is
//! unauthenticated text anyone on the path could have written: a device that expects a
//! greeting gets tlsbridge's own (SMTP `220 <name> ESMTP`, IMAP `* OK`, POP3 `+OK`) instead,
//! and the pre-TLS text never reaches it. A greeting the device does not expect is dropped;
//! bytes the upstream sent after an implicit-TLS greeting always go through. From here on bytes
//! flow untouched.

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::config::{DeviceMode, UpstreamMode};
use crate::protocol::{self, Dialect};

/// How the two legs of a route started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Legs {
    pub dialect: Option<Dialect>,
    pub device: DeviceMode,
    pub upstream: UpstreamMode,
}

impl Legs {
    /// True when the device expects a server greeting once both legs are up.
    pub fn device_expects_greeting(self) -> bool {
        self.device != DeviceMode::Starttls
    }
}

/// What the device must see before the relay starts, from the upstream's greeting and the
/// bytes that followed it inside TLS. `server_name` names tlsbridge in its own greeting.
pub fn for_device(
    legs: Legs,
    server_name: &str,
    upstream_greeting: &[u8],
    leftover: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    if legs.device_expects_greeting() {
        out = match (legs.upstream, legs.dialect) {
            // Never the pre-TLS text: tlsbridge's own greeting.
            (UpstreamMode::Starttls, Some(dialect)) => protocol::own_greeting(dialect, server_name),
            _ => upstream_greeting.to_vec(),
        };
    }
    out.extend_from_slice(leftover);
    out
}

/// Writes `bytes` to the device; returns how many were written.
pub async fn send<D: AsyncWrite + Unpin>(device: &mut D, bytes: &[u8]) -> std::io::Result<u64> {
    if !bytes.is_empty() {
        device.write_all(bytes).await?;
        device.flush().await?;
    }
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};

    fn legs(device: DeviceMode, upstream: UpstreamMode) -> Legs {
        Legs {
            dialect: Some(Dialect::Imap),
            device,
            upstream,
        }
    }

    /// The legs, the upstream's greeting, the bytes after it, and what the device must get.
    type Case<'a> = (Legs, &'a [u8], &'a [u8], &'a [u8]);

    #[tokio::test]
    async fn each_combination_gets_the_right_greeting_over_a_stream() {
        let pre_tls = b"* ok [capability IMAP4rev1 STARTTLS AUTH=PLAIN] forged\r\n";
        let cases: [Case; 5] = [
            (
                legs(DeviceMode::Tls, UpstreamMode::Tls),
                b"* OK ready\r\n",
                b"* 1 EXISTS\r\n",
                b"* OK ready\r\n* 1 EXISTS\r\n",
            ),
            (
                legs(DeviceMode::Tls, UpstreamMode::Starttls),
                pre_tls,
                b"",
                b"* OK gw tlsbridge ready\r\n",
            ),
            (
                legs(DeviceMode::Starttls, UpstreamMode::Tls),
                b"* OK ready\r\n",
                b"",
                b"",
            ),
            (
                legs(DeviceMode::Plain, UpstreamMode::Starttls),
                pre_tls,
                b"",
                b"* OK gw tlsbridge ready\r\n",
            ),
            (
                legs(DeviceMode::Plain, UpstreamMode::Tls),
                b"* OK ready\r\n",
                b"",
                b"* OK ready\r\n",
            ),
        ];
        for (legs, greeting, leftover, expected) in cases {
            let (mut ours, mut device) = duplex(1024);
            let bytes = for_device(legs, "gw", greeting, leftover);
            let sent = send(&mut ours, &bytes).await.unwrap();
            drop(ours);
            let mut got = Vec::new();
            device.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, expected, "{legs:?}");
            assert_eq!(sent, expected.len() as u64);
        }
    }

    #[test]
    fn own_greetings_per_protocol() {
        let own = |dialect| {
            let legs = Legs {
                dialect: Some(dialect),
                device: DeviceMode::Tls,
                upstream: UpstreamMode::Starttls,
            };
            for_device(legs, "gw", b"220 evil ESMTP AUTH PLAIN\r\n", b"")
        };
        assert_eq!(own(Dialect::Smtp), b"220 gw ESMTP tlsbridge ready\r\n");
        assert_eq!(own(Dialect::Imap), b"* OK gw tlsbridge ready\r\n");
        assert_eq!(own(Dialect::Pop3), b"+OK gw tlsbridge ready\r\n");
    }
}
