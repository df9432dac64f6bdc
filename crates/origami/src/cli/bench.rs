//! `origami bench`: model training-step benchmark on a preset, `origami bench comm` for the
//! communication benchmark, or `origami bench moe` for the MoE dispatch benchmark.

use clap::{Args, Subcommand};
use origami::bench::BenchLayout;
use origami::compute::{Compute, PrecisionSetting};
use origami::layers::context_parallel::CpCommType;
use origami::layers::recompute::Recompute;

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
    /// Sequences per micro-batch, over all data-parallel ranks (default: the preset's).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Micro-batches per step (accumulated; pipelined when --pp > 1).
    #[arg(long, default_value_t = 1)]
    pub micro_batches: usize,
    /// Tokens per sequence (default: the preset's sequence length).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Local ranks (threads sharing the cores) training the same global batch.
    #[arg(long, default_value_t = 1)]
    pub world: usize,
    /// Tensor-parallel size of attention.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Context-parallel size.
    #[arg(long, default_value_t = 1)]
    pub cp: usize,
    /// Expert-parallel size.
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
    /// Expert tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    pub etp: usize,
    /// Pipeline stages.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Model chunks per pipeline stage (interleaved schedule when > 1).
    #[arg(long, default_value_t = 1)]
    pub vpp: usize,
    /// Layers of the first pipeline stage, when not the even share (as
    /// `parallel.pp_first_stage_layers`).
    #[arg(long)]
    pub pp_first_stage_layers: Option<usize>,
    /// Layers of the last pipeline stage, when not the even share (as
    /// `parallel.pp_last_stage_layers`).
    #[arg(long)]
    pub pp_last_stage_layers: Option<usize>,
    /// Context-parallel exchange: p2p or a2a.
    #[arg(long, default_value = "p2p", value_parser = parse_cp_comm_type)]
    pub cp_comm_type: CpCommType,
    /// Shard the optimizer state over data-parallel ranks.
    #[arg(long)]
    pub distributed_optimizer: bool,
    /// GEMM precision: auto (bf16 where the CPU has AVX512_BF16, else f32), f32 or bf16.
    #[arg(long, default_value = "auto", value_parser = parse_precision)]
    pub precision: PrecisionSetting,
    /// Choose the precision as on a CPU without AVX512_BF16.
    #[arg(long)]
    pub disable_avx512_bf16: bool,
    /// What each block's backward recomputes: none, selective or full.
    #[arg(long, default_value = "none", value_parser = parse_recompute)]
    pub recompute: Recompute,
    /// Time the steps by phase (GEMMs, attention, router, permutation, element-wise,
    /// optimizer, each communication kind, allocation) and print the median step's table.
    #[arg(long)]
    pub profile: bool,
}

fn parse_precision(value: &str) -> Result<PrecisionSetting, String> {
    match value {
        "auto" => Ok(PrecisionSetting::Auto),
        "f32" => Ok(PrecisionSetting::F32),
        "bf16" => Ok(PrecisionSetting::Bf16),
        other => Err(format!("unknown precision {other:?} (auto, f32 or bf16)")),
    }
}

fn parse_recompute(value: &str) -> Result<Recompute, String> {
    match value {
        "none" => Ok(Recompute::None),
        "selective" => Ok(Recompute::Selective),
        "full" => Ok(Recompute::Full),
        other => Err(format!(
            "unknown recompute {other:?} (none, selective or full)"
        )),
    }
}

fn parse_cp_comm_type(value: &str) -> Result<CpCommType, String> {
    match value {
        "p2p" => Ok(CpCommType::P2p),
        "a2a" => Ok(CpCommType::A2a),
        other => Err(format!("unknown cp_comm_type {other:?} (p2p or a2a)")),
    }
}

/// Benchmarks other than the model's training step.
#[derive(Subcommand, Debug)]
pub enum BenchTarget {
    /// Bandwidth of all-reduce and all-to-all-v against a plain memcpy of the same bytes.
    Comm(super::bench_comm::CommBenchArgs),
    /// One MoE layer across expert-parallel ranks: dispatch + combine against expert time.
    Moe(super::bench_moe::MoeBenchArgs),
    /// Sharded checkpoint save and load (and HuggingFace export and import) against plain
    /// sequential I/O of the same bytes, with the extra memory of each.
    Checkpoint(CheckpointArgs),
}

/// Arguments of `origami bench checkpoint`.
#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// Model preset: tiny, small or medium.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Local ranks saving and loading.
    #[arg(long, default_value_t = 4)]
    pub world: usize,
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 2)]
    pub tp: usize,
    /// Expert-parallel size.
    #[arg(long, default_value_t = 4)]
    pub ep: usize,
    /// Pipeline stages.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Shard the optimizer state over data-parallel ranks.
    #[arg(long)]
    pub distributed_optimizer: bool,
    /// Scratch directory (emptied first).
    #[arg(long, default_value = "runs/bench-checkpoint")]
    pub dir: std::path::PathBuf,
}

/// Runs the chosen benchmark; the model benchmark prints one JSON line.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.target {
        Some(BenchTarget::Comm(comm)) => return super::bench_comm::run(comm),
        Some(BenchTarget::Moe(moe)) => return super::bench_moe::run(moe),
        Some(BenchTarget::Checkpoint(c)) => {
            let report = origami::bench::checkpoint::run(
                &origami::bench::checkpoint::CheckpointBenchSettings {
                    preset: c.preset,
                    layout: BenchLayout {
                        world: c.world,
                        tp: c.tp,
                        ep: c.ep,
                        etp: 1,
                        pp: c.pp,
                        distributed_optimizer: c.distributed_optimizer,
                        ..BenchLayout::default()
                    },
                    dir: c.dir,
                },
            )?;
            println!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
        None => {}
    }
    let report = origami::bench::run(&origami::bench::BenchSettings {
        preset: args.preset,
        steps: args.steps,
        micro_batch: args.micro_batch,
        micro_batches: args.micro_batches,
        seq: args.seq,
        layout: BenchLayout {
            world: args.world,
            tp: args.tp,
            cp: args.cp,
            ep: args.ep,
            etp: args.etp,
            pp: args.pp,
            vpp: args.vpp,
            first_stage_layers: args.pp_first_stage_layers,
            last_stage_layers: args.pp_last_stage_layers,
            cp_comm_type: args.cp_comm_type,
            distributed_optimizer: args.distributed_optimizer,
        },
        compute: Compute::resolve(args.precision, args.disable_avx512_bf16),
        profile: args.profile,
        recompute: args.recompute,
    })?;
    if let Some(profile) = &report.profile {
        print!("{}", profile.table());
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
