//! The parallel layout of origami (DESIGN.md §1): which ranks form which group.
//!
//! MoE Parallel Folding gives attention (dense) layers and MoE (expert) layers two different
//! mappings over the same world — dense `tp × cp × dp × pp`, expert `etp × ep × edp × pp` — that
//! share only their pipeline groups. [`ParallelConfig`] is what a user asks for,
//! [`ParallelLayout`] the validated sizes over a world, [`RankGenerator`] lays ranks out along an
//! [`Order`] and lists groups, [`Topology`] holds every group of the world, and
//! [`ParallelState`] is one rank's coordinates and groups, each with its communicator.

mod axis;
mod config;
mod error;
mod layout;
mod rank_generator;
mod state;
mod topology;

pub use axis::{Axis, Order};
pub use config::ParallelConfig;
pub use error::ParallelError;
pub use layout::{Coordinates, ModelDims, ParallelLayout};
pub use rank_generator::{AxisSizes, RankGenerator};
pub use state::{Group, ParallelState};
pub use topology::{GroupKind, Mapping, Topology};
