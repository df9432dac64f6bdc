//! Whole-training equivalence: K optimizer steps of a folded layout — attention TP × CP × DP × PP,
//! MoE ETP × EP × EDP × PP over the same ranks, the pipeline run by its schedule (1F1B or
//! interleaved) — against the same K steps on one rank. Both runs go through [`train_step`],
//! the trainer's step. The comparison takes the loss and the gradient norm of every step, the
//! expert loads of every step, the reduced gradients of the first step (AdamW's first update is
//! nearly `lr · sign(g)`, so the weights alone would hide a wrongly scaled gradient) and, at the
//! end, every parameter of every rank against its slice of the single-rank parameters.
//!
//! The single-rank run ([`Reference`]) is computed once — by the caller, or by rank 0 and
//! broadcast ([`Reference::on_root`]) — and every rank compares its own part with it; the
//! errors are then gathered (the largest over ranks), so every rank holds the same
//! [`TrainingComparison`]. `origami check` and the equivalence tests both run through here.
//!
//! AdamW divides each gradient element by its running RMS (plus `eps`), so an element whose
//! gradient is as small as the rounding of the others gets an update of nearly arbitrary size:
//! the weights can differ by more than the gradients that made them. The final weights are
//! therefore judged beyond an allowance ([`Reference::allowance`]): what AdamW can make of
//! gradients that agree within the tolerance, bounded element by element from the reference's
//! own moments. Elsewhere the allowance is a small fraction of one update.
//!
//! With the global-batch load-balancing scope and more than one data-parallel replica, the
//! parallel run counts the replicas' j-th micro-batches together (docs/moe.md); the single-rank
//! run it equals takes those micro-batches as one ([`TrainingCase::reference_merges`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use origami_comm::{Communicator, ReduceOp};
use origami_parallel::{ParallelConfig, ParallelState};

use super::allowance::AdamWAllowance;
use super::{random_micro_batch, relative_error, two_layer_model, HarnessResult};
use crate::compute::{Compute, WeightCopies};
use crate::layers::context_parallel::CpCommType;
use crate::layers::moe::config::{AuxLossScope, DispatcherKind};
use crate::model::config::ModelConfig;
use crate::model::gpt::{GptModel, MicroBatch, SequenceKeys};
use crate::model::parallel::ModelParallel;
use crate::optim::adamw::AdamWConfig;
use crate::optim::lr_schedule::LrSchedule;
use crate::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use crate::params::{Buffers, ParamRegistry};
use crate::train::pipeline::stage_schedule;
use crate::train::step::{train_step, StepGroups, StepOutcome};
use crate::train::trainer::{step_micro_batch, BatchShape, SampleSource};

/// Where a case's tokens come from.
#[derive(Clone)]
pub enum TrainingData {
    /// Deterministic random tokens, different for every (seed, step, micro-batch).
    Random,
    /// Samples of a dataset, read as the trainer reads them: sequence `i` of step `s` is
    /// sample `s · global_batch + i`.
    Samples(Arc<dyn SampleSource + Send>),
}

impl fmt::Debug for TrainingData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainingData::Random => f.write_str("Random"),
            TrainingData::Samples(source) => write!(f, "Samples({} samples)", source.len()),
        }
    }
}

/// A deliberate fault in the parallel run, to show that the comparison catches one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Rank `rank` initialises its parameters from `seed` instead of the case's seed.
    SeedOnRank {
        /// The rank that goes wrong.
        rank: usize,
        /// Its seed.
        seed: u64,
    },
}

