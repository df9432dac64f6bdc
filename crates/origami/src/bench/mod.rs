//! `origami bench`: times full training steps (forward, backward, AdamW) of a preset on random
//! tokens, and reports tokens/s, model TFLOP/s (DESIGN.md §5), the peak GEMM rate measured in
//! the same run, MFU against it, and peak resident memory.
//!
//! With a parallel layout the same global batch is trained by `world` local ranks (threads of
//! this process sharing the cores), so the tokens/s against the one-rank run measure the
//! layout's overhead; the report adds the bytes each rank sent per step against the layout's
//! theoretical traffic ([`traffic`]). A step holds `micro_batches` micro-batches (gradient
//! accumulation without a pipeline); with one, the report gives each stage's peak of stored
//! activations against one micro-batch's, and its measured bubble (time waiting in pipeline
//! exchanges over the step time) against the schedule's simulated one.

pub mod checkpoint;
mod peak;
pub mod profile;
pub mod traffic;

pub use peak::{peak_gemm_gflops, peak_gemm_gflops_bf16, peak_gemm_gflops_for};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::compute::{Compute, WeightCopies};
use crate::layers::context_parallel::CpCommType;
use crate::layers::recompute::Recompute;
use crate::model::config::ModelConfig;
use crate::model::flops::training_flops_per_token;
use crate::model::gpt::{GptModel, MicroBatch, SequenceKeys};
use crate::model::parallel::ModelParallel;
use crate::optim::adamw::AdamWConfig;
use crate::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use crate::params::{ParamGroup, Shard};
use crate::train::pipeline::stage_schedule;
use crate::train::step::{train_step, StepGroups, StepOutcome};
use origami_comm::local::LocalWorld;
use origami_comm::{Communicator, CountedComm, ReduceOp, SoloComm};
use origami_parallel::{ParallelConfig, ParallelState};
use origami_schedule::{schedule as schedule_of, simulate, StageTimes};
use profile::StepProfile;
use serde::Serialize;
use std::time::Instant;
use traffic::{theoretical_traffic, Traffic, TrafficLayout};

/// What to benchmark.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// Model preset name.
    pub preset: String,
    /// Timed steps (one more runs first as warm-up).
    pub steps: usize,
    /// Sequences per micro-batch, over all data-parallel ranks (default: the preset's).
    pub micro_batch: Option<usize>,
    /// Micro-batches per step.
    pub micro_batches: usize,
    /// Tokens per sequence (default: the preset's).
    pub seq: Option<usize>,
    /// The layout the step is trained on.
    pub layout: BenchLayout,
    /// The precision the step computes in.
    pub compute: Compute,
    /// Profile the steps by phase ([`crate::profile`]).
    pub profile: bool,
    /// What each block's backward recomputes.
    pub recompute: Recompute,
}

/// A parallel layout for the benchmark (dp and edp follow).
#[derive(Clone, Debug)]
pub struct BenchLayout {
    /// Local ranks.
    pub world: usize,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Context-parallel size.
    pub cp: usize,
    /// Expert-parallel size.
    pub ep: usize,
    /// Expert tensor-parallel size.
    pub etp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Model chunks per stage.
    pub vpp: usize,
    /// Layers of the first pipeline stage when not the even share
    /// (`parallel.pp_first_stage_layers`).
    pub first_stage_layers: Option<usize>,
    /// Layers of the last pipeline stage when not the even share
    /// (`parallel.pp_last_stage_layers`).
    pub last_stage_layers: Option<usize>,
    /// Context-parallel exchange.
    pub cp_comm_type: CpCommType,
    /// Shard the optimizer state over data-parallel ranks.
    pub distributed_optimizer: bool,
}

impl Default for BenchLayout {
    /// One rank.
    fn default() -> Self {
        BenchLayout {
            world: 1,
            tp: 1,
            cp: 1,
            ep: 1,
            etp: 1,
            pp: 1,
            vpp: 1,
            first_stage_layers: None,
            last_stage_layers: None,
            cp_comm_type: CpCommType::P2p,
            distributed_optimizer: false,
        }
    }
}

