//! Pre-norm transformer block: `h = x + attention(norm1(x))`, `y = h + ffn(norm2(h))`, where the
//! feed-forward part is a dense SwiGLU MLP or an MoE layer.
//!
//! Backward follows the residual stream: `dh = dy + norm2ᵀ(ffnᵀ(dy))`,
//! `dx = dh + norm1ᵀ(attentionᵀ(dh))`.
//!
//! The residual stream, norms and the MoE layer work on this rank's sequence-parallel slice of
//! the tokens; attention and a dense MLP are tensor-parallel regions entered by an all-gather
//! and left by a reduce-scatter over tp (both no-ops on one rank).

use crate::compute::{Activation, Weights};
use crate::layers::attention::{Attention, AttentionSaved, KvCache, Positions};
use crate::layers::mlp::{Mlp, MlpSaved};
use crate::layers::moe::jitter::TokenKeys;
use crate::layers::moe::{MoeLayer, MoeSaved, MoeStats};
use crate::layers::stored::Stored;
use crate::layers::tensor_parallel::TensorParallel;
use crate::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry};
use crate::profile::{timed, Phase};
use origami_kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use origami_kernels::rope::RopeTable;

/// The feed-forward half of a block.
#[derive(Clone, Debug)]
pub enum FeedForward {
    /// Dense SwiGLU MLP.
    Dense(Mlp),
    /// Mixture of experts.
    Moe(Box<MoeLayer>),
}

enum FeedForwardSaved {
    Dense(MlpSaved),
    Moe(Box<MoeSaved>),
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    hidden: usize,
    norm_eps: f32,
    attention_norm: ParamId,
    attention: Attention,
    ffn_norm: ParamId,
    ffn: FeedForward,
    tp: TensorParallel,
}

/// What the forward keeps for the backward.
pub struct BlockSaved {
    input: Vec<f32>,
    /// The normalised input gathered over tp (attention's input, in the compute precision).
    attention_norm_out: Activation,
    attention_rstd: Vec<f32>,
    attention: AttentionSaved,
    residual: Vec<f32>,
    /// The normalised residual: gathered over tp for a dense MLP (its input, in the compute
    /// precision), this rank's slice for MoE (the router's input, f32).
    ffn_norm_out: Activation,
    ffn_rstd: Vec<f32>,
    ffn: FeedForwardSaved,
}

impl Block {
    /// Assembles a block from its parts, registering its two norm weights under `prefix`;
    /// `tp` is the group its attention and dense MLP are split over.
    pub fn new(
        registry: &mut ParamRegistry,
        prefix: &str,
        (hidden, norm_eps): (usize, f32),
        attention: Attention,
        ffn: FeedForward,
        tp: TensorParallel,
    ) -> Self {
        let attention_norm = registry.register(
            format!("{prefix}.attention_norm.weight"),
            &[hidden],
            ParamGroup::Dense,
            Init::Constant(1.0),
        );
        let ffn_norm = registry.register(
            format!("{prefix}.ffn_norm.weight"),
            &[hidden],
            ParamGroup::Dense,
            Init::Constant(1.0),
        );
        Block {
            hidden,
            norm_eps,
            attention_norm,
            attention,
            ffn_norm,
            ffn,
            tp,
        }
    }

    /// The MoE layer of an MoE block.
    pub fn moe(&self) -> Option<&MoeLayer> {
        match &self.ffn {
            FeedForward::Moe(moe) => Some(moe),
            FeedForward::Dense(_) => None,
        }
    }

    /// Runs the block on this rank's slice `x` of `batch` sequences (whose context-parallel part
    /// has `seq` tokens each); returns the output, saved state, and MoE stats for MoE blocks.
    /// In training `jitter` holds the keys of the slice's tokens, for an MoE router's input
    /// jitter (`None` in evaluation).
    pub fn forward(
        &self,
        params: &Weights,
        x: Vec<f32>,
        batch: usize,
        seq: usize,
        positions: &Positions,
        jitter: Option<&TokenKeys>,
    ) -> (Vec<f32>, BlockSaved, Option<MoeStats>) {
        let mut attention_norm_out = vec![0.0; x.len()];
        let attention_rstd = timed(Phase::Elementwise, || {
            rmsnorm_forward(
                &mut attention_norm_out,
                &x,
                params.get(self.attention_norm),
                self.hidden,
                self.norm_eps,
            )
        });
        let attention_norm_out = params.activation(self.tp.gather_sequence(
            attention_norm_out,
            batch,
            self.hidden,
        ));
        let (partial, attention) =
            self.attention
                .forward(params, &attention_norm_out, batch, seq, positions);
        let mut residual = self.tp.scatter_sequence(partial, batch, self.hidden);
        timed(Phase::Elementwise, || {
            residual.iter_mut().zip(&x).for_each(|(r, v)| *r += v)
        });
        let mut ffn_norm_out = vec![0.0; x.len()];
        let ffn_rstd = timed(Phase::Elementwise, || {
            rmsnorm_forward(
                &mut ffn_norm_out,
                &residual,
                params.get(self.ffn_norm),
                self.hidden,
                self.norm_eps,
            )
        });
        let (mut y, ffn, stats, ffn_norm_out) = match &self.ffn {
            FeedForward::Dense(mlp) => {
                let gathered =
                    params.activation(self.tp.gather_sequence(ffn_norm_out, batch, self.hidden));
                let (partial, saved) = mlp.forward(params, &gathered);
                let y = self.tp.scatter_sequence(partial, batch, self.hidden);
                (y, FeedForwardSaved::Dense(saved), None, gathered)
            }
            FeedForward::Moe(moe) => {
                let (y, saved, stats) =
                    moe.forward_with_jitter(params, &ffn_norm_out, batch, jitter);
                (
                    y,
                    FeedForwardSaved::Moe(Box::new(saved)),
                    Some(stats),
                    Activation::F32(ffn_norm_out),
                )
            }
        };
        timed(Phase::Elementwise, || {
            y.iter_mut().zip(&residual).for_each(|(a, r)| *a += r)
        });
        let saved = BlockSaved {
            input: x,
            attention_norm_out,
            attention_rstd,
            attention,
            residual,
            ffn_norm_out,
            ffn_rstd,
            ffn,
        };
        (y, saved, stats)
    }

