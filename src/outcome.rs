//! Why a session ended, as types: every cause is an enum variant matched exhaustively, with its
//! label for logs and metrics in one place, so a new cause cannot fall silently into "other".
//! The device-facing reply for a cause is the protocol's to word (see `protocol`).

/// A leg of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    Device,
    Upstream,
}

impl Leg {
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Device => "device",
            Leg::Upstream => "upstream",
        }
    }
}

/// Where a device was when its one pre-TLS deadline (`device_tls.handshake_timeout`) passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Waiting for the PROXY protocol header from the balancer.
    ProxyHeader,
    /// Waiting for the device's first byte.
    FirstByte,
    /// In the plaintext dialog before STARTTLS.
    Dialog,
    /// Writing a pre-TLS reply the device did not read.
    Write,
    /// In the TLS handshake.
    Handshake,
}

impl Stall {
    pub fn describe(self) -> &'static str {
        match self {
            Stall::ProxyHeader => "no complete PROXY header within device_tls.handshake_timeout",
            Stall::FirstByte => "device sent nothing within device_tls.handshake_timeout",
            Stall::Dialog => {
                "device did not reach STARTTLS within device_tls.handshake_timeout (stalled in the dialog)"
            }
            Stall::Write => "device did not read a pre-TLS reply within device_tls.handshake_timeout",
            Stall::Handshake => {
                "device did not finish the TLS handshake within device_tls.handshake_timeout"
            }
        }
    }
}

/// Why the upstream leg could not be established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    Dns,
    Refused,
    ConnectFailed,
    Timeout,
    CertificateInvalid,
    ProtocolVersion,
    AlertReceived,
    ClosedDuringHandshake,
    HandshakeIo,
    HandshakeFailed,
    NoStarttls,
    StarttlsRefused,
    StarttlsInjection,
    GreetingRefused,
    DialogFailed,
    Internal,
}

impl UpstreamFailure {
    /// The `reason` label of `tlsbridge_handshake_failures_total{leg="upstream"}`, also shown to
    /// the device in its protocol's transient error.
    pub fn reason(self) -> &'static str {
        match self {
            UpstreamFailure::Dns => "dns",
            UpstreamFailure::Refused => "connection_refused",
            UpstreamFailure::ConnectFailed => "connect_failed",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::CertificateInvalid => "certificate_invalid",
            UpstreamFailure::ProtocolVersion => "protocol_version",
            UpstreamFailure::AlertReceived => "alert_received",
            UpstreamFailure::ClosedDuringHandshake => "closed_during_handshake",
            UpstreamFailure::HandshakeIo => "handshake_io",
            UpstreamFailure::HandshakeFailed => "handshake_failed",
            UpstreamFailure::NoStarttls => "no_starttls",
            UpstreamFailure::StarttlsRefused => "starttls_refused",
            UpstreamFailure::StarttlsInjection => "starttls_injection",
            UpstreamFailure::GreetingRefused => "greeting_refused",
            UpstreamFailure::DialogFailed => "dialog_failed",
            UpstreamFailure::Internal => "internal",
        }
    }

    /// The session's `outcome`.
    pub fn outcome(self) -> &'static str {
        match self {
            UpstreamFailure::Dns => "upstream_dns",
            UpstreamFailure::Refused => "upstream_refused",
            UpstreamFailure::ConnectFailed => "upstream_connect_failed",
            UpstreamFailure::Timeout => "upstream_timeout",
            UpstreamFailure::CertificateInvalid => "upstream_certificate_invalid",
            UpstreamFailure::ProtocolVersion => "upstream_protocol_version",
            UpstreamFailure::AlertReceived => "upstream_alert_received",
            UpstreamFailure::ClosedDuringHandshake => "upstream_closed_during_handshake",
            UpstreamFailure::HandshakeIo => "upstream_handshake_io",
            UpstreamFailure::HandshakeFailed => "upstream_tls_failed",
            UpstreamFailure::NoStarttls => "upstream_no_starttls",
            UpstreamFailure::StarttlsRefused => "upstream_starttls_refused",
            UpstreamFailure::StarttlsInjection => "upstream_starttls_injection",
            UpstreamFailure::GreetingRefused => "upstream_greeting_refused",
            UpstreamFailure::DialogFailed => "upstream_dialog_failed",
            UpstreamFailure::Internal => "upstream_internal",
        }
    }
}

