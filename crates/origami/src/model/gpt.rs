//! The GPT-style MoE model: embedding → blocks (dense or MoE feed-forward per the layer
//! pattern) → final RMSNorm → output layer (own weight, or the embedding table when tied) →
//! cross-entropy (+ the routers' load-balancing and z losses).
//!
//! The training loss of a micro-batch is `CE_mean + Σ_layers (aux + z)`; `loss_scale` multiplies
//! it for the backward (e.g. `1 / micro_batches` under gradient accumulation).

use super::config::{ModelConfig, ModelConfigError};
use super::init::initialise;
use super::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry};
use crate::layers::attention::{Attention, AttentionDims, KvCache, Positions};
use crate::layers::block::{Block, BlockSaved, FeedForward};
use crate::layers::mlp::Mlp;
use crate::layers::moe::parallel::MoeParallel;
use crate::layers::moe::{MoeLayer, MoeStats};
use origami_kernels::cross_entropy::{
    cross_entropy_forward_backward, cross_entropy_rows, CrossEntropySums, IGNORE_TARGET,
};
use origami_kernels::embedding::{embedding_backward, embedding_forward};
use origami_kernels::matmul::{linear_backward, linear_forward, LinearGrads, Par};
use origami_kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use origami_kernels::rope::RopeTable;

/// Rows of the output layer computed at once, bounding the logits buffer to `rows × vocab`.
const OUTPUT_CHUNK_ROWS: usize = 1024;

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
}

struct HiddenStates {
    embedded_tokens: Vec<u32>,
    blocks: Vec<BlockSaved>,
    final_input: Vec<f32>,
    final_rstd: Vec<f32>,
    normed: Vec<f32>,
    moe: Vec<MoeStats>,
}

impl GptModel {
    /// Builds the model's layers and registers every parameter; validates the configuration.
    pub fn new(config: ModelConfig) -> Result<Self, ModelConfigError> {
        Self::new_parallel(config, MoeParallel::single())
    }

