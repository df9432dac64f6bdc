//! The load-balancing loss counts each expert's load `N_i` from a plain top-k of the balancing
//! scores — without the expert bias and without the group limit, as Megatron-Core's
//! `compute_routing_scores_for_aux_loss` — at the micro-batch, sequence and global-batch scopes,
//! while tokens are still dispatched to their biased, group-limited choices.
//!
//! Each expected value is computed here, in f64, from the formula
//! `coeff · E/(k·T²) · Σ_i P_i · N_i` (per sequence and averaged over the sequences at the
//! sequence scope; with `N_i` the mean over the step's micro-batches so far at the global-batch
//! scope) on logits written below, the router weight being the identity so that the logits are
//! the input. In every case the biased or grouped choice differs from the plain top-k.

use origami::compute::Weights;
use origami::layers::moe::config::{AuxLossScope, MoeConfig, ScoreFunction};
use origami::layers::moe::MoeLayer;
use origami::params::init::initialise;
use origami::params::{Buffers, ParamRegistry};

const E: usize = 4;
const K: usize = 2;
const COEFF: f64 = 0.1;

/// Four tokens; as two sequences (or two micro-batches), tokens 0–1 and tokens 2–3.
const LOGITS: [[f32; E]; 4] = [
    [2.0, 1.0, 0.5, -1.0],
    [0.0, 1.5, -0.5, 1.0],
    [-1.0, 0.3, 2.0, 0.8],
    [1.2, 0.0, 0.9, 1.0],
];

/// What deflects the routing from the plain top-k.
#[derive(Clone, Copy, Debug)]
enum Deflection {
    /// Sigmoid router, bias 0.6 on expert 2: tokens 0, 1 and 3 route to expert 2 instead of
    /// their second-best expert.
    Bias,
    /// Softmax router, groups {0, 1} and {2, 3}, one group per token: token 1 routes to
    /// {0, 1} and token 3 to {2, 3}, against plain top-2s {1, 3} and {0, 3}.
    Groups,
    /// Sigmoid router, bias 0.5 on expert 1, the same groups: tokens 1 and 3 route to {0, 1}.
    Both,
}

impl Deflection {
    fn score_function(self) -> ScoreFunction {
        match self {
            Deflection::Groups => ScoreFunction::Softmax,
            Deflection::Bias | Deflection::Both => ScoreFunction::Sigmoid,
        }
    }

    fn bias(self) -> Option<[f32; E]> {
        match self {
            Deflection::Bias => Some([0.0, 0.0, 0.6, 0.0]),
            Deflection::Groups => None,
            Deflection::Both => Some([0.0, 0.5, 0.0, 0.0]),
        }
    }

    fn grouped(self) -> bool {
        matches!(self, Deflection::Groups | Deflection::Both)
    }
}

const DEFLECTIONS: [Deflection; 3] = [Deflection::Bias, Deflection::Groups, Deflection::Both];

/// An MoE layer of width E whose router weight is the identity, with `deflection` and `scope`.
fn layer(deflection: Deflection, scope: AuxLossScope) -> (MoeLayer, Buffers) {
    let settings = MoeConfig {
        num_experts: E,
        ffn_hidden_size: 4,
        topk: K,
        score_function: deflection.score_function(),
        aux_loss_coeff: COEFF as f32,
        z_loss_coeff: 0.0,
        aux_loss_scope: scope,
        expert_bias_update_rate: deflection.bias().map(|_| 0.01),
        num_groups: deflection.grouped().then_some(2),
        group_topk: deflection.grouped().then_some(1),
        ..MoeConfig::default()
    };
    settings.validate().unwrap();
    let mut registry = ParamRegistry::default();
    let layer = MoeLayer::new(&mut registry, "moe", E, &settings, 0.3, 0.3);
    let mut params = initialise(&registry, 1);
    let weight = registry.find("moe.router.weight").unwrap().id;
    for (i, w) in params.get_mut(weight).iter_mut().enumerate() {
        *w = f32::from(i / E == i % E);
    }
    if let Some(bias) = deflection.bias() {
        let id = registry.find("moe.router.expert_bias").unwrap().id;
        params.get_mut(id).copy_from_slice(&bias);
    }
    (layer, params)
}

fn input(tokens: &[[f32; E]]) -> Vec<f32> {
    tokens.iter().flatten().copied().collect()
}

/// Softmax over all experts, or the sigmoids divided by their sum over all experts.
fn balancing_scores(function: ScoreFunction, logits: &[f32; E]) -> [f64; E] {
    let raw = logits.map(|l| match function {
        ScoreFunction::Softmax => (l as f64).exp(),
        _ => 1.0 / (1.0 + (-(l as f64)).exp()),
    });
    let sum: f64 = raw.iter().sum();
    raw.map(|v| v / sum)
}

/// The K experts of highest score (no bias, no groups).
fn plain_top_k(scores: &[f64; E]) -> [usize; K] {
    let mut order: Vec<usize> = (0..E).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    [order[0], order[1]]
}

