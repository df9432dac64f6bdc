//! The GPT-style MoE model: embedding → blocks (dense or MoE feed-forward per the layer
//! pattern) → final RMSNorm → output layer (own weight, or the embedding table when tied) →
//! cross-entropy (+ the routers' load-balancing and z losses).
//!
//! The training loss of a micro-batch is `CE_mean + Σ_layers (aux + z)`; `loss_scale` multiplies
//! it for the backward (e.g. `1 / micro_batches` under gradient accumulation).
//!
//! Across ranks ([`ModelParallel`]) every rank of a tensor- and context-parallel group is given
//! the same micro-batch and keeps its context-parallel chunks of each sequence; embedding and
//! output layer are vocabulary-parallel, the residual stream sequence-parallel. A rank's
//! gradients are its contribution: summed over tp-cp (and data-parallel ranks) they are the
//! micro-batch's gradient, and the reported losses are the micro-batch's on every rank.

use super::config::{ModelConfig, ModelConfigError};
use super::parallel::{check_split, ModelParallel};
use crate::layers::attention::{Attention, AttentionDims, KvCache, Positions};
use crate::layers::block::{Block, BlockSaved, FeedForward};
use crate::layers::comm_ok;
use crate::layers::context_parallel::{local_positions, ContextAttention};
use crate::layers::mlp::Mlp;
use crate::layers::moe::{MoeLayer, MoeStats};
use crate::layers::vocab_parallel::VocabParallel;
use crate::params::init::initialise;
use crate::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry, Shard};
use origami_comm::ReduceOp;
use origami_kernels::cross_entropy::{
    cross_entropy_forward_backward, cross_entropy_rows, CrossEntropySums, IGNORE_TARGET,
};
use origami_kernels::embedding::embedding_forward;
use origami_kernels::matmul::{linear_backward, linear_forward, LinearGrads, Par};
use origami_kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use origami_kernels::rope::RopeTable;

/// Rows of the output layer computed at once, bounding the logits buffer to `rows × vocab`.
pub const OUTPUT_CHUNK_ROWS: usize = 1024;

/// Token ids and targets of one micro-batch, `[batch, seq]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct MicroBatch {
    /// Input token ids.
    pub tokens: Vec<u32>,
    /// Next-token targets ([`IGNORE_TARGET`] to skip a position).
    pub targets: Vec<u32>,
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
}

/// Losses and routing statistics of one micro-batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LossReport {
    /// Mean cross-entropy over counted positions.
    pub cross_entropy: f64,
    /// Sum over MoE layers of the load-balancing loss.
    pub load_balancing: f64,
    /// Sum over MoE layers of the z-loss.
    pub z: f64,
    /// Counted positions.
    pub tokens: usize,
    /// Statistics of each MoE layer, in layer order.
    pub moe: Vec<MoeStats>,
}

impl LossReport {
    /// The training objective `CE + aux + z`.
    pub fn total(&self) -> f64 {
        self.cross_entropy + self.load_balancing + self.z
    }
}

/// A GPT-MoE model: its configuration, parameter registry and layers.
#[derive(Clone, Debug)]
pub struct GptModel {
    config: ModelConfig,
    registry: ParamRegistry,
    embedding: ParamId,
    blocks: Vec<Block>,
    final_norm: ParamId,
    output: Option<ParamId>,
    rope: RopeTable,
    parallel: ModelParallel,
    vocab: VocabParallel,
}

/// This rank's part of a micro-batch: the context-parallel chunks of every sequence, in the
/// order the tensor-parallel regions see them.
struct LocalBatch {
    tokens: Vec<u32>,
    targets: Vec<u32>,
    /// Global positions of one sequence's local tokens.
    in_sequence: Vec<usize>,
    /// Global position of every local token.
    of_row: Vec<usize>,
    batch: usize,
    /// Local tokens per sequence.
    seq: usize,
}

struct HiddenStates {
    blocks: Vec<BlockSaved>,
    final_input: Vec<f32>,
    final_rstd: Vec<f32>,
    normed: Vec<f32>,
    moe: Vec<MoeStats>,
}

impl GptModel {
    /// Builds the model's layers and registers every parameter; validates the configuration.
    pub fn new(config: ModelConfig) -> Result<Self, ModelConfigError> {
        Self::new_parallel(config, ModelParallel::single())
    }