/// One benchmark result, printed as a JSON line.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Always `"model"`.
    pub bench: &'static str,
    /// Preset name.
    pub preset: String,
    /// The layout, e.g. `TP2·CP1·DP2 | EP4·ETP1·EDP1`.
    pub layout: String,
    /// Kernel threads.
    pub threads: usize,
    /// GEMM precision: `f32` or `bf16`.
    pub precision: &'static str,
    /// Activation recomputation: `none`, `selective` or `full`.
    pub recompute: Recompute,
    /// Parameters of the model.
    pub params: usize,
    /// Tokens per step.
    pub tokens_per_step: usize,
    /// Timed steps.
    pub steps: usize,
    /// Median step time in seconds.
    pub median_step_s: f64,
    /// Trained tokens per second at the median step time.
    pub tokens_per_s: f64,
    /// Achieved model TFLOP/s (DESIGN.md §5 FLOPs).
    pub model_tflops: f64,
    /// Best f32 GEMM rate measured in this run (before and after the steps), GFLOP/s (the CPU
    /// peak for f32 MFU).
    pub peak_gemm_gflops: f64,
    /// Best bf16 GEMM rate measured in this run, GFLOP/s (the CPU peak for bf16 MFU).
    pub peak_gemm_gflops_bf16: f64,
    /// Model FLOPs utilisation against the peak of the step's precision.
    pub mfu: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Loss of the last step (random tokens: about ln(vocab)).
    pub loss: f64,
    /// Bytes sent per step by the busiest rank (median step).
    pub bytes_sent_per_rank_max: u64,
    /// Bytes sent per step, mean over ranks (median step).
    pub bytes_sent_per_rank_mean: f64,
    /// What the layout needs in theory per rank and step (rank 0's shard sizes).
    pub theory_bytes_per_rank: Traffic,
    /// The theory's total.
    pub theory_bytes_per_rank_total: f64,
    /// The pipeline schedule: `none`, `1F1B` or `interleaved`.
    pub schedule: &'static str,
    /// Micro-batches per pipeline per step.
    pub micro_batches: usize,
    /// The schedule's bubble simulated with unit forward and backward twice as long.
    pub bubble_theory: f64,
    /// Each pipeline stage in the median step.
    pub stages: Vec<StageReport>,
    /// The median step by phase, with `--profile`.
    pub profile: Option<StepProfile>,
}

/// One pipeline stage's figures in the median step (the largest over the stage's ranks).
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    /// Stage.
    pub stage: usize,
    /// Peak of activations saved for backward at once, MiB.
    pub peak_stored_mib: f64,
    /// One micro-batch's saved activations on one chunk, MiB (the largest).
    pub micro_batch_stored_mib: f64,
    /// Most micro-batch chunks held at once.
    pub peak_in_flight: usize,
    /// Time waiting in pipeline exchanges over the step time.
    pub bubble: f64,
}

/// The micro-batch size of each preset, as in `shared/peers/README.md`.
pub fn preset_micro_batch(preset: &str) -> usize {
    match preset {
        "tiny" => 8,
        _ => 4,
    }
}

/// Runs the benchmark: on one rank, or on the layout's local ranks (rank 0 reports).
pub fn run(settings: &BenchSettings) -> anyhow::Result<BenchReport> {
    crate::profile::enable(settings.profile);
    let world = settings.layout.world;
    if world == 1 {
        return run_rank(SoloComm::shared(0), settings);
    }
    let mut reports = LocalWorld::new(world)
        .run(|comm| run_rank(comm, settings).map_err(|e| format!("{e:#}")))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(reports.swap_remove(0))
}

