//! Where a rank's elements of a parameter lie in the global tensor, as hyper-rectangular blocks.
//!
//! A rank holds a [`Shard`] of a global tensor (per dimension, a list of global index ranges),
//! laid out row-major in its buffer; the distributed optimizer keeps only a contiguous range of
//! that local layout. [`placed_blocks`] cuts such a part into global blocks, each contiguous
//! along every dimension in both the global tensor and the local buffer, so that a block and a
//! checkpoint piece (also a block) meet in a block, copied row by row. A shard that keeps one
//! range per dimension is a block itself ([`Shard::as_block`]).

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::Shard;

/// A hyper-rectangle of a tensor: `offset[d] .. offset[d] + shape[d]` in each dimension.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Block {
    /// First index in each dimension.
    pub offset: Vec<usize>,
    /// Extent in each dimension.
    pub shape: Vec<usize>,
}

impl Block {
    /// Elements in the block.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the block has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The block both `self` and `other` cover, if any.
    pub fn intersect(&self, other: &Block) -> Option<Block> {
        let mut offset = Vec::with_capacity(self.offset.len());
        let mut shape = Vec::with_capacity(self.offset.len());
        for d in 0..self.offset.len() {
            let start = self.offset[d].max(other.offset[d]);
            let end = (self.offset[d] + self.shape[d]).min(other.offset[d] + other.shape[d]);
            if start >= end {
                return None;
            }
            offset.push(start);
            shape.push(end - start);
        }
        Some(Block { offset, shape })
    }

    /// Whether the block lies inside a tensor of `shape`.
    pub fn fits(&self, shape: &[usize]) -> bool {
        self.offset.len() == shape.len()
            && (0..shape.len()).all(|d| self.offset[d] + self.shape[d] <= shape[d])
    }
}

/// A global block of a rank's part of a tensor and where its first element sits in the rank's
/// local (row-major, `local_shape`) buffer; the block is contiguous there along every dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The block in global coordinates.
    pub block: Block,
    /// Local coordinates of the block's first element.
    pub local_offset: Vec<usize>,
}

/// The global blocks of the elements `flat` (a range of the local row-major order) of `shard`.
pub fn placed_blocks(shard: &Shard, flat: Range<usize>) -> Vec<Placed> {
    let local_shape = shard.local_shape();
    let ranges = shard.ranges();
    let mut placed = Vec::new();
    for local in flat_blocks(&local_shape, flat) {
        // Each dimension's local span may cross the boundaries of the shard's ranges: split it
        // into runs that are contiguous globally, then take every combination.
        let runs: Vec<Vec<(usize, usize, usize)>> = (0..local_shape.len())
            .map(|d| {
                local_runs(
                    &ranges[d],
                    local.offset[d]..local.offset[d] + local.shape[d],
                )
            })
            .collect();
        let mut combination = vec![0usize; runs.len()];
        loop {
            let mut block = Block {
                offset: Vec::with_capacity(runs.len()),
                shape: Vec::with_capacity(runs.len()),
            };
            let mut local_offset = Vec::with_capacity(runs.len());
            for (d, &k) in combination.iter().enumerate() {
                let (local_start, global_start, len) = runs[d][k];
                block.offset.push(global_start);
                block.shape.push(len);
                local_offset.push(local_start);
            }
            placed.push(Placed {
                block,
                local_offset,
            });
            let Some(d) = (0..runs.len())
                .rev()
                .find(|&d| combination[d] + 1 < runs[d].len())
            else {
                break;
            };
            combination[d] += 1;
            combination[d + 1..].iter_mut().for_each(|k| *k = 0);
        }
    }
    placed
}

/// The runs `(local start, global start, length)` of the local span `span` of one dimension
/// whose kept global ranges are `ranges` (concatenated in local order).
fn local_runs(ranges: &[Range<usize>], span: Range<usize>) -> Vec<(usize, usize, usize)> {
    let mut runs = Vec::new();
    let mut local = 0;
    for range in ranges {
        let (start, end) = (local.max(span.start), (local + range.len()).min(span.end));
        if start < end {
            runs.push((start, range.start + (start - local), end - start));
        }
        local += range.len();
    }
    runs
}

