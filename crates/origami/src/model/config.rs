//! Model hyper-parameters: the `[model]` section of a run config, presets, and validation.

use serde::{Deserialize, Serialize};

use crate::layers::moe::config::{MoeConfig, MoeConfigError};

/// Architecture of a GPT-style MoE transformer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model (residual stream) width.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (query groups).
    pub num_kv_heads: usize,
    /// Dim of one head; `hidden_size / num_heads` when absent.
    pub head_dim: Option<usize>,
    /// Hidden size of the dense SwiGLU MLP (dense layers only).
    pub ffn_hidden_size: usize,
    /// Longest sequence the position table covers.
    pub max_seq_len: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// Biases on the q, k, v projections (Qwen2).
    pub qkv_bias: bool,
    /// Output layer shares the embedding table.
    pub tie_embeddings: bool,
    /// Standard deviation of the normal initialisation.
    pub init_std: f32,
    /// Mixture-of-Experts settings.
    pub moe: MoeConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig::preset("tiny").expect("tiny preset exists")
    }
}

/// A model dimension that cannot work, naming the field and the value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelConfigError {
    /// The all-to-all context-parallel attention splits each tensor-parallel rank's heads and
    /// query groups over cp.
    #[error("cp_comm_type = \"a2a\" splits heads over parallel.cp = {cp}: each tensor-parallel rank's {heads} query heads and {kv_heads} query groups must be divisible by it (or use cp_comm_type = \"p2p\")")]
    ContextHeads {
        /// Query heads per tensor-parallel rank.
        heads: usize,
        /// Query groups per tensor-parallel rank.
        kv_heads: usize,
        /// Context-parallel size.
        cp: usize,
    },
    /// A size that must be positive is zero.
    #[error("model.{field} must be positive, got 0")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// `num_heads` is not a multiple of `num_kv_heads`.
    #[error("model.num_heads = {heads} must be divisible by model.num_kv_heads = {kv_heads}")]
    HeadsNotDivisible {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
    },
    /// `head_dim` is odd, so RoPE cannot pair its dims.
    #[error("model.head_dim = {0} must be even (RoPE rotates pairs of dims)")]
    OddHeadDim(usize),
    /// `hidden_size` is not `num_heads · head_dim` and no explicit head_dim was given.
    #[error("model.hidden_size = {hidden} is not divisible by model.num_heads = {heads}; set model.head_dim")]
    HiddenNotDivisible {
        /// Hidden size.
        hidden: usize,
        /// Query heads.
        heads: usize,
    },
    /// The layer pattern does not have one entry per layer, or holds values other than 0/1.
    #[error("model.moe.layer_pattern has {len} entries (values 0/1), expected model.num_layers = {layers}")]
    BadPattern {
        /// Entries given.
        len: usize,
        /// Layers.
        layers: usize,
    },
    /// Layers that do not split over the pipeline's stages and chunks.
    #[error(transparent)]
    StageSplit(#[from] origami_schedule::SplitError),
    /// MoE settings that cannot work.
    #[error(transparent)]
    Moe(#[from] MoeConfigError),
    /// Expert sizes that the expert-parallel sizes do not divide.
    #[error(transparent)]
    Sharding(#[from] crate::layers::moe::parallel::ShardingError),
    /// Unknown preset name.
    #[error("unknown model preset {0:?} (known: tiny, small, medium)")]
    UnknownPreset(String),
}

impl ModelConfig {
    /// The presets shared with the PyTorch peer benchmark (`shared/peers/README.md`).
    pub fn preset(name: &str) -> Result<Self, ModelConfigError> {
        // (vocab, hidden, layers, heads, kv heads, expert ffn, experts, topk, seq)
        let (vocab, hidden, layers, heads, kv, ffn, experts, topk, seq) = match name {
            "tiny" => (256, 128, 4, 4, 2, 256, 8, 2, 256),
            "small" => (8192, 512, 8, 8, 4, 1024, 16, 2, 1024),
            "medium" => (32000, 1024, 8, 16, 8, 2048, 8, 2, 1024),
            other => return Err(ModelConfigError::UnknownPreset(other.to_string())),
        };
        Ok(ModelConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: None,
            ffn_hidden_size: ffn,
            max_seq_len: seq,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            qkv_bias: false,
            tie_embeddings: false,
            init_std: 0.02,
            moe: MoeConfig {
                num_experts: experts,
                ffn_hidden_size: ffn,
                topk,
                ..MoeConfig::default()
            },
        })
    }

    /// Dim of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_heads.max(1))
    }

    /// Whether layer `layer` has an MoE block (otherwise a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        if self.moe.num_experts == 0 {
            return false;
        }
        match &self.moe.layer_pattern {
            Some(pattern) => pattern[layer] == 1,
            None => layer.is_multiple_of(self.moe.layer_freq.max(1)),
        }
    }

    /// Checks every constraint between the dimensions.
    pub fn validate(&self) -> Result<(), ModelConfigError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("max_seq_len", self.max_seq_len),
        ] {
            if value == 0 {
                return Err(ModelConfigError::Zero { field });
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ModelConfigError::HeadsNotDivisible {
                heads: self.num_heads,
                kv_heads: self.num_kv_heads,
            });
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(ModelConfigError::HiddenNotDivisible {
                hidden: self.hidden_size,
                heads: self.num_heads,
            });
        }
        if self.head_dim() == 0 {
            return Err(ModelConfigError::Zero { field: "head_dim" });
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ModelConfigError::OddHeadDim(self.head_dim()));
        }
        if let Some(pattern) = &self.moe.layer_pattern {
            if pattern.len() != self.num_layers || pattern.iter().any(|&v| v > 1) {
                return Err(ModelConfigError::BadPattern {
                    len: pattern.len(),
                    layers: self.num_layers,
                });
            }
        }
        let any_dense = (0..self.num_layers).any(|l| !self.is_moe_layer(l));
        if any_dense && self.ffn_hidden_size == 0 {
            return Err(ModelConfigError::Zero {
                field: "ffn_hidden_size",
            });
        }
        self.moe.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for name in ["tiny", "small", "medium"] {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn invalid_dimensions_name_the_field_and_value() {
        let base = ModelConfig::preset("tiny").unwrap();
        let mut c = base.clone();
        c.num_kv_heads = 3;
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("num_heads = 4") && msg.contains("num_kv_heads = 3"),
            "{msg}"
        );
        let mut c = base.clone();
        c.moe.topk = 9;
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("moe.topk = 9") && msg.contains("num_experts = 8"),
            "{msg}"
        );
        let mut c = base.clone();
        c.hidden_size = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("model.hidden_size"));
        let mut c = base.clone();
        c.moe.layer_pattern = Some(vec![0, 1]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("layer_pattern has 2"));
        let mut c = base;
        c.head_dim = Some(15);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("head_dim = 15"));
        assert!(ModelConfig::preset("huge").is_err());
    }

    #[test]
    fn group_limited_settings_that_do_not_fit_are_errors() {
        let base = ModelConfig::preset("tiny").unwrap();
        let with = |groups, used, topk| {
            let mut c = base.clone();
            (c.moe.num_groups, c.moe.group_topk, c.moe.topk) = (groups, used, topk);
            c.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(with(Some(3), Some(1), 2)
            .contains("num_experts = 8 is not divisible by model.moe.num_groups = 3"));
        assert!(with(Some(4), Some(5), 2).contains("group_topk = 5"));
        assert!(with(Some(4), Some(2), 3).contains("topk = 3 is not divisible"));
        assert!(with(Some(4), None, 2).contains("set together"));
        assert!(with(Some(4), Some(1), 4).contains("exceeds the 2 experts of a group"));
        assert_eq!(with(Some(4), Some(2), 2), "");
    }

    #[test]
    fn layer_pattern_overrides_frequency() {
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.moe.layer_freq = 2;
        assert_eq!(
            (0..4).map(|l| c.is_moe_layer(l)).collect::<Vec<_>>(),
            [true, false, true, false]
        );
        c.moe.layer_pattern = Some(vec![0, 1, 1, 1]);
        assert_eq!(
            (0..4).map(|l| c.is_moe_layer(l)).collect::<Vec<_>>(),
            [false, true, true, true]
        );
    }
}
