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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
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
    /// 0: no per-address limit.
    pub max_connections_per_ip: usize,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
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
            routes_given |= table.contains_key("route");
            layers.push(MapSource(table));
        }
        let mut vars: HashMap<String, String> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with(ENV_PREFIX))
            .collect();
        let env_routes = vars.remove("TLSBRIDGE__ROUTE");
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
        let config: Config = serde_path_to_error::deserialize(layered).map_err(|err| {
            let key = err.path().to_string();
            invalid(key, dotted(&err.into_inner().to_string()))
        })?;
        config.validate()?;
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
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
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
        Ok(())
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

    /// True when the device expects a server greeting once both legs are up: its leg was
    /// implicit TLS or plain (after its own STARTTLS it expects none).
    pub fn device_expects_greeting(&self) -> bool {
        self.device_tls != DeviceMode::Starttls
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
}
