//! One rank's view of the parallel layout: its coordinates and every group it belongs to, each
//! with a communicator. Layers receive the groups they use from here (DESIGN.md §3: communication
//! is a value, not a global).

use std::sync::Arc;

use origami_comm::Communicator;

use crate::{Coordinates, GroupKind, ParallelError, ParallelLayout, Topology};

/// A group this rank belongs to: its members (world ranks, in generation order) and the
/// communicator over them, in which this rank's index is its position in `ranks`.
#[derive(Clone)]
pub struct Group {
    ranks: Vec<usize>,
    comm: Arc<dyn Communicator>,
}

impl Group {
    /// World ranks of the members, in generation order.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    /// The communicator over the members.
    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    /// This rank's position in the group.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
}

/// A rank's coordinates and all its dense and expert groups.
pub struct ParallelState {
    layout: ParallelLayout,
    rank: usize,
    tp: Group,
    cp: Group,
    dp: Group,
    dp_cp: Group,
    pp: Group,
    tp_pp: Group,
    tp_cp: Group,
    tp_dp_cp: Group,
    embedding: Option<Group>,
    ep: Group,
    etp: Group,
    edp: Group,
    tp_ep: Group,
    tp_ep_pp: Group,
}

impl ParallelState {
    /// Builds every group of `layout` for the rank `world` belongs to. Collective: every rank of
    /// `world` must call it with the same layout.
    pub fn new(layout: &ParallelLayout, world: &dyn Communicator) -> Result<Self, ParallelError> {
        if world.size() != layout.world() {
            return Err(ParallelError::WorldMismatch {
                comm_size: world.size(),
                world: layout.world(),
            });
        }
        let topology = Topology::new(layout);
        let rank = world.rank();
        let build = |kind: GroupKind| -> Result<Option<Group>, ParallelError> {
            let groups = topology.groups(kind);
            let comm = world.split(groups).map_err(|source| ParallelError::Comm {
                group: kind.name(),
                source,
            })?;
            Ok(comm.map(|comm| Group {
                ranks: topology.group_of(kind, rank).unwrap_or_default().to_vec(),
                comm,
            }))
        };
        let partition = |kind: GroupKind| -> Result<Group, ParallelError> {
            Ok(build(kind)?.expect("groups of every kind but embedding cover the world"))
        };
        Ok(ParallelState {
            layout: layout.clone(),
            rank,
            tp: partition(GroupKind::Tp)?,
            cp: partition(GroupKind::Cp)?,
            dp: partition(GroupKind::Dp)?,
            dp_cp: partition(GroupKind::DpCp)?,
            pp: partition(GroupKind::Pp)?,
            tp_pp: partition(GroupKind::TpPp)?,
            tp_cp: partition(GroupKind::TpCp)?,
            tp_dp_cp: partition(GroupKind::TpDpCp)?,
            embedding: build(GroupKind::Embedding)?,
            ep: partition(GroupKind::Ep)?,
            etp: partition(GroupKind::Etp)?,
            edp: partition(GroupKind::Edp)?,
            tp_ep: partition(GroupKind::TpEp)?,
            tp_ep_pp: partition(GroupKind::TpEpPp)?,
        })
    }

    /// The layout the groups come from.
    pub fn layout(&self) -> &ParallelLayout {
        &self.layout
    }

    /// This rank's world rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// This rank's position in both mappings.
    pub fn coordinates(&self) -> Coordinates {
        self.layout.coordinates(self.rank)
    }

    /// The group of `kind`; `None` only for [`GroupKind::Embedding`] on a middle stage.
    pub fn group(&self, kind: GroupKind) -> Option<&Group> {
        Some(match kind {
            GroupKind::Tp => &self.tp,
            GroupKind::Cp => &self.cp,
            GroupKind::Dp => &self.dp,
            GroupKind::DpCp => &self.dp_cp,
            GroupKind::Pp => &self.pp,
            GroupKind::TpPp => &self.tp_pp,
            GroupKind::TpCp => &self.tp_cp,
            GroupKind::TpDpCp => &self.tp_dp_cp,
            GroupKind::Embedding => return self.embedding.as_ref(),
            GroupKind::Ep => &self.ep,
            GroupKind::Etp => &self.etp,
            GroupKind::Edp => &self.edp,
            GroupKind::TpEp => &self.tp_ep,
            GroupKind::TpEpPp => &self.tp_ep_pp,
        })
    }

    /// Tensor-parallel group (dense layers).
    pub fn tp(&self) -> &Group {
        &self.tp
    }
    /// Context-parallel group.
    pub fn cp(&self) -> &Group {
        &self.cp
    }
    /// Data-parallel group (dense layers).
    pub fn dp(&self) -> &Group {
        &self.dp
    }
    /// Data- and context-parallel group: where dense gradients are averaged.
    pub fn dp_cp(&self) -> &Group {
        &self.dp_cp
    }
    /// Pipeline group, the same for both mappings.
    pub fn pp(&self) -> &Group {
        &self.pp
    }
    /// Model-parallel group (tensor and pipeline).
    pub fn tp_pp(&self) -> &Group {
        &self.tp_pp
    }
    /// Tensor- and context-parallel group.
    pub fn tp_cp(&self) -> &Group {
        &self.tp_cp
    }
    /// Tensor-, data- and context-parallel group: where router load is summed.
    pub fn tp_dp_cp(&self) -> &Group {
        &self.tp_dp_cp
    }
    /// First and last pipeline stage (tied embeddings); `None` on a middle stage.
    pub fn embedding(&self) -> Option<&Group> {
        self.embedding.as_ref()
    }
    /// Expert-parallel group: where tokens are dispatched.
    pub fn ep(&self) -> &Group {
        &self.ep
    }
    /// Expert tensor-parallel group.
    pub fn etp(&self) -> &Group {
        &self.etp
    }
    /// Expert data-parallel group: where expert gradients are reduced.
    pub fn edp(&self) -> &Group {
        &self.edp
    }
    /// Expert tensor- and expert-parallel group.
    pub fn tp_ep(&self) -> &Group {
        &self.tp_ep
    }
    /// Expert tensor-, expert- and pipeline-parallel group.
    pub fn tp_ep_pp(&self) -> &Group {
        &self.tp_ep_pp
    }
}
