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
//! micro-batch's gradient.
//!
//! Along a pipeline the rank holds only its stage's [`chunk`](super::chunk)s: chunk `v` of stage
//! `r` runs the layers [`StageLayers`] assigns it, the first virtual stage also the embedding,
//! the last the head. Parameters keep their global names (`layers.{l}.…`) wherever they live.
//! With tied embeddings the last stage holds a copy of the table (a registry duplicate),
//! initialised like the first stage's and kept equal by summing both copies' gradients over the
//! embedding group ([`GptModel::finish_tied_gradients`]). [`GptModel::forward_backward`],
//! [`GptModel::loss`] and generation need the whole model on the rank (no pipeline);
//! pipelines run the chunks through `train::pipeline`.

use super::chunk::{ChunkContext, ChunkForward, ChunkLosses, ChunkSaved, Head, ModelChunk};
pub use super::chunk::{ForwardMode, LocalBatch};
use super::config::{ModelConfig, ModelConfigError};
use super::parallel::{check_split, ModelParallel};
use crate::compute::{LinearShape, Weights};
use crate::layers::attention::{Attention, AttentionDims, KvCache, Positions};
use crate::layers::block::{Block, FeedForward};
use crate::layers::comm_ok;
use crate::layers::context_parallel::{local_positions, ContextAttention};
use crate::layers::mlp::Mlp;
use crate::layers::moe::{MoeLayer, MoeStats};
use crate::layers::recompute::Recompute;
use crate::layers::vocab_parallel::VocabParallel;
use crate::params::init::initialise;
use crate::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry, Shard};
use crate::profile::{timed, Phase};
use origami_comm::ReduceOp;
use origami_kernels::cross_entropy::IGNORE_TARGET;
use origami_kernels::embedding::embedding_forward;
use origami_kernels::rmsnorm::rmsnorm_forward;
use origami_kernels::rope::RopeTable;
use origami_schedule::StageLayers;

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
    /// Where the sequences sit in the training run (the router jitter's key; unused without
    /// jitter and in evaluation).
    pub keys: SequenceKeys,
}

/// Where a micro-batch's sequences sit in the training run: the run's seed, the optimizer
/// step, and each sequence's index in the step's global batch. With each token's position they
/// key the router's input jitter, so the noise a token gets does not depend on the rank that
/// holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SequenceKeys {
    /// The run's seed.
    pub seed: u64,
    /// The optimizer step.
    pub step: u64,
    /// Index of each sequence in the step's global batch.
    pub sequences: Vec<u64>,
}

impl SequenceKeys {
    /// `count` consecutive sequences of step `step`, the first at index `first` of the step's
    /// global batch.
    pub fn consecutive(seed: u64, step: u64, first: u64, count: usize) -> Self {
        SequenceKeys {
            seed,
            step,
            sequences: (first..first + count as u64).collect(),
        }
    }
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

/// A GPT-MoE model: its configuration, this rank's parameter registry and model chunks.
#[derive(Clone, Debug)]
pub struct GptModel {
    config: ModelConfig,
    registry: ParamRegistry,
    chunks: Vec<ModelChunk>,
    rope: RopeTable,
    parallel: ModelParallel,
    vocab: VocabParallel,
    split: StageLayers,
}

impl GptModel {
    /// Builds the model's layers and registers every parameter; validates the configuration.
    pub fn new(config: ModelConfig) -> Result<Self, ModelConfigError> {
        Self::new_parallel(config, ModelParallel::single())
    }

    /// The model on one rank of `parallel`: this stage's chunks, with attention heads, MLP
    /// hidden units and vocabulary split over its tp group, sequences over its cp group, the
    /// MoE layers' experts over its ep and etp groups. Errors when a size does not split.
    pub fn new_parallel(
        config: ModelConfig,
        parallel: ModelParallel,
    ) -> Result<Self, ModelConfigError> {
        config.validate()?;
        check_split(&config, &parallel.sizes(), parallel.cp_comm_type)?;
        let split = parallel.pipeline.split(config.num_layers)?;
        let mut registry = ParamRegistry::default();
        let vocab = VocabParallel::new(parallel.tensor.clone(), config.vocab_size);
        let chunks = (0..parallel.pipeline.chunks)
            .map(|chunk| build_chunk(&config, &parallel, &split, &vocab, chunk, &mut registry))
            .collect::<Result<_, _>>()?;
        let rope = RopeTable::new(config.head_dim(), config.max_seq_len, config.rope_theta);
        Ok(GptModel {
            config,
            registry,
            chunks,
            rope,
            parallel,
            vocab,
            split,
        })
    }

