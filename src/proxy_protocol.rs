//! The PROXY protocol header (v1 text and v2 binary) that load balancers put in front of a
//! connection, read without consuming a byte past it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 octets, CRLF included.
const V1_MAX: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("i/o error reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header. Returns the original source address, or `None` for `LOCAL`/`UNKNOWN`
/// headers (health checks of the balancer itself), where the socket's address stands.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut start = [0u8; 12];
    stream.read_exact(&mut start[..6]).await?;
    if &start[..6] == b"PROXY " {
        return read_v1(stream).await;
    }
    if start[..6] != V2_SIGNATURE[..6] {
        return Err(ProxyHeaderError::Missing);
    }
    stream.read_exact(&mut start[6..]).await?;
    if start != V2_SIGNATURE {
        return Err(ProxyHeaderError::Missing);
    }
    read_v2(stream).await
}

/// `PROXY TCP4 src dst sport dport\r\n`, read byte by byte so nothing after it is consumed.
async fn read_v1<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut line = b"PROXY ".to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::Malformed(
                "v1 header longer than 107 octets",
            ));
        }
        line.push(stream.read_u8().await?);
    }
    let text = std::str::from_utf8(&line[..line.len() - 2])
        .map_err(|_| ProxyHeaderError::Malformed("not ASCII"))?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("bad source address"))?;
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("bad source port"))?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(ProxyHeaderError::Malformed(
                    "address does not match the family",
                ));
            }
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(ProxyHeaderError::Malformed("v1 header fields")),
    }
}

async fn read_v2<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    let (version_command, family, len) = (
        head[0],
        head[1],
        u16::from_be_bytes([head[2], head[3]]) as usize,
    );
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version"));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    match version_command & 0x0f {
        0 => return Ok(None), // LOCAL: the balancer speaking for itself
        1 => {}
        _ => return Err(ProxyHeaderError::Malformed("v2 command")),
    }
    let addr = match family >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            SocketAddr::new(ip.into(), u16::from_be_bytes([body[8], body[9]]))
        }
        2 if body.len() >= 36 => {
            let octets: [u8; 16] = body[..16]
                .try_into()
                .map_err(|_| ProxyHeaderError::Malformed("v2 address"))?;
            SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                u16::from_be_bytes([body[32], body[33]]),
            )
        }
        0 => return Ok(None), // UNSPEC
        _ => return Err(ProxyHeaderError::Malformed("v2 address family or length")),
    };
    Ok(Some(addr))
}

/// Builds a v2 header, for tests and load generators.
pub fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21); // version 2, PROXY
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut reader = bytes;
        let result = read_header(&mut reader).await;
        (result, reader.to_vec())
    }

    #[tokio::test]
    async fn v1_and_v2_give_the_source_and_leave_the_rest() {
        let (addr, rest) = parse(b"PROXY TCP4 192.168.7.9 10.0.0.1 51000 587\r\nEHLO x\r\n").await;
        assert_eq!(addr.unwrap(), Some("192.168.7.9:51000".parse().unwrap()));
        assert_eq!(rest, b"EHLO x\r\n");
        let (addr, _) = parse(b"PROXY TCP6 fd00::5 fd00::1 4000 993\r\n").await;
        assert_eq!(addr.unwrap(), Some("[fd00::5]:4000".parse().unwrap()));
        let mut v2 = v2_header(
            "10.9.8.7:1234".parse().unwrap(),
            "10.0.0.1:465".parse().unwrap(),
        );
        v2.extend_from_slice(b"\x16\x03\x01");
        let (addr, rest) = parse(&v2).await;
        assert_eq!(addr.unwrap(), Some("10.9.8.7:1234".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");
        let v6 = v2_header(
            "[fd00::7]:1".parse().unwrap(),
            "[fd00::1]:2".parse().unwrap(),
        );
        assert_eq!(
            parse(&v6).await.0.unwrap(),
            Some("[fd00::7]:1".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn missing_or_malformed_headers_are_errors() {
        assert!(matches!(
            parse(b"\x16\x03\x01\x02\x00\x01\x00").await.0,
            Err(ProxyHeaderError::Missing)
        ));
        assert!(matches!(
            parse(b"EHLO printer\r\n").await.0,
            Err(ProxyHeaderError::Missing)
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 nonsense\r\n").await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 ::1 ::1 1 2\r\n").await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(
            parse(&long).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4").await.0,
            Err(ProxyHeaderError::Io(_))
        ));
    }
}
