//! One model chunk: the part of the model a pipeline stage runs as one unit — optionally the
//! embedding (on the first virtual stage), a run of consecutive blocks, and optionally the head
//! (final RMSNorm, output layer and cross-entropy, on the last virtual stage). Without pipeline
//! parallelism the one chunk holds everything.
//!
//! Forward takes the token ids (first chunk) or the previous chunk's output — the residual
//! stream's sequence-parallel slice `[seq/(tp·cp) · batch, hidden]` — and returns the next
//! chunk's input, or, on the head, the micro-batch's losses. In training the head runs the
//! cross-entropy's backward at once (the logits are never kept): it accumulates the output
//! layer's gradient and keeps only the gradient of its input. Backward takes the gradient of
//! the chunk's output (none on the head) and returns that of its input (none on the first
//! chunk, which accumulates the embedding's gradient instead).

use crate::compute::{Activation, LinearGrads, LinearShape, Weights};
use crate::layers::attention::Positions;
use crate::layers::block::{Block, BlockSaved};
use crate::layers::moe::jitter::{TokenKey, TokenKeys};
use crate::layers::moe::{MoeLayer, MoeStats};
use crate::layers::stored::Stored;
use crate::layers::tensor_parallel::TensorParallel;
use crate::layers::vocab_parallel::VocabParallel;
use crate::params::{Buffers, ParamId};
use crate::profile::{scope, timed, Phase};

use super::gpt::SequenceKeys;
use origami_kernels::cross_entropy::{
    cross_entropy_forward_backward, cross_entropy_rows, CrossEntropySums, IGNORE_TARGET,
};
use origami_kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};

/// Rows of the output layer computed at once, bounding the logits buffer to `rows × vocab`.
pub const OUTPUT_CHUNK_ROWS: usize = 1024;

/// The parameters of the last virtual stage's head.
#[derive(Clone, Debug)]
pub(super) struct Head {
    pub final_norm: ParamId,
    /// The output layer's weight: its own, or the (tied) embedding table.
    pub output: ParamId,
}

/// A run of the model's layers that a stage runs as one unit.
#[derive(Clone, Debug)]
pub(super) struct ModelChunk {
    /// The embedding table, on the first virtual stage.
    pub embedding: Option<ParamId>,
    /// Global index of the first block.
    pub first_layer: usize,
    pub blocks: Vec<Block>,
    pub head: Option<Head>,
}

/// What the forward of a chunk needs besides its parameters.
pub(super) struct ChunkContext<'a> {
    pub hidden: usize,
    pub norm_eps: f32,
    pub tp: &'a TensorParallel,
    pub vocab: &'a VocabParallel,
}

/// This rank's part of a micro-batch: the context-parallel chunks of every sequence, in the
/// order the tensor-parallel regions see them.
#[derive(Clone, Debug)]
pub struct LocalBatch {
    pub(super) tokens: Vec<u32>,
    pub(super) targets: Vec<u32>,
    /// Where the micro-batch's sequences sit in the run.
    pub(super) keys: SequenceKeys,
    /// Global positions of one sequence's local tokens.
    pub(super) in_sequence: Vec<usize>,
    /// Global position of every local token.
    pub(super) of_row: Vec<usize>,
    pub(super) batch: usize,
    /// Local tokens per sequence.
    pub(super) seq: usize,
}

impl LocalBatch {
    /// The jitter keys of this rank's sequence-parallel slice of the residual stream (the rows
    /// of its MoE layers): tp rank `r` holds the `r`-th run of `seq / tp` local tokens of each
    /// sequence.
    fn token_keys(&self, tp: &TensorParallel) -> TokenKeys {
        assert_eq!(
            self.keys.sequences.len(),
            self.batch,
            "router jitter needs every sequence's key (MicroBatch::keys)"
        );
        let part = self.seq / tp.size();
        let positions = &self.in_sequence[tp.rank() * part..(tp.rank() + 1) * part];
        TokenKeys {
            seed: self.keys.seed,
            step: self.keys.step,
            tokens: self
                .keys
                .sequences
                .iter()
                .flat_map(|&sequence| {
                    positions.iter().map(move |&p| TokenKey {
                        sequence,
                        position: p as u64,
                    })
                })
                .collect(),
        }
    }
}

/// Whether a chunk's forward is followed by a backward.
pub enum ForwardMode<'a> {
    /// Training: the head accumulates the output layer's gradient into `grads`, the losses
    /// entering with `loss_scale`; routers with `input_jitter_eps` jitter their input.
    Train {
        /// Gradient buffers.
        grads: &'a mut Buffers,
        /// Factor of this micro-batch's loss in the step's objective.
        loss_scale: f32,
    },
    /// Evaluation: losses only, nothing kept, no router jitter.
    Evaluate,
}