/// `N_i` of `tokens` under the plain top-k.
fn plain_loads(function: ScoreFunction, tokens: &[[f32; E]]) -> [f64; E] {
    let mut loads = [0.0; E];
    for logits in tokens {
        for i in plain_top_k(&balancing_scores(function, logits)) {
            loads[i] += 1.0;
        }
    }
    loads
}

/// `coeff · E/(k·T²) · Σ_i P_i · N_i` with `P_i` summed over `tokens` and `T` their number.
fn switch_loss(function: ScoreFunction, tokens: &[[f32; E]], loads: &[f64; E]) -> f64 {
    let t = tokens.len() as f64;
    let mut p = [0.0; E];
    for logits in tokens {
        for (p, a) in p.iter_mut().zip(balancing_scores(function, logits)) {
            *p += a;
        }
    }
    let dot: f64 = p.iter().zip(loads).map(|(p, n)| p * n).sum();
    COEFF * E as f64 / (K as f64 * t * t) * dot
}

/// Notes in `mismatches` a loss more than 1e-5 (relative) from the formula's.
fn compare(mismatches: &mut Vec<String>, what: String, actual: f64, expected: f64) {
    if (actual - expected).abs() > 1e-5 * expected.abs() {
        mismatches.push(format!(
            "{what}: load-balancing loss {actual}, expected {expected} from the formula"
        ));
    }
}

fn assert_none(mismatches: Vec<String>) {
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

fn as_counts(loads: &[f64; E]) -> Vec<usize> {
    loads.iter().map(|&n| n as usize).collect()
}

#[test]
fn micro_batch_scope_counts_the_plain_top_k() {
    let mut mismatches = Vec::new();
    for deflection in DEFLECTIONS {
        let (layer, params) = layer(deflection, AuxLossScope::MicroBatch);
        let function = deflection.score_function();
        let (_, _, stats) = layer.forward(&Weights::f32(&params), &input(&LOGITS));
        let loads = plain_loads(function, &LOGITS);
        assert_ne!(
            stats.tokens_per_expert,
            as_counts(&loads),
            "{deflection:?}: the routing must differ from the plain top-k for this case to test anything"
        );
        compare(
            &mut mismatches,
            format!("{deflection:?}, micro-batch"),
            stats.losses.load_balancing,
            switch_loss(function, &LOGITS, &loads),
        );
    }
    assert_none(mismatches);
}

#[test]
fn sequence_scope_counts_the_plain_top_k_of_each_sequence() {
    let mut mismatches = Vec::new();
    for deflection in DEFLECTIONS {
        let (layer, params) = layer(deflection, AuxLossScope::Sequence);
        let function = deflection.score_function();
        let (_, _, stats) = layer.forward_batch(&Weights::f32(&params), &input(&LOGITS), 2);
        let (first, second) = LOGITS.split_at(2);
        let expected = (switch_loss(function, first, &plain_loads(function, first))
            + switch_loss(function, second, &plain_loads(function, second)))
            / 2.0;
        let deflected = [first, second].iter().any(|sequence| {
            let (_, _, alone) = layer.forward(&Weights::f32(&params), &input(sequence));
            alone.tokens_per_expert != as_counts(&plain_loads(function, sequence))
        });
        assert!(
            deflected,
            "{deflection:?}: some sequence must be routed differently from its plain top-k"
        );
        compare(
            &mut mismatches,
            format!("{deflection:?}, sequence"),
            stats.losses.load_balancing,
            expected,
        );
    }
    assert_none(mismatches);
}

#[test]
fn global_batch_scope_counts_the_plain_top_k_over_the_steps_micro_batches() {
    let mut mismatches = Vec::new();
    for deflection in DEFLECTIONS {
        let (layer, params) = layer(deflection, AuxLossScope::GlobalBatch);
        let function = deflection.score_function();
        let micro_batches = [&LOGITS[..2], &LOGITS[2..]];
        layer.begin_global_batch();
        let mut running = [0.0; E];
        let mut routed = vec![0; E];
        for (m, tokens) in micro_batches.iter().enumerate() {
            let (_, _, stats) = layer.forward(&Weights::f32(&params), &input(tokens));
            for (sum, n) in running.iter_mut().zip(plain_loads(function, tokens)) {
                *sum += n;
            }
            routed
                .iter_mut()
                .zip(&stats.tokens_per_expert)
                .for_each(|(r, n)| *r += n);
            let mean = running.map(|n| n / (m + 1) as f64);
            compare(
                &mut mismatches,
                format!("{deflection:?}, global batch, micro-batch {m}"),
                stats.losses.load_balancing,
                switch_loss(function, tokens, &mean),
            );
        }
        assert_ne!(
            routed,
            as_counts(&running),
            "{deflection:?}: the routing must differ from the plain top-k"
        );
    }
    assert_none(mismatches);
}
