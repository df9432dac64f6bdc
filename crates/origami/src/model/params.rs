//! The parameter registry and the flat buffers behind it.
//!
//! Every parameter is registered once with its name, global shape and group, and gets a range in
//! one of two contiguous buffers: dense parameters (reduced over data-parallel ranks) and expert
//! parameters (reduced over expert-data-parallel ranks). Gradients and optimizer moments use the
//! same layout, so reductions and the optimizer work on large flat ranges.

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

/// Registry entry of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// Unique dotted name, e.g. `layers.3.attention.qkv.weight`.
    pub name: String,
    /// Global shape.
    pub shape: Vec<usize>,
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
        self.add(name, shape, group, init, true)
    }

    /// Registers a buffer: stored and checkpointed like a parameter, never updated by the optimizer.
    pub fn register_buffer(
        &mut self,
        name: String,
        shape: &[usize],
        group: ParamGroup,
        init: Init,
    ) -> ParamId {
        self.add(name, shape, group, init, false)
    }

    fn add(
        &mut self,
        name: String,
        shape: &[usize],
        group: ParamGroup,
        init: Init,
        trainable: bool,
    ) -> ParamId {
        assert!(
            self.params.iter().all(|p| p.name != name),
            "parameter {name} registered twice"
        );
        let len = shape.iter().product();
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