/// One layout's training run to compare with one rank.
#[derive(Clone, Debug)]
pub struct TrainingCase {
    /// Tensor, context, pipeline and expert sizes (dp and edp follow from the world).
    pub parallel: ParallelConfig,
    /// Context-parallel attention's exchange.
    pub cp_comm_type: CpCommType,
    /// Shard the optimizer state over the data-parallel ranks.
    pub distributed_optimizer: bool,
    /// The model (the dispatcher among its MoE settings).
    pub model: ModelConfig,
    /// Optimizer settings.
    pub adamw: AdamWConfig,
    /// Learning rate of each step.
    pub lr: LrSchedule,
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
    /// Seed of parameters, data and router jitter.
    pub seed: u64,
    /// Layers of the first pipeline stage, when uneven.
    pub first_stage_layers: Option<usize>,
    /// Layers of the last pipeline stage, when uneven.
    pub last_stage_layers: Option<usize>,
    /// Interleaved schedule's micro-batch group size (default pp).
    pub group_size: Option<usize>,
    /// The tokens.
    pub data: TrainingData,
    /// A fault injected into the parallel run (none in a real check).
    pub fault: Option<Fault>,
    /// The relative error allowed: of losses, gradient norms, expert loads, gradients and
    /// weights (beyond AdamW's allowance, which it also scales).
    pub tolerance: f64,
    /// The precision both runs compute in (f32 for the equivalence proof).
    pub compute: Compute,
}

/// Largest discrepancies of a layout's run against the single-rank run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainingDiscrepancy {
    /// Step losses and gradient norms, each relative to the reference's value.
    pub losses: f64,
    /// The tokens routed to each expert of each MoE layer, every step, as the step reports
    /// them (the whole model's on every rank), relative to the largest reference count.
    pub loads: f64,
    /// Reduced gradients of the first step, the largest over parameters of each one's
    /// relative error (with the replicated optimizer; the distributed one keeps only its part).
    pub grads: f64,
    /// Final parameters, the largest over parameters of each one's error beyond AdamW's
    /// allowance, relative to its largest reference value.
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
    /// split them), trained 3 steps at a constant learning rate on 8 random sequences of 16
    /// tokens in micro-batches of 2.
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
            lr: LrSchedule {
                lr: 1e-2,
                min_lr: 1e-2,
                warmup_steps: 0,
                decay_steps: 0,
            },
            global_batch: 8,
            micro_batch: 2,
            seq: 16,
            steps: 3,
            bucket_elements: 1000,
            seed: 5,
            first_stage_layers: None,
            last_stage_layers: None,
            group_size: None,
            data: TrainingData::Random,
            fault: None,
            tolerance: 1e-4,
            compute: Compute::F32,
        }
    }

    /// With both runs computing in `compute`.
    pub fn compute(mut self, compute: Compute) -> Self {
        self.compute = compute;
        self
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

    /// With the routers jittering their input by `eps` in training.
    pub fn input_jitter(mut self, eps: f32) -> Self {
        self.model.moe.input_jitter_eps = Some(eps);
        self
    }

    /// With `fault` injected into the parallel run.
    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    /// Data-parallel replicas on `world` ranks.
    pub fn data_parallel(&self, world: usize) -> usize {
        world / (self.parallel.tp * self.parallel.cp * self.parallel.pp).max(1)
    }

    /// How many consecutive-replica micro-batches the single-rank run takes as one: the
    /// data-parallel size with the global-batch load-balancing scope (whose loads count the
    /// replicas' j-th micro-batches together), else 1.
    pub fn reference_merges(&self, world: usize) -> usize {
        let dp = self.data_parallel(world);
        if self.model.moe.aux_loss_scope == AuxLossScope::GlobalBatch && dp > 1 {
            dp
        } else {
            1
        }
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
            "TP{}·CP{}·DP{}·PP{} | EP{}·ETP{}·EDP{}·PP{}, VPP{}{stages}{}, {:?}, {:?}, {}{}",
            p.tp,
            p.cp,
            self.data_parallel(world),
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
            },
            match self.model.moe.input_jitter_eps {
                Some(eps) => format!(", jitter {eps}"),
                None => String::new(),
            }
        )
    }

    /// Micro-batch `index` (of the global batch's micro-batches, in order) of step `step`.
    fn micro_batch(&self, step: usize, index: usize) -> HarnessResult<MicroBatch> {
        match &self.data {
            TrainingData::Random => Ok(random_micro_batch(
                (self.micro_batch, self.seq),
                self.model.vocab_size,
                self.seed * 100_000 + (step * 1000 + index) as u64 * 10,
                SequenceKeys::consecutive(
                    self.seed,
                    step as u64,
                    (index * self.micro_batch) as u64,
                    self.micro_batch,
                ),
            )),
            TrainingData::Samples(source) => Ok(step_micro_batch(
                source.as_ref(),
                self.seed,
                step as u64,
                index,
                &BatchShape {
                    micro_batch: self.micro_batch,
                    global_batch: self.global_batch,
                    seq: self.seq,
                    vocab: self.model.vocab_size,
                },
            )?),
        }
    }

    fn micro_batches(&self) -> usize {
        self.global_batch / self.micro_batch
    }
}

