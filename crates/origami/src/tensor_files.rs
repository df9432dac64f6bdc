//! safetensors files read and written one tensor at a time, so that memory stays near one
//! tensor whatever the file's size: writing makes each tensor's bytes only when the writer
//! asks for them; reading parses a file's header once and maps only the bytes of the tensor
//! being read (converting f32, bf16 or f16 to f32), unmapping it after; hashing streams the
//! file. Checkpoints (rank files of f32 pieces) and the HuggingFace import and export use it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

use safetensors::tensor::{Dtype, Metadata, View};
use sha2::{Digest, Sha256};

/// A tensor file that cannot be read or written, naming it.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Its contents are not what they should be.
    #[error("{path} is corrupt or truncated: {detail}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// It could not be written.
    #[error("writing {path}: {detail}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        detail: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TensorFileError + '_ {
    move |source| TensorFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How a written tensor stores its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats.
    F32,
    /// bfloat16, rounded to nearest even.
    Bf16,
}

/// Appends a piece's values (row-major) to the buffer given.
pub type Fill<'a> = Box<dyn Fn(&mut Vec<f32>) + 'a>;

/// One tensor (a piece) to write: its shape, its precision and a function making its values.
pub struct PieceData<'a> {
    /// Shape of the piece.
    pub shape: Vec<usize>,
    /// How it is stored.
    pub precision: Precision,
    /// Makes its values.
    pub fill: Fill<'a>,
}

impl View for PieceData<'_> {
    fn dtype(&self) -> Dtype {
        match self.precision {
            Precision::F32 => Dtype::F32,
            Precision::Bf16 => Dtype::BF16,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let elements: usize = self.shape.iter().product();
        let mut values = Vec::with_capacity(elements);
        (self.fill)(&mut values);
        assert_eq!(
            values.len(),
            elements,
            "a tensor filled with the wrong length"
        );
        Cow::Owned(match self.precision {
            Precision::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Precision::Bf16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        })
    }
    fn data_len(&self) -> usize {
        let bytes = match self.precision {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        };
        self.shape.iter().product::<usize>() * bytes
    }
}

/// Writes `pieces` (key → data) to `path` and syncs it; returns its size and SHA-256.
pub fn write_pieces(
    path: &Path,
    pieces: Vec<(String, PieceData<'_>)>,
    metadata: HashMap<String, String>,
) -> Result<(u64, String), TensorFileError> {
    safetensors::serialize_to_file(pieces, &Some(metadata), path).map_err(|e| {
        TensorFileError::Write {
            path: path.display().to_string(),
            detail: e.to_string(),
        }
    })?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))?;
    sha256_of(path)
}

/// Writes `bytes` to `path` and syncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TensorFileError> {
    let mut file = std::fs::File::create(path).map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Replaces the file at `path` with `bytes` atomically: writes and syncs them beside it
/// (`.NAME.tmp-PID`), then renames over it, so a reader sees the old file or the new one and an
/// interrupted write leaves the old one (the temporary file is removed on failure).
pub fn write_replacing(path: &Path, bytes: &[u8]) -> Result<(), TensorFileError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written =
        write_synced(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path).map_err(io(path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Size and SHA-256 (hex) of a file, read in 1 MiB blocks.
pub fn sha256_of(path: &Path) -> Result<(u64, String), TensorFileError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut block).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hex(&hasher.finalize())))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A tensor file whose header has been read: where each key's bytes lie.
pub struct TensorFile {
    file: std::fs::File,
    path: String,
    data_start: u64,
    len: u64,
    metadata: Metadata,
}

impl TensorFile {
    /// Opens `path` and reads its safetensors header.
    pub fn open(path: &Path) -> Result<Self, TensorFileError> {
        let mut file = std::fs::File::open(path).map_err(io(path))?;
        let corrupt = |detail: String| TensorFileError::Corrupt {
            path: path.display().to_string(),
            detail,
        };
        let mut length = [0u8; 8];
        file.read_exact(&mut length)
            .map_err(|e| corrupt(format!("no safetensors header: {e}")))?;
        let header_len = u64::from_le_bytes(length);
        let file_len = file.metadata().map_err(io(path))?.len();
        if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
            return Err(corrupt(format!(
                "its header claims {header_len} bytes in a file of {file_len}"
            )));
        }
        let mut header = vec![0u8; 8 + header_len as usize];
        header[..8].copy_from_slice(&length);
        file.read_exact(&mut header[8..])
            .map_err(|e| corrupt(format!("truncated header: {e}")))?;
        let metadata: Metadata = std::str::from_utf8(&header[8..])
            .ok()
            .and_then(|text| serde_json::from_str(text.trim_end()).ok())
            .ok_or_else(|| corrupt("its safetensors header does not parse".into()))?;
        Ok(TensorFile {
            file,
            path: path.display().to_string(),
            data_start: 8 + header_len,
            len: file_len,
            metadata,
        })
    }

    /// Every tensor of the file with its shape.
    pub fn keys(&self) -> Vec<(String, Vec<usize>)> {
        self.metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.shape.clone()))
            .collect()
    }

    /// The shape of the tensor stored under `key`, if there is one.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.metadata.info(key).map(|info| info.shape.as_slice())
    }

    /// The file's path, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The values (as f32) of the tensor stored under `key`, which must have `shape`: its
    /// bytes alone are mapped, converted, and unmapped.
    pub fn read(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>, TensorFileError> {
        let corrupt = |detail: String| TensorFileError::Corrupt {
            path: self.path.clone(),
            detail,
        };
        let info = self
            .metadata
            .info(key)
            .ok_or_else(|| corrupt(format!("it holds no tensor {key}")))?;
        if info.shape != shape {
            return Err(corrupt(format!(
                "tensor {key} has shape {:?}, expected {shape:?}",
                info.shape
            )));
        }
        let width = match info.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(corrupt(format!(
                    "tensor {key} is {other:?}; f32, bf16 and f16 are read"
                )))
            }
        };
        let (begin, end) = info.data_offsets;
        let len = end - begin;
        if self.data_start + end as u64 > self.len || len != shape.iter().product::<usize>() * width
        {
            return Err(corrupt(format!("tensor {key} is truncated")));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: the mapping is read-only and dropped before returning; checkpoint files are
        // never modified once written (a save writes a new directory) and a HuggingFace
        // directory being read is not expected to change underneath.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(self.data_start + begin as u64)
                .len(len)
                .map(&self.file)
        }
        .map_err(|e| corrupt(format!("cannot map tensor {key}: {e}")))?;
        Ok(match info.dtype {
            Dtype::F32 => map
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => map
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => map
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replacing_swaps_the_whole_file_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latest");
        write_replacing(&path, b"step-1").unwrap();
        write_replacing(&path, b"step-2").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"step-2");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["latest"]);
        // A file that cannot be written is an error naming it; the old one stays.
        let missing = dir.path().join("no-such-dir").join("latest");
        let err = write_replacing(&missing, b"x").unwrap_err().to_string();
        assert!(err.contains("no-such-dir"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"step-2");
    }
}