    /// The model with what each block's backward recomputes set to `recompute`.
    pub fn with_recompute(mut self, recompute: Recompute) -> Self {
        for chunk in &mut self.chunks {
            for block in &mut chunk.blocks {
                block.set_recompute(recompute);
            }
        }
        self
    }

    /// The groups this rank's model uses.
    pub fn parallel(&self) -> &ModelParallel {
        &self.parallel
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Every parameter of this rank with its name, shape and place.
    pub fn registry(&self) -> &ParamRegistry {
        &self.registry
    }

    /// The layers of each pipeline stage and chunk.
    pub fn split(&self) -> &StageLayers {
        &self.split
    }

    /// Model chunks on this rank (`parallel.vpp`).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Freshly initialised parameters for `seed`.
    pub fn init_params(&self, seed: u64) -> Buffers {
        initialise(&self.registry, seed)
    }

    /// Whether this rank holds the whole model (no pipeline).
    fn is_whole(&self) -> bool {
        self.parallel.pipeline.stages == 1
    }

    /// Whether every token of a sequence and every weight of attention and the output layer is
    /// on this rank (no tensor, context or pipeline parallelism): what generation and full
    /// logits need.
    fn attention_is_local(&self) -> bool {
        self.parallel.tensor.size() == 1 && self.parallel.cp() == 1 && self.is_whole()
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
    pub fn local_batch(&self, batch: &MicroBatch) -> LocalBatch {
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
            keys: batch.keys.clone(),
            of_row: (0..batch.batch)
                .flat_map(|_| in_sequence.iter().copied())
                .collect(),
            batch: batch.batch,
            seq: in_sequence.len(),
            in_sequence,
        }
    }

    fn context(&self) -> ChunkContext<'_> {
        ChunkContext {
            hidden: self.config.hidden_size,
            norm_eps: self.config.norm_eps,
            tp: &self.parallel.tensor,
            vocab: &self.vocab,
        }
    }

    fn positions<'a>(&'a self, local: &'a LocalBatch) -> Positions<'a> {
        Positions {
            of_row: &local.of_row,
            in_sequence: &local.in_sequence,
            rope: &self.rope,
        }
    }

    /// Elements of one chunk's input or output on this rank: its sequence-parallel slice of
    /// the micro-batch's residual stream.
    pub fn boundary_len(&self, local: &LocalBatch) -> usize {
        local.batch * local.seq / self.parallel.tensor.size() * self.config.hidden_size
    }

    /// Forward of chunk `chunk` on `local`; `input` is the previous chunk's output (`None` on
    /// the first virtual stage, which embeds the tokens).
    pub fn forward_chunk(
        &self,
        chunk: usize,
        params: &Weights,
        local: &LocalBatch,
        input: Option<Vec<f32>>,
        mode: ForwardMode<'_>,
    ) -> ChunkForward {
        self.chunks[chunk].forward(
            &self.context(),
            params,
            local,
            &self.positions(local),
            input,
            mode,
            || self.counted_targets(local),
        )
    }

    /// Backward of chunk `chunk`: accumulates `loss_scale`-scaled parameter gradients and
    /// returns the gradient of its input (`None` on the first virtual stage). `d_output` is
    /// the next chunk's input gradient (`None` on the last virtual stage).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_chunk(
        &self,
        chunk: usize,
        params: &Weights,
        grads: &mut Buffers,
        local: &LocalBatch,
        saved: ChunkSaved,
        d_output: Option<Vec<f32>>,
        loss_scale: f32,
    ) -> Option<Vec<f32>> {
        self.chunks[chunk].backward(
            &self.context(),
            params,
            grads,
            saved,
            d_output,
            loss_scale,
            local,
            &self.positions(local),
        )
    }

