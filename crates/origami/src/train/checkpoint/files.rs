//! The tensor files of a checkpoint: safetensors, f32, little-endian. Writing streams one piece
//! at a time (each piece's bytes are made when the writer asks for them); reading parses a
//! file's header once and maps only the bytes of the piece being read, so a rank holds at most
//! one piece of a file at a time; hashing streams the file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

use safetensors::tensor::{Dtype, Metadata, View};
use sha2::{Digest, Sha256};

use super::CheckpointError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Appends a piece's values (row-major) to the buffer given.
pub type Fill<'a> = Box<dyn Fn(&mut Vec<f32>) + 'a>;

/// One tensor (a piece) to write: its shape and a function making its f32 values.
pub struct PieceData<'a> {
    /// Shape of the piece.
    pub shape: Vec<usize>,
    /// Makes its values.
    pub fill: Fill<'a>,
}

impl View for PieceData<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut values = Vec::with_capacity(self.data_len() / 4);
        (self.fill)(&mut values);
        assert_eq!(
            values.len() * 4,
            self.data_len(),
            "a piece filled with the wrong length"
        );
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// Writes `pieces` (key → data) to `path` and syncs it; returns its size and SHA-256.
pub fn write_pieces(
    path: &Path,
    pieces: Vec<(String, PieceData<'_>)>,
    metadata: HashMap<String, String>,
) -> Result<(u64, String), CheckpointError> {
    safetensors::serialize_to_file(pieces, &Some(metadata), path).map_err(|e| {
        CheckpointError::Write {
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
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut file = std::fs::File::create(path).map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Size and SHA-256 (hex) of a file, read in 1 MiB blocks.
pub fn sha256_of(path: &Path) -> Result<(u64, String), CheckpointError> {
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
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let mut file = std::fs::File::open(path).map_err(io(path))?;
        let corrupt = |detail: String| CheckpointError::Corrupt {
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

    /// The f32 values of the piece stored under `key`, which must have `shape`: the piece's
    /// bytes alone are mapped, converted, and unmapped.
    pub fn read(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        let corrupt = |detail: String| CheckpointError::Corrupt {
            path: self.path.clone(),
            detail,
        };
        let info = self
            .metadata
            .info(key)
            .ok_or_else(|| corrupt(format!("it holds no piece {key}, which the index names")))?;
        if info.dtype != Dtype::F32 || info.shape != shape {
            return Err(corrupt(format!(
                "piece {key} is {:?} {:?}, the index says F32 {shape:?}",
                info.dtype, info.shape
            )));
        }
        let (begin, end) = info.data_offsets;
        let len = end - begin;
        if self.data_start + end as u64 > self.len || len != shape.iter().product::<usize>() * 4 {
            return Err(corrupt(format!("piece {key} is truncated")));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: the checkpoint's files are never modified once written (a save writes a new
        // directory); the mapping is read-only and dropped before returning.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(self.data_start + begin as u64)
                .len(len)
                .map(&self.file)
        }
        .map_err(|e| corrupt(format!("cannot map piece {key}: {e}")))?;
        Ok(map
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}
