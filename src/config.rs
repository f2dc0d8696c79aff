//! Configuration: the embedded `config/default.toml` < `--config FILE` < `TLSBRIDGE__SECTION__KEY`
//! environment variables. Unknown keys are errors; every error names the key.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{FileFormat, Format, Map, Source, Value};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use crate::secret::Secret;

/// The embedded defaults, compiled in so the binary runs without any file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Environment variables that start with this (then `SECTION__KEY`) override the files.
pub const ENV_PREFIX: &str = "TLSBRIDGE__";

/// A configuration error: the message names the key (or file) and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// Marks a setup error (a certificate file, a cipher string) as the admin's to fix.
    pub fn from_anyhow(err: anyhow::Error) -> ConfigError {
        ConfigError(format!("{err:#}"))
    }
}

fn invalid(key: impl fmt::Display, reason: impl fmt::Display) -> ConfigError {
    ConfigError(format!("{key}: {reason}"))
}

/// The longest `device_tls.handshake_timeout`, `upstream_tls.connect_timeout`,
/// `limits.drain_timeout` and `state_save_interval`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest `limits.idle_timeout`.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The most `limits.max_connections` and `limits.max_inventory_clients`.
pub const MAX_COUNT: usize = 1_000_000;
/// The most `limits.connect_rate_per_ip`.
pub const MAX_CONNECT_RATE: u32 = 100_000;

/// The whole configuration, as loaded and validated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the inventory and other state live.
    pub state_dir: PathBuf,
    /// How often the inventory is written to `state_dir` (and always at shutdown): the most a
    /// crash can lose.
    #[serde(deserialize_with = "duration")]
    pub state_save_interval: Duration,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub device_tls: DeviceTlsConfig,
    pub upstream_tls: UpstreamTlsConfig,
    pub limits: LimitsConfig,
    pub oauth: OAuthConfig,
    #[serde(rename = "route", default)]
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `tlsbridge=debug`); `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `None` when the endpoint is disabled (`listen = ""`).
    #[serde(deserialize_with = "optional_addr")]
    pub listen: Option<SocketAddr>,
    /// Per-device series on `/metrics`; unset: on while the inventory holds fewer than 2,000
    /// devices.
    #[serde(default)]
    pub per_device_metrics: Option<bool>,
    /// A file holding the bearer token that `/`, `/metrics` and `/clients*` require (its
    /// content, surrounding whitespace trimmed); `None`: no token.
    #[serde(default, deserialize_with = "optional_path")]
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file` at load time.
    #[serde(skip)]
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub names: Vec<String>,
    pub min_version: LegacyVersion,
    pub ciphers: String,
    /// Deadline for the whole device side: dialog before STARTTLS plus the TLS handshake.
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// Key of a generated leaf (and of a local CA generated with it).
    pub key_type: KeyType,
}

/// The key algorithm of generated device certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KeyType {
    /// RSA-2048 with SHA-256: every device stack can use it.
    #[serde(rename = "rsa2048")]
    Rsa2048,
    /// ECDSA P-256 with SHA-256: far cheaper handshakes, for devices that offer ECDHE-ECDSA.
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    pub min_version: ModernVersion,
    pub extra_roots: Vec<PathBuf>,
    /// Deadline for the whole upstream side: DNS, TCP, dialog and TLS handshake.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: usize,
    /// 0: no per-address limit. IPv6 addresses count per /64.
    pub max_connections_per_ip: usize,
    /// New connections per second per address (IPv6: per /64), burst twice that; 0: no limit.
    pub connect_rate_per_ip: u32,
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// Devices kept in the inventory; the least recently seen are dropped past it.
    pub max_inventory_clients: usize,
}

/// The lowest protocol version the legacy acceptor takes from devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub enum LegacyVersion {
    #[serde(rename = "SSLv3")]
    Ssl3,
    #[serde(rename = "TLSv1")]
    Tls1,
    #[serde(rename = "TLSv1.1")]
    Tls11,
    #[serde(rename = "TLSv1.2")]
    Tls12,
}

/// The lowest protocol version of the upstream leg; nothing below TLS 1.2 exists here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ModernVersion {
    #[serde(rename = "TLSv1.2")]
    Tls12,
    #[serde(rename = "TLSv1.3")]
    Tls13,
}

/// The application protocol a route speaks; it decides the dialog before STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Imap,
    Pop3,
    Tcp,
}

/// How the device leg is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceMode {
    Tls,
    Starttls,
    Plain,
}

/// How the upstream leg is secured: never plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    Tls,
    Starttls,
}

/// Where a route connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A fixed `host:port`.
    Fixed { host: String, port: u16 },
    /// `sni:PORT`: the device's SNI (when `sni_allow` admits it) names the host.
    Sni { port: u16 },
}

