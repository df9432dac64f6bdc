//! CPU kernels of origami: dense and grouped GEMM, norms, RoPE, attention, losses and the
//! optimizer step. Kernels work on plain `f32` slices with explicit dimensions and know nothing
//! about ranks or models, so a GPU backend can later sit beside them behind the same signatures.
