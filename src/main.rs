//! The `tlsbridge` binary: parses the command line, loads the configuration and hands both to
//! the library.

use std::process::ExitCode;

use clap::Parser;
use tlsbridge::cli::{self, args::Cli, EXIT_USAGE};
use tlsbridge::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tlsbridge: invalid configuration: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli::execute(cli.command, config, cli.log_format.map(Into::into)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tlsbridge: {err:#}");
            ExitCode::from(cli::exit_code(&err))
        }
    }
}