/// The single-rank run a layout is compared with.
#[derive(Clone, Debug)]
pub struct Reference {
    /// Each step's loss.
    pub losses: Vec<f32>,
    /// Each step's gradient norm before clipping.
    pub grad_norms: Vec<f32>,
    /// Each step's tokens per expert, MoE layer after MoE layer, steps one after the other.
    loads: Vec<u64>,
    /// The reduced gradients of the first step.
    first_grads: Buffers,
    /// The parameters after the last step.
    params: Buffers,
    /// How far each final parameter may legitimately be off: see [`Reference::allowance`].
    allowance: Buffers,
}

impl Reference {
    /// Trains `case` on one rank, for a layout of `world` ranks (which decides how the
    /// micro-batches are grouped, see [`TrainingCase::reference_merges`]).
    pub fn compute(case: &TrainingCase, world: usize) -> HarnessResult<Self> {
        let merges = case.reference_merges(world);
        let total = case.micro_batches();
        if !total.is_multiple_of(merges) {
            return Err(format!(
                "{total} micro-batches do not split over {merges} data-parallel ranks"
            )
            .into());
        }
        let per_replica = total / merges;
        let full = GptModel::new(case.model.clone())?;
        let mut params = full.init_params(case.seed);
        let mut copies = WeightCopies::new(case.compute, &params);
        let mut grads = full.registry().zeros();
        let mut optimizer = ParallelOptimizer::new(
            full.registry(),
            case.adamw,
            OptimizerGroups::single(),
            false,
            case.bucket_elements,
        );
        let schedule = stage_schedule(&full, per_replica, None)?;
        let mut reference = Reference {
            losses: Vec::new(),
            grad_norms: Vec::new(),
            loads: Vec::new(),
            first_grads: full.registry().zeros(),
            params: full.registry().zeros(),
            allowance: full.registry().zeros(),
        };
        let mut allowance = AdamWAllowance::new(full.registry().params().len(), case);
        for step in 0..case.steps {
            let batches = (0..per_replica)
                .map(|j| {
                    let parts = (0..merges)
                        .map(|d| case.micro_batch(step, d * per_replica + j))
                        .collect::<HarnessResult<Vec<_>>>()?;
                    Ok(merged(parts))
                })
                .collect::<HarnessResult<Vec<_>>>()?;
            let outcome = train_step(
                &full,
                &mut params,
                &mut copies,
                &mut grads,
                &mut optimizer,
                &batches,
                &schedule,
                per_replica,
                &StepGroups::single(),
                case.lr.at(step as u64),
            )?;
            reference.record(&outcome);
            if step == 0 {
                reference.first_grads = grads.clone();
            }
            let (m, v) = optimizer.moments()?;
            allowance.add_step(
                full.registry(),
                (&grads, &m, &v),
                case.lr.at(step as u64),
                &mut reference.allowance,
            );
        }
        reference.params = params;
        Ok(reference)
    }

    /// The allowance of every final parameter element: after K steps of AdamW, the most its
    /// value can move when every step's gradient elements move by up to `tolerance` times the
    /// largest of their tensor. Step k's update `u = m̂ / (√v̂ + eps)` of an element then moves
    /// by at most `2·D·(1 + |u|) / (√v̂ + eps)` while `D ≤ (√v̂ + eps) / 2` (`m̂` and `√v̂` both
    /// move by at most `D`, their bias-corrected weights summing to 1), and never by more than
    /// `2·B_k`, twice the largest `|u|` any gradients give after k steps; times the step's
    /// learning rate, summed over the steps. Zero for buffers the optimizer does not update.
    pub fn allowance(&self) -> &Buffers {
        &self.allowance
    }