    /// The model on one rank of `parallel`: attention heads, MLP hidden units and vocabulary
    /// split over its tp group, sequences over its cp group, the MoE layers' experts over its
    /// ep and etp groups. Errors when a size does not split.
    pub fn new_parallel(
        config: ModelConfig,
        parallel: ModelParallel,
    ) -> Result<Self, ModelConfigError> {
        config.validate()?;
        let c = &config;
        let tp = &parallel.tensor;
        let cp = parallel.cp();
        check_split(c, &parallel.sizes(), parallel.cp_comm_type)?;
        let mut registry = ParamRegistry::default();
        let std = c.init_std;
        let out_std = std / (2.0 * c.num_layers as f32).sqrt();
        let h = c.hidden_size;
        let vocab = VocabParallel::new(tp.clone(), c.vocab_size);
        let vocab_shape = [c.vocab_size, h];
        let embedding = registry.register_sharded(
            "embedding.weight".into(),
            &vocab_shape,
            Shard::along(&vocab_shape, 0, vec![vocab.range()]),
            ParamGroup::Dense,
            Init::Normal(std),
        );
        let dims = AttentionDims {
            hidden: h,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim(),
        };
        let blocks = (0..c.num_layers)
            .map(|l| -> Result<Block, ModelConfigError> {
                let prefix = format!("layers.{l}");
                let context = (cp > 1).then(|| {
                    ContextAttention::new(parallel.context.clone(), parallel.cp_comm_type)
                });
                let attention = Attention::new(
                    &mut registry,
                    &format!("{prefix}.attention"),
                    dims,
                    c.qkv_bias,
                    (std, out_std),
                    tp,
                    context,
                );
                let ffn = if c.is_moe_layer(l) {
                    FeedForward::Moe(Box::new(MoeLayer::new_parallel(
                        &mut registry,
                        &format!("{prefix}.moe"),
                        h,
                        &c.moe,
                        (std, out_std),
                        parallel.moe.clone(),
                    )?))
                } else {
                    FeedForward::Dense(Mlp::new(
                        &mut registry,
                        &format!("{prefix}.mlp"),
                        (h, c.ffn_hidden_size),
                        (std, out_std),
                        tp,
                    ))
                };
                Ok(Block::new(
                    &mut registry,
                    &prefix,
                    (h, c.norm_eps),
                    attention,
                    ffn,
                    tp.clone(),
                ))
            })
            .collect::<Result<_, _>>()?;
        let final_norm = registry.register(
            "final_norm.weight".into(),
            &[h],
            ParamGroup::Dense,
            Init::Constant(1.0),
        );
        let output = (!c.tie_embeddings).then(|| {
            registry.register_sharded(
                "output.weight".into(),
                &vocab_shape,
                Shard::along(&vocab_shape, 0, vec![vocab.range()]),
                ParamGroup::Dense,
                Init::Normal(std),
            )
        });
        let rope = RopeTable::new(c.head_dim(), c.max_seq_len, c.rope_theta);
        Ok(GptModel {
            config,
            registry,
            embedding,
            blocks,
            final_norm,
            output,
            rope,
            parallel,
            vocab,
        })
    }

    /// The groups this rank's model uses.
    pub fn parallel(&self) -> &ModelParallel {
        &self.parallel
    }

