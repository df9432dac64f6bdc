//! `origami bench`: model training-step benchmark on a preset.

use clap::{Args, Subcommand};

/// Arguments of `origami bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
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
    /// Another benchmark instead of the model's (`origami bench comm`).
    #[command(subcommand)]
    pub other: Option<OtherBench>,
}

/// Benchmarks of parts other than the model.
#[derive(Subcommand, Debug)]
pub enum OtherBench {
    /// Communicator bandwidth (all-reduce, all-to-all-v) beside memcpy.
    Comm(super::bench_comm::CommBenchArgs),
}

/// Runs the benchmark and prints one JSON line.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(OtherBench::Comm(comm_args)) = args.other {
        return super::bench_comm::run(comm_args);
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
