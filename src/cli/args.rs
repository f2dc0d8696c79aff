//! The command line, as clap types: parsed in `main`, tested here with `try_parse_from`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::LogFormat;
use crate::protocol::Dialect;

#[derive(Debug, Parser)]
#[command(name = "tlsbridge", version = version(), about = "TLS upgrade proxy: legacy devices in, verified TLS 1.2+ to Microsoft 365 out")]
pub struct Cli {
    /// Configuration file, layered over the embedded defaults.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format (overrides log.format).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print the effective routes.
    Check,
    /// Manage the local CA and the device certificate.
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Print the legacy-device inventory (from the running instance, else the state file).
    Inventory {
        /// JSON instead of a table.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// CSV (a header row and one row per device) instead of a table.
        #[arg(long)]
        csv: bool,
        /// Merge the inventories of running instances: their admin base URLs, comma-separated
        /// (e.g. http://10.0.0.5:9480,http://10.0.0.6:9480).
        #[arg(long, value_name = "URL,URL...", value_delimiter = ',')]
        from: Vec<String>,
    },
    /// Connect to an upstream exactly as the upstream leg would and show what it presents.
    Probe {
        /// A route name, or HOST:PORT.
        target: String,
        /// Speak this protocol's STARTTLS first (HOST:PORT targets; routes know their own).
        #[arg(long, value_enum)]
        starttls: Option<StarttlsArg>,
        /// Fetch a token with the route's [oauth] settings and log in upstream with XOAUTH2
        /// (no mail is sent); exit 0 only when the upstream accepts it.
        #[arg(long)]
        xoauth2: bool,
        /// The mailbox to log in as (default: the route's default_mailbox).
        #[arg(long, requires = "xoauth2")]
        mailbox: Option<String>,
    },
    /// Exit 0 when the running instance's /healthz answers (for container health checks).
    Health,
    /// Add, change or delete a device user of the credentials table (oauth.users_file). The
    /// password is read from a prompt or standard input, never from the command line.
    Passwd {
        /// The device user name.
        user: String,
        /// The Microsoft 365 mailbox the user maps to (required for a new user).
        #[arg(long, value_name = "ADDRESS")]
        mailbox: Option<String>,
        /// The credentials table (default: oauth.users_file).
        #[arg(long, value_name = "FILE")]
        users_file: Option<PathBuf>,
        /// Remove the user.
        #[arg(long, conflicts_with = "mailbox")]
        delete: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum CertsAction {
    /// Create the local CA and the device certificate where missing.
    Init,
    /// Show the device certificate and the local CA.
    Show,
    /// Print the local CA certificate (PEM), to import into devices that verify their server.
    ExportCa,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> LogFormat {
        match arg {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StarttlsArg {
    Smtp,
    Imap,
    Pop3,
}

impl From<StarttlsArg> for Dialect {
    fn from(arg: StarttlsArg) -> Dialect {
        match arg {
            StarttlsArg::Smtp => Dialect::Smtp,
            StarttlsArg::Imap => Dialect::Imap,
            StarttlsArg::Pop3 => Dialect::Pop3,
        }
    }
}

/// `--version`: the crate version, the OpenSSL linked in and whether it can offer 3DES, RC4 and
/// SSLv3 to devices (only a `legacy-ciphers` build can).
pub fn version() -> String {
    let linked = if cfg!(feature = "vendored") {
        "vendored, statically linked"
    } else {
        "system library"
    };
    format!(
        "{}\n{} ({linked})\n{}",
        env!("CARGO_PKG_VERSION"),
        openssl::version::version(),
        crate::tls::legacy::legacy_summary()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tlsbridge").chain(args.iter().copied()))
    }

    #[test]
    fn no_command_means_run_and_global_options_go_anywhere() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        let cli = parse(&["check", "--config", "x.toml", "--log-format", "json"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Check)));
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
        assert_eq!(cli.log_format, Some(LogFormatArg::Json));
    }

    #[test]
    fn subcommands_and_their_arguments() {
        let cli = parse(&["probe", "smtp.office365.com:587", "--starttls", "smtp"]).unwrap();
        match cli.command {
            Some(Command::Probe {
                target, starttls, ..
            }) => {
                assert_eq!(target, "smtp.office365.com:587");
                assert_eq!(starttls.map(Dialect::from), Some(Dialect::Smtp));
            }
            other => panic!("{other:?}"),
        }
        let cli = parse(&["certs", "export-ca"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Certs {
                action: CertsAction::ExportCa
            })
        ));
        let cli = parse(&[
            "inventory",
            "--csv",
            "--from",
            "http://a:9480,http://b:9480",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Inventory { json, csv, from }) => {
                assert!(!json && csv);
                assert_eq!(from, ["http://a:9480", "http://b:9480"]);
            }
            other => panic!("{other:?}"),
        }
        let cli = parse(&["passwd", "scanner1", "--mailbox", "scan@contoso.com"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Passwd { ref user, .. }) if user == "scanner1")
        );
    }

    #[test]
    fn bad_usage_is_refused() {
        assert!(parse(&["probe"]).is_err(), "probe needs a target");
        assert!(parse(&["probe", "h:1", "--starttls", "http"]).is_err());
        assert!(parse(&["--log-format", "xml"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
        assert!(parse(&["inventory", "--json", "--csv"]).is_err());
        assert!(parse(&["passwd"]).is_err(), "passwd needs a user");
        assert!(
            parse(&["passwd", "u", "secret-password"]).is_err(),
            "a password is never taken from argv"
        );
    }
}
