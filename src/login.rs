//! The login phase of routes with `auth = "xoauth2"`, between the greeting and the relay: once
//! both legs are encrypted, tlsbridge plays the server for the device's login (its protocol's
//! post-TLS dialog in `protocol`), checks the password against the credentials table, gets an
//! access token, and logs in upstream with SASL XOAUTH2 as the device user's mailbox. Then the
//! relay carries the rest untouched.
//!
//! Fail closed: a wrong password gets the protocol's "invalid credentials" and no token is
//! asked for; a token or upstream failure gets its transient "try again later", and the log
//! names the cause (never the password or the token).

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::audit::SessionRecord;
use crate::context::{AuthShared, RouteCtx, Shared};
use crate::device::DeviceStream;
use crate::outcome::{Failure, Outcome, UpstreamFailure};
use crate::protocol::{
    self, sasl, DeviceLogin, Dialect, DialogError, LineConn, Login, LoginAnswer, UpstreamAuthError,
    MAX_AUTH_LINE,
};
use crate::text::printable;
use crate::upstream::UpstreamLeg;

/// The label of the inventory's auth field for a device that logged in through tlsbridge.
pub const INVENTORY_AUTH: &str = "xoauth2";

/// Runs the device's login and the upstream's XOAUTH2 login. On success the device has its
/// positive answer, and what either side sent past the login is passed on.
pub async fn run(
    route: &RouteCtx,
    shared: &Shared,
    dialect: Dialect,
    device: &mut DeviceStream,
    leg: &mut UpstreamLeg,
    record: &mut SessionRecord<'_>,
) -> Result<(), Failure> {
    let Some(auth) = &shared.auth else {
        return Err(Failure::new(
            Outcome::Upstream(UpstreamFailure::Internal),
            "auth = \"xoauth2\" without the [oauth] state",
        ));
    };
    let limit = shared.config.limits.idle_timeout;
    let mut down = LineConn::with_max_line(&mut *device, MAX_AUTH_LINE);
    let mut up = LineConn::with_max_line(&mut leg.stream, MAX_AUTH_LINE);
    let login = tokio::time::timeout(
        limit,
        exchange(route, shared, auth, dialect, &mut down, &mut up, record),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Failure::new(
            Outcome::IdleTimeout,
            "the login did not finish within limits.idle_timeout",
        ))
    })?;
    let (device, from_device) = down.into_parts();
    let (upstream, from_upstream) = up.into_parts();
    let mut to_upstream = match login.login {
        Login::Without { command } => command,
        Login::Password { .. } => Vec::new(),
    };
    to_upstream.extend_from_slice(&from_device);
    let forwarded = async {
        if !to_upstream.is_empty() {
            upstream.write_all(&to_upstream).await?;
            upstream.flush().await?;
        }
        if !from_upstream.is_empty() {
            device.write_all(&from_upstream).await?;
            device.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    forwarded
        .await
        .map_err(|err| Failure::new(Outcome::DeviceClosed, format!("after the login: {err}")))?;
    shared
        .sinks
        .inventory
        .set_auth(record.peer.ip(), INVENTORY_AUTH);
    Ok(())
}

/// The dialogs on both legs, up to the device's answer.
async fn exchange<D, U>(
    route: &RouteCtx,
    shared: &Shared,
    auth: &AuthShared,
    dialect: Dialect,
    down: &mut LineConn<D>,
    up: &mut LineConn<U>,
    record: &mut SessionRecord<'_>,
) -> Result<DeviceLogin, Failure>
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ehlo = match dialect {
        Dialect::Smtp => match protocol::smtp::upstream_ehlo(up, shared.server_name()).await {
            Ok(lines) => lines,
            Err(err) => {
                let cause = err.cause();
                let _ = down
                    .send(&protocol::unavailable(dialect, cause.reason()))
                    .await;
                return Err(Failure::new(
                    Outcome::Upstream(cause),
                    format!("upstream EHLO after TLS: {err}"),
                ));
            }
        },
        Dialect::Imap | Dialect::Pop3 => Vec::new(),
    };
    let required = route.route.auth_required;
    let login = protocol::device_until_login(dialect, down, shared.server_name(), &ehlo, required)
        .await
        .map_err(device_failure)?;
    if let Some(name) = &login.client_name {
        record.learned_client_name(name.clone());
    }
    let answer = |answer| protocol::login_answer(dialect, &login, answer);
    let mailbox = match &login.login {
        Login::Password { user, password } => {
            record.device_user = Some(printable(user));
            match auth.verifier.verify(user, password.clone()).await {
                Some(mailbox) => mailbox,
                None => {
                    let _ = down.send(&answer(LoginAnswer::BadPassword)).await;
                    return Err(Failure::new(
                        Outcome::AuthFailed,
                        format!(
                            "device user {:?} is unknown or gave a wrong password",
                            printable(user)
                        ),
                    ));
                }
            }
        }
        Login::Without { .. } => match &route.route.default_mailbox {
            Some(mailbox) => mailbox.clone(),
            None => {
                // Config validation requires default_mailbox with auth_required = false.
                let _ = down.send(&answer(LoginAnswer::Unavailable)).await;
                return Err(Failure::new(
                    Outcome::AuthFailed,
                    "no default_mailbox for a device that did not log in",
                ));
            }
        },
    };
    record.mailbox = Some(printable(&mailbox));
    let token = match auth.tokens.token().await {
        Ok(token) => token,
        Err(err) => {
            warn!(
                reason = err.reason(),
                aadsts = err.aadsts().unwrap_or(""),
                error = %err,
                "no access token for the upstream login"
            );
            let _ = down.send(&answer(LoginAnswer::Unavailable)).await;
            return Err(Failure::new(Outcome::AuthTokenUnavailable, err));
        }
    };
    let Some(initial) = sasl::xoauth2_initial_response(&mailbox, &token.token) else {
        let _ = down.send(&answer(LoginAnswer::Unavailable)).await;
        return Err(Failure::new(
            Outcome::AuthTokenUnavailable,
            "the mailbox or the token cannot go into an XOAUTH2 response",
        ));
    };
    match protocol::upstream_xoauth2(dialect, up, &initial).await {
        Ok(()) => {}
        Err(UpstreamAuthError::Rejected(reply)) => {
            auth.tokens.invalidate(&token);
            warn!(
                mailbox = %printable(&mailbox),
                reply = %reply,
                "the upstream refused the XOAUTH2 login; check the app's permission and the mailbox right"
            );
            let _ = down.send(&answer(LoginAnswer::Unavailable)).await;
            return Err(Failure::new(
                Outcome::AuthUpstreamRejected,
                format!("upstream refused the XOAUTH2 login: {reply}"),
            ));
        }
        Err(UpstreamAuthError::Dialog(err)) => {
            let _ = down.send(&answer(LoginAnswer::Unavailable)).await;
            return Err(Failure::new(
                Outcome::Upstream(err.cause()),
                format!("upstream XOAUTH2 login: {err}"),
            ));
        }
    }
    down.send(&answer(LoginAnswer::Accepted))
        .await
        .map_err(|err| Failure::new(Outcome::DeviceClosed, err))?;
    info!(
        device_user = record.device_user.as_deref().unwrap_or(""),
        mailbox = %printable(&mailbox),
        "logged in upstream with XOAUTH2"
    );
    Ok(login)
}

