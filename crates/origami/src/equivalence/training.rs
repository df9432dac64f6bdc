//! Whole-training equivalence: K optimizer steps of a folded layout — attention TP × CP × DP × PP,
//! MoE ETP × EP × EDP × PP over the same ranks, the pipeline run by its schedule (1F1B or
//! interleaved) — against the same K steps on one rank. Both runs go through [`train_step`],
//! the trainer's step; every rank compares the loss and the gradient norm of every step, the
//! reduced gradients of the first step (AdamW's first update is nearly `lr · sign(g)`, so the
//! weights alone would hide a wrongly scaled gradient) and, at the end, each of its parameters
//! with its slice of the single-rank parameters.

use std::sync::Arc;

use origami_comm::Communicator;
use origami_parallel::{ParallelConfig, ParallelState};

use super::{random_micro_batch, relative_error, two_layer_model, HarnessResult};
use crate::layers::context_parallel::CpCommType;
use crate::layers::moe::config::DispatcherKind;
use crate::model::config::ModelConfig;
use crate::model::gpt::{GptModel, MicroBatch};
use crate::model::parallel::ModelParallel;
use crate::optim::adamw::AdamWConfig;
use crate::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use crate::params::Buffers;
use crate::train::pipeline::stage_schedule;
use crate::train::step::{train_step, StepGroups};

/// One layout's training run to compare with one rank.
#[derive(Clone, Debug)]
pub struct TrainingCase {
    /// Tensor, context and expert sizes (dp and edp follow from the world).
    pub parallel: ParallelConfig,
    /// Context-parallel attention's exchange.
    pub cp_comm_type: CpCommType,
    /// Shard the optimizer state over the data-parallel ranks.
    pub distributed_optimizer: bool,
    /// The model (the dispatcher among its MoE settings).
    pub model: ModelConfig,
    /// Optimizer settings.
    pub adamw: AdamWConfig,
    /// Learning rate of every step.
    pub lr: f32,
    /// Sequences per step.
    pub global_batch: usize,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Steps compared (K).
    pub steps: usize,
    /// Gradient reduction bucket size.
    pub bucket_elements: usize,
    /// Seed of parameters and data.
    pub seed: u64,
    /// Layers of the first pipeline stage, when uneven.
    pub first_stage_layers: Option<usize>,
    /// Layers of the last pipeline stage, when uneven.
    pub last_stage_layers: Option<usize>,
    /// Interleaved schedule's micro-batch group size (default pp).
    pub group_size: Option<usize>,
}

/// Largest discrepancies of one rank's run against the single-rank run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainingDiscrepancy {
    /// Step losses and gradient norms (each relative to the largest of its kind).
    pub losses: f64,
    /// The tokens routed to each expert of each MoE layer, every step, as the step reports
    /// them (the whole model's on every rank); infinite when the layer counts differ.
    pub loads: f64,
    /// Reduced gradients of the first step, the largest over parameters of each one's
    /// relative error (with the replicated optimizer; the distributed one keeps only its part).
    pub grads: f64,
    /// Final parameters, the largest over parameters of each one's relative error.
    pub params: f64,
    /// The parameter with the largest error of the two above.
    pub worst_param: String,
}

impl TrainingDiscrepancy {
    /// The largest of the four.
    pub fn max(&self) -> f64 {
        self.losses.max(self.loads).max(self.grads).max(self.params)
    }
}

impl TrainingCase {
    /// A two-layer model (dense, then MoE with a gated shared expert; 8 experts top-2,
    /// dropless, aux and z losses on; 8 query heads in 4 groups so that tp and cp up to 4
    /// split them), trained 3 steps on 8 sequences of 16 tokens in micro-batches of 2.
    pub fn new(tp: usize, cp: usize, ep: usize, etp: usize) -> Self {
        let mut model = two_layer_model(32, (8, 4), 32);
        model.moe.shared_expert_gate = true;
        TrainingCase {
            parallel: ParallelConfig {
                tp,
                cp,
                ep,
                etp: Some(etp),
                ..ParallelConfig::default()
            },
            cp_comm_type: CpCommType::P2p,
            distributed_optimizer: false,
            model,
            adamw: AdamWConfig::default(),
            lr: 1e-2,
            global_batch: 8,
            micro_batch: 2,
            seq: 16,
            steps: 3,
            bucket_elements: 1000,
            seed: 5,
            first_stage_layers: None,
            last_stage_layers: None,
            group_size: None,
        }
    }

