//! Command-line entry points: one module per subcommand, this file only dispatches.

mod bench;
mod bench_comm;
mod bench_moe;
mod check;
mod convert;
mod eval;
mod generate;
mod plan;
mod prepare;
mod schedule;
mod topology;
mod train;

use std::process::ExitCode;

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
    /// Export a checkpoint to HuggingFace (Mixtral / Qwen2-MoE) or import one.
    Convert(convert::ConvertArgs),
    /// Draw a pipeline schedule (1F1B or interleaved): each stage's timeline and the bubble.
    Schedule(schedule::ScheduleArgs),
    /// Train a few steps at the config's layout and on one rank, and compare (PASS / FAIL).
    Check(check::CheckArgs),
    /// Memory and step time of every folded layout of a model on a cluster, fastest first.
    Plan(plan::PlanArgs),
}

/// A run config that cannot be read or is invalid (or names data that cannot be opened):
/// commands that promise it exit with status 2 on it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0:#}")]
pub struct ConfigError(pub anyhow::Error);

/// Whether this process was started by `mpirun` (Open MPI or a PMI launcher such as MPICH's).
fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Parses the command line (a usage error exits with status 2) and runs the chosen
/// subcommand, returning its exit status.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let done = match cli.command {
        Command::Train(args) => train::run(args),
        Command::Prepare(args) => prepare::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Topology(args) => topology::run(args),
        Command::Schedule(args) => schedule::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Check(args) => return check::run(args),
    };
    done.map(|()| ExitCode::SUCCESS)
}
