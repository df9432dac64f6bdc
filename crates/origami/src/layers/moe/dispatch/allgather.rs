//! The all-gather token dispatcher (DESIGN.md §1): every rank of the tp-ep group gathers all
//! the group's tokens with their routing, computes its own experts (its slice of them with
//! etp > 1) on the tokens routed there, adds the weighted rows into an output for every
//! gathered token, and a reduce-scatter-v returns to each rank the sum over all experts and
//! slices for its own tokens. Moves more bytes than all-to-all, but needs no count exchange
//! beyond the token counts and suits small ep.
//!
//! Backward: all-gather of the output gradient, the local un-permute and experts backward,
//! then reduce-scatter-v of the token and routing-weight gradients.

use crate::compute::{round_to_bf16, round_to_words, words_as_bf16};
use crate::layers::stored::Stored;
use origami_comm::ReduceOp;
use origami_kernels::bf16::Bf16;

use super::super::comm_ok;
use super::super::parallel::MoeParallel;
use super::super::permute::Permutation;
use super::super::router::Routing;
use crate::profile::{timed, Phase};

/// Gathered routing of one micro-batch and the row layout of this rank's experts over it.
#[derive(Clone, Debug, PartialEq)]
pub struct AllGatherPlan {
    hidden: usize,
    topk: usize,
    tokens: Vec<usize>,
    /// Routing weights of every gathered slot.
    pub weights: Vec<f32>,
    /// Rows of this rank's experts over the gathered tokens.
    pub permutation: Permutation,
}

impl AllGatherPlan {
    /// Gathers the routing of every rank of the tp-ep group; slots `kept` false (dropped for
    /// capacity on their own rank) stay dropped.
    pub fn new(
        parallel: &MoeParallel,
        routing: &Routing,
        kept: &[bool],
        experts: usize,
        hidden: usize,
    ) -> Self {
        let group = &parallel.tp_ep;
        let k = routing.topk;
        let mut tokens = vec![0u64; group.size()];
        tokens[group.rank()] = (routing.experts.len() / k) as u64;
        timed(Phase::CommDispatch, || {
            comm_ok(group.all_reduce_u64(&mut tokens, ReduceOp::Sum))
        });
        let tokens: Vec<usize> = tokens.into_iter().map(|t| t as usize).collect();
        let slot_counts: Vec<usize> = tokens.iter().map(|t| t * k).collect();
        let total: usize = slot_counts.iter().sum();
        // A dropped slot travels as expert −1; expert ids are exact in f32 below 2^24.
        let chosen: Vec<f32> = routing
            .experts
            .iter()
            .zip(kept)
            .map(|(&e, &kept)| if kept { e as f32 } else { -1.0 })
            .collect();
        let mut all_chosen = vec![0.0; total];
        timed(Phase::CommDispatch, || {
            comm_ok(group.all_gather_v(&chosen, &slot_counts, &mut all_chosen))
        });
        let mut weights = vec![0.0; total];
        timed(Phase::CommDispatch, || {
            comm_ok(group.all_gather_v(&routing.weights, &slot_counts, &mut weights))
        });
        let local = parallel.sharding().local_experts(experts);
        let mine = |e: f32| e >= 0.0 && local.contains(&(e as usize));
        let local_routing = Routing {
            experts: all_chosen
                .iter()
                .map(|&e| {
                    if mine(e) {
                        (e as usize - local.start) as u32
                    } else {
                        0
                    }
                })
                .collect(),
            // Only the choices shape the permutation; the weights stay in the plan.
            weights: Vec::new(),
            tokens_per_expert: Vec::new(),
            topk: k,
        };
        let kept: Vec<bool> = all_chosen.iter().map(|&e| mine(e)).collect();
        let permutation = Permutation::with_capacity(&local_routing, local.len(), &kept, None);
        AllGatherPlan {
            hidden,
            topk: k,
            tokens,
            weights,
            permutation,
        }
    }

    /// Tokens gathered from all ranks.
    pub fn gathered_tokens(&self) -> usize {
        self.tokens.iter().sum()
    }

    fn token_counts(&self) -> Vec<usize> {
        self.tokens.iter().map(|t| t * self.hidden).collect()
    }

    /// Every rank's `[tokens, hidden]` rows, in group order.
    pub fn gather(&self, parallel: &MoeParallel, x: &[f32]) -> Vec<f32> {
        let mut all = vec![0.0; self.gathered_tokens() * self.hidden];
        timed(Phase::CommDispatch, || {
            comm_ok(
                parallel
                    .tp_ep
                    .all_gather_v(x, &self.token_counts(), &mut all),
            )
        });
        all
    }

    /// [`AllGatherPlan::gather`] of the experts' input in bf16: `x` rounded, two values to a
    /// word, half the bytes of f32.
    pub fn gather_bf16(&self, parallel: &MoeParallel, x: &[f32]) -> Vec<Bf16> {
        if !self.hidden.is_multiple_of(2) {
            return round_to_bf16(&self.gather(parallel, x));
        }
        let counts: Vec<usize> = self.token_counts().iter().map(|c| c / 2).collect();
        let mut all = vec![0.0; counts.iter().sum()];
        timed(Phase::CommDispatch, || {
            comm_ok(
                parallel
                    .tp_ep
                    .all_gather_v(&round_to_words(x), &counts, &mut all),
            )
        });
        words_as_bf16(&all).to_vec()
    }

    /// Sums the ranks' rows for all gathered tokens and keeps this rank's tokens.
    pub fn reduce_scatter(&self, parallel: &MoeParallel, all: &[f32]) -> Vec<f32> {
        let counts = self.token_counts();
        let mut mine = vec![0.0; counts[parallel.tp_ep.rank()]];
        timed(Phase::CommDispatch, || {
            comm_ok(parallel.tp_ep.reduce_scatter_v(all, &counts, &mut mine))
        });
        mine
    }

    /// Sums the ranks' routing-weight gradients of all gathered slots and keeps this rank's.
    pub fn reduce_scatter_weights(&self, parallel: &MoeParallel, all: &[f32]) -> Vec<f32> {
        let counts: Vec<usize> = self.tokens.iter().map(|t| t * self.topk).collect();
        let mut mine = vec![0.0; counts[parallel.tp_ep.rank()]];
        timed(Phase::CommDispatch, || {
            comm_ok(parallel.tp_ep.reduce_scatter_v(all, &counts, &mut mine))
        });
        mine
    }
}

impl Stored for AllGatherPlan {
    fn stored_bytes(&self) -> usize {
        self.tokens.stored_bytes() + self.weights.stored_bytes() + self.permutation.stored_bytes()
    }
}
