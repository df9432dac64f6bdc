//! Activation recomputation, as origami's `train.recompute` defines it: what a transformer
//! layer keeps for its backward, and what its backward runs again instead.
//!
//! - `none`: every tensor the backward reads is kept.
//! - `selective`: the attention core's output and statistics (one more attention forward from
//!   the kept q/k/v; under context parallelism, with its exchange), the SwiGLU outputs (one
//!   element-wise pass from the kept fc1 outputs) and the two norm outputs (one pass from the
//!   kept norm inputs, gathered again over tp) are recomputed. No GEMM runs twice.
//! - `full`: a layer keeps only its input; its backward runs the whole forward again,
//!   communication included, then the backward.
//!
//! The tensors a layer recomputes are alive again during its own backward, so they join that
//! layer's working set. The embedding and the output layer are never recomputed.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::work::{CommKind, LayerWork, Stored};
use crate::PlanError;

/// How much of a layer's forward its backward runs again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep everything.
    #[default]
    None,
    /// Recompute the attention core, the SwiGLU outputs and the norm outputs.
    Selective,
    /// Keep each layer's input and recompute the whole layer.
    Full,
}

/// The tensors `selective` drops (names of [`Stored`] in [`crate::work`]).
const SELECTIVE_DROPS: [&str; 10] = [
    "attention_norm_output",
    "attention_context",
    "softmax_statistics",
    "context_parallel_output",
    "context_parallel_heads",
    "mlp_norm_output",
    "mlp_activation",
    "moe_norm_output",
    "expert_activation",
    "shared_activation",
];

impl Recompute {
    /// Every mode, in the order of `train.recompute`'s documentation.
    pub const ALL: [Recompute; 3] = [Recompute::None, Recompute::Selective, Recompute::Full];

    /// The mode's name as `train.recompute` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }

    /// Whether the backward sends a collective of `kind` a second time, for the forward it
    /// recomputes.
    pub fn repeats(self, kind: CommKind) -> bool {
        match self {
            Recompute::None => false,
            Recompute::Selective => kind == CommKind::ContextParallel,
            Recompute::Full => true,
        }
    }

    /// Makes a transformer layer's `work` keep what this mode keeps; `input_bytes` is the
    /// layer's input (what `full` keeps).
    pub(crate) fn apply(self, work: &mut LayerWork, input_bytes: f64) {
        work.recompute = self;
        let before = work.stored_bytes();
        match self {
            Recompute::None => return,
            Recompute::Selective => work
                .stored
                .retain(|tensor| !SELECTIVE_DROPS.contains(&tensor.name)),
            Recompute::Full => {
                work.stored = vec![Stored {
                    name: "layer_input",
                    bytes: input_bytes,
                }]
            }
        }
        work.backward_working_bytes += before - work.stored_bytes();
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Recompute {
    type Err = PlanError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Recompute::ALL
            .into_iter()
            .find(|mode| mode.name() == text)
            .ok_or_else(|| PlanError::UnknownRecompute(text.to_string()))
    }
}
