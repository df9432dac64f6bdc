//! Self-attention sub-layer: fused q/k/v projection (optional bias), RoPE on q and k, causal
//! grouped-query attention, output projection.
//!
//! The fused weight is `[(heads + 2·kv_heads)·head_dim, hidden]`, rows ordered q heads, k heads,
//! v heads. Saved state: the rotated qkv, the attention context and its log-sum-exp (f32; the
//! caller keeps the input, in the compute precision). With [`Attention::set_recompute_core`]
//! the context and log-sum-exp are recomputed from the qkv in the backward.
//!
//! Under tensor parallelism a rank holds its slice of the q heads and of the query groups (the
//! matching rows of the q, k and v blocks: column-parallel) and the matching columns of the
//! output projection (row-parallel), so its output is a partial sum over the tp group.

use crate::compute::{Activation, LinearGrads, LinearShape, Weights};
use crate::layers::context_parallel::{ContextAttention, ContextAttentionSaved};
use crate::layers::stored::Stored;
use crate::layers::tensor_parallel::TensorParallel;
use crate::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry, Shard};
use crate::profile::{scope, timed, Phase};
use origami_kernels::attention::{AttentionShape, QkvLayout};
use origami_kernels::masked_attention::MaskedAttentionShape;
use origami_kernels::rope::{rope_apply, HeadLayout, RopeTable};

/// Dimensions of the attention sub-layer.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dim of one head.
    pub head_dim: usize,
}

/// The attention sub-layer's parameters and dimensions.
#[derive(Clone, Debug)]
pub struct Attention {
    /// This rank's dimensions: its heads and query groups.
    dims: AttentionDims,
    qkv_weight: ParamId,
    qkv_bias: Option<ParamId>,
    out_weight: ParamId,
    /// Attention across the context-parallel group (`None`: every token of each sequence is
    /// on this rank).
    context: Option<ContextAttention>,
    recompute_core: bool,
}

/// What the forward keeps for the backward.
pub struct AttentionSaved {
    qkv: Vec<f32>,
    /// The core's output and saved state (`None` when the backward recomputes them).
    core: Option<(Vec<f32>, CoreSaved)>,
}

/// The attention core's saved state: the log-sum-exp of the local kernel, or what the
/// context-parallel exchange keeps.
enum CoreSaved {
    Local(Vec<f32>),
    Context(ContextAttentionSaved),
}

/// Token positions and the rotary table shared by every attention layer of a step.
pub struct Positions<'a> {
    /// Position of each token row (`row % seq` without context parallelism).
    pub of_row: &'a [usize],
    /// Global positions of one sequence's tokens on this rank (context parallelism holds two
    /// chunks of each sequence): `of_row` is this, repeated per sequence.
    pub in_sequence: &'a [usize],
    /// Rotary angles.
    pub rope: &'a RopeTable,
}