    /// The model on one rank of `moe_parallel`: every dense parameter whole, the MoE layers'
    /// experts split over its ep and etp groups. Errors when the expert sizes do not split.
    pub fn new_parallel(
        config: ModelConfig,
        moe_parallel: MoeParallel,
    ) -> Result<Self, ModelConfigError> {
        config.validate()?;
        let c = &config;
        let mut registry = ParamRegistry::default();
        let std = c.init_std;
        let out_std = std / (2.0 * c.num_layers as f32).sqrt();
        let h = c.hidden_size;
        let embedding = registry.register(
            "embedding.weight".into(),
            &[c.vocab_size, h],
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
                let attention = Attention::new(
                    &mut registry,
                    &format!("{prefix}.attention"),
                    dims,
                    c.qkv_bias,
                    std,
                    out_std,
                );
                let ffn = if c.is_moe_layer(l) {
                    FeedForward::Moe(Box::new(MoeLayer::new_parallel(
                        &mut registry,
                        &format!("{prefix}.moe"),
                        h,
                        &c.moe,
                        (std, out_std),
                        moe_parallel.clone(),
                    )?))
                } else {
                    FeedForward::Dense(Mlp::new(
                        &mut registry,
                        &format!("{prefix}.mlp"),
                        h,
                        c.ffn_hidden_size,
                        std,
                        out_std,
                    ))
                };
                Ok(Block::new(
                    &mut registry,
                    &prefix,
                    h,
                    c.norm_eps,
                    attention,
                    ffn,
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
            registry.register(
                "output.weight".into(),
                &[c.vocab_size, h],
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
        })
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
    }

    fn forward_hidden(
        &self,
        params: &Buffers,
        batch: &MicroBatch,
        positions: &Positions,
    ) -> HiddenStates {
        self.check_batch(batch);
        let h = self.config.hidden_size;
        let mut x = vec![0.0; batch.tokens.len() * h];
        embedding_forward(&mut x, params.get(self.embedding), &batch.tokens, h);
        let mut saved = Vec::with_capacity(self.blocks.len());
        let mut moe = Vec::new();
        for block in &self.blocks {
            let (y, s, stats) = block.forward(params, x, batch.batch, batch.seq, positions);
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
            embedded_tokens: batch.tokens.clone(),
            blocks: saved,
            final_input: x,
            final_rstd,
            normed,
            moe,
        }
    }

    fn positions(&self, batch: &MicroBatch) -> Vec<usize> {
        (0..batch.batch * batch.seq)
            .map(|r| r % batch.seq)
            .collect()
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

    /// Logits `[batch·seq, vocab]` (evaluation, generation).
    pub fn logits(&self, params: &Buffers, batch: &MicroBatch) -> Vec<f32> {
        let rows = self.positions(batch);
        let states = self.forward_hidden(
            params,
            batch,
            &Positions {
                of_row: &rows,
                rope: &self.rope,
            },
        );
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
        let rows = self.positions(batch);
        let states = self.forward_hidden(
            params,
            batch,
            &Positions {
                of_row: &rows,
                rope: &self.rope,
            },
        );
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        let mut sums = CrossEntropySums::default();
        for (x, targets) in states
            .normed
            .chunks(OUTPUT_CHUNK_ROWS * h)
            .zip(batch.targets.chunks(OUTPUT_CHUNK_ROWS))
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
            let per_row = cross_entropy_rows(&logits, targets, v);
            sums.cross_entropy += per_row.iter().map(|&l| l as f64).sum::<f64>();
            sums.rows += targets.iter().filter(|&&t| t != IGNORE_TARGET).count();
        }
        report(sums, states.moe)
    }

    /// Forward and backward of one micro-batch: accumulates `loss_scale · ∇(CE + aux + z)` into
    /// `grads` and returns the losses.
    pub fn forward_backward(
        &self,
        params: &Buffers,
        grads: &mut Buffers,
        batch: &MicroBatch,
        loss_scale: f32,
    ) -> LossReport {
        let rows = self.positions(batch);
        let positions = Positions {
            of_row: &rows,
            rope: &self.rope,
        };
        let states = self.forward_hidden(params, batch, &positions);
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        let counted = batch
            .targets
            .iter()
            .filter(|&&t| t != IGNORE_TARGET)
            .count();
        let ce_scale = loss_scale / counted.max(1) as f32;
        let out_w = self.output_weight();
        let mut d_normed = vec![0.0; states.normed.len()];
        let mut sums = CrossEntropySums::default();
        let mut logits = vec![0.0; OUTPUT_CHUNK_ROWS.min(batch.targets.len()) * v];
        for ((x, targets), dx) in states
            .normed
            .chunks(OUTPUT_CHUNK_ROWS * h)
            .zip(batch.targets.chunks(OUTPUT_CHUNK_ROWS))
            .zip(d_normed.chunks_mut(OUTPUT_CHUNK_ROWS * h))
        {
            let n = targets.len();
            let logits = &mut logits[..n * v];
            linear_forward(logits, x, params.get(out_w), None, n, h, v, Par::All);
            sums += cross_entropy_forward_backward(logits, targets, v, 0.0, ce_scale);
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
                batch.batch,
                batch.seq,
                &positions,
            );
        }
        embedding_backward(
            grads.get_mut(self.embedding),
            &dx,
            &states.embedded_tokens,
            h,
        );
        report(sums, states.moe)
    }
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

fn report(sums: CrossEntropySums, moe: Vec<MoeStats>) -> LossReport {
    LossReport {
        cross_entropy: sums.cross_entropy / sums.rows.max(1) as f64,
        load_balancing: moe.iter().map(|s| s.losses.load_balancing).sum(),
        z: moe.iter().map(|s| s.losses.z).sum(),
        tokens: sums.rows,
        moe,
    }
}
