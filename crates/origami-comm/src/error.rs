//! What can go wrong in a communicator call, always naming the rank and the operation.

use std::fmt;
use std::time::Duration;

/// Result of a communicator call.
pub type Result<T> = std::result::Result<T, CommError>;

/// The operation a call was performing, as named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`crate::Communicator::all_reduce`].
    AllReduce,
    /// [`crate::Communicator::all_reduce_u64`].
    AllReduceU64,
    /// [`crate::Communicator::all_gather_v`].
    AllGatherV,
    /// [`crate::Communicator::reduce_scatter_v`].
    ReduceScatterV,
    /// [`crate::Communicator::all_to_all_v`].
    AllToAllV,
    /// [`crate::Communicator::broadcast`].
    Broadcast,
    /// [`crate::Communicator::send`].
    Send,
    /// [`crate::Communicator::recv`].
    Recv,
    /// [`crate::Communicator::send_recv`].
    SendRecv,
    /// [`crate::Communicator::exchange`].
    Exchange,
    /// [`crate::Communicator::barrier`].
    Barrier,
    /// [`crate::Communicator::split`].
    Split,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::AllReduce => "all_reduce",
            Op::AllReduceU64 => "all_reduce_u64",
            Op::AllGatherV => "all_gather_v",
            Op::ReduceScatterV => "reduce_scatter_v",
            Op::AllToAllV => "all_to_all_v",
            Op::Broadcast => "broadcast",
            Op::Send => "send",
            Op::Recv => "recv",
            Op::SendRecv => "send_recv",
            Op::Exchange => "exchange",
            Op::Barrier => "barrier",
            Op::Split => "split",
        })
    }
}

/// Why a job stopped: the first failure of any rank, which every other rank then reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A rank's code panicked.
    Panicked {
        /// World rank that panicked.
        rank: usize,
        /// The panic message.
        message: String,
    },
    /// A rank's code returned an error.
    Failed {
        /// World rank that failed.
        rank: usize,
        /// The error, rendered.
        message: String,
    },
    /// A rank waited in a call longer than the job's timeout.
    TimedOut {
        /// World rank that gave up waiting.
        rank: usize,
        /// What it was doing.
        op: Op,
        /// How long it waited.
        waited: Duration,
        /// World ranks it was still waiting for.
        missing: Vec<usize>,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Panicked { rank, message } => write!(f, "rank {rank} panicked: {message}"),
            Failure::Failed { rank, message } => write!(f, "rank {rank} failed: {message}"),
            Failure::TimedOut {
                rank,
                op,
                waited,
                missing,
            } => write!(
                f,
                "rank {rank} timed out in {op} after {:.1} s waiting for ranks {missing:?}",
                waited.as_secs_f64()
            ),
        }
    }
}

/// An error from a communicator call. `rank` is always the caller's world rank.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CommError {
    /// The job failed (on this rank or another) before or during this call.
    #[error("rank {rank}: {op} aborted: {cause}")]
    Aborted {
        /// The caller's world rank.
        rank: usize,
        /// The call that was aborted.
        op: Op,
        /// The failure that stopped the job.
        cause: Failure,
    },
    /// This rank waited longer than the timeout; the job is now stopped.
    #[error("{0}")]
    TimedOut(Failure),
    /// A buffer has the wrong number of elements for the counts given.
    #[error("rank {rank}: {op}: {buffer} holds {actual} elements, expected {expected}")]
    BufferLength {
        /// The caller's world rank.
        rank: usize,
        /// The call.
        op: Op,
        /// Which buffer (`send`, `recv`, `buf`).
        buffer: &'static str,
        /// Elements the counts call for.
        expected: usize,
        /// Elements the buffer holds.
        actual: usize,
    },
    /// A counts slice does not have one entry per rank of the group.
    #[error("rank {rank}: {op}: {counts} has {actual} entries for a group of {size} ranks")]
    CountsLength {
        /// The caller's world rank.
        rank: usize,
        /// The call.
        op: Op,
        /// Which counts (`counts`, `send_counts`, `recv_counts`).
        counts: &'static str,
        /// Entries given.
        actual: usize,
        /// Ranks in the group.
        size: usize,
    },
    /// A peer rank (root, destination or source) outside the group.
    #[error("rank {rank}: {op}: peer {peer} is outside the group of {size} ranks")]
    PeerOutOfRange {
        /// The caller's world rank.
        rank: usize,
        /// The call.
        op: Op,
        /// The peer as given (group rank).
        peer: usize,
        /// Ranks in the group.
        size: usize,
    },
    /// The ranks of the group called with arguments that do not fit together.
    #[error("rank {rank}: {op}: ranks disagree: {detail}")]
    Mismatch {
        /// The caller's world rank.
        rank: usize,
        /// The call.
        op: Op,
        /// What disagrees, with the ranks and numbers.
        detail: String,
    },
    /// The rank lists given to split are not disjoint lists of this group's ranks.
    #[error("rank {rank}: split: {detail}")]
    InvalidSplit {
        /// The caller's world rank.
        rank: usize,
        /// What is wrong with the lists.
        detail: String,
    },
    /// Two threads called the same rank's communicator at once (calls must be ordered).
    #[error("rank {rank}: {op} called while another call on the same communicator is running")]
    Busy {
        /// The caller's world rank.
        rank: usize,
        /// The second call.
        op: Op,
    },
    /// MPI could not be started as origami needs it.
    #[cfg(feature = "mpi")]
    #[error("starting MPI: {0}")]
    MpiInit(String),
    /// A call MPI cannot express (e.g. a count beyond MPI's 32-bit int).
    #[cfg(feature = "mpi")]
    #[error("rank {rank}: {op}: MPI: {detail}")]
    Mpi {
        /// The caller's world rank.
        rank: usize,
        /// The call.
        op: Op,
        /// What MPI reported.
        detail: String,
    },
}
