//! Reads an indexed dataset: the index is parsed and checked in full, the tokens are
//! memory-mapped. Every size, pointer and document index is validated against the actual file
//! lengths, so truncated or corrupt files give an error naming the file and the numbers.

use super::{paths, HEADER_LEN, MAGIC, VERSION};
use crate::dtype::TokenDtype;
use crate::error::DataError;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An opened indexed dataset.
pub struct IndexedDataset {
    bin_path: PathBuf,
    dtype: TokenDtype,
    lengths: Vec<u32>,
    pointers: Vec<u64>,
    document_indices: Vec<usize>,
    bin: memmap2::Mmap,
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

impl IndexedDataset {
    /// Opens `PREFIX.idx` and `PREFIX.bin`.
    pub fn open(prefix: &Path) -> Result<Self, DataError> {
        let (bin_path, idx_path) = paths(prefix);
        let idx = std::fs::read(&idx_path).map_err(|e| DataError::io(&idx_path, e))?;
        let corrupt = |problem: String| DataError::corrupt(&idx_path, problem);
        if idx.len() < HEADER_LEN {
            return Err(corrupt(format!(
                "truncated header: {} bytes, the header alone needs {HEADER_LEN}",
                idx.len()
            )));
        }
        if &idx[..9] != MAGIC {
            return Err(corrupt(format!(
                "bad magic {:?}, expected MMIDIDX\\0\\0 (not a Megatron index file)",
                &idx[..9]
            )));
        }
        let version = u64_at(&idx, 9);
        if version != VERSION {
            return Err(corrupt(format!(
                "index version {version}, this reader knows version {VERSION}"
            )));
        }
        let code = idx[17];
        let dtype = TokenDtype::from_code(code)
            .ok_or_else(|| corrupt(format!("unknown dtype code {code} (known: 1..=8)")))?;
        if matches!(dtype, TokenDtype::F32 | TokenDtype::F64) {
            return Err(corrupt(format!(
                "dtype code {code} is a float type; token datasets hold integers"
            )));
        }
        let sequences = u64_at(&idx, 18);
        let doc_entries = u64_at(&idx, 26);
        let expected = (sequences as u128) * 12 + (doc_entries as u128) * 8 + HEADER_LEN as u128;
        if expected != idx.len() as u128 {
            return Err(corrupt(format!(
                "{sequences} sequences and {doc_entries} document indices need {expected} bytes, the file has {}",
                idx.len()
            )));
        }
        let s = sequences as usize;
        let lengths_at = HEADER_LEN;
        let pointers_at = lengths_at + 4 * s;
        let docs_at = pointers_at + 8 * s;
        let mut lengths = Vec::with_capacity(s);
        for i in 0..s {
            let l = i32::from_le_bytes(
                idx[lengths_at + 4 * i..lengths_at + 4 * i + 4]
                    .try_into()
                    .expect("4 bytes"),
            );
            lengths.push(
                u32::try_from(l)
                    .map_err(|_| corrupt(format!("sequence {i} has negative length {l}")))?,
            );
        }
        let pointers: Vec<u64> = (0..s)
            .map(|i| {
                i64::from_le_bytes(
                    idx[pointers_at + 8 * i..pointers_at + 8 * i + 8]
                        .try_into()
                        .expect("8 bytes"),
                )
            })
            .map(|p| p as u64)
            .collect();
        let document_indices: Vec<usize> = (0..doc_entries as usize)
            .map(|i| {
                i64::from_le_bytes(
                    idx[docs_at + 8 * i..docs_at + 8 * i + 8]
                        .try_into()
                        .expect("8 bytes"),
                ) as usize
            })
            .collect();
        if document_indices.first() != Some(&0)
            || document_indices.last() != Some(&s)
            || document_indices.windows(2).any(|w| w[0] > w[1])
        {
            return Err(corrupt(format!(
                "document indices must rise from 0 to the sequence count {s}; found first {:?}, last {:?}",
                document_indices.first(),
                document_indices.last()
            )));
        }
        let bin_file = std::fs::File::open(&bin_path).map_err(|e| DataError::io(&bin_path, e))?;
        let bin_len = bin_file
            .metadata()
            .map_err(|e| DataError::io(&bin_path, e))?
            .len();
        for i in 0..s {
            let end = pointers[i] as u128 + lengths[i] as u128 * dtype.size() as u128;
            if end > bin_len as u128 {
                return Err(DataError::corrupt(
                    &bin_path,
                    format!("sequence {i} spans bytes {}..{end} but the file has {bin_len} (truncated .bin or wrong .idx)", pointers[i] as i64),
                ));
            }
        }
        // SAFETY: the file is opened read-only; the dataset keeps the map for its lifetime and
        // never hands out references that outlive it.
        let bin =
            unsafe { memmap2::Mmap::map(&bin_file) }.map_err(|e| DataError::io(&bin_path, e))?;
        Ok(IndexedDataset {
            bin_path,
            dtype,
            lengths,
            pointers,
            document_indices,
            bin,
        })
    }

    /// Element type of the tokens.
    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// Number of sequences.
    pub fn num_sequences(&self) -> usize {
        self.lengths.len()
    }

    /// Number of documents.
    pub fn num_documents(&self) -> usize {
        self.document_indices.len() - 1
    }

    /// Tokens in sequence `i`.
    pub fn sequence_len(&self, i: usize) -> usize {
        self.lengths[i] as usize
    }

    /// The sequences of document `d`.
    pub fn document_sequences(&self, d: usize) -> Range<usize> {
        self.document_indices[d]..self.document_indices[d + 1]
    }

    /// Appends tokens `range` (positions inside sequence `i`) to `out`.
    pub fn read_into(
        &self,
        i: usize,
        range: Range<usize>,
        out: &mut Vec<u32>,
    ) -> Result<(), DataError> {
        let size = self.dtype.size();
        assert!(
            range.end <= self.sequence_len(i),
            "token range beyond sequence {i}"
        );
        let start = self.pointers[i] as usize + range.start * size;
        for chunk in self.bin[start..start + range.len() * size].chunks_exact(size) {
            let token = self.dtype.decode(chunk).ok_or_else(|| {
                DataError::corrupt(
                    &self.bin_path,
                    format!("sequence {i} holds a negative or oversized token id"),
                )
            })?;
            out.push(token);
        }
        Ok(())
    }

    /// All tokens of sequence `i`.
    pub fn sequence(&self, i: usize) -> Result<Vec<u32>, DataError> {
        let mut out = Vec::with_capacity(self.sequence_len(i));
        self.read_into(i, 0..self.sequence_len(i), &mut out)?;
        Ok(out)
    }
}
