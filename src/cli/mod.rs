//! The command line: its definition (`args`), the subcommands other than `run`, and `execute`,
//! which carries out a parsed command line.

pub mod admin_client;
pub mod args;
pub mod certs;
pub mod check;
pub mod health;
pub mod inventory;
pub mod passwd;
pub mod probe;
pub mod table;

use anyhow::Result;

use crate::config::{Config, LogFormat};
use args::{CertsAction, Command};

/// Exit code for a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for bad usage or an invalid configuration.
pub const EXIT_USAGE: u8 = 2;

/// Maps an error to its exit code: configuration problems are the admin's to fix (2), anything
/// else is a runtime failure (1).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err
        .chain()
        .any(|cause| cause.is::<crate::config::ConfigError>())
    {
        EXIT_USAGE
    } else {
        EXIT_FAILURE
    }
}

/// Carries out `command` (the default: run the proxy) with a loaded configuration.
pub fn execute(
    command: Option<Command>,
    config: Config,
    log_format: Option<LogFormat>,
) -> Result<()> {
    match command.unwrap_or(Command::Run) {
        Command::Run => crate::server::run_until_signalled(config, log_format),
        Command::Check => print(check::check(&config)),
        Command::Certs { action } => print(match action {
            CertsAction::Init => certs::init(&config.device_tls),
            CertsAction::Show => certs::show(&config.device_tls),
            CertsAction::ExportCa => certs::export_ca(&config.device_tls),
        }),
        Command::Inventory { json, csv, from } => {
            let (out, source) =
                inventory::inventory_with(&config, json, csv, &from, health::token(&config))?;
            eprintln!("{source}");
            print(Ok(out))
        }
        Command::Probe {
            target,
            xoauth2: true,
            mailbox,
            ..
        } => probe::run_xoauth2(&config, &target, mailbox.as_deref()),
        Command::Probe {
            target, starttls, ..
        } => probe::run(&config, &target, starttls.map(Into::into)),
        Command::Health => print(health::health(&config)),
        Command::Passwd {
            user,
            mailbox,
            users_file,
            delete,
        } => {
            let args = passwd::PasswdArgs {
                user,
                mailbox,
                users_file,
                delete,
            };
            print(passwd::passwd(&config, &args, &mut *passwd::stdin_input()))
        }
    }
}

fn print(output: Result<String>) -> Result<()> {
    print!("{}", output?);
    Ok(())
}
