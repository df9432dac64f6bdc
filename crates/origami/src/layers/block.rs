//! Pre-norm transformer block: `h = x + attention(norm1(x))`, `y = h + ffn(norm2(h))`, where the
//! feed-forward part is a dense SwiGLU MLP or an MoE layer.
//!
//! Backward follows the residual stream: `dh = dy + norm2ᵀ(ffnᵀ(dy))`,
//! `dx = dh + norm1ᵀ(attentionᵀ(dh))`.
//!
//! The residual stream, norms and the MoE layer work on this rank's sequence-parallel slice of
//! the tokens; attention and a dense MLP are tensor-parallel regions entered by an all-gather
//! and left by a reduce-scatter over tp (both no-ops on one rank). The residual add and the
//! second norm run as one pass (`add_rmsnorm_forward`), and so do each norm's backward and the
//! residual gradient's add (`rmsnorm_backward_add`).
//!
//! Saved state: the input, the norms' outputs and `rstd`s, the residual, and what attention
//! and the feed-forward part keep — less under [`Recompute`]: `selective` drops the norm
//! outputs (and the sub-layers their cheap parts), `full` keeps only the input.

use crate::compute::{Activation, Weights};
use crate::layers::attention::{Attention, AttentionSaved, KvCache, Positions};
use crate::layers::mlp::{Mlp, MlpSaved};
use crate::layers::moe::balance::BalanceWeights;
use crate::layers::moe::jitter::TokenKeys;
use crate::layers::moe::{MoeLayer, MoeSaved, MoeStats};
use crate::layers::recompute::Recompute;
use crate::layers::stored::Stored;
use crate::layers::tensor_parallel::TensorParallel;
use crate::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry};
use crate::profile::{timed, Phase};
use origami_kernels::rmsnorm::{add_rmsnorm_forward, rmsnorm_backward_add, rmsnorm_forward};
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
    recompute: Recompute,
}

/// Everything the backward reads, as the forward produced it.
struct Kept {
    input: Vec<f32>,
    /// The normalised input gathered over tp (attention's input, in the compute precision);
    /// `None` when recomputed.
    attention_norm_out: Option<Activation>,
    attention_rstd: Vec<f32>,
    attention: AttentionSaved,
    residual: Vec<f32>,
    /// The normalised residual: gathered over tp for a dense MLP (its input, in the compute
    /// precision), this rank's slice for MoE (the router's input, f32); `None` when
    /// recomputed.
    ffn_norm_out: Option<Activation>,
    ffn_rstd: Vec<f32>,
    ffn: FeedForwardSaved,
}

/// What the forward keeps for the backward.
pub struct BlockSaved(Saved);

