//! The equivalence harness (DESIGN.md §2): runs a computation on one rank of a parallel layout
//! and compares it with the same computation on a single rank holding everything.
//!
//! For a layer or one micro-batch ([`moe_layer`], [`model`]) every rank computes the
//! single-rank reference itself (it is deterministic), then its own part of the parallel run,
//! and reports the largest discrepancy of each quantity relative to the largest magnitude of
//! the reference, so a test can demand ≤ 1e-4 on every rank. The same functions run on the
//! local backend (tests) and under `mpirun` (the MPI check binaries). [`training`] compares
//! whole training runs of folded layouts, the reference trained once (by rank 0, or by the
//! caller); [`check`] runs that comparison for a user's run config (`origami check`).

mod allowance;
pub mod check;
pub mod training;

use std::error::Error;
use std::sync::Arc;

use origami_comm::{Communicator, ReduceOp, SoloComm};
use origami_kernels::testing::random_vec;
use origami_parallel::{ParallelConfig, ParallelState};

use crate::compute::{Compute, WeightCopies};
use crate::layers::context_parallel::CpCommType;
use crate::layers::moe::config::{AuxLossScope, DispatcherKind, MoeConfig};
use crate::layers::moe::parallel::MoeParallel;
use crate::layers::moe::MoeLayer;
use crate::model::config::ModelConfig;
use crate::model::gpt::{GptModel, MicroBatch, SequenceKeys};
use crate::model::parallel::ModelParallel;
use crate::params::init::initialise;
use crate::params::{Buffers, ParamRegistry};

/// Result type of the harness: a communicator, layout or model error, rendered.
pub type HarnessResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Largest discrepancies of one rank against the single-rank run, each relative to the
/// reference's largest magnitude.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Discrepancy {
    /// Output rows of this rank's tokens.
    pub output: f64,
    /// Losses (the ranks' parts summed where a loss is split across ranks).
    pub losses: f64,
    /// Gradient of this rank's inputs.
    pub input_grad: f64,
    /// Gradients of every parameter (expert shards against their slice of the reference,
    /// replicated parameters after summing over the ranks that share them).
    pub param_grads: f64,
}

impl Discrepancy {
    /// The largest of the four.
    pub fn max(&self) -> f64 {
        self.output
            .max(self.losses)
            .max(self.input_grad)
            .max(self.param_grads)
    }
}

/// `max |a − b| / max |b|` (0 when both are empty or zero).
pub fn relative_error(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "compared lengths differ");
    let scale = expected
        .iter()
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let diff = actual
        .iter()
        .zip(expected)
        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    if diff == 0.0 {
        0.0
    } else {
        diff / scale.max(f64::MIN_POSITIVE)
    }
}

/// One MoE-layer comparison: a layout of `ep · etp` ranks (each holding distinct tokens, all of
/// them one micro-batch, as sequence-parallel attention leaves them) against one rank holding
/// every token and expert.
#[derive(Clone, Debug)]
pub struct MoeLayerCase {
    /// Expert-parallel size.
    pub ep: usize,
    /// Expert tensor-parallel size.
    pub etp: usize,
    /// Layer settings (the dispatcher among them).
    pub settings: MoeConfig,
    /// Model width.
    pub hidden: usize,
    /// Tokens of each rank, in rank order (zero allowed).
    pub tokens_per_rank: Vec<usize>,
    /// Sequences the tokens form. With more than one, every rank holds an equal part of each
    /// sequence (as sequence and context parallelism split them) and the reference holds the
    /// sequences whole, one after another.
    pub sequences: usize,
    /// Make every token choose this expert first (a large router weight on a constant input
    /// feature).
    pub all_to_expert: Option<usize>,
    /// The router's expert bias (with `settings.expert_bias_update_rate`; zero when absent).
    pub expert_bias: Option<Vec<f32>>,
    /// Seed of parameters and inputs.
    pub seed: u64,
    /// Precision of both runs (the reference's too).
    pub compute: Compute,
}

impl MoeLayerCase {
    /// A dropless case with aux and z losses and a gated shared expert: 8 experts, top-2,
    /// width 16, 6 tokens per rank.
    pub fn new(ep: usize, etp: usize, dispatcher: DispatcherKind) -> Self {
        MoeLayerCase {
            ep,
            etp,
            settings: MoeConfig {
                num_experts: 8,
                ffn_hidden_size: 8,
                topk: 2,
                aux_loss_coeff: 0.1,
                z_loss_coeff: 0.01,
                shared_expert_ffn_hidden_size: 6,
                shared_expert_gate: true,
                dispatcher,
                ..MoeConfig::default()
            },
            hidden: 16,
            tokens_per_rank: vec![6; ep * etp],
            sequences: 1,
            all_to_expert: None,
            expert_bias: None,
            seed: 7,
            compute: Compute::F32,
        }
    }
}

