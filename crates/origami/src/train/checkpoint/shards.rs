//! What one rank writes to a checkpoint and what it reads back: its pieces of every parameter
//! and AdamW moment, each element of the checkpoint written by exactly one rank.
//!
//! Owners: a parameter's shard is written by the first data-parallel replica that holds it
//! (dense: first over dp-cp, and first over tp for tensors every tp rank holds whole; expert:
//! first over edp), never by a pipeline stage's duplicate of a tied table. Moments follow the
//! same rule, except under the distributed optimizer, where every replica writes the range of
//! the flat buffer it owns — which may cut a parameter anywhere, so its pieces are the blocks of
//! that range ([`placed_blocks`]).

use std::ops::Range;

use origami_parallel::ParallelState;

use crate::params::region::{for_each_row, placed_blocks, Block, Placed};
use crate::params::{Buffers, ParamGroup, ParamInfo, ParamRegistry, Shard};
use crate::tensor_files::{PieceData, Precision};

/// Prefixes of the two AdamW moments' tensor names.
pub const MOMENTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

/// Which replicas this rank is the first of: what it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ownership {
    /// First rank of its dp-cp group (dense parameters).
    pub first_dense_replica: bool,
    /// First rank of its tp group (dense parameters every tp rank holds whole).
    pub first_tp_rank: bool,
    /// First rank of its edp group (expert parameters).
    pub first_expert_replica: bool,
}

impl Ownership {
    /// One rank: it owns everything.
    pub fn single() -> Self {
        Ownership {
            first_dense_replica: true,
            first_tp_rank: true,
            first_expert_replica: true,
        }
    }

    /// The ownership of `state`'s rank.
    pub fn of(state: &ParallelState) -> Self {
        Ownership {
            first_dense_replica: state.dp_cp().rank() == 0,
            first_tp_rank: state.tp().rank() == 0,
            first_expert_replica: state.edp().rank() == 0,
        }
    }

    /// Whether this rank's copy of `info` is the one written, among the ranks holding it.
    fn writes(&self, info: &ParamInfo) -> bool {
        !info.duplicate
            && match info.id.group() {
                ParamGroup::Dense if info.shard == Shard::full(&info.shape) => {
                    self.first_dense_replica && self.first_tp_rank
                }
                ParamGroup::Dense => self.first_dense_replica,
                ParamGroup::Expert => self.first_expert_replica,
            }
    }

    /// Whether `info` is one this rank's tp group holds whole (only tp rank 0 writes it).
    fn whole_over_tp_elsewhere(&self, info: &ParamInfo) -> bool {
        info.id.group() == ParamGroup::Dense
            && info.shard == Shard::full(&info.shape)
            && !self.first_tp_rank
    }
}

/// The AdamW moments of one group buffer that this rank keeps: the range it owns (the whole
/// buffer without the distributed optimizer) and both moments over it.
#[derive(Clone, Debug)]
pub struct OwnedMoments<'a> {
    /// Elements of the group buffer.
    pub range: Range<usize>,
    /// First moments of the range.
    pub m: &'a [f32],
    /// Second moments of the range.
    pub v: &'a [f32],
}

/// A rank's optimizer state as the optimizer keeps it.
#[derive(Clone, Debug)]
pub struct MomentShards<'a> {
    /// Dense buffer.
    pub dense: OwnedMoments<'a>,
    /// Expert buffer.
    pub expert: OwnedMoments<'a>,
    /// Whether the moments are sharded over the replicas (each writes its own range).
    pub distributed: bool,
}

impl<'a> MomentShards<'a> {
    fn of(&self, group: ParamGroup) -> &OwnedMoments<'a> {
        match group {
            ParamGroup::Dense => &self.dense,
            ParamGroup::Expert => &self.expert,
        }
    }
}

/// What a rank contributes to a checkpoint.
pub struct Contribution<'a> {
    /// This rank's parameters.
    pub registry: &'a ParamRegistry,
    /// Their values.
    pub params: &'a Buffers,
    /// Its optimizer state.
    pub moments: MomentShards<'a>,
    /// What it writes.
    pub ownership: Ownership,
}

/// One piece this rank writes: the global tensor, its block, and its data.
pub struct PendingPiece<'a> {
    /// Global tensor name.
    pub tensor: String,
    /// Global shape of the tensor.
    pub tensor_shape: Vec<usize>,
    /// Key in the rank file.
    pub key: String,
    /// Block of the tensor.
    pub block: Block,
    /// Its values, made on demand.
    pub data: PieceData<'a>,
}

/// A piece's key: the tensor's name and the block's offset.
fn key_of(tensor: &str, block: &Block) -> String {
    let offset: Vec<String> = block.offset.iter().map(|o| o.to_string()).collect();
    format!("{tensor}@{}", offset.join(","))
}

