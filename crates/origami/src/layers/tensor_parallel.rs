//! Tensor parallelism with sequence parallelism (Megatron-style).
//!
//! Inside a parallel region (attention, dense and shared-expert MLPs, the output layer) every
//! rank of the tp group holds every token of the micro-batch's context-parallel part and a
//! slice of the weights: column-parallel linears keep a slice of the output features (heads,
//! hidden units, vocabulary), row-parallel linears a slice of the input features and produce
//! partial sums. Outside (norms, residuals, routers) each rank holds only its slice of the
//! tokens: for every sequence, an equal run of consecutive rows. Entering a region all-gathers
//! the slices ([`TensorParallel::gather_sequence`]); leaving it reduce-scatters the partial
//! sums back to slices ([`TensorParallel::scatter_sequence`]). Each is the other's backward.
//!
//! Row order: a sequence-parallel slice is `[batch][part]`, the gathered tokens
//! `[batch][tp · part]` (rank-major inside each sequence), so a sequence's tokens stay in order.
//!
//! In bf16 the gather that makes a region's GEMM input travels in bf16
//! ([`TensorParallel::gather_activation`]): each rank rounds its slice, and the group gathers
//! half the bytes. Rounding is per element, so the result is exactly the rounded f32 gather.
//! Partial sums and gradients travel in f32.

use std::ops::Range;
use std::sync::Arc;

use origami_comm::{Communicator, ReduceOp, SoloComm};

use crate::compute::{round_to_words, words_as_bf16, Activation, Weights};
use crate::layers::comm_ok;
use crate::profile::{scope, Phase};

/// The tensor-parallel group of a rank and the sequence-parallel data movement over it.
#[derive(Clone)]
pub struct TensorParallel {
    group: Arc<dyn Communicator>,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorParallel {{ {}/{} }}", self.rank(), self.size())
    }
}

impl TensorParallel {
    /// Tensor parallelism over `group`.
    pub fn new(group: Arc<dyn Communicator>) -> Self {
        TensorParallel { group }
    }

    /// One rank: weights whole, no communication.
    pub fn single() -> Self {
        Self::new(SoloComm::shared(0))
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// The group's communicator.
    pub fn group(&self) -> &Arc<dyn Communicator> {
        &self.group
    }

    /// This rank's equal part of `n` items (heads, hidden units, vocabulary rows). The model
    /// checks divisibility when it is built.
    pub fn part(&self, n: usize) -> Range<usize> {
        let size = n / self.size();
        self.rank() * size..(self.rank() + 1) * size
    }

    /// `part(n)` shifted by `offset`: the same slice of a block that starts at `offset` in a
    /// fused tensor (e.g. the k heads after the q heads).
    pub fn part_at(&self, offset: usize, n: usize) -> Range<usize> {
        let part = self.part(n);
        offset + part.start..offset + part.end
    }

    /// All-gathers sequence-parallel slices `[batch][part][width]` into every token of the
    /// sequences, `[batch][tp · part][width]`.
    pub fn gather_sequence(&self, local: Vec<f32>, batch: usize, width: usize) -> Vec<f32> {
        let _phase = scope(Phase::CommSequence);
        let tp = self.size();
        if tp == 1 {
            return local;
        }
        let mut by_rank = vec![0.0; local.len() * tp];
        comm_ok(
            self.group
                .all_gather_v(&local, &vec![local.len(); tp], &mut by_rank),
        );
        reorder(
            &by_rank,
            tp,
            batch,
            local.len() / batch.max(1) / width,
            width,
            true,
        )
    }

    /// All-gathers sequence-parallel slices `[batch][part][width]` as the GEMM input of a
    /// parallel region, in the precision of `params`: f32 as [`Self::gather_sequence`]; in
    /// bf16 the slices are rounded first and gathered in bf16, two values to a word of the
    /// communicator, so the group moves half the bytes.
    pub fn gather_activation(
        &self,
        params: &Weights,
        local: Vec<f32>,
        batch: usize,
        width: usize,
    ) -> Activation {
        let tp = self.size();
        if tp == 1 || !params.compute().is_bf16() || !local.len().is_multiple_of(2) {
            return params.activation(self.gather_sequence(local, batch, width));
        }
        let send = round_to_words(&local);
        let _phase = scope(Phase::CommSequence);
        let mut by_rank = vec![0.0f32; send.len() * tp];
        comm_ok(
            self.group
                .all_gather_v(&send, &vec![send.len(); tp], &mut by_rank),
        );
        Activation::Bf16(reorder(
            words_as_bf16(&by_rank),
            tp,
            batch,
            local.len() / batch.max(1) / width,
            width,
            true,
        ))
    }

    /// Sums partial results `[batch][tp · part][width]` over the group and keeps this rank's
    /// slice `[batch][part][width]` of each sequence.
    pub fn scatter_sequence(&self, full: Vec<f32>, batch: usize, width: usize) -> Vec<f32> {
        let _phase = scope(Phase::CommSequence);
        let tp = self.size();
        if tp == 1 {
            return full;
        }
        let part = full.len() / batch.max(1) / width / tp;
        let by_rank = reorder(&full, tp, batch, part, width, false);
        let mut local = vec![0.0; full.len() / tp];
        comm_ok(
            self.group
                .reduce_scatter_v(&by_rank, &vec![local.len(); tp], &mut local),
        );
        local
    }

    /// Sums `values` over the group in place.
    pub fn all_reduce(&self, values: &mut [f32], op: ReduceOp) {
        let _phase = scope(Phase::CommSequence);
        if self.size() > 1 {
            comm_ok(self.group.all_reduce(values, op));
        }
    }
}

/// Converts between rank-major `[tp][batch][part][width]` and sequence-major
/// `[batch][tp][part][width]` row orders (`to_sequence_major` chooses the direction).
fn reorder<T: Copy + Default>(
    data: &[T],
    tp: usize,
    batch: usize,
    part: usize,
    width: usize,
    to_sequence_major: bool,
) -> Vec<T> {
    let run = part * width;
    let mut out = vec![T::default(); data.len()];
    for r in 0..tp {
        for b in 0..batch {
            let rank_major = (r * batch + b) * run;
            let sequence_major = (b * tp + r) * run;
            let (from, to) = if to_sequence_major {
                (rank_major, sequence_major)
            } else {
                (sequence_major, rank_major)
            };
            out[to..to + run].copy_from_slice(&data[from..from + run]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::reorder;

    #[test]
    fn reorder_round_trips_and_interleaves_sequences() {
        let data: Vec<f32> = (0..24).map(|v| v as f32).collect();
        // tp 2, batch 3, part 2, width 2: rank 0's sequence 1 (elements 4..8) comes second.
        let seq_major = reorder(&data, 2, 3, 2, 2, true);
        assert_eq!(&seq_major[..8], &[0., 1., 2., 3., 12., 13., 14., 15.]);
        assert_eq!(reorder(&seq_major, 2, 3, 2, 2, false), data);
    }
}
