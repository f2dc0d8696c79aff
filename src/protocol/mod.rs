//! The plaintext dialogs before TLS, dispatched by protocol. Each protocol module owns its
//! words: both roles of its dialog (the server role towards the device, `device_*`, and the
//! client role towards the upstream, `upstream_*`), its replies, its goodbye and its
//! capabilities. Everything runs over any `AsyncRead + AsyncWrite`, so it is tested over
//! `tokio::io::duplex` without sockets.

pub mod goodbye;
pub mod imap;
pub mod lines;
pub mod pop3;
pub mod sasl;
pub mod smtp;
#[cfg(test)]
mod testing;

use tokio::io::{AsyncRead, AsyncWrite};

pub use lines::LineConn;

use crate::config::Protocol;
use crate::outcome::UpstreamFailure;

/// Longest line accepted before TLS, CRLF included (SMTP's limit is 512 octets; IMAP and POP3
/// get the same, which every real pre-TLS command fits in).
pub const MAX_LINE: usize = 512;

/// Commands a device may send before STARTTLS; a real device needs three or four.
pub const MAX_COMMANDS: usize = 16;

/// Lines in one multi-line upstream reply before it counts as hostile.
pub const MAX_REPLY_LINES: usize = 64;

/// A protocol with a plaintext dialog, and so with STARTTLS, greetings and goodbyes. Opaque
/// `tcp` has none of these, so it has no `Dialect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Smtp,
    Imap,
    Pop3,
}

impl Dialect {
    pub fn of(protocol: Protocol) -> Option<Dialect> {
        match protocol {
            Protocol::Smtp => Some(Dialect::Smtp),
            Protocol::Imap => Some(Dialect::Imap),
            Protocol::Pop3 => Some(Dialect::Pop3),
            Protocol::Tcp => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Smtp => "smtp",
            Dialect::Imap => "imap",
            Dialect::Pop3 => "pop3",
        }
    }
}

/// Why a pre-TLS dialog ended without reaching TLS.
#[derive(Debug, thiserror::Error)]
pub enum DialogError {
    #[error("peer closed the connection during the dialog")]
    Closed,
    #[error("line longer than {MAX_LINE} octets")]
    LineTooLong,
    #[error("more than {MAX_COMMANDS} commands before STARTTLS")]
    TooManyCommands,
    #[error("device quit before STARTTLS")]
    Quit,
    #[error("{0}")]
    Protocol(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// What the device side of a STARTTLS dialog learned.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StartTls {
    /// The IMAP tag of the STARTTLS command, needed for the tagged reply.
    pub tag: Option<String>,
    /// The name the device gave in SMTP EHLO/HELO (it often names the device model).
    pub client_name: Option<String>,
}

/// Why the upstream dialog failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamDialogError {
    #[error("upstream does not offer STARTTLS")]
    NoStarttls,
    #[error("upstream refused STARTTLS: {0}")]
    StarttlsRefused(String),
    #[error("upstream sent {0} bytes after its STARTTLS reply (injection attempt)")]
    Injection(usize),
    #[error("upstream greeting refused the session: {0}")]
    Greeting(String),
    #[error("unexpected upstream reply: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Dialog(#[from] DialogError),
}

impl UpstreamDialogError {
    pub fn cause(&self) -> UpstreamFailure {
        match self {
            UpstreamDialogError::NoStarttls => UpstreamFailure::NoStarttls,
            UpstreamDialogError::StarttlsRefused(_) => UpstreamFailure::StarttlsRefused,
            UpstreamDialogError::Injection(_) => UpstreamFailure::StarttlsInjection,
            UpstreamDialogError::Greeting(_) => UpstreamFailure::GreetingRefused,
            UpstreamDialogError::Unexpected(_) | UpstreamDialogError::Dialog(_) => {
                UpstreamFailure::DialogFailed
            }
        }
    }
}