    /// Starts a new global batch (the global-batch load-balancing loss counts loads from here).
    pub fn begin_global_batch(&self) {
        for moe in self.moe_layers() {
            moe.begin_global_batch();
        }
    }

    fn moe_layers(&self) -> impl Iterator<Item = &MoeLayer> {
        self.chunks
            .iter()
            .flat_map(|c| c.blocks.iter().filter_map(Block::moe))
    }

    /// MoE layers of the whole model.
    pub fn moe_layer_count(&self) -> usize {
        (0..self.config.num_layers)
            .filter(|&l| self.config.is_moe_layer(l))
            .count()
    }

    /// For each MoE layer on this rank (chunk by chunk, in layer order), its index among the
    /// whole model's MoE layers.
    pub fn moe_layer_numbers(&self) -> Vec<usize> {
        self.chunks
            .iter()
            .flat_map(|c| c.first_layer..c.first_layer + c.blocks.len())
            .filter(|&l| self.config.is_moe_layer(l))
            .map(|l| (0..l).filter(|&k| self.config.is_moe_layer(k)).count())
            .collect()
    }

    /// MoE layers of this rank's chunk `chunk`.
    pub fn moe_layers_in_chunk(&self, chunk: usize) -> usize {
        self.chunks[chunk]
            .blocks
            .iter()
            .filter(|b| b.moe().is_some())
            .count()
    }

    /// Aux-loss-free balancing after a global batch: `loads[i]` are the tokens per expert of the
    /// whole model's i-th MoE layer (summed over the batch's micro-batches); each rank updates
    /// the layers it holds.
    pub fn update_expert_bias(&self, params: &mut Buffers, loads: &[Vec<usize>]) {
        for (moe, number) in self.moe_layers().zip(self.moe_layer_numbers()) {
            if let Some(load) = loads.get(number) {
                moe.update_expert_bias(params, load);
            }
        }
    }

    /// The tied embedding table this rank holds as the first or last stage of a pipeline.
    fn tied_table(&self) -> Option<ParamId> {
        if !self.config.tie_embeddings || self.is_whole() {
            return None;
        }
        self.chunks
            .iter()
            .find_map(|c| c.embedding.or(c.head.as_ref().map(|h| h.output)))
    }

    /// With tied embeddings along a pipeline: sums the gradients of the first stage's table and
    /// of the last stage's copy over the embedding group, so both copies take the same update.
    /// Call after the backward passes, before the optimizer; nothing to do otherwise.
    pub fn finish_tied_gradients(&self, grads: &mut Buffers) -> origami_comm::Result<()> {
        match (self.tied_table(), &self.parallel.embedding) {
            (Some(table), Some(group)) => group.all_reduce(grads.get_mut(table), ReduceOp::Sum),
            _ => Ok(()),
        }
    }

    /// The chunk that holds everything (no pipeline).
    fn whole(&self) -> &ModelChunk {
        assert!(
            self.is_whole(),
            "this needs the whole model on one rank (parallel.pp = 1)"
        );
        &self.chunks[0]
    }

    /// Logits `[batch·seq, vocab]` (evaluation, generation), computed in f32. Needs attention
    /// and the output layer whole on this rank (no tensor, context or pipeline parallelism).
    pub fn logits(&self, params: &Buffers, batch: &MicroBatch) -> Vec<f32> {
        let params = &Weights::f32(params);
        assert!(
            self.attention_is_local(),
            "full logits need tensor-, context- and pipeline-parallel size 1"
        );
        let whole = self.whole();
        let head = whole.head.as_ref().expect("the whole model has a head");
        let local = self.local_batch(batch);
        let positions = self.positions(&local);
        let h = self.config.hidden_size;
        let table = whole.embedding.expect("the whole model has an embedding");
        let mut x = self.vocab.embed(params.get(table), &local.tokens, h);
        for block in &whole.blocks {
            x = block
                .forward(params, x, local.batch, local.seq, &positions, None)
                .0;
        }
        let mut normed = vec![0.0; x.len()];
        rmsnorm_forward(
            &mut normed,
            &x,
            params.get(head.final_norm),
            h,
            self.config.norm_eps,
        );
        let v = self.config.vocab_size;
        let mut logits = vec![0.0; batch.tokens.len() * v];
        params.linear_forward(
            &mut logits,
            &normed,
            head.output,
            None,
            LinearShape::new(batch.tokens.len(), h, v),
        );
        logits
    }

