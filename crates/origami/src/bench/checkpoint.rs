//! `origami bench checkpoint`: how fast and how lean sharded checkpoints are.
//!
//! A preset's parameters and AdamW moments on `world` local ranks (threads of this process) are
//! saved and loaded back; the same number of bytes is then written to one file and read back
//! sequentially, so the checkpoint's GB/s compare with the disk's in the same run. Reads start
//! from a cold page cache where the kernel lets this process drop it. Memory: the process's peak
//! resident memory above what it held before each phase (`VmHWM`, reset through
//! `/proc/self/clear_refs`), against the ranks' own shards plus one largest tensor per rank.
//! The HuggingFace export and import of the saved checkpoint are measured the same way.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use origami_comm::local::LocalWorld;
use origami_comm::{Communicator, SoloComm};
use origami_parallel::{ParallelConfig, ParallelState};
use serde::Serialize;

use super::BenchLayout;
use crate::convert::{from_hf, to_hf};
use crate::model::config::ModelConfig;
use crate::model::gpt::GptModel;
use crate::model::parallel::ModelParallel;
use crate::optim::adamw::AdamWConfig;
use crate::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use crate::params::ParamGroup;
use crate::tensor_files::Precision;
use crate::train::checkpoint::shards::{
    Contribution, MomentShards, OwnedMoments, Ownership, Targets,
};
use crate::train::checkpoint::{self, TrainingState};
use crate::train::config::RunConfig;

/// What to measure.
#[derive(Clone, Debug)]
pub struct CheckpointBenchSettings {
    /// Model preset.
    pub preset: String,
    /// The layout that saves and loads.
    pub layout: BenchLayout,
    /// Scratch directory (emptied first, left with the checkpoint and its export).
    pub dir: PathBuf,
}

/// One phase: its time, throughput and extra resident memory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phase {
    /// Seconds.
    pub seconds: f64,
    /// Tensor bytes moved per second, GB/s (10⁹).
    pub gb_per_s: f64,
    /// Peak resident memory above the phase's start, MiB.
    pub extra_mib: f64,
}

/// The benchmark's result, printed as one JSON line.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointBenchReport {
    /// Always `"checkpoint"`.
    pub bench: &'static str,
    /// Preset.
    pub preset: String,
    /// Ranks.
    pub world: usize,
    /// Bytes of the checkpoint's tensor files.
    pub bytes: u64,
    /// Rank files written.
    pub files: usize,
    /// Whether the page cache was dropped before each read.
    pub cold_reads: bool,
    /// The sharded save.
    pub save: Phase,
    /// The resharding load (same layout).
    pub load: Phase,
    /// One file of the same bytes written and synced.
    pub plain_write: Phase,
    /// That file read back.
    pub plain_read: Phase,
    /// The ranks' own parameters and moments together, MiB.
    pub own_shards_mib: f64,
    /// The largest tensor of the model, MiB (f32).
    pub largest_tensor_mib: f64,
    /// The bound on extra memory: own shards plus one largest tensor per rank, MiB.
    pub bound_mib: f64,
    /// Export to HuggingFace (bf16).
    pub to_hf: Phase,
    /// Import of that export (to f32).
    pub from_hf: Phase,
}

fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0)
}

/// Starts a phase: resets the peak to the current resident memory, returns it (KiB).
fn start_phase() -> f64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_kib("VmRSS:")
}

/// The peak above `start` (KiB), in MiB.
fn extra_since(start: f64) -> f64 {
    (status_kib("VmHWM:") - start).max(0.0) / 1024.0
}