/// Keys and values of the tokens decoded so far, for one attention layer.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl Attention {
    /// Registers the parameters under `prefix` (e.g. `layers.0.attention`): this rank's slice
    /// over `tp` of the heads and query groups of `dims` (the model's; the caller checks that
    /// tp divides both).
    pub fn new(
        registry: &mut ParamRegistry,
        prefix: &str,
        dims: AttentionDims,
        bias: bool,
        (std, out_std): (f32, f32),
        tp: &TensorParallel,
        context: Option<ContextAttention>,
    ) -> Self {
        let hd = dims.head_dim;
        let qkv_rows = (dims.heads + 2 * dims.kv_heads) * hd;
        let kv_width = dims.kv_heads * hd;
        let local_rows = vec![
            tp.part(dims.heads * hd),
            tp.part_at(dims.heads * hd, kv_width),
            tp.part_at(dims.heads * hd + kv_width, kv_width),
        ];
        let qkv_shape = [qkv_rows, dims.hidden];
        let qkv_weight = registry.register_sharded(
            format!("{prefix}.qkv.weight"),
            &qkv_shape,
            Shard::along(&qkv_shape, 0, local_rows.clone()),
            ParamGroup::Dense,
            Init::Normal(std),
        );
        let qkv_bias = bias.then(|| {
            registry.register_sharded(
                format!("{prefix}.qkv.bias"),
                &[qkv_rows],
                Shard::along(&[qkv_rows], 0, local_rows),
                ParamGroup::Dense,
                Init::Constant(0.0),
            )
        });
        let out_shape = [dims.hidden, dims.heads * hd];
        let out_weight = registry.register_sharded(
            format!("{prefix}.out.weight"),
            &out_shape,
            Shard::along(&out_shape, 1, vec![tp.part(dims.heads * hd)]),
            ParamGroup::Dense,
            Init::Normal(out_std),
        );
        Attention {
            dims: AttentionDims {
                heads: dims.heads / tp.size(),
                kv_heads: dims.kv_heads / tp.size(),
                ..dims
            },
            qkv_weight,
            qkv_bias,
            out_weight,
            context,
            recompute_core: false,
        }
    }

    /// Whether the backward recomputes the attention core's output instead of keeping it.
    pub fn set_recompute_core(&mut self, on: bool) {
        self.recompute_core = on;
    }

    /// The attention core over the rotated `qkv`: the context `[rows, heads·hd]` and what its
    /// backward needs.
    fn core_forward(
        &self,
        params: &Weights,
        qkv: &[f32],
        batch: usize,
        seq: usize,
        positions: &Positions,
    ) -> (Vec<f32>, CoreSaved) {
        let d = self.dims;
        match &self.context {
            None => {
                let mut context = vec![0.0; batch * seq * d.heads * d.head_dim];
                let lse = params.attention_forward(
                    &mut context,
                    qkv,
                    (self.layout(), self.shape(batch, seq)),
                    self.scale(),
                );
                (context, CoreSaved::Local(lse))
            }
            Some(cp) => {
                let (q, kv) = self.split_qkv(qkv);
                let (context, saved) = cp.forward(
                    params.compute(),
                    &q,
                    &kv,
                    positions.in_sequence,
                    self.context_shape(batch, seq),
                    self.scale(),
                );
                (context, CoreSaved::Context(saved))
            }
        }
    }

    fn qkv_width(&self) -> usize {
        (self.dims.heads + 2 * self.dims.kv_heads) * self.dims.head_dim
    }

    fn layout(&self) -> QkvLayout {
        let hd = self.dims.head_dim;
        QkvLayout {
            row_stride: self.qkv_width(),
            q_offset: 0,
            k_offset: self.dims.heads * hd,
            v_offset: (self.dims.heads + self.dims.kv_heads) * hd,
        }
    }

    fn shape(&self, batch: usize, seq: usize) -> AttentionShape {
        AttentionShape {
            batch,
            seq,
            heads: self.dims.heads,
            kv_heads: self.dims.kv_heads,
            head_dim: self.dims.head_dim,
        }
    }

    fn rotated_heads(&self) -> HeadLayout {
        // q and k heads are adjacent in each row, so one pass rotates both.
        HeadLayout {
            row_stride: self.qkv_width(),
            offset: 0,
            heads: self.dims.heads + self.dims.kv_heads,
            head_dim: self.dims.head_dim,
        }
    }

    /// The shape of one context-parallel attention call over this rank's tokens.
    fn context_shape(&self, batch: usize, seq: usize) -> MaskedAttentionShape {
        MaskedAttentionShape {
            batch,
            q_len: seq,
            kv_len: seq,
            heads: self.dims.heads,
            kv_heads: self.dims.kv_heads,
            head_dim: self.dims.head_dim,
        }
    }

    /// Splits fused rows into compact queries `[rows, heads·hd]` and keys/values
    /// `[rows, 2·kv_heads·hd]` (k then v: the tail of each fused row).
    fn split_qkv(&self, qkv: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let _phase = scope(Phase::Attention);
        let q_width = self.dims.heads * self.dims.head_dim;
        let mut q = Vec::with_capacity(qkv.len() / self.qkv_width() * q_width);
        let mut kv = Vec::with_capacity(qkv.len() - q.capacity());
        for row in qkv.chunks(self.qkv_width()) {
            q.extend_from_slice(&row[..q_width]);
            kv.extend_from_slice(&row[q_width..]);
        }
        (q, kv)
    }

    /// The inverse of [`Attention::split_qkv`], writing into fused rows.
    fn join_qkv(&self, qkv: &mut [f32], q: &[f32], kv: &[f32]) {
        let _phase = scope(Phase::Attention);
        let q_width = self.dims.heads * self.dims.head_dim;
        let kv_width = self.qkv_width() - q_width;
        for ((row, q), kv) in qkv
            .chunks_mut(self.qkv_width())
            .zip(q.chunks(q_width))
            .zip(kv.chunks(kv_width))
        {
            row[..q_width].copy_from_slice(q);
            row[q_width..].copy_from_slice(kv);
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.dims.head_dim as f32).sqrt()
    }

    /// `y[batch·seq, hidden]` (this rank's partial sum under tensor parallelism) from the
    /// normalised input `x` (every token of the sequences' context-parallel part).
    pub fn forward(
        &self,
        params: &Weights,
        x: &Activation,
        batch: usize,
        seq: usize,
        positions: &Positions,
    ) -> (Vec<f32>, AttentionSaved) {
        let rows = batch * seq;
        let d = self.dims;
        let mut qkv = vec![0.0; rows * self.qkv_width()];
        params.linear_forward(
            &mut qkv,
            x,
            self.qkv_weight,
            self.qkv_bias,
            LinearShape::new(rows, d.hidden, self.qkv_width()),
        );
        timed(Phase::Attention, || {
            rope_apply(
                &mut qkv,
                self.rotated_heads(),
                positions.of_row,
                positions.rope,
                false,
            )
        });
        let (context, core) = self.core_forward(params, &qkv, batch, seq, positions);
        let mut y = vec![0.0; rows * d.hidden];
        params.linear_forward(
            &mut y,
            &context,
            self.out_weight,
            None,
            LinearShape::new(rows, d.heads * d.head_dim, d.hidden),
        );
        let core = (!self.recompute_core).then_some((context, core));
        (y, AttentionSaved { qkv, core })
    }

    /// Accumulates parameter gradients and returns `dx` for the normalised input `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &Weights,
        grads: &mut Buffers,
        saved: AttentionSaved,
        x: &Activation,
        dy: &[f32],
        batch: usize,
        seq: usize,
        positions: &Positions,
    ) -> Vec<f32> {
        let rows = batch * seq;
        let d = self.dims;
        let context_width = d.heads * d.head_dim;
        let (context, core) = match saved.core {
            Some(kept) => kept,
            None => self.core_forward(params, &saved.qkv, batch, seq, positions),
        };
        let mut dcontext = vec![0.0; rows * context_width];
        params.linear_backward(
            LinearGrads {
                input: Some(&mut dcontext),
                accumulate_input: false,
                weight: Some(grads.get_mut(self.out_weight)),
                bias: None,
            },
            dy,
            &context,
            self.out_weight,
            LinearShape::new(rows, context_width, d.hidden),
        );
        let mut dqkv = vec![0.0; saved.qkv.len()];
        match (&self.context, core) {
            (None, CoreSaved::Local(lse)) => params.attention_backward(
                &mut dqkv,
                &dcontext,
                &context,
                &saved.qkv,
                &lse,
                (self.layout(), self.shape(batch, seq)),
                self.scale(),
            ),
            (Some(cp), CoreSaved::Context(core)) => {
                let (q, kv) = self.split_qkv(&saved.qkv);
                let (dq, dkv) = cp.backward(
                    params.compute(),
                    core,
                    &q,
                    &kv,
                    &dcontext,
                    positions.in_sequence,
                    self.context_shape(batch, seq),
                    self.scale(),
                );
                self.join_qkv(&mut dqkv, &dq, &dkv);
            }
            _ => unreachable!("saved state matches the attention core"),
        }
        drop((dcontext, context));
        timed(Phase::Attention, || {
            rope_apply(
                &mut dqkv,
                self.rotated_heads(),
                positions.of_row,
                positions.rope,
                true,
            )
        });
        let mut dx = vec![0.0; rows * d.hidden];
        let mut dbias_storage = self.qkv_bias.map(|b| vec![0.0; b.len()]);
        params.linear_backward(
            LinearGrads {
                input: Some(&mut dx),
                accumulate_input: false,
                weight: Some(grads.get_mut(self.qkv_weight)),
                bias: dbias_storage.as_deref_mut(),
            },
            &dqkv,
            x,
            self.qkv_weight,
            LinearShape::new(rows, d.hidden, self.qkv_width()),
        );
        if let (Some(id), Some(db)) = (self.qkv_bias, dbias_storage) {
            grads
                .get_mut(id)
                .iter_mut()
                .zip(db)
                .for_each(|(g, v)| *g += v);
        }
        dx
    }

    /// Incremental decoding of one token at `position`: appends its key and value to `cache`
    /// and attends over every cached position. `x` is the normalised input `[hidden]`.
    pub fn decode(
        &self,
        params: &Weights,
        x: &[f32],
        position: usize,
        rope: &RopeTable,
        cache: &mut KvCache,
    ) -> Vec<f32> {
        let d = self.dims;
        let hd = d.head_dim;
        let mut qkv = vec![0.0; self.qkv_width()];
        params.linear_forward(
            &mut qkv,
            x,
            self.qkv_weight,
            self.qkv_bias,
            LinearShape::new(1, d.hidden, self.qkv_width()),
        );
        timed(Phase::Attention, || {
            rope_apply(&mut qkv, self.rotated_heads(), &[position], rope, false)
        });
        let layout = self.layout();
        let kv_width = d.kv_heads * hd;
        cache
            .keys
            .extend_from_slice(&qkv[layout.k_offset..layout.k_offset + kv_width]);
        cache
            .values
            .extend_from_slice(&qkv[layout.v_offset..layout.v_offset + kv_width]);
        let positions = cache.keys.len() / kv_width;
        let mut context = vec![0.0; d.heads * hd];
        let mut scores = vec![0.0f32; positions];
        for h in 0..d.heads {
            let g = h / (d.heads / d.kv_heads);
            let q = &qkv[h * hd..(h + 1) * hd];
            for (j, s) in scores.iter_mut().enumerate() {
                let k = &cache.keys[j * kv_width + g * hd..][..hd];
                *s = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * self.scale();
            }
            origami_kernels::softmax::softmax_rows(&mut scores, positions);
            let out = &mut context[h * hd..(h + 1) * hd];
            for (j, p) in scores.iter().enumerate() {
                let v = &cache.values[j * kv_width + g * hd..][..hd];
                out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
            }
        }
        let mut y = vec![0.0; d.hidden];
        params.linear_forward(
            &mut y,
            &context,
            self.out_weight,
            None,
            LinearShape::new(1, d.heads * hd, d.hidden),
        );
        y
    }
}

impl Stored for AttentionSaved {
    fn stored_bytes(&self) -> usize {
        let core = self.core.as_ref().map_or(0, |(context, core)| {
            context.stored_bytes()
                + match core {
                    CoreSaved::Local(lse) => lse.stored_bytes(),
                    CoreSaved::Context(saved) => saved.stored_bytes(),
                }
        });
        self.qkv.stored_bytes() + core
    }
}
