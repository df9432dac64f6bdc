//! The training loop: micro-batches accumulated to the global batch, warm-up + cosine learning
//! rate, global-norm clipping, AdamW; validation every `eval_interval` steps; a log line, a
//! metrics record and a progress bar per step; checkpoints every `interval` steps, at the end,
//! and when asked to stop (Ctrl-C).
//!
//! Sample `i` of step `s` is global sample `s·global_batch + i`, so the data order depends only
//! on (seed, global sample index) and a resumed run sees exactly the batches it would have seen;
//! its micro-batch carries (seed, s, i) as the key of the router jitter.
//! Across ranks, data-parallel rank `d` of `D` takes the `d`-th contiguous `1/D` of the step's
//! micro-batches; the tensor- and context-parallel ranks of a replica read the same ones.
//! Checkpoints hold whole tensors (gathered from the shards), so any layout resumes any other.

use super::checkpoint::shards::{Contribution, MomentShards, OwnedMoments, Ownership, Targets};
use super::checkpoint::{self, TrainingState};
use super::config::RunConfig;
use super::consolidate::consolidate;
use super::metrics::{
    load_imbalance, metrics_file_exists, MetricsFileExists, MetricsWriter, StepRecord,
};
use super::pipeline::{evaluate_pipeline, stage_schedule};
use super::step::{train_step, StepGroups};
use crate::bench::peak_gemm_gflops_for;
use crate::compute::{WeightCopies, Weights};
use crate::model::flops::training_flops_per_token;
use crate::model::gpt::{GptModel, MicroBatch, SequenceKeys};
use crate::model::parallel::ModelParallel;
use crate::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use crate::params::{Buffers, ParamGroup};
use anyhow::Context;
use origami_comm::local::LocalWorld;
use origami_comm::{Communicator, ReduceOp, SoloComm};
use origami_data::gpt_dataset::GptDataset;
use origami_parallel::ParallelState;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Samples of `seq_len + 1` tokens addressed by a global index (wrapping around the data).
/// Implemented for [`origami_data::gpt_dataset::GptDataset`]; tests use synthetic sources.
pub trait SampleSource: Sync {
    /// Distinct samples available.
    fn len(&self) -> u64;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes sample `index` (taken modulo the length) into `out` (`seq_len + 1` tokens).
    fn sample_into(&self, index: u64, out: &mut [u32]) -> anyhow::Result<()>;
}

/// How a run is driven, beyond its configuration.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Checkpoint (or run directory) to continue from.
    pub resume: Option<PathBuf>,
    /// Metrics JSONL path (default: `checkpoint.dir/metrics.jsonl`). A fresh run refuses a file
    /// that exists; a resumed run appends to it.
    pub metrics_out: Option<PathBuf>,
    /// Show a progress bar and print a log line per step.
    pub verbose: bool,
    /// Stop (saving a checkpoint) once this many steps are done, as if interrupted.
    pub stop_after: Option<u64>,
    /// Set from outside (Ctrl-C) to stop after the current step, saving a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
}

/// What a run produced.
pub struct TrainOutcome {
    /// The model trained.
    pub model: GptModel,
    /// Final parameters.
    pub params: Buffers,
    /// Records of the steps run in this invocation.
    pub records: Vec<StepRecord>,
    /// Last validation loss measured, if any.
    pub val_loss: Option<f64>,
    /// Directory of the last checkpoint written.
    pub checkpoint: PathBuf,
    /// Whether the run stopped before `train.steps`.
    pub interrupted: bool,
}

/// The shape of a step's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Sequences per step.
    pub global_batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Token ids must lie below this.
    pub vocab: usize,
}

/// Micro-batch `index` of step `step` of a run seeded `seed`: sequences
/// `index·micro_batch ..` of the step's global batch, which are the samples
/// `step·global_batch + index·micro_batch ..` of `source`.
pub fn step_micro_batch(
    source: &dyn SampleSource,
    seed: u64,
    step: u64,
    index: usize,
    shape: &BatchShape,
) -> anyhow::Result<MicroBatch> {
    let in_step = (index * shape.micro_batch) as u64;
    micro_batch(
        source,
        step * shape.global_batch as u64 + in_step,
        (shape.micro_batch, shape.seq, shape.vocab),
        SequenceKeys::consecutive(seed, step, in_step, shape.micro_batch),
    )
}

