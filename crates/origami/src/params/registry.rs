//! The parameter registry: every parameter registered once with its name, global shape, shard
//! and group, and given a range in its group's flat buffer.

use serde::{Deserialize, Serialize};

use super::{Buffers, Shard};

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
    pub(super) group: ParamGroup,
    pub(super) offset: usize,
    pub(super) len: usize,
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

    /// Where the parameter starts in its group's buffer.
    pub fn offset(&self) -> usize {
        self.offset
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
    /// Whether this is another pipeline stage's copy of a parameter whose owner is elsewhere
    /// (the tied embedding table on the last stage): trained exactly like the owner's, but
    /// counted once in the gradient norm and written once in checkpoints — by the owner.
    pub duplicate: bool,
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

    /// Registers this rank's copy of a parameter that another pipeline stage owns (the last
    /// stage's copy of a tied embedding table): same name, shape, shard and initialisation, so
    /// both copies start equal and stay equal under identical updates.
    pub fn register_duplicate(
        &mut self,
        name: String,
        global_shape: &[usize],
        shard: Shard,
        group: ParamGroup,
        init: Init,
    ) -> ParamId {
        let id = self.add(name, global_shape, shard, group, init, true);
        self.params.last_mut().expect("just added").duplicate = true;
        id
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
            duplicate: false,
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