impl MoeLayerCase {
    /// The reference's token indices that `rank` holds, in its order.
    fn tokens_of_rank(&self, rank: usize) -> Vec<usize> {
        let ranks = self.tokens_per_rank.len();
        if self.sequences > 1 {
            let part = self.tokens_per_rank[rank] / self.sequences;
            let length = part * ranks;
            (0..self.sequences)
                .flat_map(|s| (0..part).map(move |i| s * length + rank * part + i))
                .collect()
        } else {
            let start: usize = self.tokens_per_rank[..rank].iter().sum();
            (start..start + self.tokens_per_rank[rank]).collect()
        }
    }
}

/// The parallel state of a layout whose attention side is tensor-parallel over the whole world
/// (so every rank's tokens belong to one micro-batch) and whose MoE side is `ep × etp`.
pub fn moe_only_state(
    world: &Arc<dyn Communicator>,
    ep: usize,
    etp: usize,
) -> HarnessResult<ParallelState> {
    let config = ParallelConfig {
        tp: world.size(),
        ep,
        etp: Some(etp),
        ..ParallelConfig::default()
    };
    let layout = config.layout(world.size())?;
    Ok(ParallelState::new(&layout, world.as_ref())?)
}

/// The MoE groups of a [`moe_only_state`] rank. The shared expert stays whole: each rank's
/// tokens are its own, not a slice of a tensor-parallel region's sequences.
pub fn moe_only_parallel(state: &ParallelState) -> MoeParallel {
    MoeParallel {
        tensor: SoloComm::shared(0),
        ..MoeParallel::from_state(state)
    }
}

/// Runs `case` on this rank of `world` (which must have `ep · etp` ranks) and on one rank, and
/// returns the discrepancies.
pub fn moe_layer(world: &Arc<dyn Communicator>, case: &MoeLayerCase) -> HarnessResult<Discrepancy> {
    let even = case.sequences <= 1
        || case
            .tokens_per_rank
            .iter()
            .all(|&t| t == case.tokens_per_rank[0] && t % case.sequences == 0);
    if !even {
        return Err("a case of several sequences needs equal token counts that they divide".into());
    }
    if world.size() != case.ep * case.etp || case.tokens_per_rank.len() != world.size() {
        return Err(format!(
            "an MoE case of ep {} × etp {} with {} token counts needs that many ranks, got {}",
            case.ep,
            case.etp,
            case.tokens_per_rank.len(),
            world.size()
        )
        .into());
    }
    let h = case.hidden;
    let stds = (0.4, 0.4);
    let mut full_registry = ParamRegistry::default();
    let full = MoeLayer::new(&mut full_registry, "moe", h, &case.settings, stds.0, stds.1);
    let mut full_params = initialise(&full_registry, case.seed);
    let total: usize = case.tokens_per_rank.iter().sum();
    let mut x = random_vec(total * h, case.seed + 1);
    if let Some(expert) = case.all_to_expert {
        x.chunks_mut(h).for_each(|row| row[0] = 1.0);
        let router = full_registry
            .find("moe.router.weight")
            .expect("router weight");
        full_params.get_mut(router.id)[expert * h] = 40.0;
    }
    if let Some(bias) = &case.expert_bias {
        set_expert_biases(&full_registry, &mut full_params, bias);
    }
    let dy = random_vec(total * h, case.seed + 2);
    let full_copies = WeightCopies::new(case.compute, &full_params);
    let full_weights = full_copies.weights(&full_params);
    let (y_ref, saved, stats_ref) = full.forward_batch(&full_weights, &x, case.sequences);
    let mut grads_ref = full_registry.zeros();
    let dx_ref = full.backward(&full_weights, &mut grads_ref, saved, &x, &dy, 1.0);

    let state = moe_only_state(world, case.ep, case.etp)?;
    let mut registry = ParamRegistry::default();
    let layer = MoeLayer::new_parallel(
        &mut registry,
        "moe",
        h,
        &case.settings,
        stds,
        moe_only_parallel(&state),
    )?;
    let params = registry.shard_of(&full_registry, &full_params);
    let mine = case.tokens_of_rank(world.rank());
    let rows = |all: &[f32]| -> Vec<f32> {
        mine.iter()
            .flat_map(|&t| all[t * h..(t + 1) * h].iter().copied())
            .collect()
    };
    let x_mine = rows(&x);
    let copies = WeightCopies::new(case.compute, &params);
    let weights = copies.weights(&params);
    let (y, saved, stats) = layer.forward_batch(&weights, &x_mine, case.sequences);
    let mut grads = registry.zeros();
    let dx = layer.backward(&weights, &mut grads, saved, &x_mine, &rows(&dy), 1.0);
    let mut losses = [stats.losses.load_balancing as f32, stats.losses.z as f32];
    world.all_reduce(&mut losses, ReduceOp::Sum)?;
    world.all_reduce(&mut grads.dense, ReduceOp::Sum)?;
    let mut load_error = 0.0;
    if stats.tokens_per_expert != stats_ref.tokens_per_expert {
        load_error = 1.0;
    }
    Ok(Discrepancy {
        output: relative_error(&y, &rows(&y_ref)),
        losses: relative_error(
            &losses,
            &[
                stats_ref.losses.load_balancing as f32,
                stats_ref.losses.z as f32,
            ],
        )
        .max(load_error),
        input_grad: relative_error(&dx, &rows(&dx_ref)),
        param_grads: parameter_gradients(&registry, &grads, &full_registry, &grads_ref),
    })
}