/// Runs the device side of the dialog until the device asks for STARTTLS (not yet answered).
pub async fn device_until_starttls<S: AsyncRead + AsyncWrite + Unpin>(
    dialect: Dialect,
    conn: &mut LineConn<S>,
    server_name: &str,
) -> Result<StartTls, DialogError> {
    match dialect {
        Dialect::Smtp => smtp::device_until_starttls(conn, server_name).await,
        Dialect::Imap => imap::device_until_starttls(conn, server_name).await,
        Dialect::Pop3 => pop3::device_until_starttls(conn, server_name).await,
    }
}

/// The positive answer to the device's STARTTLS.
pub fn starttls_accepted(dialect: Dialect, start: &StartTls) -> Vec<u8> {
    match dialect {
        Dialect::Smtp => smtp::starttls_accepted(),
        Dialect::Imap => imap::starttls_accepted(start),
        Dialect::Pop3 => pop3::starttls_accepted(),
    }
}

/// The answer to the device's STARTTLS when the upstream leg failed: a transient error.
pub fn starttls_refused(dialect: Dialect, start: &StartTls, reason: &str) -> Vec<u8> {
    match dialect {
        Dialect::Smtp => smtp::starttls_refused(reason),
        Dialect::Imap => imap::starttls_refused(start, reason),
        Dialect::Pop3 => pop3::unavailable(reason),
    }
}

/// The transient error for a device that expects a greeting when the upstream leg failed.
pub fn unavailable(dialect: Dialect, reason: &str) -> Vec<u8> {
    match dialect {
        Dialect::Smtp => smtp::unavailable(reason),
        Dialect::Imap => imap::unavailable(reason),
        Dialect::Pop3 => pop3::unavailable(reason),
    }
}

/// The "try again later" for a connection over a limit, sent before any dialog.
pub fn busy(dialect: Dialect) -> &'static [u8] {
    match dialect {
        Dialect::Smtp => smtp::BUSY,
        Dialect::Imap => imap::BUSY,
        Dialect::Pop3 => pop3::BUSY,
    }
}

/// The client side of the upstream's dialog up to its positive STARTTLS answer. Returns the
/// greeting the upstream sent.
pub async fn upstream_starttls<S: AsyncRead + AsyncWrite + Unpin>(
    dialect: Dialect,
    conn: &mut LineConn<S>,
    client_name: &str,
) -> Result<Vec<u8>, UpstreamDialogError> {
    match dialect {
        Dialect::Smtp => smtp::upstream_starttls(conn, client_name).await,
        Dialect::Imap => imap::upstream_starttls(conn).await,
        Dialect::Pop3 => pop3::upstream_starttls(conn).await,
    }
}

/// Reads the greeting an implicit-TLS upstream sends first.
pub async fn upstream_greeting<S: AsyncRead + AsyncWrite + Unpin>(
    dialect: Dialect,
    conn: &mut LineConn<S>,
) -> Result<Vec<u8>, UpstreamDialogError> {
    match dialect {
        Dialect::Smtp => smtp::read_greeting(conn).await,
        Dialect::Imap => imap::read_greeting(conn, false).await,
        Dialect::Pop3 => pop3::read_greeting(conn).await,
    }
}

/// tlsbridge's own greeting, for a device that expects one when the upstream sends none after
/// TLS (a STARTTLS upstream): never the upstream's pre-TLS text.
pub fn own_greeting(dialect: Dialect, server_name: &str) -> Vec<u8> {
    match dialect {
        Dialect::Smtp => format!("220 {server_name} ESMTP tlsbridge ready\r\n"),
        Dialect::Imap => format!("* OK {server_name} tlsbridge ready\r\n"),
        Dialect::Pop3 => format!("+OK {server_name} tlsbridge ready\r\n"),
    }
    .into_bytes()
}

/// The first word of a command line, upper-cased, and the rest.
pub(crate) fn verb(line: &str) -> (String, &str) {
    let line = line.trim_start();
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    (verb.to_ascii_uppercase(), rest.trim())
}

// The login dialogs after TLS, for routes with `auth = "xoauth2"`: the server role towards the
// device up to its credentials, the answer to its login, and the client role towards the
// upstream's SASL XOAUTH2 exchange. Each protocol module has its half beside its pre-TLS dialog.

