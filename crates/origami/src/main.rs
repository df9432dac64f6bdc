//! The `origami` command-line tool.

mod cli;

/// Runs the CLI; a failure prints its chain of causes (no backtrace) and exits with status 1.
fn main() {
    if let Err(error) = cli::run() {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