    /// Forward only, in f32: the losses of a micro-batch (the whole model on this rank).
    pub fn loss(&self, params: &Buffers, batch: &MicroBatch) -> LossReport {
        self.whole();
        let local = self.local_batch(batch);
        let params = &Weights::f32(params);
        let forward = self.forward_chunk(0, params, &local, None, ForwardMode::Evaluate);
        self.report(forward.losses)
    }

    /// Targets counted in the whole micro-batch (over the context-parallel group).
    fn counted_targets(&self, local: &LocalBatch) -> usize {
        let mut counted = [local
            .targets
            .iter()
            .filter(|&&t| t != IGNORE_TARGET)
            .count() as u64];
        if self.parallel.cp() > 1 {
            timed(Phase::CommOther, || {
                comm_ok(
                    self.parallel
                        .context
                        .all_reduce_u64(&mut counted, ReduceOp::Sum),
                )
            });
        }
        counted[0] as usize
    }

    /// Forward and backward of one micro-batch in f32 (the whole model on this rank):
    /// accumulates `loss_scale · ∇(CE + aux + z)` into `grads` (this rank's contribution) and
    /// returns the micro-batch's losses.
    pub fn forward_backward(
        &self,
        params: &Buffers,
        grads: &mut Buffers,
        batch: &MicroBatch,
        loss_scale: f32,
    ) -> LossReport {
        self.whole();
        let local = self.local_batch(batch);
        let params = &Weights::f32(params);
        let forward = self.forward_chunk(
            0,
            params,
            &local,
            None,
            ForwardMode::Train { grads, loss_scale },
        );
        self.backward_chunk(0, params, grads, &local, forward.saved, None, loss_scale);
        self.report(forward.losses)
    }

    /// The micro-batch's losses from this rank's parts: cross-entropy summed over the
    /// context-parallel chunks (every tp rank holds the same parts), auxiliary losses over the
    /// tp-cp ranks that share the micro-batch.
    fn report(&self, losses: ChunkLosses) -> LossReport {
        let mut report = LossReport {
            cross_entropy: losses.cross_entropy,
            load_balancing: losses.moe.iter().map(|s| s.losses.load_balancing).sum(),
            z: losses.moe.iter().map(|s| s.losses.z).sum(),
            tokens: losses.rows,
            moe: losses.moe,
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
            timed(Phase::CommOther, || {
                comm_ok(group.all_reduce(&mut parts, ReduceOp::Sum))
            });
            let mut rows = [report.tokens as u64];
            timed(Phase::CommOther, || {
                comm_ok(
                    self.parallel
                        .context
                        .all_reduce_u64(&mut rows, ReduceOp::Sum),
                )
            });
            report.cross_entropy = parts[0] as f64;
            report.load_balancing = parts[1] as f64;
            report.z = parts[2] as f64;
            report.tokens = rows[0] as usize;
        }
        report
    }
}

