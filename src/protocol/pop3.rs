//! POP3 (RFC 1939 + RFC 2595 STLS): the server role towards the device and the client role
//! towards the upstream, up to the start of TLS.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    verb, DialogError, LineConn, StartTls, UpstreamDialogError, MAX_COMMANDS, MAX_REPLY_LINES,
};

/// Serves the greeting, CAPA, NOOP and QUIT until the device sends STLS.
pub async fn device_until_starttls<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    server_name: &str,
) -> Result<StartTls, DialogError> {
    conn.send(format!("+OK {server_name} tlsbridge ready\r\n").as_bytes())
        .await?;
    for _ in 0..MAX_COMMANDS {
        let line = match conn.read_text().await {
            Err(DialogError::LineTooLong) => {
                conn.send(b"-ERR line too long\r\n").await?;
                return Err(DialogError::LineTooLong);
            }
            line => line?,
        };
        let (command, arg) = verb(&line);
        let reply = match command.as_str() {
            "CAPA" => "+OK capability list follows\r\nSTLS\r\n.\r\n",
            "NOOP" => "+OK\r\n",
            "QUIT" => {
                conn.send(b"+OK bye\r\n").await?;
                return Err(DialogError::Quit);
            }
            "STLS" if arg.is_empty() => return Ok(StartTls::default()),
            "USER" | "PASS" | "APOP" | "AUTH" => "-ERR [AUTH] use STLS first\r\n",
            _ => "-ERR command not allowed before STLS\r\n",
        };
        conn.send(reply.as_bytes()).await?;
    }
    conn.send(b"-ERR too many commands before STLS\r\n").await?;
    Err(DialogError::TooManyCommands)
}

/// Reads the greeting, asks CAPA, requires STLS, sends STLS and expects `+OK`.
pub async fn upstream_starttls<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<Vec<u8>, UpstreamDialogError> {
    let greeting = read_greeting(conn).await?;
    conn.send(b"CAPA\r\n").await.map_err(DialogError::from)?;
    let status = conn.read_text().await?;
    if !status.starts_with("+OK") {
        return Err(UpstreamDialogError::NoStarttls);
    }
    let mut offers_stls = false;
    for _ in 0..MAX_REPLY_LINES {
        let line = conn.read_text().await?;
        if line == "." {
            if !offers_stls {
                return Err(UpstreamDialogError::NoStarttls);
            }
            conn.send(b"STLS\r\n").await.map_err(DialogError::from)?;
            let reply = conn.read_text().await?;
            if !reply.starts_with("+OK") {
                return Err(UpstreamDialogError::StarttlsRefused(
                    super::smtp::printable(&reply),
                ));
            }
            return Ok(greeting);
        }
        offers_stls |= verb(&line).0 == "STLS";
    }
    Err(UpstreamDialogError::Unexpected(format!(
        "CAPA longer than {MAX_REPLY_LINES} lines"
    )))
}

/// Reads the server greeting: it must be `+OK`.
pub async fn read_greeting<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<Vec<u8>, UpstreamDialogError> {
    let raw = conn.read_line().await?;
    if raw.starts_with(b"+OK") {
        return Ok(raw);
    }
    let line = super::smtp::printable(String::from_utf8_lossy(&raw).trim_end());
    Err(UpstreamDialogError::Greeting(line))
}
