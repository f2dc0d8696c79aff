//! IMAP (RFC 9051/3501 STARTTLS): the server role towards the device and the client role
//! towards the upstream, up to the start of TLS; and, for `auth = "xoauth2"` routes, the login
//! after TLS (`LOGIN` and `AUTHENTICATE PLAIN` from the device, `AUTHENTICATE XOAUTH2` to the
//! upstream).

use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use crate::secret::Secret;

use super::sasl::{self, SaslError};
use super::{
    rejection, verb, DeviceLogin, DialogError, LineConn, Login, LoginAnswer, StartTls,
    UpstreamAuthError, UpstreamDialogError, MAX_COMMANDS, MAX_LINE, MAX_REPLY_LINES,
};

const CAPABILITIES: &str = "IMAP4rev1 STARTTLS LOGINDISABLED";

/// Over a connection limit, before any dialog.
pub const BUSY: &[u8] = b"* BYE [UNAVAILABLE] too many connections, try again later\r\n";

/// The go-ahead for the device's STARTTLS, tagged with its tag.
pub fn starttls_accepted(start: &StartTls) -> Vec<u8> {
    tagged(start, "OK Begin TLS negotiation now")
}

/// The answer to STARTTLS when the upstream leg failed.
pub fn starttls_refused(start: &StartTls, reason: &str) -> Vec<u8> {
    let mut reply = unavailable(reason);
    reply.extend(tagged(
        start,
        &format!("NO [UNAVAILABLE] upstream unavailable ({reason})"),
    ));
    reply
}

/// The transient error in place of a greeting when the upstream leg failed.
pub fn unavailable(reason: &str) -> Vec<u8> {
    format!("* BYE [UNAVAILABLE] upstream unavailable ({reason}), try again later\r\n").into_bytes()
}

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

/// Reads one command and returns its first line (tag and command name). A non-synchronizing
/// literal (`{N+}`, RFC 7888) makes the client send its data without waiting: exactly N octets
/// are skipped and the command goes on after them. A synchronizing one (`{N}`) gets no
/// continuation, so the client sends nothing more for it.
async fn read_command<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<String, DialogError> {
    let first = conn.read_text().await?;
    let mut line = first.clone();
    for _ in 0..MAX_COMMANDS {
        let Some(size) = non_sync_literal(&line) else {
            return Ok(first);
        };
        if size > MAX_LINE {
            return Err(DialogError::LineTooLong);
        }
        conn.skip(size).await?;
        line = conn.read_text().await?;
    }
    Err(DialogError::TooManyCommands)
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
    if !is_ok(&status) {
        return Err(UpstreamDialogError::Unexpected(format!(
            "CAPABILITY answered {status}"
        )));
    }
    // Responses are case-insensitive (RFC 9051): `* capability ... starttls` counts too.
    let offers_starttls = untagged.iter().any(|line| {
        let mut words = line.split_whitespace().skip(1);
        words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case("CAPABILITY"))
            && words.any(|c| c.eq_ignore_ascii_case("STARTTLS"))
    });
    if !offers_starttls {
        return Err(UpstreamDialogError::NoStarttls);
    }
    let (_, status) = command(conn, "t2", "STARTTLS").await?;
    if !is_ok(&status) {
        return Err(UpstreamDialogError::StarttlsRefused(status));
    }
    Ok(greeting)
}

