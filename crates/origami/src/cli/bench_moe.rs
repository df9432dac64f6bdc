//! `origami bench moe`: dispatch + combine against expert time of one MoE layer, per dispatcher.

use clap::Args;

/// Arguments of `origami bench moe`.
#[derive(Args, Debug)]
pub struct MoeBenchArgs {
    /// Model preset whose MoE layer is timed: tiny, small or medium.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Expert-parallel size.
    #[arg(long, default_value_t = 4)]
    pub ep: usize,
    /// Expert tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    pub etp: usize,
    /// Timed iterations (one warm-up runs first).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
}

/// Prints one JSON line per dispatcher.
pub fn run(args: MoeBenchArgs) -> anyhow::Result<()> {
    let reports = origami::bench_moe::run(&origami::bench_moe::MoeBenchSettings {
        preset: args.preset,
        ep: args.ep,
        etp: args.etp,
        steps: args.steps,
    })?;
    for report in reports {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
