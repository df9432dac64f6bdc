//! The `origami` command-line tool.

mod cli;

use std::process::ExitCode;

/// Runs the CLI. A failure prints its chain of causes (no backtrace) and exits with status 1,
/// or 2 for an invalid configuration ([`cli::ConfigError`]); a command may choose its status
/// itself (`origami check`: 1 on FAIL).
fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.downcast_ref::<cli::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
