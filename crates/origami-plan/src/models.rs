//! The folding paper's three models (arXiv 2504.14960, Table 1), as the issue gives their dims.

use crate::ModelShape;

/// Names of the models [`paper_model`] knows.
pub const PAPER_MODELS: [&str; 3] = ["mixtral-8x22b", "qwen2-57b-a14b", "mixtral-8x22b-g8t8"];

/// Mixtral-8x22B: hidden 6144, 56 layers, 48 heads / 8 query groups, 8 experts top-2 of FFN
/// 16384, vocabulary 32000, untied embeddings.
fn mixtral(name: &str, experts: usize, topk: usize, expert_ffn: usize) -> ModelShape {
    ModelShape {
        name: name.to_string(),
        vocab: 32000,
        hidden: 6144,
        layers: 56,
        heads: 48,
        query_groups: 8,
        head_dim: 128,
        dense_ffn: 16384,
        moe_layers: vec![true; 56],
        experts,
        topk,
        expert_ffn,
        shared_expert_ffn: 0,
        shared_expert_gate: false,
        qkv_bias: false,
        tied_embeddings: false,
    }
}

/// One of [`PAPER_MODELS`] by name.
pub fn paper_model(name: &str) -> Option<ModelShape> {
    match name {
        "mixtral-8x22b" => Some(mixtral(name, 8, 2, 16384)),
        // As Mixtral-8x22B with 64 experts top-8 of FFN 2048.
        "mixtral-8x22b-g8t8" => Some(mixtral(name, 64, 8, 2048)),
        // Qwen2-57B-A14B: hidden 3584, 28 layers, 28 heads / 4 groups, 64 experts top-8 of FFN
        // 2560, a gated shared expert of FFN 20480, vocabulary 151936, q/k/v biases.
        "qwen2-57b-a14b" => Some(ModelShape {
            name: name.to_string(),
            vocab: 151936,
            hidden: 3584,
            layers: 28,
            heads: 28,
            query_groups: 4,
            head_dim: 128,
            dense_ffn: 18944,
            moe_layers: vec![true; 28],
            experts: 64,
            topk: 8,
            expert_ffn: 2560,
            shared_expert_ffn: 20480,
            shared_expert_gate: true,
            qkv_bias: true,
            tied_embeddings: false,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        // Mixtral-8x22B has 141 B parameters (39 B active); Qwen2-57B-A14B 57 B (14 B active).
        let mixtral = paper_model("mixtral-8x22b").unwrap();
        assert!((mixtral.total_params() / 1e9 - 141.0).abs() < 1.0);
        let qwen = paper_model("qwen2-57b-a14b").unwrap();
        assert!((qwen.total_params() / 1e9 - 57.4).abs() < 0.5);
        for name in PAPER_MODELS {
            paper_model(name).unwrap().validate().unwrap();
        }
        assert!(paper_model("gpt-5").is_none());
    }
}
