//! SMTP (RFC 5321 + RFC 3207 STARTTLS): the server role towards the device and the client role
//! towards the upstream, up to the start of TLS; and, for `auth = "xoauth2"` routes, the login
//! after TLS (RFC 4954 AUTH PLAIN/LOGIN from the device, AUTH XOAUTH2 to the upstream).

use tokio::io::{AsyncRead, AsyncWrite};

use crate::secret::Secret;
use crate::text::printable;

use super::sasl::{self, SaslError};
use super::{
    rejection, verb, DeviceLogin, DialogError, LineConn, Login, LoginAnswer, StartTls,
    UpstreamAuthError, UpstreamDialogError, MAX_COMMANDS, MAX_REPLY_LINES,
};

/// Over a connection limit, before any dialog.
pub const BUSY: &[u8] = b"421 4.7.0 too many connections, try again later\r\n";

/// The go-ahead for the device's STARTTLS.
pub fn starttls_accepted() -> Vec<u8> {
    b"220 2.0.0 Ready to start TLS\r\n".to_vec()
}

/// The answer to STARTTLS when the upstream leg failed: TLS is temporarily unavailable.
pub fn starttls_refused(reason: &str) -> Vec<u8> {
    format!("454 4.7.0 TLS not available: upstream unavailable ({reason})\r\n").into_bytes()
}

/// The transient error in place of a greeting when the upstream leg failed.
pub fn unavailable(reason: &str) -> Vec<u8> {
    format!("421 4.4.0 upstream unavailable ({reason}), try again later\r\n").into_bytes()
}

/// Serves banner, EHLO/HELO, NOOP, RSET and QUIT until the device sends STARTTLS.
pub async fn device_until_starttls<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    server_name: &str,
) -> Result<StartTls, DialogError> {
    conn.send(format!("220 {server_name} ESMTP tlsbridge ready\r\n").as_bytes())
        .await?;
    let mut start = StartTls::default();
    for _ in 0..MAX_COMMANDS {
        let line = match conn.read_text().await {
            Err(DialogError::LineTooLong) => {
                conn.send(b"500 5.5.2 Line too long\r\n").await?;
                return Err(DialogError::LineTooLong);
            }
            line => line?,
        };
        let (verb, arg) = verb(&line);
        let reply = match verb.as_str() {
            "EHLO" | "HELO" if arg.is_empty() => "501 5.5.4 Syntax: EHLO hostname\r\n".to_string(),
            "EHLO" => {
                start.client_name = Some(printable(arg));
                format!("250-{server_name}\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n")
            }
            "HELO" => {
                start.client_name = Some(printable(arg));
                format!("250 {server_name}\r\n")
            }
            "NOOP" | "RSET" => "250 2.0.0 OK\r\n".to_string(),
            "QUIT" => {
                conn.send(b"221 2.0.0 Bye\r\n").await?;
                return Err(DialogError::Quit);
            }
            "STARTTLS" if !arg.is_empty() => "501 5.5.4 Syntax: STARTTLS\r\n".to_string(),
            "STARTTLS" => return Ok(start),
            _ => "530 5.7.0 Must issue a STARTTLS command first\r\n".to_string(),
        };
        conn.send(reply.as_bytes()).await?;
    }
    conn.send(b"421 4.7.0 Too many commands before STARTTLS\r\n")
        .await?;
    Err(DialogError::TooManyCommands)
}

/// Reads the banner, sends EHLO, requires STARTTLS among the extensions, sends STARTTLS and
/// expects 220. Returns the banner as received. The extensions are dropped: they were sent
/// before TLS and mean nothing after it.
pub async fn upstream_starttls<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    client_name: &str,
) -> Result<Vec<u8>, UpstreamDialogError> {
    let banner = read_greeting(conn).await?;
    conn.send(format!("EHLO {}\r\n", ehlo_domain(client_name)).as_bytes())
        .await
        .map_err(DialogError::from)?;
    let ehlo = read_reply(conn).await?;
    if ehlo.code != 250 {
        return Err(UpstreamDialogError::Unexpected(format!(
            "EHLO answered {}",
            ehlo.first_line()
        )));
    }
    let offers_starttls = ehlo.lines.iter().skip(1).any(|line| {
        line.get(4..)
            .and_then(|ext| ext.split_whitespace().next())
            .is_some_and(|ext| ext.eq_ignore_ascii_case("STARTTLS"))
    });
    if !offers_starttls {
        return Err(UpstreamDialogError::NoStarttls);
    }
    conn.send(b"STARTTLS\r\n")
        .await
        .map_err(DialogError::from)?;
    let reply = read_reply(conn).await?;
    if reply.code != 220 {
        return Err(UpstreamDialogError::StarttlsRefused(reply.first_line()));
    }
    Ok(banner)
}

