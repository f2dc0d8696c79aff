//! POP3 (RFC 1939 + RFC 2595 STLS): the server role towards the device and the client role
//! towards the upstream, up to the start of TLS; and, for `auth = "xoauth2"` routes, the login
//! after TLS (`USER`/`PASS` and `AUTH PLAIN` from the device, `AUTH XOAUTH2` to the upstream,
//! RFC 5034).

use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use crate::secret::Secret;

use super::sasl::{self, SaslError};
use super::{
    rejection, verb, DeviceLogin, DialogError, LineConn, Login, LoginAnswer, StartTls,
    UpstreamAuthError, UpstreamDialogError, MAX_COMMANDS, MAX_REPLY_LINES,
};

/// Over a connection limit, before any dialog.
pub const BUSY: &[u8] = b"-ERR [SYS/TEMP] too many connections, try again later\r\n";

/// The go-ahead for the device's STLS.
pub fn starttls_accepted() -> Vec<u8> {
    b"+OK Begin TLS negotiation\r\n".to_vec()
}

/// The transient error when the upstream leg failed (in place of a greeting, or to STLS).
pub fn unavailable(reason: &str) -> Vec<u8> {
    format!("-ERR [SYS/TEMP] upstream unavailable ({reason}), try again later\r\n").into_bytes()
}

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
                    crate::text::printable(&reply),
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
    let line = crate::text::printable(String::from_utf8_lossy(&raw).trim_end());
    Err(UpstreamDialogError::Greeting(line))
}

// The login after TLS (`auth = "xoauth2"`).

/// Serves CAPA, NOOP and QUIT until the device has sent `USER` and `PASS`, or `AUTH PLAIN`
/// with its credentials.
pub async fn device_until_login<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<DeviceLogin, DialogError> {
    let mut user: Option<String> = None;
    let login = |user, password| DeviceLogin {
        login: Login::Password { user, password },
        tag: None,
        client_name: None,
    };
    for _ in 0..MAX_COMMANDS {
        let line = Zeroizing::new(read_auth_line(conn).await?);
        let (command, arg) = verb(&line);
        let reply = match command.as_str() {
            "CAPA" => "+OK capability list follows\r\nUSER\r\nSASL PLAIN\r\n.\r\n".to_string(),
            "NOOP" => "+OK\r\n".to_string(),
            "QUIT" => {
                conn.send(b"+OK bye\r\n").await?;
                return Err(DialogError::Quit);
            }
            "STLS" => "-ERR TLS already active\r\n".to_string(),
            "USER" if arg.is_empty() || arg.len() > sasl::MAX_USER => {
                "-ERR invalid user name\r\n".to_string()
            }
            "USER" if arg.chars().any(char::is_control) => "-ERR invalid user name\r\n".to_string(),
            "USER" => {
                user = Some(arg.to_string());
                "+OK send PASS\r\n".to_string()
            }
            "PASS" => match user.take() {
                None => "-ERR USER first\r\n".to_string(),
                Some(_) if arg.is_empty() || arg.len() > sasl::MAX_PASSWORD => {
                    "-ERR invalid password\r\n".to_string()
                }
                Some(name) => return Ok(login(name, Secret::new(arg))),
            },
            "AUTH" => {
                let (mechanism, initial) = verb(arg);
                match mechanism.as_str() {
                    "" => "+OK\r\nPLAIN\r\n.\r\n".to_string(),
                    "PLAIN" => {
                        let response = if initial.is_empty() {
                            conn.send(b"+ \r\n").await?;
                            Zeroizing::new(read_auth_line(conn).await?)
                        } else {
                            Zeroizing::new(initial.to_string())
                        };
                        match sasl::decode_plain(response.as_bytes()) {
                            Ok(creds) => return Ok(login(creds.user, creds.password)),
                            Err(SaslError::Cancelled) => "-ERR authentication cancelled\r\n".into(),
                            Err(err) => format!("-ERR {err}\r\n"),
                        }
                    }
                    _ => "-ERR unsupported mechanism\r\n".to_string(),
                }
            }
            _ => "-ERR authenticate first\r\n".to_string(),
        };
        conn.send(reply.as_bytes()).await?;
    }
    conn.send(b"-ERR too many commands before login\r\n")
        .await?;
    Err(DialogError::TooManyCommands)
}

