//! Reads a HuggingFace `config.json` of a Mixtral or Qwen2-MoE model into a [`ModelConfig`].
//!
//! Mixtral routes with softmax over all experts, top-k, then renormalises: that is origami's
//! top-k-then-softmax. Qwen2-MoE renormalises only with `norm_topk_prob`; without it the weights
//! are the plain softmax probabilities (`pre_softmax`). Qwen2-MoE layer `l` is MoE when it is not
//! in `mlp_only_layers` and `(l + 1) % decoder_sparse_step == 0`.

use super::HfError;
use crate::layers::moe::config::{MoeConfig, ScoreFunction};
use crate::model::config::ModelConfig;
use serde_json::Value;

/// The HF architectures origami reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HfModelType {
    /// `model_type = "mixtral"`.
    Mixtral,
    /// `model_type = "qwen2_moe"`.
    Qwen2Moe,
}

fn field<'a>(json: &'a Value, key: &str) -> Option<&'a Value> {
    json.get(key).filter(|v| !v.is_null())
}

fn usize_field(json: &Value, key: &str) -> Result<usize, HfError> {
    field(json, key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| HfError::Config(format!("missing or non-integer field {key:?}")))
}

fn usize_or(json: &Value, key: &str, default: usize) -> Result<usize, HfError> {
    if field(json, key).is_some() {
        usize_field(json, key)
    } else {
        Ok(default)
    }
}

fn f64_or(json: &Value, key: &str, default: f64) -> f64 {
    field(json, key).and_then(Value::as_f64).unwrap_or(default)
}

fn bool_or(json: &Value, key: &str, default: bool) -> bool {
    field(json, key).and_then(Value::as_bool).unwrap_or(default)
}

/// RoPE base: `rope_theta` at the top level, or inside `rope_parameters` (transformers ≥ 5).
fn rope_theta(json: &Value) -> f64 {
    field(json, "rope_theta")
        .and_then(Value::as_f64)
        .or_else(|| {
            field(json, "rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(10000.0)
}

/// Rejects attention variants origami does not implement, rather than computing something else:
/// sliding windows shorter than the context, and RoPE scaling other than the default.
fn check_supported_attention(json: &Value) -> Result<(), HfError> {
    let max_positions = field(json, "max_position_embeddings")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let window = field(json, "sliding_window")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if bool_or(json, "use_sliding_window", window > 0) && window > 0 && window < max_positions {
        return Err(HfError::UnsupportedModel(format!(
            "sliding-window attention (sliding_window = {window}) is not supported"
        )));
    }
    let rope_type = field(json, "rope_parameters")
        .or_else(|| field(json, "rope_scaling"))
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if rope_type != "default" {
        return Err(HfError::UnsupportedModel(format!(
            "RoPE scaling {rope_type:?} is not supported (only the default)"
        )));
    }
    Ok(())
}

/// Translates a parsed `config.json`.
pub fn model_config_from_hf(json: &Value) -> Result<ModelConfig, HfError> {
    let model_type = match field(json, "model_type").and_then(Value::as_str) {
        Some("mixtral") => HfModelType::Mixtral,
        Some("qwen2_moe") => HfModelType::Qwen2Moe,
        other => {
            return Err(HfError::UnsupportedModel(format!(
                "{other:?} (supported: mixtral, qwen2_moe)"
            )))
        }
    };
    check_supported_attention(json)?;
    let layers = usize_field(json, "num_hidden_layers")?;
    let heads = usize_field(json, "num_attention_heads")?;
    let hidden = usize_field(json, "hidden_size")?;
    let base = ModelConfig {
        vocab_size: usize_field(json, "vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: usize_or(json, "num_key_value_heads", heads)?,
        head_dim: field(json, "head_dim")
            .and_then(Value::as_u64)
            .map(|v| v as usize),
        ffn_hidden_size: usize_field(json, "intermediate_size")?,
        max_seq_len: usize_or(json, "max_position_embeddings", 4096)?,
        rope_theta: rope_theta(json),
        norm_eps: f64_or(json, "rms_norm_eps", 1e-6) as f32,
        qkv_bias: false,
        tie_embeddings: bool_or(json, "tie_word_embeddings", false),
        init_std: f64_or(json, "initializer_range", 0.02) as f32,
        moe: MoeConfig::default(),
    };
    let config = match model_type {
        HfModelType::Mixtral => ModelConfig {
            moe: MoeConfig {
                num_experts: usize_field(json, "num_local_experts")?,
                ffn_hidden_size: base.ffn_hidden_size,
                topk: usize_field(json, "num_experts_per_tok")?,
                layer_freq: 1,
                layer_pattern: None,
                score_function: ScoreFunction::Softmax,
                pre_softmax: false,
                topk_scaling_factor: None,
                aux_loss_coeff: f64_or(json, "router_aux_loss_coef", 0.0) as f32,
                z_loss_coeff: 0.0,
                shared_expert_ffn_hidden_size: 0,
                shared_expert_gate: false,
                ..MoeConfig::default()
            },
            ..base
        },
        HfModelType::Qwen2Moe => {
            let experts = usize_field(json, "num_experts")?;
            let step = usize_or(json, "decoder_sparse_step", 1)?.max(1);
            let dense_layers: Vec<usize> = field(json, "mlp_only_layers")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|v| v as usize)
                        .collect()
                })
                .unwrap_or_default();
            let pattern = (0..layers)
                .map(|l| u8::from(experts > 0 && !dense_layers.contains(&l) && (l + 1) % step == 0))
                .collect();
            let shared = usize_or(json, "shared_expert_intermediate_size", 0)?;
            ModelConfig {
                qkv_bias: bool_or(json, "qkv_bias", true),
                moe: MoeConfig {
                    num_experts: experts,
                    ffn_hidden_size: usize_field(json, "moe_intermediate_size")?,
                    topk: usize_field(json, "num_experts_per_tok")?,
                    layer_freq: 1,
                    layer_pattern: Some(pattern),
                    score_function: ScoreFunction::Softmax,
                    pre_softmax: !bool_or(json, "norm_topk_prob", false),
                    topk_scaling_factor: None,
                    aux_loss_coeff: f64_or(json, "router_aux_loss_coef", 0.0) as f32,
                    z_loss_coeff: 0.0,
                    shared_expert_ffn_hidden_size: shared,
                    shared_expert_gate: shared > 0,
                    ..MoeConfig::default()
                },
                ..base
            }
        }
    };
    config
        .validate()
        .map_err(|e| HfError::Config(e.to_string()))?;
    Ok(config)
}
