//! The `tlsbridge` binary: parses the command line, loads the configuration and hands both to
//! the library.

use std::process::ExitCode;

use clap::Parser;
use tlsbridge::cli::args::{Cli, Command};
use tlsbridge::cli::{self, EXIT_USAGE};
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
    if matches!(cli.command, None | Some(Command::Run)) {
        give_back_freed_memory();
    }
    match cli::execute(cli.command, config, cli.log_format.map(Into::into)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tlsbridge: {err:#}");
            ExitCode::from(cli::exit_code(&err))
        }
    }
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
            // SAFETY: malloc_trim takes no pointers; it only walks glibc's own free lists under
            // the arenas' locks.
            unsafe {
                libc::malloc_trim(0);
            }
        });
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back_freed_memory() {}