/// A tagged status of `OK`, in any case.
fn is_ok(status: &str) -> bool {
    verb(status).0 == "OK"
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
            return Ok((untagged, crate::text::printable(status)));
        }
        if !line.starts_with("* ") {
            return Err(UpstreamDialogError::Unexpected(crate::text::printable(
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
    let line = crate::text::printable(String::from_utf8_lossy(&raw).trim_end());
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

// The login after TLS (`auth = "xoauth2"`).

/// What the device is told before it logs in: plain logins welcome.
const LOGIN_CAPABILITIES: &str = "IMAP4rev1 SASL-IR AUTH=PLAIN";

/// The tag used for the upstream's AUTHENTICATE.
const UPSTREAM_TAG: &str = "tb1";

/// Serves CAPABILITY, NOOP, ID and LOGOUT until the device sends `LOGIN user pass` or
/// `AUTHENTICATE PLAIN` with its credentials. Literals are refused with BAD.
pub async fn device_until_login<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<DeviceLogin, DialogError> {
    for _ in 0..MAX_COMMANDS {
        let line = Zeroizing::new(read_auth_line(conn).await?);
        let (tag, command) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        if !valid_tag(tag) {
            conn.send(b"* BAD missing or invalid tag\r\n").await?;
            continue;
        }
        let (command, arg) = verb(command);
        let login = |user, password| DeviceLogin {
            login: Login::Password { user, password },
            tag: Some(tag.to_string()),
            client_name: None,
        };
        let reply = match command.as_str() {
            "CAPABILITY" => {
                format!("* CAPABILITY {LOGIN_CAPABILITIES}\r\n{tag} OK CAPABILITY completed\r\n")
            }
            "NOOP" => format!("{tag} OK NOOP completed\r\n"),
            "ID" => format!("* ID NIL\r\n{tag} OK ID completed\r\n"),
            "LOGOUT" => {
                conn.send(format!("* BYE logging out\r\n{tag} OK LOGOUT completed\r\n").as_bytes())
                    .await?;
                return Err(DialogError::Quit);
            }
            "STARTTLS" => format!("{tag} BAD TLS already active\r\n"),
            "LOGIN" => match login_arguments(arg) {
                Ok((user, password)) => return Ok(login(user, password)),
                Err(why) => format!("{tag} BAD {why}\r\n"),
            },
            "AUTHENTICATE" => {
                let (mechanism, initial) = verb(arg);
                if mechanism != "PLAIN" {
                    format!("{tag} NO [CANNOT] unsupported mechanism\r\n")
                } else {
                    let response = if initial.is_empty() {
                        conn.send(b"+ \r\n").await?;
                        Zeroizing::new(read_auth_line(conn).await?)
                    } else {
                        Zeroizing::new(initial.to_string())
                    };
                    match sasl::decode_plain(response.as_bytes()) {
                        Ok(creds) => return Ok(login(creds.user, creds.password)),
                        Err(SaslError::Cancelled) => {
                            format!("{tag} BAD authentication cancelled\r\n")
                        }
                        Err(err) => format!("{tag} BAD {err}\r\n"),
                    }
                }
            }
            _ => format!("{tag} BAD log in first\r\n"),
        };
        conn.send(reply.as_bytes()).await?;
    }
    conn.send(b"* BYE too many commands before login\r\n")
        .await?;
    Err(DialogError::TooManyCommands)
}

/// Reads one line of the login dialog as text, answering an over-long one.
async fn read_auth_line<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
) -> Result<String, DialogError> {
    match conn.read_text().await {
        Err(DialogError::LineTooLong) => {
            conn.send(b"* BYE line too long\r\n").await?;
            Err(DialogError::LineTooLong)
        }
        line => line,
    }
}

/// The user name and password of `LOGIN`: two astrings (atoms or quoted strings).
fn login_arguments(arg: &str) -> Result<(String, Secret), &'static str> {
    let (user, rest) = astring(arg)?;
    let (password, rest) = astring(rest.trim_start())?;
    let password = Zeroizing::new(password);
    if !rest.trim().is_empty() {
        return Err("LOGIN takes two arguments");
    }
    if user.is_empty() || user.len() > sasl::MAX_USER || user.chars().any(char::is_control) {
        return Err("invalid user name");
    }
    if password.is_empty() || password.len() > sasl::MAX_PASSWORD {
        return Err("invalid password");
    }
    Ok((user, Secret::new(password.as_str())))
}

/// One astring at the start of `text` and the rest after it.
fn astring(text: &str) -> Result<(String, &str), &'static str> {
    if text.starts_with('{') {
        return Err("literals are not supported here: send quoted strings");
    }
    let Some(quoted) = text.strip_prefix('"') else {
        let end = text.find(' ').unwrap_or(text.len());
        let atom = &text[..end];
        if atom.is_empty() || atom.contains(['"', '\\', '(', ')', '{']) {
            return Err("LOGIN needs a user name and a password");
        }
        return Ok((atom.to_string(), &text[end..]));
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &quoted[i + 1..])),
            '\\' => match chars.next() {
                Some((_, escaped @ ('"' | '\\'))) => value.push(escaped),
                _ => return Err("bad escape in a quoted string"),
            },
            _ => value.push(c),
        }
    }
    Err("unterminated quoted string")
}