    /// The reference on every rank of `world`: rank 0 trains it, then sends it to the others.
    pub fn on_root(world: &Arc<dyn Communicator>, case: &TrainingCase) -> HarnessResult<Self> {
        if world.size() == 1 {
            return Self::compute(case, 1);
        }
        let mut reference = if world.rank() == 0 {
            Self::compute(case, world.size())?
        } else {
            let full = GptModel::new(case.model.clone())?;
            Reference {
                losses: vec![0.0; case.steps],
                grad_norms: vec![0.0; case.steps],
                loads: vec![0; case.steps * full.moe_layer_count() * case.model.moe.num_experts],
                first_grads: full.registry().zeros(),
                params: full.registry().zeros(),
                allowance: full.registry().zeros(),
            }
        };
        world.broadcast(&mut reference.losses, 0)?;
        world.broadcast(&mut reference.grad_norms, 0)?;
        if world.rank() != 0 {
            reference.loads.fill(0);
        }
        world.all_reduce_u64(&mut reference.loads, ReduceOp::Sum)?;
        for buffers in [
            &mut reference.first_grads,
            &mut reference.params,
            &mut reference.allowance,
        ] {
            for buffer in buffers.buffers_mut() {
                world.broadcast(buffer, 0)?;
            }
        }
        Ok(reference)
    }

    fn record(&mut self, outcome: &StepOutcome) {
        self.losses.push(outcome.loss as f32);
        self.grad_norms.push(outcome.grad_norm as f32);
        self.loads.extend(
            outcome
                .tokens_per_expert
                .iter()
                .flatten()
                .map(|&n| n as u64),
        );
    }
}

/// The micro-batches `parts` as one (their sequences one after the other).
fn merged(mut parts: Vec<MicroBatch>) -> MicroBatch {
    if parts.len() == 1 {
        return parts.remove(0);
    }
    MicroBatch {
        tokens: parts
            .iter()
            .flat_map(|b| b.tokens.iter().copied())
            .collect(),
        targets: parts
            .iter()
            .flat_map(|b| b.targets.iter().copied())
            .collect(),
        batch: parts.iter().map(|b| b.batch).sum(),
        seq: parts[0].seq,
        keys: SequenceKeys {
            sequences: parts
                .iter()
                .flat_map(|b| b.keys.sequences.iter().copied())
                .collect(),
            ..parts[0].keys.clone()
        },
    }
}

/// One step of a layout's run beside the reference's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepComparison {
    /// The layout's loss.
    pub loss: f32,
    /// The reference's loss.
    pub reference_loss: f32,
    /// The layout's gradient norm before clipping.
    pub grad_norm: f32,
    /// The reference's gradient norm.
    pub reference_grad_norm: f32,
}

impl StepComparison {
    /// `|loss − reference| / |reference|`.
    pub fn loss_error(&self) -> f64 {
        relative_error(&[self.loss], &[self.reference_loss])
    }

    /// `|grad_norm − reference| / |reference|`.
    pub fn grad_norm_error(&self) -> f64 {
        relative_error(&[self.grad_norm], &[self.reference_grad_norm])
    }
}

/// A layout's run against the reference, the same on every rank: each error is the largest
/// over the ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingComparison {
    /// Every step.
    pub steps: Vec<StepComparison>,
    /// The expert loads' largest difference relative to the largest reference count.
    pub loads: f64,
    /// For each step whose expert loads differ, (step, MoE layer) of the first difference.
    pub load_mismatches: Vec<(usize, usize)>,
    /// Each parameter's first-step gradient error, in the model's order (empty with the
    /// distributed optimizer, which keeps only its part of the reduced gradients).
    pub grads: Vec<(String, f64)>,
    /// Each parameter's final error, in the model's order.
    pub params: Vec<ParamError>,
}

/// How far one final parameter is from the reference's.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamError {
    /// The parameter.
    pub name: String,
    /// `max |w − w_ref| / max |w_ref|` (the largest over the ranks' parts).
    pub error: f64,
    /// `max (|w − w_ref| − allowance)⁺ / max |w_ref|`: the error AdamW's amplification of
    /// gradient rounding does not explain ([`Reference::allowance`]).
    pub beyond_allowance: f64,
}