/// One rank's part of the benchmark; every rank returns the same timings.
fn run_rank(world: Arc<dyn Communicator>, settings: &BenchSettings) -> anyhow::Result<BenchReport> {
    let config = ModelConfig::preset(&settings.preset)?;
    let seq = settings.seq.unwrap_or(config.max_seq_len);
    let micro_batch = settings
        .micro_batch
        .unwrap_or(preset_micro_batch(&settings.preset));
    anyhow::ensure!(
        seq <= config.max_seq_len,
        "--seq {seq} exceeds the preset's max_seq_len {}",
        config.max_seq_len
    );
    anyhow::ensure!(
        settings.steps > 0 && micro_batch > 0,
        "--steps and --micro-batch must be positive"
    );
    let l = &settings.layout;
    let micro_batches = settings.micro_batches;
    let (world, sent) = CountedComm::wrap(world);
    let layout = ParallelConfig {
        tp: l.tp,
        cp: l.cp,
        pp: l.pp,
        vpp: l.vpp,
        ep: l.ep,
        etp: Some(l.etp),
        ..ParallelConfig::default()
    }
    .layout(l.world)?;
    let state = ParallelState::new(&layout, world.as_ref())?;
    let dp = state.dp();
    anyhow::ensure!(
        micro_batch.is_multiple_of(dp.size()),
        "--micro-batch {micro_batch} must split over the {} data-parallel ranks",
        dp.size()
    );
    let model = GptModel::new_parallel(
        config.clone(),
        ModelParallel::from_state(&state, l.cp_comm_type)
            .with_stage_layers(l.first_stage_layers, l.last_stage_layers),
    )?
    .with_recompute(settings.recompute);
    let mut params = model.init_params(0);
    let mut copies = WeightCopies::new(settings.compute, &params);
    let mut grads = model.registry().zeros();
    let mut optimizer = ParallelOptimizer::new(
        model.registry(),
        AdamWConfig::default(),
        OptimizerGroups::from_state(&state, world.clone()),
        l.distributed_optimizer,
        1 << 22,
    );
    let per_rank = micro_batch / dp.size();
    let batches: Vec<MicroBatch> = (0..micro_batches)
        .map(|m| {
            let whole = random_batch(micro_batch, seq, config.vocab_size, m as u64);
            let rows = dp.rank() * per_rank * seq..(dp.rank() + 1) * per_rank * seq;
            MicroBatch {
                tokens: whole.tokens[rows.clone()].to_vec(),
                targets: whole.targets[rows].to_vec(),
                batch: per_rank,
                seq,
                keys: SequenceKeys::consecutive(
                    0,
                    0,
                    (m * micro_batch + dp.rank() * per_rank) as u64,
                    per_rank,
                ),
            }
        })
        .collect();
    let schedule = stage_schedule(&model, micro_batches, None)?;
    let groups = StepGroups::from_state(&state, world.clone());
    let mut steps = Vec::with_capacity(settings.steps);
    let mut loss = 0.0;
    // The peak is sampled before and after the steps and the best kept: a slow spell of these
    // shared machines during one sample would otherwise lower the peak and inflate the MFU.
    let peak_before = (world.rank() == 0).then(|| (peak_gemm_gflops(), peak_gemm_gflops_bf16()));
    for step in 0..=settings.steps {
        world.barrier()?;
        let before = sent.load(Ordering::Relaxed);
        crate::profile::take();
        let faults = crate::profile::minor_faults();
        let start = Instant::now();
        let outcome = train_step(
            &model,
            &mut params,
            &mut copies,
            &mut grads,
            &mut optimizer,
            &batches,
            &schedule,
            micro_batches * dp.size(),
            &groups,
            1e-4,
        )?;
        let phases = crate::profile::take();
        let faults = crate::profile::minor_faults()
            .zip(faults)
            .map_or(0, |(after, before)| after - before);
        world.barrier()?;
        let mut seconds = [start.elapsed().as_secs_f32()];
        world.all_reduce(&mut seconds, ReduceOp::Max)?;
        loss = outcome.loss;
        if step > 0 {
            steps.push((
                seconds[0] as f64,
                sent.load(Ordering::Relaxed) - before,
                outcome,
                (phases, faults),
            ));
        }
    }
    steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (median, bytes, median_outcome, (phases, faults)) = &steps[steps.len() / 2];
    let profile = if settings.profile {
        Some(StepProfile::gather(&world, phases, *median, *faults)?)
    } else {
        None
    };
    let median = *median;
    let mut traffic = [*bytes, *bytes];
    world.all_reduce_u64(&mut traffic[..1], ReduceOp::Max)?;
    world.all_reduce_u64(&mut traffic[1..], ReduceOp::Sum)?;
    let stages = stage_reports(&world, state.pp().rank(), l.pp, median, median_outcome)?;
    let simulated = simulate(
        &(0..l.pp)
            .map(|stage| schedule_of(&schedule.config, stage))
            .collect::<Result<Vec<_>, _>>()?,
        StageTimes::default(),
    )?;
    let (mean_dense, mean_expert, mean_whole) = mean_shard_sizes(&world, &model)?;
    let tokens = micro_batch * micro_batches * seq;
    let tokens_per_s = tokens as f64 / median;
    let model_tflops = tokens_per_s * training_flops_per_token(&config, seq) / 1e12;
    let (peak_gemm_gflops, peak_gemm_gflops_bf16) = match peak_before {
        Some((f32_before, bf16_before)) => (
            peak_gemm_gflops().max(f32_before),
            peak_gemm_gflops_bf16().max(bf16_before),
        ),
        None => (1.0, 1.0),
    };
    let peak = match settings.compute {
        Compute::F32 => peak_gemm_gflops,
        Compute::Bf16(_) => peak_gemm_gflops_bf16,
    };
    let theory = theoretical_traffic(
        &config,
        &TrafficLayout {
            tp: l.tp,
            cp: l.cp,
            dp: dp.size(),
            ep: l.ep,
            etp: l.etp,
            edp: state.edp().size(),
            pp: l.pp,
            vpp: l.vpp,
            micro_batches,
            cp_comm_type: l.cp_comm_type,
            bf16_gemm_inputs: settings.compute.is_bf16(),
        },
        (per_rank, seq),
        (mean_dense, mean_expert, mean_whole),
        tied_table_shard(&config, l.tp),
    );
    Ok(BenchReport {
        bench: "model",
        preset: settings.preset.clone(),
        layout: describe(l, dp.size(), state.edp().size()),
        threads: rayon::current_num_threads(),
        precision: settings.compute.name(),
        recompute: settings.recompute,
        params: model.registry().total_len(),
        tokens_per_step: tokens,
        steps: settings.steps,
        median_step_s: median,
        tokens_per_s,
        model_tflops,
        peak_gemm_gflops,
        peak_gemm_gflops_bf16,
        mfu: model_tflops * 1e3 / peak,
        peak_rss_mib: peak_rss_mib(),
        loss,
        bytes_sent_per_rank_max: traffic[0],
        bytes_sent_per_rank_mean: traffic[1] as f64 / l.world as f64,
        theory_bytes_per_rank_total: theory.total(),
        theory_bytes_per_rank: theory,
        schedule: schedule.config.kind().name(),
        micro_batches,
        bubble_theory: simulated.bubble_fraction(),
        stages,
        profile,
    })
}

