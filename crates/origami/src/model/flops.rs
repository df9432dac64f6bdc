//! Model FLOPs per trained token (DESIGN.md §5), the numerator of MFU.
//!
//! Training = forward + backward = 3 × forward. Per layer: attention projections
//! `12·h²·(1 + n_kv/n_h)`, causal attention scores `12·h·s/2`; per MoE layer `12·h·g·(k·f_e + f_s)`,
//! per dense layer `12·h·g·f_d` (g = 1.5 for SwiGLU); plus the output layer `6·h·V`.
//! Only the routed top-k experts count.

use super::config::ModelConfig;

/// GLU factor of SwiGLU.
const GLU_FACTOR: f64 = 1.5;

/// Training FLOPs per token at sequence length `seq`.
pub fn training_flops_per_token(config: &ModelConfig, seq: usize) -> f64 {
    let h = config.hidden_size as f64;
    let kv_ratio = config.num_kv_heads as f64 / config.num_heads as f64;
    let attention = 12.0 * h * h * (1.0 + kv_ratio) + 12.0 * h * seq as f64 / 2.0;
    let mlp: f64 = (0..config.num_layers)
        .map(|l| {
            if config.is_moe_layer(l) {
                let routed = config.moe.topk as f64 * config.moe.ffn_hidden_size as f64;
                12.0 * h * GLU_FACTOR * (routed + config.moe.shared_expert_ffn_hidden_size as f64)
            } else {
                12.0 * h * GLU_FACTOR * config.ffn_hidden_size as f64
            }
        })
        .sum();
    config.num_layers as f64 * attention + mlp + 6.0 * h * config.vocab_size as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_preset_by_hand() {
        let c = ModelConfig::preset("small").unwrap();
        // h=512, kv/h = 4/8, s=1024, k·f_e = 2·1024, V=8192, 8 MoE layers.
        let per_layer =
            12.0 * 512.0 * 512.0 * 1.5 + 12.0 * 512.0 * 512.0 + 12.0 * 512.0 * 1.5 * 2048.0;
        let expected = 8.0 * per_layer + 6.0 * 512.0 * 8192.0;
        assert_eq!(training_flops_per_token(&c, 1024), expected);
    }
}
