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

/// Bytes per element of each kind of state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bytes {
    /// A weight as the layers read it.
    pub weight: f64,
    /// A gradient as it is accumulated and reduced.
    pub gradient: f64,
    /// Optimizer state per parameter: fp32 master copy (if any) and the two AdamW moments;
    /// what the distributed optimizer shards.
    pub optimizer: f64,
    /// A stored activation, and what travels in activation collectives.
    pub activation: f64,
}

impl Precision {
    /// Its byte sizes.
    pub fn bytes(self) -> Bytes {
        match self {
            Precision::Bf16 => Bytes {
                weight: 2.0,
                gradient: 4.0,
                optimizer: 12.0,
                activation: 2.0,
            },
            Precision::F32 => Bytes {
                weight: 4.0,
                gradient: 4.0,
                optimizer: 8.0,
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
        let b = Precision::Bf16.bytes();
        assert_eq!(b.weight + b.gradient + b.optimizer, 18.0);
        assert_eq!(b.weight + b.gradient, 6.0);
        // origami on CPU: f32 weight, gradient and two moments.
        let b = Precision::F32.bytes();
        assert_eq!(b.weight + b.gradient + b.optimizer, 16.0);
        assert!("fp8".parse::<Precision>().is_err());
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    }
}
