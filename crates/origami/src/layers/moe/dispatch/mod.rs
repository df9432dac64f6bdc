//! Token dispatch around the routed experts: from routed tokens to each expert's rows on the
//! rank that owns it, through the experts, and back as weighted sums per token — with the
//! explicit backward of each step. On one rank (ep = etp = 1) both dispatchers reduce to the
//! local permutation.

pub mod allgather;
pub mod alltoall;

use crate::layers::stored::Stored;
use std::time::{Duration, Instant};

use super::experts::{ExpertsSaved, GroupedExperts};
use super::parallel::MoeParallel;
use super::permute::{
    permute, permute_backward, unpermute, unpermute_backward, Permutation, DROPPED,
};
use super::router::Routing;
use crate::compute::{round_to_bf16, Activation, Weights};
use crate::layers::moe::config::DispatcherKind;
use crate::params::Buffers;
use allgather::AllGatherPlan;
use alltoall::AllToAllPlan;

/// The routed tokens of one micro-batch and how they were dispatched.
pub struct RouteInput<'a> {
    /// Normalised input `[tokens, hidden]`.
    pub x: &'a [f32],
    /// Chosen experts and weights.
    pub routing: &'a Routing,
    /// Expert-grouped rows of this rank's slots over all experts (dropping applied).
    pub permutation: &'a Permutation,
    /// Rows per expert when every expert is padded to its capacity.
    pub fixed_rows: Option<usize>,
}

/// Where one pass of the routed part spent its time: moving tokens (plans, permutations,
/// collectives, sorts) against computing the experts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    /// Dispatch and combine, including the local permutations.
    pub dispatch: Duration,
    /// Grouped expert computation.
    pub experts: Duration,
}

impl std::ops::AddAssign for PhaseTimes {
    fn add_assign(&mut self, other: Self) {
        self.dispatch += other.dispatch;
        self.experts += other.experts;
    }
}

/// Runs `work`, adding its duration to `total`.
fn timed<T>(total: &mut Duration, work: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let value = work();
    *total += started.elapsed();
    value
}

/// What the dispatch keeps for the backward.
pub enum RouteSaved {
    /// All-to-all: the plan, what the experts keep (the rows they saw among it), and the rows
    /// they produced as they came back (for the routing-weight gradient).
    AllToAll {
        plan: AllToAllPlan,
        returned: Vec<f32>,
        experts: ExpertsSaved,
    },
    /// All-gather: the gathered plan, what the experts keep and the rows they produced.
    AllGather {
        plan: Box<AllGatherPlan>,
        expert_output: Vec<f32>,
        experts: ExpertsSaved,
    },
}

/// The routed part of the MoE output, `[tokens, hidden]`, and where the time went.
pub fn forward(
    kind: DispatcherKind,
    parallel: &MoeParallel,
    experts: &GroupedExperts,
    params: &Weights,
    input: RouteInput,
) -> (Vec<f32>, RouteSaved, PhaseTimes) {
    let hidden = experts.hidden();
    let tokens = input.x.len() / hidden;
    let mut times = PhaseTimes::default();
    let perm = input.permutation;
    match kind {
        DispatcherKind::Alltoall => {
            let (plan, expert_input) = timed(&mut times.dispatch, || {
                let rows_per_expert: Vec<usize> =
                    perm.offsets.windows(2).map(|w| w[1] - w[0]).collect();
                let plan = AllToAllPlan::new(
                    parallel,
                    rows_per_expert.len(),
                    &rows_per_expert,
                    input.fixed_rows,
                    hidden,
                );
                let rows = if params.compute().is_bf16() {
                    let rounded = permute(&round_to_bf16(input.x), perm, hidden);
                    Activation::Bf16(plan.to_experts_bf16(parallel, rounded))
                } else {
                    Activation::F32(plan.to_experts(parallel, permute(input.x, perm, hidden)))
                };
                (plan, rows)
            });
            let (expert_output, saved) = timed(&mut times.experts, || {
                experts.forward(params, expert_input, &plan.expert_offsets)
            });
            let (y, returned) = timed(&mut times.dispatch, || {
                let returned = plan.from_experts(parallel, expert_output);
                let y = unpermute(&returned, &input.routing.weights, perm, hidden, tokens);
                (y, returned)
            });
            let saved = RouteSaved::AllToAll {
                plan,
                returned,
                experts: saved,
            };
            (y, saved, times)
        }
        DispatcherKind::Allgather => {
            let (plan, expert_input) = timed(&mut times.dispatch, || {
                let kept: Vec<bool> = perm.row_of_slot.iter().map(|&r| r != DROPPED).collect();
                let experts_total = perm.offsets.len() - 1;
                let plan =
                    AllGatherPlan::new(parallel, input.routing, &kept, experts_total, hidden);
                let rows = if params.compute().is_bf16() {
                    let gathered = plan.gather_bf16(parallel, input.x);
                    Activation::Bf16(permute(&gathered, &plan.permutation, hidden))
                } else {
                    let gathered = plan.gather(parallel, input.x);
                    Activation::F32(permute(&gathered, &plan.permutation, hidden))
                };
                (plan, rows)
            });
            let (expert_output, saved) = timed(&mut times.experts, || {
                experts.forward(params, expert_input, &plan.permutation.offsets)
            });
            let y = timed(&mut times.dispatch, || {
                let partial = unpermute(
                    &expert_output,
                    &plan.weights,
                    &plan.permutation,
                    hidden,
                    plan.gathered_tokens(),
                );
                plan.reduce_scatter(parallel, &partial)
            });
            let saved = RouteSaved::AllGather {
                plan: Box::new(plan),
                expert_output,
                experts: saved,
            };
            (y, saved, times)
        }
    }
}