/// Each stage's figures of the median step, gathered from every rank (the largest over a
/// stage's ranks).
fn stage_reports(
    world: &Arc<dyn Communicator>,
    stage: usize,
    stages: usize,
    step_seconds: f64,
    outcome: &StepOutcome,
) -> anyhow::Result<Vec<StageReport>> {
    const FIELDS: usize = 5;
    let mine = [
        stage as f32,
        outcome.peak_stored_bytes as f32,
        outcome.largest_saved_bytes as f32,
        outcome.peak_in_flight as f32,
        outcome.exchange.as_secs_f32(),
    ];
    let mut all = vec![0.0; FIELDS * world.size()];
    world.all_gather_v(&mine, &vec![FIELDS; world.size()], &mut all)?;
    let mib = |bytes: f32| bytes as f64 / (1024.0 * 1024.0);
    Ok((0..stages)
        .map(|s| {
            let ranks = all.chunks(FIELDS).filter(|r| r[0] as usize == s);
            let largest = |field: usize| ranks.clone().map(|r| r[field]).fold(0.0f32, f32::max);
            StageReport {
                stage: s,
                peak_stored_mib: mib(largest(1)),
                micro_batch_stored_mib: mib(largest(2)),
                peak_in_flight: largest(3) as usize,
                bubble: largest(4) as f64 / step_seconds,
            }
        })
        .collect())
}