/// One listener bound to one upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub device_tls: DeviceMode,
    #[serde(deserialize_with = "upstream")]
    pub upstream: Upstream,
    pub upstream_tls: UpstreamMode,
    #[serde(default = "private_ranges")]
    pub allow: Vec<IpNet>,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub proxy_from: Vec<IpNet>,
    #[serde(default)]
    pub sni_allow: Vec<String>,
    /// What happens to the device's login after TLS (see [`AuthMode`]).
    #[serde(default)]
    pub auth: AuthMode,
    /// xoauth2 only: false lets a device that never logs in through as `default_mailbox`.
    #[serde(default = "yes")]
    pub auth_required: bool,
    #[serde(default, deserialize_with = "optional_string")]
    pub default_mailbox: Option<String>,
    /// A PEM certificate and key presented on the upstream leg (relay connectors).
    #[serde(default, deserialize_with = "optional_path")]
    pub upstream_client_cert: Option<PathBuf>,
    #[serde(default, deserialize_with = "optional_path")]
    pub upstream_client_key: Option<PathBuf>,
}

/// The default ACL: loopback and private ranges only.
pub fn private_ranges() -> Vec<IpNet> {
    [
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    ]
    .iter()
    .filter_map(|net| net.parse().ok())
    .collect()
}

impl Config {
    /// Loads the layers from the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Loads the embedded defaults, then `file`, then the `TLSBRIDGE__` variables in `env`.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut defaults = parse_toml("embedded defaults", DEFAULT_TOML)?;
        let mut layers = Vec::new();
        let mut routes_given = false;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|err| invalid(path.display(), format!("cannot read: {err}")))?;
            let table = parse_toml(&path.display().to_string(), &text)?;
            refuse_inline_secret(&path.display().to_string(), &table)?;
            routes_given |= table.contains_key("route");
            layers.push(MapSource(table));
        }
        let mut vars: HashMap<String, String> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with(ENV_PREFIX))
            .collect();
        let env_routes = vars.remove("TLSBRIDGE__ROUTE");
        // Kept away from the config crate, whose errors may quote values.
        let env_secret = take_env_secret(&mut vars);
        if let Some(routes) = &env_routes {
            let table = parse_toml("TLSBRIDGE__ROUTE", &format!("route = {routes}"))?;
            routes_given = true;
            layers.push(MapSource(table));
        }
        // Routes replace the defaults as a whole: the config crate would merge arrays by index.
        if routes_given {
            defaults.remove("route");
        }
        let environment = config::Environment::with_prefix("TLSBRIDGE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("device_tls.names")
            .with_list_parse_key("upstream_tls.extra_roots")
            .source(Some(vars.into_iter().collect()));
        let layered = layers
            .into_iter()
            .fold(
                config::Config::builder().add_source(MapSource(defaults)),
                |b, layer| b.add_source(layer),
            )
            .add_source(environment)
            .build()
            .map_err(|err| ConfigError(format!("invalid configuration: {err}")))?;
        let mut config: Config = serde_path_to_error::deserialize(layered).map_err(|err| {
            let key = err.path().to_string();
            invalid(key, dotted(&err.into_inner().to_string()))
        })?;
        config.oauth.client_secret = env_secret;
        config.validate()?;
        config.admin.token = match &config.admin.token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        Ok(config)
    }

    /// Cross-field checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.routes.is_empty() {
            return Err(invalid("route", "at least one [[route]] is required"));
        }
        if self.device_tls.names.is_empty() {
            return Err(invalid("device_tls.names", "must name at least one host"));
        }
        for (key, value) in [
            ("state_save_interval", self.state_save_interval),
            (
                "device_tls.handshake_timeout",
                self.device_tls.handshake_timeout,
            ),
            (
                "upstream_tls.connect_timeout",
                self.upstream_tls.connect_timeout,
            ),
            ("limits.idle_timeout", self.limits.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than zero"));
            }
        }
        let limits = &self.limits;
        for (key, value, max) in [
            ("state_save_interval", self.state_save_interval, MAX_TIMEOUT),
            (
                "device_tls.handshake_timeout",
                self.device_tls.handshake_timeout,
                MAX_TIMEOUT,
            ),
            (
                "upstream_tls.connect_timeout",
                self.upstream_tls.connect_timeout,
                MAX_TIMEOUT,
            ),
            ("limits.drain_timeout", limits.drain_timeout, MAX_TIMEOUT),
            ("limits.idle_timeout", limits.idle_timeout, MAX_IDLE_TIMEOUT),
        ] {
            if value > max {
                return Err(invalid(
                    key,
                    format!("must be at most {}", humantime::format_duration(max)),
                ));
            }
        }
        if limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        for (key, value, max) in [
            ("limits.max_connections", limits.max_connections, MAX_COUNT),
            (
                "limits.max_connections_per_ip",
                limits.max_connections_per_ip,
                limits.max_connections,
            ),
            (
                "limits.max_inventory_clients",
                limits.max_inventory_clients,
                MAX_COUNT,
            ),
            (
                "limits.connect_rate_per_ip",
                limits.connect_rate_per_ip as usize,
                MAX_CONNECT_RATE as usize,
            ),
        ] {
            if value > max {
                return Err(invalid(key, format!("must be at most {max}")));
            }
        }
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        listens.extend(self.admin.listen);
        for (i, route) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("route[{i}].{field}");
            if route.name.is_empty() || !names.insert(route.name.as_str()) {
                return Err(invalid(key("name"), "must be unique and not empty"));
            }
            if !listens.insert(route.listen) && route.listen.port() != 0 {
                return Err(invalid(
                    key("listen"),
                    format!(
                        "{} is already used by another route or admin.listen",
                        route.listen
                    ),
                ));
            }
            route
                .validate()
                .map_err(|(field, reason)| invalid(key(field), reason))?;
        }
        self.validate_auth()
    }
}

