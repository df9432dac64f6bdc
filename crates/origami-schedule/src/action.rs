//! The actions a rank runs: computations on one (micro-batch, chunk) and batches of transfers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Forward or backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Pass {
    /// Forward: consumes the previous virtual stage's activation.
    Forward,
    /// Backward: consumes the next virtual stage's gradient.
    Backward,
}

/// One micro-batch on one of this stage's model chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Work {
    /// Micro-batch index within the step (on this pipeline).
    pub micro_batch: usize,
    /// Model chunk on this stage (0 without interleaving).
    pub chunk: usize,
}

/// Whether a transfer leaves or arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// This rank sends.
    Send,
    /// This rank receives.
    Recv,
}

/// What travels between stages, named by its micro-batch and the virtual stage that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Payload {
    /// The output of virtual stage `from`'s forward, the input of `from + 1`.
    Activation {
        /// Micro-batch.
        micro_batch: usize,
        /// Virtual stage whose output it is.
        from: usize,
    },
    /// The gradient of virtual stage `from`'s input, made by its backward, for `from − 1`.
    Gradient {
        /// Micro-batch.
        micro_batch: usize,
        /// Virtual stage whose input gradient it is.
        from: usize,
    },
}

impl Payload {
    /// Activations and gradients travel on different tags, so that a pair of stages can
    /// exchange both in one batch (two stages are each other's both neighbours when pp = 2).
    pub fn tag(&self) -> u32 {
        match self {
            Payload::Activation { .. } => 0,
            Payload::Gradient { .. } => 1,
        }
    }
}

/// One point-to-point transfer of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Transfer {
    /// Send or receive.
    pub direction: Direction,
    /// The other stage (a rank of the pipeline group).
    pub peer: usize,
    /// What travels.
    pub payload: Payload,
}

/// One step of a rank's schedule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Forward of one micro-batch on one chunk.
    Forward(Work),
    /// Backward of one micro-batch on one chunk.
    Backward(Work),
    /// Transfers posted together; the action ends when all of them have completed.
    Exchange(Vec<Transfer>),
}

impl Action {
    /// The computation, if this is one.
    pub fn work(&self) -> Option<(Pass, Work)> {
        match self {
            Action::Forward(work) => Some((Pass::Forward, *work)),
            Action::Backward(work) => Some((Pass::Backward, *work)),
            Action::Exchange(_) => None,
        }
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Activation { micro_batch, from } => {
                write!(
                    f,
                    "activation of micro-batch {micro_batch} from virtual stage {from}"
                )
            }
            Payload::Gradient { micro_batch, from } => {
                write!(
                    f,
                    "gradient of micro-batch {micro_batch} from virtual stage {from}"
                )
            }
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Forward(w) => write!(f, "forward  mb {} chunk {}", w.micro_batch, w.chunk),
            Action::Backward(w) => write!(f, "backward mb {} chunk {}", w.micro_batch, w.chunk),
            Action::Exchange(transfers) => {
                write!(f, "exchange")?;
                for (i, t) in transfers.iter().enumerate() {
                    let arrow = match t.direction {
                        Direction::Send => "send to",
                        Direction::Recv => "recv from",
                    };
                    let sep = if i == 0 { " " } else { "; " };
                    write!(f, "{sep}{arrow} stage {}: {}", t.peer, t.payload)?;
                }
                Ok(())
            }
        }
    }
}
