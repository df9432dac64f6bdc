//! The parameter registry and the flat buffers behind it.
//!
//! Every parameter is registered once with its name, global shape and group, and gets a range in
//! one of two contiguous buffers: dense parameters (reduced over data-parallel ranks) and expert
//! parameters (reduced over expert-data-parallel ranks). Gradients and optimizer moments use the
//! same layout, so reductions and the optimizer work on large flat ranges.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Which flat buffer (and so which reduction group) a parameter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ParamGroup {
    /// Replicated over dp-cp (attention, norms, embeddings, router, shared experts).
    Dense,
    /// Owned by expert-parallel ranks, replicated over edp.
    Expert,
}

/// Where one parameter lives: a copyable handle that layers keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamId {
    group: ParamGroup,
    offset: usize,
    len: usize,
}

impl ParamId {
    /// The buffer (and reduction group) the parameter lives in.
    pub fn group(&self) -> ParamGroup {
        self.group
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the parameter has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// How a parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Init {
    /// Normal with this standard deviation (seeded by name and global index).
    Normal(f32),
    /// Every element this value (norm weights 1, biases 0).
    Constant(f32),
}

/// The part of a parameter's global tensor one rank holds: for each dimension, the global index
/// ranges it keeps, concatenated in order. A fused `[gate; up]` projection split over expert
/// tensor-parallel ranks keeps two ranges of its rows; a full tensor keeps `0..len` everywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    ranges: Vec<Vec<Range<usize>>>,
}

impl Shard {
    /// The whole tensor of `shape`.
    pub fn full(shape: &[usize]) -> Self {
        Shard {
            ranges: shape
                .iter()
                .map(|&n| std::iter::once(0..n).collect())
                .collect(),
        }
    }

    /// The whole tensor except dimension `dim`, of which only `ranges` are kept.
    pub fn along(shape: &[usize], dim: usize, ranges: Vec<Range<usize>>) -> Self {
        let mut shard = Shard::full(shape);
        shard.ranges[dim] = ranges;
        shard
    }

    /// Further restricts dimension `dim` to `ranges`.
    pub fn and(mut self, dim: usize, ranges: Vec<Range<usize>>) -> Self {
        self.ranges[dim] = ranges;
        self
    }

    /// Shape of the local part.
    pub fn local_shape(&self) -> Vec<usize> {
        self.ranges
            .iter()
            .map(|r| r.iter().map(|r| r.len()).sum())
            .collect()
    }

    /// Global row-major index of every local element, in local row-major order.
    pub fn global_indices(&self, global_shape: &[usize]) -> Vec<usize> {
        let mut indices = vec![0usize];
        for (ranges, &extent) in self.ranges.iter().zip(global_shape) {
            let kept: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
            indices = indices
                .iter()
                .flat_map(|&base| kept.iter().map(move |&i| base * extent + i))
                .collect();
        }
        indices
    }

    /// This shard's elements of the full tensor `full` of `global_shape`.
    pub fn extract(&self, global_shape: &[usize], full: &[f32]) -> Vec<f32> {
        self.global_indices(global_shape)
            .into_iter()
            .map(|i| full[i])
            .collect()
    }
}

/// Registry entry of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// Unique dotted name, e.g. `layers.3.attention.qkv.weight`.
    pub name: String,
    /// Global shape.
    pub shape: Vec<usize>,
    /// The part of the global tensor this rank holds.
    pub shard: Shard,
    /// Where it lives.
    pub id: ParamId,
    /// Initialisation rule.
    pub init: Init,
    /// Whether AdamW applies weight decay to it (not to norms and biases).
    pub weight_decay: bool,
    /// Whether the optimizer updates it; buffers (e.g. the router's expert bias) are changed by
    /// their own rules but live, and are checkpointed, with the parameters.
    pub trainable: bool,
}

/// All parameters of a model and the sizes of the two buffers.
#[derive(Clone, Debug, Default)]
pub struct ParamRegistry {
    params: Vec<ParamInfo>,
    dense_len: usize,
    expert_len: usize,
}

impl ParamRegistry {
    /// Registers a trained parameter at the end of its group's buffer.
    pub fn register(
        &mut self,
        name: String,
        shape: &[usize],
        group: ParamGroup,
        init: Init,
    ) -> ParamId {
        self.add(name, shape, Shard::full(shape), group, init, true)
    }