/// Reads one line of the login dialog as text, answering an over-long one.
async fn read_auth_line<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<String, DialogError> {
    match conn.read_text().await {
        Err(DialogError::LineTooLong) => {
            conn.send(b"-ERR line too long\r\n").await?;
            Err(DialogError::LineTooLong)
        }
        line => line,
    }
}

/// The answer to the device's login.
pub fn login_answer(answer: LoginAnswer) -> Vec<u8> {
    let text: &[u8] = match answer {
        LoginAnswer::Accepted => b"+OK logged in\r\n",
        LoginAnswer::BadPassword => b"-ERR [AUTH] invalid credentials\r\n",
        LoginAnswer::Unavailable => {
            b"-ERR [SYS/TEMP] temporary authentication failure, try again later\r\n"
        }
    };
    text.to_vec()
}

/// `AUTH XOAUTH2 <initial>`: `+OK` is success; a `+` error challenge is answered with an empty
/// line and the final `-ERR` read.
pub async fn upstream_xoauth2<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    initial: &Secret,
) -> Result<(), UpstreamAuthError> {
    let command = Zeroizing::new(format!("AUTH XOAUTH2 {}\r\n", initial.expose()));
    conn.send(command.as_bytes())
        .await
        .map_err(DialogError::from)?;
    let reply = conn.read_text().await?;
    if reply.starts_with("+OK") {
        return Ok(());
    }
    if let Some(b64) = reply.strip_prefix('+') {
        let challenge = sasl::decode_xoauth2_challenge(b64.as_bytes());
        conn.send(b"\r\n").await.map_err(DialogError::from)?;
        let last = conn.read_text().await?;
        return Err(UpstreamAuthError::Rejected(rejection(
            &last,
            Some(&challenge),
        )));
    }
    if reply.starts_with("-ERR") {
        return Err(UpstreamAuthError::Rejected(rejection(&reply, None)));
    }
    Err(UpstreamDialogError::Unexpected(crate::text::printable(&reply)).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::{read_until, scripted_server};
    use tokio::io::{duplex, AsyncWriteExt};

    #[tokio::test]
    async fn device_dialog_refuses_credentials_and_reaches_stls() {
        let (ours, mut device) = duplex(4096);
        let task = tokio::spawn(async move {
            let mut conn = LineConn::new(ours);
            let start = device_until_starttls(&mut conn, "gw").await;
            (start, conn.into_parts().1)
        });
        assert!(read_until(&mut device, "\r\n").await.starts_with("+OK gw"));
        device.write_all(b"CAPA\r\n").await.unwrap();
        assert!(read_until(&mut device, "\r\n.\r\n")
            .await
            .contains("\r\nSTLS\r\n"));
        for command in [
            "USER me\r\n",
            "PASS secret\r\n",
            "APOP me 0123\r\n",
            "RETR 1\r\n",
        ] {
            device.write_all(command.as_bytes()).await.unwrap();
            assert!(
                read_until(&mut device, "\r\n").await.starts_with("-ERR"),
                "{command}"
            );
        }
        device
            .write_all(b"STLS\r\nUSER injected\r\n")
            .await
            .unwrap();
        let (start, pipelined) = task.await.unwrap();
        assert!(start.is_ok());
        assert_eq!(pipelined, b"USER injected\r\n");
    }

    #[tokio::test]
    async fn device_dialog_limits_and_quit() {
        let (ours, mut device) = duplex(8192);
        let task =
            tokio::spawn(
                async move { device_until_starttls(&mut LineConn::new(ours), "gw").await },
            );
        device
            .write_all("NOOP\r\n".repeat(MAX_COMMANDS + 1).as_bytes())
            .await
            .unwrap();
        read_until(&mut device, "-ERR too many").await;
        assert!(matches!(
            task.await.unwrap(),
            Err(DialogError::TooManyCommands)
        ));

        let (ours, mut device) = duplex(1024);
        let task =
            tokio::spawn(
                async move { device_until_starttls(&mut LineConn::new(ours), "gw").await },
            );
        device.write_all(b"QUIT\r\n").await.unwrap();
        read_until(&mut device, "+OK bye").await;
        assert!(matches!(task.await.unwrap(), Err(DialogError::Quit)));
    }

    async fn upstream(
        script: Vec<(&'static str, &'static str)>,
    ) -> Result<(Vec<u8>, Vec<u8>), UpstreamDialogError> {
        let (ours, server) = duplex(4096);
        scripted_server(server, script);
        let mut conn = LineConn::new(ours);
        let greeting = upstream_starttls(&mut conn).await?;
        Ok((greeting, conn.into_parts().1))
    }

    #[tokio::test]
    async fn upstream_dialog_reaches_tls_and_fails_closed() {
        let (greeting, leftover) = upstream(vec![
            ("", "+OK POP3 ready <1.2@host>\r\n"),
            ("CAPA", "+OK\r\nUSER\r\nSTLS\r\nUIDL\r\n.\r\n"),
            ("STLS", "+OK Begin TLS\r\n"),
        ])
        .await
        .unwrap();
        assert_eq!(greeting, b"+OK POP3 ready <1.2@host>\r\n");
        assert!(leftover.is_empty());

        let no_stls = upstream(vec![("", "+OK\r\n"), ("CAPA", "+OK\r\nUSER\r\n.\r\n")]).await;
        assert!(matches!(no_stls, Err(UpstreamDialogError::NoStarttls)));
        let no_capa = upstream(vec![("", "+OK\r\n"), ("CAPA", "-ERR unknown command\r\n")]).await;
        assert!(matches!(no_capa, Err(UpstreamDialogError::NoStarttls)));
        let refused = upstream(vec![
            ("", "+OK\r\n"),
            ("CAPA", "+OK\r\nSTLS\r\n.\r\n"),
            ("STLS", "-ERR not now\r\n"),
        ])
        .await;
        assert!(matches!(
            refused,
            Err(UpstreamDialogError::StarttlsRefused(_))
        ));
        let busy = upstream(vec![("", "-ERR busy\r\n")]).await;
        assert!(matches!(busy, Err(UpstreamDialogError::Greeting(_))));
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

    fn serve() -> (
        tokio::task::JoinHandle<Result<DeviceLogin, DialogError>>,
        tokio::io::DuplexStream,
    ) {
        let (ours, device) = duplex(8192);
        let task = tokio::spawn(async move {
            let mut conn = LineConn::with_max_line(ours, crate::protocol::MAX_AUTH_LINE);
            device_until_login(&mut conn).await
        });
        (task, device)
    }

    fn password_of(login: &DeviceLogin) -> (String, String) {
        match &login.login {
            Login::Password { user, password } => (user.clone(), password.expose().to_string()),
            Login::Without { .. } => panic!("expected a password login"),
        }
    }

    #[tokio::test]
    async fn capa_then_user_pass() {
        let (task, mut device) = serve();
        device
            .write_all(b"CAPA\r\nPASS early\r\nUSER scanner1\r\n")
            .await
            .unwrap();
        let seen = read_until(&mut device, "+OK send PASS\r\n").await;
        assert!(
            seen.contains("SASL PLAIN\r\n.\r\n") && seen.contains("-ERR USER first"),
            "{seen}"
        );
        device.write_all(b"PASS pa ss\r\n").await.unwrap();
        let login = task.await.unwrap().unwrap();
        assert_eq!(password_of(&login), ("scanner1".into(), "pa ss".into()));
        assert_eq!(login_answer(LoginAnswer::Accepted), b"+OK logged in\r\n");
        assert!(login_answer(LoginAnswer::BadPassword).starts_with(b"-ERR"));
        assert!(login_answer(LoginAnswer::Unavailable).starts_with(b"-ERR [SYS/TEMP]"));
    }

    #[tokio::test]
    async fn auth_plain_with_and_without_initial_response() {
        let ir = STANDARD.encode("\0scanner1\0pw");
        let (task, mut device) = serve();
        device
            .write_all(format!("AUTH PLAIN {ir}\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(password_of(&task.await.unwrap().unwrap()).1, "pw");

        let (task, mut device) = serve();
        device.write_all(b"STAT\r\nAUTH PLAIN\r\n").await.unwrap();
        let seen = read_until(&mut device, "+ \r\n").await;
        assert!(seen.starts_with("-ERR authenticate first"), "{seen}");
        device
            .write_all(format!("{ir}\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(password_of(&task.await.unwrap().unwrap()).0, "scanner1");

        let (task, mut device) = serve();
        device.write_all(b"QUIT\r\n").await.unwrap();
        read_until(&mut device, "+OK bye").await;
        assert!(matches!(task.await.unwrap(), Err(DialogError::Quit)));
    }

    /// The upstream XOAUTH2 login against `server` playing `script`.
    async fn xoauth2_with(
        server: fn(DuplexStream, Vec<Step>),
        script: Vec<Step>,
    ) -> Result<(), UpstreamAuthError> {
        let (ours, theirs) = duplex(8192);
        server(theirs, script);
        bounded(upstream_xoauth2(
            &mut LineConn::new(ours),
            &Secret::new("dXNlcj0="),
        ))
        .await
    }

    async fn xoauth2(script: Vec<Step>) -> Result<(), UpstreamAuthError> {
        xoauth2_with(scripted_server, script).await
    }

    #[tokio::test]
    async fn upstream_xoauth2_success_and_rejection() {
        xoauth2(vec![(
            "AUTH XOAUTH2 dXNlcj0=",
            "+OK User successfully authenticated.\r\n",
        )])
        .await
        .unwrap();
        // The error challenge is answered with an empty line before the final -ERR comes.
        let err = xoauth2(vec![
            ("AUTH XOAUTH2", "+ eyJzdGF0dXMiOiI0MDEifQ==\r\n"),
            (
                EMPTY_LINE,
                "-ERR Authentication failure: unknown user name or bad password.\r\n",
            ),
        ])
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("-ERR Authentication failure") && text.contains("status 401"),
            "{text}"
        );
        let err = xoauth2(vec![("AUTH XOAUTH2", "-ERR nope\r\n")])
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamAuthError::Rejected(_)));
    }

    #[tokio::test]
    async fn upstream_xoauth2_hang_ups_and_garbage_are_dialog_failures_not_rejections() {
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
        let hung_up = xoauth2_with(
            scripted_then_closed,
            vec![("AUTH XOAUTH2", "+ e30=\r\n"), (EMPTY_LINE, "")],
        )
        .await;
        assert!(
            matches!(hung_up, Err(UpstreamAuthError::Dialog(_))),
            "{hung_up:?}"
        );
    }

    #[tokio::test]
    async fn unusable_logins_are_answered_and_the_dialog_goes_on() {
        let (task, mut device) = serve();
        device
            .write_all(b"AUTH\r\nAUTH LOGIN\r\nAUTH PLAIN *\r\nAUTH PLAIN !!\r\nSTLS\r\n")
            .await
            .unwrap();
        // An empty PASS uses up the USER before it.
        device
            .write_all(b"USER\r\nUSER u\r\nPASS\r\nPASS p\r\nNOOP\r\n")
            .await
            .unwrap();
        let seen = read_until(&mut device, "USER first\r\n+OK\r\n").await;
        let expected = [
            "+OK\r\nPLAIN\r\n.\r\n",
            "-ERR unsupported mechanism\r\n",
            "-ERR authentication cancelled\r\n",
            "-ERR the response is not valid base64\r\n",
            "-ERR TLS already active\r\n",
            "-ERR invalid user name\r\n",
            "+OK send PASS\r\n",
            "-ERR invalid password\r\n",
            "-ERR USER first\r\n",
            "+OK\r\n",
        ];
        assert_eq!(seen, expected.concat());
        device
            .write_all(b"USER scanner1\r\nPASS pw\r\n")
            .await
            .unwrap();
        let login = task.await.unwrap().unwrap();
        assert_eq!(password_of(&login), ("scanner1".into(), "pw".into()));
    }

    #[tokio::test]
    async fn login_dialog_limits_and_hang_up() {
        let (task, mut device) = serve();
        device
            .write_all("NOOP\r\n".repeat(MAX_COMMANDS + 1).as_bytes())
            .await
            .unwrap();
        read_until(&mut device, "-ERR too many commands before login\r\n").await;
        assert!(matches!(
            task.await.unwrap(),
            Err(DialogError::TooManyCommands)
        ));
        let (task, mut device) = serve();
        device
            .write_all(&vec![b'A'; crate::protocol::MAX_AUTH_LINE + 10])
            .await
            .unwrap();
        read_until(&mut device, "-ERR line too long\r\n").await;
        assert!(matches!(task.await.unwrap(), Err(DialogError::LineTooLong)));
        let (task, mut device) = serve();
        device.write_all(b"USER scanner1\r\n").await.unwrap();
        read_until(&mut device, "+OK send PASS\r\n").await;
        drop(device);
        assert!(matches!(task.await.unwrap(), Err(DialogError::Closed)));
    }
}
