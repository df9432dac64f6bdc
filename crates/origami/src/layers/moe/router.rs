//! The MoE router: `logits = x·Wᵀ` (f32), top-k expert choice, routing weights, and the
//! load-balancing and z losses (DESIGN.md §1, "Router").
//!
//! Routing weights of token t for its chosen experts C (top-k of the logits; softmax, sigmoid
//! and sqrtsoftplus are monotone, so without an expert bias every mode chooses the same
//! experts), times the optional scaling factor:
//! - softmax: `softmax(logits[C])` (equal to softmax-then-top-k renormalised);
//! - softmax, `pre_softmax`: `softmax(logits)[C]`, not renormalised;
//! - sigmoid and sqrtsoftplus, with `s = σ` or `s = sqrt∘softplus` ([`super::score`]):
//!   `s(logits[C]) / (Σ_C s + ε)` when k > 1, else `s(logits[C])`.
//!
//! Load-balancing loss `coeff · E/(k·T²) · Σ_i P_i · N_i` with `P_i = Σ_t a[t,i]`, where the
//! balancing scores `a` are the softmax over all experts (sigmoid and sqrtsoftplus: `s / Σ s`
//! over all experts), and `N_i` the tokens whose plain top-k of `a` holds expert i. As in
//! Megatron-Core, that top-k ignores the expert bias and the group limit, so `N_i` may differ
//! from the tokens actually routed to i (which the expert-bias update counts). Its scope
//! (which tokens `N` and `T` count) is set by [`super::balance`] weights.
//! z-loss `coeff · mean_t(logsumexp(logits_t)²)` over the micro-batch.
//! With group-limited routing the choice is restricted to each token's best groups of experts.
//! With input jitter ([`super::jitter`]) the logits are computed from the jittered input in
//! training; everything after the logits is unchanged.

use std::cmp::Ordering;

use super::balance::BalanceWeights;
use super::jitter::{jitter_noise, jittered, TokenKeys};
use super::score::{ElementwiseScore, NORMALISATION_EPS};
use crate::compute::{LinearGrads, LinearShape, Weights};
use crate::layers::moe::config::MoeConfig;
use crate::layers::stored::Stored;
use crate::params::init::name_hash;
use crate::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry};
use crate::profile::{scope, Phase};
use origami_kernels::softmax::{logsumexp, softmax_rows, softmax_rows_backward};

/// Which experts each token goes to and with what weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Chosen experts, `[tokens, k]`, best first.
    pub experts: Vec<u32>,
    /// Routing weights, `[tokens, k]`.
    pub weights: Vec<f32>,
    /// Tokens routed to each expert.
    pub tokens_per_expert: Vec<usize>,
    /// Choices per token.
    pub topk: usize,
}

/// The router's auxiliary losses for one micro-batch (already multiplied by their coefficients).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RouterLosses {
    /// Load-balancing loss.
    pub load_balancing: f64,
    /// z-loss.
    pub z: f64,
}

/// How the auxiliary losses enter the router's backward.
pub struct AuxGradient<'a> {
    /// Factor of both losses (e.g. `1 / micro_batches`).
    pub loss_scale: f32,
    /// The load-balancing weights the forward used.
    pub balance: &'a BalanceWeights,
    /// Tokens the z-loss mean is taken over.
    pub z_tokens: usize,
}

/// The router's parameters and settings.
#[derive(Clone, Debug)]
pub struct Router {
    weight: ParamId,
    expert_bias: Option<ParamId>,
    hidden: usize,
    experts: usize,
    /// The jitter's stream id: the hash of the router's (global) name.
    jitter_stream: u64,
    settings: MoeConfig,
}

/// What the forward keeps for the backward, and the choices the load-balancing loss counts.
pub struct RouterSaved {
    /// The jitter's multipliers of the input, when it was jittered.
    noise: Option<Vec<f32>>,
    logits: Vec<f32>,
    balancing_scores: Vec<f32>,
    balancing_choices: Vec<u32>,
}

impl RouterSaved {
    /// Each token's plain top-k of its balancing scores, `[tokens, k]`, best first: the choices
    /// whose counts `N_i` the load-balancing loss uses (empty when that loss is off).
    pub fn balancing_choices(&self) -> &[u32] {
        &self.balancing_choices
    }
}

