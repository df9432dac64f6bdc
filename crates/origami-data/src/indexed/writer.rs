//! Writes an indexed dataset: sequences appended one by one, documents closed explicitly; both
//! files are written under temporary names and renamed when complete.

use super::{paths, HEADER_LEN, MAGIC, VERSION};
use crate::dtype::TokenDtype;
use crate::error::DataError;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Counts of a finished dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteSummary {
    /// Documents written.
    pub documents: usize,
    /// Sequences written.
    pub sequences: usize,
    /// Tokens written.
    pub tokens: u64,
    /// Bytes of `.bin` plus `.idx`.
    pub bytes: u64,
}

/// An indexed dataset being written.
pub struct IndexedWriter {
    dtype: TokenDtype,
    bin: BufWriter<std::fs::File>,
    bin_path: PathBuf,
    idx_path: PathBuf,
    tmp_bin: PathBuf,
    lengths: Vec<i32>,
    document_indices: Vec<i64>,
    tokens: u64,
    buffer: Vec<u8>,
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(s)
}

impl IndexedWriter {
    /// Starts `PREFIX.bin`/`PREFIX.idx` with tokens stored as `dtype`.
    pub fn create(prefix: &Path, dtype: TokenDtype) -> Result<Self, DataError> {
        let (bin_path, idx_path) = paths(prefix);
        if let Some(parent) = bin_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        }
        let tmp_bin = tmp_path(&bin_path);
        let file = std::fs::File::create(&tmp_bin).map_err(|e| DataError::io(&tmp_bin, e))?;
        Ok(IndexedWriter {
            dtype,
            bin: BufWriter::new(file),
            bin_path,
            idx_path,
            tmp_bin,
            lengths: Vec::new(),
            document_indices: vec![0],
            tokens: 0,
            buffer: Vec::new(),
        })
    }

    /// Appends one sequence of tokens.
    pub fn add_sequence(&mut self, tokens: &[u32]) -> Result<(), DataError> {
        self.buffer.clear();
        for &t in tokens {
            self.dtype.encode(t, &mut self.buffer).ok_or_else(|| {
                DataError::Invalid(format!(
                    "token id {t} does not fit the dataset's element type {:?}",
                    self.dtype
                ))
            })?;
        }
        let length = i32::try_from(tokens.len()).map_err(|_| {
            DataError::Invalid(format!(
                "a sequence of {} tokens exceeds the format's i32 length",
                tokens.len()
            ))
        })?;
        self.bin
            .write_all(&self.buffer)
            .map_err(|e| DataError::io(&self.tmp_bin, e))?;
        self.lengths.push(length);
        self.tokens += tokens.len() as u64;
        Ok(())
    }

    /// Closes the current document (its sequences are those added since the last close).
    pub fn end_document(&mut self) {
        self.document_indices.push(self.lengths.len() as i64);
    }

    /// Appends a document made of one sequence.
    pub fn add_document(&mut self, tokens: &[u32]) -> Result<(), DataError> {
        self.add_sequence(tokens)?;
        self.end_document();
        Ok(())
    }

    /// Writes the index and moves both files into place.
    pub fn finish(self) -> Result<WriteSummary, DataError> {
        let IndexedWriter {
            dtype,
            bin,
            bin_path,
            idx_path,
            tmp_bin,
            lengths,
            document_indices,
            tokens,
            ..
        } = self;
        let file = bin
            .into_inner()
            .map_err(|e| DataError::io(&tmp_bin, e.into_error()))?;
        file.sync_all().map_err(|e| DataError::io(&tmp_bin, e))?;
        let mut idx =
            Vec::with_capacity(HEADER_LEN + lengths.len() * 12 + document_indices.len() * 8);
        idx.extend_from_slice(MAGIC);
        idx.extend_from_slice(&VERSION.to_le_bytes());
        idx.push(dtype.code());
        idx.extend_from_slice(&(lengths.len() as u64).to_le_bytes());
        idx.extend_from_slice(&(document_indices.len() as u64).to_le_bytes());
        lengths
            .iter()
            .for_each(|l| idx.extend_from_slice(&l.to_le_bytes()));
        let mut pointer = 0i64;
        for &l in &lengths {
            idx.extend_from_slice(&pointer.to_le_bytes());
            pointer += l as i64 * dtype.size() as i64;
        }
        document_indices
            .iter()
            .for_each(|d| idx.extend_from_slice(&d.to_le_bytes()));
        let tmp_idx = tmp_path(&idx_path);
        std::fs::write(&tmp_idx, &idx).map_err(|e| DataError::io(&tmp_idx, e))?;
        std::fs::rename(&tmp_bin, &bin_path).map_err(|e| DataError::io(&bin_path, e))?;
        std::fs::rename(&tmp_idx, &idx_path).map_err(|e| DataError::io(&idx_path, e))?;
        Ok(WriteSummary {
            documents: document_indices.len() - 1,
            sequences: lengths.len(),
            tokens,
            bytes: pointer as u64 + idx.len() as u64,
        })
    }
}