/// Backward of [`forward`]: accumulates the expert weight gradients; returns `dx` of the
/// routed part, the routing-weight gradients `[tokens, k]`, and where the time went.
pub fn backward(
    parallel: &MoeParallel,
    experts: &GroupedExperts,
    params: &Weights,
    grads: &mut Buffers,
    saved: RouteSaved,
    input: RouteInput,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, PhaseTimes) {
    let hidden = experts.hidden();
    let mut times = PhaseTimes::default();
    let perm = input.permutation;
    match saved {
        RouteSaved::AllToAll {
            plan,
            returned,
            experts: experts_saved,
        } => {
            let (d_output, d_weights) = timed(&mut times.dispatch, || {
                let (d_returned, d_weights) =
                    unpermute_backward(dy, &returned, &input.routing.weights, perm, hidden);
                (plan.to_experts(parallel, d_returned), d_weights)
            });
            let d_expert_input = timed(&mut times.experts, || {
                experts.backward(
                    params,
                    grads,
                    experts_saved,
                    &d_output,
                    &plan.expert_offsets,
                )
            });
            let dx = timed(&mut times.dispatch, || {
                let d_rows = plan.from_experts(parallel, d_expert_input);
                let mut dx = vec![0.0; input.x.len()];
                permute_backward(&mut dx, &d_rows, perm, hidden);
                dx
            });
            (dx, d_weights, times)
        }
        RouteSaved::AllGather {
            plan,
            expert_output,
            experts: experts_saved,
        } => {
            let (d_output, d_weights_all) = timed(&mut times.dispatch, || {
                let d_gathered = plan.gather(parallel, dy);
                unpermute_backward(
                    &d_gathered,
                    &expert_output,
                    &plan.weights,
                    &plan.permutation,
                    hidden,
                )
            });
            let d_expert_input = timed(&mut times.experts, || {
                experts.backward(
                    params,
                    grads,
                    experts_saved,
                    &d_output,
                    &plan.permutation.offsets,
                )
            });
            let (dx, d_weights) = timed(&mut times.dispatch, || {
                let mut dx_all = vec![0.0; plan.gathered_tokens() * hidden];
                permute_backward(&mut dx_all, &d_expert_input, &plan.permutation, hidden);
                (
                    plan.reduce_scatter(parallel, &dx_all),
                    plan.reduce_scatter_weights(parallel, &d_weights_all),
                )
            });
            (dx, d_weights, times)
        }
    }
}

impl Stored for RouteSaved {
    fn stored_bytes(&self) -> usize {
        match self {
            RouteSaved::AllToAll {
                plan,
                returned,
                experts,
            } => plan.stored_bytes() + returned.stored_bytes() + experts.stored_bytes(),
            RouteSaved::AllGather {
                plan,
                expert_output,
                experts,
            } => plan.stored_bytes() + expert_output.stored_bytes() + experts.stored_bytes(),
        }
    }
}