impl Router {
    /// Registers `{prefix}.weight` of shape `[experts, hidden]`, and with an expert-bias update
    /// rate the buffer `{prefix}.expert_bias` `[experts]` (zero at start).
    pub fn new(
        registry: &mut ParamRegistry,
        prefix: &str,
        hidden: usize,
        settings: &MoeConfig,
        std: f32,
    ) -> Self {
        let weight = registry.register(
            format!("{prefix}.weight"),
            &[settings.num_experts, hidden],
            ParamGroup::Dense,
            Init::Normal(std),
        );
        let expert_bias = settings.expert_bias_update_rate.map(|_| {
            registry.register_buffer(
                format!("{prefix}.expert_bias"),
                &[settings.num_experts],
                ParamGroup::Dense,
                Init::Constant(0.0),
            )
        });
        Router {
            weight,
            expert_bias,
            hidden,
            experts: settings.num_experts,
            jitter_stream: name_hash(prefix),
            settings: settings.clone(),
        }
    }

    /// Whether the router jitters its input in training.
    pub fn jitters(&self) -> bool {
        self.settings.input_jitter_eps.is_some()
    }

    fn scale(&self) -> f32 {
        self.settings.topk_scaling_factor.unwrap_or(1.0)
    }

    /// Routes the tokens `x[tokens, hidden]` as they are (evaluation, or no jitter).
    pub fn forward(&self, params: &Weights, x: &[f32]) -> (Routing, RouterSaved) {
        self.forward_with_jitter(params, x, None)
    }

    /// Routes the tokens `x[tokens, hidden]`; in training `jitter` holds the rows' keys, and
    /// with `input_jitter_eps` set the logits come from the jittered input.
    pub fn forward_with_jitter(
        &self,
        params: &Weights,
        x: &[f32],
        jitter: Option<&TokenKeys>,
    ) -> (Routing, RouterSaved) {
        let _phase = scope(Phase::Router);
        let tokens = x.len() / self.hidden;
        let (e, k) = (self.experts, self.settings.topk);
        let noise = match (self.settings.input_jitter_eps, jitter) {
            (Some(eps), Some(keys)) => {
                assert_eq!(keys.tokens.len(), tokens, "one jitter key per routed token");
                Some(jitter_noise(eps, self.jitter_stream, keys, self.hidden))
            }
            _ => None,
        };
        let jittered_input = noise.as_ref().map(|n| jittered(x, n));
        let mut logits = vec![0.0; tokens * e];
        params.in_f32().linear_forward(
            &mut logits,
            jittered_input.as_deref().unwrap_or(x),
            self.weight,
            None,
            LinearShape::new(tokens, self.hidden, e),
        );
        let mut routing = Routing {
            experts: vec![0; tokens * k],
            weights: vec![0.0; tokens * k],
            tokens_per_expert: vec![0; e],
            topk: k,
        };
        let mut order: Vec<u32> = (0..e as u32).collect();
        let bias = self.expert_bias.map(|id| params.get(id));
        for t in 0..tokens {
            let row = &logits[t * e..(t + 1) * e];
            self.rank_experts(&self.selection_scores(row, bias), &mut order);
            let chosen = &order[..k];
            routing.experts[t * k..(t + 1) * k].copy_from_slice(chosen);
            self.chosen_weights(row, chosen, &mut routing.weights[t * k..(t + 1) * k]);
            for &c in chosen {
                routing.tokens_per_expert[c as usize] += 1;
            }
        }
        let (balancing_scores, balancing_choices) = if self.settings.aux_loss_coeff != 0.0 {
            let scores = self.balancing_scores(&logits);
            let choices = self.balancing_choices(&scores);
            (scores, choices)
        } else {
            (Vec::new(), Vec::new())
        };
        (
            routing,
            RouterSaved {
                noise,
                logits,
                balancing_scores,
                balancing_choices,
            },
        )
    }

    /// `coeff · E / k`, the factor of the load-balancing loss (see [`super::balance`]).
    pub fn balancing_factor(&self) -> f64 {
        self.settings.aux_loss_coeff as f64 * self.experts as f64 / self.settings.topk as f64
    }

