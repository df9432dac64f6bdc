//! Token dispatch around the routed experts: from routed tokens to each expert's rows on the
//! rank that owns it, through the experts, and back as weighted sums per token — with the
//! explicit backward of each step. On one rank (ep = etp = 1) both dispatchers reduce to the
//! local permutation.

pub mod allgather;
pub mod alltoall;

use super::experts::{ExpertsSaved, GroupedExperts};
use super::parallel::MoeParallel;
use super::permute::{permute, permute_backward, unpermute, unpermute_backward, Permutation};
use super::router::Routing;
use crate::model::config::DispatcherKind;
use crate::model::params::Buffers;
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

/// What the dispatch keeps for the backward.
pub enum RouteSaved {
    /// All-to-all: the plan, the rows the experts saw and produced, and the produced rows as
    /// they came back (for the routing-weight gradient).
    AllToAll {
        plan: AllToAllPlan,
        expert_input: Vec<f32>,
        returned: Vec<f32>,
        experts: ExpertsSaved,
    },
    /// All-gather: the gathered plan and the rows the experts saw and produced.
    AllGather {
        plan: Box<AllGatherPlan>,
        expert_input: Vec<f32>,
        expert_output: Vec<f32>,
        experts: ExpertsSaved,
    },
}

impl RouteSaved {
    /// Rows the local experts computed (the expert-side work of this micro-batch).
    pub fn expert_rows(&self) -> usize {
        match self {
            RouteSaved::AllToAll { plan, .. } => plan.expert_rows(),
            RouteSaved::AllGather { plan, .. } => plan.permutation.token_of_row.len(),
        }
    }
}

/// The routed part of the MoE output, `[tokens, hidden]`.
pub fn forward(
    kind: DispatcherKind,
    parallel: &MoeParallel,
    experts: &GroupedExperts,
    params: &Buffers,
    input: RouteInput,
) -> (Vec<f32>, RouteSaved) {
    let hidden = experts.hidden();
    let tokens = input.x.len() / hidden;
    match kind {
        DispatcherKind::Alltoall => {
            let perm = input.permutation;
            let rows_per_expert: Vec<usize> =
                perm.offsets.windows(2).map(|w| w[1] - w[0]).collect();
            let plan = AllToAllPlan::new(
                parallel,
                rows_per_expert.len(),
                &rows_per_expert,
                input.fixed_rows,
                hidden,
            );
            let rows = permute(input.x, perm, hidden);
            let expert_input = plan.to_experts(parallel, &rows);
            drop(rows);
            let (expert_output, saved) =
                experts.forward(params, &expert_input, &plan.expert_offsets);
            let returned = plan.from_experts(parallel, &expert_output);
            let y = unpermute(&returned, &input.routing.weights, perm, hidden, tokens);
            let saved = RouteSaved::AllToAll {
                plan,
                expert_input,
                returned,
                experts: saved,
            };
            (y, saved)
        }
        DispatcherKind::Allgather => {
            let kept: Vec<bool> = input
                .permutation
                .row_of_slot
                .iter()
                .map(|&r| r != super::permute::DROPPED)
                .collect();
            let experts_total = input.permutation.offsets.len() - 1;
            let plan = AllGatherPlan::new(parallel, input.routing, &kept, experts_total, hidden);
            let gathered = plan.gather(parallel, input.x);
            let expert_input = permute(&gathered, &plan.permutation, hidden);
            drop(gathered);
            let (expert_output, saved) =
                experts.forward(params, &expert_input, &plan.permutation.offsets);
            let partial = unpermute(
                &expert_output,
                &plan.weights,
                &plan.permutation,
                hidden,
                plan.gathered_tokens(),
            );
            let y = plan.reduce_scatter(parallel, &partial);
            let saved = RouteSaved::AllGather {
                plan: Box::new(plan),
                expert_input,
                expert_output,
                experts: saved,
            };
            (y, saved)
        }
    }
}

/// Backward of [`forward`]: accumulates the expert weight gradients; returns `dx` of the
/// routed part and the routing-weight gradients `[tokens, k]`.
pub fn backward(
    parallel: &MoeParallel,
    experts: &GroupedExperts,
    params: &Buffers,
    grads: &mut Buffers,
    saved: RouteSaved,
    input: RouteInput,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let hidden = experts.hidden();
    match saved {
        RouteSaved::AllToAll {
            plan,
            expert_input,
            returned,
            experts: experts_saved,
        } => {
            let perm = input.permutation;
            let (d_returned, d_weights) =
                unpermute_backward(dy, &returned, &input.routing.weights, perm, hidden);
            drop(returned);
            let d_output = plan.to_experts(parallel, &d_returned);
            let d_expert_input = experts.backward(
                params,
                grads,
                experts_saved,
                &expert_input,
                &d_output,
                &plan.expert_offsets,
            );
            let d_rows = plan.from_experts(parallel, &d_expert_input);
            let mut dx = vec![0.0; input.x.len()];
            permute_backward(&mut dx, &d_rows, perm, hidden);
            (dx, d_weights)
        }
        RouteSaved::AllGather {
            plan,
            expert_input,
            expert_output,
            experts: experts_saved,
        } => {
            let d_gathered = plan.gather(parallel, dy);
            let (d_output, d_weights_all) = unpermute_backward(
                &d_gathered,
                &expert_output,
                &plan.weights,
                &plan.permutation,
                hidden,
            );
            drop(d_gathered);
            let d_expert_input = experts.backward(
                params,
                grads,
                experts_saved,
                &expert_input,
                &d_output,
                &plan.permutation.offsets,
            );
            let mut dx_all = vec![0.0; plan.gathered_tokens() * hidden];
            permute_backward(&mut dx_all, &d_expert_input, &plan.permutation, hidden);
            let dx = plan.reduce_scatter(parallel, &dx_all);
            let d_weights = plan.reduce_scatter_weights(parallel, &d_weights_all);
            (dx, d_weights)
        }
    }
}