/// The outcome of a device dialog that ended without a login.
fn device_failure(err: DialogError) -> Failure {
    let outcome = match err {
        DialogError::Quit => Outcome::DeviceQuit,
        DialogError::Closed | DialogError::Io(_) => Outcome::DeviceClosed,
        _ => Outcome::DeviceProtocolError,
    };
    Failure::new(outcome, format!("login dialog: {err}"))
}

/// Passthrough SMTP routes: the upstream's refusal of the device's own login because Basic auth
/// is disabled, found among the first replies after TLS (a bounded head, not the whole stream).
pub fn basic_auth_refusal(
    route: &RouteCtx,
    dialect: Option<Dialect>,
    from_upstream: &[u8],
) -> Option<String> {
    if route.route.auth != crate::config::AuthMode::Passthrough || dialect != Some(Dialect::Smtp) {
        return None;
    }
    protocol::smtp::basic_auth_disabled(from_upstream)
}

/// The session's end once the upstream said Basic auth is disabled: counted, put in the
/// inventory, and the outcome says so whatever way the relay ended.
pub fn basic_auth_disabled(
    route: &RouteCtx,
    shared: &Shared,
    record: &SessionRecord<'_>,
    reply: &str,
    ended: Result<(u64, u64), Failure>,
) -> Failure {
    route.metrics.basic_auth_disabled();
    shared
        .sinks
        .inventory
        .set_auth(record.peer.ip(), Outcome::UpstreamBasicAuthDisabled.label());
    let bytes = match &ended {
        Ok(bytes) => *bytes,
        Err(failure) => failure.bytes,
    };
    warn!(
        reply = %reply,
        "the upstream refused the device's login: Basic auth is disabled; use auth = \"xoauth2\" on this route"
    );
    Failure {
        bytes,
        ..Failure::new(
            Outcome::UpstreamBasicAuthDisabled,
            format!("upstream refused the device's login: {reply}"),
        )
    }
}
