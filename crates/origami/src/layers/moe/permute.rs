//! Token permutation around the experts: gather each token's k copies into rows grouped by
//! expert (token order inside an expert), and the weighted scatter-add back.
//!
//! `permute` is a gather, so its backward is a scatter-add of row gradients onto tokens;
//! `unpermute` is a weighted scatter-add, so its backward gathers `w·dy` per row and gives
//! the routing-weight gradient `⟨row output, dy⟩`. With token dropping, a dropped slot has no
//! row ([`DROPPED`]) and padding rows have no token ([`PADDING`]); both are skipped.

use super::router::Routing;
use crate::layers::stored::Stored;
use crate::profile::{scope, Phase};

/// `row_of_slot` entry of a slot dropped for capacity.
pub const DROPPED: usize = usize::MAX;
/// `token_of_row` entry of a padding row (zeros in, output ignored).
pub const PADDING: usize = usize::MAX;

/// Where each (token, choice) slot went: the expert-grouped row layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Permutation {
    /// Row of slot `t·k + j` in the permuted buffer.
    pub row_of_slot: Vec<usize>,
    /// Token of each permuted row.
    pub token_of_row: Vec<usize>,
    /// `offsets[e]..offsets[e+1]` are expert e's rows.
    pub offsets: Vec<usize>,
    /// Choices per token.
    pub topk: usize,
}

impl Permutation {
    /// Groups the slots of `routing` by expert, keeping token order inside each expert (dropless).
    pub fn new(routing: &Routing, experts: usize) -> Self {
        Self::build(routing, experts, &vec![true; routing.experts.len()], None)
    }

    /// Groups only the `kept` slots; with `padded_rows`, every expert gets exactly that many rows.
    pub fn with_capacity(
        routing: &Routing,
        experts: usize,
        kept: &[bool],
        padded_rows: Option<usize>,
    ) -> Self {
        Self::build(routing, experts, kept, padded_rows)
    }

    fn build(routing: &Routing, experts: usize, kept: &[bool], padded_rows: Option<usize>) -> Self {
        let _phase = scope(Phase::Permutation);
        let mut counts = vec![0usize; experts];
        for (slot, &e) in routing.experts.iter().enumerate() {
            counts[e as usize] += usize::from(kept[slot]);
        }
        let mut offsets = vec![0; experts + 1];
        for e in 0..experts {
            offsets[e + 1] = offsets[e] + padded_rows.unwrap_or(counts[e]);
        }
        let mut next = offsets.clone();
        let mut row_of_slot = vec![DROPPED; routing.experts.len()];
        let mut token_of_row = vec![PADDING; offsets[experts]];
        for (slot, &e) in routing.experts.iter().enumerate() {
            if kept[slot] {
                let row = next[e as usize];
                next[e as usize] += 1;
                row_of_slot[slot] = row;
                token_of_row[row] = slot / routing.topk;
            }
        }
        Permutation {
            row_of_slot,
            token_of_row,
            offsets,
            topk: routing.topk,
        }
    }

    /// Slots dropped for capacity.
    pub fn dropped(&self) -> usize {
        self.row_of_slot.iter().filter(|&&r| r == DROPPED).count()
    }
}

/// Gathers `x[tokens, width]` into the permuted rows.
pub fn permute<T: Copy + Default>(x: &[T], perm: &Permutation, width: usize) -> Vec<T> {
    let _phase = scope(Phase::Permutation);
    let mut out = vec![T::default(); perm.token_of_row.len() * width];
    for (row, &t) in out.chunks_mut(width).zip(&perm.token_of_row) {
        if t != PADDING {
            row.copy_from_slice(&x[t * width..(t + 1) * width]);
        }
    }
    out
}

/// Backward of [`permute`]: adds each row's gradient onto its token in `dx`.
pub fn permute_backward(dx: &mut [f32], d_rows: &[f32], perm: &Permutation, width: usize) {
    let _phase = scope(Phase::Permutation);
    for (row, &t) in d_rows
        .chunks(width)
        .zip(&perm.token_of_row)
        .filter(|(_, &t)| t != PADDING)
    {
        dx[t * width..(t + 1) * width]
            .iter_mut()
            .zip(row)
            .for_each(|(d, g)| *d += g);
    }
}

/// `y[t] = Σ_j weight[t,j] · rows[row_of_slot[t·k+j]]`.
pub fn unpermute(
    rows: &[f32],
    weights: &[f32],
    perm: &Permutation,
    width: usize,
    tokens: usize,
) -> Vec<f32> {
    let _phase = scope(Phase::Permutation);
    let mut y = vec![0.0; tokens * width];
    let k = perm.topk;
    for (slot, &row) in perm
        .row_of_slot
        .iter()
        .enumerate()
        .filter(|(_, &r)| r != DROPPED)
    {
        let (t, w) = (slot / k, weights[slot]);
        let src = &rows[row * width..(row + 1) * width];
        y[t * width..(t + 1) * width]
            .iter_mut()
            .zip(src)
            .for_each(|(o, v)| *o += w * v);
    }
    y
}

/// Backward of [`unpermute`]: returns the row gradients and the routing-weight gradients.
pub fn unpermute_backward(
    dy: &[f32],
    rows: &[f32],
    weights: &[f32],
    perm: &Permutation,
    width: usize,
) -> (Vec<f32>, Vec<f32>) {
    let _phase = scope(Phase::Permutation);
    let k = perm.topk;
    let mut d_rows = vec![0.0; rows.len()];
    let mut d_weights = vec![0.0; weights.len()];
    for (slot, &row) in perm
        .row_of_slot
        .iter()
        .enumerate()
        .filter(|(_, &r)| r != DROPPED)
    {
        let t = slot / k;
        let g = &dy[t * width..(t + 1) * width];
        let r = &rows[row * width..(row + 1) * width];
        d_weights[slot] = g.iter().zip(r).map(|(a, b)| a * b).sum();
        d_rows[row * width..(row + 1) * width]
            .iter_mut()
            .zip(g)
            .for_each(|(d, v)| *d = weights[slot] * v);
    }
    (d_rows, d_weights)
}

impl Stored for Permutation {
    fn stored_bytes(&self) -> usize {
        self.row_of_slot.stored_bytes()
            + self.token_of_row.stored_bytes()
            + self.offsets.stored_bytes()
    }
}
