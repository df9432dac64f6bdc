//! CPU kernels of origami: dense and grouped GEMM, norms, RoPE, attention, losses and the
//! optimizer step. Kernels work on plain `f32` slices with explicit dimensions and know nothing
//! about ranks or models, so a GPU backend can later sit beside them behind the same signatures.
//! The GEMMs also have a bf16 path (bf16 inputs, f32 accumulation and output): `bf16`,
//! `matmul_bf16`, `grouped_matmul_bf16`.
//!
//! Memory rule (as in llm.c): parameter gradients accumulate (`+=`), activation gradients are
//! written (`=`), unless a function says otherwise (the residual stream adds).

pub mod adamw;
pub mod attention;
pub mod attention_bf16;
mod attention_task;
pub mod bf16;
pub mod cross_entropy;
#[cfg(target_arch = "x86_64")]
mod dpbf16;
pub mod embedding;
#[cfg(target_arch = "x86_64")]
mod fma512;
pub mod grad_norm;
pub mod grouped_matmul;
pub mod grouped_matmul_bf16;
pub mod masked_attention;
pub mod masked_attention_bf16;
pub mod math;
pub mod matmul;
pub mod matmul_bf16;
#[cfg(target_arch = "x86_64")]
mod packed_gemm;
pub mod rmsnorm;
pub mod rope;
mod row_exp;
pub mod softmax;
pub mod swiglu;
pub mod testing;
mod tile_softmax;
mod tiles;