impl TrainingComparison {
    /// The largest errors of each kind.
    pub fn discrepancy(&self) -> TrainingDiscrepancy {
        let worst = |errors: &[(String, f64)]| {
            errors
                .iter()
                .fold((0.0, String::new()), |worst, (name, e)| {
                    if *e > worst.0 {
                        (*e, name.clone())
                    } else {
                        worst
                    }
                })
        };
        let (grads, grads_worst) = worst(&self.grads);
        let judged: Vec<(String, f64)> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.beyond_allowance))
            .collect();
        let (params, params_worst) = worst(&judged);
        TrainingDiscrepancy {
            losses: self
                .steps
                .iter()
                .map(|s| s.loss_error().max(s.grad_norm_error()))
                .fold(0.0, f64::max),
            loads: self.loads,
            grads,
            params,
            worst_param: if grads > params {
                grads_worst
            } else {
                params_worst
            },
        }
    }

    /// The `count` parameters with the largest final errors, largest first (ties: the larger
    /// error beyond the allowance).
    pub fn worst_params(&self, count: usize) -> Vec<ParamError> {
        let mut errors = self.params.clone();
        errors.sort_by(|a, b| {
            b.error
                .total_cmp(&a.error)
                .then(b.beyond_allowance.total_cmp(&a.beyond_allowance))
        });
        errors.truncate(count);
        errors
    }

    /// The parameters whose first-step gradient error or final error beyond the allowance
    /// exceeds `tolerance`, with the larger of the two, largest first.
    pub fn failing_params(&self, tolerance: f64) -> Vec<(String, f64)> {
        let grads: HashMap<&str, f64> = self.grads.iter().map(|(n, e)| (n.as_str(), *e)).collect();
        let mut failing: Vec<(String, f64)> = self
            .params
            .iter()
            .map(|p| {
                let grad = grads.get(p.name.as_str()).copied().unwrap_or(0.0);
                (p.name.clone(), p.beyond_allowance.max(grad))
            })
            .filter(|(_, e)| *e > tolerance)
            .collect();
        failing.sort_by(|a, b| b.1.total_cmp(&a.1));
        failing
    }
}

/// Runs `case` on this rank of `world` and compares it with `reference` (computed by
/// [`Reference::compute`] or [`Reference::on_root`] for this world).
pub fn compare(
    world: &Arc<dyn Communicator>,
    case: &TrainingCase,
    reference: &Reference,
) -> HarnessResult<TrainingComparison> {
    let total = case.micro_batches();
    let full = GptModel::new(case.model.clone())?;
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
    let mut params = match case.fault {
        Some(Fault::SeedOnRank { rank, seed }) if rank == world.rank() => model.init_params(seed),
        _ => model.init_params(case.seed),
    };
    let mut copies = WeightCopies::new(case.compute, &params);
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
    let mut steps = Vec::with_capacity(case.steps);
    let mut loads = Vec::new();
    for step in 0..case.steps {
        let batches = (0..per_rank)
            .map(|j| case.micro_batch(step, dp.rank() * per_rank + j))
            .collect::<HarnessResult<Vec<_>>>()?;
        let outcome = train_step(
            &model,
            &mut params,
            &mut copies,
            &mut grads,
            &mut optimizer,
            &batches,
            &schedule,
            total,
            &groups,
            case.lr.at(step as u64),
        )?;
        steps.push(StepComparison {
            loss: outcome.loss as f32,
            reference_loss: reference.losses[step],
            grad_norm: outcome.grad_norm as f32,
            reference_grad_norm: reference.grad_norms[step],
        });
        loads.extend(
            outcome
                .tokens_per_expert
                .iter()
                .flatten()
                .map(|&n| n as u64),
        );
        first_grads.get_or_insert_with(|| grads.clone());
    }
    let (loads_error, load_mismatches) =
        compare_loads(&loads, &reference.loads, case.steps, full.moe_layer_count());
    let params = per_parameter_errors(
        world,
        (model.registry(), &params),
        &full,
        (&reference.params, Some(&reference.allowance)),
    )?;
    let grads = match first_grads {
        Some(grads) if !case.distributed_optimizer => per_parameter_errors(
            world,
            (model.registry(), &grads),
            &full,
            (&reference.first_grads, None),
        )?
        .into_iter()
        .map(|p| (p.name, p.error))
        .collect(),
        _ => Vec::new(),
    };
    Ok(TrainingComparison {
        steps,
        loads: loads_error,
        load_mismatches,
        grads,
        params,
    })
}

