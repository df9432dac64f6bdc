//! Which precision the GEMMs compute in, chosen once at start (`train.precision`).
//!
//! `auto` (the default) takes bf16 where the CPU runs the `vdpbf16ps` kernel (AVX512_BF16) and
//! f32 elsewhere; `f32` and `bf16` force one. `disable_avx512_bf16` makes the choice as on a
//! CPU without AVX512_BF16: `auto` then trains in f32, and an explicit `bf16` runs the portable
//! kernel (the same rounding of the inputs, widened to f32 for the f32 GEMM).

use origami_kernels::matmul_bf16::Bf16Kernel;
use serde::{Deserialize, Serialize};

/// The configured precision (`train.precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionSetting {
    /// bf16 where the CPU has AVX512_BF16, else f32.
    #[default]
    Auto,
    /// Every GEMM in f32.
    F32,
    /// bf16 GEMM inputs with f32 accumulation, f32 master weights, gradients and optimizer state.
    Bf16,
}

/// The precision the layers compute in, resolved for this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    /// f32 GEMMs: the path every equivalence test runs.
    F32,
    /// bf16 copies of the weights and bf16 activations as GEMM inputs, computed by this kernel
    /// with f32 accumulation and output.
    Bf16(Bf16Kernel),
}

impl Compute {
    /// The precision `setting` asks for on this CPU; with `disable_avx512_bf16` as on a CPU
    /// without AVX512_BF16.
    pub fn resolve(setting: PrecisionSetting, disable_avx512_bf16: bool) -> Self {
        let kernel = Bf16Kernel::select(disable_avx512_bf16);
        match setting {
            PrecisionSetting::F32 => Compute::F32,
            PrecisionSetting::Bf16 => Compute::Bf16(kernel),
            PrecisionSetting::Auto if kernel == Bf16Kernel::Dpbf16 => Compute::Bf16(kernel),
            PrecisionSetting::Auto => Compute::F32,
        }
    }

    /// Whether GEMM inputs are bf16.
    pub fn is_bf16(self) -> bool {
        matches!(self, Compute::Bf16(_))
    }

    /// `"f32"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            Compute::F32 => "f32",
            Compute::Bf16(_) => "bf16",
        }
    }

    /// One line for the log: the precision, its kernel and how `setting` chose it.
    pub fn describe(self, setting: PrecisionSetting) -> String {
        let how = match setting {
            PrecisionSetting::Auto => "train.precision = \"auto\": ",
            PrecisionSetting::F32 | PrecisionSetting::Bf16 => "",
        };
        let cpu = if Bf16Kernel::Dpbf16.is_available() {
            "this CPU has AVX512_BF16"
        } else {
            "this CPU has no AVX512_BF16"
        };
        match self {
            Compute::F32 => format!("precision: f32 ({how}{cpu}; f32 GEMMs)"),
            Compute::Bf16(Bf16Kernel::Dpbf16) => format!(
                "precision: bf16 ({how}{cpu}; vdpbf16ps GEMMs with f32 accumulation; f32 master weights, gradients and AdamW state; norms, softmax, router and losses in f32)"
            ),
            Compute::Bf16(Bf16Kernel::Portable) => format!(
                "precision: bf16 ({how}{cpu} or it is disabled: the portable kernel widens the bf16 inputs to f32; f32 master weights, gradients and AdamW state)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_cpu_and_disabling_forces_f32() {
        let has_bf16 = Bf16Kernel::Dpbf16.is_available();
        let auto = Compute::resolve(PrecisionSetting::Auto, false);
        assert_eq!(auto.is_bf16(), has_bf16);
        assert_eq!(Compute::resolve(PrecisionSetting::Auto, true), Compute::F32);
        assert_eq!(
            Compute::resolve(PrecisionSetting::Bf16, true),
            Compute::Bf16(Bf16Kernel::Portable)
        );
        assert_eq!(Compute::resolve(PrecisionSetting::F32, false), Compute::F32);
    }

    #[test]
    fn the_setting_reads_as_lowercase() {
        #[derive(Deserialize)]
        struct T {
            p: PrecisionSetting,
        }
        let t: T = toml::from_str("p = \"bf16\"").unwrap();
        assert_eq!(t.p, PrecisionSetting::Bf16);
        assert!(toml::from_str::<T>("p = \"fp16\"").is_err());
    }
}