/// The tagged answer to the device's login.
pub fn login_answer(login: &DeviceLogin, answer: LoginAnswer) -> Vec<u8> {
    let tag = login.tag.as_deref().unwrap_or("*");
    let text = match answer {
        LoginAnswer::Accepted => "OK authenticated",
        LoginAnswer::BadPassword => "NO [AUTHENTICATIONFAILED] invalid credentials",
        LoginAnswer::Unavailable => {
            "NO [UNAVAILABLE] temporary authentication failure, try again later"
        }
    };
    format!("{tag} {text}\r\n").into_bytes()
}

/// `AUTHENTICATE XOAUTH2 <initial>` (SASL-IR): a tagged OK is success; a `+` error challenge is
/// answered with an empty line and the tagged status read.
pub async fn upstream_xoauth2<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut LineConn<S>,
    initial: &Secret,
) -> Result<(), UpstreamAuthError> {
    let command = Zeroizing::new(format!(
        "{UPSTREAM_TAG} AUTHENTICATE XOAUTH2 {}\r\n",
        initial.expose()
    ));
    conn.send(command.as_bytes())
        .await
        .map_err(DialogError::from)?;
    let mut challenge = None;
    for _ in 0..MAX_REPLY_LINES {
        let line = conn.read_text().await?;
        if let Some(status) = line
            .strip_prefix(UPSTREAM_TAG)
            .and_then(|rest| rest.strip_prefix(' '))
        {
            if is_ok(status) {
                return Ok(());
            }
            return Err(UpstreamAuthError::Rejected(rejection(
                status,
                challenge.as_ref(),
            )));
        }
        if let Some(b64) = line.strip_prefix('+') {
            if challenge.is_some() {
                return Err(UpstreamDialogError::Unexpected("a second challenge".into()).into());
            }
            challenge = Some(sasl::decode_xoauth2_challenge(b64.as_bytes()));
            conn.send(b"\r\n").await.map_err(DialogError::from)?;
        } else if !line.starts_with("* ") {
            return Err(UpstreamDialogError::Unexpected(crate::text::printable(&line)).into());
        }
    }
    Err(UpstreamDialogError::Unexpected(format!("more than {MAX_REPLY_LINES} lines")).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::{read_until, scripted_server};
    use tokio::io::{duplex, AsyncWriteExt};

    #[test]
    fn literals_and_tags() {
        assert_eq!(non_sync_literal("a LOGIN {5+}"), Some(5));
        assert_eq!(non_sync_literal("a LOGIN {5}"), None);
        assert!(valid_tag("a001") && !valid_tag("") && !valid_tag("a*"));
    }

    #[tokio::test]
    async fn device_dialog_refuses_login_and_reaches_starttls() {
        let (ours, mut device) = duplex(4096);
        let task = tokio::spawn(async move {
            let mut conn = LineConn::new(ours);
            let start = device_until_starttls(&mut conn, "gw").await;
            (start, conn.into_parts().1)
        });
        let greeting = read_until(&mut device, "\r\n").await;
        assert!(
            greeting.starts_with("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED]"),
            "{greeting}"
        );
        device.write_all(b"a1 CAPABILITY\r\n").await.unwrap();
        let caps = read_until(&mut device, "a1 OK").await;
        assert!(
            caps.contains("* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n"),
            "{caps}"
        );
        device.write_all(b"a2 LOGIN user secret\r\n").await.unwrap();
        assert!(read_until(&mut device, "\r\n")
            .await
            .starts_with("a2 NO [PRIVACYREQUIRED]"));
        // A non-synchronizing literal's data is skipped, not taken for a command.
        device
            .write_all(b"a3 LOGIN {4+}\r\nuser secret\r\n")
            .await
            .unwrap();
        assert!(read_until(&mut device, "\r\n").await.starts_with("a3 NO"));
        device.write_all(b"a4 SELECT INBOX\r\n").await.unwrap();
        assert!(read_until(&mut device, "\r\n").await.starts_with("a4 BAD"));
        device.write_all(b"no-space-tag\r\n").await.unwrap();
        assert!(read_until(&mut device, "\r\n")
            .await
            .starts_with("no-space-tag BAD"));
        device
            .write_all(b"a5 STARTTLS\r\na6 LOGIN x y\r\n")
            .await
            .unwrap();
        let (start, pipelined) = task.await.unwrap();
        assert_eq!(start.unwrap().tag.as_deref(), Some("a5"));
        assert_eq!(
            pipelined, b"a6 LOGIN x y\r\n",
            "pipelined bytes are handed back for discarding"
        );
    }

    #[tokio::test]
    async fn device_dialog_limits_and_logout() {
        let (ours, mut device) = duplex(4096);
        let task =
            tokio::spawn(
                async move { device_until_starttls(&mut LineConn::new(ours), "gw").await },
            );
        device.write_all(&[b'x'; 700]).await.unwrap();
        read_until(&mut device, "* BYE").await;
        assert!(matches!(task.await.unwrap(), Err(DialogError::LineTooLong)));

        let (ours, mut device) = duplex(4096);
        let task =
            tokio::spawn(
                async move { device_until_starttls(&mut LineConn::new(ours), "gw").await },
            );
        device.write_all(b"z LOGOUT\r\n").await.unwrap();
        read_until(&mut device, "z OK LOGOUT").await;
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
    async fn upstream_dialog_reaches_tls() {
        let (greeting, leftover) = upstream(vec![
            (
                "",
                "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n",
            ),
            (
                "t1 CAPABILITY",
                "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\nt1 OK done\r\n",
            ),
            ("t2 STARTTLS", "t2 OK Begin TLS negotiation now\r\n"),
        ])
        .await
        .unwrap();
        assert!(greeting.starts_with(b"* OK [CAPABILITY"));
        assert!(leftover.is_empty());
    }

    #[tokio::test]
    async fn upstream_capabilities_are_case_insensitive() {
        let (greeting, _) = upstream(vec![
            ("", "* OK ready\r\n"),
            (
                "t1 CAPABILITY",
                "* capability imap4rev1 starttls\r\nt1 ok done\r\n",
            ),
            ("t2 STARTTLS", "t2 ok go\r\n"),
        ])
        .await
        .unwrap();
        assert_eq!(greeting, b"* OK ready\r\n");
    }

    #[tokio::test]
    async fn upstream_dialog_fails_closed() {
        let preauth = upstream(vec![("", "* PREAUTH [CAPABILITY IMAP4rev1] logged in\r\n")]).await;
        assert!(
            matches!(preauth, Err(UpstreamDialogError::Greeting(ref g)) if g.contains("PREAUTH"))
        );
        let bye = upstream(vec![("", "* BYE overloaded\r\n")]).await;
        assert!(matches!(bye, Err(UpstreamDialogError::Greeting(_))));
        let no_starttls = upstream(vec![
            ("", "* OK ready\r\n"),
            (
                "t1 CAPABILITY",
                "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nt1 OK done\r\n",
            ),
        ])
        .await;
        assert!(matches!(no_starttls, Err(UpstreamDialogError::NoStarttls)));
        let refused = upstream(vec![
            ("", "* OK ready\r\n"),
            (
                "t1 CAPABILITY",
                "* CAPABILITY IMAP4rev1 STARTTLS\r\nt1 OK done\r\n",
            ),
            ("t2 STARTTLS", "t2 BAD not now\r\n"),
        ])
        .await;
        assert!(matches!(
            refused,
            Err(UpstreamDialogError::StarttlsRefused(_))
        ));
        let (_, injected) = upstream(vec![
            ("", "* OK ready\r\n"),
            (
                "t1 CAPABILITY",
                "* CAPABILITY IMAP4rev1 STARTTLS\r\nt1 OK done\r\n",
            ),
            (
                "t2 STARTTLS",
                "t2 OK go\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n",
            ),
        ])
        .await
        .unwrap();
        assert!(
            !injected.is_empty(),
            "bytes after the OK are handed back for the caller to refuse"
        );
    }

    #[tokio::test]
    async fn implicit_tls_greeting_accepts_preauth() {
        let (ours, server) = duplex(1024);
        scripted_server(server, vec![("", "* PREAUTH ready\r\n")]);
        assert!(read_greeting(&mut LineConn::new(ours), false).await.is_ok());
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
    async fn capability_then_login_with_quoted_strings() {
        let (task, mut device) = serve();
        device.write_all(b"a1 CAPABILITY\r\n").await.unwrap();
        let caps = read_until(&mut device, "a1 OK").await;
        assert!(
            caps.contains("AUTH=PLAIN") && !caps.contains("LOGINDISABLED"),
            "{caps}"
        );
        device
            .write_all(b"a2 LOGIN \"scanner1\" \"pa ss\\\"word\"\r\n")
            .await
            .unwrap();
        let login = task.await.unwrap().unwrap();
        assert_eq!(login.tag.as_deref(), Some("a2"));
        assert_eq!(
            password_of(&login),
            ("scanner1".into(), "pa ss\"word".into())
        );
        assert_eq!(
            login_answer(&login, LoginAnswer::Accepted),
            b"a2 OK authenticated\r\n"
        );
        assert_eq!(
            login_answer(&login, LoginAnswer::BadPassword),
            b"a2 NO [AUTHENTICATIONFAILED] invalid credentials\r\n"
        );
        assert!(login_answer(&login, LoginAnswer::Unavailable).starts_with(b"a2 NO [UNAVAILABLE]"));
    }

    #[tokio::test]
    async fn login_with_atoms_and_literals_refused() {
        let (task, mut device) = serve();
        device
            .write_all(b"a1 LOGIN scanner1 {5}\r\na2 SELECT INBOX\r\na3 LOGIN u p\r\n")
            .await
            .unwrap();
        let seen = read_until(&mut device, "a2 BAD").await;
        assert!(seen.contains("a1 BAD literals"), "{seen}");
        assert_eq!(
            password_of(&task.await.unwrap().unwrap()),
            ("u".into(), "p".into())
        );
    }

    #[tokio::test]
    async fn authenticate_plain_with_and_without_sasl_ir() {
        let ir = STANDARD.encode("\0scanner1\0pw");
        let (task, mut device) = serve();
        device
            .write_all(format!("x AUTHENTICATE PLAIN {ir}\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(password_of(&task.await.unwrap().unwrap()).1, "pw");

        let (task, mut device) = serve();
        device
            .write_all(b"x AUTHENTICATE XOAUTH2 abc\r\nx AUTHENTICATE PLAIN\r\n")
            .await
            .unwrap();
        let seen = read_until(&mut device, "+ \r\n").await;
        assert!(seen.contains("x NO [CANNOT]"), "{seen}");
        device
            .write_all(format!("{ir}\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(password_of(&task.await.unwrap().unwrap()).0, "scanner1");

        let (task, mut device) = serve();
        device
            .write_all(b"x AUTHENTICATE PLAIN\r\n*\r\ny LOGOUT\r\n")
            .await
            .unwrap();
        let seen = read_until(&mut device, "y OK LOGOUT").await;
        assert!(seen.contains("x BAD authentication cancelled"), "{seen}");
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
            "tb1 AUTHENTICATE XOAUTH2 dXNlcj0=",
            "* CAPABILITY IMAP4rev1\r\ntb1 OK AUTHENTICATE completed.\r\n",
        )])
        .await
        .unwrap();
        // The error challenge is answered with an empty line before the tagged NO comes.
        let err = xoauth2(vec![
            ("tb1 AUTHENTICATE", "+ eyJzdGF0dXMiOiI0MDAifQ==\r\n"),
            (EMPTY_LINE, "tb1 NO AUTHENTICATE failed.\r\n"),
        ])
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("NO AUTHENTICATE failed") && text.contains("status 400"),
            "{text}"
        );
        // A NO without a challenge is a rejection too.
        let err = xoauth2(vec![(
            "tb1 AUTHENTICATE",
            "tb1 NO [AUTHENTICATIONFAILED] no\r\n",
        )])
        .await
        .unwrap_err();
        assert!(
            matches!(err, UpstreamAuthError::Rejected(ref r) if r.contains("AUTHENTICATIONFAILED")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn upstream_xoauth2_odd_dialogs_are_dialog_failures_not_rejections() {
        let second_challenge = xoauth2(vec![
            ("tb1 AUTHENTICATE", "+ e30=\r\n"),
            (EMPTY_LINE, "+ e30=\r\n"),
        ])
        .await;
        assert!(
            matches!(
                second_challenge,
                Err(UpstreamAuthError::Dialog(UpstreamDialogError::Unexpected(ref why)))
                    if why.contains("second challenge")
            ),
            "{second_challenge:?}"
        );
        let garbage = xoauth2(vec![("tb1 AUTHENTICATE", "HTTP/1.1 400 Bad Request\r\n")]).await;
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
            vec![("tb1 AUTHENTICATE", "+ e30=\r\n"), (EMPTY_LINE, "")],
        )
        .await;
        assert!(
            matches!(hung_up, Err(UpstreamAuthError::Dialog(_))),
            "{hung_up:?}"
        );
    }

    #[tokio::test]
    async fn bad_tags_and_unusable_logins_are_answered_and_the_dialog_goes_on() {
        let (task, mut device) = serve();
        device
            .write_all(b"\r\na+b NOOP\r\na1 STARTTLS\r\na2 AUTHENTICATE PLAIN !!\r\n")
            .await
            .unwrap();
        device
            .write_all(b"a3 LOGIN onlyuser\r\na4 LOGIN \"u\r\na5 NOOP\r\n")
            .await
            .unwrap();
        let seen = read_until(&mut device, "a5 OK").await;
        assert_eq!(
            seen.matches("* BAD missing or invalid tag").count(),
            2,
            "{seen}"
        );
        assert!(seen.contains("a1 BAD TLS already active"), "{seen}");
        assert!(
            seen.contains("a2 BAD the response is not valid base64"),
            "{seen}"
        );
        assert!(
            seen.contains("a3 BAD LOGIN needs a user name and a password"),
            "{seen}"
        );
        assert!(seen.contains("a4 BAD unterminated quoted string"), "{seen}");
        device.write_all(b"a6 LOGIN u p\r\n").await.unwrap();
        let login = task.await.unwrap().unwrap();
        assert_eq!(login.tag.as_deref(), Some("a6"));
        assert_eq!(password_of(&login), ("u".into(), "p".into()));
    }

    #[tokio::test]
    async fn login_dialog_limits_and_hang_up() {
        let (task, mut device) = serve();
        device
            .write_all("a NOOP\r\n".repeat(MAX_COMMANDS + 1).as_bytes())
            .await
            .unwrap();
        read_until(&mut device, "* BYE too many commands before login\r\n").await;
        assert!(matches!(
            task.await.unwrap(),
            Err(DialogError::TooManyCommands)
        ));
        let (task, mut device) = serve();
        device
            .write_all(&vec![b'A'; crate::protocol::MAX_AUTH_LINE + 10])
            .await
            .unwrap();
        read_until(&mut device, "* BYE line too long\r\n").await;
        assert!(matches!(task.await.unwrap(), Err(DialogError::LineTooLong)));
        let (task, mut device) = serve();
        device.write_all(b"a AUTHENTICATE PLAIN\r\n").await.unwrap();
        read_until(&mut device, "+ \r\n").await;
        drop(device);
        assert!(matches!(task.await.unwrap(), Err(DialogError::Closed)));
    }
}
