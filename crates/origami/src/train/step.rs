//! One optimizer step on one rank: the pipeline schedule over this rank's micro-batches
//! (forward and backward of each; without a pipeline simply one after the other), the tied
//! embedding's gradients summed over the embedding group, the optimizer (which reduces
//! gradients over the data-parallel ranks of each stage), then the aux-loss-free expert-bias
//! update. The trainer and the equivalence harness both step through here, so the harness
//! checks the code that trains.
//!
//! Loss scaling: every micro-batch's loss enters with `1 / micro-batches in the global batch`
//! (over all data-parallel ranks), so the sum of the ranks' gradients — what the optimizer's
//! reduction computes — is the gradient of the global batch's mean loss. Each stage scales its
//! own MoE layers' auxiliary losses the same way; the cross-entropy lives on the last stage.
//! The reported losses and expert loads are summed over every rank, so every rank reports the
//! whole model's.

use std::sync::Arc;
use std::time::Duration;

use origami_comm::{Communicator, ReduceOp, SoloComm};
use origami_parallel::ParallelState;
use origami_schedule::Schedule;

use super::pipeline::run_schedule;
use crate::compute::WeightCopies;
use crate::model::gpt::{GptModel, MicroBatch};
use crate::optim::parallel::ParallelOptimizer;
use crate::params::Buffers;
use crate::profile::{timed, Phase};

/// The groups a step communicates over besides the model's own.
#[derive(Clone)]
pub struct StepGroups {
    /// Every rank: the step's losses are summed over it.
    pub world: Arc<dyn Communicator>,
    /// This rank's pipeline: activations and gradients travel over it, expert loads are
    /// gathered over it.
    pub pipeline: Arc<dyn Communicator>,
}

impl StepGroups {
    /// One rank.
    pub fn single() -> Self {
        StepGroups {
            world: SoloComm::shared(0),
            pipeline: SoloComm::shared(0),
        }
    }

    /// The groups of `state`'s rank in `world`.
    pub fn from_state(state: &ParallelState, world: Arc<dyn Communicator>) -> Self {
        StepGroups {
            world,
            pipeline: state.pp().comm().clone(),
        }
    }
}

/// What one step did, identical on every rank (but the pipeline figures, which are this
/// rank's).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutcome {
    /// Mean over the global batch's micro-batches of `CE + aux + z`.
    pub loss: f64,
    /// Mean cross-entropy.
    pub cross_entropy: f64,
    /// Mean load-balancing loss (summed over layers).
    pub aux_loss: f64,
    /// Mean z-loss (summed over layers).
    pub z_loss: f64,
    /// Tokens routed to each expert of each MoE layer over the global batch.
    pub tokens_per_expert: Vec<Vec<usize>>,
    /// Routed slots dropped for capacity over the global batch.
    pub dropped: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// This rank's largest total of activations saved for backward at once (bytes).
    pub peak_stored_bytes: usize,
    /// This rank's largest saved state of one micro-batch on one chunk (bytes).
    pub largest_saved_bytes: usize,
    /// This rank's most micro-batch chunks held at once, awaiting their backward.
    pub peak_in_flight: usize,
    /// This rank's time in forwards and backwards.
    pub compute: Duration,
    /// This rank's time in pipeline exchanges (waiting for its neighbours included).
    pub exchange: Duration,
}

/// Runs one step: `batches` are this rank's micro-batches of the global batch (those of its
/// pipeline), run in `schedule`'s order; the global batch holds `micro_batches` of them over
/// every pipeline. The layers compute in the precision of `copies`, made from `params`; after
/// the update (and the expert-bias change) they are made again from the new parameters.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &GptModel,
    params: &mut Buffers,
    copies: &mut WeightCopies,
    grads: &mut Buffers,
    optimizer: &mut ParallelOptimizer,
    batches: &[MicroBatch],
    schedule: &Schedule,
    micro_batches: usize,
    groups: &StepGroups,
    lr: f32,
) -> origami_comm::Result<StepOutcome> {
    timed(Phase::Optimizer, || grads.fill_zero());
    model.begin_global_batch();
    let scale = 1.0 / micro_batches as f32;
    let run = run_schedule(
        model,
        &copies.weights(params),
        grads,
        schedule,
        batches,
        scale,
        &groups.pipeline,
    )?;
    model.finish_tied_gradients(grads)?;
    let mut sums = run.loss_parts;
    if groups.world.size() > 1 {
        let mut parts = sums.map(|s| s as f32);
        timed(Phase::CommOther, || {
            groups.world.all_reduce(&mut parts, ReduceOp::Sum)
        })?;
        sums = parts.map(f64::from);
    }
    let [cross_entropy, aux_loss, z_loss] = sums.map(|s| s / micro_batches as f64);
    let (tokens_per_expert, dropped) = timed(Phase::CommOther, || {
        whole_model_loads(model, &run.moe, &groups.pipeline)
    })?;
    let grad_norm = timed(Phase::Optimizer, || {
        optimizer.step(model.registry(), params, grads, lr)
    })?;
    model.update_expert_bias(params, &tokens_per_expert);
    copies.refresh(params);
    Ok(StepOutcome {
        loss: cross_entropy + aux_loss + z_loss,
        cross_entropy,
        aux_loss,
        z_loss,
        tokens_per_expert,
        dropped,
        grad_norm,
        peak_stored_bytes: run.peak_stored_bytes,
        largest_saved_bytes: run.largest_saved_bytes,
        peak_in_flight: run.peak_in_flight,
        compute: run.compute,
        exchange: run.exchange,
    })
}

/// Tokens per expert of every MoE layer of the model and the dropped slots, from this rank's
/// layers' statistics (already summed over its stage's batch) summed over the pipeline.
fn whole_model_loads(
    model: &GptModel,
    own: &[crate::layers::moe::MoeStats],
    pipeline: &Arc<dyn Communicator>,
) -> origami_comm::Result<(Vec<Vec<usize>>, usize)> {
    let layers = model.moe_layer_count();
    let experts = model.config().moe.num_experts;
    let mut counts = vec![0u64; layers * experts + 1];
    for (stats, number) in own.iter().zip(model.moe_layer_numbers()) {
        for (count, &tokens) in counts[number * experts..]
            .iter_mut()
            .zip(&stats.tokens_per_expert)
        {
            *count = tokens as u64;
        }
        counts[layers * experts] += stats.dropped as u64;
    }
    if pipeline.size() > 1 {
        pipeline.all_reduce_u64(&mut counts, ReduceOp::Sum)?;
    }
    let dropped = counts[layers * experts] as usize;
    let loads = (0..layers)
        .map(|l| {
            counts[l * experts..(l + 1) * experts]
                .iter()
                .map(|&c| c as usize)
                .collect()
        })
        .collect();
    Ok((loads, dropped))
}
