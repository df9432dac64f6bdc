//! Group-limited routing chooses each token's experts inside its best groups, scored by the
//! sum of each group's top `topk / group_topk` selection scores.

use origami::compute::Weights;
use origami::layers::moe::config::{MoeConfig, ScoreFunction};
use origami::layers::moe::router::Router;
use origami::params::init::initialise;
use origami::params::ParamRegistry;

/// Chosen experts of one token whose logits are `logits` (router weight = identity).
fn chosen(settings: &MoeConfig, logits: &[f32]) -> Vec<u32> {
    let mut registry = ParamRegistry::default();
    let router = Router::new(&mut registry, "router", logits.len(), settings, 0.1);
    let mut params = initialise(&registry, 0);
    let id = registry.find("router.weight").unwrap().id;
    let n = logits.len();
    params
        .get_mut(id)
        .iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w = f32::from(i / n == i % n));
    let (routing, _) = router.forward(&Weights::f32(&params), logits);
    let mut experts = routing.experts;
    experts.sort();
    experts
}

#[test]
fn groups_restrict_the_choice_to_the_best_group() {
    let plain = MoeConfig {
        num_experts: 4,
        topk: 2,
        ..MoeConfig::default()
    };
    let logits = [3.0, -1.0, 2.5, 2.4];
    assert_eq!(chosen(&plain, &logits), [0, 2]);
    let grouped = MoeConfig {
        num_groups: Some(2),
        group_topk: Some(1),
        ..plain.clone()
    };
    assert_eq!(
        chosen(&grouped, &logits),
        [2, 3],
        "group {{2,3}} scores 4.9 against 2.0"
    );
    let both_groups = MoeConfig {
        num_groups: Some(2),
        group_topk: Some(2),
        ..plain
    };
    assert_eq!(
        chosen(&both_groups, &logits),
        [0, 2],
        "with every group allowed nothing changes"
    );
}

#[test]
fn group_scores_use_the_score_function() {
    // Logits [10, 0, 4, 4], groups {0,1} and {2,3}, two experts from one group. As logits the
    // groups score 10 and 8; as probabilities about 0.995 and 0.005; as sigmoids σ(10)+σ(0) ≈ 1.5
    // and 2σ(4) ≈ 1.96 — so only the sigmoid router prefers the second group.
    let logits = [10.0, 0.0, 4.0, 4.0];
    let softmax = MoeConfig {
        num_experts: 4,
        topk: 2,
        num_groups: Some(2),
        group_topk: Some(1),
        ..MoeConfig::default()
    };
    assert_eq!(chosen(&softmax, &logits), [0, 1]);
    let pre_softmax = MoeConfig {
        pre_softmax: true,
        ..softmax.clone()
    };
    assert_eq!(chosen(&pre_softmax, &logits), [0, 1]);
    let sigmoid = MoeConfig {
        score_function: ScoreFunction::Sigmoid,
        ..softmax
    };
    assert_eq!(chosen(&sigmoid, &logits), [2, 3]);
}
