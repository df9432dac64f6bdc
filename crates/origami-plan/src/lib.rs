//! The planner (DESIGN.md §3, "plan"): memory and step time of every folded layout of an MoE
//! model on a cluster, and the search over them.
//!
//! Pure computation over configuration types: a [`ModelShape`] (the dims that matter), a
//! [`Hardware`] description (TOML; `h100-dgx` embedded, `local` written by calibration), and a
//! [`Layout`] (`tp cp pp vpp ep etp` and the micro-batch size). [`Planner::evaluate`] gives a
//! layout's memory per rank term by term ([`memory`]) and its step time split into compute,
//! communication by kind over the links its rank groups use ([`network`], from
//! `origami-parallel`'s [`origami_parallel::Topology`]) and the pipeline bubble of the
//! simulated schedule ([`pipeline`], from `origami-schedule`); [`search()`] ranks every valid
//! layout. [`work`] says what a rank computes, sends and keeps for one micro-batch, before any
//! hardware is applied.

mod error;
mod evaluate;
pub mod hardware;
mod layout;
pub mod memory;
mod models;
pub mod network;
pub mod pipeline;
mod precision;
pub mod recompute;
pub mod report;
mod search;
mod shape;
pub mod stage;
pub mod step;
pub mod work;

pub use error::PlanError;
pub use evaluate::{Evaluation, PlanInputs, Planner, StagePace};
pub use hardware::Hardware;
pub use layout::Layout;
pub use models::{paper_model, PAPER_MODELS};
pub use precision::{Bytes, MixedPrecision, Precision};
pub use recompute::Recompute;
pub use search::{candidates, search, SearchResult};
pub use shape::{LayerParams, ModelShape, GLU_FACTOR};
