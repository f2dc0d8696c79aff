//! The `tlsbridge` binary: parses the command line, sets up logging, loads the configuration
//! and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tlsbridge::cli::{self, EXIT_USAGE};
use tlsbridge::config::{Config, LogFormat, Protocol};
use tlsbridge::server::Server;

#[derive(Parser)]
#[command(name = "tlsbridge", version = version(), about = "TLS upgrade proxy: legacy devices in, verified TLS 1.2+ to Microsoft 365 out")]
struct Cli {
    /// Configuration file, layered over the embedded defaults.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format (overrides log.format).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
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
        starttls: Option<Starttls>,
    },
    /// Exit 0 when the running instance's /healthz answers (for container health checks).
    Health,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Starttls {
    Smtp,
    Imap,
    Pop3,
}

impl From<Starttls> for Protocol {
    fn from(p: Starttls) -> Protocol {
        match p {
            Starttls::Smtp => Protocol::Smtp,
            Starttls::Imap => Protocol::Imap,
            Starttls::Pop3 => Protocol::Pop3,
        }
    }
}

#[derive(Subcommand)]
enum CertsAction {
    /// Create the local CA and the device certificate where missing.
    Init,
    /// Show the device certificate and the local CA.
    Show,
    /// Print the local CA certificate (PEM), to import into devices that verify their server.
    ExportCa,
}

/// `--version`: the crate version, the OpenSSL linked in and whether it can offer 3DES, RC4 and
/// SSLv3 to devices (only a `legacy-ciphers` build can).
fn version() -> String {
    let linked = if cfg!(feature = "vendored") {
        "vendored, statically linked"
    } else {
        "system library"
    };
    format!(
        "{}\n{} ({linked})\n{}",
        env!("CARGO_PKG_VERSION"),
        openssl::version::version(),
        tlsbridge::tls::legacy::legacy_summary()
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tlsbridge: invalid configuration: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config, cli.log_format),
        Command::Check => print(cli::check::check(&config)),
        Command::Certs { action } => print(match action {
            CertsAction::Init => cli::certs::init(&config.device_tls),
            CertsAction::Show => cli::certs::show(&config.device_tls),
            CertsAction::ExportCa => cli::certs::export_ca(&config.device_tls),
        }),
        Command::Inventory { json } => {
            cli::inventory::inventory(&config, json).map(|(out, source)| {
                eprintln!("{source}");
                print!("{out}");
            })
        }
        Command::Probe { target, starttls } => {
            probe(&config, &target, starttls.map(Protocol::from))
        }
        Command::Health => print(cli::health::health(&config)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tlsbridge: {err:#}");
            ExitCode::from(cli::exit_code(&err))
        }
    }
}

fn print(output: anyhow::Result<String>) -> anyhow::Result<()> {
    print!("{}", output?);
    Ok(())
}

fn probe(config: &Config, target: &str, starttls: Option<Protocol>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (report, ok) = runtime.block_on(cli::probe::probe(config, target, starttls))?;
    print!("{report}");
    if !ok {
        anyhow::bail!("the upstream leg to {target} would fail");
    }
    Ok(())
}

/// glibc's malloc keeps what a burst of connections freed (its arenas only shrink from the top),
/// so RSS would stay at the burst's peak. `malloc_trim` returns every free page of every arena;
/// a thread calls it every 2 s (measured in docs/performance.md: RSS back from 410 MiB to about
/// 2x the baseline 10 s after 8,000 connections close; mimalloc and jemalloc with purging kept
/// more than 130 MiB). A trim finding nothing to return costs microseconds.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn give_back_freed_memory() {
    let _ = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(2));
            // SAFETY: malloc_trim takes no pointers; it only walks glibc's own free lists
            // under the arenas' locks.
            unsafe {
                libc::malloc_trim(0);
            }
        });
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back_freed_memory() {}

fn run(config: Config, log_format: Option<LogFormat>) -> anyhow::Result<()> {
    give_back_freed_memory();
    tlsbridge::logging::init(&config.log.level, log_format.unwrap_or(config.log.format))
        .map_err(tlsbridge::config::ConfigError::from_anyhow)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = tlsbridge::signals::shutdown();
        let server = Server::bind(config).await?;
        tlsbridge::signals::reload_on_hangup(server.shared());
        server.run(shutdown).await
    })
}
