//! The key/value-cache decode path computes exactly what the full forward computes.

use origami::generate::{generate, SamplingSettings};
use origami::layers::moe::config::MoeConfig;
use origami::model::config::ModelConfig;
use origami::model::gpt::{DecodeState, GptModel, MicroBatch, SequenceKeys};
use origami_kernels::testing::assert_close;

fn model() -> GptModel {
    let mut config = ModelConfig::preset("tiny").unwrap();
    config.max_seq_len = 80;
    config.qkv_bias = true;
    config.init_std = 0.2;
    config.moe = MoeConfig {
        shared_expert_ffn_hidden_size: 32,
        shared_expert_gate: true,
        layer_pattern: Some(vec![0, 1, 1, 1]),
        ..config.moe
    };
    GptModel::new(config).unwrap()
}

#[test]
fn cached_decoding_matches_full_forward_logits() {
    let model = model();
    let mut params = model.init_params(3);
    for info in model.registry().params() {
        if info.name.ends_with("qkv.bias") {
            params
                .get_mut(info.id)
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = (i % 7) as f32 * 0.05);
        }
    }
    let tokens: Vec<u32> = (0..70).map(|i| (i * 37 + 11) % 256).collect();
    let full = model.logits(
        &params,
        &MicroBatch {
            tokens: tokens.clone(),
            targets: vec![0; 70],
            batch: 1,
            seq: 70,
            keys: SequenceKeys::default(),
        },
    );
    let mut state = DecodeState::default();
    for (pos, &t) in tokens.iter().enumerate() {
        let step = model.decode_step(&params, &mut state, t);
        assert_close(
            &step,
            &full[pos * 256..(pos + 1) * 256],
            1e-4,
            &format!("logits at position {pos}"),
        );
    }
}

#[test]
fn greedy_generation_is_deterministic_and_respects_the_length_limit() {
    let model = model();
    let params = model.init_params(4);
    let greedy = SamplingSettings {
        max_tokens: 20,
        temperature: 0.0,
        top_k: 0,
        seed: 1,
    };
    let a = generate(&model, &params, &[1, 2, 3], &greedy, None);
    assert_eq!(a, generate(&model, &params, &[1, 2, 3], &greedy, None));
    assert_eq!(a.len(), 20);
    let long = SamplingSettings {
        max_tokens: 500,
        temperature: 0.8,
        top_k: 5,
        seed: 9,
    };
    let b = generate(&model, &params, &[1, 2, 3], &long, None);
    assert_eq!(
        b.len(),
        80 - 3 + 1,
        "stops at max_seq_len (the last token needs no cache)"
    );
}
