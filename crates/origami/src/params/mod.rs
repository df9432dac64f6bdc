//! What every layer builds on: the parameter registry, the flat buffers behind it, the shard a
//! rank holds of each global tensor, and initialisation that depends only on (seed, name,
//! global index).
//!
//! Every parameter is registered once with its name, global shape and group, and gets a range in
//! one of two contiguous buffers: dense parameters (reduced over data-parallel ranks) and expert
//! parameters (reduced over expert-data-parallel ranks). Gradients and optimizer moments use the
//! same layout, so reductions and the optimizer work on large flat ranges.

mod buffers;
pub mod init;
pub mod region;
mod registry;
mod shard;

pub use buffers::Buffers;
pub use registry::{Init, ParamGroup, ParamId, ParamInfo, ParamRegistry};
pub use shard::Shard;