/// `batch` samples of `source` from sample `first` on, as a micro-batch with `keys`.
fn micro_batch(
    source: &dyn SampleSource,
    first: u64,
    (batch, seq, vocab): (usize, usize, usize),
    keys: SequenceKeys,
) -> anyhow::Result<MicroBatch> {
    let mut tokens = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    let mut sample = vec![0u32; seq + 1];
    for i in 0..batch as u64 {
        source.sample_into(first + i, &mut sample)?;
        if let Some(&bad) = sample.iter().find(|&&t| t as usize >= vocab) {
            anyhow::bail!(
                "sample {} holds token id {bad}, outside model.vocab_size = {vocab} (was the data prepared with another tokenizer?)",
                first + i
            );
        }
        tokens.extend_from_slice(&sample[..seq]);
        targets.extend_from_slice(&sample[1..]);
    }
    Ok(MicroBatch {
        tokens,
        targets,
        batch,
        seq,
        keys,
    })
}

/// Mean validation cross-entropy over `batches` fixed micro-batches of `valid` (through the
/// pipeline when there is one; every data-parallel replica evaluates the same batches).
pub fn evaluate(
    model: &GptModel,
    params: &Weights,
    valid: &dyn SampleSource,
    (batches, micro, seq): (usize, usize, usize),
    groups: &StepGroups,
) -> anyhow::Result<f64> {
    let vocab = model.config().vocab_size;
    let batches = (0..batches)
        .map(|b| {
            micro_batch(
                valid,
                (b * micro) as u64,
                (micro, seq, vocab),
                SequenceKeys::default(),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (total, tokens) = evaluate_pipeline(model, params, &batches, &groups.pipeline)?;
    let (mut total, mut tokens) = ([total as f32], [tokens as u64]);
    if groups.world.size() > 1 {
        groups.world.all_reduce(&mut total, ReduceOp::Sum)?;
        groups.world.all_reduce_u64(&mut tokens, ReduceOp::Sum)?;
    }
    Ok(total[0] as f64 / tokens[0].max(1) as f64)
}

/// Where the run's metrics JSONL goes: `--metrics-out`, else `checkpoint.dir/metrics.jsonl`.
pub fn metrics_path(config: &RunConfig, options: &TrainOptions) -> PathBuf {
    options
        .metrics_out
        .clone()
        .unwrap_or_else(|| config.checkpoint.dir.join("metrics.jsonl"))
}

/// Trains `config`'s model on `train`, validating on `valid`: on one rank, or on
/// `parallel.world` ranks as threads of this process (the local backend).
pub fn train(
    config: &RunConfig,
    train: &dyn SampleSource,
    valid: Option<&dyn SampleSource>,
    options: &TrainOptions,
) -> anyhow::Result<TrainOutcome> {
    let world = config.parallel.world;
    if world == 1 {
        return train_on(SoloComm::shared(0), config, train, valid, options);
    }
    let mut outcomes = LocalWorld::new(world)
        .with_timeout(RANK_TIMEOUT)
        .run(|comm| train_on(comm, config, train, valid, options))
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    Ok(outcomes.swap_remove(0))
}

/// How long a rank waits in one collective before the job fails: long enough for a slow step or
/// a checkpoint written by rank 0, short enough that a hung peer is reported.
pub const RANK_TIMEOUT: Duration = Duration::from_secs(600);

/// Trains as one rank of `world` (the local backend's threads or MPI processes all call this).
/// Every rank returns the whole model and its parameters; rank 0 logs and writes files.
pub fn train_on(
    world: Arc<dyn Communicator>,
    config: &RunConfig,
    train: &dyn SampleSource,
    valid: Option<&dyn SampleSource>,
    options: &TrainOptions,
) -> anyhow::Result<TrainOutcome> {
    anyhow::ensure!(
        !train.is_empty(),
        "the training split has no samples of {} tokens",
        config.train.seq_len + 1
    );
    let p = &config.parallel;
    anyhow::ensure!(
        world.size() == p.world,
        "parallel.world = {} but the job has {} ranks (run `mpirun -np {}`, or set parallel.world)",
        p.world,
        world.size(),
        p.world
    );
    let t = &config.train;
    let state = ParallelState::new(&p.config().layout(p.world)?, world.as_ref())?;
    let model = GptModel::new_parallel(
        config.model.clone(),
        ModelParallel::from_state(&state, p.cp_comm_type)
            .with_stage_layers(p.pp_first_stage_layers, p.pp_last_stage_layers),
    )?
    .with_recompute(t.recompute);
    let groups = StepGroups::from_state(&state, world.clone());
    let full_model = if p.world == 1 {
        model.clone()
    } else {
        GptModel::new(config.model.clone())?
    };
    let leader = world.rank() == 0;
    let mut optimizer = ParallelOptimizer::new(
        model.registry(),
        t.adamw,
        OptimizerGroups::from_state(&state, world.clone()),
        p.distributed_optimizer,
        p.bucket_elements,
    );
    let metrics_file = metrics_path(config, options);
    let (mut params, mut step) = match &options.resume {
        Some(path) => {
            let dir = checkpoint::resolve(path)?;
            resume(&world, &dir, &model, &mut optimizer)
                .with_context(|| format!("resuming from {}", dir.display()))?
        }
        None => {
            anyhow::ensure!(
                !checkpoint::has_checkpoints(&config.checkpoint.dir),
                "checkpoint.dir {} already holds a run: continue it with `--resume {0}`, start over by deleting {0}, or choose another directory with `--set checkpoint.dir=DIR`",
                config.checkpoint.dir.display()
            );
            // Rank 0 writes the file, so it looks; every rank fails together.
            if agree(&world, leader && metrics_file_exists(&metrics_file))? {
                return Err(MetricsFileExists { path: metrics_file }.into());
            }
            (model.init_params(t.seed), 0)
        }
    };
    let compute = t.compute();
    let mut copies = WeightCopies::new(compute, &params);
    world.barrier()?;
    let run_dir = config.checkpoint.dir.clone();
    let mut metrics = match (leader, &options.resume) {
        (false, _) => None,
        (true, Some(_)) => Some(MetricsWriter::append(&metrics_file)?),
        (true, None) => Some(MetricsWriter::create(&metrics_file)?),
    };
    let micro_batches = t.global_batch / t.micro_batch;
    let dp = state.dp();
    let per_rank = micro_batches / dp.size();
    let schedule = stage_schedule(&model, per_rank, p.microbatch_group_size)?;
    let shape = BatchShape {
        micro_batch: t.micro_batch,
        global_batch: t.global_batch,
        seq: t.seq_len,
        vocab: config.model.vocab_size,
    };
    let tokens_per_step = t.global_batch * t.seq_len;
    let flops_per_token = training_flops_per_token(&config.model, t.seq_len);
    // The best GEMM rate seen so far: re-measured at each evaluation, so a start-up measurement
    // taken while the machine was busy does not inflate the MFU of later steps.
    let mut peak_gflops = if leader {
        peak_gemm_gflops_for(compute)
    } else {
        1.0
    };
    let progress = (leader && options.verbose).then(|| progress_bar(t.steps, step));
    let mut grads = model.registry().zeros();
    let mut records = Vec::new();
    let mut val_loss = None;
    let mut last_checkpoint = None;
    let mut interrupted = false;
    while step < t.steps {
        let started = Instant::now();
        let lr = t.lr.at(step);
        let batches = (0..per_rank)
            .map(|j| step_micro_batch(train, t.seed, step, dp.rank() * per_rank + j, &shape))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let outcome = train_step(
            &model,
            &mut params,
            &mut copies,
            &mut grads,
            &mut optimizer,
            &batches,
            &schedule,
            micro_batches,
            &groups,
            lr,
        )?;
        step += 1;
        let seconds = started.elapsed().as_secs_f64();
        let tokens_per_s = tokens_per_step as f64 / seconds;
        let evaluate_now =
            step == t.steps || (t.eval_interval > 0 && step.is_multiple_of(t.eval_interval));
        if evaluate_now && leader {
            peak_gflops = peak_gflops.max(peak_gemm_gflops_for(compute));
        }
        let step_val = match valid {
            Some(v) if evaluate_now => Some(evaluate(
                &model,
                &copies.weights(&params),
                v,
                (t.eval_batches, t.micro_batch, t.seq_len),
                &groups,
            )?),
            _ => None,
        };
        val_loss = step_val.or(val_loss);
        let counts = outcome.tokens_per_expert;
        let record = StepRecord {
            step,
            loss: outcome.loss,
            cross_entropy: outcome.cross_entropy,
            aux_loss: outcome.aux_loss,
            z_loss: outcome.z_loss,
            lr,
            grad_norm: outcome.grad_norm,
            tokens_per_s,
            mfu: tokens_per_s * flops_per_token / (peak_gflops * 1e9),
            expert_load_imbalance: load_imbalance(&counts),
            dropped_fraction: outcome.dropped as f64
                / counts.iter().flatten().sum::<usize>().max(1) as f64,
            tokens_per_expert: counts,
            val_loss: step_val,
        };
        if let Some(metrics) = &mut metrics {
            metrics.write(&record)?;
        }
        if let Some(bar) = &progress {
            // A hidden bar (output not a terminal) swallows `println`: print directly then.
            if bar.is_hidden() {
                println!("{}", record.log_line(t.steps));
            } else {
                bar.println(record.log_line(t.steps));
            }
            bar.set_position(step);
        }
        records.push(record);
        let stop_requested = agree(
            &world,
            options
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::SeqCst))
                || options.stop_after.is_some_and(|k| step >= k),
        )?;
        let periodic =
            config.checkpoint.interval > 0 && step.is_multiple_of(config.checkpoint.interval);
        if periodic || step == t.steps || stop_requested {
            let training_state = TrainingState {
                step,
                consumed_samples: step * t.global_batch as u64,
                config_toml: config.to_toml(),
            };
            let contribution = Contribution {
                registry: model.registry(),
                params: &params,
                moments: moment_shards(&optimizer),
                ownership: Ownership::of(&state),
            };
            last_checkpoint = Some(checkpoint::save(
                &world,
                &run_dir,
                &contribution,
                full_model.registry(),
                &training_state,
                config.checkpoint.keep,
            )?);
        }
        if stop_requested && step < t.steps {
            interrupted = true;
            break;
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let checkpoint = match last_checkpoint {
        Some(dir) => dir,
        None => checkpoint::resolve(&run_dir)?,
    };
    let params = consolidate(
        &world,
        &state,
        model.registry(),
        &params,
        full_model.registry(),
    )?;
    Ok(TrainOutcome {
        model: full_model,
        params,
        records,
        val_loss,
        checkpoint,
        interrupted,
    })
}

/// This rank's optimizer state as a checkpoint takes it.
fn moment_shards(optimizer: &ParallelOptimizer) -> MomentShards<'_> {
    let owned = |group| {
        let (range, m, v) = optimizer.owned_moments(group);
        OwnedMoments { range, m, v }
    };
    MomentShards {
        dense: owned(ParamGroup::Dense),
        expert: owned(ParamGroup::Expert),
        distributed: optimizer.is_distributed(),
    }
}

/// Loads checkpoint `dir` into this rank's parameters and optimizer state (fresh moments when
/// the checkpoint holds none); returns the parameters and the step reached. Collective.
fn resume(
    world: &Arc<dyn Communicator>,
    dir: &std::path::Path,
    model: &GptModel,
    optimizer: &mut ParallelOptimizer,
) -> anyhow::Result<(Buffers, u64)> {
    let ranges = [ParamGroup::Dense, ParamGroup::Expert].map(|g| optimizer.owned_moments(g).0);
    let loaded = checkpoint::load(
        world,
        dir,
        &Targets {
            registry: model.registry(),
            moments: Some(ranges),
        },
    )?;
    let step = loaded.state.step;
    if let Some([(dense_m, dense_v), (expert_m, expert_v)]) = loaded.moments {
        optimizer.restore_owned(ParamGroup::Dense, dense_m, dense_v, step);
        optimizer.restore_owned(ParamGroup::Expert, expert_m, expert_v, step);
    }
    Ok((loaded.params, step))
}

/// Whether any rank says yes (so every rank stops at the same step).
fn agree(world: &Arc<dyn Communicator>, mine: bool) -> origami_comm::Result<bool> {
    let mut flag = [mine as u64];
    if world.size() > 1 {
        world.all_reduce_u64(&mut flag, ReduceOp::Max)?;
    }
    Ok(flag[0] > 0)
}

impl SampleSource for origami_data::gpt_dataset::GptDataset {
    fn len(&self) -> u64 {
        GptDataset::len(self)
    }

    fn sample_into(&self, index: u64, out: &mut [u32]) -> anyhow::Result<()> {
        Ok(GptDataset::sample_into(self, index, out)?)
    }
}

fn progress_bar(total: u64, done: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40.cyan/blue} {pos}/{len} steps [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid progress template"),
    );
    bar.set_position(done);
    bar
}