/// The pieces of `values` (a parameter's local shard, or the part `flat` of it) as blocks.
fn pieces_of<'a>(
    tensor: String,
    info: &ParamInfo,
    values: &'a [f32],
    flat: Range<usize>,
) -> impl Iterator<Item = PendingPiece<'a>> {
    let local_shape = info.shard.local_shape();
    let shape = info.shape.clone();
    placed_blocks(&info.shard, flat.clone()).into_iter().map(
        move |Placed {
                  block,
                  local_offset,
              }| {
            let (local_shape, start) = (local_shape.clone(), flat.start);
            let source = block.clone();
            PendingPiece {
                key: key_of(&tensor, &block),
                tensor: tensor.clone(),
                tensor_shape: shape.clone(),
                data: PieceData {
                    shape: block.shape.clone(),
                    precision: Precision::F32,
                    fill: Box::new(move |out: &mut Vec<f32>| {
                        for_each_row(
                            &source,
                            &source,
                            &local_shape,
                            &local_offset,
                            |_, to, len| {
                                out.extend_from_slice(&values[to - start..to - start + len]);
                            },
                        );
                    }),
                },
                block,
            }
        },
    )
}

impl<'a> Contribution<'a> {
    /// Every piece this rank writes: its parameters' shards it owns, then its moments.
    pub fn pieces(&self) -> Vec<PendingPiece<'a>> {
        let mut pieces = Vec::new();
        for info in self.registry.params() {
            if self.ownership.writes(info) {
                let len = info.id.len();
                pieces.extend(pieces_of(
                    info.name.clone(),
                    info,
                    self.params.get(info.id),
                    0..len,
                ));
            }
        }
        for (k, prefix) in MOMENTS.iter().enumerate() {
            for info in self.registry.params() {
                let owned = self.moments.of(info.id.group());
                let moment = if k == 0 { owned.m } else { owned.v };
                let span = info.id.offset()..info.id.offset() + info.id.len();
                let flat = if self.moments.distributed {
                    if info.duplicate || self.ownership.whole_over_tp_elsewhere(info) {
                        continue;
                    }
                    span.start.max(owned.range.start)..span.end.min(owned.range.end)
                } else if self.ownership.writes(info) {
                    span.clone()
                } else {
                    continue;
                };
                if flat.is_empty() {
                    continue;
                }
                let values = &moment[flat.start - owned.range.start..flat.end - owned.range.start];
                // `values` starts at local element `flat.start − span.start` of the parameter.
                let local = flat.start - span.start..flat.end - span.start;
                pieces.extend(pieces_of(
                    format!("{prefix}.{}", info.name),
                    info,
                    values,
                    local,
                ));
            }
        }
        pieces
    }
}

/// Where a rank's loaded values go.
pub struct Targets<'a> {
    /// This rank's parameters.
    pub registry: &'a ParamRegistry,
    /// The ranges of the dense and expert buffers whose moments it keeps; `None`: parameters
    /// only.
    pub moments: Option<[Range<usize>; 2]>,
}

/// One part of a global tensor a rank needs: the local shard `shard` of the tensor, the
/// elements `flat` of its local order, into `out` (`flat.len()` elements).
pub struct Needed<'a> {
    /// Global tensor name.
    pub tensor: String,
    /// Global shape it must have.
    pub shape: Vec<usize>,
    /// The rank's shard of it.
    pub shard: &'a Shard,
    /// Elements of the shard's local order.
    pub flat: Range<usize>,
}

impl<'a> Targets<'a> {
    /// What the rank needs: each parameter's shard, then each moment's owned part.
    pub fn needs(&self) -> Vec<(Needed<'a>, Slot)> {
        let mut needs = Vec::new();
        for info in self.registry.params() {
            needs.push((
                Needed {
                    tensor: info.name.clone(),
                    shape: info.shape.clone(),
                    shard: &info.shard,
                    flat: 0..info.id.len(),
                },
                Slot::Param(info.id.group(), info.id.offset()),
            ));
        }
        let Some(owned) = &self.moments else {
            return needs;
        };
        for (k, prefix) in MOMENTS.iter().enumerate() {
            for info in self.registry.params() {
                let range = &owned[usize::from(info.id.group() == ParamGroup::Expert)];
                let span = info.id.offset()..info.id.offset() + info.id.len();
                let part = span.start.max(range.start)..span.end.min(range.end);
                if part.is_empty() {
                    continue;
                }
                needs.push((
                    Needed {
                        tensor: format!("{prefix}.{}", info.name),
                        shape: info.shape.clone(),
                        shard: &info.shard,
                        flat: part.start - span.start..part.end - span.start,
                    },
                    Slot::Moment(k, info.id.group(), part.start - range.start),
                ));
            }
        }
        needs
    }
}

/// Where a needed part's values go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Into the parameter buffer of the group, at this offset.
    Param(ParamGroup, usize),
    /// Into moment `k` (0 first, 1 second) of the group's owned range, at this offset.
    Moment(usize, ParamGroup, usize),
}
