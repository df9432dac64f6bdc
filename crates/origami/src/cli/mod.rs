//! Command-line entry points: one module per subcommand, this file only dispatches.

mod bench;
mod bench_comm;
mod eval;
mod topology;

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
    /// Next-token loss of a HuggingFace Mixtral / Qwen2-MoE checkpoint on given token ids.
    Eval(eval::EvalArgs),
    /// Show the dense and expert rank groups of a parallel configuration (folding layout).
    Topology(topology::TopologyArgs),
}

/// Parses the command line and runs the chosen subcommand.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Topology(args) => topology::run(args),
    }
}