/// Longest line of a login dialog after TLS, CRLF included: a base64 SASL response of
/// [`sasl::MAX_RESPONSE_B64`] octets with its command around it.
pub const MAX_AUTH_LINE: usize = sasl::MAX_RESPONSE_B64 + 64;

/// What the device gave on its way to a login.
#[derive(Debug)]
pub enum Login {
    /// A user name and password (PLAIN, LOGIN, IMAP `LOGIN`, POP3 `USER`/`PASS`).
    Password {
        user: String,
        password: crate::secret::Secret,
    },
    /// The device went on without logging in (SMTP where the route does not require it):
    /// `command` is the line it sent, to be forwarded once logged in upstream.
    Without { command: Vec<u8> },
}

/// The device's login and what its answer needs.
#[derive(Debug)]
pub struct DeviceLogin {
    pub login: Login,
    /// The IMAP tag of the login command, for the tagged answer.
    pub tag: Option<String>,
    /// The name the device gave in SMTP EHLO/HELO after TLS.
    pub client_name: Option<String>,
}

/// How the device's login went, in the words its protocol has for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginAnswer {
    Accepted,
    /// The device user or its password is wrong.
    BadPassword,
    /// Try again later: the token or the upstream login failed.
    Unavailable,
}

/// Why the upstream's XOAUTH2 exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamAuthError {
    /// The upstream refused the token; the reply text (and the decoded error challenge),
    /// sanitised.
    #[error("upstream refused the XOAUTH2 login: {0}")]
    Rejected(String),
    #[error(transparent)]
    Dialog(#[from] UpstreamDialogError),
}

impl From<DialogError> for UpstreamAuthError {
    fn from(err: DialogError) -> Self {
        UpstreamAuthError::Dialog(err.into())
    }
}

/// Runs the device side of the login after TLS until the device has given its credentials (or,
/// where `required` is false, an SMTP command that needs a login). `upstream_ehlo` is the
/// upstream's EHLO reply after TLS (SMTP only), shown to the device with our AUTH line.
pub async fn device_until_login<S: AsyncRead + AsyncWrite + Unpin>(
    dialect: Dialect,
    conn: &mut LineConn<S>,
    server_name: &str,
    upstream_ehlo: &[String],
    required: bool,
) -> Result<DeviceLogin, DialogError> {
    match dialect {
        Dialect::Smtp => smtp::device_until_login(conn, server_name, upstream_ehlo, required).await,
        Dialect::Imap => imap::device_until_login(conn).await,
        Dialect::Pop3 => pop3::device_until_login(conn).await,
    }
}

/// The device's answer to its login.
pub fn login_answer(dialect: Dialect, login: &DeviceLogin, answer: LoginAnswer) -> Vec<u8> {
    match dialect {
        Dialect::Smtp => smtp::login_answer(login, answer),
        Dialect::Imap => imap::login_answer(login, answer),
        Dialect::Pop3 => pop3::login_answer(answer),
    }
}

/// The client side of the upstream's SASL XOAUTH2 exchange with the base64 `initial`
/// response; an error challenge is answered with an empty response, then the final reply read.
pub async fn upstream_xoauth2<S: AsyncRead + AsyncWrite + Unpin>(
    dialect: Dialect,
    conn: &mut LineConn<S>,
    initial: &crate::secret::Secret,
) -> Result<(), UpstreamAuthError> {
    match dialect {
        Dialect::Smtp => smtp::upstream_xoauth2(conn, initial).await,
        Dialect::Imap => imap::upstream_xoauth2(conn, initial).await,
        Dialect::Pop3 => pop3::upstream_xoauth2(conn, initial).await,
    }
}

/// A rejection's text: the reply, and the decoded JSON of an error challenge when there was one.
fn rejection(reply: &str, challenge: Option<&sasl::Xoauth2Challenge>) -> String {
    let reply = crate::text::printable(reply);
    match challenge {
        Some(challenge) => format!("{reply} ({challenge})"),
        None => reply,
    }
}
