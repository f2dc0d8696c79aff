//! Subcommands other than `run`: each prints for a human and returns the process exit code.

pub mod admin_client;
pub mod certs;
pub mod check;
pub mod health;
pub mod inventory;
pub mod passwd;
pub mod probe;

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
