//! `origami bench`: model training-step benchmark on a preset.

use clap::Args;

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
}

/// Runs the benchmark and prints one JSON line.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let report = origami::bench::run(&origami::bench::BenchSettings {
        preset: args.preset,
        steps: args.steps,
        micro_batch: args.micro_batch,
        seq: args.seq,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