/// The loads' largest difference relative to the largest reference count, and for each step
/// whose loads differ, the first MoE layer that does (`steps` steps of `layers` layers each).
fn compare_loads(
    loads: &[u64],
    reference: &[u64],
    steps: usize,
    layers: usize,
) -> (f64, Vec<(usize, usize)>) {
    if loads.len() != reference.len() {
        return (f64::INFINITY, vec![(0, 0)]);
    }
    let scale = reference.iter().copied().max().unwrap_or(0).max(1) as f64;
    let diff = loads
        .iter()
        .zip(reference)
        .map(|(&a, &b)| a.abs_diff(b))
        .max()
        .unwrap_or(0);
    let per_step = loads.len() / steps.max(1);
    let per_layer = per_step / layers.max(1);
    let mismatches = (0..steps)
        .filter_map(|step| {
            (0..layers)
                .find(|&layer| {
                    let at = step * per_step + layer * per_layer;
                    loads[at..at + per_layer] != reference[at..at + per_layer]
                })
                .map(|layer| (step, layer))
        })
        .collect();
    (diff as f64 / scale, mismatches)
}

/// Each parameter of the whole model with the largest, over the ranks holding a part of it, of
/// that part's error against its slice of `reference` (on every rank of `world`), and of its
/// error beyond `allowance` (the same as the error without one).
fn per_parameter_errors(
    world: &Arc<dyn Communicator>,
    (registry, values): (&ParamRegistry, &Buffers),
    full: &GptModel,
    (reference, allowance): (&Buffers, Option<&Buffers>),
) -> HarnessResult<Vec<ParamError>> {
    let names = full.registry().params();
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let expected = registry.shard_of(full.registry(), reference);
    let allowed = allowance.map(|a| registry.shard_of(full.registry(), a));
    // Each parameter's error, then its error beyond the allowance.
    let mut errors = vec![0.0f32; 2 * names.len()];
    for p in registry.params() {
        let (actual, expected) = (values.get(p.id), expected.get(p.id));
        let error = relative_error(actual, expected);
        let beyond = match &allowed {
            None => error,
            Some(allowed) => {
                let scale = expected
                    .iter()
                    .fold(0.0f64, |m, &b| m.max((b as f64).abs()));
                let excess = actual
                    .iter()
                    .zip(allowed.get(p.id))
                    .zip(expected)
                    .map(|((&a, &slack), &b)| (a as f64 - b as f64).abs() - slack as f64)
                    .fold(0.0f64, f64::max);
                if excess == 0.0 {
                    0.0
                } else {
                    excess / scale.max(f64::MIN_POSITIVE)
                }
            }
        };
        let at = index[p.name.as_str()];
        errors[2 * at] = errors[2 * at].max(error as f32);
        errors[2 * at + 1] = errors[2 * at + 1].max(beyond as f32);
    }
    world.all_reduce(&mut errors, ReduceOp::Max)?;
    Ok(names
        .iter()
        .zip(errors.chunks(2))
        .map(|(p, e)| ParamError {
            name: p.name.clone(),
            error: e[0] as f64,
            beyond_allowance: e[1] as f64,
        })
        .collect())
}

/// Runs `case` on this rank of `world` and on one rank (on rank 0, sent to the others), and
/// returns the largest discrepancies.
pub fn training(
    world: &Arc<dyn Communicator>,
    case: &TrainingCase,
) -> HarnessResult<TrainingDiscrepancy> {
    let reference = Reference::on_root(world, case)?;
    Ok(compare(world, case, &reference)?.discrepancy())
}
