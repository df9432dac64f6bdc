//! The Mixture-of-Experts layer: router → permute → dispatch to the experts' ranks → grouped
//! experts → combine → weighted un-permute, plus an optional shared expert. Dropless by
//! default; with a capacity factor an expert computes at most its capacity of a rank's tokens
//! (see [`capacity`]). In training the router may see its input jittered ([`jitter`]). Across ranks ([`parallel`]) the experts are split over ep (and their
//! hidden units over etp) and tokens travel by the configured [`dispatch`]er.

pub mod balance;
pub mod capacity;
pub mod config;
pub mod dispatch;
pub mod experts;
pub mod jitter;
pub mod parallel;
pub mod permute;
pub mod router;
pub mod score;
pub mod shared_expert;

use crate::layers::stored::Stored;
use std::sync::Mutex;

use origami_comm::ReduceOp;

use crate::compute::Weights;
use crate::layers::moe::config::{AuxLossScope, DispatcherKind, DropPolicy, MoeConfig};
use crate::layers::tensor_parallel::TensorParallel;
use crate::params::{Buffers, ParamRegistry};
use balance::{BalanceSettings, BalanceWeights, RunningLoad};
use dispatch::{PhaseTimes, RouteInput, RouteSaved};
use experts::GroupedExperts;
use jitter::TokenKeys;
use parallel::{MoeParallel, ShardingError};
use permute::Permutation;
use router::{AuxGradient, Router, RouterLosses, RouterSaved, Routing};
use shared_expert::{SharedExpert, SharedExpertSaved};

pub(crate) use crate::layers::comm_ok;
use crate::profile::{scope, timed, Phase};

/// Per-layer statistics of one micro-batch, for logging, the expert-load plot and the
/// expert-bias update. Counts are of the experts actually chosen (not the load-balancing loss's
/// plain top-k) and global: summed over the ranks that hold the rest of the batch (tp-dp-cp).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MoeStats {
    /// This rank's part of the auxiliary losses (with their coefficients); the parts of the
    /// ranks sharing a micro-batch add up to its losses.
    pub losses: RouterLosses,
    /// Tokens routed to each expert (before any dropping).
    pub tokens_per_expert: Vec<usize>,
    /// Routed (token, expert) slots dropped for capacity.
    pub dropped: usize,
    /// Tokens routed.
    pub tokens: usize,
    /// This rank's time in the forward's dispatch and expert computation.
    pub forward_times: PhaseTimes,
}

impl MoeStats {
    /// Most loaded expert over the mean load (1 is perfect balance).
    pub fn imbalance(&self) -> f64 {
        let total: usize = self.tokens_per_expert.iter().sum();
        let max = self.tokens_per_expert.iter().copied().max().unwrap_or(0);
        if total == 0 {
            1.0
        } else {
            max as f64 * self.tokens_per_expert.len() as f64 / total as f64
        }
    }
}

/// Loads of the step so far, for the global-batch loss; cloning a layer starts a fresh count.
#[derive(Debug, Default)]
struct StepLoad(Mutex<RunningLoad>);

impl Clone for StepLoad {
    fn clone(&self) -> Self {
        StepLoad::default()
    }
}

/// One MoE layer's parameters (this rank's part of them) and parallel groups.
#[derive(Clone, Debug)]
pub struct MoeLayer {
    hidden: usize,
    num_experts: usize,
    router: Router,
    experts: GroupedExperts,
    shared: Option<SharedExpert>,
    capacity_factor: Option<f32>,
    min_capacity: usize,
    drop_policy: DropPolicy,
    pad_to_capacity: bool,
    scope: AuxLossScope,
    dispatcher: DispatcherKind,
    parallel: MoeParallel,
    step_load: StepLoad,
}

/// What the forward keeps for the backward.
pub struct MoeSaved {
    routing: Routing,
    router: RouterSaved,
    balance: BalanceWeights,
    z_tokens: usize,
    permutation: Permutation,
    fixed_rows: Option<usize>,
    route: RouteSaved,
    shared: Option<SharedExpertSaved>,
}