    /// This rank's part of the auxiliary losses: the load-balancing loss with `balance`, and
    /// the z-loss with its mean taken over `z_tokens` (the tokens of the whole micro-batch).
    pub fn losses(
        &self,
        saved: &RouterSaved,
        balance: &BalanceWeights,
        z_tokens: usize,
    ) -> RouterLosses {
        let _phase = scope(Phase::Router);
        let e = self.experts;
        let mut losses = RouterLosses::default();
        if self.settings.aux_loss_coeff != 0.0 {
            for (range, weights) in &balance.segments {
                for t in range.clone() {
                    let scores = &saved.balancing_scores[t * e..(t + 1) * e];
                    losses.load_balancing += scores
                        .iter()
                        .zip(weights)
                        .map(|(&p, w)| p as f64 * w)
                        .sum::<f64>();
                }
            }
        }
        if self.settings.z_loss_coeff != 0.0 && z_tokens > 0 {
            let sum: f64 = saved
                .logits
                .chunks(e)
                .map(|row| (logsumexp(row) as f64).powi(2))
                .sum();
            losses.z = self.settings.z_loss_coeff as f64 * sum / z_tokens as f64;
        }
        losses
    }

    fn elementwise(&self) -> Option<ElementwiseScore> {
        ElementwiseScore::of(self.settings.score_function)
    }

    /// Scores that decide the choice of experts: logits (top-k-then-softmax), probabilities
    /// (`pre_softmax`) or elementwise scores plus the expert bias when there is one. The score
    /// functions are monotone, so without a bias every mode ranks experts as the logits do.
    fn selection_scores(&self, row: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        match (self.elementwise(), self.settings.pre_softmax) {
            (None, false) => row.to_vec(),
            (None, true) => {
                let lse = logsumexp(row);
                row.iter().map(|l| (l - lse).exp()).collect()
            }
            (Some(score), _) => match bias {
                Some(bias) => row
                    .iter()
                    .zip(bias)
                    .map(|(&l, b)| score.value(l) + b)
                    .collect(),
                None => row.iter().map(|&l| score.value(l)).collect(),
            },
        }
    }

    /// Orders `order` so that its first k entries are the token's chosen experts, best first:
    /// the top-k of the selection scores, restricted to the best `group_topk` groups with
    /// group-limited routing (a group scores the sum of its `topk / group_topk` best selection
    /// scores, as in Megatron-Core).
    fn rank_experts(&self, selection: &[f32], order: &mut [u32]) {
        let allowed = match (self.settings.num_groups, self.settings.group_topk) {
            (Some(groups), Some(used)) => self.best_groups(selection, groups, used),
            _ => vec![true; selection.len()],
        };
        top_k(order, self.settings.topk, |a, b| {
            allowed[b]
                .cmp(&allowed[a])
                .then(selection[b].total_cmp(&selection[a]))
        });
    }

    /// Each token's plain top-k of its balancing `scores` `[tokens, E]` (no bias, no groups).
    fn balancing_choices(&self, scores: &[f32]) -> Vec<u32> {
        let k = self.settings.topk;
        let mut order: Vec<u32> = (0..self.experts as u32).collect();
        let mut choices = Vec::with_capacity(scores.len() / self.experts.max(1) * k);
        for row in scores.chunks(self.experts) {
            top_k(&mut order, k, |a, b| row[b].total_cmp(&row[a]));
            choices.extend_from_slice(&order[..k]);
        }
        choices
    }

    /// Which experts lie in the token's `used` best groups.
    fn best_groups(&self, selection: &[f32], groups: usize, used: usize) -> Vec<bool> {
        let per_group = selection.len() / groups;
        let take = self.settings.topk / used;
        let totals: Vec<f32> = (0..groups)
            .map(|g| {
                let mut members = selection[g * per_group..(g + 1) * per_group].to_vec();
                members.sort_by(|a, b| b.total_cmp(a));
                members[..take].iter().sum()
            })
            .collect();
        let mut ranked: Vec<usize> = (0..groups).collect();
        ranked.sort_by(|&a, &b| totals[b].total_cmp(&totals[a]).then(a.cmp(&b)));
        let mut allowed = vec![false; selection.len()];
        for &g in &ranked[..used] {
            allowed[g * per_group..(g + 1) * per_group].fill(true);
        }
        allowed
    }

    /// Aux-loss-free balancing, once per global batch: `bias_i += rate · sign(mean − load_i)`
    /// from the tokens each expert received (`load`, summed over the batch). No-op without a bias.
    pub fn update_expert_bias(&self, params: &mut Buffers, load: &[usize]) {
        let (Some(id), Some(rate)) = (self.expert_bias, self.settings.expert_bias_update_rate)
        else {
            return;
        };
        let mean = load.iter().sum::<usize>() as f64 / load.len() as f64;
        for (b, &l) in params.get_mut(id).iter_mut().zip(load) {
            let gap = mean - l as f64;
            *b += rate
                * if gap > 0.0 {
                    1.0
                } else if gap < 0.0 {
                    -1.0
                } else {
                    0.0
                };
        }
    }