    /// Registers a trained parameter of `global_shape` of which this rank holds `shard`.
    pub fn register_sharded(
        &mut self,
        name: String,
        global_shape: &[usize],
        shard: Shard,
        group: ParamGroup,
        init: Init,
    ) -> ParamId {
        self.add(name, global_shape, shard, group, init, true)
    }

    /// Registers a buffer: stored and checkpointed like a parameter, never updated by the optimizer.
    pub fn register_buffer(
        &mut self,
        name: String,
        shape: &[usize],
        group: ParamGroup,
        init: Init,
    ) -> ParamId {
        self.add(name, shape, Shard::full(shape), group, init, false)
    }

    fn add(
        &mut self,
        name: String,
        shape: &[usize],
        shard: Shard,
        group: ParamGroup,
        init: Init,
        trainable: bool,
    ) -> ParamId {
        assert!(
            self.params.iter().all(|p| p.name != name),
            "parameter {name} registered twice"
        );
        let len = shard.local_shape().iter().product();
        let end = match group {
            ParamGroup::Dense => &mut self.dense_len,
            ParamGroup::Expert => &mut self.expert_len,
        };
        let id = ParamId {
            group,
            offset: *end,
            len,
        };
        *end += len;
        let weight_decay = trainable && shape.len() > 1;
        self.params.push(ParamInfo {
            name,
            shape: shape.to_vec(),
            shard,
            id,
            init,
            weight_decay,
            trainable,
        });
        id
    }

    /// Every parameter in registration order.
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    /// Looks a parameter up by name.
    pub fn find(&self, name: &str) -> Option<&ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Total number of parameters.
    pub fn total_len(&self) -> usize {
        self.dense_len + self.expert_len
    }

    /// Whether every parameter is held whole (a single rank, or no sharded parameter).
    pub fn is_unsharded(&self) -> bool {
        self.params.iter().all(|p| p.shard == Shard::full(&p.shape))
    }

    /// This registry's part of `full`, buffers laid out by `full_registry` (the same model on
    /// one rank): each parameter found by name and cut to its shard.
    pub fn shard_of(&self, full_registry: &ParamRegistry, full: &Buffers) -> Buffers {
        let mut local = self.zeros();
        for info in &self.params {
            let whole = full_registry
                .find(&info.name)
                .unwrap_or_else(|| panic!("parameter {} missing from the full model", info.name));
            let values = info.shard.extract(&info.shape, full.get(whole.id));
            local.get_mut(info.id).copy_from_slice(&values);
        }
        local
    }

    /// A zero-filled buffer pair of this registry's layout.
    pub fn zeros(&self) -> Buffers {
        Buffers {
            dense: vec![0.0; self.dense_len],
            expert: vec![0.0; self.expert_len],
        }
    }
}

/// Two flat buffers (dense, expert) in a registry's layout: parameters, gradients or moments.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffers {
    /// Dense parameters' values.
    pub dense: Vec<f32>,
    /// Expert parameters' values.
    pub expert: Vec<f32>,
}

impl Buffers {
    /// The values of one parameter.
    pub fn get(&self, id: ParamId) -> &[f32] {
        &self.buffer(id.group)[id.offset..id.offset + id.len]
    }

    /// The values of one parameter, mutably.
    pub fn get_mut(&mut self, id: ParamId) -> &mut [f32] {
        let buffer = match id.group {
            ParamGroup::Dense => &mut self.dense,
            ParamGroup::Expert => &mut self.expert,
        };
        &mut buffer[id.offset..id.offset + id.len]
    }

    /// One whole buffer.
    pub fn buffer(&self, group: ParamGroup) -> &[f32] {
        match group {
            ParamGroup::Dense => &self.dense,
            ParamGroup::Expert => &self.expert,
        }
    }

    /// Sets every element to zero (e.g. gradients before a step).
    pub fn fill_zero(&mut self) {
        self.dense.fill(0.0);
        self.expert.fill(0.0);
    }

    /// Both buffers, mutably, for whole-buffer kernels.
    pub fn buffers_mut(&mut self) -> [&mut Vec<f32>; 2] {
        [&mut self.dense, &mut self.expert]
    }
}