impl Route {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let starttls =
            self.device_tls == DeviceMode::Starttls || self.upstream_tls == UpstreamMode::Starttls;
        if starttls && self.protocol == Protocol::Tcp {
            return Err((
                "protocol",
                "\"tcp\" carries opaque bytes and cannot do STARTTLS; use smtp, imap or pop3"
                    .into(),
            ));
        }
        if !self.sni_allow.is_empty() && !matches!(self.upstream, Upstream::Sni { .. }) {
            return Err((
                "sni_allow",
                "only routes with upstream = \"sni:PORT\" use sni_allow; remove it or route by SNI"
                    .into(),
            ));
        }
        for pattern in &self.sni_allow {
            check_sni_pattern(pattern).map_err(|reason| ("sni_allow", reason))?;
        }
        if let Upstream::Sni { .. } = self.upstream {
            if self.device_tls != DeviceMode::Tls {
                return Err((
                    "upstream",
                    "\"sni:PORT\" needs device_tls = \"tls\": only a TLS ClientHello carries SNI"
                        .into(),
                ));
            }
            if self.sni_allow.is_empty() {
                return Err((
                    "sni_allow",
                    "\"sni:PORT\" needs a list of allowed names".into(),
                ));
            }
        }
        if self.proxy_protocol && self.proxy_from.is_empty() {
            return Err((
                "proxy_from",
                "proxy_protocol = true needs the load balancers' CIDRs".into(),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Fixed { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Upstream::Fixed { host, port } => write!(f, "{host}:{port}"),
            Upstream::Sni { port } => write!(f, "sni:{port}"),
        }
    }
}

impl std::str::FromStr for Upstream {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} must be HOST:PORT or sni:PORT"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("{text:?} has no valid port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        Ok(match host {
            "sni" => Upstream::Sni { port },
            _ => Upstream::Fixed {
                host: host.to_string(),
                port,
            },
        })
    }
}

macro_rules! names {
    ($ty:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// The name used in the configuration and the logs.
            pub fn as_str(self) -> &'static str {
                match self { $(<$ty>::$variant => $name),* }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names!(Protocol { Smtp => "smtp", Imap => "imap", Pop3 => "pop3", Tcp => "tcp" });
names!(DeviceMode { Tls => "tls", Starttls => "starttls", Plain => "plain" });
names!(UpstreamMode { Tls => "tls", Starttls => "starttls" });
names!(LegacyVersion { Ssl3 => "SSLv3", Tls1 => "TLSv1", Tls11 => "TLSv1.1", Tls12 => "TLSv1.2" });
names!(ModernVersion { Tls12 => "TLSv1.2", Tls13 => "TLSv1.3" });

/// The config crate writes nested keys under arrays as `route[0]name`: put the dot back.
fn dotted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']' && chars.peek().is_some_and(|next| next.is_ascii_alphabetic()) {
            out.push('.');
        }
    }
    out
}

fn parse_toml(origin: &str, text: &str) -> Result<Map<String, Value>, ConfigError> {
    let uri = origin.to_string();
    FileFormat::Toml
        .parse(Some(&uri), text)
        .map_err(|err| invalid(origin, format!("not valid TOML: {err}")))
}

/// A parsed TOML table as a config source, so the layering stays in one builder.
#[derive(Debug, Clone)]
struct MapSource(Map<String, Value>);

impl Source for MapSource {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

fn duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    humantime::parse_duration(&text).map_err(|err| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration ({err}); write e.g. \"15s\" or \"10m\""
        ))
    })
}

fn optional_addr<'de, D: Deserializer<'de>>(de: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(de)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!("{text:?} is not IP:PORT (or \"\" to disable)"))
    })
}

fn upstream<'de, D: Deserializer<'de>>(de: D) -> Result<Upstream, D::Error> {
    String::deserialize(de)?
        .parse()
        .map_err(serde::de::Error::custom)
}

// ---------------------------------------------------------------------------------------------
// Authentication after Basic auth: the [oauth] section, the per-route auth keys, and the rule
// that a secret never sits in a config file (`check` prints configs; files get copied around).

/// The one place besides a file that may carry the OAuth client secret.
pub const CLIENT_SECRET_ENV: &str = "TLSBRIDGE__OAUTH__CLIENT_SECRET";

/// What a route does with the device's login once both legs are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Bytes are relayed untouched, the login included.
    #[default]
    Passthrough,
    /// tlsbridge checks the device's password locally and logs in upstream with SASL XOAUTH2.
    Xoauth2,
}

names!(AuthMode { Passthrough => "passthrough", Xoauth2 => "xoauth2" });