    /// Whether every token of a sequence and every weight of attention and the output layer is
    /// on this rank (no tensor or context parallelism): what generation and full logits need.
    fn attention_is_local(&self) -> bool {
        self.parallel.tensor.size() == 1 && self.parallel.cp() == 1
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Every parameter with its name, shape and place.
    pub fn registry(&self) -> &ParamRegistry {
        &self.registry
    }

    /// Freshly initialised parameters for `seed`.
    pub fn init_params(&self, seed: u64) -> Buffers {
        initialise(&self.registry, seed)
    }

    fn output_weight(&self) -> ParamId {
        self.output.unwrap_or(self.embedding)
    }

    fn check_batch(&self, batch: &MicroBatch) {
        assert_eq!(
            batch.tokens.len(),
            batch.batch * batch.seq,
            "token count differs from batch × seq"
        );
        assert!(
            batch.seq <= self.config.max_seq_len,
            "sequence of {} exceeds model.max_seq_len = {}",
            batch.seq,
            self.config.max_seq_len
        );
        let vocab = self.config.vocab_size as u32;
        assert!(
            batch.tokens.iter().all(|&t| t < vocab),
            "token id outside the vocabulary of {vocab}"
        );
        if let Err(message) =
            sequence_split(batch.seq, self.parallel.tensor.size(), self.parallel.cp())
        {
            panic!("{message}");
        }
    }

    /// This rank's context-parallel part of `batch`.
    fn local_batch(&self, batch: &MicroBatch) -> LocalBatch {
        self.check_batch(batch);
        let cp = self.parallel.cp();
        let in_sequence = if cp == 1 {
            (0..batch.seq).collect()
        } else {
            local_positions(batch.seq, cp, self.parallel.context.rank())
        };
        let pick = |all: &[u32]| -> Vec<u32> {
            (0..batch.batch)
                .flat_map(|b| in_sequence.iter().map(move |&p| all[b * batch.seq + p]))
                .collect()
        };
        LocalBatch {
            tokens: pick(&batch.tokens),
            targets: pick(&batch.targets),
            of_row: (0..batch.batch)
                .flat_map(|_| in_sequence.iter().copied())
                .collect(),
            batch: batch.batch,
            seq: in_sequence.len(),
            in_sequence,
        }
    }

    fn forward_hidden(&self, params: &Buffers, local: &LocalBatch) -> HiddenStates {
        let h = self.config.hidden_size;
        let tp = &self.parallel.tensor;
        let positions = Positions {
            of_row: &local.of_row,
            in_sequence: &local.in_sequence,
            rope: &self.rope,
        };
        let embedded = self
            .vocab
            .embed(params.get(self.embedding), &local.tokens, h);
        let mut x = tp.scatter_sequence(embedded, local.batch, h);
        let mut saved = Vec::with_capacity(self.blocks.len());
        let mut moe = Vec::new();
        for block in &self.blocks {
            let (y, s, stats) = block.forward(params, x, local.batch, local.seq, &positions);
            saved.push(s);
            moe.extend(stats);
            x = y;
        }
        let mut normed = vec![0.0; x.len()];
        let final_rstd = rmsnorm_forward(
            &mut normed,
            &x,
            params.get(self.final_norm),
            h,
            self.config.norm_eps,
        );
        HiddenStates {
            blocks: saved,
            final_input: x,
            final_rstd,
            normed: tp.gather_sequence(normed, local.batch, h),
            moe,
        }
    }

    /// Starts a new global batch (the global-batch load-balancing loss counts loads from here).
    pub fn begin_global_batch(&self) {
        for moe in self.blocks.iter().filter_map(Block::moe) {
            moe.begin_global_batch();
        }
    }

    /// Aux-loss-free balancing after a global batch: `loads[i]` are the tokens per expert of the
    /// i-th MoE layer (summed over the batch's micro-batches).
    pub fn update_expert_bias(&self, params: &mut Buffers, loads: &[Vec<usize>]) {
        for (moe, load) in self.blocks.iter().filter_map(Block::moe).zip(loads) {
            moe.update_expert_bias(params, load);
        }
    }

    /// Logits `[batch·seq, vocab]` (evaluation, generation). Needs attention and the output
    /// layer whole on this rank (no tensor or context parallelism).
    pub fn logits(&self, params: &Buffers, batch: &MicroBatch) -> Vec<f32> {
        assert!(
            self.attention_is_local(),
            "full logits need tensor- and context-parallel size 1"
        );
        let local = self.local_batch(batch);
        let states = self.forward_hidden(params, &local);
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        let mut logits = vec![0.0; batch.tokens.len() * v];
        linear_forward(
            &mut logits,
            &states.normed,
            params.get(self.output_weight()),
            None,
            batch.tokens.len(),
            h,
            v,
            Par::All,
        );
        logits
    }

    /// Forward only: the losses of a micro-batch.
    pub fn loss(&self, params: &Buffers, batch: &MicroBatch) -> LossReport {
        let local = self.local_batch(batch);
        let states = self.forward_hidden(params, &local);
        let (h, v) = (self.config.hidden_size, self.vocab.local_vocab());
        let mut sums = CrossEntropySums::default();
        for (x, targets) in states
            .normed
            .chunks(OUTPUT_CHUNK_ROWS * h)
            .zip(local.targets.chunks(OUTPUT_CHUNK_ROWS))
        {
            let mut logits = vec![0.0; targets.len() * v];
            linear_forward(
                &mut logits,
                x,
                params.get(self.output_weight()),
                None,
                targets.len(),
                h,
                v,
                Par::All,
            );
            let per_row = if self.parallel.tensor.size() == 1 {
                cross_entropy_rows(&logits, targets, v)
            } else {
                self.vocab.cross_entropy_rows(&logits, targets)
            };
            sums.cross_entropy += per_row.iter().map(|&l| l as f64).sum::<f64>();
            sums.rows += targets.iter().filter(|&&t| t != IGNORE_TARGET).count();
        }
        self.report(sums, states.moe)
    }

    /// Targets counted in the whole micro-batch (over the context-parallel group).
    fn counted_targets(&self, local: &LocalBatch) -> usize {
        let mut counted = [local
            .targets
            .iter()
            .filter(|&&t| t != IGNORE_TARGET)
            .count() as u64];
        if self.parallel.cp() > 1 {
            comm_ok(
                self.parallel
                    .context
                    .all_reduce_u64(&mut counted, ReduceOp::Sum),
            );
        }
        counted[0] as usize
    }

    /// Forward and backward of one micro-batch: accumulates `loss_scale · ∇(CE + aux + z)` into
    /// `grads` (this rank's contribution) and returns the micro-batch's losses.
    pub fn forward_backward(
        &self,
        params: &Buffers,
        grads: &mut Buffers,
        batch: &MicroBatch,
        loss_scale: f32,
    ) -> LossReport {
        let local = self.local_batch(batch);
        let states = self.forward_hidden(params, &local);
        let positions = Positions {
            of_row: &local.of_row,
            in_sequence: &local.in_sequence,
            rope: &self.rope,
        };
        let (h, v) = (self.config.hidden_size, self.vocab.local_vocab());
        let tp = &self.parallel.tensor;
        let ce_scale = loss_scale / self.counted_targets(&local).max(1) as f32;
        let out_w = self.output_weight();
        let mut d_normed = vec![0.0; states.normed.len()];
        let mut sums = CrossEntropySums::default();
        let mut logits = vec![0.0; OUTPUT_CHUNK_ROWS.min(local.targets.len()) * v];
        for ((x, targets), dx) in states
            .normed
            .chunks(OUTPUT_CHUNK_ROWS * h)
            .zip(local.targets.chunks(OUTPUT_CHUNK_ROWS))
            .zip(d_normed.chunks_mut(OUTPUT_CHUNK_ROWS * h))
        {
            let n = targets.len();
            let logits = &mut logits[..n * v];
            linear_forward(logits, x, params.get(out_w), None, n, h, v, Par::All);
            sums += if tp.size() == 1 {
                cross_entropy_forward_backward(logits, targets, v, 0.0, ce_scale)
            } else {
                self.vocab
                    .cross_entropy_forward_backward(logits, targets, ce_scale)
            };
            linear_backward(
                LinearGrads {
                    input: Some(dx),
                    accumulate_input: false,
                    weight: Some(grads.get_mut(out_w)),
                    bias: None,
                },
                logits,
                x,
                params.get(out_w),
                n,
                h,
                v,
                Par::All,
            );
        }
        drop(logits);
        let d_normed = tp.scatter_sequence(d_normed, local.batch, h);
        let mut dx = vec![0.0; d_normed.len()];
        rmsnorm_backward(
            &mut dx,
            grads.get_mut(self.final_norm),
            &d_normed,
            &states.final_input,
            params.get(self.final_norm),
            &states.final_rstd,
            h,
        );
        drop(d_normed);
        for (block, saved) in self.blocks.iter().zip(states.blocks).rev() {
            dx = block.backward(
                params,
                grads,
                saved,
                dx,
                loss_scale,
                local.batch,
                local.seq,
                &positions,
            );
        }
        let dx = tp.gather_sequence(dx, local.batch, h);
        self.vocab
            .embed_backward(grads.get_mut(self.embedding), &dx, &local.tokens, h);
        self.report(sums, states.moe)
    }

    /// The micro-batch's losses from this rank's parts: cross-entropy summed over the
    /// context-parallel chunks (every tp rank holds the same sums), auxiliary losses over the
    /// tp-cp ranks that share the micro-batch.
    fn report(&self, sums: CrossEntropySums, moe: Vec<MoeStats>) -> LossReport {
        let mut report = LossReport {
            cross_entropy: sums.cross_entropy,
            load_balancing: moe.iter().map(|s| s.losses.load_balancing).sum(),
            z: moe.iter().map(|s| s.losses.z).sum(),
            tokens: sums.rows,
            moe,
        };
        let group = &self.parallel.moe.sequence;
        if group.size() > 1 {
            let own_cross_entropy = self.parallel.tensor.rank() == 0;
            let mut parts = [
                if own_cross_entropy {
                    report.cross_entropy as f32
                } else {
                    0.0
                },
                report.load_balancing as f32,
                report.z as f32,
            ];
            comm_ok(group.all_reduce(&mut parts, ReduceOp::Sum));
            let mut rows = [report.tokens as u64];
            comm_ok(
                self.parallel
                    .context
                    .all_reduce_u64(&mut rows, ReduceOp::Sum),
            );
            report.cross_entropy = parts[0] as f64;
            report.load_balancing = parts[1] as f64;
            report.z = parts[2] as f64;
            report.tokens = rows[0] as usize;
        }
        report.cross_entropy /= report.tokens.max(1) as f64;
        report
    }
}

/// Checks that a sequence of `seq` tokens splits over context parallelism (into 2·cp equal
/// chunks) and then over tensor (sequence) parallelism.
pub fn sequence_split(seq: usize, tp: usize, cp: usize) -> Result<(), String> {
    if cp > 1 && !seq.is_multiple_of(2 * cp) {
        return Err(format!(
            "a sequence of {seq} tokens must be divisible by 2 × parallel.cp = {} (context parallelism splits it into 2·cp chunks)",
            2 * cp
        ));
    }
    if !(seq / cp).is_multiple_of(tp) {
        return Err(format!(
            "the {} tokens of a sequence on each context-parallel rank must be divisible by parallel.tp = {tp} (sequence parallelism)",
            seq / cp
        ));
    }
    Ok(())
}

/// Per-layer key/value caches of one sequence being generated.
#[derive(Clone, Debug, Default)]
pub struct DecodeState {
    caches: Vec<KvCache>,
    position: usize,
}

impl DecodeState {
    /// Tokens decoded so far.
    pub fn len(&self) -> usize {
        self.position
    }