/// Flushes dirty pages and drops the page cache if the kernel lets this process (root), so
/// that reads come from disk; returns whether it could.
fn drop_caches() -> bool {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn phase(seconds: f64, bytes: u64, extra_mib: f64) -> Phase {
    Phase {
        seconds,
        gb_per_s: bytes as f64 / seconds / 1e9,
        extra_mib,
    }
}

/// Runs the benchmark.
pub fn run(settings: &CheckpointBenchSettings) -> anyhow::Result<CheckpointBenchReport> {
    let config = ModelConfig::preset(&settings.preset)?;
    let dir = &settings.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let full = GptModel::new(config.clone())?;
    let l = &settings.layout;
    let per_rank = if l.world == 1 {
        vec![rank(SoloComm::shared(0), settings, &full)?]
    } else {
        LocalWorld::new(l.world)
            .run(|world| rank(world, settings, &full).map_err(|e| format!("{e:#}")))
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let (save, load, own_bytes) = per_rank[0];
    let checkpoint_dir = checkpoint::resolve(&dir.join("run"))?;
    let index = checkpoint::Checkpoint::open(&checkpoint_dir)?;
    let bytes: u64 = index.index().files.values().map(|f| f.bytes).sum();
    let files = index.index().files.len();
    let (plain_write, plain_read, cold) = plain_io(&dir.join("plain.bin"), bytes)?;
    let largest = full
        .registry()
        .params()
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .max()
        .unwrap_or(0) as f64
        * 4.0
        / (1024.0 * 1024.0);
    let own_shards_mib = own_bytes as f64 / (1024.0 * 1024.0);
    let hf = dir.join("hf");
    let start = start_phase();
    let clock = Instant::now();
    let exported = to_hf(&checkpoint_dir, &hf, Precision::Bf16, 2 << 30)?;
    let to_hf_phase = phase(
        clock.elapsed().as_secs_f64(),
        exported.bytes,
        extra_since(start),
    );
    drop_caches();
    let start = start_phase();
    let clock = Instant::now();
    let imported = from_hf(&hf, &dir.join("imported"))?;
    let from_hf_phase = phase(
        clock.elapsed().as_secs_f64(),
        imported.bytes,
        extra_since(start),
    );
    Ok(CheckpointBenchReport {
        bench: "checkpoint",
        preset: settings.preset.clone(),
        world: l.world,
        bytes,
        files,
        cold_reads: cold,
        save: phase(save.0, bytes, save.1),
        load: phase(load.0, bytes, load.1),
        plain_write,
        plain_read,
        own_shards_mib,
        largest_tensor_mib: largest,
        bound_mib: own_shards_mib + l.world as f64 * largest,
        to_hf: to_hf_phase,
        from_hf: from_hf_phase,
    })
}

/// Seconds and extra MiB of a phase, as rank 0 measured them.
type Measured = (f64, f64);

/// One rank: builds its part of the model with initialised parameters and moments, then saves
/// and loads; rank 0 measures. Returns (save, load, bytes of every rank's own shards).
fn rank(
    world: Arc<dyn Communicator>,
    settings: &CheckpointBenchSettings,
    full: &GptModel,
) -> anyhow::Result<(Measured, Measured, u64)> {
    let l = &settings.layout;
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
    let model = GptModel::new_parallel(
        full.config().clone(),
        ModelParallel::from_state(&state, l.cp_comm_type),
    )?;
    let params = model.init_params(1);
    let mut optimizer = ParallelOptimizer::new(
        model.registry(),
        AdamWConfig::default(),
        OptimizerGroups::from_state(&state, world.clone()),
        l.distributed_optimizer,
        1 << 22,
    );
    let moments = model.init_params(2);
    for group in [ParamGroup::Dense, ParamGroup::Expert] {
        let (range, _, _) = optimizer.owned_moments(group);
        let part = moments.buffer(group)[range].to_vec();
        optimizer.restore_owned(group, part.clone(), part, 1);
    }
    let ranges = [ParamGroup::Dense, ParamGroup::Expert].map(|g| optimizer.owned_moments(g).0);
    let own = 4
        * (params.dense.len()
            + params.expert.len()
            + 2 * ranges.iter().map(|r| r.len()).sum::<usize>()) as u64;
    let mut owns = [own];
    if world.size() > 1 {
        world.all_reduce_u64(&mut owns, origami_comm::ReduceOp::Sum)?;
    }
    let run_config = RunConfig {
        model: full.config().clone(),
        ..RunConfig::default()
    };
    let training_state = TrainingState {
        step: 1,
        consumed_samples: 0,
        config_toml: run_config.to_toml(),
    };
    let leader = world.rank() == 0;
    let owned = |group| {
        let (range, m, v) = optimizer.owned_moments(group);
        OwnedMoments { range, m, v }
    };
    let contribution = Contribution {
        registry: model.registry(),
        params: &params,
        moments: MomentShards {
            dense: owned(ParamGroup::Dense),
            expert: owned(ParamGroup::Expert),
            distributed: optimizer.is_distributed(),
        },
        ownership: Ownership::of(&state),
    };
    let run_dir = settings.dir.join("run");
    let save = measured(&world, leader, || {
        checkpoint::save(
            &world,
            &run_dir,
            &contribution,
            full.registry(),
            &training_state,
            1,
        )
        .map(drop)
    })?;
    if leader {
        drop_caches();
    }
    let dir = checkpoint::resolve(&run_dir)?;
    let load = measured(&world, leader, || {
        checkpoint::load(
            &world,
            &dir,
            &Targets {
                registry: model.registry(),
                moments: Some(ranges.clone()),
            },
        )
        .map(drop)
    })?;
    Ok((save, load, owns[0]))
}

/// Runs `body` on every rank between barriers; rank 0 times it and measures its extra memory.
fn measured(
    world: &Arc<dyn Communicator>,
    leader: bool,
    body: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Measured> {
    world.barrier()?;
    let start = if leader { start_phase() } else { 0.0 };
    world.barrier()?;
    let clock = Instant::now();
    body()?;
    world.barrier()?;
    Ok((clock.elapsed().as_secs_f64(), extra_since(start)))
}

/// Writes `bytes` to `path` in 8 MiB blocks and syncs, then reads it back (cold if possible).
fn plain_io(path: &Path, bytes: u64) -> anyhow::Result<(Phase, Phase, bool)> {
    let block = vec![0x5au8; 8 << 20];
    let start = start_phase();
    let clock = Instant::now();
    let mut file = std::fs::File::create(path)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    drop(file);
    let write = phase(clock.elapsed().as_secs_f64(), bytes, extra_since(start));
    let cold = drop_caches();
    let mut buffer = vec![0u8; 8 << 20];
    let start = start_phase();
    let clock = Instant::now();
    let mut file = std::fs::File::open(path)?;
    while file.read(&mut buffer)? > 0 {}
    let read = phase(clock.elapsed().as_secs_f64(), bytes, extra_since(start));
    std::fs::remove_file(path)?;
    Ok((write, read, cold))
}
