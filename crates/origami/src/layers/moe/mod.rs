//! The Mixture-of-Experts layer on one rank: router → permute → grouped experts → weighted
//! un-permute, plus an optional shared expert. Dropless by default; with a capacity factor an
//! expert computes at most its capacity of tokens (see [`capacity`]).

pub mod capacity;
pub mod experts;
pub mod permute;
pub mod router;
pub mod shared_expert;

use crate::model::config::{DropPolicy, MoeConfig};
use crate::model::params::{Buffers, ParamRegistry};
use experts::{ExpertsSaved, GroupedExperts};
use permute::{permute, permute_backward, unpermute, unpermute_backward, Permutation};
use router::{Router, RouterLosses, RouterSaved, Routing};
use shared_expert::{SharedExpert, SharedExpertSaved};

/// Per-layer statistics of one micro-batch, for logging and the expert-load plot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MoeStats {
    /// Auxiliary losses (with their coefficients).
    pub losses: RouterLosses,
    /// Tokens routed to each expert (before any dropping).
    pub tokens_per_expert: Vec<usize>,
    /// Routed (token, expert) slots dropped for capacity.
    pub dropped: usize,
}

/// One MoE layer's parameters.
#[derive(Clone, Debug)]
pub struct MoeLayer {
    hidden: usize,
    router: Router,
    experts: GroupedExperts,
    shared: Option<SharedExpert>,
    capacity_factor: Option<f32>,
    drop_policy: DropPolicy,
    pad_to_capacity: bool,
}

/// What the forward keeps for the backward.
pub struct MoeSaved {
    routing: Routing,
    router: RouterSaved,
    permutation: Permutation,
    expert_input: Vec<f32>,
    expert_output: Vec<f32>,
    experts: ExpertsSaved,
    shared: Option<SharedExpertSaved>,
}

impl MoeLayer {
    /// Registers the router, experts and shared expert under `prefix`.
    pub fn new(
        registry: &mut ParamRegistry,
        prefix: &str,
        hidden: usize,
        settings: &MoeConfig,
        std: f32,
        out_std: f32,
    ) -> Self {
        let router = Router::new(registry, &format!("{prefix}.router"), hidden, settings, std);
        let experts = GroupedExperts::new(
            registry,
            &format!("{prefix}.experts"),
            settings.num_experts,
            hidden,
            settings.ffn_hidden_size,
            std,
            out_std,
        );
        let shared = (settings.shared_expert_ffn_hidden_size > 0).then(|| {
            SharedExpert::new(
                registry,
                &format!("{prefix}.shared_expert"),
                hidden,
                settings.shared_expert_ffn_hidden_size,
                settings.shared_expert_gate,
                std,
                out_std,
            )
        });
        MoeLayer {
            hidden,
            router,
            experts,
            shared,
            capacity_factor: settings.capacity_factor,
            drop_policy: settings.drop_policy,
            pad_to_capacity: settings.pad_to_capacity,
        }
    }

    /// The expert-grouped row layout of this micro-batch: every routed slot (dropless), or the
    /// slots each expert's capacity keeps, optionally padded to exactly the capacity.
    fn permutation(&self, routing: &Routing, tokens: usize) -> Permutation {
        let experts = self.experts.experts();
        match self.capacity_factor {
            None => Permutation::new(routing, experts),
            Some(factor) => {
                let capacity = capacity::expert_capacity(tokens, routing.topk, experts, factor);
                let kept = capacity::kept_slots(routing, experts, capacity, self.drop_policy);
                Permutation::with_capacity(
                    routing,
                    experts,
                    &kept,
                    self.pad_to_capacity.then_some(capacity),
                )
            }
        }
    }

    /// Aux-loss-free balancing after a global batch whose tokens per expert were `load`.
    pub fn update_expert_bias(&self, params: &mut Buffers, load: &[usize]) {
        self.router.update_expert_bias(params, load);
    }

    /// `y[tokens, hidden]` from the normalised input `x`.
    pub fn forward(&self, params: &Buffers, x: &[f32]) -> (Vec<f32>, MoeSaved, MoeStats) {
        let tokens = x.len() / self.hidden;
        let (routing, losses, router_saved) = self.router.forward(params, x);
        let permutation = self.permutation(&routing, tokens);
        let expert_input = permute(x, &permutation, self.hidden);
        let (expert_output, experts_saved) =
            self.experts
                .forward(params, &expert_input, &permutation.offsets);
        let mut y = unpermute(
            &expert_output,
            &routing.weights,
            &permutation,
            self.hidden,
            tokens,
        );
        let shared = self.shared.as_ref().map(|shared| {
            let (out, saved) = shared.forward(params, x);
            y.iter_mut().zip(out).for_each(|(a, b)| *a += b);
            saved
        });
        let stats = MoeStats {
            losses,
            tokens_per_expert: routing.tokens_per_expert.clone(),
            dropped: permutation.dropped(),
        };
        let saved = MoeSaved {
            routing,
            router: router_saved,
            permutation,
            expert_input,
            expert_output,
            experts: experts_saved,
            shared,
        };
        (y, saved, stats)
    }

    /// Accumulates parameter gradients and returns `dx`; the auxiliary losses enter with
    /// factor `loss_scale`.
    pub fn backward(
        &self,
        params: &Buffers,
        grads: &mut Buffers,
        saved: MoeSaved,
        x: &[f32],
        dy: &[f32],
        loss_scale: f32,
    ) -> Vec<f32> {
        let (d_rows, d_weights) = unpermute_backward(
            dy,
            &saved.expert_output,
            &saved.routing.weights,
            &saved.permutation,
            self.hidden,
        );
        let d_expert_input = self.experts.backward(
            params,
            grads,
            saved.experts,
            &saved.expert_input,
            &d_rows,
            &saved.permutation.offsets,
        );
        let mut dx = vec![0.0; x.len()];
        permute_backward(&mut dx, &d_expert_input, &saved.permutation, self.hidden);
        self.router.backward(
            params,
            grads,
            saved.router,
            &saved.routing,
            x,
            &d_weights,
            loss_scale,
            &mut dx,
        );
        if let (Some(shared), Some(shared_saved)) = (&self.shared, saved.shared) {
            shared.backward(params, grads, shared_saved, x, dy, &mut dx);
        }
        dx
    }
}
