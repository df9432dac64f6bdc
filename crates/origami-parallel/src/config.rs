//! What a user asks for: the `[parallel]` section of a config or the topology flags.

use serde::{Deserialize, Serialize};

use crate::{Order, ParallelError, ParallelLayout};

/// Requested parallel sizes; dp and edp are derived from the world, etp defaults to tp
/// (Megatron-Core's default). Resolve against a world with [`ParallelConfig::layout`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelConfig {
    /// Tensor-parallel size of attention (dense) layers.
    pub tp: usize,
    /// Context-parallel size.
    pub cp: usize,
    /// Pipeline-parallel size, shared by both mappings.
    pub pp: usize,
    /// Virtual pipeline stages per rank (interleaved schedule); 1 = not interleaved.
    pub vpp: usize,
    /// Expert-parallel size of MoE layers.
    pub ep: usize,
    /// Expert tensor-parallel size; `None` means "same as tp".
    pub etp: Option<usize>,
    /// How the axes are laid out over ranks.
    pub order: Order,
}

impl Default for ParallelConfig {
    /// Everything 1 (a single rank), default order.
    fn default() -> Self {
        ParallelConfig {
            tp: 1,
            cp: 1,
            pp: 1,
            vpp: 1,
            ep: 1,
            etp: None,
            order: Order::default(),
        }
    }
}

impl ParallelConfig {
    /// The effective expert tensor-parallel size.
    pub fn etp(&self) -> usize {
        self.etp.unwrap_or(self.tp)
    }

    /// Derives dp and edp for `world` ranks and checks every constraint of DESIGN.md §1 that
    /// does not depend on the model.
    pub fn layout(&self, world: usize) -> Result<ParallelLayout, ParallelError> {
        ParallelLayout::new(self, world)
    }
}
