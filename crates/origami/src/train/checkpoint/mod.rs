//! Checkpoints that scale: every rank writes the pieces it owns, any layout reads any other.
//!
//! `DIR/step-NNNNNNNN/` holds one safetensors file per writing rank (`rank-RRRRR.safetensors`:
//! f32 pieces of parameters and of the AdamW moments `exp_avg.NAME` / `exp_avg_sq.NAME`, each a
//! block of its global tensor, each element stored once — see [`shards`] for who writes what),
//! `index.json` (every global tensor's shape and pieces, every file's size and SHA-256; see
//! [`index`]) and `state.json` (step, data position, config). A checkpoint without moments (a
//! converted HuggingFace model) resumes with fresh optimizer state.
//!
//! Saving is collective. Rank 0 creates a temporary directory; every rank writes its file and
//! a note of its pieces; the ranks agree that all succeeded (if one failed, every rank returns
//! an error and the temporary directory goes); rank 0 merges the notes into `index.json`,
//! checks that the pieces cover every tensor exactly, writes `state.json`, renames the
//! directory into place, then switches `DIR/latest` by rename — so a crash at any moment leaves
//! the previous checkpoint complete and pointed to.
//!
//! Loading is collective too. The files' hashes are checked, each file by one rank; then each
//! rank reads, for every parameter and moment it holds, only the pieces that overlap its part,
//! each mapped, copied and unmapped in turn. The whole-tensor format of earlier releases
//! (`model.safetensors` + `optimizer.safetensors`, format 1) is read as an index of whole
//! pieces.

pub mod index;
pub mod shards;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use origami_comm::{Communicator, ReduceOp};
use serde::{Deserialize, Serialize};

use self::index::{FileEntry, Index, Piece, TensorEntry, INDEX_FILE};
use self::shards::{Contribution, Needed, Slot, Targets, MOMENTS};
use crate::params::region::{for_each_row, placed_blocks, Block};
use crate::params::{Buffers, ParamGroup, ParamRegistry};
use crate::tensor_files::{
    sha256_of, write_pieces, write_replacing, write_synced, TensorFile, TensorFileError,
};

/// Version of the layout written here (1: whole tensors, read only).
const FORMAT_VERSION: u32 = 2;
const STATE_FILE: &str = "state.json";
const LATEST_FILE: &str = "latest";
const LEGACY_FILES: [&str; 2] = ["model.safetensors", "optimizer.safetensors"];

/// Why a checkpoint could not be written or read; every variant names the file or tensor.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read or written, or is damaged.
    #[error(transparent)]
    File(#[from] TensorFileError),
    /// A file of the checkpoint that is not what its index says.
    #[error("{path} is corrupt or truncated: {detail}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The index has no entry for a tensor the model needs.
    #[error("the checkpoint in {dir} holds no tensor {tensor}")]
    MissingTensor {
        /// The tensor.
        tensor: String,
        /// The checkpoint.
        dir: String,
    },
    /// Two pieces of one tensor hold the same elements.
    #[error("pieces of {tensor} overlap: {first} and {second}")]
    Overlap {
        /// The tensor.
        tensor: String,
        /// One piece (key and file).
        first: String,
        /// The other.
        second: String,
    },
    /// The pieces of a tensor leave elements out.
    #[error("the pieces of {tensor} hold {covered} of its {total} elements")]
    Hole {
        /// The tensor.
        tensor: String,
        /// Elements held.
        covered: usize,
        /// Elements of the tensor.
        total: usize,
    },
    /// A tensor of another shape than the model's.
    #[error("{tensor} has shape {found:?} in the checkpoint, the model needs {expected:?}")]
    Shape {
        /// The tensor.
        tensor: String,
        /// Shape in the checkpoint.
        found: Vec<usize>,
        /// Shape the model needs.
        expected: Vec<usize>,
    },
}

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
    /// Format 1 only: the SHA-256 of its two tensor files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<HashMap<String, String>>,
}

/// A rank's note of the file it wrote, merged by rank 0 into the index.
#[derive(Serialize, Deserialize)]
struct RankNote {
    file: String,
    entry: FileEntry,
    pieces: Vec<(String, Vec<usize>, Piece)>,
}

/// Name of the directory of step `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn rank_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// Whether any rank says yes.
fn any(world: &Arc<dyn Communicator>, mine: bool) -> origami_comm::Result<bool> {
    let mut flag = [u64::from(mine)];
    if world.size() > 1 {
        world.all_reduce_u64(&mut flag, ReduceOp::Max)?;
    }
    Ok(flag[0] > 0)
}