/// `[oauth]`: the Entra ID app whose client-credentials tokens routes with `auth = "xoauth2"`
/// use upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// The tenant's domain or id; names the default token endpoint.
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub client_id: String,
    #[serde(default, deserialize_with = "optional_path")]
    pub client_secret_file: Option<PathBuf>,
    /// Only ever set from [`CLIENT_SECRET_ENV`]: a config file holding it is refused.
    #[serde(skip)]
    pub client_secret: Option<Secret>,
    /// A certificate (PEM) and its private key: the app signs a JWT client assertion.
    #[serde(default, deserialize_with = "optional_path")]
    pub client_cert: Option<PathBuf>,
    #[serde(default, deserialize_with = "optional_path")]
    pub client_key: Option<PathBuf>,
    /// `None`: Entra's endpoint for `tenant` (see [`OAuthConfig::token_endpoint`]).
    #[serde(default, deserialize_with = "optional_string")]
    pub token_url: Option<String>,
    pub scope: String,
    /// Device user -> password hash + mailbox, written by `tlsbridge passwd`.
    pub users_file: PathBuf,
}

impl OAuthConfig {
    /// `token_url`, or Microsoft Entra ID's v2.0 endpoint for the tenant.
    pub fn token_endpoint(&self) -> String {
        match &self.token_url {
            Some(url) => url.clone(),
            None => format!(
                "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                self.tenant
            ),
        }
    }

    /// True when a client secret is configured (file or environment).
    pub fn has_secret(&self) -> bool {
        self.client_secret_file.is_some() || self.client_secret.is_some()
    }

    /// True when a client certificate and key are configured.
    pub fn has_certificate(&self) -> bool {
        self.client_cert.is_some() && self.client_key.is_some()
    }
}

impl Config {
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let oauth = &self.oauth;
        if oauth.client_secret_file.is_some() && oauth.client_secret.is_some() {
            return Err(invalid(
                "oauth.client_secret_file",
                format!("the client secret is also set in {CLIENT_SECRET_ENV}; give one"),
            ));
        }
        match (&oauth.client_cert, &oauth.client_key) {
            (Some(_), None) => return Err(invalid("oauth.client_key", "client_cert needs it")),
            (None, Some(_)) => return Err(invalid("oauth.client_cert", "client_key needs it")),
            _ => {}
        }
        if oauth.has_secret() && oauth.has_certificate() {
            return Err(invalid(
                "oauth.client_cert",
                "give either a client secret or a certificate and key, not both",
            ));
        }
        if !oauth.tenant.is_empty() && !valid_tenant(&oauth.tenant) {
            return Err(invalid(
                "oauth.tenant",
                format!(
                    "{:?} is not a tenant domain or id",
                    crate::text::printable(&oauth.tenant)
                ),
            ));
        }
        if let Some(url) = &oauth.token_url {
            check_https_url(url).map_err(|reason| invalid("oauth.token_url", reason))?;
        }
        for (i, route) in self.routes.iter().enumerate() {
            route
                .validate_auth()
                .map_err(|(field, reason)| invalid(format!("route[{i}].{field}"), reason))?;
        }
        let Some(route) = self.routes.iter().find(|r| r.auth == AuthMode::Xoauth2) else {
            return Ok(());
        };
        let needs = |what: &str| format!("route {:?} uses auth = \"xoauth2\": {what}", route.name);
        if oauth.tenant.is_empty() {
            return Err(invalid("oauth.tenant", needs("set the Entra tenant")));
        }
        if oauth.client_id.trim().is_empty() {
            return Err(invalid("oauth.client_id", needs("set the app's client id")));
        }
        if !oauth.has_secret() && !oauth.has_certificate() {
            return Err(invalid(
                "oauth.client_secret_file",
                needs(&format!(
                    "give a client secret (client_secret_file or {CLIENT_SECRET_ENV}) or \
                     client_cert and client_key"
                )),
            ));
        }
        if oauth.scope.trim().is_empty() {
            return Err(invalid("oauth.scope", needs("set the token scope")));
        }
        if oauth.users_file.as_os_str().is_empty() {
            return Err(invalid(
                "oauth.users_file",
                needs("name the device users file"),
            ));
        }
        Ok(())
    }
}

