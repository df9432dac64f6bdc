//! Token dropping: the capacity formula, no expert over its capacity, the two drop policies
//! keeping the slots they promise, padding to exactly the capacity, and the MoE layer's output
//! for dropped tokens.

use origami::compute::Weights;
use origami::layers::moe::capacity::{expert_capacity, kept_slots};
use origami::layers::moe::config::{DropPolicy, MoeConfig};
use origami::layers::moe::permute::{Permutation, PADDING};
use origami::layers::moe::router::Routing;
use origami::layers::moe::MoeLayer;
use origami::params::init::initialise;
use origami::params::ParamRegistry;
use origami_kernels::testing::random_vec;

/// Eight tokens, top-2 over three experts: every token picks expert 0 first, then expert 1 or 2;
/// weights fall with the token index for expert 0 except token 5, which has the largest.
fn routing() -> Routing {
    let tokens = 8;
    let mut experts = Vec::new();
    let mut weights = Vec::new();
    for t in 0..tokens {
        experts.extend([0, 1 + (t % 2) as u32]);
        let w0 = if t == 5 { 0.99 } else { 0.9 - 0.05 * t as f32 };
        weights.extend([w0, 1.0 - w0]);
    }
    let mut tokens_per_expert = vec![0; 3];
    experts
        .iter()
        .for_each(|&e| tokens_per_expert[e as usize] += 1);
    Routing {
        experts,
        weights,
        tokens_per_expert,
        topk: 2,
    }
}

#[test]
fn capacity_is_the_rounded_up_share_times_the_factor() {
    assert_eq!(expert_capacity(10, 2, 4, 1.0), 5);
    assert_eq!(expert_capacity(10, 2, 4, 1.25), 7);
    assert_eq!(expert_capacity(8, 2, 3, 0.5), 3);
}

#[test]
fn position_policy_keeps_the_earliest_tokens() {
    let r = routing();
    let kept = kept_slots(&r, 3, 3, DropPolicy::Position);
    let expert0: Vec<usize> = (0..8).filter(|&t| kept[2 * t]).collect();
    assert_eq!(expert0, [0, 1, 2]);
    let expert1: Vec<usize> = (0..8).filter(|&t| t % 2 == 0 && kept[2 * t + 1]).collect();
    assert_eq!(
        expert1,
        [0, 2, 4],
        "expert 1 gets tokens 0,2,4,6 and keeps the first three"
    );
}

#[test]
fn probs_policy_keeps_the_highest_weights() {
    let r = routing();
    let kept = kept_slots(&r, 3, 3, DropPolicy::Probs);
    let expert0: Vec<usize> = (0..8).filter(|&t| kept[2 * t]).collect();
    assert_eq!(
        expert0,
        [0, 1, 5],
        "weights 0.9, 0.85 and token 5's 0.99 are the three highest"
    );
}

#[test]
fn no_expert_exceeds_capacity_and_padding_fills_it_exactly() {
    let r = routing();
    for policy in [DropPolicy::Probs, DropPolicy::Position] {
        let kept = kept_slots(&r, 3, 3, policy);
        let perm = Permutation::with_capacity(&r, 3, &kept, None);
        assert!(perm.offsets.windows(2).all(|w| w[1] - w[0] <= 3));
        assert_eq!(perm.dropped(), 16 - kept.iter().filter(|&&k| k).count());
        let padded = Permutation::with_capacity(&r, 3, &kept, Some(3));
        assert_eq!(padded.offsets, [0, 3, 6, 9]);
        let pad_rows = padded
            .token_of_row
            .iter()
            .filter(|&&t| t == PADDING)
            .count();
        assert_eq!(pad_rows, 9 - kept.iter().filter(|&&k| k).count());
    }
}

#[test]
fn a_token_whose_every_slot_is_dropped_outputs_zero() {
    let settings = MoeConfig {
        num_experts: 4,
        ffn_hidden_size: 12,
        topk: 1,
        capacity_factor: Some(0.25),
        drop_policy: DropPolicy::Position,
        ..MoeConfig::default()
    };
    let mut registry = ParamRegistry::default();
    let layer = MoeLayer::new(&mut registry, "moe", 16, &settings, 0.4, 0.4);
    let params = initialise(&registry, 3);
    let x = random_vec(32 * 16, 4);
    let (y, _, stats) = layer.forward(&Weights::f32(&params), &x);
    assert!(
        stats.dropped > 0,
        "capacity 2 of 32 tokens over 4 experts drops tokens"
    );
    let zero_rows = y
        .chunks(16)
        .filter(|row| row.iter().all(|&v| v == 0.0))
        .count();
    assert_eq!(
        zero_rows, stats.dropped,
        "with top-1 routing each dropped token outputs zero"
    );
}