/// Registers and builds chunk `chunk` of this rank's stage.
fn build_chunk(
    c: &ModelConfig,
    parallel: &ModelParallel,
    split: &StageLayers,
    vocab: &VocabParallel,
    chunk: usize,
    registry: &mut ParamRegistry,
) -> Result<ModelChunk, ModelConfigError> {
    let placement = &parallel.pipeline;
    let tp = &parallel.tensor;
    let std = c.init_std;
    let out_std = std / (2.0 * c.num_layers as f32).sqrt();
    let h = c.hidden_size;
    let vocab_shape = [c.vocab_size, h];
    let vocab_shard = || Shard::along(&vocab_shape, 0, vec![vocab.range()]);
    let embedding = placement.holds_embedding(chunk).then(|| {
        registry.register_sharded(
            "embedding.weight".into(),
            &vocab_shape,
            vocab_shard(),
            ParamGroup::Dense,
            Init::Normal(std),
        )
    });
    let dims = AttentionDims {
        hidden: h,
        heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim(),
    };
    let layers = split.layers(placement.stage, chunk);
    let blocks = layers
        .clone()
        .map(|l| -> Result<Block, ModelConfigError> {
            let prefix = format!("layers.{l}");
            let context = (parallel.cp() > 1)
                .then(|| ContextAttention::new(parallel.context.clone(), parallel.cp_comm_type));
            let attention = Attention::new(
                registry,
                &format!("{prefix}.attention"),
                dims,
                c.qkv_bias,
                (std, out_std),
                tp,
                context,
            );
            let ffn = if c.is_moe_layer(l) {
                FeedForward::Moe(Box::new(MoeLayer::new_parallel(
                    registry,
                    &format!("{prefix}.moe"),
                    h,
                    &c.moe,
                    (std, out_std),
                    parallel.moe.clone(),
                )?))
            } else {
                FeedForward::Dense(Mlp::new(
                    registry,
                    &format!("{prefix}.mlp"),
                    (h, c.ffn_hidden_size),
                    (std, out_std),
                    tp,
                ))
            };
            Ok(Block::new(
                registry,
                &prefix,
                (h, c.norm_eps),
                attention,
                ffn,
                tp.clone(),
            ))
        })
        .collect::<Result<_, _>>()?;
    let head = placement.holds_head(chunk).then(|| {
        let final_norm = registry.register(
            "final_norm.weight".into(),
            &[h],
            ParamGroup::Dense,
            Init::Constant(1.0),
        );
        let output = match (c.tie_embeddings, embedding) {
            (true, Some(table)) => table,
            (true, None) => registry.register_duplicate(
                "embedding.weight".into(),
                &vocab_shape,
                vocab_shard(),
                ParamGroup::Dense,
                Init::Normal(std),
            ),
            (false, _) => registry.register_sharded(
                "output.weight".into(),
                &vocab_shape,
                vocab_shard(),
                ParamGroup::Dense,
                Init::Normal(std),
            ),
        };
        Head { final_norm, output }
    });
    Ok(ModelChunk {
        embedding,
        first_layer: layers.start,
        blocks,
        head,
    })
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
    /// logits `[vocab]` for the next token, computed in f32.
    pub fn decode_step(&self, params: &Buffers, state: &mut DecodeState, token: u32) -> Vec<f32> {
        let params = &Weights::f32(params);
        assert!(
            state.position < self.config.max_seq_len,
            "generation reached model.max_seq_len = {}",
            self.config.max_seq_len
        );
        assert!(
            self.attention_is_local(),
            "generation needs tensor-, context- and pipeline-parallel size 1"
        );
        let whole = self.whole();
        let head = whole.head.as_ref().expect("the whole model has a head");
        let table = whole.embedding.expect("the whole model has an embedding");
        let h = self.config.hidden_size;
        if state.caches.is_empty() {
            state.caches = vec![KvCache::default(); whole.blocks.len()];
        }
        let mut x = vec![0.0; h];
        embedding_forward(&mut x, params.get(table), &[token], h);
        for (block, cache) in whole.blocks.iter().zip(&mut state.caches) {
            x = block.decode(params, &x, state.position, &self.rope, cache);
        }
        state.position += 1;
        let mut normed = vec![0.0; h];
        rmsnorm_forward(
            &mut normed,
            &x,
            params.get(head.final_norm),
            h,
            self.config.norm_eps,
        );
        let mut logits = vec![0.0; self.config.vocab_size];
        params.linear_forward(
            &mut logits,
            &normed,
            head.output,
            None,
            LinearShape::new(1, h, self.config.vocab_size),
        );
        logits
    }
}
