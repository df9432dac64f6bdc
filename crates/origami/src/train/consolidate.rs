//! Whole tensors from the ranks' shards, for checkpoints and the final model: a checkpoint is
//! always written in the one-rank layout, so any layout can resume any other.
//!
//! Every element of the full buffers is written by exactly one rank — on the pipeline stage that
//! holds the parameter (the first stage for a tied table, whose last-stage copy is a duplicate),
//! the first data-parallel replica of its shard (and, for tensors that tensor-parallel ranks
//! hold whole, the first tp rank) — and zero elsewhere, so one all-reduce (sum) over the world
//! assembles the tensors exactly on every rank.

use std::sync::Arc;

use origami_comm::{Communicator, ReduceOp};
use origami_parallel::ParallelState;

use crate::params::{Buffers, ParamGroup, ParamRegistry, Shard};

/// Assembles the full buffers, laid out by `full_registry`, from every rank's `local` buffers
/// (laid out by `registry`). Collective over `world`.
pub fn consolidate(
    world: &Arc<dyn Communicator>,
    state: &ParallelState,
    registry: &ParamRegistry,
    local: &Buffers,
    full_registry: &ParamRegistry,
) -> origami_comm::Result<Buffers> {
    let mut full = full_registry.zeros();
    let first_dense_replica = state.dp_cp().rank() == 0;
    let first_expert_replica = state.edp().rank() == 0;
    let first_tp_rank = state.tp().rank() == 0;
    for info in registry.params().iter().filter(|p| !p.duplicate) {
        let owner = match info.id.group() {
            ParamGroup::Dense if info.shard == Shard::full(&info.shape) => {
                first_dense_replica && first_tp_rank
            }
            ParamGroup::Dense => first_dense_replica,
            ParamGroup::Expert => first_expert_replica,
        };
        if !owner {
            continue;
        }
        let whole = full_registry
            .find(&info.name)
            .unwrap_or_else(|| panic!("parameter {} missing from the full model", info.name));
        let target = full.get_mut(whole.id);
        for (index, &value) in info
            .shard
            .global_indices(&info.shape)
            .into_iter()
            .zip(local.get(info.id))
        {
            target[index] = value;
        }
    }
    if world.size() > 1 {
        for buffer in full.buffers_mut() {
            world.all_reduce(buffer, ReduceOp::Sum)?;
        }
    }
    Ok(full)
}
