//! The device leg: the device-side dialog before STARTTLS (server role) and the OpenSSL
//! handshake, bounded together by `device_tls.handshake_timeout`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use crate::config::Protocol;
use crate::protocol::{self, DialogError, LineConn, StartTls};
use crate::tls::legacy::{DeviceTls, HandshakeError, LegacyAcceptor};

/// The device's connection once its leg is set up: TLS, or plain where the route opts in.
pub enum DeviceStream {
    Tls(Box<SslStream<TcpStream>>),
    Plain(TcpStream),
}

impl DeviceStream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            DeviceStream::Tls(tls) => tls.get_ref(),
            DeviceStream::Plain(tcp) => tcp,
        }
    }
}

/// The OpenSSL handshake on a raw device connection.
pub async fn handshake(
    acceptor: &LegacyAcceptor,
    tcp: TcpStream,
    sni_allow: Option<Arc<[String]>>,
) -> Result<(DeviceStream, DeviceTls), HandshakeError> {
    let (tls, info) = acceptor.accept(tcp, sni_allow).await?;
    Ok((DeviceStream::Tls(Box::new(tls)), info))
}

/// The plaintext dialog up to the device's STARTTLS (not yet answered). Returns the connection
/// so the caller can answer once it knows whether the upstream leg stands.
pub async fn dialog(
    protocol: Protocol,
    tcp: TcpStream,
    server_name: &str,
) -> Result<(LineConn<TcpStream>, StartTls), DialogError> {
    let mut conn = LineConn::new(tcp);
    let start = protocol::device_until_starttls(protocol, &mut conn, server_name).await?;
    Ok((conn, start))
}

impl AsyncRead for DeviceStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DeviceStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            DeviceStream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DeviceStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            DeviceStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
            DeviceStream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DeviceStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            DeviceStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DeviceStream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            DeviceStream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
        }
    }
}