/// Sets every router's expert bias in `params` (parameters named `….router.expert_bias`).
fn set_expert_biases(registry: &ParamRegistry, params: &mut Buffers, bias: &[f32]) {
    for info in registry.params() {
        if info.name.ends_with(".router.expert_bias") {
            params.get_mut(info.id).copy_from_slice(bias);
        }
    }
}

/// Largest relative error over parameters of `grads` (this rank's, replicated ones already
/// reduced) against the matching slices of the single-rank `grads_ref`.
fn parameter_gradients(
    registry: &ParamRegistry,
    grads: &Buffers,
    full_registry: &ParamRegistry,
    grads_ref: &Buffers,
) -> f64 {
    let expected = registry.shard_of(full_registry, grads_ref);
    registry
        .params()
        .iter()
        .map(|p| relative_error(grads.get(p.id), expected.get(p.id)))
        .fold(0.0, f64::max)
}

/// One whole-model comparison: attention data-parallel over the world (each rank its own
/// micro-batch), MoE layers `ep × etp` (× edp for the rest), against one rank accumulating
/// the ranks' micro-batches in order.
#[derive(Clone, Debug)]
pub struct ModelCase {
    /// Expert-parallel size.
    pub ep: usize,
    /// Expert tensor-parallel size.
    pub etp: usize,
    /// The model (its `moe.dispatcher` among the settings).
    pub model: ModelConfig,
    /// Sequences per rank.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Every router's expert bias (with `model.moe.expert_bias_update_rate`; zero when absent).
    pub expert_bias: Option<Vec<f32>>,
    /// Seed of parameters and data.
    pub seed: u64,
}

impl ModelCase {
    /// A two-layer model (dense first layer, then MoE with a shared expert), 8 experts top-2,
    /// aux and z losses on; two sequences of 8 tokens per rank.
    pub fn new(ep: usize, etp: usize, dispatcher: DispatcherKind) -> Self {
        let mut model = two_layer_model(16, (2, 1), 24);
        model.moe.dispatcher = dispatcher;
        ModelCase {
            ep,
            etp,
            model,
            batch: 2,
            seq: 8,
            expert_bias: None,
            seed: 11,
        }
    }

    fn micro_batch(&self, rank: usize) -> MicroBatch {
        random_micro_batch(
            (self.batch, self.seq),
            self.model.vocab_size,
            self.seed * 1000 + rank as u64 * 10,
            SequenceKeys::consecutive(self.seed, 0, (rank * self.batch) as u64, self.batch),
        )
    }
}

/// The harness's model: a dense layer, then an MoE layer with a shared expert (8 experts top-2,
/// aux and z losses on), vocabulary 64, `heads` query heads in `kv_heads` groups.
pub(crate) fn two_layer_model(
    hidden: usize,
    (heads, kv_heads): (usize, usize),
    ffn: usize,
) -> ModelConfig {
    let mut model = ModelConfig::preset("tiny").expect("tiny preset");
    model.vocab_size = 64;
    model.hidden_size = hidden;
    model.num_layers = 2;
    model.num_heads = heads;
    model.num_kv_heads = kv_heads;
    model.head_dim = None;
    model.ffn_hidden_size = ffn;
    model.max_seq_len = 16;
    model.init_std = 0.2;
    model.moe = MoeConfig {
        num_experts: 8,
        ffn_hidden_size: 8,
        topk: 2,
        layer_pattern: Some(vec![0, 1]),
        aux_loss_coeff: 0.1,
        z_loss_coeff: 0.01,
        shared_expert_ffn_hidden_size: 8,
        ..MoeConfig::default()
    };
    model
}

