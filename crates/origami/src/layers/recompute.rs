//! Activation recomputation (`train.recompute`): what a block keeps between its forward and
//! its backward, and what its backward computes again instead.
//!
//! - `none`: everything the backward reads is kept.
//! - `selective`: the cheap, large parts are recomputed — the attention core's output and
//!   log-sum-exp (one more flash-attention forward from the kept q/k/v), the SwiGLU outputs of
//!   the experts, the dense MLP and the shared expert (one element-wise pass from the kept fc1
//!   output), and the two RMSNorm outputs (one element-wise pass from the kept norm input,
//!   re-gathered over tp when tensor parallel). No GEMM runs twice.
//! - `full`: a block keeps only its input (and, for MoE, the load-balancing weights its
//!   forward used, so the replay cannot count the loads twice); its backward runs the forward
//!   again, communication included, then the backward.
//!
//! Every recomputation runs the same kernels on the same inputs, so losses and gradients are
//! bit for bit those of `none`.

use serde::{Deserialize, Serialize};

/// How much of a block's forward its backward recomputes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every saved activation.
    #[default]
    None,
    /// Recompute the attention core, the SwiGLU outputs and the norm outputs.
    Selective,
    /// Keep each block's input and recompute the whole block.
    Full,
}
