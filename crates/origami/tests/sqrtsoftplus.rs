//! The `sqrtsoftplus` score function, `s(x) = sqrt(ln(1 + e^x))`: routing weights normalised
//! over the chosen experts (as sigmoid), expert bias and group-limited routing affecting only
//! the choice, balancing scores normalised over all experts, finite values and gradients for
//! large |x|, and its config checks. Expected values are computed here in f64 from the formulas.

use origami::compute::Weights;
use origami::layers::moe::balance::BalanceWeights;
use origami::layers::moe::config::{MoeConfig, ScoreFunction};
use origami::layers::moe::router::{AuxGradient, Router};
use origami::layers::moe::score::ElementwiseScore;
use origami::layers::moe::MoeLayer;
use origami::params::init::initialise;
use origami::params::{Buffers, ParamRegistry};
use origami::train::config::RunConfig;

const E: usize = 4;

fn s(x: f64) -> f64 {
    if x > 0.0 {
        (x + (-x).exp().ln_1p()).sqrt()
    } else {
        x.exp().ln_1p().sqrt()
    }
}

fn ds(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp()) / (2.0 * s(x))
}

fn settings() -> MoeConfig {
    MoeConfig {
        num_experts: E,
        ffn_hidden_size: 4,
        topk: 2,
        score_function: ScoreFunction::SqrtSoftplus,
        ..MoeConfig::default()
    }
}

/// Sets the router weight `{prefix}.weight` to the identity, so that the logits are the input.
fn identity_router(registry: &ParamRegistry, params: &mut Buffers, prefix: &str) {
    let id = registry.find(&format!("{prefix}.weight")).unwrap().id;
    for (i, w) in params.get_mut(id).iter_mut().enumerate() {
        *w = f32::from(i / E == i % E);
    }
}

/// A router with identity weight and `bias` as its expert bias (when it has one).
fn router(settings: &MoeConfig, bias: Option<[f32; E]>) -> (Router, ParamRegistry, Buffers) {
    let mut registry = ParamRegistry::default();
    let router = Router::new(&mut registry, "router", E, settings, 0.1);
    let mut params = initialise(&registry, 0);
    identity_router(&registry, &mut params, "router");
    if let Some(bias) = bias {
        let id = registry.find("router.expert_bias").unwrap().id;
        params.get_mut(id).copy_from_slice(&bias);
    }
    (router, registry, params)
}

fn assert_close(what: &str, actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 1e-6 * expected.abs().max(1.0),
        "{what}: {actual}, expected {expected}"
    );
}

#[test]
fn weights_are_normalised_over_the_chosen_experts_and_scaled() {
    let logits = [1.0f32, -0.5, 2.0, 0.3];
    let settings = MoeConfig {
        topk_scaling_factor: Some(2.0),
        ..settings()
    };
    let (top2, _, params) = router(&settings, None);
    let (routing, _) = top2.forward(&Weights::f32(&params), &logits);
    assert_eq!(routing.experts, [2, 0]);
    let sum = s(2.0) + s(1.0);
    assert_close("weight of 2", routing.weights[0] as f64, 2.0 * s(2.0) / sum);
    assert_close("weight of 0", routing.weights[1] as f64, 2.0 * s(1.0) / sum);

    let (top1, _, params) = router(
        &MoeConfig {
            topk: 1,
            ..settings
        },
        None,
    );
    let (routing, _) = top1.forward(&Weights::f32(&params), &logits);
    assert_eq!(routing.experts, [2]);
    assert_close(
        "top-1 weight, not normalised",
        routing.weights[0] as f64,
        2.0 * s(2.0),
    );
}

#[test]
fn expert_bias_and_groups_change_the_choice_but_not_the_weights() {
    // Groups {0, 1} and {2, 3}, one group per token, two experts from it. The plain top-2 is
    // {2, 0}; the groups score s(1) + s(−0.5) ≈ 1.83 and s(2) + s(0.3) ≈ 2.38, so without bias
    // the token takes {2, 3}; the bias 0.8 on expert 1 lifts group {0, 1} to ≈ 2.63, and the
    // token takes {1, 0}.
    let logits = [1.0f32, -0.5, 2.0, 0.3];
    let settings = MoeConfig {
        num_groups: Some(2),
        group_topk: Some(1),
        expert_bias_update_rate: Some(0.01),
        ..settings()
    };
    settings.validate().unwrap();
    let (unbiased, _, params) = router(&settings, Some([0.0; E]));
    assert_eq!(
        unbiased.forward(&Weights::f32(&params), &logits).0.experts,
        [2, 3]
    );
    let (biased, _, params) = router(&settings, Some([0.0, 0.8, 0.0, 0.0]));
    let (routing, _) = biased.forward(&Weights::f32(&params), &logits);
    assert_eq!(routing.experts, [1, 0], "s(−0.5) + 0.8 ranks above s(1)");
    let sum = s(1.0) + s(-0.5);
    assert_close("weight of 1", routing.weights[0] as f64, s(-0.5) / sum);
    assert_close("weight of 0", routing.weights[1] as f64, s(1.0) / sum);
}

