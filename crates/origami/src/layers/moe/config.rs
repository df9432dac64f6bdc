//! The settings of an MoE layer: the `[model.moe]` section of a run config, and their checks.

use serde::{Deserialize, Serialize};

/// How router logits become expert scores (DESIGN.md §1, "Router").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreFunction {
    /// Softmax: over the chosen k logits, or over all experts before top-k with `pre_softmax`.
    Softmax,
    /// Sigmoid of each logit, normalised over the chosen k.
    Sigmoid,
    /// `sqrt(softplus(logit))` of each logit, normalised over the chosen k (as sigmoid).
    SqrtSoftplus,
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
    /// Aux-loss-free balancing: a per-expert bias added to the elementwise scores for the choice
    /// of experts only (not the weights), updated once per global batch by
    /// `bias += rate · sign(mean(load) − load)` from the experts chosen. Absent: no bias. Needs
    /// `score_function = "sigmoid"` or `"sqrtsoftplus"`.
    pub expert_bias_update_rate: Option<f32>,
    /// Router input jitter: in training the router's logits are computed from its input
    /// multiplied elementwise by noise uniform in `[1 − eps, 1 + eps]` (the experts see the input
    /// unjittered), drawn from (seed, step, token, layer) so every layout draws the same noise.
    /// Absent: no jitter. Must lie in (0, 1).
    pub input_jitter_eps: Option<f32>,
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
            input_jitter_eps: None,
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

/// MoE settings that cannot work, naming the key and the value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MoeConfigError {
    /// A size that must be positive is zero.
    #[error("model.moe.{field} must be positive, got 0")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// More experts per token than experts.
    #[error("model.moe.topk = {topk} exceeds model.moe.num_experts = {experts}")]
    TopkTooLarge {
        /// Chosen experts per token.
        topk: usize,
        /// Experts.
        experts: usize,
    },
    /// Expert bias asked for with the softmax score function, which it does not apply to.
    #[error("model.moe.expert_bias_update_rate needs model.moe.score_function = \"sigmoid\" or \"sqrtsoftplus\" (got \"softmax\")")]
    ExpertBiasWithSoftmax,
    /// Group-limited routing settings that do not fit together.
    #[error("group-limited routing: {0}")]
    BadGroups(String),
    /// A jitter band that is not in (0, 1).
    #[error("model.moe.input_jitter_eps = {0} must lie in (0, 1)")]
    BadJitter(f32),
    /// A capacity factor that is not a positive number.
    #[error("model.moe.capacity_factor = {0} must be positive")]
    BadCapacityFactor(f32),
}

impl MoeConfig {
    /// Checks the settings against each other (a model without experts checks nothing).
    pub fn validate(&self) -> Result<(), MoeConfigError> {
        if self.num_experts == 0 {
            return Ok(());
        }
        if self.topk == 0 {
            return Err(MoeConfigError::Zero { field: "topk" });
        }
        if self.topk > self.num_experts {
            return Err(MoeConfigError::TopkTooLarge {
                topk: self.topk,
                experts: self.num_experts,
            });
        }
        if self.ffn_hidden_size == 0 {
            return Err(MoeConfigError::Zero {
                field: "ffn_hidden_size",
            });
        }
        self.validate_groups()?;
        if self.expert_bias_update_rate.is_some() && self.score_function == ScoreFunction::Softmax {
            return Err(MoeConfigError::ExpertBiasWithSoftmax);
        }
        if let Some(factor) = self
            .capacity_factor
            .filter(|f| !(*f > 0.0 && f.is_finite()))
        {
            return Err(MoeConfigError::BadCapacityFactor(factor));
        }
        if let Some(eps) = self.input_jitter_eps.filter(|e| !(*e > 0.0 && *e < 1.0)) {
            return Err(MoeConfigError::BadJitter(eps));
        }
        if self.layer_freq == 0 && self.layer_pattern.is_none() {
            return Err(MoeConfigError::Zero {
                field: "layer_freq",
            });
        }
        Ok(())
    }

    fn validate_groups(&self) -> Result<(), MoeConfigError> {
        let bad = |s: String| Err(MoeConfigError::BadGroups(s));
        match (self.num_groups, self.group_topk) {
            (None, None) => Ok(()),
            (Some(groups), Some(used)) => {
                if groups == 0 || !self.num_experts.is_multiple_of(groups) {
                    return bad(format!("model.moe.num_experts = {} is not divisible by model.moe.num_groups = {groups}", self.num_experts));
                }
                if used == 0 || used > groups {
                    return bad(format!(
                        "model.moe.group_topk = {used} must be in 1..=num_groups = {groups}"
                    ));
                }
                if !self.topk.is_multiple_of(used) {
                    return bad(format!(
                        "model.moe.topk = {} is not divisible by model.moe.group_topk = {used}",
                        self.topk
                    ));
                }
                if self.topk / used > self.num_experts / groups {
                    return bad(format!(
                        "topk / group_topk = {} exceeds the {} experts of a group",
                        self.topk / used,
                        self.num_experts / groups
                    ));
                }
                Ok(())
            }
            _ => bad("model.moe.num_groups and model.moe.group_topk must be set together".into()),
        }
    }
}