/// RFC 5321 wants a domain or an address literal after EHLO: `[10.0.0.5]`, `[IPv6:fd00::5]`.
fn ehlo_domain(name: &str) -> String {
    match name.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => format!("[{ip}]"),
        Ok(std::net::IpAddr::V6(ip)) => format!("[IPv6:{ip}]"),
        Err(_) => name.to_string(),
    }
}

/// Reads the server's banner: a 220 reply, possibly multi-line.
pub async fn read_greeting<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<Vec<u8>, UpstreamDialogError> {
    let banner = read_reply(conn).await?;
    if banner.code != 220 {
        return Err(UpstreamDialogError::Greeting(banner.first_line()));
    }
    Ok(banner.raw)
}

/// One SMTP reply: its code, its lines as text and the bytes as received.
#[derive(Debug)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
    pub raw: Vec<u8>,
}

impl Reply {
    pub fn first_line(&self) -> String {
        printable(self.lines.first().map(String::as_str).unwrap_or(""))
    }
}

/// Reads a reply: lines `NNN-text` continue it, `NNN text` (or bare `NNN`) ends it.
pub async fn read_reply<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<Reply, UpstreamDialogError> {
    let mut reply = Reply {
        code: 0,
        lines: Vec::new(),
        raw: Vec::new(),
    };
    for _ in 0..MAX_REPLY_LINES {
        let raw = conn.read_line().await?;
        let line = String::from_utf8_lossy(&raw)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        let code = line
            .get(..3)
            .filter(|code| code.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| {
                UpstreamDialogError::Unexpected(format!("not an SMTP reply: {}", printable(&line)))
            })?;
        if reply.code != 0 && code != reply.code {
            return Err(UpstreamDialogError::Unexpected(
                "reply lines with different codes".into(),
            ));
        }
        reply.code = code;
        reply.raw.extend_from_slice(&raw);
        let more = line.as_bytes().get(3) == Some(&b'-');
        reply.lines.push(line);
        if !more {
            return Ok(reply);
        }
    }
    Err(UpstreamDialogError::Unexpected(format!(
        "reply longer than {MAX_REPLY_LINES} lines"
    )))
}

/// How much of the upstream's start after TLS [`basic_auth_disabled`] looks at: the replies to
/// EHLO and to the device's AUTH exchange, not the whole stream.
pub const BASIC_AUTH_REFUSAL_HEAD: usize = 1024;

/// How much of the device's start [`client_name`] looks at: an EHLO line with a name of up to
/// 255 octets (RFC 5321's domain limit).
pub const CLIENT_NAME_HEAD: usize = 512;

/// The reply line in the first bytes an upstream sent after TLS that says Microsoft 365 refused
/// a login because Basic auth is disabled (`535 5.7.139`, `550 5.7.30`), sanitised.
pub fn basic_auth_disabled(from_upstream: &[u8]) -> Option<String> {
    from_upstream
        .split(|&b| b == b'\n')
        .map(|line| String::from_utf8_lossy(line).trim_end().to_string())
        .find(|line| line.starts_with("535 5.7.139") || line.starts_with("550 5.7.30"))
        .map(|line| printable(&line))
}

/// The name in an `EHLO name` / `HELO name` line at the start of `bytes`, if there is one.
pub fn client_name(bytes: &[u8]) -> Option<String> {
    let line = bytes.split(|&b| b == b'\n').next()?;
    let line = String::from_utf8_lossy(line);
    let (verb, arg) = verb(line.trim_end());
    let name = printable(arg.split_whitespace().next()?);
    (matches!(verb.as_str(), "EHLO" | "HELO") && !name.is_empty()).then_some(name)
}

// The login after TLS (`auth = "xoauth2"`).

/// Sends EHLO after TLS and returns the upstream's reply lines (code 250 required): the
/// device's EHLO is answered with these capabilities.
pub async fn upstream_ehlo<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    client_name: &str,
) -> Result<Vec<String>, UpstreamDialogError> {
    conn.send(format!("EHLO {}\r\n", ehlo_domain(client_name)).as_bytes())
        .await
        .map_err(DialogError::from)?;
    let ehlo = read_reply(conn).await?;
    if ehlo.code != 250 {
        return Err(UpstreamDialogError::Unexpected(format!(
            "EHLO after TLS answered {}",
            ehlo.first_line()
        )));
    }
    Ok(ehlo.lines)
}

