//! The optimizer's collectives, issued in buckets of at most a fixed number of elements, and the
//! bytes each rank sends in them as a ring algorithm would: all-reduce `2·(n−1)/n·bytes`,
//! reduce-scatter and all-gather `(n−1)/n·bytes` of the whole (unscattered) buffer.

use std::ops::Range;

use crate::profile::{scope, Phase};
use origami_comm::{Communicator, ReduceOp, Result};

use super::layout::block;

/// Issues bucketed collectives and counts the bytes sent.
#[derive(Clone, Copy, Debug)]
pub(super) struct Buckets {
    /// Most elements in one collective call.
    pub elements: usize,
    /// Bytes sent so far.
    pub bytes_sent: u64,
}

impl Buckets {
    /// Sums `buf` over `comm`, in place.
    pub fn all_reduce(&mut self, comm: &dyn Communicator, buf: &mut [f32]) -> Result<()> {
        let _phase = scope(Phase::CommGradients);
        for chunk in buf.chunks_mut(self.elements) {
            comm.all_reduce(chunk, ReduceOp::Sum)?;
            self.count(comm, 2 * chunk.len());
        }
        Ok(())
    }

    /// Sums `send` (the whole buffer) over `comm` and leaves block `comm.rank()` of `counts` in
    /// `recv`. Each bucket of `send` is reduce-scattered by its overlap with the ranks' blocks.
    pub fn reduce_scatter(
        &mut self,
        comm: &dyn Communicator,
        send: &[f32],
        counts: &[usize],
        recv: &mut [f32],
    ) -> Result<()> {
        let _phase = scope(Phase::CommGradients);
        let mine = block(counts, comm.rank());
        for bucket in self.bucket_ranges(send.len()) {
            let (bucket_counts, local) = overlaps(counts, &bucket, &mine);
            comm.reduce_scatter_v(&send[bucket.clone()], &bucket_counts, &mut recv[local])?;
            self.count(comm, bucket.len());
        }
        Ok(())
    }

    /// Gathers every rank's block of `counts` (`send` is this rank's) into `recv`, the whole
    /// buffer, bucket by bucket as [`Buckets::reduce_scatter`] scatters.
    pub fn all_gather(
        &mut self,
        comm: &dyn Communicator,
        send: &[f32],
        counts: &[usize],
        recv: &mut [f32],
    ) -> Result<()> {
        let _phase = scope(Phase::CommGradients);
        let mine = block(counts, comm.rank());
        for bucket in self.bucket_ranges(recv.len()) {
            let (bucket_counts, local) = overlaps(counts, &bucket, &mine);
            comm.all_gather_v(&send[local], &bucket_counts, &mut recv[bucket.clone()])?;
            self.count(comm, bucket.len());
        }
        Ok(())
    }

    fn bucket_ranges(&self, len: usize) -> impl Iterator<Item = Range<usize>> {
        let step = self.elements;
        (0..len)
            .step_by(step)
            .map(move |start| start..(start + step).min(len))
    }

    /// Adds `(n−1)/n` of `elements` f32s for a group of `n`.
    fn count(&mut self, comm: &dyn Communicator, elements: usize) {
        let n = comm.size() as u64;
        self.bytes_sent += (n - 1) * (elements * std::mem::size_of::<f32>()) as u64 / n;
    }
}

/// Each rank's share of `bucket` (its block of `counts` intersected with the bucket), and the
/// part of this rank's block `mine` the bucket covers, relative to the block's start.
fn overlaps(
    counts: &[usize],
    bucket: &Range<usize>,
    mine: &Range<usize>,
) -> (Vec<usize>, Range<usize>) {
    let overlap = |block: &Range<usize>| {
        let start = block.start.max(bucket.start);
        start..block.end.min(bucket.end).max(start)
    };
    let bucket_counts = (0..counts.len())
        .map(|rank| overlap(&block(counts, rank)).len())
        .collect();
    let local = match overlap(mine) {
        shared if shared.is_empty() => 0..0,
        shared => shared.start - mine.start..shared.end - mine.start,
    };
    (bucket_counts, local)
}
