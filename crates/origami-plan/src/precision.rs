//! Numeric formats of a training run: how many bytes each kind of state takes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::PlanError;

/// The precision a run trains in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Megatron-Core's bf16 mixed precision: bf16 weights and activations, fp32 gradients
    /// (`--bf16` turns on `accumulate_allreduce_grads_in_fp32`), fp32 master weights and AdamW
    /// moments.
    Bf16,
    /// origami's CPU engine: everything in f32, AdamW moments without master weights.
    F32,
}

/// How an engine lays out bf16 mixed precision (f32 runs are the same in both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Megatron-Core: bf16 weights and activations, fp32 main gradients, and fp32 master
    /// weights beside the AdamW moments in the optimizer state (what its distributed optimizer
    /// shards).
    #[default]
    Megatron,
    /// origami's CPU engine: f32 master weights held by the layers with a bf16 copy for the
    /// GEMMs, f32 gradients, the AdamW moments as the optimizer state; only GEMM inputs are kept
    /// and sent as bf16 (norm outputs, the experts' rows, SwiGLU outputs, the key/value blocks of
    /// the context-parallel ring), while the residual stream, q/k/v, the attention output,
    /// partial sums and every gradient stay f32.
    Origami,
}

/// Bytes per element of each kind of state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bytes {
    /// Weights a rank holds per parameter (origami's bf16: the f32 master and its bf16 copy).
    pub weight: f64,
    /// A weight as the distributed optimizer's parameter all-gather moves it.
    pub gathered_weight: f64,
    /// A gradient as it is accumulated and reduced.
    pub gradient: f64,
    /// Optimizer state per parameter: fp32 master copy (if the optimizer keeps it) and the two
    /// AdamW moments; what the distributed optimizer shards.
    pub optimizer: f64,
    /// A GEMM or attention-kernel input kept for the backward, and what a collective moves
    /// into one (the sequence-parallel gather into a region, the experts' dispatched rows, the
    /// ring's key/value blocks, the context-parallel all-to-all's q, k, v, output and output
    /// gradient).
    pub gemm_input: f64,
    /// Every other activation kept or moved: the residual stream, norm inputs, q/k/v, attention
    /// outputs, partial sums leaving a region, pipeline transfers, activation gradients; and
    /// what element-wise kernels read and write.
    pub activation: f64,
}

impl Precision {
    /// Its byte sizes in an engine that lays out mixed precision as `mixed`.
    pub fn bytes(self, mixed: MixedPrecision) -> Bytes {
        match (self, mixed) {
            (Precision::Bf16, MixedPrecision::Megatron) => Bytes {
                weight: 2.0,
                gathered_weight: 2.0,
                gradient: 4.0,
                optimizer: 12.0,
                gemm_input: 2.0,
                activation: 2.0,
            },
            (Precision::Bf16, MixedPrecision::Origami) => Bytes {
                weight: 6.0,
                gathered_weight: 4.0,
                gradient: 4.0,
                optimizer: 8.0,
                gemm_input: 2.0,
                activation: 4.0,
            },
            (Precision::F32, _) => Bytes {
                weight: 4.0,
                gathered_weight: 4.0,
                gradient: 4.0,
                optimizer: 8.0,
                gemm_input: 4.0,
                activation: 4.0,
            },
        }
    }

    /// The name used on the command line and in hardware files.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = PlanError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "bf16" => Ok(Precision::Bf16),
            "f32" | "fp32" => Ok(Precision::F32),
            other => Err(PlanError::UnknownPrecision(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megatron_bytes_per_parameter_are_eighteen_without_sharding() {
        // Megatron's estimator: 18 bytes per parameter without the distributed optimizer,
        // 6 + 12/D with it.
        let b = Precision::Bf16.bytes(MixedPrecision::Megatron);
        assert_eq!(b.weight + b.gradient + b.optimizer, 18.0);
        assert_eq!(b.weight + b.gradient, 6.0);
        // origami on CPU: f32 weight, gradient and two moments.
        let b = Precision::F32.bytes(MixedPrecision::Origami);
        assert_eq!(b.weight + b.gradient + b.optimizer, 16.0);
        assert_eq!(b, Precision::F32.bytes(MixedPrecision::Megatron));
        // origami's bf16: the same 18 bytes, but only the 8 bytes of moments are sharded (the
        // f32 master weights stay with the layers beside their bf16 copy).
        let b = Precision::Bf16.bytes(MixedPrecision::Origami);
        assert_eq!(b.weight + b.gradient + b.optimizer, 18.0);
        assert_eq!(b.optimizer, 8.0);
        assert_eq!((b.gemm_input, b.activation), (2.0, 4.0));
        assert!("fp8".parse::<Precision>().is_err());
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    }
}
