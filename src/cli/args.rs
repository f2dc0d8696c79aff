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
        #[arg(long)]
        json: bool,
    },
    /// Connect to an upstream exactly as the upstream leg would and show what it presents.
    Probe {
        /// A route name, or HOST:PORT.
        target: String,
        /// Speak this protocol's STARTTLS first (HOST:PORT targets; routes know their own).
        #[arg(long, value_enum)]
        starttls: Option<StarttlsArg>,
    },
    /// Exit 0 when the running instance's /healthz answers (for container health checks).
    Health,
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
            Some(Command::Probe { target, starttls }) => {
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
        let cli = parse(&["inventory", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Inventory { json: true })
        ));
    }

    #[test]
    fn bad_usage_is_refused() {
        assert!(parse(&["probe"]).is_err(), "probe needs a target");
        assert!(parse(&["probe", "h:1", "--starttls", "http"]).is_err());
        assert!(parse(&["--log-format", "xml"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }
}