/// Why a connection was closed before any dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    AclDenied,
    ProxyUntrusted,
    ProxyHeader,
    TooManyConnections,
    /// Past `limits.connect_rate_per_ip`.
    RateLimited,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::AclDenied => "acl_denied",
            Refusal::ProxyUntrusted => "proxy_untrusted",
            Refusal::ProxyHeader => "proxy_header",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The connection closed without sending anything: not a device (a port scan, a
    /// balancer's TCP check); no upstream session, no `legacy_client`, no inventory entry.
    DeviceSilent,
    /// The device said goodbye before STARTTLS: a normal end.
    DeviceQuit,
    DeviceClosed,
    DeviceProtocolError,
    DeviceTimeout(Stall),
    DeviceHandshakeFailed,
    SniRefused,
    Upstream(UpstreamFailure),
    /// The upstream leg ended abnormally during the relay (a reset or a failed read).
    UpstreamAborted,
    /// The upstream ended without close_notify and without the protocol's goodbye.
    UpstreamTruncated,
    /// The device leg ended abnormally during the relay.
    DeviceAborted,
    IdleTimeout,
    /// Closed at the end of the drain time.
    Shutdown,
    Refused(Refusal),
    /// `auth = "xoauth2"`: the device's user name or password is wrong.
    AuthFailed,
    /// `auth = "xoauth2"`: no access token could be had from the token endpoint.
    AuthTokenUnavailable,
    /// `auth = "xoauth2"`: the upstream refused the XOAUTH2 login (e.g. a missing permission).
    AuthUpstreamRejected,
    /// Passthrough: the upstream refused the device's login because Basic auth is disabled.
    UpstreamBasicAuthDisabled,
}

impl Outcome {
    /// The `outcome` field of `session_closed`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::DeviceSilent => "device_silent",
            Outcome::DeviceQuit => "device_quit",
            Outcome::DeviceClosed => "device_closed",
            Outcome::DeviceProtocolError => "device_protocol_error",
            Outcome::DeviceTimeout(_) => "device_timeout",
            Outcome::DeviceHandshakeFailed => "device_handshake_failed",
            Outcome::SniRefused => "sni_refused",
            Outcome::Upstream(failure) => failure.outcome(),
            Outcome::UpstreamAborted => "upstream_aborted",
            Outcome::UpstreamTruncated => "upstream_truncated",
            Outcome::DeviceAborted => "device_aborted",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::Shutdown => "shutdown",
            Outcome::Refused(refusal) => refusal.label(),
            Outcome::AuthFailed => "auth_failed",
            Outcome::AuthTokenUnavailable => "auth_token_unavailable",
            Outcome::AuthUpstreamRejected => "auth_upstream_rejected",
            Outcome::UpstreamBasicAuthDisabled => "upstream_basic_auth_disabled",
        }
    }

    /// The leg that failed to come up and the reason, for
    /// `tlsbridge_handshake_failures_total`; `None` when both legs came up or the device simply
    /// went away.
    pub fn failed_leg(self) -> Option<(Leg, &'static str)> {
        match self {
            Outcome::DeviceTimeout(_) | Outcome::DeviceHandshakeFailed | Outcome::SniRefused => {
                Some((Leg::Device, self.label()))
            }
            Outcome::Upstream(failure) => Some((Leg::Upstream, failure.reason())),
            Outcome::Ok
            | Outcome::DeviceSilent
            | Outcome::DeviceQuit
            | Outcome::DeviceClosed
            | Outcome::DeviceProtocolError
            | Outcome::UpstreamAborted
            | Outcome::UpstreamTruncated
            | Outcome::DeviceAborted
            | Outcome::IdleTimeout
            | Outcome::Shutdown
            | Outcome::Refused(_)
            | Outcome::AuthFailed
            | Outcome::AuthTokenUnavailable
            | Outcome::AuthUpstreamRejected
            | Outcome::UpstreamBasicAuthDisabled => None,
        }
    }
}

/// A session that ended early: its outcome, the full cause for the log, and the bytes relayed
/// before the end.
#[derive(Debug)]
pub struct Failure {
    pub outcome: Outcome,
    pub detail: String,
    pub bytes: (u64, u64),
}

impl Failure {
    pub fn new(outcome: Outcome, detail: impl std::fmt::Display) -> Failure {
        Failure {
            outcome,
            detail: detail.to_string(),
            bytes: (0, 0),
        }
    }

    /// A device that went past its pre-TLS deadline, naming where it stalled.
    pub fn stalled(stall: Stall) -> Failure {
        Failure::new(Outcome::DeviceTimeout(stall), stall.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_upstream_failure_has_its_own_outcome() {
        use UpstreamFailure::*;
        let all = [
            Dns,
            Refused,
            ConnectFailed,
            Timeout,
            CertificateInvalid,
            ProtocolVersion,
            AlertReceived,
            ClosedDuringHandshake,
            HandshakeIo,
            HandshakeFailed,
            NoStarttls,
            StarttlsRefused,
            StarttlsInjection,
            GreetingRefused,
            DialogFailed,
            Internal,
        ];
        let outcomes: std::collections::HashSet<_> = all.iter().map(|f| f.outcome()).collect();
        let reasons: std::collections::HashSet<_> = all.iter().map(|f| f.reason()).collect();
        assert_eq!(outcomes.len(), all.len());
        assert_eq!(reasons.len(), all.len());
    }

    #[test]
    fn failed_legs_carry_their_reason() {
        assert_eq!(
            Outcome::DeviceTimeout(Stall::Dialog).failed_leg(),
            Some((Leg::Device, "device_timeout"))
        );
        assert_eq!(
            Outcome::Upstream(UpstreamFailure::CertificateInvalid).failed_leg(),
            Some((Leg::Upstream, "certificate_invalid"))
        );
        assert_eq!(Outcome::IdleTimeout.failed_leg(), None);
    }
}
