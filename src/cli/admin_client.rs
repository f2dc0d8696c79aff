//! A minimal HTTP/1.1 GET against the admin endpoint, for `health` and `inventory`: no client
//! library needed, and nothing but loopback is ever asked.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Bound on connecting to, writing to and reading from the admin endpoint: a local answer is
/// immediate, so anything slower means it is stuck.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Where to reach an admin endpoint bound to `listen` from this host.
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// GETs `path`; returns the status code and the body.
pub fn get(listen: SocketAddr, path: &str) -> Result<(u16, String)> {
    let addr = local_address(listen);
    let timeout = ADMIN_TIMEOUT;
    let mut tcp = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("no admin endpoint answers at {addr}"))?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    tcp.take(64 * 1024 * 1024).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP response from {addr}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP response from {addr}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("unexpected chunked response from {addr}");
    }
    Ok((status, body.to_string()))
}
