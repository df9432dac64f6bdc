//! GPT training samples from an indexed dataset.
//!
//! The documents are split into train / validation / test by contiguous document ranges, sized
//! by weights (`"949,50,1"`, Megatron's rule: boundary `k` is the rounded cumulative share of
//! the document count). A split's documents are joined into one token stream; a document whose
//! last token is not the end-of-document token gets one appended (so data prepared with or
//! without `--append-eod` gives the same stream). Sample `j` is the window
//! `stream[j·seq_len .. j·seq_len + seq_len + 1]` (consecutive samples share one token).
//! Global sample `i` is window `perm_e(i mod n)` of epoch `e = i / n`, where `perm_e` is a keyed
//! permutation of the `n` windows: the order depends only on (seed, global sample index).

use crate::error::DataError;
use crate::indexed::IndexedDataset;
use crate::permutation::Permutation;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// Which part of the documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training documents.
    Train,
    /// Validation documents.
    Valid,
    /// Test documents.
    Test,
}

/// The document ranges of the three splits for weights like `"12,1,0"`.
pub fn split_documents(documents: usize, weights: &str) -> Result<[Range<usize>; 3], DataError> {
    let parsed: Vec<f64> = weights
        .split(',')
        .map(|w| w.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            DataError::Invalid(format!(
                "data.split = {weights:?}: expected three comma-separated non-negative numbers"
            ))
        })?;
    let total: f64 = parsed.iter().sum();
    if parsed.len() != 3 || parsed.iter().any(|w| *w < 0.0 || !w.is_finite()) || total <= 0.0 {
        return Err(DataError::Invalid(format!(
            "data.split = {weights:?}: expected three non-negative weights with a positive sum"
        )));
    }
    let mut bounds = [0usize; 4];
    let mut cumulative = 0.0;
    for (k, w) in parsed.iter().enumerate() {
        cumulative += w / total;
        bounds[k + 1] = ((cumulative * documents as f64).round() as usize).min(documents);
    }
    bounds[3] = documents;
    Ok([
        bounds[0]..bounds[1],
        bounds[1]..bounds[2],
        bounds[2]..bounds[3],
    ])
}

/// A piece of the joined stream: a stored sequence or an inserted end-of-document token.
#[derive(Clone, Copy, Debug)]
enum Piece {
    Sequence(usize),
    EndOfDocument,
}

/// Shuffled GPT samples of one split.
pub struct GptDataset {
    data: Arc<IndexedDataset>,
    pieces: Vec<Piece>,
    starts: Vec<u64>,
    tokens: u64,
    eod: u32,
    seq_len: usize,
    seed: u64,
    windows: u64,
}

impl GptDataset {
    /// Samples of `seq_len + 1` tokens from `split` of `data`.
    pub fn new(
        data: Arc<IndexedDataset>,
        split: Split,
        split_weights: &str,
        seq_len: usize,
        seed: u64,
        eod: u32,
    ) -> Result<Self, DataError> {
        let ranges = split_documents(data.num_documents(), split_weights)?;
        let documents = ranges[split as usize].clone();
        let mut pieces = Vec::new();
        let mut starts = Vec::new();
        let mut tokens = 0u64;
        let mut last = Vec::with_capacity(1);
        for d in documents.clone() {
            let sequences = data.document_sequences(d);
            let mut ends_with_eod = false;
            for s in sequences {
                let len = data.sequence_len(s);
                if len == 0 {
                    continue;
                }
                pieces.push(Piece::Sequence(s));
                starts.push(tokens);
                tokens += len as u64;
                last.clear();
                data.read_into(s, len - 1..len, &mut last)?;
                ends_with_eod = last[0] == eod;
            }
            if !ends_with_eod {
                pieces.push(Piece::EndOfDocument);
                starts.push(tokens);
                tokens += 1;
            }
        }
        let windows = tokens.saturating_sub(1) / seq_len as u64;
        if windows == 0 {
            return Err(DataError::Invalid(format!(
                "the {split:?} split (documents {documents:?}) has {tokens} tokens, too few for one sample of {} tokens",
                seq_len + 1
            )));
        }
        Ok(GptDataset {
            data,
            pieces,
            starts,
            tokens,
            eod,
            seq_len,
            seed,
            windows,
        })
    }

    /// Opens `prefix` and builds the samples of `split`.
    pub fn open(
        prefix: &Path,
        split: Split,
        split_weights: &str,
        seq_len: usize,
        seed: u64,
        eod: u32,
    ) -> Result<Self, DataError> {
        Self::new(
            Arc::new(IndexedDataset::open(prefix)?),
            split,
            split_weights,
            seq_len,
            seed,
            eod,
        )
    }

    /// Distinct samples (windows) per epoch.
    pub fn len(&self) -> u64 {
        self.windows
    }

    /// Whether there are no samples (never true for a constructed dataset).
    pub fn is_empty(&self) -> bool {
        self.windows == 0
    }

    /// Tokens in the joined stream of this split.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Writes global sample `index` (any value; epochs wrap) into `out` (`seq_len + 1` tokens).
    pub fn sample_into(&self, index: u64, out: &mut [u32]) -> Result<(), DataError> {
        assert_eq!(
            out.len(),
            self.seq_len + 1,
            "sample buffer must hold seq_len + 1 tokens"
        );
        let epoch = index / self.windows;
        let window = Permutation::new(
            self.windows,
            self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
        .apply(index % self.windows);
        self.read_stream(window * self.seq_len as u64, out)
    }

    fn read_stream(&self, start: u64, out: &mut [u32]) -> Result<(), DataError> {
        let mut piece = self.starts.partition_point(|&s| s <= start) - 1;
        let mut position = start;
        let mut filled = 0;
        let mut buffer = Vec::new();
        while filled < out.len() {
            let offset = (position - self.starts[piece]) as usize;
            match self.pieces[piece] {
                Piece::EndOfDocument => {
                    out[filled] = self.eod;
                    filled += 1;
                }
                Piece::Sequence(s) => {
                    let take = (self.data.sequence_len(s) - offset).min(out.len() - filled);
                    buffer.clear();
                    self.data.read_into(s, offset..offset + take, &mut buffer)?;
                    out[filled..filled + take].copy_from_slice(&buffer);
                    filled += take;
                }
            }
            position = self.starts.get(piece + 1).copied().unwrap_or(self.tokens);
            piece += 1;
        }
        Ok(())
    }
}