/// Losses and routing statistics of one chunk's forward of one micro-batch, this rank's parts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChunkLosses {
    /// Head only: this rank's positions' cross-entropy summed and divided by the micro-batch's
    /// counted positions (over the context-parallel group); the cp parts add up to the
    /// micro-batch's mean, and every tp rank holds the same part.
    pub cross_entropy: f64,
    /// Head only: counted positions among this rank's tokens.
    pub rows: usize,
    /// Head only: counted positions of the whole micro-batch (over the context-parallel group).
    pub counted: usize,
    /// Each MoE block's statistics, in block order.
    pub moe: Vec<MoeStats>,
}

/// What the head keeps for the backward.
struct HeadSaved {
    final_input: Vec<f32>,
    final_rstd: Vec<f32>,
    /// Gradient of the normalised final hidden state, gathered over tp (from the fused
    /// cross-entropy backward).
    d_normed: Vec<f32>,
}

/// What a chunk's forward keeps for its backward.
pub struct ChunkSaved {
    blocks: Vec<BlockSaved>,
    head: Option<HeadSaved>,
}

impl Stored for ChunkSaved {
    fn stored_bytes(&self) -> usize {
        let head = self.head.as_ref().map_or(0, |h| {
            h.final_input.stored_bytes() + h.final_rstd.stored_bytes() + h.d_normed.stored_bytes()
        });
        self.blocks.iter().map(Stored::stored_bytes).sum::<usize>() + head
    }
}

/// The result of a chunk's forward.
pub struct ChunkForward {
    /// The next chunk's input; `None` from the head.
    pub output: Option<Vec<f32>>,
    /// What the backward needs (empty in evaluation).
    pub saved: ChunkSaved,
    /// This rank's losses and statistics.
    pub losses: ChunkLosses,
}

impl ModelChunk {
    /// Whether a router of the chunk jitters its input in training.
    fn jitters(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| b.moe().is_some_and(MoeLayer::jitters))
    }

    /// Runs the chunk forward on `local` (whose counted targets over cp are `counted`, for the
    /// head); `input` is the previous chunk's output, `None` on the first chunk.
    pub fn forward(
        &self,
        ctx: &ChunkContext<'_>,
        params: &Weights,
        local: &LocalBatch,
        positions: &Positions<'_>,
        input: Option<Vec<f32>>,
        mode: ForwardMode<'_>,
        counted: impl FnOnce() -> usize,
    ) -> ChunkForward {
        let h = ctx.hidden;
        let mut x = match (self.embedding, input) {
            (Some(table), None) => {
                let embedded = ctx.vocab.embed(params.get(table), &local.tokens, h);
                ctx.tp.scatter_sequence(embedded, local.batch, h)
            }
            (None, Some(x)) => x,
            _ => panic!("a chunk takes tokens if it holds the embedding, else hidden states"),
        };
        let training = matches!(mode, ForwardMode::Train { .. });
        let mut saved = ChunkSaved {
            blocks: Vec::with_capacity(self.blocks.len()),
            head: None,
        };
        let mut losses = ChunkLosses::default();
        let jitter = (training && self.jitters()).then(|| local.token_keys(ctx.tp));
        for block in &self.blocks {
            let (y, s, stats) = block.forward(
                params,
                x,
                local.batch,
                local.seq,
                positions,
                jitter.as_ref(),
            );
            if training {
                saved.blocks.push(s);
            }
            losses.moe.extend(stats);
            x = y;
        }
        let Some(head) = &self.head else {
            return ChunkForward {
                output: Some(x),
                saved,
                losses,
            };
        };
        let elementwise = scope(Phase::Elementwise);
        let mut normed = vec![0.0; x.len()];
        let final_rstd = rmsnorm_forward(
            &mut normed,
            &x,
            params.get(head.final_norm),
            h,
            ctx.norm_eps,
        );
        drop(elementwise);
        let normed = ctx.tp.gather_activation(params, normed, local.batch, h);
        let counted = counted().max(1);
        let (sums, d_normed) = match mode {
            ForwardMode::Train { grads, loss_scale } => {
                let ce_scale = loss_scale / counted as f32;
                let (sums, d_normed) =
                    head_forward_backward(ctx, params, grads, head, &normed, local, ce_scale);
                (sums, Some(d_normed))
            }
            ForwardMode::Evaluate => (head_loss(ctx, params, head, &normed, local), None),
        };
        losses.cross_entropy = sums.cross_entropy / counted as f64;
        losses.rows = sums.rows;
        losses.counted = counted;
        if let Some(d_normed) = d_normed {
            saved.head = Some(HeadSaved {
                final_input: x,
                final_rstd,
                d_normed,
            });
        }
        ChunkForward {
            output: None,
            saved,
            losses,
        }
    }

    /// Backward of the chunk: accumulates parameter gradients and returns the gradient of its
    /// input (`None` on the first chunk). `d_output` is the gradient of its output (`None` on
    /// the head).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        ctx: &ChunkContext<'_>,
        params: &Weights,
        grads: &mut Buffers,
        saved: ChunkSaved,
        d_output: Option<Vec<f32>>,
        loss_scale: f32,
        local: &LocalBatch,
        positions: &Positions<'_>,
    ) -> Option<Vec<f32>> {
        let h = ctx.hidden;
        let mut dx = match (&self.head, saved.head, d_output) {
            (Some(head), Some(head_saved), None) => {
                let d_normed = ctx
                    .tp
                    .scatter_sequence(head_saved.d_normed, local.batch, h);
                let _phase = scope(Phase::Elementwise);
                let mut dx = vec![0.0; d_normed.len()];
                rmsnorm_backward(
                    &mut dx,
                    grads.get_mut(head.final_norm),
                    &d_normed,
                    &head_saved.final_input,
                    params.get(head.final_norm),
                    &head_saved.final_rstd,
                    h,
                );
                dx
            }
            (None, None, Some(dy)) => dy,
            _ => panic!("the head's backward starts from its own loss, any other chunk's from the next chunk's gradient"),
        };
        let jitter = self.jitters().then(|| local.token_keys(ctx.tp));
        for (block, block_saved) in self.blocks.iter().zip(saved.blocks).rev() {
            dx = block.backward(
                params,
                grads,
                block_saved,
                dx,
                loss_scale,
                local.batch,
                local.seq,
                positions,
                jitter.as_ref(),
            );
        }
        let Some(table) = self.embedding else {
            return Some(dx);
        };
        let dx = ctx.tp.gather_sequence(dx, local.batch, h);
        ctx.vocab
            .embed_backward(grads.get_mut(table), &dx, &local.tokens, h);
        None
    }
}

