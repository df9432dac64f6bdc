//! Command-line entry points: one module per subcommand, this file only dispatches.

use clap::{Parser, Subcommand};

/// Train Mixture-of-Experts language models with 5-D parallelism and MoE Parallel Folding.
#[derive(Parser)]
#[command(name = "origami", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

/// Parses the command line and runs the chosen subcommand.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
