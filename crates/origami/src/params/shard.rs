//! The part of a parameter's global tensor one rank holds, and how local elements map to global
//! indices.

use std::ops::Range;

/// The part of a parameter's global tensor one rank holds: for each dimension, the global index
/// ranges it keeps, concatenated in order. A fused `[gate; up]` projection split over expert
/// tensor-parallel ranks keeps two ranges of its rows; a full tensor keeps `0..len` everywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    ranges: Vec<Vec<Range<usize>>>,
}

impl Shard {
    /// The whole tensor of `shape`.
    pub fn full(shape: &[usize]) -> Self {
        Shard {
            ranges: shape
                .iter()
                .map(|&n| std::iter::once(0..n).collect())
                .collect(),
        }
    }

    /// The whole tensor except dimension `dim`, of which only `ranges` are kept.
    pub fn along(shape: &[usize], dim: usize, ranges: Vec<Range<usize>>) -> Self {
        let mut shard = Shard::full(shape);
        shard.ranges[dim] = ranges;
        shard
    }

    /// Further restricts dimension `dim` to `ranges`.
    pub fn and(mut self, dim: usize, ranges: Vec<Range<usize>>) -> Self {
        self.ranges[dim] = ranges;
        self
    }

    /// The kept global index ranges of each dimension, concatenated in local order.
    pub fn ranges(&self) -> &[Vec<Range<usize>>] {
        &self.ranges
    }

    /// The shard as one block, when it keeps a single range of every dimension.
    pub fn as_block(&self) -> Option<super::region::Block> {
        let ranges: Option<Vec<&Range<usize>>> = self
            .ranges
            .iter()
            .map(|r| (r.len() == 1).then(|| &r[0]))
            .collect();
        let ranges = ranges?;
        Some(super::region::Block {
            offset: ranges.iter().map(|r| r.start).collect(),
            shape: ranges.iter().map(|r| r.len()).collect(),
        })
    }

    /// Shape of the local part.
    pub fn local_shape(&self) -> Vec<usize> {
        self.ranges
            .iter()
            .map(|r| r.iter().map(|r| r.len()).sum())
            .collect()
    }

    /// Global row-major index of every local element, in local row-major order.
    pub fn global_indices(&self, global_shape: &[usize]) -> Vec<usize> {
        let mut indices = vec![0usize];
        for (ranges, &extent) in self.ranges.iter().zip(global_shape) {
            let kept: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
            indices = indices
                .iter()
                .flat_map(|&base| kept.iter().map(move |&i| base * extent + i))
                .collect();
        }
        indices
    }

    /// This shard's elements of the full tensor `full` of `global_shape`.
    pub fn extract(&self, global_shape: &[usize], full: &[f32]) -> Vec<f32> {
        self.global_indices(global_shape)
            .into_iter()
            .map(|i| full[i])
            .collect()
    }
}
