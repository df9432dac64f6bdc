//! One optimizer step on one rank: forward and backward of this rank's micro-batches, then the
//! optimizer (which reduces gradients over the data-parallel ranks), then the aux-loss-free
//! expert-bias update. The trainer and the equivalence harness both step through here, so the
//! harness checks the code that trains.
//!
//! Loss scaling: every micro-batch's loss enters with `1 / micro-batches in the global batch`
//! (over all data-parallel ranks), so the sum of the ranks' gradients — what the optimizer's
//! reduction computes — is the gradient of the global batch's mean loss.

use std::sync::Arc;

use origami_comm::{Communicator, ReduceOp};

use super::metrics::accumulate_expert_counts;
use crate::model::gpt::{GptModel, MicroBatch};
use crate::optim::parallel::ParallelOptimizer;
use crate::params::Buffers;

/// What one step did, identical on every rank.
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
}

/// Runs one step: `batches` are this rank's micro-batches of the global batch, which holds
/// `micro_batches` of them over the `data_parallel` ranks (each rank the same number).
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &GptModel,
    params: &mut Buffers,
    grads: &mut Buffers,
    optimizer: &mut ParallelOptimizer,
    batches: &[MicroBatch],
    micro_batches: usize,
    data_parallel: &Arc<dyn Communicator>,
    lr: f32,
) -> origami_comm::Result<StepOutcome> {
    grads.fill_zero();
    model.begin_global_batch();
    let scale = 1.0 / micro_batches as f32;
    let mut sums = [0.0f64; 4];
    let mut outcome = StepOutcome::default();
    for batch in batches {
        let report = model.forward_backward(params, grads, batch, scale);
        for (sum, value) in sums.iter_mut().zip([
            report.total(),
            report.cross_entropy,
            report.load_balancing,
            report.z,
        ]) {
            *sum += value;
        }
        accumulate_expert_counts(&mut outcome.tokens_per_expert, &report.moe);
        outcome.dropped += report.moe.iter().map(|s| s.dropped).sum::<usize>();
    }
    if data_parallel.size() > 1 {
        let mut parts = sums.map(|s| s as f32);
        data_parallel.all_reduce(&mut parts, ReduceOp::Sum)?;
        sums = parts.map(f64::from);
    }
    let [loss, cross_entropy, aux_loss, z_loss] = sums.map(|s| s / micro_batches as f64);
    outcome.loss = loss;
    outcome.cross_entropy = cross_entropy;
    outcome.aux_loss = aux_loss;
    outcome.z_loss = z_loss;
    outcome.grad_norm = optimizer.step(model.registry(), params, grads, lr)?;
    model.update_expert_bias(params, &outcome.tokens_per_expert);
    Ok(outcome)
}
