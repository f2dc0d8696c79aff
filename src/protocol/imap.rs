//! IMAP (RFC 9051/3501 STARTTLS): the server role towards the device and the client role
//! towards the upstream, up to the start of TLS.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    verb, DialogError, LineConn, StartTls, UpstreamDialogError, MAX_COMMANDS, MAX_LINE,
    MAX_REPLY_LINES,
};

const CAPABILITIES: &str = "IMAP4rev1 STARTTLS LOGINDISABLED";

/// Serves the greeting, CAPABILITY, NOOP and LOGOUT until the device sends `tag STARTTLS`.
pub async fn device_until_starttls<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    server_name: &str,
) -> Result<StartTls, DialogError> {
    conn.send(
        format!("* OK [CAPABILITY {CAPABILITIES}] {server_name} tlsbridge ready\r\n").as_bytes(),
    )
    .await?;
    for _ in 0..MAX_COMMANDS {
        let line = match read_command(conn).await {
            Err(DialogError::LineTooLong) => {
                conn.send(b"* BYE line too long\r\n").await?;
                return Err(DialogError::LineTooLong);
            }
            line => line?,
        };
        let (tag, command) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        if !valid_tag(tag) {
            conn.send(b"* BAD missing or invalid tag\r\n").await?;
            continue;
        }
        let (command, arg) = verb(command);
        let reply = match command.as_str() {
            "CAPABILITY" => {
                format!("* CAPABILITY {CAPABILITIES}\r\n{tag} OK CAPABILITY completed\r\n")
            }
            "NOOP" => format!("{tag} OK NOOP completed\r\n"),
            "LOGOUT" => {
                conn.send(format!("* BYE logging out\r\n{tag} OK LOGOUT completed\r\n").as_bytes())
                    .await?;
                return Err(DialogError::Quit);
            }
            "STARTTLS" if arg.is_empty() => {
                return Ok(StartTls {
                    tag: Some(tag.to_string()),
                    client_name: None,
                });
            }
            "LOGIN" | "AUTHENTICATE" => {
                format!("{tag} NO [PRIVACYREQUIRED] use STARTTLS first\r\n")
            }
            _ => format!("{tag} BAD command not allowed before STARTTLS\r\n"),
        };
        conn.send(reply.as_bytes()).await?;
    }
    conn.send(b"* BYE too many commands before STARTTLS\r\n")
        .await?;
    Err(DialogError::TooManyCommands)
}

/// Reads one command line. A non-synchronizing literal (`{N+}`, RFC 7888) makes the client send
/// its data without waiting, so the data is skipped; a synchronizing one (`{N}`) gets no
/// continuation, so the client sends nothing more for it.
async fn read_command<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<String, DialogError> {
    let mut line = conn.read_text().await?;
    for _ in 0..MAX_COMMANDS {
        let Some(size) = non_sync_literal(&line) else {
            break;
        };
        if size > MAX_LINE {
            return Err(DialogError::LineTooLong);
        }
        let mut skipped = 0;
        while skipped < size {
            skipped += conn.read_line().await?.len();
        }
        line = conn.read_text().await?;
    }
    Ok(line)
}

fn non_sync_literal(line: &str) -> Option<usize> {
    let open = line.strip_suffix("+}")?.rfind('{')?;
    line[open + 1..line.len() - 2].parse().ok()
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b))
}

/// A tagged reply to the device's STARTTLS command.
pub fn tagged(start: &StartTls, text: &str) -> Vec<u8> {
    format!("{} {text}\r\n", start.tag.as_deref().unwrap_or("*")).into_bytes()
}

/// Reads the greeting, asks for CAPABILITY, requires STARTTLS, sends STARTTLS and expects a
/// tagged OK. A PREAUTH greeting on a STARTTLS leg would skip TLS altogether: it aborts.
pub async fn upstream_starttls<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<Vec<u8>, UpstreamDialogError> {
    let greeting = read_greeting(conn, true).await?;
    let (untagged, status) = command(conn, "t1", "CAPABILITY").await?;
    if !status.starts_with("OK") {
        return Err(UpstreamDialogError::Unexpected(format!(
            "CAPABILITY answered {status}"
        )));
    }
    let offers_starttls = untagged.iter().any(|line| {
        line.strip_prefix("* CAPABILITY ").is_some_and(|caps| {
            caps.split_whitespace()
                .any(|c| c.eq_ignore_ascii_case("STARTTLS"))
        })
    });
    if !offers_starttls {
        return Err(UpstreamDialogError::NoStarttls);
    }
    let (_, status) = command(conn, "t2", "STARTTLS").await?;
    if !status.starts_with("OK") {
        return Err(UpstreamDialogError::StarttlsRefused(status));
    }
    Ok(greeting)
}

/// Sends a tagged command and collects untagged lines until the tagged status (returned
/// without the tag).
async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    tag: &str,
    command: &str,
) -> Result<(Vec<String>, String), UpstreamDialogError> {
    conn.send(format!("{tag} {command}\r\n").as_bytes())
        .await
        .map_err(DialogError::from)?;
    let mut untagged = Vec::new();
    for _ in 0..MAX_REPLY_LINES {
        let line = conn.read_text().await?;
        if let Some(status) = line
            .strip_prefix(tag)
            .and_then(|rest| rest.strip_prefix(' '))
        {
            return Ok((untagged, super::smtp::printable(status)));
        }
        if !line.starts_with("* ") {
            return Err(UpstreamDialogError::Unexpected(super::smtp::printable(
                &line,
            )));
        }
        untagged.push(line);
    }
    Err(UpstreamDialogError::Unexpected(format!(
        "more than {MAX_REPLY_LINES} lines for {command}"
    )))
}

/// Reads the server greeting: `* OK` goes on, `* BYE` refuses, `* PREAUTH` is accepted only on
/// an implicit-TLS leg.
pub async fn read_greeting<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    starttls_leg: bool,
) -> Result<Vec<u8>, UpstreamDialogError> {
    let raw = conn.read_line().await?;
    let line = super::smtp::printable(String::from_utf8_lossy(&raw).trim_end());
    let (status, _) = verb(line.strip_prefix("* ").unwrap_or(""));
    match &*status {
        "OK" => Ok(raw),
        "PREAUTH" if !starttls_leg => Ok(raw),
        "PREAUTH" => Err(UpstreamDialogError::Greeting(format!(
            "PREAUTH before STARTTLS would skip TLS: {line}"
        ))),
        "BYE" => Err(UpstreamDialogError::Greeting(line)),
        _ => Err(UpstreamDialogError::Unexpected(format!(
            "not an IMAP greeting: {line}"
        ))),
    }
}

/// Removes a `[CAPABILITY ...]` response code from a greeting read before TLS.
pub fn strip_capabilities(greeting: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(greeting);
    match text
        .strip_prefix("* OK [CAPABILITY ")
        .and_then(|rest| rest.split_once(']'))
    {
        Some((_, rest)) => format!("* OK{rest}").into_bytes(),
        None => greeting.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_tags() {
        assert_eq!(non_sync_literal("a LOGIN {5+}"), Some(5));
        assert_eq!(non_sync_literal("a LOGIN {5}"), None);
        assert!(valid_tag("a001") && !valid_tag("") && !valid_tag("a*"));
    }

    #[test]
    fn pre_tls_capabilities_are_stripped_from_a_forwarded_greeting() {
        assert_eq!(
            strip_capabilities(
                b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Dovecot ready.\r\n"
            ),
            b"* OK Dovecot ready.\r\n"
        );
        assert_eq!(strip_capabilities(b"* OK ready\r\n"), b"* OK ready\r\n");
    }
}