#[test]
fn balancing_loss_uses_scores_normalised_over_all_experts_and_the_plain_top_k() {
    // Two tokens, bias 0.8 on expert 1 and groups as above: both are routed to {1, 0}, while
    // the plain top-2 of their balancing scores `a = s / Σ s` is {2, 0}.
    let logits = [[1.0f32, -0.5, 2.0, 0.3], [0.5, -1.0, 1.5, 0.0]];
    let coeff = 0.1;
    let settings = MoeConfig {
        num_groups: Some(2),
        group_topk: Some(1),
        expert_bias_update_rate: Some(0.01),
        aux_loss_coeff: coeff as f32,
        z_loss_coeff: 0.0,
        ..settings()
    };
    let mut registry = ParamRegistry::default();
    let layer = MoeLayer::new(&mut registry, "moe", E, &settings, 0.3, 0.3);
    let mut params = initialise(&registry, 1);
    identity_router(&registry, &mut params, "moe.router");
    let bias = registry.find("moe.router.expert_bias").unwrap().id;
    params.get_mut(bias).copy_from_slice(&[0.0, 0.8, 0.0, 0.0]);
    let x: Vec<f32> = logits.iter().flatten().copied().collect();
    let (_, _, stats) = layer.forward(&Weights::f32(&params), &x);
    assert_eq!(
        stats.tokens_per_expert,
        [2, 2, 0, 0],
        "both routed to {{1, 0}}"
    );
    let loads = [2.0, 0.0, 2.0, 0.0];
    let mut p = [0.0; E];
    for row in &logits {
        let scores = row.map(|l| s(l as f64));
        let sum: f64 = scores.iter().sum();
        p.iter_mut().zip(scores).for_each(|(p, v)| *p += v / sum);
    }
    let (k, t) = (2.0, 2.0);
    let expected =
        coeff * E as f64 / (k * t * t) * p.iter().zip(loads).map(|(p, n)| p * n).sum::<f64>();
    assert!(
        (stats.losses.load_balancing - expected).abs() <= 1e-6 * expected,
        "load-balancing loss {}, expected {expected}",
        stats.losses.load_balancing
    );
}

#[test]
fn score_and_derivative_match_the_formulas_for_large_and_small_logits() {
    let score = ElementwiseScore::SqrtSoftplus;
    for x in [
        -300.0f32, -90.0, -30.0, -20.5, -20.0, -19.5, -5.0, -0.1, 0.0, 0.1, 5.0, 20.0, 90.0, 1e4,
        1e30,
    ] {
        let (value, slope) = (score.value(x), score.derivative(x));
        assert!(value.is_finite() && slope.is_finite(), "x = {x}");
        // Below f32's smallest normal number (1.2e-38) only the absolute error is meaningful.
        let close = |a: f32, e: f64| (a as f64 - e).abs() <= 1e-5 * e.abs() + 1e-38;
        assert!(
            close(value, s(x as f64)),
            "s({x}) = {value}, expected {}",
            s(x as f64)
        );
        assert!(
            close(slope, ds(x as f64)),
            "s'({x}) = {slope}, expected {}",
            ds(x as f64)
        );
    }
}

#[test]
fn extreme_logits_give_finite_weights_and_gradients() {
    let settings = MoeConfig {
        aux_loss_coeff: 0.1,
        z_loss_coeff: 0.0,
        ..settings()
    };
    let (router, registry, params) = router(&settings, None);
    let x = [
        1000.0f32, -1000.0, 80.0, -80.0, // one huge, one tiny
        -1000.0, -2000.0, -1500.0, -3000.0, // every score underflows to 0
    ];
    let (routing, saved) = router.forward(&Weights::f32(&params), &x);
    assert_eq!(
        routing.experts,
        [0, 2, 0, 1],
        "scores that all underflow to 0 tie, and ties go to the lower index"
    );
    let sum = s(1000.0) + s(80.0);
    assert_close("huge", routing.weights[0] as f64, s(1000.0) / sum);
    assert_close("large", routing.weights[1] as f64, s(80.0) / sum);
    assert_eq!(
        &routing.weights[2..],
        [0.0, 0.0],
        "scores that underflow give weight 0, not NaN"
    );
    let balance = BalanceWeights {
        segments: vec![(0..2, vec![0.3, 0.1, 0.2, 0.4])],
    };
    let losses = router.losses(&saved, &balance, 2);
    assert!(losses.load_balancing.is_finite());
    let mut grads = registry.zeros();
    let mut dx = vec![0.0; x.len()];
    router.backward(
        &Weights::f32(&params),
        &mut grads,
        saved,
        &routing,
        &x,
        &[1.0, -1.0, 0.5, 0.5],
        AuxGradient {
            loss_scale: 1.0,
            balance: &balance,
            z_tokens: 2,
        },
        &mut dx,
    );
    assert!(
        dx.iter().chain(&grads.dense).all(|v| v.is_finite()),
        "{dx:?}"
    );
}

#[test]
fn expert_bias_is_accepted_with_sqrtsoftplus_and_refused_with_softmax() {
    let overrides = |score: &str| {
        vec![
            format!("model.moe.score_function={score}"),
            "model.moe.expert_bias_update_rate=0.01".to_string(),
            "model.moe.num_groups=4".to_string(),
            "model.moe.group_topk=2".to_string(),
        ]
    };
    let config = RunConfig::from_toml("", &overrides("sqrtsoftplus")).unwrap();
    assert_eq!(config.model.moe.score_function, ScoreFunction::SqrtSoftplus);
    config.validate().unwrap();
    let err = RunConfig::from_toml("", &overrides("softmax")).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "model.moe.expert_bias_update_rate needs model.moe.score_function = \"sigmoid\" or \"sqrtsoftplus\" (got \"softmax\")"
    );
}
