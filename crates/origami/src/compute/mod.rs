//! The compute interface between the layers and the kernels (DESIGN.md §3): the one place that
//! knows the precision. Layers receive [`Weights`] — a rank's parameters in the compute
//! precision — and reach the linear and grouped-linear GEMMs and the attention core through
//! it; a GPU backend later plugs in behind the same entry points.
//!
//! Mixed precision as Megatron's bf16 training with fp32 main gradients: bf16 copies of the
//! weights made once per optimizer step after the update ([`WeightCopies`]), bf16 activations
//! as GEMM inputs ([`Activation`]), f32 accumulation and f32 outputs; f32 master weights,
//! gradient buffers and AdamW state; norms, softmax, the router and the losses in f32. In f32
//! every entry point is the f32 kernel on the master weights, bit for bit what the layers
//! computed before this interface.

mod activation;
mod linear;
mod precision;
mod weights;

pub use activation::{
    bf16_words, round_into, round_to_bf16, round_to_words, widen, words_as_bf16, words_as_bf16_mut,
    Activation, Input,
};
pub use linear::LinearShape;
pub use origami_kernels::matmul::LinearGrads;
pub use precision::{Compute, PrecisionSetting};
pub use weights::{WeightCopies, Weights};