enum Saved {
    /// No or selective recomputation.
    Kept(Box<Kept>),
    /// Full recomputation: the input, and the load-balancing weights of an MoE block.
    Input {
        input: Vec<f32>,
        balance: Option<BalanceWeights>,
    },
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
            recompute: Recompute::None,
        }
    }

    /// What the backward recomputes ([`Recompute`]).
    pub fn set_recompute(&mut self, recompute: Recompute) {
        self.recompute = recompute;
        let selective = recompute == Recompute::Selective;
        self.attention.set_recompute_core(selective);
        match &mut self.ffn {
            FeedForward::Dense(mlp) => mlp.set_recompute_activation(selective),
            FeedForward::Moe(moe) => moe.set_recompute_activations(selective),
        }
    }

    /// The MoE layer of an MoE block.
    pub fn moe(&self) -> Option<&MoeLayer> {
        match &self.ffn {
            FeedForward::Moe(moe) => Some(moe),
            FeedForward::Dense(_) => None,
        }
    }

    /// Attention's input: `x` normalised and gathered over tp, and the norm's `rstd`.
    fn attention_input(&self, params: &Weights, x: &[f32], batch: usize) -> (Activation, Vec<f32>) {
        let mut normed = vec![0.0; x.len()];
        let rstd = timed(Phase::Elementwise, || {
            rmsnorm_forward(
                &mut normed,
                x,
                params.get(self.attention_norm),
                self.hidden,
                self.norm_eps,
            )
        });
        let gathered = self
            .tp
            .gather_activation(params, normed, batch, self.hidden);
        (gathered, rstd)
    }

    /// The feed-forward part's input from the normalised residual: gathered over tp for a
    /// dense MLP, as it is (f32, the router's input) for MoE.
    fn ffn_input(&self, params: &Weights, normed: Vec<f32>, batch: usize) -> Activation {
        match &self.ffn {
            FeedForward::Dense(_) => self
                .tp
                .gather_activation(params, normed, batch, self.hidden),
            FeedForward::Moe(_) => Activation::F32(normed),
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
        let (y, kept, stats) = self.forward_kept(params, x, (batch, seq), positions, jitter, None);
        let saved = match self.recompute {
            Recompute::Full => {
                let balance = match &kept.ffn {
                    FeedForwardSaved::Moe(saved) => Some(saved.balance().clone()),
                    FeedForwardSaved::Dense(_) => None,
                };
                Saved::Input {
                    input: kept.input,
                    balance,
                }
            }
            Recompute::None | Recompute::Selective => Saved::Kept(Box::new(kept)),
        };
        (y, BlockSaved(saved), stats)
    }

    /// The forward, keeping what the backward reads; `replay` is the balance weights of an MoE
    /// block's first run when this one recomputes it.
    fn forward_kept(
        &self,
        params: &Weights,
        x: Vec<f32>,
        (batch, seq): (usize, usize),
        positions: &Positions,
        jitter: Option<&TokenKeys>,
        replay: Option<&BalanceWeights>,
    ) -> (Vec<f32>, Kept, Option<MoeStats>) {
        let (attention_norm_out, attention_rstd) = self.attention_input(params, &x, batch);
        let (partial, attention) =
            self.attention
                .forward(params, &attention_norm_out, batch, seq, positions);
        let mut residual = self.tp.scatter_sequence(partial, batch, self.hidden);
        let mut normed = vec![0.0; x.len()];
        let ffn_rstd = timed(Phase::Elementwise, || {
            add_rmsnorm_forward(
                &mut normed,
                &mut residual,
                &x,
                params.get(self.ffn_norm),
                self.hidden,
                self.norm_eps,
            )
        });
        let ffn_norm_out = self.ffn_input(params, normed, batch);
        let (mut y, ffn, stats) = match &self.ffn {
            FeedForward::Dense(mlp) => {
                let (partial, saved) = mlp.forward(params, &ffn_norm_out);
                let y = self.tp.scatter_sequence(partial, batch, self.hidden);
                (y, FeedForwardSaved::Dense(saved), None)
            }
            FeedForward::Moe(moe) => {
                let x = ffn_norm_out.as_f32();
                let (y, saved, stats) = match replay {
                    Some(balance) => {
                        let (y, saved) = moe.replay(params, x, batch, jitter, balance);
                        (y, saved, None)
                    }
                    None => {
                        let (y, saved, stats) = moe.forward_with_jitter(params, x, batch, jitter);
                        (y, saved, Some(stats))
                    }
                };
                (y, FeedForwardSaved::Moe(Box::new(saved)), stats)
            }
        };
        timed(Phase::Elementwise, || {
            y.iter_mut().zip(&residual).for_each(|(a, r)| *a += r)
        });
        let keep_norms = self.recompute != Recompute::Selective;
        let kept = Kept {
            input: x,
            attention_norm_out: keep_norms.then_some(attention_norm_out),
            attention_rstd,
            attention,
            residual,
            ffn_norm_out: keep_norms.then_some(ffn_norm_out),
            ffn_rstd,
            ffn,
        };
        (y, kept, stats)
    }

    /// Accumulates parameter gradients and returns `dx`. `jitter` is the forward's (a full
    /// recomputation replays the router with it).
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
        jitter: Option<&TokenKeys>,
    ) -> Vec<f32> {
        let kept = match saved.0 {
            Saved::Kept(kept) => *kept,
            Saved::Input { input, balance } => {
                let replay = balance.as_ref();
                let seq = (batch, seq);
                self.forward_kept(params, input, seq, positions, jitter, replay)
                    .1
            }
        };
        let ffn_norm_out = kept.ffn_norm_out.unwrap_or_else(|| {
            let mut normed = vec![0.0; kept.residual.len()];
            timed(Phase::Elementwise, || {
                rmsnorm_forward(
                    &mut normed,
                    &kept.residual,
                    params.get(self.ffn_norm),
                    self.hidden,
                    self.norm_eps,
                )
            });
            self.ffn_input(params, normed, batch)
        });
        let d_ffn_norm_out = match (&self.ffn, kept.ffn) {
            (FeedForward::Dense(mlp), FeedForwardSaved::Dense(s)) => {
                let dy_gathered = self.tp.gather_sequence(dy.clone(), batch, self.hidden);
                let mut d = vec![0.0; dy_gathered.len()];
                mlp.backward(params, grads, s, &ffn_norm_out, &dy_gathered, &mut d, false);
                self.tp.scatter_sequence(d, batch, self.hidden)
            }
            (FeedForward::Moe(moe), FeedForwardSaved::Moe(s)) => {
                moe.backward(params, grads, *s, ffn_norm_out.as_f32(), &dy, loss_scale)
            }
            _ => unreachable!("saved state matches the block's feed-forward kind"),
        };
        drop(ffn_norm_out);
        let mut d_residual = vec![0.0; dy.len()];
        timed(Phase::Elementwise, || {
            rmsnorm_backward_add(
                &mut d_residual,
                grads.get_mut(self.ffn_norm),
                &d_ffn_norm_out,
                &kept.residual,
                params.get(self.ffn_norm),
                &kept.ffn_rstd,
                self.hidden,
                &dy,
            )
        });
        drop((dy, d_ffn_norm_out));
        let attention_norm_out = kept
            .attention_norm_out
            .unwrap_or_else(|| self.attention_input(params, &kept.input, batch).0);
        let d_residual_gathered = self
            .tp
            .gather_sequence(d_residual.clone(), batch, self.hidden);
        let partial = self.attention.backward(
            params,
            grads,
            kept.attention,
            &attention_norm_out,
            &d_residual_gathered,
            batch,
            seq,
            positions,
        );
        drop((d_residual_gathered, attention_norm_out));
        let d_attention_norm_out = self.tp.scatter_sequence(partial, batch, self.hidden);
        let mut dx = vec![0.0; d_residual.len()];
        timed(Phase::Elementwise, || {
            rmsnorm_backward_add(
                &mut dx,
                grads.get_mut(self.attention_norm),
                &d_attention_norm_out,
                &kept.input,
                params.get(self.attention_norm),
                &kept.attention_rstd,
                self.hidden,
                &d_residual,
            )
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
        match &self.0 {
            Saved::Kept(kept) => {
                let ffn = match &kept.ffn {
                    FeedForwardSaved::Dense(saved) => saved.stored_bytes(),
                    FeedForwardSaved::Moe(saved) => saved.stored_bytes(),
                };
                kept.input.stored_bytes()
                    + kept.attention_norm_out.stored_bytes()
                    + kept.attention_rstd.stored_bytes()
                    + kept.attention.stored_bytes()
                    + kept.residual.stored_bytes()
                    + kept.ffn_norm_out.stored_bytes()
                    + kept.ffn_rstd.stored_bytes()
                    + ffn
            }
            Saved::Input { input, balance } => input.stored_bytes() + balance.stored_bytes(),
        }
    }
}