impl Route {
    fn validate_auth(&self) -> Result<(), (&'static str, String)> {
        if self.auth == AuthMode::Xoauth2 && self.protocol == Protocol::Tcp {
            return Err((
                "auth",
                "\"xoauth2\" needs a login to take over: use smtp, imap or pop3".into(),
            ));
        }
        if !self.auth_required {
            if self.auth != AuthMode::Xoauth2 {
                return Err((
                    "auth_required",
                    "only applies to auth = \"xoauth2\" (passthrough never sees the login)".into(),
                ));
            }
            if self.default_mailbox.is_none() {
                return Err((
                    "default_mailbox",
                    "auth_required = false needs the mailbox used for devices that never log in"
                        .into(),
                ));
            }
        }
        if let Some(mailbox) = &self.default_mailbox {
            if !valid_mailbox(mailbox) {
                return Err((
                    "default_mailbox",
                    format!(
                        "{:?} is not a mailbox address",
                        crate::text::printable(mailbox)
                    ),
                ));
            }
        }
        match (&self.upstream_client_cert, &self.upstream_client_key) {
            (Some(_), None) => Err((
                "upstream_client_key",
                "upstream_client_cert needs its key".into(),
            )),
            (None, Some(_)) => Err((
                "upstream_client_cert",
                "upstream_client_key needs its certificate".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// A mailbox address as it goes into an XOAUTH2 `user=` field: `local@domain`, printable, no
/// spaces, and never the ^A that separates the fields.
pub fn valid_mailbox(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    address.len() <= 254
        && !local.is_empty()
        && !domain.is_empty()
        && address.chars().all(|c| c.is_ascii_graphic())
}

/// A tenant as Entra names it: a domain (`contoso.onmicrosoft.com`) or a GUID. It becomes part
/// of a URL path, so nothing else is allowed.
fn valid_tenant(tenant: &str) -> bool {
    tenant.len() <= 253
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

/// The token endpoint must be https: the secret or assertion travels in the request body.
fn check_https_url(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|err| format!("{url:?} is not a URL: {err}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url:?} must be an https:// URL"));
    }
    if uri.host().map_or(true, str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

/// A `client_secret` in a config file is refused, even when no route uses it yet.
fn refuse_inline_secret(origin: &str, table: &Map<String, Value>) -> Result<(), ConfigError> {
    let inline = table
        .get("oauth")
        .and_then(|oauth| oauth.clone().into_table().ok())
        .is_some_and(|oauth| oauth.contains_key("client_secret"));
    if inline {
        return Err(invalid(
            format!("{origin}: oauth.client_secret"),
            format!(
                "a secret does not belong in a config file; put it in a file named by \
                 oauth.client_secret_file (mode 0600), or in {CLIENT_SECRET_ENV}"
            ),
        ));
    }
    Ok(())
}

/// Removes the client secret from the environment layer (any case, as the config crate would
/// match it) and keeps it masked.
fn take_env_secret(vars: &mut HashMap<String, String>) -> Option<Secret> {
    let key = vars
        .keys()
        .find(|key| key.eq_ignore_ascii_case(CLIENT_SECRET_ENV))?
        .clone();
    vars.remove(&key)
        .map(|value| Secret::new(value.trim()))
        .filter(|secret| !secret.is_empty())
}

/// Top-level names reserved for private or special use (RFC 2606, RFC 6761, RFC 6762, ICANN's
/// `internal`): a wildcard directly under one of them names no public domain.
const PRIVATE_TLDS: [&str; 6] = [
    "test",
    "example",
    "invalid",
    "localhost",
    "local",
    "internal",
];

/// An `sni_allow` entry: a host name, or `*.` and a name of at least two labels (`*.example.com`)
/// or a private top-level name (`*.test`, `*.internal`); never `*`, `*.com` or an empty entry.
fn check_sni_pattern(pattern: &str) -> Result<(), String> {
    let shown = crate::text::printable(pattern);
    let narrow = |suffix: &str| {
        suffix.contains('.') || PRIVATE_TLDS.contains(&suffix.to_ascii_lowercase().as_str())
    };
    match pattern.strip_prefix("*.") {
        Some(suffix) if crate::text::is_host_name(suffix) && narrow(suffix) => Ok(()),
        Some(_) => Err(format!(
            "{shown:?}: a wildcard must cover one label under a name of at least two labels, \
             such as \"*.example.com\""
        )),
        None if crate::text::is_host_name(pattern) => Ok(()),
        None => Err(format!(
            "{shown:?} is not a host name (letters, digits, hyphens and dots; \"*.\" for one label)"
        )),
    }
}

/// Reads `admin.token_file`: its content with surrounding whitespace trimmed, never empty.
fn read_token(path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        invalid(
            "admin.token_file",
            format!("cannot read {}: {err}", path.display()),
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid(
            "admin.token_file",
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret::new(token))
}

fn yes() -> bool {
    true
}

fn optional_string<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(de)?;
    Ok(Some(text).filter(|t| !t.trim().is_empty()))
}

fn optional_path<'de, D: Deserializer<'de>>(de: D) -> Result<Option<PathBuf>, D::Error> {
    Ok(optional_string(de)?.map(PathBuf::from))
}

#[cfg(test)]
mod auth_tests {
    use super::*;

    const XOAUTH2_ROUTE: &str = "[[route]]\nname = \"smtp\"\nlisten = \"127.0.0.1:1\"\n\
        protocol = \"smtp\"\ndevice_tls = \"starttls\"\nupstream = \"h:587\"\n\
        upstream_tls = \"starttls\"\nauth = \"xoauth2\"\n";
    const OAUTH: &str = "[oauth]\ntenant = \"contoso.onmicrosoft.com\"\n\
        client_id = \"00000000-0000-0000-0000-000000000001\"\n\
        client_secret_file = \"secrets/client_secret\"\n";

    fn load(file: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tlsbridge.toml");
        std::fs::write(&path, file).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load_from(Some(&path), env)
    }

    #[test]
    fn defaults_are_passthrough_with_entra_settings() {
        let config = Config::load_from(None, Vec::new()).unwrap();
        assert!(config.routes.iter().all(|r| r.auth == AuthMode::Passthrough
            && r.auth_required
            && r.default_mailbox.is_none()
            && r.upstream_client_cert.is_none()));
        assert_eq!(config.oauth.scope, "https://outlook.office365.com/.default");
        assert_eq!(config.oauth.users_file, PathBuf::from("secrets/users"));
        assert_eq!(config.oauth.token_url, None);
        assert_eq!(config.oauth.client_secret_file, None);
    }

    #[test]
    fn an_xoauth2_route_with_a_secret_file_loads() {
        let config = load(&format!("{OAUTH}{XOAUTH2_ROUTE}"), &[]).unwrap();
        assert_eq!(config.routes[0].auth, AuthMode::Xoauth2);
        assert_eq!(
            config.oauth.token_endpoint(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
    }

    #[test]
    fn the_secret_may_come_from_the_environment_and_stays_masked() {
        let oauth = "[oauth]\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"app\"\n";
        let config = load(
            &format!("{oauth}{XOAUTH2_ROUTE}"),
            &[(CLIENT_SECRET_ENV, "s3cr3t-Value~42")],
        )
        .unwrap();
        assert_eq!(
            config.oauth.client_secret.as_ref().map(Secret::expose),
            Some("s3cr3t-Value~42")
        );
        let shown = format!("{config:?} {:?}", config.oauth);
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn a_secret_in_a_config_file_is_refused_without_quoting_it() {
        let err = load("[oauth]\nclient_secret = \"s3cr3t-Value~42\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("oauth.client_secret"), "{err}");
        assert!(err.contains("client_secret_file"), "{err}");
        assert!(err.contains(CLIENT_SECRET_ENV), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn a_certificate_grant_loads_and_a_half_pair_does_not() {
        let oauth = "[oauth]\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"app\"\n\
            client_cert = \"app.crt\"\nclient_key = \"app.key\"\n\
            token_url = \"https://127.0.0.1:8443/token\"\n";
        let config = load(&format!("{oauth}{XOAUTH2_ROUTE}"), &[]).unwrap();
        assert!(config.oauth.has_certificate());
        assert_eq!(
            config.oauth.token_endpoint(),
            "https://127.0.0.1:8443/token"
        );
        let half = "[oauth]\nclient_cert = \"app.crt\"\n";
        let err = load(half, &[]).unwrap_err().to_string();
        assert!(err.contains("oauth.client_key"), "{err}");
    }

    /// A config file, environment variables, and the key the error must name.
    type BadCase<'a> = (String, &'a [(&'a str, &'a str)], &'a str);

    #[test]
    fn auth_errors_name_the_key() {
        let route = |extra: &str| format!("{OAUTH}{XOAUTH2_ROUTE}{extra}");
        let tcp = "[[route]]\nname = \"t\"\nlisten = \"127.0.0.1:2\"\nprotocol = \"tcp\"\n\
            device_tls = \"tls\"\nupstream = \"h:1\"\nupstream_tls = \"tls\"\n";
        let cases: Vec<BadCase> = vec![
            (
                route("").replace("\"xoauth2\"", "\"oauth\""),
                &[],
                "route[0].auth",
            ),
            (
                format!("{OAUTH}{tcp}auth = \"xoauth2\"\n"),
                &[],
                "route[0].auth",
            ),
            (XOAUTH2_ROUTE.to_string(), &[], "oauth.tenant"),
            (
                format!("[oauth]\ntenant = \"contoso.onmicrosoft.com\"\n{XOAUTH2_ROUTE}"),
                &[],
                "oauth.client_id",
            ),
            (
                format!(
                    "[oauth]\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"a\"\n\
                     {XOAUTH2_ROUTE}"
                ),
                &[],
                "oauth.client_secret_file",
            ),
            (
                route(""),
                &[(CLIENT_SECRET_ENV, "x")],
                "oauth.client_secret_file",
            ),
            (
                route("").replace(
                    "[oauth]\n",
                    "[oauth]\nclient_cert = \"c\"\nclient_key = \"k\"\n",
                ),
                &[],
                "oauth.client_cert",
            ),
            (
                route("auth_required = false\n"),
                &[],
                "route[0].default_mailbox",
            ),
            (
                format!("{tcp}auth_required = false\ndefault_mailbox = \"a@b\"\n"),
                &[],
                "route[0].auth_required",
            ),
            (
                route("default_mailbox = \"not an address\"\n"),
                &[],
                "route[0].default_mailbox",
            ),
            (
                route("upstream_client_cert = \"relay.crt\"\n"),
                &[],
                "route[0].upstream_client_key",
            ),
            (
                route("upstream_client_key = \"relay.key\"\n"),
                &[],
                "route[0].upstream_client_cert",
            ),
            (
                route("").replace("[oauth]\n", "[oauth]\ntoken_url = \"http://h/token\"\n"),
                &[],
                "oauth.token_url",
            ),
            (
                route("").replace("contoso.onmicrosoft.com", "contoso/../x"),
                &[],
                "oauth.tenant",
            ),
        ];
        for (file, env, key) in &cases {
            let err = load(file, env).expect_err(file).to_string();
            assert!(err.contains(key), "{err:?} should name {key}");
        }
    }

    #[test]
    fn a_relay_route_without_login_uses_the_default_mailbox() {
        let config = load(
            &format!(
                "{OAUTH}{XOAUTH2_ROUTE}auth_required = false\n\
                 default_mailbox = \"scanner@contoso.com\"\n\
                 upstream_client_cert = \"relay.crt\"\nupstream_client_key = \"relay.key\"\n"
            ),
            &[],
        )
        .unwrap();
        let route = &config.routes[0];
        assert!(!route.auth_required);
        assert_eq!(
            route.default_mailbox.as_deref(),
            Some("scanner@contoso.com")
        );
        assert_eq!(route.upstream_client_key, Some(PathBuf::from("relay.key")));
    }

    #[test]
    fn mailboxes_are_checked_for_what_xoauth2_cannot_carry() {
        assert!(valid_mailbox("scanner@contoso.com"));
        assert!(!valid_mailbox("scanner"));
        assert!(!valid_mailbox("a b@contoso.com"));
        assert!(!valid_mailbox("a\u{1}auth=x@contoso.com"));
        assert!(!valid_mailbox("@contoso.com"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tlsbridge.toml");
        std::fs::write(&path, file).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load_from(Some(&path), env)
    }

    #[test]
    fn embedded_defaults_load() {
        let config = Config::load_from(None, Vec::new()).unwrap();
        assert_eq!(config.routes.len(), 4);
        assert_eq!(config.routes[0].name, "smtp");
        assert_eq!(config.device_tls.handshake_timeout, Duration::from_secs(15));
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(600));
        assert_eq!(config.admin.listen, Some("127.0.0.1:9480".parse().unwrap()));
        assert_eq!(config.routes[0].allow, private_ranges());
    }

    #[test]
    fn file_routes_replace_default_routes_as_a_whole() {
        let config = load(
            "[[route]]\nname = \"one\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n\
             device_tls = \"tls\"\nupstream = \"example.com:443\"\nupstream_tls = \"tls\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.routes.len(), 1);
        assert_eq!(config.routes[0].name, "one");
        assert_eq!(config.device_tls.min_version, LegacyVersion::Tls1);
    }

    #[test]
    fn environment_overrides_files_key_by_key() {
        let config = load(
            "[limits]\nidle_timeout = \"1m\"\n",
            &[
                ("TLSBRIDGE__LIMITS__IDLE_TIMEOUT", "90s"),
                ("TLSBRIDGE__ADMIN__LISTEN", ""),
                ("TLSBRIDGE__DEVICE_TLS__NAMES", "printer.lan,10.0.0.5"),
                ("OTHER", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(90));
        assert_eq!(config.limits.max_connections, 4096);
        assert_eq!(config.admin.listen, None);
        assert_eq!(config.device_tls.names, ["printer.lan", "10.0.0.5"]);
        assert_eq!(config.routes.len(), 4);
    }

    #[test]
    fn routes_from_the_environment() {
        let config = load(
            "",
            &[(
                "TLSBRIDGE__ROUTE",
                r#"[{name="smtp", listen="0.0.0.0:25", protocol="smtp", device_tls="plain",
                    upstream="smtp.office365.com:587", upstream_tls="starttls"}]"#,
            )],
        )
        .unwrap();
        assert_eq!(config.routes.len(), 1);
        assert_eq!(config.routes[0].device_tls, DeviceMode::Plain);
    }

    /// A config file, environment variables, and the key the error must name.
    type BadCase<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

    #[test]
    fn errors_name_the_key() {
        let cases: &[BadCase] = &[
            ("[limits]\nbogus = 1\n", &[], "limits"),
            (
                "[limits]\nidle_timeout = \"soon\"\n",
                &[],
                "limits.idle_timeout",
            ),
            (
                "[upstream_tls]\nmin_version = \"TLSv1\"\n",
                &[],
                "upstream_tls.min_version",
            ),
            ("", &[("TLSBRIDGE__LOG__FORMAT", "xml")], "log.format"),
            ("", &[("TLSBRIDGE__NOPE", "1")], "nope"),
            (
                "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nprotocol = \"tcp\"\n\
                 device_tls = \"starttls\"\nupstream = \"h:1\"\nupstream_tls = \"tls\"\n",
                &[],
                "route[0].protocol",
            ),
            (
                "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nprotocol = \"tcp\"\n\
                 device_tls = \"plain\"\nupstream = \"sni:443\"\nupstream_tls = \"tls\"\n\
                 sni_allow = [\"a.example\"]\n",
                &[],
                "route[0].upstream",
            ),
            (
                "[[route]]\nname = \"r\"\nlisten = \"nowhere\"\nprotocol = \"tcp\"\n\
                 device_tls = \"tls\"\nupstream = \"h:1\"\nupstream_tls = \"tls\"\n",
                &[],
                "route[0].listen",
            ),
            (
                "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nprotocol = \"tcp\"\n\
                 device_tls = \"tls\"\nupstream = \"nohost\"\nupstream_tls = \"tls\"\n",
                &[],
                "route[0].upstream",
            ),
        ];
        for (file, env, key) in cases {
            let err = load(file, env).expect_err(file).to_string();
            assert!(err.contains(key), "{err:?} should name {key}");
        }
    }

    #[test]
    fn the_admin_endpoint_cannot_share_a_route_port() {
        let err = load(
            "[admin]\nlisten = \"127.0.0.1:2587\"\n[[route]]\nname = \"r\"\n\
             listen = \"127.0.0.1:2587\"\nprotocol = \"tcp\"\ndevice_tls = \"tls\"\n\
             upstream = \"h:1\"\nupstream_tls = \"tls\"\n",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("route[0].listen"), "{err}");
    }

    #[test]
    fn a_missing_route_key_is_named_with_its_path() {
        let err = load("[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("route[0].protocol"), "{err}");
    }

    #[test]
    fn upstream_parses_hosts_ports_and_sni() {
        assert_eq!(
            "smtp.office365.com:587".parse::<Upstream>().unwrap(),
            Upstream::Fixed {
                host: "smtp.office365.com".into(),
                port: 587
            }
        );
        assert_eq!(
            "sni:443".parse::<Upstream>().unwrap(),
            Upstream::Sni { port: 443 }
        );
        let v6: Upstream = "[::1]:993".parse().unwrap();
        assert_eq!(v6.to_string(), "[::1]:993");
        assert!("host:0".parse::<Upstream>().is_err());
    }

    const SNI_ROUTE: &str = "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\n\
        protocol = \"tcp\"\ndevice_tls = \"tls\"\nupstream = \"sni:443\"\n\
        upstream_tls = \"tls\"\n";

    #[test]
    fn values_past_their_bound_are_refused_naming_the_key() {
        let cases = [
            ("state_save_interval = \"2h\"\n", "state_save_interval"),
            (
                "[device_tls]\nhandshake_timeout = \"3601s\"\n",
                "device_tls.handshake_timeout",
            ),
            (
                "[upstream_tls]\nconnect_timeout = \"100years\"\n",
                "upstream_tls.connect_timeout",
            ),
            ("[limits]\ndrain_timeout = \"2h\"\n", "limits.drain_timeout"),
            ("[limits]\nidle_timeout = \"25h\"\n", "limits.idle_timeout"),
            (
                "[limits]\nmax_connections = 1000001\n",
                "limits.max_connections",
            ),
            (
                "[limits]\nmax_connections = 10\nmax_connections_per_ip = 11\n",
                "limits.max_connections_per_ip",
            ),
            (
                "[limits]\nmax_inventory_clients = 1000001\n",
                "limits.max_inventory_clients",
            ),
            (
                "[limits]\nconnect_rate_per_ip = 100001\n",
                "limits.connect_rate_per_ip",
            ),
            (
                "[limits]\nmax_connections = 9223372036854775807\n",
                "limits.max_connections",
            ),
        ];
        for (file, key) in cases {
            let err = load(file, &[]).expect_err(file).to_string();
            assert!(err.starts_with(key), "{err:?} should name {key}");
            assert!(err.contains("at most"), "{err:?} should give the bound");
        }
        // The bounds themselves load.
        let config = load(
            "state_save_interval = \"1h\"\n[limits]\nidle_timeout = \"24h\"\n\
             max_connections = 1000000\nmax_connections_per_ip = 1000000\n\
             max_inventory_clients = 1000000\nconnect_rate_per_ip = 0\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.limits.max_connections, MAX_COUNT);
        assert_eq!(load("", &[]).unwrap().limits.connect_rate_per_ip, 20);
    }

    #[test]
    fn sni_allow_takes_host_names_and_narrow_wildcards_on_sni_routes_only() {
        for good in [
            "a.example",
            "*.b.example",
            "localhost",
            "*.localhost",
            "*.test",
        ] {
            let file = format!("{SNI_ROUTE}sni_allow = [\"{good}\"]\n");
            load(&file, &[]).unwrap_or_else(|err| panic!("{good}: {err}"));
        }
        for bad in [
            "*", "*.com", "*.COM", "", "*.", "a..b", "a b.test", "*.*.test", "x_y.test", "a.*.test",
        ] {
            let file = format!("{SNI_ROUTE}sni_allow = [\"a.test\", {bad:?}]\n");
            let err = load(&file, &[]).expect_err(bad).to_string();
            assert!(err.starts_with("route[0].sni_allow"), "{bad:?}: {err}");
        }
        let fixed = "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nprotocol = \"tcp\"\n\
                     device_tls = \"tls\"\nupstream = \"h:1\"\nupstream_tls = \"tls\"\n\
                     sni_allow = [\"a.test\"]\n";
        let err = load(fixed, &[]).unwrap_err().to_string();
        assert!(err.starts_with("route[0].sni_allow"), "{err}");
    }

    #[test]
    fn the_admin_token_file_is_read_trimmed_and_must_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        let file = format!("[admin]\ntoken_file = {:?}\n", path.display().to_string());
        let config = load(&file, &[]).unwrap();
        assert_eq!(
            config.admin.token.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(load("", &[]).unwrap().admin.token.is_none());
        std::fs::write(&path, " \n\t").unwrap();
        let err = load(&file, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("admin.token_file") && err.contains("empty"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        let err = load(&file, &[]).unwrap_err().to_string();
        assert!(err.starts_with("admin.token_file"), "{err}");
    }
}
