//! A minimal HTTP/1.1 GET against an admin endpoint, for `health` and `inventory`: no client
//! library needed. Plain HTTP only, with bounded connect, read and overall times and a bounded
//! response size.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How long one connection attempt, and then the whole exchange, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response read.
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;

/// Where to reach an admin endpoint bound to `listen` from this host.
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// GETs `path` from the endpoint bound to `listen` on this host; returns the status code and
/// the body.
pub fn get(listen: SocketAddr, path: &str) -> Result<(u16, String)> {
    get_with_token(listen, path, None)
}

/// Like [`get`], with `Authorization: Bearer <token>` when a token is given.
pub fn get_with_token(
    listen: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String)> {
    let addr = local_address(listen);
    request(&[addr], &addr.to_string(), path, token)
}

/// An admin endpoint elsewhere: `host:port`, from a base URL such as `http://10.0.0.5:9480`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` as given (the `Host` header).
    pub authority: String,
}

impl Endpoint {
    /// Parses an admin base URL: `http://host:port` (a trailing `/` is fine), or a bare
    /// `host:port`. HTTPS is not spoken.
    pub fn parse(url: &str) -> Result<Endpoint> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                bail!("{url}: only http:// admin endpoints are supported, not {scheme}://")
            }
            None => url,
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty()
            || authority.contains(['/', '?', '#', '@'])
            || authority.contains(char::is_whitespace)
        {
            bail!("{url}: expected an admin base URL such as http://10.0.0.5:9480");
        }
        let port_ok = authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.ends_with(':') && port.parse::<u16>().is_ok()
        });
        if !port_ok {
            bail!("{url}: the admin base URL needs a port, e.g. http://10.0.0.5:9480");
        }
        Ok(Endpoint {
            authority: authority.to_string(),
        })
    }

    /// GETs `path`, with `Authorization: Bearer <token>` when a token is given; returns the
    /// status code and the body.
    pub fn get(&self, path: &str, token: Option<&str>) -> Result<(u16, String)> {
        let addrs: Vec<SocketAddr> = self
            .authority
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {}", self.authority))?
            .collect();
        request(&addrs, &self.authority, path, token)
    }
}

fn request(
    addrs: &[SocketAddr],
    host: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String)> {
    let mut last_err = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(stream) => {
                tcp = Some(stream);
                break;
            }
            Err(err) => last_err = Some(err),
        }
    }
    let Some(mut tcp) = tcp else {
        let why = last_err
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no address".into());
        bail!("no admin endpoint answers at {host}: {why}");
    };
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    tcp.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    let auth = match token {
        Some(token) => format!("Authorization: Bearer {}\r\n", token.trim()),
        None => String::new(),
    };
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "{host} took longer than {}s to answer",
                EXCHANGE_TIMEOUT.as_secs()
            );
        }
        tcp.set_read_timeout(Some(left))?;
        let n = tcp
            .read(&mut chunk)
            .with_context(|| format!("reading the answer from {host}"))?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
        if response.len() as u64 > MAX_RESPONSE {
            bail!("the answer from {host} is larger than {MAX_RESPONSE} bytes");
        }
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP response from {host}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP response from {host}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("unexpected chunked response from {host}");
    }
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_base_urls() {
        for (url, authority) in [
            ("http://10.0.0.5:9480", "10.0.0.5:9480"),
            ("HTTP://tlsbridge-0.lan:9480/", "tlsbridge-0.lan:9480"),
            ("10.0.0.5:9480", "10.0.0.5:9480"),
            ("http://[fd00::5]:9480", "[fd00::5]:9480"),
        ] {
            assert_eq!(Endpoint::parse(url).unwrap().authority, authority, "{url}");
        }
        for url in [
            "https://10.0.0.5:9480",
            "http://10.0.0.5",
            "http://10.0.0.5:9480/clients",
            "http://user@10.0.0.5:9480",
            "http://:9480",
            "",
        ] {
            assert!(Endpoint::parse(url).is_err(), "{url}");
        }
    }

    #[test]
    fn sends_the_token_and_reads_the_answer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).unwrap() == 1 {
                head.push(byte[0]);
            }
            tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
                .unwrap();
            String::from_utf8(head).unwrap()
        });
        let endpoint = Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let (status, body) = endpoint.get("/clients", Some("s3cret\n")).unwrap();
        assert_eq!((status, body.as_str()), (200, "[]"));
        let head = server.join().unwrap();
        assert!(head.starts_with("GET /clients HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains("\r\nAuthorization: Bearer s3cret\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
            "{head}"
        );
    }
}
