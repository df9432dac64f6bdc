//! Command-line entry points: one module per subcommand, this file only dispatches.

mod bench;

use clap::{Parser, Subcommand};

/// Train Mixture-of-Experts language models with 5-D parallelism and MoE Parallel Folding.
#[derive(Parser)]
#[command(name = "origami", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time training steps of a model preset on random tokens (tokens/s, MFU, memory).
    Bench(bench::BenchArgs),
}

/// Parses the command line and runs the chosen subcommand.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(args),
    }
}
