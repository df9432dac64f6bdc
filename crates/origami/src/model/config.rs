//! Model hyper-parameters: the `[model]` section of a run config, presets, and validation.

use serde::{Deserialize, Serialize};

/// How router logits become expert scores (DESIGN.md §1, "Router").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreFunction {
    /// Softmax: over the chosen k logits, or over all experts before top-k with `pre_softmax`.
    Softmax,
    /// Sigmoid of each logit, normalised over the chosen k.
    Sigmoid,
}

/// Mixture-of-Experts settings of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Hidden size of one routed expert's SwiGLU.
    pub ffn_hidden_size: usize,
    /// Experts each token is sent to.
    pub topk: usize,
    /// Every `layer_freq`-th layer (0, N, 2N, …) is an MoE layer; the others are dense.
    pub layer_freq: usize,
    /// Explicit per-layer pattern (1 = MoE, 0 = dense), overriding `layer_freq`;
    /// e.g. `[0, 1, 1, 1]` for a first-layer-dense model.
    pub layer_pattern: Option<Vec<u8>>,
    /// Score function of the router.
    pub score_function: ScoreFunction,
    /// Softmax over all experts before top-k (weights not renormalised), as Qwen2-MoE with
    /// `norm_topk_prob = false`; otherwise top-k then softmax over the k (Mixtral).
    pub pre_softmax: bool,
    /// Optional factor applied to the routing weights.
    pub topk_scaling_factor: Option<f32>,
    /// Load-balancing loss coefficient (0 disables).
    pub aux_loss_coeff: f32,
    /// Router z-loss coefficient (0 disables).
    pub z_loss_coeff: f32,
    /// Hidden size of the shared expert (0: none).
    pub shared_expert_ffn_hidden_size: usize,
    /// Whether the shared expert's output is scaled by `sigmoid(x·w_gate)` (Qwen2-MoE).
    pub shared_expert_gate: bool,
    /// Aux-loss-free balancing: a per-expert bias added to the sigmoid scores for the choice of
    /// experts only (not the weights), updated once per global batch by
    /// `bias += rate · sign(mean(load) − load)`. Absent: no bias. Needs `score_function = "sigmoid"`.
    pub expert_bias_update_rate: Option<f32>,
    /// Group-limited routing: experts form this many equal groups, and each token's top-k is
    /// taken inside its best `group_topk` groups (DeepSeek-style). Absent: no groups.
    pub num_groups: Option<usize>,
    /// Groups each token may use (with `num_groups`).
    pub group_topk: Option<usize>,
    /// Token dropping: each expert takes at most `ceil(tokens·topk / num_experts · factor)` of a
    /// micro-batch's tokens (decided on local tokens). Absent: dropless.
    pub capacity_factor: Option<f32>,
    /// Which tokens an over-full expert keeps.
    pub drop_policy: DropPolicy,
    /// With dropping, pad every expert to exactly its capacity (fixed splits).
    pub pad_to_capacity: bool,
    /// With dropping, the smallest capacity an expert gets, whatever the formula gives.
    pub min_capacity: usize,
    /// Over which tokens the load-balancing loss counts expert loads.
    pub aux_loss_scope: AuxLossScope,
    /// How tokens travel to the ranks that own their experts.
    pub dispatcher: DispatcherKind,
}

/// The tokens over which the load-balancing loss counts expert loads (DESIGN.md §1, "Router").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuxLossScope {
    /// The micro-batch: loads summed over the ranks that share its sequences (tp-cp).
    MicroBatch,
    /// Each sequence on its own, the losses averaged over the micro-batch's sequences.
    Sequence,
    /// The global batch: loads summed over tp-dp-cp and over the micro-batches of the step so
    /// far (a running count that is exact at the step's last micro-batch).
    GlobalBatch,
}

/// The token dispatcher of MoE layers across expert-parallel ranks (DESIGN.md §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DispatcherKind {
    /// Permute by destination and all-to-all-v over ep (then all-gather-v over etp).
    Alltoall,
    /// All-gather every token over tp-ep; each rank computes its experts, then reduce-scatter.
    Allgather,
}

/// Which tokens an expert over its capacity keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DropPolicy {
    /// The tokens with the highest routing weights (ties: the earlier token).
    Probs,
    /// The earliest tokens.
    Position,
}