    /// Along a pipeline of `pp` stages with `vpp` chunks each, on a model of `layers` layers
    /// (the same widths; MoE on every layer but each third, `l % 3 == 2`, so stages and chunks
    /// differ in what they hold).
    pub fn pipeline(mut self, pp: usize, vpp: usize, layers: usize) -> Self {
        self.parallel.pp = pp;
        self.parallel.vpp = vpp;
        self.model.num_layers = layers;
        self.model.moe.layer_pattern = Some((0..layers).map(|l| u8::from(l % 3 != 2)).collect());
        self
    }

    /// With the first and last stage holding these many layers.
    pub fn stage_layers(mut self, first: Option<usize>, last: Option<usize>) -> Self {
        self.first_stage_layers = first;
        self.last_stage_layers = last;
        self
    }

    /// With the output layer tied to the embedding table.
    pub fn tied_embeddings(mut self) -> Self {
        self.model.tie_embeddings = true;
        self
    }

    /// With micro-batches of `sequences` sequences.
    pub fn sequences_per_micro_batch(mut self, sequences: usize) -> Self {
        self.micro_batch = sequences;
        self
    }

    /// With the given dispatcher.
    pub fn dispatcher(mut self, dispatcher: DispatcherKind) -> Self {
        self.model.moe.dispatcher = dispatcher;
        self
    }

    /// With the given context-parallel exchange.
    pub fn cp_comm_type(mut self, comm_type: CpCommType) -> Self {
        self.cp_comm_type = comm_type;
        self
    }

    /// With or without the distributed optimizer.
    pub fn distributed_optimizer(mut self, on: bool) -> Self {
        self.distributed_optimizer = on;
        self
    }

    /// The case in one line, e.g. `TP2·CP1·DP2·PP2 | EP4·ETP1·EDP1·PP2, VPP1, alltoall, p2p,
    /// replicated optimizer`.
    pub fn describe(&self, world: usize) -> String {
        let p = &self.parallel;
        let etp = p.etp();
        let stages = match (self.first_stage_layers, self.last_stage_layers) {
            (None, None) => String::new(),
            (first, last) => format!(" (stage layers {first:?} … {last:?})"),
        };
        format!(
            "TP{}·CP{}·DP{}·PP{} | EP{}·ETP{}·EDP{}·PP{}, VPP{}{stages}{}, {:?}, {:?}, {}",
            p.tp,
            p.cp,
            world / (p.tp * p.cp * p.pp),
            p.pp,
            p.ep,
            etp,
            world / (p.ep * etp * p.pp),
            p.pp,
            p.vpp,
            if self.model.tie_embeddings {
                ", tied"
            } else {
                ""
            },
            self.model.moe.dispatcher,
            self.cp_comm_type,
            if self.distributed_optimizer {
                "distributed optimizer"
            } else {
                "replicated optimizer"
            }
        )
    }

    /// Global micro-batch `index` of step `step` (random tokens, deterministic).
    fn micro_batch(&self, step: usize, index: usize) -> MicroBatch {
        random_micro_batch(
            (self.micro_batch, self.seq),
            self.model.vocab_size,
            self.seed * 100_000 + (step * 1000 + index) as u64 * 10,
        )
    }

    fn micro_batches(&self) -> usize {
        self.global_batch / self.micro_batch
    }
}