/// The EHLO reply for the device: the upstream's extensions with its AUTH line replaced by
/// `AUTH PLAIN LOGIN` (and STARTTLS dropped: TLS is up).
pub fn ehlo_for_device(server_name: &str, upstream_ehlo: &[String]) -> String {
    let mut lines = vec![server_name.to_string()];
    for line in upstream_ehlo.iter().skip(1) {
        let ext = line.get(4..).unwrap_or("").trim();
        let keyword = ext
            .split([' ', '='])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        if !ext.is_empty() && keyword != "AUTH" && keyword != "STARTTLS" {
            lines.push(printable(ext));
        }
    }
    lines.push("AUTH PLAIN LOGIN".into());
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| format!("250{}{line}\r\n", if i == last { ' ' } else { '-' }))
        .collect()
}

/// Reads one line of the login dialog, answering an over-long one.
async fn read_auth_line<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<Vec<u8>, DialogError> {
    match conn.read_line().await {
        Err(DialogError::LineTooLong) => {
            conn.send(b"500 5.5.2 Line too long\r\n").await?;
            Err(DialogError::LineTooLong)
        }
        line => line,
    }
}

/// The reply to a SASL response that could not be used.
fn sasl_refusal(err: &SaslError) -> String {
    match err {
        SaslError::Cancelled => "501 5.0.0 Authentication cancelled\r\n".into(),
        other => format!("501 5.5.2 {other}\r\n"),
    }
}

/// Serves EHLO/HELO (with the upstream's extensions), NOOP, RSET and QUIT until the device
/// sends AUTH PLAIN or AUTH LOGIN with its credentials. A command that needs a login before it
/// gets 530, or, when `required` is false, ends the dialog so it can be forwarded.
pub async fn device_until_login<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    server_name: &str,
    upstream_ehlo: &[String],
    required: bool,
) -> Result<DeviceLogin, DialogError> {
    let mut client_name = None;
    for _ in 0..MAX_COMMANDS {
        let raw = read_auth_line(conn).await?;
        let line = String::from_utf8_lossy(&raw)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        let (command, arg) = verb(&line);
        let reply = match command.as_str() {
            "EHLO" | "HELO" if arg.is_empty() => "501 5.5.4 Syntax: EHLO hostname\r\n".to_string(),
            "EHLO" => {
                client_name = Some(printable(arg));
                ehlo_for_device(server_name, upstream_ehlo)
            }
            "HELO" => {
                client_name = Some(printable(arg));
                format!("250 {server_name}\r\n")
            }
            "NOOP" | "RSET" => "250 2.0.0 OK\r\n".to_string(),
            "QUIT" => {
                conn.send(b"221 2.0.0 Bye\r\n").await?;
                return Err(DialogError::Quit);
            }
            "STARTTLS" => "503 5.5.1 TLS already active\r\n".to_string(),
            "AUTH" => {
                let (mechanism, initial) = verb(arg);
                let initial = initial.to_string();
                match device_sasl(conn, &mechanism, &initial).await? {
                    Ok(Some((user, password))) => {
                        return Ok(DeviceLogin {
                            login: Login::Password { user, password },
                            tag: None,
                            client_name,
                        })
                    }
                    Ok(None) => "504 5.5.4 Unrecognized authentication type\r\n".to_string(),
                    Err(err) => sasl_refusal(&err),
                }
            }
            _ if !required => {
                return Ok(DeviceLogin {
                    login: Login::Without { command: raw },
                    tag: None,
                    client_name,
                })
            }
            _ => "530 5.7.0 Authentication required\r\n".to_string(),
        };
        conn.send(reply.as_bytes()).await?;
    }
    conn.send(b"421 4.7.0 Too many commands before authentication\r\n")
        .await?;
    Err(DialogError::TooManyCommands)
}

/// One SASL exchange for AUTH PLAIN or AUTH LOGIN (RFC 4954): the credentials, `None` for
/// another mechanism, or why the responses could not be used.
async fn device_sasl<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    mechanism: &str,
    initial: &str,
) -> Result<Result<Option<(String, Secret)>, SaslError>, DialogError> {
    match mechanism {
        "PLAIN" => {
            let response = if initial.is_empty() {
                conn.send(b"334 \r\n").await?;
                read_auth_line(conn).await?
            } else {
                initial.as_bytes().to_vec()
            };
            let response = zeroize::Zeroizing::new(response);
            Ok(sasl::decode_plain(&response).map(|c| Some((c.user, c.password))))
        }
        "LOGIN" => {
            let user = if initial.is_empty() {
                let prompt = format!("334 {}\r\n", sasl::LOGIN_USERNAME_PROMPT);
                conn.send(prompt.as_bytes()).await?;
                read_auth_line(conn).await?
            } else {
                initial.as_bytes().to_vec()
            };
            let user = match sasl::decode_login_user(&user) {
                Ok(user) => user,
                Err(err) => return Ok(Err(err)),
            };
            let prompt = format!("334 {}\r\n", sasl::LOGIN_PASSWORD_PROMPT);
            conn.send(prompt.as_bytes()).await?;
            let response = zeroize::Zeroizing::new(read_auth_line(conn).await?);
            Ok(sasl::decode_login_password(&response).map(|password| Some((user, password))))
        }
        _ => Ok(Ok(None)),
    }
}

