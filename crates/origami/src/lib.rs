//! origami: train Mixture-of-Experts language models with five-dimensional parallelism and
//! MoE Parallel Folding. See `DESIGN.md` for how the layers below fit together.

pub mod bench;
pub mod bench_moe;
pub mod compute;
pub mod convert;
pub mod equivalence;
pub mod generate;
pub mod hf;
pub mod layers;
pub mod model;
pub mod optim;
pub mod params;
pub mod plan;
pub mod profile;
pub mod tensor_files;
pub mod toml_override;
pub mod train;