/// The output layer and cross-entropy forward and backward over `normed` (gathered over tp),
/// in row blocks: accumulates the output weight's gradient and returns the loss sums and the
/// gradient of `normed`.
fn head_forward_backward(
    ctx: &ChunkContext<'_>,
    params: &Weights,
    grads: &mut Buffers,
    head: &Head,
    normed: &Activation,
    local: &LocalBatch,
    ce_scale: f32,
) -> (CrossEntropySums, Vec<f32>) {
    let (h, v) = (ctx.hidden, ctx.vocab.local_vocab());
    let mut d_normed = vec![0.0; normed.len()];
    let mut sums = CrossEntropySums::default();
    let mut logits = vec![0.0; OUTPUT_CHUNK_ROWS.min(local.targets.len()) * v];
    for ((block, targets), dx) in local
        .targets
        .chunks(OUTPUT_CHUNK_ROWS)
        .enumerate()
        .zip(d_normed.chunks_mut(OUTPUT_CHUNK_ROWS * h))
    {
        let n = targets.len();
        let first = block * OUTPUT_CHUNK_ROWS * h;
        let x = normed.slice(first..first + n * h);
        let logits = &mut logits[..n * v];
        let shape = LinearShape::new(n, h, v);
        params.linear_forward(logits, x, head.output, None, shape);
        sums += if ctx.tp.size() == 1 {
            timed(Phase::Loss, || {
                cross_entropy_forward_backward(logits, targets, v, 0.0, ce_scale)
            })
        } else {
            ctx.vocab
                .cross_entropy_forward_backward(logits, targets, ce_scale)
        };
        params.linear_backward(
            LinearGrads {
                input: Some(dx),
                accumulate_input: false,
                weight: Some(grads.get_mut(head.output)),
                bias: None,
            },
            logits,
            x,
            head.output,
            shape,
        );
    }
    (sums, d_normed)
}

/// The output layer and cross-entropy forward only.
fn head_loss(
    ctx: &ChunkContext<'_>,
    params: &Weights,
    head: &Head,
    normed: &Activation,
    local: &LocalBatch,
) -> CrossEntropySums {
    let (h, v) = (ctx.hidden, ctx.vocab.local_vocab());
    let mut sums = CrossEntropySums::default();
    for (block, targets) in local.targets.chunks(OUTPUT_CHUNK_ROWS).enumerate() {
        let first = block * OUTPUT_CHUNK_ROWS * h;
        let x = normed.slice(first..first + targets.len() * h);
        let mut logits = vec![0.0; targets.len() * v];
        params.linear_forward(
            &mut logits,
            x,
            head.output,
            None,
            LinearShape::new(targets.len(), h, v),
        );
        let per_row = if ctx.tp.size() == 1 {
            timed(Phase::Loss, || cross_entropy_rows(&logits, targets, v))
        } else {
            ctx.vocab.cross_entropy_rows(&logits, targets)
        };
        sums.cross_entropy += per_row.iter().map(|&l| l as f64).sum::<f64>();
        sums.rows += targets.iter().filter(|&&t| t != IGNORE_TARGET).count();
    }
    sums
}
