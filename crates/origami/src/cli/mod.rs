//! Command-line entry points: one module per subcommand, this file only dispatches.

mod bench;
mod bench_comm;
mod bench_moe;
mod eval;
mod generate;
mod plan;
mod prepare;
mod topology;
mod train;

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
    /// Train a model (with no arguments: the quick-start run on the shipped Shakespeare slice).
    Train(train::TrainArgs),
    /// Tokenize text or JSONL into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).
    Prepare(prepare::PrepareArgs),
    /// Sample text from a checkpoint.
    Generate(generate::GenerateArgs),
    /// Time training steps of a model preset on random tokens (tokens/s, MFU, memory).
    Bench(bench::BenchArgs),
    /// Loss of a HuggingFace checkpoint on token ids, or of a checkpoint on a dataset's validation split.
    Eval(eval::EvalArgs),
    /// Show the dense and expert rank groups of a parallel configuration (folding layout).
    Topology(topology::TopologyArgs),
    /// Memory and step time of every folded layout of a model on a cluster, fastest first.
    Plan(plan::PlanArgs),
}

/// Parses the command line and runs the chosen subcommand.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(args) => train::run(args),
        Command::Prepare(args) => prepare::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Topology(args) => topology::run(args),
        Command::Plan(args) => plan::run(args),
    }
}