impl MoeLayer {
    /// The layer on a single rank: registers the router, experts and shared expert under
    /// `prefix`.
    pub fn new(
        registry: &mut ParamRegistry,
        prefix: &str,
        hidden: usize,
        settings: &MoeConfig,
        std: f32,
        out_std: f32,
    ) -> Self {
        Self::new_parallel(
            registry,
            prefix,
            hidden,
            settings,
            (std, out_std),
            MoeParallel::single(),
        )
        .expect("one rank splits any expert count")
    }

    /// The layer on a rank of `parallel`: registers the router and shared expert whole and this
    /// rank's experts (and slice of them) under `prefix`.
    pub fn new_parallel(
        registry: &mut ParamRegistry,
        prefix: &str,
        hidden: usize,
        settings: &MoeConfig,
        (std, out_std): (f32, f32),
        parallel: MoeParallel,
    ) -> Result<Self, ShardingError> {
        let sharding = parallel.sharding();
        sharding.check(settings.num_experts, settings.ffn_hidden_size)?;
        let router = Router::new(registry, &format!("{prefix}.router"), hidden, settings, std);
        let experts = GroupedExperts::new(
            registry,
            &format!("{prefix}.experts"),
            settings.num_experts,
            hidden,
            settings.ffn_hidden_size,
            std,
            out_std,
            sharding,
        );
        let shared_ffn = settings.shared_expert_ffn_hidden_size;
        parallel::check_tensor_split(
            "model.moe.shared_expert_ffn_hidden_size",
            shared_ffn,
            parallel.tensor.size(),
        )?;
        let shared = (shared_ffn > 0).then(|| {
            SharedExpert::new(
                registry,
                &format!("{prefix}.shared_expert"),
                (hidden, shared_ffn),
                settings.shared_expert_gate,
                (std, out_std),
                TensorParallel::new(parallel.tensor.clone()),
            )
        });
        // On one rank both dispatchers are the local permutation; skip the copies.
        let dispatcher = if parallel.is_local() {
            DispatcherKind::Alltoall
        } else {
            settings.dispatcher
        };
        Ok(MoeLayer {
            hidden,
            num_experts: settings.num_experts,
            router,
            experts,
            shared,
            capacity_factor: settings.capacity_factor,
            min_capacity: settings.min_capacity,
            drop_policy: settings.drop_policy,
            pad_to_capacity: settings.pad_to_capacity,
            scope: settings.aux_loss_scope,
            dispatcher,
            parallel,
            step_load: StepLoad::default(),
        })
    }

    /// Starts a new global batch: forgets the loads the global-batch loss has counted so far.
    pub fn begin_global_batch(&self) {
        *self.step_load.0.lock().expect("step load lock") = RunningLoad::default();
    }

    /// The capacity of each expert for `tokens` local tokens, when dropping.
    fn capacity(&self, tokens: usize, topk: usize) -> Option<usize> {
        self.capacity_factor.map(|factor| {
            capacity::expert_capacity(tokens, topk, self.num_experts, factor).max(self.min_capacity)
        })
    }

