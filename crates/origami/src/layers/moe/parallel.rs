//! Where an MoE layer's experts and tokens live across ranks: the groups the layer talks over,
//! and which experts (and which slice of each expert's hidden units) this rank owns.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use origami_comm::{Communicator, SoloComm};
use origami_parallel::ParallelState;

/// The groups one rank's MoE layers use (DESIGN.md §1). Every layer of the rank shares them.
#[derive(Clone)]
pub struct MoeParallel {
    /// Expert-parallel group: the ranks owning the other experts (alltoall dispatch).
    pub ep: Arc<dyn Communicator>,
    /// Expert tensor-parallel group: the ranks holding the other slices of the same experts.
    pub etp: Arc<dyn Communicator>,
    /// Expert tensor- and expert-parallel group (allgather dispatch).
    pub tp_ep: Arc<dyn Communicator>,
    /// The ranks holding the other tokens of this micro-batch's sequences (tp-cp): the scope
    /// of the micro-batch and per-sequence load-balancing losses and of the z-loss mean.
    pub sequence: Arc<dyn Communicator>,
    /// The ranks holding the rest of the global batch (tp-dp-cp): expert loads for the expert
    /// bias, the global-batch load-balancing loss and the statistics.
    pub batch: Arc<dyn Communicator>,
    /// The attention side's tensor-parallel group, over which the shared expert is split like a
    /// dense MLP (a one-rank group keeps it whole).
    pub tensor: Arc<dyn Communicator>,
}

impl MoeParallel {
    /// One rank: every group trivial.
    pub fn single() -> Self {
        MoeParallel {
            ep: SoloComm::shared(0),
            etp: SoloComm::shared(0),
            tp_ep: SoloComm::shared(0),
            sequence: SoloComm::shared(0),
            batch: SoloComm::shared(0),
            tensor: SoloComm::shared(0),
        }
    }

    /// The groups of `state`'s rank.
    pub fn from_state(state: &ParallelState) -> Self {
        MoeParallel {
            ep: state.ep().comm().clone(),
            etp: state.etp().comm().clone(),
            tp_ep: state.tp_ep().comm().clone(),
            sequence: state.tp_cp().comm().clone(),
            batch: state.tp_dp_cp().comm().clone(),
            tensor: state.tp().comm().clone(),
        }
    }

    /// Whether tokens never leave this rank (ep and etp both 1).
    pub fn is_local(&self) -> bool {
        self.tp_ep.size() == 1
    }

    /// This rank's part of the experts of a layer.
    pub fn sharding(&self) -> ExpertSharding {
        ExpertSharding {
            ep: self.ep.size(),
            ep_rank: self.ep.rank(),
            etp: self.etp.size(),
            etp_rank: self.etp.rank(),
        }
    }
}

impl fmt::Debug for MoeParallel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MoeParallel {{ ep: {}/{}, etp: {}/{}, tp_ep: {}, sequence: {}, batch: {}, tensor: {} }}",
            self.ep.rank(),
            self.ep.size(),
            self.etp.rank(),
            self.etp.size(),
            self.tp_ep.size(),
            self.sequence.size(),
            self.batch.size(),
            self.tensor.size()
        )
    }
}

/// Which experts a rank owns (contiguous over ep) and which slice of their hidden units
/// (contiguous over etp: the first projection column-parallel, the second row-parallel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertSharding {
    /// Expert-parallel size.
    pub ep: usize,
    /// This rank's position in the ep group.
    pub ep_rank: usize,
    /// Expert tensor-parallel size.
    pub etp: usize,
    /// This rank's position in the etp group.
    pub etp_rank: usize,
}

/// Expert sizes that the parallel sizes do not divide.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShardingError {
    /// The experts cannot be split evenly over ep.
    #[error("model.moe.num_experts = {experts} must be divisible by parallel.ep = {ep}")]
    Experts {
        /// Routed experts.
        experts: usize,
        /// Expert-parallel size.
        ep: usize,
    },
    /// An expert's hidden units cannot be split evenly over etp.
    #[error("model.moe.ffn_hidden_size = {ffn} must be divisible by parallel.etp = {etp}")]
    Ffn {
        /// Expert hidden size.
        ffn: usize,
        /// Expert tensor-parallel size.
        etp: usize,
    },
    /// A size that tensor parallelism splits is not divisible by tp.
    #[error("{what} = {value} must be divisible by parallel.tp = {tp}")]
    TensorParallel {
        /// The configuration key.
        what: &'static str,
        /// Its value.
        value: usize,
        /// Tensor-parallel size.
        tp: usize,
    },
}

/// Checks that tensor parallelism over `tp` ranks splits `value` (the config key `what`).
pub fn check_tensor_split(
    what: &'static str,
    value: usize,
    tp: usize,
) -> Result<(), ShardingError> {
    if value.is_multiple_of(tp) {
        Ok(())
    } else {
        Err(ShardingError::TensorParallel { what, value, tp })
    }
}

impl ExpertSharding {
    /// Checks that `experts` and their hidden size `ffn` split evenly.
    pub fn check(&self, experts: usize, ffn: usize) -> Result<(), ShardingError> {
        if !experts.is_multiple_of(self.ep) {
            return Err(ShardingError::Experts {
                experts,
                ep: self.ep,
            });
        }
        if !ffn.is_multiple_of(self.etp) {
            return Err(ShardingError::Ffn { ffn, etp: self.etp });
        }
        Ok(())
    }

    /// The global indices of this rank's experts among `experts`.
    pub fn local_experts(&self, experts: usize) -> Range<usize> {
        let per_rank = experts / self.ep;
        self.ep_rank * per_rank..(self.ep_rank + 1) * per_rank
    }

    /// The hidden units of each expert this rank computes, among `ffn`.
    pub fn local_ffn(&self, ffn: usize) -> Range<usize> {
        let per_rank = ffn / self.etp;
        self.etp_rank * per_rank..(self.etp_rank + 1) * per_rank
    }
}