/// Saves a checkpoint of every rank's `contribution` into `run_dir` atomically, points `latest`
/// at it, and deletes all but the newest `keep` checkpoints; `tensors` are the model's global
/// parameters (the one-rank registry), against which rank 0 checks that the pieces cover every
/// tensor exactly. Collective over `world`; returns the checkpoint's directory. Fails, changing
/// nothing, if the latest checkpoint is of this same step.
pub fn save(
    world: &Arc<dyn Communicator>,
    run_dir: &Path,
    contribution: &Contribution<'_>,
    tensors: &ParamRegistry,
    state: &TrainingState,
    keep: usize,
) -> anyhow::Result<PathBuf> {
    let name = step_dir_name(state.step);
    let leader = world.rank() == 0;
    let mut nonce = [u64::from(std::process::id()) * u64::from(leader)];
    if world.size() > 1 {
        world.all_reduce_u64(&mut nonce, ReduceOp::Max)?;
    }
    let tmp = run_dir.join(format!(".tmp-{name}-{}", nonce[0]));
    let prepared = if leader {
        prepare_tmp(run_dir, &tmp)
    } else {
        Ok(())
    };
    if any(world, prepared.is_err())? {
        prepared?;
        bail!("rank 0 could not prepare {}", tmp.display());
    }
    let written = write_rank_file(&tmp, world.rank(), contribution);
    if any(world, written.is_err())? {
        if leader {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written?;
        bail!(
            "another rank failed while saving step {}; the previous checkpoint stays the latest",
            state.step
        );
    }
    let finished = if leader {
        finish(run_dir, &tmp, &name, world.size(), tensors, state, keep)
    } else {
        Ok(run_dir.join(&name))
    };
    if any(world, finished.is_err())? {
        if leader {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        finished?;
        bail!(
            "rank 0 failed to finish the checkpoint of step {}; the previous checkpoint stays the latest",
            state.step
        );
    }
    finished
}

fn prepare_tmp(run_dir: &Path, tmp: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    if tmp.exists() {
        std::fs::remove_dir_all(tmp)?;
    }
    std::fs::create_dir(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok(())
}

/// Writes this rank's file (if it owns anything) and its note.
fn write_rank_file(tmp: &Path, rank: usize, contribution: &Contribution<'_>) -> anyhow::Result<()> {
    let pieces = contribution.pieces();
    if pieces.is_empty() {
        return Ok(());
    }
    let file = rank_file(rank);
    let path = tmp.join(&file);
    let mut listed = Vec::with_capacity(pieces.len());
    let mut data = Vec::with_capacity(pieces.len());
    for piece in pieces {
        listed.push((
            piece.tensor,
            piece.tensor_shape,
            Piece {
                file: file.clone(),
                key: piece.key.clone(),
                block: piece.block,
            },
        ));
        data.push((piece.key, piece.data));
    }
    let metadata = HashMap::from([("origami.format".to_string(), FORMAT_VERSION.to_string())]);
    let (bytes, sha256) = write_pieces(&path, data, metadata)?;
    let note = RankNote {
        file: file.clone(),
        entry: FileEntry { bytes, sha256 },
        pieces: listed,
    };
    write_synced(
        &tmp.join(format!("{file}.json")),
        serde_json::to_string(&note)?.as_bytes(),
    )?;
    Ok(())
}

/// Rank 0: merges the notes into the index, checks it, writes the state, moves the directory
/// into place, switches `latest` and prunes.
fn finish(
    run_dir: &Path,
    tmp: &Path,
    name: &str,
    ranks: usize,
    tensors: &ParamRegistry,
    state: &TrainingState,
    keep: usize,
) -> anyhow::Result<PathBuf> {
    let mut index = Index::default();
    for rank in 0..ranks {
        let note_path = tmp.join(format!("{}.json", rank_file(rank)));
        if !note_path.exists() {
            continue;
        }
        let note: RankNote = serde_json::from_str(&std::fs::read_to_string(&note_path)?)
            .with_context(|| format!("reading {}", note_path.display()))?;
        index.files.insert(note.file, note.entry);
        for (tensor, shape, piece) in note.pieces {
            index
                .tensors
                .entry(tensor)
                .or_insert_with(|| TensorEntry {
                    shape,
                    pieces: Vec::new(),
                })
                .pieces
                .push(piece);
        }
        std::fs::remove_file(&note_path)?;
    }
    for info in tensors.params() {
        for tensor in std::iter::once(info.name.clone())
            .chain(MOMENTS.iter().map(|m| format!("{m}.{}", info.name)))
        {
            index
                .check_tensor(&tensor, tmp)
                .context("the ranks' pieces do not make up the checkpoint")?;
        }
    }
    write_synced(
        &tmp.join(INDEX_FILE),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )?;
    let state_file = StateFile {
        format: FORMAT_VERSION,
        state: state.clone(),
        sha256: None,
    };
    write_synced(
        &tmp.join(STATE_FILE),
        serde_json::to_string_pretty(&state_file)?.as_bytes(),
    )?;
    publish(run_dir, tmp, name, keep)
}

/// Moves the finished `tmp` to `run_dir/name`, switches `latest` to it and prunes.
fn publish(run_dir: &Path, tmp: &Path, name: &str, keep: usize) -> anyhow::Result<PathBuf> {
    let target = run_dir.join(name);
    if target.exists() {
        // Only the checkpoint `latest` names is protected; any other directory of this step is
        // the orphan of a save killed between its rename and the `latest` update.
        let latest = std::fs::read_to_string(run_dir.join(LATEST_FILE)).unwrap_or_default();
        if latest.trim() == name {
            std::fs::remove_dir_all(tmp)?;
            bail!(
                "{} already exists and is the latest checkpoint; it is never overwritten",
                target.display()
            );
        }
        std::fs::remove_dir_all(&target)?;
    }
    sync_dir(tmp);
    std::fs::rename(tmp, &target)
        .with_context(|| format!("moving the checkpoint into {}", target.display()))?;
    write_replacing(&run_dir.join(LATEST_FILE), name.as_bytes())?;
    sync_dir(run_dir);
    prune(run_dir, keep)?;
    Ok(target)
}

/// Makes renames durable where the platform allows syncing a directory.
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

/// One whole tensor to write into a one-rank checkpoint, its values made when written.
pub struct WholeTensor<'a> {
    /// Global name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Makes its values.
    pub fill: crate::tensor_files::Fill<'a>,
}

/// Writes a checkpoint directory `out` (which must not exist) holding `tensors` whole in one
/// rank file, without optimizer state, streaming one tensor at a time; written under a
/// temporary name and renamed into place when complete.
pub fn write_whole(
    out: &Path,
    tensors: Vec<WholeTensor<'_>>,
    state: &TrainingState,
) -> anyhow::Result<()> {
    ensure!(
        !out.exists(),
        "{} already exists; nothing was overwritten (choose another output)",
        out.display()
    );
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map_or("checkpoint".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    prepare_tmp(tmp.parent().unwrap_or(Path::new(".")), &tmp)?;
    let file = rank_file(0);
    let mut index = Index::default();
    let mut data = Vec::with_capacity(tensors.len());
    for tensor in tensors {
        let block = Block {
            offset: vec![0; tensor.shape.len()],
            shape: tensor.shape.clone(),
        };
        let key = format!(
            "{}@{}",
            tensor.name,
            vec!["0"; tensor.shape.len()].join(",")
        );
        index.tensors.insert(
            tensor.name,
            TensorEntry {
                shape: tensor.shape.clone(),
                pieces: vec![Piece {
                    file: file.clone(),
                    key: key.clone(),
                    block,
                }],
            },
        );
        data.push((
            key,
            crate::tensor_files::PieceData {
                shape: tensor.shape,
                precision: crate::tensor_files::Precision::F32,
                fill: tensor.fill,
            },
        ));
    }
    let metadata = HashMap::from([("origami.format".to_string(), FORMAT_VERSION.to_string())]);
    let written = write_pieces(&tmp.join(&file), data, metadata).map_err(anyhow::Error::from);
    let finished = written.and_then(|(bytes, sha256)| {
        index.files.insert(file, FileEntry { bytes, sha256 });
        write_synced(
            &tmp.join(INDEX_FILE),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
        let state_file = StateFile {
            format: FORMAT_VERSION,
            state: state.clone(),
            sha256: None,
        };
        write_synced(
            &tmp.join(STATE_FILE),
            serde_json::to_string_pretty(&state_file)?.as_bytes(),
        )?;
        sync_dir(&tmp);
        std::fs::rename(&tmp, out)
            .with_context(|| format!("moving the checkpoint into {}", out.display()))
    });
    if finished.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    finished
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

fn read_state_file(dir: &Path) -> anyhow::Result<StateFile> {
    let path = dir.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: StateFile =
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
    ensure!(
        (1..=FORMAT_VERSION).contains(&state.format),
        "{} has checkpoint format {}, this build reads 1 to {FORMAT_VERSION}",
        path.display(),
        state.format
    );
    Ok(state)
}

/// Reads the training state (and config) of checkpoint `dir`.
pub fn read_state(dir: &Path) -> anyhow::Result<TrainingState> {
    Ok(read_state_file(dir)?.state)
}

/// A checkpoint opened for reading: its state and index.
pub struct Checkpoint {
    dir: PathBuf,
    state: TrainingState,
    index: Index,
}

impl Checkpoint {
    /// Opens checkpoint `dir` (either format).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let state_file = read_state_file(dir)?;
        let index = match state_file.format {
            1 => legacy_index(dir, state_file.sha256.as_ref())?,
            _ => Index::read(dir)?,
        };
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            state: state_file.state,
            index,
        })
    }

    /// Training progress and configuration.
    pub fn state(&self) -> &TrainingState {
        &self.state
    }

    /// The index of its tensors and files.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Whether it holds optimizer moments.
    pub fn has_moments(&self) -> bool {
        self.index
            .tensors
            .keys()
            .any(|t| t.starts_with(&format!("{}.", MOMENTS[0])))
    }

    /// Checks the SHA-256 of the files `pick` selects (their positions in the index's order).
    pub fn verify(&self, pick: impl Fn(usize) -> bool) -> Result<(), CheckpointError> {
        for (_, (file, entry)) in self
            .index
            .files
            .iter()
            .enumerate()
            .filter(|(i, _)| pick(*i))
        {
            let path = self.dir.join(file);
            let (bytes, sha256) = sha256_of(&path)?;
            if bytes != entry.bytes || sha256 != entry.sha256 {
                return Err(CheckpointError::Corrupt {
                    path: path.display().to_string(),
                    detail: format!(
                        "{bytes} bytes with SHA-256 {sha256}, the index recorded {} bytes with {}",
                        entry.bytes, entry.sha256
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reads `need` into `out` (its `flat.len()` elements), from the pieces that overlap it.
    pub fn read(
        &self,
        need: &Needed<'_>,
        out: &mut [f32],
        files: &mut HashMap<String, TensorFile>,
    ) -> Result<(), CheckpointError> {
        let entry = self.index.check_tensor(&need.tensor, &self.dir)?;
        if entry.shape != need.shape {
            return Err(CheckpointError::Shape {
                tensor: need.tensor.clone(),
                found: entry.shape.clone(),
                expected: need.shape.clone(),
            });
        }
        let placed = placed_blocks(need.shard, need.flat.clone());
        let local_shape = need.shard.local_shape();
        for piece in &entry.pieces {
            let overlaps: Vec<(Block, Vec<usize>)> = placed
                .iter()
                .filter_map(|p| {
                    p.block.intersect(&piece.block).map(|common| {
                        let local = (0..common.offset.len())
                            .map(|d| p.local_offset[d] + common.offset[d] - p.block.offset[d])
                            .collect();
                        (common, local)
                    })
                })
                .collect();
            if overlaps.is_empty() {
                continue;
            }
            if !files.contains_key(&piece.file) {
                files.insert(
                    piece.file.clone(),
                    TensorFile::open(&self.dir.join(&piece.file))?,
                );
            }
            let values = files[&piece.file].read(&piece.key, &piece.block.shape)?;
            for (common, local) in overlaps {
                for_each_row(
                    &common,
                    &piece.block,
                    &local_shape,
                    &local,
                    |from, to, len| {
                        let to = to - need.flat.start;
                        out[to..to + len].copy_from_slice(&values[from..from + len]);
                    },
                );
            }
        }
        Ok(())
    }
}

/// The index of a whole-tensor (format 1) checkpoint: each tensor one piece of its file.
fn legacy_index(dir: &Path, sha256: Option<&HashMap<String, String>>) -> anyhow::Result<Index> {
    let mut index = Index::default();
    for file in LEGACY_FILES {
        let path = dir.join(file);
        let bytes = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let recorded = sha256.and_then(|h| h.get(file)).with_context(|| {
            format!(
                "{} lists no hash for {file}",
                dir.join(STATE_FILE).display()
            )
        })?;
        // Format 1 recorded no sizes: the file's own size stands in (the hash still decides).
        index.files.insert(
            file.to_string(),
            FileEntry {
                bytes,
                sha256: recorded.clone(),
            },
        );
        // A damaged header shows as a hash mismatch when the file is verified; list what the
        // header says if it can be read.
        let Ok(tensors) = TensorFile::open(&path).map(|f| f.keys()) else {
            continue;
        };
        for (key, shape) in tensors {
            let block = Block {
                offset: vec![0; shape.len()],
                shape: shape.clone(),
            };
            index.tensors.insert(
                key.clone(),
                TensorEntry {
                    shape,
                    pieces: vec![Piece {
                        file: file.to_string(),
                        key,
                        block,
                    }],
                },
            );
        }
    }
    Ok(index)
}

/// A loaded rank's part of a checkpoint.
pub struct Loaded {
    /// Training progress and configuration.
    pub state: TrainingState,
    /// This rank's parameters.
    pub params: Buffers,
    /// Its moments over its owned ranges: `[dense, expert]`, each `(first, second)`; `None` when
    /// not asked for or when the checkpoint holds none (a fresh optimizer then).
    pub moments: Option<[(Vec<f32>, Vec<f32>); 2]>,
}

/// Loads checkpoint `dir` into every rank's `targets`: verifies the files (each by one rank),
/// then reads each rank's parts. Collective over `world`.
pub fn load(
    world: &Arc<dyn Communicator>,
    dir: &Path,
    targets: &Targets<'_>,
) -> anyhow::Result<Loaded> {
    let checkpoint = Checkpoint::open(dir)?;
    let (rank, size) = (world.rank(), world.size());
    let verified = checkpoint.verify(|i| i % size == rank);
    if any(world, verified.is_err())? {
        verified?;
        bail!(
            "another rank found a corrupt or missing file in {}",
            dir.display()
        );
    }
    let with_moments = targets.moments.is_some() && checkpoint.has_moments();
    let read = read_targets(&checkpoint, targets, with_moments);
    if any(world, read.is_err())? {
        return Err(read.err().map_or_else(
            || anyhow::anyhow!("another rank could not read its part of {}", dir.display()),
            anyhow::Error::from,
        ));
    }
    let (params, moments) = read?;
    Ok(Loaded {
        state: checkpoint.state.clone(),
        params,
        moments,
    })
}

/// One process alone (evaluation, generation): the parameters of `registry` from checkpoint
/// `dir`, every file verified.
pub fn load_params(dir: &Path, registry: &ParamRegistry) -> anyhow::Result<Loaded> {
    load(
        &origami_comm::SoloComm::shared(0),
        dir,
        &Targets {
            registry,
            moments: None,
        },
    )
}

type ReadParts = (Buffers, Option<[(Vec<f32>, Vec<f32>); 2]>);

fn read_targets(
    checkpoint: &Checkpoint,
    targets: &Targets<'_>,
    with_moments: bool,
) -> Result<ReadParts, CheckpointError> {
    let mut params = targets.registry.zeros();
    let mut moments = targets.moments.clone().map(|[dense, expert]| {
        [
            (vec![0.0; dense.len()], vec![0.0; dense.len()]),
            (vec![0.0; expert.len()], vec![0.0; expert.len()]),
        ]
    });
    let mut files = HashMap::new();
    for (need, slot) in targets.needs() {
        let len = need.flat.len();
        let out: &mut [f32] = match slot {
            Slot::Param(group, offset) => {
                let buffer = match group {
                    ParamGroup::Dense => &mut params.dense,
                    ParamGroup::Expert => &mut params.expert,
                };
                &mut buffer[offset..offset + len]
            }
            Slot::Moment(..) if !with_moments => continue,
            Slot::Moment(k, group, offset) => {
                let pair = &mut moments.as_mut().expect("moments were asked for")
                    [usize::from(group == ParamGroup::Expert)];
                let moment = if k == 0 { &mut pair.0 } else { &mut pair.1 };
                &mut moment[offset..offset + len]
            }
        };
        checkpoint.read(&need, out, &mut files)?;
    }
    Ok((params, moments.filter(|_| with_moments)))
}