    /// Accumulates parameter gradients and returns `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &Weights,
        grads: &mut Buffers,
        saved: BlockSaved,
        dy: Vec<f32>,
        loss_scale: f32,
        batch: usize,
        seq: usize,
        positions: &Positions,
    ) -> Vec<f32> {
        let d_ffn_norm_out = match (&self.ffn, saved.ffn) {
            (FeedForward::Dense(mlp), FeedForwardSaved::Dense(s)) => {
                let dy_gathered = self.tp.gather_sequence(dy.clone(), batch, self.hidden);
                let mut d = vec![0.0; dy_gathered.len()];
                mlp.backward(
                    params,
                    grads,
                    s,
                    &saved.ffn_norm_out,
                    &dy_gathered,
                    &mut d,
                    false,
                );
                self.tp.scatter_sequence(d, batch, self.hidden)
            }
            (FeedForward::Moe(moe), FeedForwardSaved::Moe(s)) => moe.backward(
                params,
                grads,
                *s,
                saved.ffn_norm_out.as_f32(),
                &dy,
                loss_scale,
            ),
            _ => unreachable!("saved state matches the block's feed-forward kind"),
        };
        let mut d_residual = vec![0.0; dy.len()];
        timed(Phase::Elementwise, || {
            rmsnorm_backward(
                &mut d_residual,
                grads.get_mut(self.ffn_norm),
                &d_ffn_norm_out,
                &saved.residual,
                params.get(self.ffn_norm),
                &saved.ffn_rstd,
                self.hidden,
            )
        });
        timed(Phase::Elementwise, || {
            d_residual.iter_mut().zip(&dy).for_each(|(d, g)| *d += g)
        });
        drop(dy);
        let d_residual_gathered = self
            .tp
            .gather_sequence(d_residual.clone(), batch, self.hidden);
        let partial = self.attention.backward(
            params,
            grads,
            saved.attention,
            &saved.attention_norm_out,
            &d_residual_gathered,
            batch,
            seq,
            positions,
        );
        drop(d_residual_gathered);
        let d_attention_norm_out = self.tp.scatter_sequence(partial, batch, self.hidden);
        let mut dx = vec![0.0; d_residual.len()];
        timed(Phase::Elementwise, || {
            rmsnorm_backward(
                &mut dx,
                grads.get_mut(self.attention_norm),
                &d_attention_norm_out,
                &saved.input,
                params.get(self.attention_norm),
                &saved.attention_rstd,
                self.hidden,
            )
        });
        timed(Phase::Elementwise, || {
            dx.iter_mut().zip(&d_residual).for_each(|(d, g)| *d += g)
        });
        dx
    }

    /// Incremental decoding of one token `x[hidden]` at `position`, using and extending `cache`.
    pub fn decode(
        &self,
        params: &Weights,
        x: &[f32],
        position: usize,
        rope: &RopeTable,
        cache: &mut KvCache,
    ) -> Vec<f32> {
        let mut normed = vec![0.0; x.len()];
        timed(Phase::Elementwise, || {
            rmsnorm_forward(
                &mut normed,
                x,
                params.get(self.attention_norm),
                self.hidden,
                self.norm_eps,
            )
        });
        let mut residual = self
            .attention
            .decode(params, &normed, position, rope, cache);
        residual.iter_mut().zip(x).for_each(|(r, v)| *r += v);
        timed(Phase::Elementwise, || {
            rmsnorm_forward(
                &mut normed,
                &residual,
                params.get(self.ffn_norm),
                self.hidden,
                self.norm_eps,
            )
        });
        let mut y = match &self.ffn {
            FeedForward::Dense(mlp) => mlp.forward(params, &params.activation(normed)).0,
            FeedForward::Moe(moe) => moe.forward(params, &normed).0,
        };
        timed(Phase::Elementwise, || {
            y.iter_mut().zip(&residual).for_each(|(a, r)| *a += r)
        });
        y
    }
}

impl Stored for BlockSaved {
    fn stored_bytes(&self) -> usize {
        let ffn = match &self.ffn {
            FeedForwardSaved::Dense(saved) => saved.stored_bytes(),
            FeedForwardSaved::Moe(saved) => saved.stored_bytes(),
        };
        self.input.stored_bytes()
            + self.attention_norm_out.stored_bytes()
            + self.attention_rstd.stored_bytes()
            + self.attention.stored_bytes()
            + self.residual.stored_bytes()
            + self.ffn_norm_out.stored_bytes()
            + self.ffn_rstd.stored_bytes()
            + ffn
    }
}
