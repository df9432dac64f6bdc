//! The `Communicator` interface: collectives and point-to-point transfers within one group.
//!
//! Ranks are numbered 0..size inside the group. Every collective must be called by every rank of
//! the group, in the same order; counts are in elements; zero-length contributions are legal.

use std::sync::Arc;

use crate::error::{CommError, Op, Result};

/// How all-reduce combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
}

/// One message an [`Communicator::exchange`] sends.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// The receiving rank of the group.
    pub peer: usize,
    /// The tag the receiver names.
    pub tag: u32,
}

/// One message an [`Communicator::exchange`] receives, of exactly `data.len()` elements.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// Where the elements go.
    pub data: &'a mut [f32],
    /// The sending rank of the group.
    pub peer: usize,
    /// The tag the sender gives.
    pub tag: u32,
}

/// A group of ranks that can exchange data. One value per rank; backends decide whether ranks are
/// threads or processes. Sums are added in rank order (0, 1, 2, …) on every backend, so every rank
/// gets bitwise the same result and runs are reproducible.
pub trait Communicator: Send + Sync {
    /// This rank's index in the group.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn size(&self) -> usize;

    /// This rank's index in the whole job (the one errors name).
    fn world_rank(&self) -> usize;

    /// Combines `buf` over all ranks, in place; every rank passes the same length.
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;

    /// All-reduce of exact counters (token counts, expert loads).
    fn all_reduce_u64(&self, buf: &mut [u64], op: ReduceOp) -> Result<()>;

    /// Gathers `send` of every rank into `recv`, rank i's `counts[i]` elements at offset
    /// `counts[..i].sum()`. All ranks pass the same `counts`.
    fn all_gather_v(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()>;

    /// Sums the ranks' `send` (length `counts.sum()`) and leaves block i (`counts[i]` elements at
    /// offset `counts[..i].sum()`) on rank i in `recv`. All ranks pass the same `counts`.
    fn reduce_scatter_v(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()>;

    /// Sends `send_counts[j]` elements (contiguous, in rank order) to each rank j and receives
    /// `recv_counts[j]` from each rank j into `recv` (in rank order). Rank i's `send_counts[j]`
    /// must equal rank j's `recv_counts[i]`.
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<()>;

    /// Copies `buf` of rank `root` into `buf` of every rank; all lengths equal.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Sends `buf` to rank `dest`; may wait until `dest` receives it (the local backend always
    /// does), so two ranks that exchange must use [`Communicator::send_recv`].
    fn send(&self, buf: &[f32], dest: usize, tag: u32) -> Result<()>;

    /// Receives a message of exactly `buf.len()` elements with `tag` from rank `src`. Messages
    /// between two ranks with the same tag arrive in the order they were sent.
    fn recv(&self, buf: &mut [f32], src: usize, tag: u32) -> Result<()>;

    /// Sends `send` to `dest` and receives `recv` from `src` at the same time (pipeline
    /// neighbours, rings), both with `tag`.
    fn send_recv(
        &self,
        send: &[f32],
        dest: usize,
        recv: &mut [f32],
        src: usize,
        tag: u32,
    ) -> Result<()>;

    /// Posts every send of `sends` and receive of `receives` at once and returns when all have
    /// completed (MPI's batched non-blocking point-to-point). Two ranks may send each other
    /// messages in one exchange; messages are told apart by their tags, and between two ranks
    /// messages with the same tag arrive in the order they were posted.
    fn exchange(&self, sends: &[Outgoing<'_>], receives: &mut [Incoming<'_>]) -> Result<()>;

    /// Waits until every rank of the group has called it.
    fn barrier(&self) -> Result<()>;

    /// Makes sub-group communicators. Collective: every rank passes the same `groups`, disjoint
    /// lists of this group's ranks; each rank gets the communicator of the list holding it, whose
    /// ranks are numbered in list order, or `None` if no list holds it.
    fn split(&self, groups: &[Vec<usize>]) -> Result<Option<Arc<dyn Communicator>>>;
}

/// Argument checks shared by the backends; each returns the error naming the caller and op.
pub(crate) struct Checks<'a, C: Communicator + ?Sized> {
    pub comm: &'a C,
    pub op: Op,
}

impl<C: Communicator + ?Sized> Checks<'_, C> {
    /// `counts` has one entry per rank.
    pub fn counts(&self, name: &'static str, counts: &[usize]) -> Result<()> {
        if counts.len() == self.comm.size() {
            Ok(())
        } else {
            Err(CommError::CountsLength {
                rank: self.comm.world_rank(),
                op: self.op,
                counts: name,
                actual: counts.len(),
                size: self.comm.size(),
            })
        }
    }

    /// A buffer holds the number of elements the counts call for.
    pub fn length(&self, buffer: &'static str, actual: usize, expected: usize) -> Result<()> {
        if actual == expected {
            Ok(())
        } else {
            Err(CommError::BufferLength {
                rank: self.comm.world_rank(),
                op: self.op,
                buffer,
                expected,
                actual,
            })
        }
    }

    /// A peer index lies inside the group.
    pub fn peer(&self, peer: usize) -> Result<()> {
        if peer < self.comm.size() {
            Ok(())
        } else {
            Err(CommError::PeerOutOfRange {
                rank: self.comm.world_rank(),
                op: self.op,
                peer,
                size: self.comm.size(),
            })
        }
    }

    /// The split lists are disjoint and name only ranks of the group; returns which list holds
    /// the caller and where, if any.
    pub fn split(&self, groups: &[Vec<usize>]) -> Result<Option<(usize, usize)>> {
        let mut seen = vec![false; self.comm.size()];
        let mut mine = None;
        for (index, group) in groups.iter().enumerate() {
            for (position, &rank) in group.iter().enumerate() {
                let invalid = |detail: String| CommError::InvalidSplit {
                    rank: self.comm.world_rank(),
                    detail,
                };
                if rank >= seen.len() {
                    return Err(invalid(format!(
                        "list {index} names rank {rank}, outside the group of {} ranks",
                        seen.len()
                    )));
                }
                if std::mem::replace(&mut seen[rank], true) {
                    return Err(invalid(format!(
                        "rank {rank} appears in more than one place"
                    )));
                }
                if rank == self.comm.rank() {
                    mine = Some((index, position));
                }
            }
        }
        Ok(mine)
    }
}

/// Offsets of consecutive blocks of `counts` elements.
pub(crate) fn offsets(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |next, &count| {
            let start = *next;
            *next += count;
            Some(start)
        })
        .collect()
}
