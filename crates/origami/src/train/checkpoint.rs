//! Checkpoints: `DIR/step-NNNNNNNN/` holding `model.safetensors` (every parameter by name, with its
//! global shape and shard offset in the metadata so that sharded runs can reassemble or reshard
//! it), `optimizer.safetensors` (AdamW moments `exp_avg.NAME`, `exp_avg_sq.NAME`) and
//! `state.json` (step, data position, config, and the SHA-256 of the two tensor files).
//!
//! A save writes a temporary directory, syncs it, renames it into place, then replaces the
//! `DIR/latest` pointer file by rename: a process killed at any moment leaves the previous
//! checkpoint complete and pointed to. Loading verifies the hashes, so truncated or corrupted
//! files are reported instead of loaded.

use crate::model::gpt::GptModel;
use crate::optim::adamw::AdamW;
use crate::params::Buffers;
use anyhow::{bail, ensure, Context};
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the checkpoint layout written here.
const FORMAT_VERSION: u32 = 1;
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
const LATEST_FILE: &str = "latest";

/// Training progress stored beside the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training samples consumed (the data position).
    pub consumed_samples: u64,
    /// The run configuration as TOML.
    pub config_toml: String,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: u32,
    state: TrainingState,
    sha256: HashMap<String, String>,
}

/// Placement of one stored tensor inside its global parameter.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct ShardInfo {
    global_shape: Vec<usize>,
    offset: Vec<usize>,
}

struct F32Tensor<'a> {
    shape: Vec<usize>,
    values: &'a [f32],
}

impl View for F32Tensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.values.len() * 4
    }
}

fn write_tensors(
    path: &Path,
    model: &GptModel,
    buffers: &[(&str, &Buffers)],
) -> anyhow::Result<()> {
    let mut tensors = Vec::new();
    let mut shards = HashMap::new();
    for (prefix, buffer) in buffers {
        for info in model.registry().params() {
            let name = if prefix.is_empty() {
                info.name.clone()
            } else {
                format!("{prefix}.{}", info.name)
            };
            shards.insert(
                name.clone(),
                ShardInfo {
                    global_shape: info.shape.clone(),
                    offset: vec![0; info.shape.len()],
                },
            );
            tensors.push((
                name,
                F32Tensor {
                    shape: info.shape.clone(),
                    values: buffer.get(info.id),
                },
            ));
        }
    }
    let metadata = HashMap::from([
        ("origami.format".to_string(), FORMAT_VERSION.to_string()),
        (
            "origami.shards".to_string(),
            serde_json::to_string(&shards)?,
        ),
    ]);
    let bytes = safetensors::serialize(tensors, &Some(metadata))?;
    write_synced(path, &bytes)
}

fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Name of the directory of step `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Saves a checkpoint into `run_dir` atomically, points `latest` at it, and deletes all but
/// the newest `keep` checkpoints. Returns the checkpoint's directory. Fails, changing nothing,
/// if the latest checkpoint is of this same step.
pub fn save(
    run_dir: &Path,
    model: &GptModel,
    params: &Buffers,
    optimizer: &AdamW,
    state: &TrainingState,
    keep: usize,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let name = step_dir_name(state.step);
    let tmp = run_dir.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    write_tensors(&tmp.join(MODEL_FILE), model, &[("", params)])?;
    write_tensors(
        &tmp.join(OPTIMIZER_FILE),
        model,
        &[("exp_avg", &optimizer.m), ("exp_avg_sq", &optimizer.v)],
    )?;
    let mut sha256 = HashMap::new();
    for file in [MODEL_FILE, OPTIMIZER_FILE] {
        sha256.insert(
            file.to_string(),
            sha256_hex(&std::fs::read(tmp.join(file))?),
        );
    }
    let state_file = StateFile {
        format: FORMAT_VERSION,
        state: state.clone(),
        sha256,
    };
    write_synced(
        &tmp.join(STATE_FILE),
        serde_json::to_string_pretty(&state_file)?.as_bytes(),
    )?;
    let target = run_dir.join(&name);
    if target.exists() {
        // Only the checkpoint `latest` names is protected; any other directory of this step is
        // the orphan of a save killed between its rename and the `latest` update.
        let latest = std::fs::read_to_string(run_dir.join(LATEST_FILE)).unwrap_or_default();
        if latest.trim() == name {
            std::fs::remove_dir_all(&tmp)?;
            bail!(
                "{} already exists and is the latest checkpoint; it is never overwritten",
                target.display()
            );
        }
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&tmp, &target)
        .with_context(|| format!("moving the checkpoint into {}", target.display()))?;
    let latest_tmp = run_dir.join(format!(".{LATEST_FILE}.tmp-{}", std::process::id()));
    write_synced(&latest_tmp, name.as_bytes())?;
    std::fs::rename(&latest_tmp, run_dir.join(LATEST_FILE))?;
    sync_dir(run_dir);
    prune(run_dir, keep)?;
    Ok(target)
}

/// Makes the renames durable where the platform allows syncing a directory.
fn sync_dir(dir: &Path) {
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.sync_all();
    }
}

/// Deletes checkpoints older than the newest `keep`, and leftovers of interrupted saves.
fn prune(run_dir: &Path, keep: usize) -> anyhow::Result<()> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(run_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-step-") && !name.ends_with(&format!("-{}", std::process::id())) {
            std::fs::remove_dir_all(entry.path())?;
        } else if name.starts_with("step-") {
            steps.push(name);
        }
    }
    steps.sort();
    let excess = steps.len().saturating_sub(keep.max(1));
    for name in &steps[..excess] {
        std::fs::remove_dir_all(run_dir.join(name))?;
    }
    Ok(())
}

/// Whether `run_dir` already holds a run's checkpoints (its `latest` pointer exists).
pub fn has_checkpoints(run_dir: &Path) -> bool {
    run_dir.join(LATEST_FILE).exists()
}

/// The checkpoint directory `path` designates: itself if it holds a checkpoint, else the one
/// its `latest` file names.
pub fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
    if path.join(STATE_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(LATEST_FILE);
    let name = std::fs::read_to_string(&latest).with_context(|| {
        format!(
            "{} is neither a checkpoint nor a run directory with a `latest` file",
            path.display()
        )
    })?;
    let dir = path.join(name.trim());
    ensure!(
        dir.join(STATE_FILE).exists(),
        "{} names {}, which is not a complete checkpoint",
        latest.display(),
        dir.display()
    );
    Ok(dir)
}

/// A loaded checkpoint.
pub struct Loaded {
    /// Training progress and configuration.
    pub state: TrainingState,
    /// Model parameters.
    pub params: Buffers,
    /// AdamW moments (`None` when only the model is wanted).
    pub moments: Option<(Buffers, Buffers)>,
}

/// Reads the training state (and config) of checkpoint `dir` after checking its integrity.
pub fn read_state(dir: &Path) -> anyhow::Result<TrainingState> {
    Ok(read_state_file(dir)?.state)
}

fn read_state_file(dir: &Path) -> anyhow::Result<StateFile> {
    let path = dir.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: StateFile =
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
    ensure!(
        state.format == FORMAT_VERSION,
        "{} has checkpoint format {}, this build reads {FORMAT_VERSION}",
        path.display(),
        state.format
    );
    Ok(state)
}

fn read_verified(dir: &Path, file: &str, state: &StateFile) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let expected = state.sha256.get(file).with_context(|| {
        format!(
            "{} lists no hash for {file}",
            dir.join(STATE_FILE).display()
        )
    })?;
    if &sha256_hex(&bytes) != expected {
        bail!(
            "{} is corrupt or truncated: its SHA-256 does not match the one recorded at save time",
            path.display()
        );
    }
    Ok(bytes)
}

fn read_tensors(
    bytes: &[u8],
    path: &Path,
    model: &GptModel,
    prefix: &str,
) -> anyhow::Result<Buffers> {
    let tensors = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{} is not valid safetensors", path.display()))?;
    let mut buffers = model.registry().zeros();
    for info in model.registry().params() {
        let name = if prefix.is_empty() {
            info.name.clone()
        } else {
            format!("{prefix}.{}", info.name)
        };
        let view = tensors
            .tensor(&name)
            .with_context(|| format!("{} lacks tensor {name}", path.display()))?;
        ensure!(
            view.dtype() == Dtype::F32,
            "{name} in {} is {:?}, expected F32",
            path.display(),
            view.dtype()
        );
        ensure!(
            view.shape() == info.shape.as_slice(),
            "{name} in {} has shape {:?}, the model needs {:?}",
            path.display(),
            view.shape(),
            info.shape
        );
        let out = buffers.get_mut(info.id);
        for (o, b) in out.iter_mut().zip(view.data().chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    Ok(buffers)
}

/// Loads checkpoint `dir` for `model`, with the optimizer moments if `with_optimizer`.
pub fn load(dir: &Path, model: &GptModel, with_optimizer: bool) -> anyhow::Result<Loaded> {
    let state = read_state_file(dir)?;
    let model_bytes = read_verified(dir, MODEL_FILE, &state)?;
    let params = read_tensors(&model_bytes, &dir.join(MODEL_FILE), model, "")?;
    let moments = if with_optimizer {
        let bytes = read_verified(dir, OPTIMIZER_FILE, &state)?;
        let path = dir.join(OPTIMIZER_FILE);
        Some((
            read_tensors(&bytes, &path, model, "exp_avg")?,
            read_tensors(&bytes, &path, model, "exp_avg_sq")?,
        ))
    } else {
        None
    };
    Ok(Loaded {
        state: state.state,
        params,
        moments,
    })
}
