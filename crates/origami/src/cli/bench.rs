//! `origami bench`: model training-step benchmark on a preset, `origami bench comm` for the
//! communication benchmark, or `origami bench moe` for the MoE dispatch benchmark.

use clap::{Args, Subcommand};

/// Arguments of `origami bench`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// Another benchmark than the model's.
    #[command(subcommand)]
    pub target: Option<BenchTarget>,
    /// Model preset: tiny, small or medium.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Timed steps (one warm-up step runs first).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Sequences per step (default: the preset's micro-batch).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Tokens per sequence (default: the preset's sequence length).
    #[arg(long)]
    pub seq: Option<usize>,
}

/// Benchmarks other than the model's training step.
#[derive(Subcommand, Debug)]
pub enum BenchTarget {
    /// Bandwidth of all-reduce and all-to-all-v against a plain memcpy of the same bytes.
    Comm(super::bench_comm::CommBenchArgs),
    /// One MoE layer across expert-parallel ranks: dispatch + combine against expert time.
    Moe(super::bench_moe::MoeBenchArgs),
}

/// Runs the chosen benchmark; the model benchmark prints one JSON line.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.target {
        Some(BenchTarget::Comm(comm)) => return super::bench_comm::run(comm),
        Some(BenchTarget::Moe(moe)) => return super::bench_moe::run(moe),
        None => {}
    }
    let report = origami::bench::run(&origami::bench::BenchSettings {
        preset: args.preset,
        steps: args.steps,
        micro_batch: args.micro_batch,
        seq: args.seq,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
