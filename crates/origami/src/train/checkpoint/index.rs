//! `index.json`: every global tensor of a checkpoint (parameters by name, AdamW moments as
//! `exp_avg.NAME` / `exp_avg_sq.NAME`) with its shape and its pieces — blocks of it, each stored
//! in one rank file under a key — and every file's size and SHA-256. Written by rank 0 after
//! every rank has written its file; a checkpoint of the whole-tensor format (format 1) is read
//! into the same form, one piece per tensor.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::CheckpointError;
use crate::params::region::Block;

/// Name of the index file.
pub const INDEX_FILE: &str = "index.json";

/// One stored block of a global tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// The rank file holding it.
    pub file: String,
    /// Its key in that file.
    pub key: String,
    /// Where it lies in the global tensor.
    #[serde(flatten)]
    pub block: Block,
}

/// One global tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Global shape.
    pub shape: Vec<usize>,
    /// The blocks that together hold it, each element once.
    pub pieces: Vec<Piece>,
}

/// One file of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of its contents, hex.
    pub sha256: String,
}

/// The whole index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Every tensor file by name.
    pub files: BTreeMap<String, FileEntry>,
    /// Every global tensor by name.
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl Index {
    /// Reads `dir/index.json`.
    pub fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(INDEX_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| {
            CheckpointError::File(crate::tensor_files::TensorFileError::Io {
                path: path.display().to_string(),
                source,
            })
        })?;
        serde_json::from_str(&text).map_err(|e| CheckpointError::Corrupt {
            path: path.display().to_string(),
            detail: format!("not a checkpoint index: {e}"),
        })
    }

    /// Checks one tensor's pieces: each inside the tensor and in a listed file, no two
    /// overlapping, together covering every element. `dir` only names the files in errors.
    pub fn check_tensor(&self, name: &str, dir: &Path) -> Result<&TensorEntry, CheckpointError> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                tensor: name.to_string(),
                dir: dir.display().to_string(),
            })?;
        let mut covered = 0usize;
        for (i, piece) in entry.pieces.iter().enumerate() {
            if !self.files.contains_key(&piece.file) {
                return Err(CheckpointError::Corrupt {
                    path: dir.join(INDEX_FILE).display().to_string(),
                    detail: format!(
                        "a piece of {name} is in {}, which the index does not list",
                        piece.file
                    ),
                });
            }
            if !piece.block.fits(&entry.shape) {
                return Err(CheckpointError::Corrupt {
                    path: dir.join(&piece.file).display().to_string(),
                    detail: format!(
                        "piece {} of {name} at {:?}+{:?} lies outside its shape {:?}",
                        piece.key, piece.block.offset, piece.block.shape, entry.shape
                    ),
                });
            }
            if let Some(other) = entry.pieces[..i]
                .iter()
                .find(|other| other.block.intersect(&piece.block).is_some())
            {
                return Err(CheckpointError::Overlap {
                    tensor: name.to_string(),
                    first: format!("{} in {}", other.key, other.file),
                    second: format!("{} in {}", piece.key, piece.file),
                });
            }
            covered += piece.block.len();
        }
        let total: usize = entry.shape.iter().product();
        if covered != total {
            return Err(CheckpointError::Hole {
                tensor: name.to_string(),
                covered,
                total,
            });
        }
        Ok(entry)
    }
}