/// Runs `case` on this rank of `world` and on one rank, and returns the discrepancies.
pub fn training(
    world: &Arc<dyn Communicator>,
    case: &TrainingCase,
) -> HarnessResult<TrainingDiscrepancy> {
    let total = case.micro_batches();
    let full = GptModel::new(case.model.clone())?;
    let initial = full.init_params(case.seed);
    let mut full_params = initial.clone();
    let mut first_grads_ref = None;
    let mut full_grads = full.registry().zeros();
    let mut full_optimizer = ParallelOptimizer::new(
        full.registry(),
        case.adamw,
        OptimizerGroups::single(),
        false,
        case.bucket_elements,
    );
    let full_schedule = stage_schedule(&full, total, None)?;
    let (mut losses_ref, mut norms_ref, mut loads_ref) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..case.steps {
        let batches: Vec<MicroBatch> = (0..total).map(|m| case.micro_batch(step, m)).collect();
        let outcome = train_step(
            &full,
            &mut full_params,
            &mut full_grads,
            &mut full_optimizer,
            &batches,
            &full_schedule,
            total,
            &StepGroups::single(),
            case.lr,
        )?;
        losses_ref.push(outcome.loss as f32);
        norms_ref.push(outcome.grad_norm as f32);
        loads_ref.extend(
            outcome
                .tokens_per_expert
                .iter()
                .flatten()
                .map(|&n| n as f32),
        );
        first_grads_ref.get_or_insert_with(|| full_grads.clone());
    }

    let layout = case.parallel.layout(world.size())?;
    let state = ParallelState::new(&layout, world.as_ref())?;
    let dp = state.dp();
    if !total.is_multiple_of(dp.size()) {
        return Err(format!(
            "{total} micro-batches do not split over {} data-parallel ranks",
            dp.size()
        )
        .into());
    }
    let model = GptModel::new_parallel(
        case.model.clone(),
        ModelParallel::from_state(&state, case.cp_comm_type)
            .with_stage_layers(case.first_stage_layers, case.last_stage_layers),
    )?;
    let groups = StepGroups::from_state(&state, world.clone());
    let mut params = model.registry().shard_of(full.registry(), &initial);
    let mut first_grads = None;
    let mut grads = model.registry().zeros();
    let mut optimizer = ParallelOptimizer::new(
        model.registry(),
        case.adamw,
        OptimizerGroups::from_state(&state, world.clone()),
        case.distributed_optimizer,
        case.bucket_elements,
    );
    let per_rank = total / dp.size();
    let schedule = stage_schedule(&model, per_rank, case.group_size)?;
    let (mut losses, mut norms, mut loads) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..case.steps {
        let batches: Vec<MicroBatch> = (0..per_rank)
            .map(|j| case.micro_batch(step, dp.rank() * per_rank + j))
            .collect();
        let outcome = train_step(
            &model,
            &mut params,
            &mut grads,
            &mut optimizer,
            &batches,
            &schedule,
            total,
            &groups,
            case.lr,
        )?;
        losses.push(outcome.loss as f32);
        norms.push(outcome.grad_norm as f32);
        loads.extend(
            outcome
                .tokens_per_expert
                .iter()
                .flatten()
                .map(|&n| n as f32),
        );
        first_grads.get_or_insert_with(|| grads.clone());
    }
    let registry = model.registry();
    let worst = |actual: &Buffers, reference: &Buffers| -> (f64, String) {
        let expected = registry.shard_of(full.registry(), reference);
        registry
            .params()
            .iter()
            .map(|p| {
                (
                    relative_error(actual.get(p.id), expected.get(p.id)),
                    p.name.clone(),
                )
            })
            .fold((0.0, String::new()), |worst, next| {
                if next.0 > worst.0 {
                    next
                } else {
                    worst
                }
            })
    };
    let (params_error, params_worst) = worst(&params, &full_params);
    let (grads_error, grads_worst) = match (&first_grads, &first_grads_ref) {
        (Some(grads), Some(reference)) if !case.distributed_optimizer => worst(grads, reference),
        _ => (0.0, String::new()),
    };
    let worst_param = if grads_error > params_error {
        grads_worst
    } else {
        params_worst
    };
    Ok(TrainingDiscrepancy {
        losses: relative_error(&losses, &losses_ref).max(relative_error(&norms, &norms_ref)),
        loads: if loads.len() == loads_ref.len() {
            relative_error(&loads, &loads_ref)
        } else {
            f64::INFINITY
        },
        grads: grads_error,
        params: params_error,
        worst_param,
    })
}