/// The mean over every rank of its (dense, expert, whole-over-tp dense) parameter elements.
fn mean_shard_sizes(
    world: &Arc<dyn Communicator>,
    model: &GptModel,
) -> anyhow::Result<(f64, f64, f64)> {
    let (dense, expert, whole) = shard_sizes(model);
    let mut sums = [dense as f32, expert as f32, whole as f32];
    world.all_reduce(&mut sums, ReduceOp::Sum)?;
    let n = world.size() as f64;
    Ok((sums[0] as f64 / n, sums[1] as f64 / n, sums[2] as f64 / n))
}

/// Elements of one rank's shard of a tied embedding table (0 when untied).
fn tied_table_shard(config: &ModelConfig, tp: usize) -> usize {
    if config.tie_embeddings {
        config.vocab_size / tp * config.hidden_size
    } else {
        0
    }
}

/// This rank's (dense, expert, dense held whole by every tp rank) parameter elements.
fn shard_sizes(model: &GptModel) -> (usize, usize, usize) {
    model
        .registry()
        .params()
        .iter()
        .fold((0, 0, 0), |(dense, expert, whole), p| match p.id.group() {
            ParamGroup::Expert => (dense, expert + p.id.len(), whole),
            ParamGroup::Dense if p.shard == Shard::full(&p.shape) => {
                (dense + p.id.len(), expert, whole + p.id.len())
            }
            ParamGroup::Dense => (dense + p.id.len(), expert, whole),
        })
}

/// `TP2·CP1·DP2 | EP4·ETP1·EDP1`, with `·PP2` on both sides (and `, VPP2`) along a pipeline.
fn describe(l: &BenchLayout, dp: usize, edp: usize) -> String {
    let pp = if l.pp > 1 {
        format!("·PP{}", l.pp)
    } else {
        String::new()
    };
    format!(
        "TP{}·CP{}·DP{dp}{pp} | EP{}·ETP{}·EDP{edp}{pp}{}{}",
        l.tp,
        l.cp,
        l.ep,
        l.etp,
        if l.vpp > 1 {
            format!(", VPP{}", l.vpp)
        } else {
            String::new()
        },
        if l.cp > 1 {
            format!(" ({:?})", l.cp_comm_type).to_lowercase()
        } else {
            String::new()
        }
    )
}

/// Deterministic pseudo-random tokens and next-token targets, different for each `salt`.
fn random_batch(batch: usize, seq: usize, vocab: usize, salt: u64) -> MicroBatch {
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab as u64) as u32
    };
    let stream: Vec<u32> = (0..batch * (seq + 1)).map(|_| next()).collect();
    let mut tokens = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for row in stream.chunks(seq + 1) {
        tokens.extend_from_slice(&row[..seq]);
        targets.extend_from_slice(&row[1..]);
    }
    MicroBatch {
        tokens,
        targets,
        batch,
        seq,
        keys: SequenceKeys::consecutive(0, 0, salt * batch as u64, batch),
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), MiB; 0 where unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