    /// Whether nothing has been decoded yet.
    pub fn is_empty(&self) -> bool {
        self.position == 0
    }
}

impl GptModel {
    /// Feeds one token through the model with the key/value caches in `state` and returns the
    /// logits `[vocab]` for the next token.
    pub fn decode_step(&self, params: &Buffers, state: &mut DecodeState, token: u32) -> Vec<f32> {
        assert!(
            state.position < self.config.max_seq_len,
            "generation reached model.max_seq_len = {}",
            self.config.max_seq_len
        );
        assert!(
            self.attention_is_local(),
            "generation needs tensor- and context-parallel size 1"
        );
        let h = self.config.hidden_size;
        if state.caches.is_empty() {
            state.caches = vec![KvCache::default(); self.blocks.len()];
        }
        let mut x = vec![0.0; h];
        embedding_forward(&mut x, params.get(self.embedding), &[token], h);
        for (block, cache) in self.blocks.iter().zip(&mut state.caches) {
            x = block.decode(params, &x, state.position, &self.rope, cache);
        }
        state.position += 1;
        let mut normed = vec![0.0; h];
        rmsnorm_forward(
            &mut normed,
            &x,
            params.get(self.final_norm),
            h,
            self.config.norm_eps,
        );
        let mut logits = vec![0.0; self.config.vocab_size];
        linear_forward(
            &mut logits,
            &normed,
            params.get(self.output_weight()),
            None,
            1,
            h,
            self.config.vocab_size,
            Par::Seq,
        );
        logits
    }
}
