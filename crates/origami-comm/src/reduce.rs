//! Element-wise reduction shared by the backends: every sum is taken in rank order, so every
//! rank and every backend gets bitwise the same result.

use crate::ReduceOp;

/// An element type all-reduce can combine.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    /// Filler for scratch space that is overwritten before use.
    const ZERO: Self;
    /// `self op other`.
    fn combine(self, other: Self, op: ReduceOp) -> Self;
}

impl Element for f32 {
    const ZERO: f32 = 0.0;
    fn combine(self, other: f32, op: ReduceOp) -> f32 {
        match op {
            ReduceOp::Sum => self + other,
            ReduceOp::Max => self.max(other),
        }
    }
}

impl Element for u64 {
    const ZERO: u64 = 0;
    fn combine(self, other: u64, op: ReduceOp) -> u64 {
        match op {
            ReduceOp::Sum => self.wrapping_add(other),
            ReduceOp::Max => self.max(other),
        }
    }
}

/// The chunk `(start, len)` of `len` elements that rank `rank` of `size` reduces in all-reduce.
pub(crate) fn chunk(len: usize, size: usize, rank: usize) -> (usize, usize) {
    let start = len * rank / size;
    (start, len * (rank + 1) / size - start)
}

/// `target[i] = blocks[0][i] op blocks[1][i] op …`, combined in block (rank) order.
pub(crate) fn combine_into<'a, T: Element>(
    target: &mut [T],
    mut blocks: impl Iterator<Item = &'a [T]>,
    op: ReduceOp,
) {
    if let Some(first) = blocks.next() {
        target.copy_from_slice(first);
    }
    for block in blocks {
        for (sum, &value) in target.iter_mut().zip(block) {
            *sum = sum.combine(value, op);
        }
    }
}