impl Default for MoeConfig {
    fn default() -> Self {
        MoeConfig {
            num_experts: 8,
            ffn_hidden_size: 256,
            topk: 2,
            layer_freq: 1,
            layer_pattern: None,
            score_function: ScoreFunction::Softmax,
            pre_softmax: false,
            topk_scaling_factor: None,
            aux_loss_coeff: 1e-2,
            z_loss_coeff: 1e-3,
            shared_expert_ffn_hidden_size: 0,
            shared_expert_gate: false,
            expert_bias_update_rate: None,
            num_groups: None,
            group_topk: None,
            capacity_factor: None,
            drop_policy: DropPolicy::Probs,
            pad_to_capacity: false,
            min_capacity: 0,
            aux_loss_scope: AuxLossScope::MicroBatch,
            dispatcher: DispatcherKind::Alltoall,
        }
    }
}

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
    /// More experts per token than experts.
    #[error("model.moe.topk = {topk} exceeds model.moe.num_experts = {experts}")]
    TopkTooLarge {
        /// Chosen experts per token.
        topk: usize,
        /// Experts.
        experts: usize,
    },
    /// The layer pattern does not have one entry per layer, or holds values other than 0/1.
    #[error("model.moe.layer_pattern has {len} entries (values 0/1), expected model.num_layers = {layers}")]
    BadPattern {
        /// Entries given.
        len: usize,
        /// Layers.
        layers: usize,
    },
    /// Expert bias asked for with a score function it does not apply to.
    #[error("model.moe.expert_bias_update_rate needs model.moe.score_function = \"sigmoid\" (got \"softmax\")")]
    ExpertBiasNeedsSigmoid,
    /// Group-limited routing settings that do not fit together.
    #[error("group-limited routing: {0}")]
    BadGroups(String),
    /// A capacity factor that is not a positive number.
    #[error("model.moe.capacity_factor = {0} must be positive")]
    BadCapacityFactor(f32),
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

    fn validate_groups(&self) -> Result<(), ModelConfigError> {
        let m = &self.moe;
        let bad = |s: String| Err(ModelConfigError::BadGroups(s));
        match (m.num_groups, m.group_topk) {
            (None, None) => Ok(()),
            (Some(groups), Some(used)) => {
                if groups == 0 || !m.num_experts.is_multiple_of(groups) {
                    return bad(format!("model.moe.num_experts = {} is not divisible by model.moe.num_groups = {groups}", m.num_experts));
                }
                if used == 0 || used > groups {
                    return bad(format!(
                        "model.moe.group_topk = {used} must be in 1..=num_groups = {groups}"
                    ));
                }
                if !m.topk.is_multiple_of(used) {
                    return bad(format!(
                        "model.moe.topk = {} is not divisible by model.moe.group_topk = {used}",
                        m.topk
                    ));
                }
                if m.topk / used > m.num_experts / groups {
                    return bad(format!(
                        "topk / group_topk = {} exceeds the {} experts of a group",
                        m.topk / used,
                        m.num_experts / groups
                    ));
                }
                Ok(())
            }
            _ => bad("model.moe.num_groups and model.moe.group_topk must be set together".into()),
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
        if self.moe.num_experts > 0 {
            if self.moe.topk == 0 {
                return Err(ModelConfigError::Zero { field: "moe.topk" });
            }
            if self.moe.topk > self.moe.num_experts {
                return Err(ModelConfigError::TopkTooLarge {
                    topk: self.moe.topk,
                    experts: self.moe.num_experts,
                });
            }
            if self.moe.ffn_hidden_size == 0 {
                return Err(ModelConfigError::Zero {
                    field: "moe.ffn_hidden_size",
                });
            }
            self.validate_groups()?;
            if self.moe.expert_bias_update_rate.is_some()
                && self.moe.score_function == ScoreFunction::Softmax
            {
                return Err(ModelConfigError::ExpertBiasNeedsSigmoid);
            }
            if let Some(factor) = self
                .moe
                .capacity_factor
                .filter(|f| !(*f > 0.0 && f.is_finite()))
            {
                return Err(ModelConfigError::BadCapacityFactor(factor));
            }
            if self.moe.layer_freq == 0 && self.moe.layer_pattern.is_none() {
                return Err(ModelConfigError::Zero {
                    field: "moe.layer_freq",
                });
            }
        }
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