    fn chosen_weights(&self, row: &[f32], chosen: &[u32], out: &mut [f32]) {
        match (self.elementwise(), self.settings.pre_softmax) {
            (None, false) => {
                out.iter_mut()
                    .zip(chosen)
                    .for_each(|(o, &c)| *o = row[c as usize]);
                softmax_rows(out, out.len());
            }
            (None, true) => {
                let lse = logsumexp(row);
                out.iter_mut()
                    .zip(chosen)
                    .for_each(|(o, &c)| *o = (row[c as usize] - lse).exp());
            }
            (Some(score), _) => {
                out.iter_mut()
                    .zip(chosen)
                    .for_each(|(o, &c)| *o = score.value(row[c as usize]));
                if chosen.len() > 1 {
                    let sum: f32 = out.iter().sum::<f32>() + NORMALISATION_EPS;
                    out.iter_mut().for_each(|o| *o /= sum);
                }
            }
        }
        out.iter_mut().for_each(|o| *o *= self.scale());
    }

    /// The balancing scores `a` `[tokens, E]`: softmax over all experts, or the elementwise
    /// scores normalised over all experts.
    fn balancing_scores(&self, logits: &[f32]) -> Vec<f32> {
        let mut scores = logits.to_vec();
        match self.elementwise() {
            None => softmax_rows(&mut scores, self.experts),
            Some(score) => {
                for row in scores.chunks_mut(self.experts) {
                    row.iter_mut().for_each(|v| *v = score.value(*v));
                    let sum: f32 = row.iter().sum::<f32>() + NORMALISATION_EPS;
                    row.iter_mut().for_each(|v| *v /= sum);
                }
            }
        }
        scores
    }

