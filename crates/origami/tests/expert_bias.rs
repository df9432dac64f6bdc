//! Aux-loss-free balancing: the expert bias changes which experts are chosen but not their
//! weights, moves by `rate · sign(mean − load)` once per global batch, is never touched by the
//! optimizer, and is refused with a softmax router.

use origami::compute::Weights;
use origami::layers::moe::config::{MoeConfig, ScoreFunction};
use origami::layers::moe::router::Router;
use origami::model::config::ModelConfig;
use origami::model::gpt::GptModel;
use origami::optim::adamw::{AdamW, AdamWConfig};
use origami::params::init::initialise;
use origami::params::ParamRegistry;

fn sigmoid_settings() -> MoeConfig {
    MoeConfig {
        num_experts: 4,
        topk: 1,
        score_function: ScoreFunction::Sigmoid,
        expert_bias_update_rate: Some(0.01),
        ..MoeConfig::default()
    }
}

#[test]
fn bias_changes_the_choice_but_not_the_weight() {
    let settings = sigmoid_settings();
    let mut registry = ParamRegistry::default();
    let router = Router::new(&mut registry, "router", 4, &settings, 0.1);
    let mut params = initialise(&registry, 0);
    let weight = registry.find("router.weight").unwrap().id;
    params
        .get_mut(weight)
        .iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w = f32::from(i / 4 == i % 4));
    let logits = [2.0, 1.0, 0.0, 0.0];
    assert_eq!(
        router.forward(&Weights::f32(&params), &logits).0.experts,
        [0],
        "no bias yet: the largest logit wins"
    );
    let bias = registry
        .find("router.expert_bias")
        .expect("registered as a buffer");
    assert!(!bias.trainable);
    params
        .get_mut(bias.id)
        .copy_from_slice(&[0.0, 0.5, 0.0, 0.0]);
    let (routing, _) = router.forward(&Weights::f32(&params), &logits);
    assert_eq!(routing.experts, [1], "σ(1) + 0.5 beats σ(2)");
    let unbiased = 1.0 / (1.0 + (-1.0f32).exp());
    assert!(
        (routing.weights[0] - unbiased).abs() < 1e-6,
        "the weight is σ(1), without the bias"
    );
}

fn model() -> GptModel {
    let mut config = ModelConfig::preset("tiny").unwrap();
    config.moe = MoeConfig {
        num_experts: 4,
        topk: 1,
        ..sigmoid_settings()
    };
    GptModel::new(config).unwrap()
}

#[test]
fn update_follows_the_sign_of_the_load_gap_and_the_optimizer_leaves_it_alone() {
    let model = model();
    let mut params = model.init_params(1);
    let bias = model
        .registry()
        .find("layers.0.moe.router.expert_bias")
        .unwrap()
        .id;
    let loads = vec![vec![5, 1, 3, 3]; 4];
    model.update_expert_bias(&mut params, &loads);
    assert_eq!(params.get(bias), [-0.01, 0.01, 0.0, 0.0]);

    let before = params.clone();
    let mut grads = model.registry().zeros();
    grads.dense.fill(0.5);
    grads.expert.fill(0.5);
    let mut optimizer = AdamW::new(model.registry(), AdamWConfig::default());
    optimizer.step(model.registry(), &mut params, &mut grads, 1e-2);
    assert_eq!(
        params.get(bias),
        before.get(bias),
        "the bias is a buffer, not trained"
    );
    assert_ne!(
        params.dense, before.dense,
        "the trained parameters did move"
    );
}

#[test]
fn a_softmax_router_with_expert_bias_is_an_error() {
    let mut config = ModelConfig::preset("tiny").unwrap();
    config.moe.expert_bias_update_rate = Some(0.01);
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.contains("expert_bias_update_rate needs model.moe.score_function = \"sigmoid\""),
        "{err}"
    );
}