    /// The expert-grouped row layout of this micro-batch: every routed slot (dropless), or the
    /// slots each expert's capacity keeps, optionally padded to exactly the capacity.
    fn permutation(&self, routing: &Routing, capacity: Option<usize>) -> Permutation {
        let experts = self.num_experts;
        match capacity {
            None => Permutation::new(routing, experts),
            Some(capacity) => {
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

    /// Aux-loss-free balancing after a global batch whose tokens per expert were `load`
    /// (summed over the batch's ranks and micro-batches, as [`MoeStats`] reports them).
    pub fn update_expert_bias(&self, params: &mut Buffers, load: &[usize]) {
        self.router.update_expert_bias(params, load);
    }

    /// Loads summed over the batch group: tokens per expert, dropped slots and tokens.
    fn global_stats(&self, routing: &Routing, dropped: usize, tokens: usize) -> MoeStats {
        let mut counts: Vec<u64> = routing
            .tokens_per_expert
            .iter()
            .map(|&n| n as u64)
            .chain([dropped as u64, tokens as u64])
            .collect();
        timed(Phase::CommOther, || {
            comm_ok(
                self.parallel
                    .batch
                    .all_reduce_u64(&mut counts, ReduceOp::Sum),
            )
        });
        let e = self.num_experts;
        MoeStats {
            losses: RouterLosses::default(),
            tokens_per_expert: counts[..e].iter().map(|&n| n as usize).collect(),
            dropped: counts[e] as usize,
            tokens: counts[e + 1] as usize,
            forward_times: PhaseTimes::default(),
        }
    }

    /// The load-balancing weights of this micro-batch under the configured scope, from the
    /// router's plain top-k `choices` (`[tokens, topk]`); `tokens` are this rank's and the whole
    /// micro-batch's (over the sequence group).
    fn balance(
        &self,
        choices: &[u32],
        topk: usize,
        (tokens, micro_batch_tokens): (usize, usize),
        sequences: usize,
    ) -> BalanceWeights {
        let _phase = scope(Phase::Router);
        let settings = BalanceSettings {
            scope: self.scope,
            factor: self.router.balancing_factor(),
            experts: self.num_experts,
            topk,
            sequence_group: self.parallel.sequence.as_ref(),
            batch_group: self.parallel.batch.as_ref(),
        };
        if settings.factor == 0.0 {
            return BalanceWeights::default();
        }
        match self.scope {
            AuxLossScope::MicroBatch | AuxLossScope::Sequence => {
                balance::local_scope_weights(&settings, choices, tokens, sequences)
            }
            AuxLossScope::GlobalBatch => {
                let mut running = self.step_load.0.lock().expect("step load lock");
                balance::global_scope_weights(
                    &settings,
                    &mut running,
                    choices,
                    (tokens, micro_batch_tokens),
                )
            }
        }
    }

    /// `y[tokens, hidden]` from the normalised input `x` holding one run of tokens.
    pub fn forward(&self, params: &Weights, x: &[f32]) -> (Vec<f32>, MoeSaved, MoeStats) {
        self.forward_batch(params, x, 1)
    }

    /// `y[tokens, hidden]` from the normalised input `x`, whose tokens are `sequences` equal
    /// runs (this rank's part of each sequence of the micro-batch, in order), routed without
    /// jitter.
    pub fn forward_batch(
        &self,
        params: &Weights,
        x: &[f32],
        sequences: usize,
    ) -> (Vec<f32>, MoeSaved, MoeStats) {
        self.forward_with_jitter(params, x, sequences, None)
    }

    /// Whether the router jitters its input in training (`model.moe.input_jitter_eps`).
    pub fn jitters(&self) -> bool {
        self.router.jitters()
    }

    /// [`MoeLayer::forward_batch`] in training: `jitter` holds the keys of the rows, from which
    /// the router draws its input jitter when the layer has one.
    pub fn forward_with_jitter(
        &self,
        params: &Weights,
        x: &[f32],
        sequences: usize,
        jitter: Option<&TokenKeys>,
    ) -> (Vec<f32>, MoeSaved, MoeStats) {
        self.forward_routed(params, x, sequences, jitter, None)
    }

    /// The forward of [`MoeLayer::forward_with_jitter`] again, for a backward that recomputes
    /// it: `balance` is the load-balancing weights the first run used (its output and saved
    /// state are the first run's; the global-batch loads are not counted twice).
    pub fn replay(
        &self,
        params: &Weights,
        x: &[f32],
        sequences: usize,
        jitter: Option<&TokenKeys>,
        balance: &BalanceWeights,
    ) -> (Vec<f32>, MoeSaved) {
        let (y, saved, _) = self.forward_routed(params, x, sequences, jitter, Some(balance));
        (y, saved)
    }

    /// Whether the backward recomputes the SwiGLU outputs of the experts and the shared expert
    /// instead of keeping them.
    pub fn set_recompute_activations(&mut self, on: bool) {
        self.experts.set_recompute_activation(on);
        if let Some(shared) = &mut self.shared {
            shared.set_recompute_activation(on);
        }
    }

    /// The forward; `replay` the balance weights of an earlier run of the same micro-batch.
    fn forward_routed(
        &self,
        params: &Weights,
        x: &[f32],
        sequences: usize,
        jitter: Option<&TokenKeys>,
        replay: Option<&BalanceWeights>,
    ) -> (Vec<f32>, MoeSaved, MoeStats) {
        let tokens = x.len() / self.hidden;
        let (routing, router_saved) = self.router.forward_with_jitter(params, x, jitter);
        let fixed_rows = self.capacity(tokens, routing.topk);
        let permutation = self.permutation(&routing, fixed_rows);
        let fixed_rows = fixed_rows.filter(|_| self.pad_to_capacity);
        let mut stats = self.global_stats(&routing, permutation.dropped(), tokens);
        let mut micro_batch_tokens = [tokens as u64];
        timed(Phase::CommOther, || {
            comm_ok(
                self.parallel
                    .sequence
                    .all_reduce_u64(&mut micro_batch_tokens, ReduceOp::Sum),
            )
        });
        let z_tokens = micro_batch_tokens[0] as usize;
        let balance = match replay {
            Some(balance) => balance.clone(),
            None => self.balance(
                router_saved.balancing_choices(),
                routing.topk,
                (tokens, z_tokens),
                sequences,
            ),
        };
        stats.losses = self.router.losses(&router_saved, &balance, z_tokens);
        let (mut y, route, forward_times) = dispatch::forward(
            self.dispatcher,
            &self.parallel,
            &self.experts,
            params,
            RouteInput {
                x,
                routing: &routing,
                permutation: &permutation,
                fixed_rows,
            },
        );
        stats.forward_times = forward_times;
        let shared = self.shared.as_ref().map(|shared| {
            let (out, saved) = shared.forward(params, x, sequences);
            y.iter_mut().zip(out).for_each(|(a, b)| *a += b);
            saved
        });
        let saved = MoeSaved {
            routing,
            router: router_saved,
            balance,
            z_tokens,
            permutation,
            fixed_rows,
            route,
            shared,
        };
        (y, saved, stats)
    }

    /// Accumulates parameter gradients and returns `dx`; the auxiliary losses enter with
    /// factor `loss_scale`.
    pub fn backward(
        &self,
        params: &Weights,
        grads: &mut Buffers,
        saved: MoeSaved,
        x: &[f32],
        dy: &[f32],
        loss_scale: f32,
    ) -> Vec<f32> {
        self.backward_timed(params, grads, saved, x, dy, loss_scale)
            .0
    }

    /// [`MoeLayer::backward`], also returning this rank's time in the backward's dispatch and
    /// expert computation.
    pub fn backward_timed(
        &self,
        params: &Weights,
        grads: &mut Buffers,
        saved: MoeSaved,
        x: &[f32],
        dy: &[f32],
        loss_scale: f32,
    ) -> (Vec<f32>, PhaseTimes) {
        let (mut dx, d_weights, times) = dispatch::backward(
            &self.parallel,
            &self.experts,
            params,
            grads,
            saved.route,
            RouteInput {
                x,
                routing: &saved.routing,
                permutation: &saved.permutation,
                fixed_rows: saved.fixed_rows,
            },
            dy,
        );
        self.router.backward(
            params,
            grads,
            saved.router,
            &saved.routing,
            x,
            &d_weights,
            AuxGradient {
                loss_scale,
                balance: &saved.balance,
                z_tokens: saved.z_tokens,
            },
            &mut dx,
        );
        if let (Some(shared), Some(shared_saved)) = (&self.shared, saved.shared) {
            shared.backward(params, grads, shared_saved, x, dy, &mut dx);
        }
        (dx, times)
    }
}

impl MoeSaved {
    /// The load-balancing weights the forward used (what a replay needs).
    pub fn balance(&self) -> &BalanceWeights {
        &self.balance
    }
}

impl Stored for MoeSaved {
    fn stored_bytes(&self) -> usize {
        self.routing.stored_bytes()
            + self.router.stored_bytes()
            + self.balance.stored_bytes()
            + self.permutation.stored_bytes()
            + self.route.stored_bytes()
            + self.shared.stored_bytes()
    }
}