    /// Backward: `d_weights[tokens, k]` is the gradient of the routing weights; the auxiliary
    /// losses enter with factor `loss_scale`. Accumulates the weight gradient and adds into `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &Weights,
        grads: &mut Buffers,
        saved: RouterSaved,
        routing: &Routing,
        x: &[f32],
        d_weights: &[f32],
        aux: AuxGradient,
        dx: &mut [f32],
    ) {
        let _phase = scope(Phase::Router);
        let loss_scale = aux.loss_scale;
        let tokens = x.len() / self.hidden;
        let (e, k) = (self.experts, self.settings.topk);
        let mut dlogits = vec![0.0f32; tokens * e];
        for t in 0..tokens {
            let row = &saved.logits[t * e..(t + 1) * e];
            let chosen = &routing.experts[t * k..(t + 1) * k];
            let dw = &d_weights[t * k..(t + 1) * k];
            self.chosen_weights_backward(row, chosen, dw, &mut dlogits[t * e..(t + 1) * e]);
        }
        if self.settings.aux_loss_coeff != 0.0 && tokens > 0 {
            let mut d_scores = vec![0.0f32; tokens * e];
            for (range, weights) in &aux.balance.segments {
                for t in range.clone() {
                    for (d, w) in d_scores[t * e..(t + 1) * e].iter_mut().zip(weights) {
                        *d = (w * loss_scale as f64) as f32;
                    }
                }
            }
            let mut d_logits_balance = vec![0.0; tokens * e];
            match self.elementwise() {
                None => softmax_rows_backward(
                    &mut d_logits_balance,
                    &d_scores,
                    &saved.balancing_scores,
                    e,
                ),
                Some(score) => {
                    for t in 0..tokens {
                        let logits = &saved.logits[t * e..(t + 1) * e];
                        let a = &saved.balancing_scores[t * e..(t + 1) * e];
                        let da = &d_scores[t * e..(t + 1) * e];
                        let sum: f32 =
                            logits.iter().map(|&l| score.value(l)).sum::<f32>() + NORMALISATION_EPS;
                        let dot: f32 = da.iter().zip(a).map(|(x, y)| x * y).sum();
                        for i in 0..e {
                            d_logits_balance[t * e + i] =
                                (da[i] - dot) / sum * score.derivative(logits[i]);
                        }
                    }
                }
            }
            dlogits
                .iter_mut()
                .zip(d_logits_balance)
                .for_each(|(d, b)| *d += b);
        }
        if self.settings.z_loss_coeff != 0.0 && aux.z_tokens > 0 {
            let coeff = 2.0 * self.settings.z_loss_coeff * loss_scale / aux.z_tokens as f32;
            for (d, row) in dlogits.chunks_mut(e).zip(saved.logits.chunks(e)) {
                let lse = logsumexp(row);
                for (d, &l) in d.iter_mut().zip(row) {
                    *d += coeff * lse * (l - lse).exp();
                }
            }
        }
        let params = params.in_f32();
        let shape = LinearShape::new(tokens, self.hidden, e);
        let Some(noise) = &saved.noise else {
            params.linear_backward(
                LinearGrads {
                    input: Some(dx),
                    accumulate_input: true,
                    weight: Some(grads.get_mut(self.weight)),
                    bias: None,
                },
                &dlogits,
                x,
                self.weight,
                shape,
            );
            return;
        };
        // Jittered: the weight saw x ⊙ noise, and the input's gradient is the jittered
        // input's times the noise.
        let mut d_jittered = vec![0.0; x.len()];
        params.linear_backward(
            LinearGrads {
                input: Some(&mut d_jittered),
                accumulate_input: false,
                weight: Some(grads.get_mut(self.weight)),
                bias: None,
            },
            &dlogits,
            &jittered(x, noise),
            self.weight,
            shape,
        );
        for ((d, g), n) in dx.iter_mut().zip(&d_jittered).zip(noise) {
            *d += g * n;
        }
    }

    fn chosen_weights_backward(
        &self,
        row: &[f32],
        chosen: &[u32],
        dw: &[f32],
        dlogits: &mut [f32],
    ) {
        let scale = self.scale();
        let k = chosen.len();
        match (self.elementwise(), self.settings.pre_softmax) {
            (None, false) => {
                let mut w: Vec<f32> = chosen.iter().map(|&c| row[c as usize]).collect();
                softmax_rows(&mut w, k);
                let dot: f32 = dw.iter().zip(&w).map(|(a, b)| a * b).sum();
                for j in 0..k {
                    dlogits[chosen[j] as usize] += scale * w[j] * (dw[j] - dot);
                }
            }
            (None, true) => {
                let lse = logsumexp(row);
                let dot: f32 = (0..k)
                    .map(|j| scale * dw[j] * (row[chosen[j] as usize] - lse).exp())
                    .sum();
                for (i, d) in dlogits.iter_mut().enumerate() {
                    let p = (row[i] - lse).exp();
                    let dp = chosen
                        .iter()
                        .position(|&c| c as usize == i)
                        .map_or(0.0, |j| scale * dw[j]);
                    *d += p * (dp - dot);
                }
            }
            (Some(score), _) => {
                let s: Vec<f32> = chosen
                    .iter()
                    .map(|&c| score.value(row[c as usize]))
                    .collect();
                let ds: Vec<f32> = if k > 1 {
                    let sum: f32 = s.iter().sum::<f32>() + NORMALISATION_EPS;
                    let dot: f32 = dw.iter().zip(&s).map(|(a, b)| a * b / sum).sum();
                    dw.iter().map(|d| scale * (d - dot) / sum).collect()
                } else {
                    dw.iter().map(|d| scale * d).collect()
                };
                for j in 0..k {
                    let c = chosen[j] as usize;
                    dlogits[c] += ds[j] * score.derivative(row[c]);
                }
            }
        }
    }
}

/// Orders `order` (expert indices) so that its first `k` entries are the best under
/// `better(a, b)` (`Less`: a ranks before b), ties going to the lower index, best first.
fn top_k(order: &mut [u32], k: usize, better: impl Fn(usize, usize) -> Ordering) {
    let rank = |a: &u32, b: &u32| {
        let (a, b) = (*a as usize, *b as usize);
        better(a, b).then(a.cmp(&b))
    };
    order.select_nth_unstable_by(k - 1, rank);
    order[..k].sort_by(rank);
}

impl Stored for RouterSaved {
    fn stored_bytes(&self) -> usize {
        self.noise.stored_bytes()
            + self.logits.stored_bytes()
            + self.balancing_scores.stored_bytes()
            + self.balancing_choices.stored_bytes()
    }
}

impl Stored for Routing {
    fn stored_bytes(&self) -> usize {
        self.experts.stored_bytes()
            + self.weights.stored_bytes()
            + self.tokens_per_expert.stored_bytes()
    }
}
