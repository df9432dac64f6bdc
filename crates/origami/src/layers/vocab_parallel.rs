//! Vocabulary-parallel embedding and cross-entropy: each rank of the tp group holds an equal,
//! contiguous slice of the vocabulary rows of the embedding table and of the output layer.
//!
//! Embedding: a rank writes the rows of the tokens in its slice and zeros elsewhere; the
//! partial rows are reduce-scattered to sequence-parallel slices by the caller (their sum is
//! the full lookup). Cross-entropy works on each rank's logit columns and never gathers them:
//! per row, the maximum logit is all-reduced (max), then the sum of `e^(x − max)` and the target
//! logit (held by one rank) are all-reduced (sum), giving `lse` and `ce = lse − x_y` on every
//! rank; the gradient `scale·(softmax − onehot)` of the local columns needs nothing more.

use std::ops::Range;

use origami_comm::ReduceOp;
use origami_kernels::cross_entropy::{CrossEntropySums, IGNORE_TARGET};
use origami_kernels::math::fast_exp;
use rayon::prelude::*;

use crate::layers::tensor_parallel::TensorParallel;
use crate::profile::{scope, Phase};

/// A vocabulary split over a tensor-parallel group.
#[derive(Clone, Debug)]
pub struct VocabParallel {
    tp: TensorParallel,
    vocab: usize,
}

impl VocabParallel {
    /// `vocab` rows split over `tp` (the model checks divisibility).
    pub fn new(tp: TensorParallel, vocab: usize) -> Self {
        VocabParallel { tp, vocab }
    }

    /// The vocabulary rows this rank holds.
    pub fn range(&self) -> Range<usize> {
        self.tp.part(self.vocab)
    }

    /// Rows this rank holds.
    pub fn local_vocab(&self) -> usize {
        self.vocab / self.tp.size()
    }

    /// This rank's part of the embedding of `tokens`: `[tokens, width]`, zero rows for tokens
    /// outside its slice of `table_local`.
    pub fn embed(&self, table_local: &[f32], tokens: &[u32], width: usize) -> Vec<f32> {
        let _phase = scope(Phase::Elementwise);
        let range = self.range();
        let mut out = vec![0.0; tokens.len() * width];
        out.par_chunks_mut(width)
            .zip(tokens.par_iter())
            .for_each(|(row, &t)| {
                let t = t as usize;
                if range.contains(&t) {
                    let local = t - range.start;
                    row.copy_from_slice(&table_local[local * width..(local + 1) * width]);
                }
            });
        out
    }

    /// Accumulates the gradient `dout[tokens, width]` of every token into the rows of this
    /// rank's slice `dtable_local`.
    pub fn embed_backward(
        &self,
        dtable_local: &mut [f32],
        dout: &[f32],
        tokens: &[u32],
        width: usize,
    ) {
        let _phase = scope(Phase::Elementwise);
        let range = self.range();
        for (row, &t) in dout.chunks(width).zip(tokens) {
            let t = t as usize;
            if range.contains(&t) {
                let local = t - range.start;
                dtable_local[local * width..(local + 1) * width]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(d, g)| *d += g);
            }
        }
    }

    /// Per row of this rank's logit columns `logits[rows, local_vocab]`: the row's global
    /// log-sum-exp and target logit (both 0 for ignored rows).
    fn row_statistics(&self, logits: &[f32], targets: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let v = self.local_vocab();
        let range = self.range();
        let rows = targets.len();
        let mut max: Vec<f32> = logits
            .par_chunks(v)
            .map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .collect();
        self.tp.all_reduce(&mut max, ReduceOp::Max);
        // One message: the rows' sums of exponentials, then their target logits.
        let mut sums = vec![0.0f32; 2 * rows];
        let (exp_sums, target_logits) = sums.split_at_mut(rows);
        logits
            .par_chunks(v)
            .zip(exp_sums.par_iter_mut())
            .zip(max.par_iter())
            .for_each(|((row, sum), &m)| *sum = row.iter().map(|&x| fast_exp(x - m)).sum());
        for ((row, &t), logit) in logits.chunks(v).zip(targets).zip(target_logits.iter_mut()) {
            let t = t as usize;
            if t != IGNORE_TARGET as usize && range.contains(&t) {
                *logit = row[t - range.start];
            }
        }
        self.tp.all_reduce(&mut sums, ReduceOp::Sum);
        let lse = sums[..rows]
            .iter()
            .zip(&max)
            .map(|(&s, &m)| m + s.ln())
            .collect();
        (lse, sums[rows..].to_vec())
    }

    /// Per-row cross-entropy from this rank's logit columns (forward only); ignored rows give 0.
    pub fn cross_entropy_rows(&self, logits: &[f32], targets: &[u32]) -> Vec<f32> {
        let _phase = scope(Phase::Loss);
        let (lse, target_logits) = self.row_statistics(logits, targets);
        targets
            .iter()
            .zip(lse.iter().zip(&target_logits))
            .map(|(&t, (&l, &x))| if t == IGNORE_TARGET { 0.0 } else { l - x })
            .collect()
    }

    /// Loss sums of the rows (identical on every rank of the group) and `dL/dlogits` of this
    /// rank's columns written over `logits`, for the loss `scale · Σ ce`.
    pub fn cross_entropy_forward_backward(
        &self,
        logits: &mut [f32],
        targets: &[u32],
        scale: f32,
    ) -> CrossEntropySums {
        let _phase = scope(Phase::Loss);
        let v = self.local_vocab();
        assert_eq!(
            logits.len(),
            targets.len() * v,
            "logits and targets disagree"
        );
        let (lse, target_logits) = self.row_statistics(logits, targets);
        let range = self.range();
        let mut sums = CrossEntropySums::default();
        for (((row, &t), &l), &x) in logits
            .chunks_mut(v)
            .zip(targets)
            .zip(&lse)
            .zip(&target_logits)
        {
            if t == IGNORE_TARGET {
                row.fill(0.0);
                continue;
            }
            row.iter_mut().for_each(|g| *g = fast_exp(*g - l) * scale);
            let t = t as usize;
            if range.contains(&t) {
                row[t - range.start] -= scale;
            }
            sums.cross_entropy += (l - x) as f64;
            sums.z_squared += (l * l) as f64;
            sums.rows += 1;
        }
        sums
    }
}