/// A micro-batch of `batch` sequences of `seq` random tokens and targets below `vocab`,
/// determined by `salt`, with the sequence keys `keys`.
pub(crate) fn random_micro_batch(
    (batch, seq): (usize, usize),
    vocab: usize,
    salt: u64,
    keys: SequenceKeys,
) -> MicroBatch {
    let draw = |offset: u64| -> Vec<u32> {
        random_vec(batch * seq, salt + offset)
            .iter()
            .map(|v| (((v + 1.0) / 2.0 * vocab as f32) as u32).min(vocab as u32 - 1))
            .collect()
    };
    MicroBatch {
        tokens: draw(1),
        targets: draw(2),
        batch,
        seq,
        keys,
    }
}

/// Runs `case` on this rank of `world` and on one rank, and returns the discrepancies of the
/// loss and of every gradient (outputs are not compared: the loss is the model's output).
///
/// The reference accumulates the ranks' micro-batches one by one (loss scale 1/ranks each),
/// which is what the parallel run computes when the load-balancing loss counts loads per
/// micro-batch or per sequence. With the global-batch scope the parallel run counts the loads
/// of all ranks at once, which one rank computes as a single micro-batch of every rank's
/// sequences; the reference is then that one micro-batch, and the mean of the ranks' losses is
/// compared with it.
pub fn model(world: &Arc<dyn Communicator>, case: &ModelCase) -> HarnessResult<Discrepancy> {
    let ranks = world.size();
    let full = GptModel::new(case.model.clone())?;
    let mut full_params = full.init_params(case.seed);
    if let Some(bias) = &case.expert_bias {
        set_expert_biases(full.registry(), &mut full_params, bias);
    }
    let mut grads_ref = full.registry().zeros();
    let whole_batch = case.model.moe.aux_loss_scope == AuxLossScope::GlobalBatch;
    let loss_ref = if whole_batch {
        let parts: Vec<MicroBatch> = (0..ranks).map(|r| case.micro_batch(r)).collect();
        let all = MicroBatch {
            tokens: parts.iter().flat_map(|b| b.tokens.clone()).collect(),
            targets: parts.iter().flat_map(|b| b.targets.clone()).collect(),
            batch: case.batch * ranks,
            seq: case.seq,
            keys: SequenceKeys {
                sequences: parts
                    .iter()
                    .flat_map(|b| b.keys.sequences.clone())
                    .collect(),
                ..parts[0].keys.clone()
            },
        };
        full.begin_global_batch();
        full.forward_backward(&full_params, &mut grads_ref, &all, 1.0)
            .total()
    } else {
        let mut mine = 0.0;
        for r in 0..ranks {
            let report = full.forward_backward(
                &full_params,
                &mut grads_ref,
                &case.micro_batch(r),
                1.0 / ranks as f32,
            );
            if r == world.rank() {
                mine = report.total();
            }
        }
        mine
    };
    let config = ParallelConfig {
        ep: case.ep,
        etp: Some(case.etp),
        ..ParallelConfig::default()
    };
    let state = ParallelState::new(&config.layout(ranks)?, world.as_ref())?;
    let model = GptModel::new_parallel(
        case.model.clone(),
        ModelParallel::from_state(&state, CpCommType::P2p),
    )?;
    let params = model.registry().shard_of(full.registry(), &full_params);
    let mut grads = model.registry().zeros();
    model.begin_global_batch();
    let report = model.forward_backward(
        &params,
        &mut grads,
        &case.micro_batch(world.rank()),
        1.0 / ranks as f32,
    );
    let mut loss = [report.total() as f32];
    if whole_batch {
        world.all_reduce(&mut loss, ReduceOp::Sum)?;
        loss[0] /= ranks as f32;
    }
    state
        .dp_cp()
        .comm()
        .all_reduce(&mut grads.dense, ReduceOp::Sum)?;
    state
        .edp()
        .comm()
        .all_reduce(&mut grads.expert, ReduceOp::Sum)?;
    Ok(Discrepancy {
        output: 0.0,
        losses: relative_error(&loss, &[loss_ref as f32]),
        input_grad: 0.0,
        param_grads: parameter_gradients(model.registry(), &grads, full.registry(), &grads_ref),
    })
}