/// The row-major elements `flat` of a tensor of `shape`, as blocks: a partial first row, whole
/// rows, a partial last row, recursively per dimension.
pub fn flat_blocks(shape: &[usize], flat: Range<usize>) -> Vec<Block> {
    if flat.is_empty() {
        return Vec::new();
    }
    let Some((&rows, inner_shape)) = shape.split_first() else {
        return vec![Block {
            offset: Vec::new(),
            shape: Vec::new(),
        }];
    };
    let inner: usize = inner_shape.iter().product();
    if inner == 0 {
        return Vec::new();
    }
    let within_row = |row: usize, part: Range<usize>| -> Vec<Block> {
        flat_blocks(inner_shape, part)
            .into_iter()
            .map(|b| Block {
                offset: std::iter::once(row).chain(b.offset).collect(),
                shape: std::iter::once(1).chain(b.shape).collect(),
            })
            .collect()
    };
    let (first_row, first_at) = (flat.start / inner, flat.start % inner);
    let (last_row, last_at) = (flat.end / inner, flat.end % inner);
    debug_assert!(last_row < rows || (last_row == rows && last_at == 0));
    if first_row == last_row {
        return within_row(first_row, first_at..last_at);
    }
    let mut blocks = Vec::new();
    let mut whole_from = first_row;
    if first_at > 0 {
        blocks.extend(within_row(first_row, first_at..inner));
        whole_from += 1;
    }
    if last_row > whole_from {
        blocks.push(Block {
            offset: std::iter::once(whole_from)
                .chain(inner_shape.iter().map(|_| 0))
                .collect(),
            shape: std::iter::once(last_row - whole_from)
                .chain(inner_shape.iter().copied())
                .collect(),
        });
    }
    if last_at > 0 {
        blocks.extend(within_row(last_row, 0..last_at));
    }
    blocks
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// Calls `copy(from, to, len)` for every row (run along the last dimension) of `region`, with
/// `from` its offset in a row-major buffer holding `source` and `to` its offset in a row-major
/// buffer of `target_shape` whose element `region.offset` sits at `target_offset`.
pub fn for_each_row(
    region: &Block,
    source: &Block,
    target_shape: &[usize],
    target_offset: &[usize],
    mut copy: impl FnMut(usize, usize, usize),
) {
    let dims = region.shape.len();
    if region.is_empty() {
        return;
    }
    if dims == 0 {
        copy(0, 0, 1);
        return;
    }
    let (source_strides, target_strides) = (strides(&source.shape), strides(target_shape));
    let row_len = region.shape[dims - 1];
    let rows: usize = region.shape[..dims - 1].iter().product();
    let mut index = vec![0usize; dims - 1];
    for _ in 0..rows {
        let mut from = 0;
        let mut to = 0;
        for d in 0..dims {
            let i = if d + 1 < dims { index[d] } else { 0 };
            from += (region.offset[d] + i - source.offset[d]) * source_strides[d];
            to += (target_offset[d] + i) * target_strides[d];
        }
        copy(from, to, row_len);
        for d in (0..dims - 1).rev() {
            index[d] += 1;
            if index[d] < region.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The global flat index of every element of `placed`, in local order of `shard`.
    fn covered(shard: &Shard, global_shape: &[usize], placed: &[Placed]) -> Vec<(usize, usize)> {
        let gs = strides(global_shape);
        let mut out = Vec::new();
        for p in placed {
            let source = p.block.clone();
            for_each_row(
                &p.block,
                &source,
                &shard.local_shape(),
                &p.local_offset,
                |from, to, len| {
                    for k in 0..len {
                        // Recover the global index from the source offset within the block.
                        let mut rest = from + k;
                        let mut global = 0;
                        for (d, &s) in strides(&source.shape).iter().enumerate() {
                            global += (source.offset[d] + rest / s) * gs[d];
                            rest %= s;
                        }
                        out.push((to + k, global));
                    }
                },
            );
        }
        out.sort();
        out
    }

    #[test]
    fn blocks_of_a_shard_cover_exactly_its_elements_in_place() {
        // [experts 4, rows 6, cols 5]: experts 1..3, rows {0..1, 3..5} (gate and up halves of
        // an etp slice), all columns — the shape of a fused expert projection's shard.
        let global_shape = [4, 6, 5];
        let experts = std::iter::once(1..3).collect();
        let shard = Shard::full(&global_shape)
            .and(0, experts)
            .and(1, vec![0..1, 3..5]);
        let expected = shard.global_indices(&global_shape);
        let n = expected.len();
        for flat in [0..n, 3..n - 2, 7..8, 0..0, 11..29] {
            let placed = placed_blocks(&shard, flat.clone());
            let got = covered(&shard, &global_shape, &placed);
            let want: Vec<(usize, usize)> = flat.clone().map(|i| (i, expected[i])).collect();
            assert_eq!(got, want, "flat {flat:?}");
        }
    }

    #[test]
    fn flat_ranges_become_few_blocks() {
        let blocks = flat_blocks(&[4, 3, 5], 7..52);
        let total: usize = blocks.iter().map(Block::len).sum();
        assert_eq!(total, 45);
        assert!(blocks.len() <= 5, "{blocks:?}");
        assert_eq!(flat_blocks(&[4, 3, 5], 0..60).len(), 1);
    }

    #[test]
    fn blocks_intersect_as_boxes() {
        let a = Block {
            offset: vec![0, 2],
            shape: vec![4, 4],
        };
        let b = Block {
            offset: vec![3, 0],
            shape: vec![3, 3],
        };
        assert_eq!(
            a.intersect(&b),
            Some(Block {
                offset: vec![3, 2],
                shape: vec![1, 1]
            })
        );
        let c = Block {
            offset: vec![4, 0],
            shape: vec![1, 9],
        };
        assert_eq!(a.intersect(&c), None);
    }
}