/// The answer to the device's login. A device that went on without one gets no answer when
/// accepted: its command goes upstream, and the upstream answers it.
pub fn login_answer(login: &DeviceLogin, answer: LoginAnswer) -> Vec<u8> {
    let text: &[u8] = match (answer, &login.login) {
        (LoginAnswer::Accepted, Login::Password { .. }) => {
            b"235 2.7.0 Authentication successful\r\n"
        }
        (LoginAnswer::Accepted, Login::Without { .. }) => b"",
        (LoginAnswer::BadPassword, _) => b"535 5.7.8 Authentication credentials invalid\r\n",
        (LoginAnswer::Unavailable, _) => {
            b"454 4.7.0 Temporary authentication failure, try again later\r\n"
        }
    };
    text.to_vec()
}

/// `AUTH XOAUTH2 <initial>`: 235 is success; a 334 error challenge is answered with an empty
/// line and the final reply read (RFC 7628).
pub async fn upstream_xoauth2<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    initial: &Secret,
) -> Result<(), UpstreamAuthError> {
    let command = zeroize::Zeroizing::new(format!("AUTH XOAUTH2 {}\r\n", initial.expose()));
    conn.send(command.as_bytes())
        .await
        .map_err(|err| UpstreamDialogError::from(DialogError::from(err)))?;
    let reply = read_reply(conn).await?;
    match reply.code {
        235 => Ok(()),
        334 => {
            let b64 = reply.lines.first().and_then(|l| l.get(4..)).unwrap_or("");
            let challenge = sasl::decode_xoauth2_challenge(b64.as_bytes());
            conn.send(b"\r\n")
                .await
                .map_err(|err| UpstreamDialogError::from(DialogError::from(err)))?;
            let last = read_reply(conn).await?;
            Err(UpstreamAuthError::Rejected(rejection(
                &last.first_line(),
                Some(&challenge),
            )))
        }
        _ => Err(UpstreamAuthError::Rejected(rejection(
            &reply.first_line(),
            None,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    async fn read_until(peer: &mut DuplexStream, needle: &str) -> String {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = peer.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {needle:?}; got {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(seen).unwrap()
    }

    #[test]
    fn basic_auth_refusals_are_recognised() {
        let seen = b"250-x\r\n250 AUTH LOGIN\r\n334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n\
            535 5.7.139 Authentication unsuccessful, basic authentication is disabled.\r\n";
        assert!(basic_auth_disabled(seen).is_some_and(|l| l.contains("5.7.139")));
        assert!(
            basic_auth_disabled(b"550 5.7.30 Basic authentication is not supported\r\n").is_some()
        );
        assert!(basic_auth_disabled(b"535 5.7.8 bad password\r\n").is_none());
    }

    #[test]
    fn ehlo_uses_address_literals_for_addresses() {
        assert_eq!(ehlo_domain("gw.lan"), "gw.lan");
        assert_eq!(ehlo_domain("10.0.0.5"), "[10.0.0.5]");
        assert_eq!(ehlo_domain("fd00::5"), "[IPv6:fd00::5]");
    }

    #[test]
    fn client_name_comes_from_ehlo_or_helo_only() {
        assert_eq!(
            client_name(b"EHLO MX-3070\r\nAUTH PLAIN x\r\n").as_deref(),
            Some("MX-3070")
        );
        assert_eq!(
            client_name(b"helo scanner.lan\r\n").as_deref(),
            Some("scanner.lan")
        );
        assert_eq!(client_name(b"AUTH PLAIN c2VjcmV0\r\n"), None);
        assert_eq!(client_name(b"EHLO\r\n"), None);
    }

    #[tokio::test]
    async fn device_dialog_reaches_starttls_and_keeps_pipelined_bytes_apart() {
        let (ours, mut device) = duplex(4096);
        let task = tokio::spawn(async move {
            let mut conn = LineConn::new(ours);
            let start = device_until_starttls(&mut conn, "gw.lan").await;
            (start, conn.into_parts().1)
        });
        assert!(read_until(&mut device, "\r\n")
            .await
            .starts_with("220 gw.lan ESMTP"));
        device.write_all(b"EHLO scanner-mx3070\r\n").await.unwrap();
        let ehlo = read_until(&mut device, "250 STARTTLS\r\n").await;
        assert!(ehlo.starts_with("250-gw.lan\r\n"), "{ehlo}");
        device.write_all(b"MAIL FROM:<a@b>\r\n").await.unwrap();
        assert_eq!(
            read_until(&mut device, "\r\n").await,
            "530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
        device.write_all(b"noop\r\nRSET\r\n").await.unwrap();
        read_until(&mut device, "250 2.0.0 OK\r\n250 2.0.0 OK\r\n").await;
        device.write_all(b"STARTTLS\r\nRSET\r\n").await.unwrap();
        let (start, leftover) = task.await.unwrap();
        assert_eq!(
            start.unwrap().client_name.as_deref(),
            Some("scanner-mx3070")
        );
        assert_eq!(
            leftover, b"RSET\r\n",
            "pipelined bytes are handed back, not consumed"
        );
    }

    #[tokio::test]
    async fn device_dialog_limits_line_length_and_command_count() {
        let (ours, mut device) = duplex(8192);
        let task =
            tokio::spawn(
                async move { device_until_starttls(&mut LineConn::new(ours), "gw").await },
            );
        read_until(&mut device, "\r\n").await;
        device.write_all(&[b'A'; 600]).await.unwrap();
        assert!(read_until(&mut device, "\r\n")
            .await
            .starts_with("500 5.5.2"));
        assert!(matches!(task.await.unwrap(), Err(DialogError::LineTooLong)));

        let (ours, mut device) = duplex(8192);
        let task =
            tokio::spawn(
                async move { device_until_starttls(&mut LineConn::new(ours), "gw").await },
            );
        device
            .write_all("NOOP\r\n".repeat(MAX_COMMANDS + 1).as_bytes())
            .await
            .unwrap();
        read_until(&mut device, "421 4.7.0").await;
        assert!(matches!(
            task.await.unwrap(),
            Err(DialogError::TooManyCommands)
        ));
    }

    #[tokio::test]
    async fn device_quit_and_eof_end_the_dialog() {
        let (ours, mut device) = duplex(1024);
        let task =
            tokio::spawn(
                async move { device_until_starttls(&mut LineConn::new(ours), "gw").await },
            );
        device.write_all(b"QUIT\r\n").await.unwrap();
        read_until(&mut device, "221 2.0.0 Bye\r\n").await;
        assert!(matches!(task.await.unwrap(), Err(DialogError::Quit)));

        let (ours, device) = duplex(1024);
        drop(device);
        let err = device_until_starttls(&mut LineConn::new(ours), "gw")
            .await
            .unwrap_err();
        assert!(
            matches!(err, DialogError::Io(_) | DialogError::Closed),
            "{err:?}"
        );
    }

    /// Plays a scripted upstream: each entry is (expected command, reply to send).
    async fn upstream(
        script: &'static [(&'static str, &'static str)],
    ) -> Result<(Vec<u8>, Vec<u8>), UpstreamDialogError> {
        let (ours, mut server) = duplex(4096);
        tokio::spawn(async move {
            for (expect, reply) in script {
                if !expect.is_empty() {
                    let got = read_until(&mut server, "\r\n").await;
                    assert!(got.starts_with(expect), "expected {expect:?}, got {got:?}");
                }
                server.write_all(reply.as_bytes()).await.unwrap();
            }
            let mut rest = Vec::new();
            let _ = server.read_to_end(&mut rest).await;
        });
        let mut conn = LineConn::new(ours);
        let banner = upstream_starttls(&mut conn, "gw").await?;
        Ok((banner, conn.into_parts().1))
    }

    #[tokio::test]
    async fn upstream_dialog_reaches_tls() {
        let (banner, leftover) = upstream(&[
            ("", "220-smtp.example ESMTP\r\n220 ready\r\n"),
            (
                "EHLO gw",
                "250-smtp.example\r\n250-SIZE 1000\r\n250-STARTTLS\r\n250 8BITMIME\r\n",
            ),
            ("STARTTLS", "220 2.0.0 SMTP server ready\r\n"),
        ])
        .await
        .unwrap();
        assert_eq!(banner, b"220-smtp.example ESMTP\r\n220 ready\r\n");
        assert!(leftover.is_empty());
    }

    #[tokio::test]
    async fn upstream_dialog_fails_closed() {
        let no_starttls =
            upstream(&[("", "220 x\r\n"), ("EHLO", "250-x\r\n250 AUTH LOGIN\r\n")]).await;
        assert!(matches!(no_starttls, Err(UpstreamDialogError::NoStarttls)));
        let refused = upstream(&[
            ("", "220 x\r\n"),
            ("EHLO", "250-x\r\n250 STARTTLS\r\n"),
            ("STARTTLS", "454 4.7.0 TLS not available\r\n"),
        ])
        .await;
        assert!(
            matches!(refused, Err(UpstreamDialogError::StarttlsRefused(ref r)) if r.contains("454"))
        );
        let busy = upstream(&[("", "554 5.3.2 go away\r\n")]).await;
        assert!(matches!(busy, Err(UpstreamDialogError::Greeting(_))));
        let garbage = upstream(&[("", "HTTP/1.1 400 Bad Request\r\n")]).await;
        assert!(matches!(garbage, Err(UpstreamDialogError::Unexpected(_))));
        // Bytes after the 220 stay in the buffer for the caller to refuse.
        let (_, leftover) = upstream(&[
            ("", "220 x\r\n"),
            ("EHLO", "250-x\r\n250 STARTTLS\r\n"),
            ("STARTTLS", "220 go ahead\r\n250 injected\r\n"),
        ])
        .await
        .unwrap();
        assert_eq!(leftover, b"250 injected\r\n");
    }
}

#[cfg(test)]
mod login_tests {
    use super::*;
    use crate::protocol::testing::{
        bounded, read_until, scripted_server, scripted_then_closed, Step, EMPTY_LINE,
    };
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use tokio::io::{duplex, AsyncWriteExt, DuplexStream};

    fn b64(raw: &str) -> String {
        STANDARD.encode(raw)
    }

    fn upstream_ehlo_lines() -> Vec<String> {
        [
            "250-outlook.office365.com Hello",
            "250-SIZE 157286400",
            "250-AUTH LOGIN XOAUTH2",
            "250-STARTTLS",
            "250 8BITMIME",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Starts the device side; returns the task and the device's end.
    fn serve(
        required: bool,
    ) -> (
        tokio::task::JoinHandle<Result<DeviceLogin, DialogError>>,
        tokio::io::DuplexStream,
    ) {
        let (ours, device) = duplex(8192);
        let task = tokio::spawn(async move {
            let mut conn = LineConn::with_max_line(ours, crate::protocol::MAX_AUTH_LINE);
            device_until_login(&mut conn, "gw.lan", &upstream_ehlo_lines(), required).await
        });
        (task, device)
    }

    fn password_of(login: DeviceLogin) -> (String, String) {
        match login.login {
            Login::Password { user, password } => (user, password.expose().to_string()),
            Login::Without { .. } => panic!("expected a password login"),
        }
    }

    #[test]
    fn ehlo_shows_the_upstream_extensions_with_our_auth_line() {
        let ehlo = ehlo_for_device("gw.lan", &upstream_ehlo_lines());
        assert_eq!(
            ehlo,
            "250-gw.lan\r\n250-SIZE 157286400\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n"
        );
    }

    #[tokio::test]
    async fn auth_login_after_ehlo() {
        let (task, mut device) = serve(true);
        device.write_all(b"EHLO scanner\r\n").await.unwrap();
        let ehlo = read_until(&mut device, "250 AUTH PLAIN LOGIN\r\n").await;
        assert!(
            !ehlo.contains("XOAUTH2") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
        device.write_all(b"AUTH LOGIN\r\n").await.unwrap();
        read_until(&mut device, "334 VXNlcm5hbWU6\r\n").await;
        device
            .write_all(format!("{}\r\n", b64("scanner1")).as_bytes())
            .await
            .unwrap();
        read_until(&mut device, "334 UGFzc3dvcmQ6\r\n").await;
        device
            .write_all(format!("{}\r\n", b64("s3cret")).as_bytes())
            .await
            .unwrap();
        let login = task.await.unwrap().unwrap();
        assert_eq!(login.client_name.as_deref(), Some("scanner"));
        assert_eq!(
            login_answer(&login, LoginAnswer::Accepted),
            b"235 2.7.0 Authentication successful\r\n"
        );
        assert_eq!(password_of(login), ("scanner1".into(), "s3cret".into()));
    }

    #[tokio::test]
    async fn auth_plain_with_and_without_initial_response() {
        let (task, mut device) = serve(true);
        let ir = b64("\0scanner1\0pw one");
        device
            .write_all(format!("EHLO x\r\nAUTH PLAIN {ir}\r\n").as_bytes())
            .await
            .unwrap();
        let login = task.await.unwrap().unwrap();
        assert_eq!(password_of(login), ("scanner1".into(), "pw one".into()));

        let (task, mut device) = serve(true);
        device.write_all(b"AUTH PLAIN\r\n").await.unwrap();
        read_until(&mut device, "334 \r\n").await;
        device
            .write_all(format!("{}\r\n", b64("\0u\0p")).as_bytes())
            .await
            .unwrap();
        assert_eq!(password_of(task.await.unwrap().unwrap()).0, "u");
    }

    #[tokio::test]
    async fn auth_login_with_an_initial_response_asks_only_for_the_password() {
        let (task, mut device) = serve(true);
        device
            .write_all(format!("HELO scanner\r\nAUTH LOGIN {}\r\n", b64("scanner1")).as_bytes())
            .await
            .unwrap();
        let seen = read_until(&mut device, "334 UGFzc3dvcmQ6\r\n").await;
        assert!(!seen.contains("334 VXNlcm5hbWU6"), "{seen}");
        device
            .write_all(format!("{}\r\n", b64("pw")).as_bytes())
            .await
            .unwrap();
        let login = task.await.unwrap().unwrap();
        assert_eq!(login.client_name.as_deref(), Some("scanner"));
        assert_eq!(password_of(login), ("scanner1".into(), "pw".into()));
    }

    #[tokio::test]
    async fn cancelled_or_unusable_responses_keep_the_dialog_going() {
        let (task, mut device) = serve(true);
        // Cancelled at the user name, then at the password; EHLO without a name; STARTTLS.
        device
            .write_all(b"AUTH LOGIN\r\n*\r\nAUTH LOGIN\r\nc2Nhbm5lcjE=\r\n*\r\n")
            .await
            .unwrap();
        device
            .write_all(b"AUTH LOGIN !!\r\nEHLO\r\nSTARTTLS\r\nNOOP\r\n")
            .await
            .unwrap();
        let seen = read_until(&mut device, "250 2.0.0 OK\r\n").await;
        assert_eq!(
            seen.matches("501 5.0.0 Authentication cancelled").count(),
            2,
            "{seen}"
        );
        assert!(
            seen.contains("501 5.5.2 the response is not valid base64"),
            "{seen}"
        );
        assert!(seen.contains("501 5.5.4 Syntax: EHLO hostname"), "{seen}");
        assert!(seen.contains("503 5.5.1 TLS already active"), "{seen}");
        // Then a good login still works.
        let ir = b64("\0scanner1\0pw");
        device
            .write_all(format!("AUTH PLAIN {ir}\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(password_of(task.await.unwrap().unwrap()).0, "scanner1");
    }

    #[tokio::test]
    async fn plain_asking_to_act_as_another_user_is_refused() {
        let (task, mut device) = serve(true);
        let as_boss = b64("boss\0scanner1\0pw");
        device
            .write_all(format!("AUTH PLAIN {as_boss}\r\nNOOP\r\n").as_bytes())
            .await
            .unwrap();
        let seen = read_until(&mut device, "250 2.0.0 OK\r\n").await;
        assert!(seen.starts_with("501 5.5.2"), "{seen}");
        assert!(!seen.contains("boss"), "{seen}");
        let same = b64("scanner1\0scanner1\0pw");
        device
            .write_all(format!("AUTH PLAIN {same}\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(password_of(task.await.unwrap().unwrap()).0, "scanner1");
    }

    #[tokio::test]
    async fn a_device_hanging_up_mid_login_ends_the_dialog() {
        let (task, mut device) = serve(true);
        device.write_all(b"EHLO x\r\nAUTH LOGIN\r\n").await.unwrap();
        read_until(&mut device, "334 VXNlcm5hbWU6\r\n").await;
        drop(device);
        assert!(matches!(task.await.unwrap(), Err(DialogError::Closed)));
    }

    #[tokio::test]
    async fn mail_before_auth_is_refused_or_forwarded() {
        let (task, mut device) = serve(true);
        device
            .write_all(b"EHLO x\r\nMAIL FROM:<a@b>\r\nAUTH CRAM-MD5\r\nAUTH PLAIN !!\r\nQUIT\r\n")
            .await
            .unwrap();
        let seen = read_until(&mut device, "221 2.0.0 Bye\r\n").await;
        assert!(
            seen.contains("530 5.7.0 Authentication required\r\n"),
            "{seen}"
        );
        assert!(seen.contains("504 5.5.4"), "{seen}");
        assert!(seen.contains("501 5.5.2"), "{seen}");
        assert!(matches!(task.await.unwrap(), Err(DialogError::Quit)));

        let (task, mut device) = serve(false);
        device
            .write_all(b"EHLO x\r\nMAIL FROM:<a@b>\r\n")
            .await
            .unwrap();
        let login = task.await.unwrap().unwrap();
        assert!(
            matches!(&login.login, Login::Without { command } if command == b"MAIL FROM:<a@b>\r\n")
        );
        assert!(login_answer(&login, LoginAnswer::Accepted).is_empty());
    }

    #[tokio::test]
    async fn failures_have_their_replies_and_limits_hold() {
        let login = DeviceLogin {
            login: Login::Without {
                command: Vec::new(),
            },
            tag: None,
            client_name: None,
        };
        assert!(login_answer(&login, LoginAnswer::BadPassword).starts_with(b"535 5.7.8"));
        assert!(login_answer(&login, LoginAnswer::Unavailable).starts_with(b"454 4.7.0"));

        let (task, mut device) = serve(true);
        device
            .write_all("NOOP\r\n".repeat(MAX_COMMANDS + 1).as_bytes())
            .await
            .unwrap();
        read_until(&mut device, "421 4.7.0").await;
        assert!(matches!(
            task.await.unwrap(),
            Err(DialogError::TooManyCommands)
        ));
        let (task, mut device) = serve(true);
        device
            .write_all(&vec![b'A'; crate::protocol::MAX_AUTH_LINE + 10])
            .await
            .unwrap();
        read_until(&mut device, "500 5.5.2").await;
        assert!(matches!(task.await.unwrap(), Err(DialogError::LineTooLong)));
    }

    /// The upstream XOAUTH2 login against `server` playing `script`.
    async fn xoauth2_with(
        server: fn(DuplexStream, Vec<Step>),
        script: Vec<Step>,
    ) -> Result<(), UpstreamAuthError> {
        let (ours, theirs) = duplex(8192);
        server(theirs, script);
        let mut conn = LineConn::new(ours);
        bounded(upstream_xoauth2(&mut conn, &Secret::new("dXNlcj0="))).await
    }

    async fn xoauth2(script: Vec<Step>) -> Result<(), UpstreamAuthError> {
        xoauth2_with(scripted_server, script).await
    }

    fn challenge_401() -> &'static str {
        let challenge = STANDARD.encode(r#"{"status":"401","schemes":"bearer","scope":"x"}"#);
        Box::leak(format!("334 {challenge}\r\n").into_boxed_str())
    }

    #[tokio::test]
    async fn upstream_xoauth2_success_and_rejections() {
        xoauth2(vec![(
            "AUTH XOAUTH2 dXNlcj0=",
            "235 2.7.0 Authentication successful\r\n",
        )])
        .await
        .unwrap();
        // The error challenge is answered with an empty line before the final reply comes.
        let err = xoauth2(vec![
            ("AUTH XOAUTH2", challenge_401()),
            (EMPTY_LINE, "535 5.7.3 Authentication unsuccessful\r\n"),
        ])
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("535 5.7.3") && text.contains("status 401"),
            "{text}"
        );
        let err = xoauth2(vec![(
            "AUTH XOAUTH2",
            "535 5.7.139 Authentication unsuccessful\r\n",
        )])
        .await
        .unwrap_err();
        assert!(matches!(err, UpstreamAuthError::Rejected(ref r) if r.contains("5.7.139")));
    }

    #[tokio::test]
    async fn upstream_xoauth2_hang_ups_and_garbage_are_dialog_failures_not_rejections() {
        // Not a verdict on the token: the caller keeps it and reports the upstream.
        let hung_up = xoauth2_with(scripted_then_closed, vec![("AUTH XOAUTH2", "")]).await;
        assert!(
            matches!(hung_up, Err(UpstreamAuthError::Dialog(_))),
            "{hung_up:?}"
        );
        let after_challenge = xoauth2_with(
            scripted_then_closed,
            vec![("AUTH XOAUTH2", challenge_401()), (EMPTY_LINE, "")],
        )
        .await;
        assert!(
            matches!(after_challenge, Err(UpstreamAuthError::Dialog(_))),
            "{after_challenge:?}"
        );
        let garbage = xoauth2(vec![("AUTH XOAUTH2", "HTTP/1.1 400 Bad Request\r\n")]).await;
        assert!(
            matches!(
                garbage,
                Err(UpstreamAuthError::Dialog(UpstreamDialogError::Unexpected(
                    _
                )))
            ),
            "{garbage:?}"
        );
    }

    #[tokio::test]
    async fn upstream_ehlo_after_tls() {
        let (ours, server) = duplex(8192);
        scripted_server(server, vec![("EHLO gw", "250-x\r\n250 AUTH XOAUTH2\r\n")]);
        let lines = upstream_ehlo(&mut LineConn::new(ours), "gw").await.unwrap();
        assert_eq!(lines, vec!["250-x", "250 AUTH XOAUTH2"]);
    }
}
