//! Every group of every kind over the whole world, for both mappings, in generation order.

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::{Axis, ParallelLayout};

/// Which of the two folded mappings a group belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Attention and dense layers: `tp × cp × dp × pp`.
    Dense,
    /// MoE layers: `etp × ep × edp × pp`.
    Expert,
}

/// Every kind of group a rank needs (DESIGN.md §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupKind {
    /// Tensor parallel.
    Tp,
    /// Context parallel.
    Cp,
    /// Data parallel.
    Dp,
    /// Data and context parallel together: where dense gradients are averaged.
    DpCp,
    /// Pipeline: the stages one micro-batch passes through.
    Pp,
    /// Model parallel: tensor and pipeline.
    TpPp,
    /// Tensor and context parallel.
    TpCp,
    /// Tensor, data and context parallel: where router load is summed.
    TpDpCp,
    /// First and last pipeline stage of each pipeline group (tied embeddings).
    Embedding,
    /// Expert parallel: where tokens are dispatched.
    Ep,
    /// Expert tensor parallel.
    Etp,
    /// Expert data parallel: where expert gradients are reduced.
    Edp,
    /// Expert tensor and expert parallel together.
    TpEp,
    /// Expert tensor, expert and pipeline parallel together.
    TpEpPp,
}

impl GroupKind {
    /// Every kind, dense first, in the order of the topology JSON.
    pub const ALL: [GroupKind; 14] = [
        GroupKind::Tp,
        GroupKind::Cp,
        GroupKind::Dp,
        GroupKind::DpCp,
        GroupKind::Pp,
        GroupKind::TpPp,
        GroupKind::TpCp,
        GroupKind::TpDpCp,
        GroupKind::Embedding,
        GroupKind::Ep,
        GroupKind::Etp,
        GroupKind::Edp,
        GroupKind::TpEp,
        GroupKind::TpEpPp,
    ];

    /// The key of this kind in the topology JSON (`dp_cp`, `tp_ep_pp`, …).
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Tp => "tp",
            GroupKind::Cp => "cp",
            GroupKind::Dp => "dp",
            GroupKind::DpCp => "dp_cp",
            GroupKind::Pp => "pp",
            GroupKind::TpPp => "tp_pp",
            GroupKind::TpCp => "tp_cp",
            GroupKind::TpDpCp => "tp_dp_cp",
            GroupKind::Embedding => "embedding",
            GroupKind::Ep => "ep",
            GroupKind::Etp => "etp",
            GroupKind::Edp => "edp",
            GroupKind::TpEp => "tp_ep",
            GroupKind::TpEpPp => "tp_ep_pp",
        }
    }

    /// The mapping whose rank grid generates this kind.
    pub fn mapping(self) -> Mapping {
        match self {
            GroupKind::Ep
            | GroupKind::Etp
            | GroupKind::Edp
            | GroupKind::TpEp
            | GroupKind::TpEpPp => Mapping::Expert,
            _ => Mapping::Dense,
        }
    }

    /// The axes of the mapping's grid this kind spans (embedding groups derive from pp).
    fn axes(self) -> &'static [Axis] {
        match self {
            GroupKind::Tp | GroupKind::Etp => &[Axis::Tp],
            GroupKind::Cp => &[Axis::Cp],
            GroupKind::Dp | GroupKind::Edp => &[Axis::Dp],
            GroupKind::DpCp => &[Axis::Dp, Axis::Cp],
            GroupKind::Pp | GroupKind::Embedding => &[Axis::Pp],
            GroupKind::TpPp => &[Axis::Tp, Axis::Pp],
            GroupKind::TpCp => &[Axis::Tp, Axis::Cp],
            GroupKind::TpDpCp => &[Axis::Tp, Axis::Dp, Axis::Cp],
            GroupKind::Ep => &[Axis::Ep],
            GroupKind::TpEp => &[Axis::Tp, Axis::Ep],
            GroupKind::TpEpPp => &[Axis::Tp, Axis::Ep, Axis::Pp],
        }
    }
}

/// All groups of a [`ParallelLayout`], kind by kind.
#[derive(Clone, Debug)]
pub struct Topology {
    layout: ParallelLayout,
    groups: Vec<Vec<Vec<usize>>>,
}

impl Topology {
    /// Generates every group of every kind.
    pub fn new(layout: &ParallelLayout) -> Self {
        let dense = layout.dense_generator();
        let expert = layout.expert_generator();
        let groups = GroupKind::ALL
            .iter()
            .map(|&kind| {
                let generator = match kind.mapping() {
                    Mapping::Dense => &dense,
                    Mapping::Expert => &expert,
                };
                let groups = generator.groups(kind.axes());
                if kind == GroupKind::Embedding {
                    groups
                        .iter()
                        .map(|pipeline| first_and_last(pipeline))
                        .collect()
                } else {
                    groups
                }
            })
            .collect();
        Topology {
            layout: layout.clone(),
            groups,
        }
    }

    /// The layout these groups come from.
    pub fn layout(&self) -> &ParallelLayout {
        &self.layout
    }

    /// The groups of `kind`, in generation order.
    pub fn groups(&self, kind: GroupKind) -> &[Vec<usize>] {
        &self.groups[kind as usize]
    }

    /// The group of `kind` holding `rank`; `None` only for an embedding group of a middle stage.
    pub fn group_of(&self, kind: GroupKind, rank: usize) -> Option<&[usize]> {
        self.groups(kind)
            .iter()
            .find(|group| group.contains(&rank))
            .map(Vec::as_slice)
    }
}

/// The embedding group of one pipeline group: its first and last stage (one rank without pp).
fn first_and_last(pipeline: &[usize]) -> Vec<usize> {
    match pipeline {
        [only] => vec![*only],
        [first, .., last] => vec![*first, *last],
        [] => Vec::new(),
    }
}

impl Serialize for Topology {
    /// One object: a key per group kind (list of rank lists) and `sizes` (the layout).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(GroupKind::ALL.len() + 1))?;
        for kind in GroupKind::ALL {
            map.serialize_entry(kind.name(), self.groups(kind))?;
        }
        map.serialize_entry("sizes", &self.layout)?;
        map.end()
    }
}
