//! The model as the planner sees it: the dims that set parameter counts, FLOPs, activations and
//! traffic — nothing about initialisation or numerics.

use serde::{Deserialize, Serialize};

use crate::PlanError;

/// GLU factor of SwiGLU: three `h × f` matrices instead of two.
pub const GLU_FACTOR: f64 = 1.5;

/// A decoder-only transformer whose feed-forward blocks are dense SwiGLU MLPs or MoE layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// A name for the output.
    pub name: String,
    /// Vocabulary size V.
    pub vocab: usize,
    /// Residual stream width h.
    pub hidden: usize,
    /// Transformer layers L.
    pub layers: usize,
    /// Query heads n_h.
    pub heads: usize,
    /// Key/value heads (query groups) n_kv.
    pub query_groups: usize,
    /// Dim of one head.
    pub head_dim: usize,
    /// Hidden size of a dense layer's SwiGLU MLP (0 when every layer is MoE).
    pub dense_ffn: usize,
    /// One entry per layer: whether it is an MoE layer.
    pub moe_layers: Vec<bool>,
    /// Routed experts E of an MoE layer.
    pub experts: usize,
    /// Experts each token is routed to, k.
    pub topk: usize,
    /// Hidden size of one routed expert's SwiGLU.
    pub expert_ffn: usize,
    /// Hidden size of the shared expert (0: none).
    pub shared_expert_ffn: usize,
    /// The shared expert's output is scaled by a sigmoid gate `[1, h]`.
    pub shared_expert_gate: bool,
    /// Biases on the q, k, v projections.
    pub qkv_bias: bool,
    /// The output layer shares the embedding table.
    pub tied_embeddings: bool,
}

/// Parameter elements of one layer, by how they are split over ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerParams {
    /// Split over tp: q/k/v/o projections (and their bias), dense MLP, shared-expert MLP.
    pub tensor_parallel: f64,
    /// Held whole by every tp rank: the two norms, the router, the shared-expert gate.
    pub replicated: f64,
    /// Routed experts, split over ep (experts) and etp (their hidden units).
    pub experts: f64,
}

impl ModelShape {
    /// Checks the dims against each other; every violation names the numbers.
    pub fn validate(&self) -> Result<(), PlanError> {
        for (field, value) in [
            ("vocab", self.vocab),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("query_groups", self.query_groups),
            ("head_dim", self.head_dim),
        ] {
            if value == 0 {
                return Err(PlanError::ZeroDim { field });
            }
        }
        if !self.heads.is_multiple_of(self.query_groups) {
            return Err(PlanError::QueryGroups {
                heads: self.heads,
                query_groups: self.query_groups,
            });
        }
        if self.moe_layers.len() != self.layers {
            return Err(PlanError::LayerPattern {
                entries: self.moe_layers.len(),
                layers: self.layers,
            });
        }
        let moe = self.moe_layer_count();
        if moe > 0 && (self.experts == 0 || self.topk == 0 || self.expert_ffn == 0) {
            return Err(PlanError::MoeDims {
                experts: self.experts,
                topk: self.topk,
                expert_ffn: self.expert_ffn,
            });
        }
        if moe > 0 && self.topk > self.experts {
            return Err(PlanError::TopkTooLarge {
                topk: self.topk,
                experts: self.experts,
            });
        }
        if moe < self.layers && self.dense_ffn == 0 {
            return Err(PlanError::ZeroDim { field: "dense_ffn" });
        }
        Ok(())
    }

    /// Number of MoE layers.
    pub fn moe_layer_count(&self) -> usize {
        self.moe_layers.iter().filter(|&&m| m).count()
    }

    /// Whether the model has any MoE layer.
    pub fn has_experts(&self) -> bool {
        self.moe_layer_count() > 0
    }

    /// Width of the q projection, `n_h · head_dim`.
    pub fn query_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the fused q/k/v projection, `(n_h + 2·n_kv) · head_dim`.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.query_groups) * self.head_dim
    }

    /// Parameters of layer `layer`.
    pub fn layer_params(&self, layer: usize) -> LayerParams {
        let h = self.hidden as f64;
        let qkv = self.qkv_width() as f64;
        let attention = h * qkv + self.query_width() as f64 * h;
        let bias = if self.qkv_bias { qkv } else { 0.0 };
        let norms = 2.0 * h;
        if !self.moe_layers[layer] {
            return LayerParams {
                tensor_parallel: attention + bias + 3.0 * h * self.dense_ffn as f64,
                replicated: norms,
                experts: 0.0,
            };
        }
        let shared = 3.0 * h * self.shared_expert_ffn as f64;
        let gate = if self.shared_expert_ffn > 0 && self.shared_expert_gate {
            h
        } else {
            0.0
        };
        LayerParams {
            tensor_parallel: attention + bias + shared,
            replicated: norms + self.experts as f64 * h + gate,
            experts: self.experts as f64 * 3.0 * h * self.expert_ffn as f64,
        }
    }

    /// Parameters of the embedding table, `V · h` (the output layer has as many when untied).
    pub fn embedding_params(&self) -> f64 {
        (self.vocab * self.hidden) as f64
    }

    /// Every parameter of the model.
    pub fn total_params(&self) -> f64 {
        let layers: f64 = (0..self.layers)
            .map(|l| {
                let p = self.layer_params(l);
                p.tensor_parallel + p.replicated + p.experts
            })
            .sum();
        let output = if self.tied_embeddings {
            0.0
        } else {
            self.embedding_params()
        };
        layers + self.embedding_params() + output + self.hidden as f64
    }

    /// Model FLOPs per trained token at sequence length `seq` (DESIGN.md §5): the numerator of
    /// MFU. Training counts 3 × forward; attention scores are causal; only the top-k routed
    /// experts count.
    pub fn training_flops_per_token(&self, seq: usize) -> f64 {
        let h = self.hidden as f64;
        let kv_ratio = self.query_groups as f64 / self.heads as f64;
        let attention = 12.0 * h * h * (1.0 + kv_ratio) + 12.0 * h * seq as f64 / 2.0;
        let mlp: f64 = self
            .moe_layers
            .iter()
            .map(|&moe| {
                let ffn = if moe {
                    (self.topk * self.expert_ffn + self.shared_expert_ffn) as f64
                } else {
                    self.dense_ffn as f64
                };
                12.0 * h * GLU_FACTOR * ffn
            })
            .sum();
        self.layers as f64 * attention + mlp + 6.0 * h * self.vocab as f64
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// origami's `small` preset: V 8192, h 512, 8 MoE layers, 8 heads / 4 groups, 16 experts
    /// top-2 of FFN 1024.
    pub(crate) fn small() -> ModelShape {
        ModelShape {
            name: "small".into(),
            vocab: 8192,
            hidden: 512,
            layers: 8,
            heads: 8,
            query_groups: 4,
            head_dim: 64,
            dense_ffn: 1024,
            moe_layers: vec![true; 8],
            experts: 16,
            topk: 2,
            expert_ffn: 1024,
            shared_expert_ffn: 0,
            shared_expert_gate: false,
            qkv_bias: false,
            tied_embeddings: false,
        }
    }

    #[test]
    fn small_preset_parameters_by_hand() {
        let m = small();
        // Attention: qkv 512 × (8 + 2·4)·64 = 512 × 1024, out 512 × 512.
        let attention = 512.0 * 1024.0 + 512.0 * 512.0;
        // Router 16 × 512, two norms of 512; experts 16 × 3 × 512 × 1024.
        let layer = attention + 16.0 * 512.0 + 1024.0 + 16.0 * 3.0 * 512.0 * 1024.0;
        let expected = 8.0 * layer + 2.0 * 8192.0 * 512.0 + 512.0;
        assert_eq!(m.total_params(), expected);
        // The README's "216 M params".
        assert!((m.total_params() / 1e6 - 216.0).abs() < 0.5);
    }

    #[test]
    fn flops_match_the_design_formula_for_small() {
        // Per layer: attention projections 12·h²·1.5, scores 12·h·s/2, experts 12·h·1.5·2·1024.
        let h = 512.0;
        let per_layer = 12.0 * h * h * 1.5 + 12.0 * h * 512.0 + 12.0 * h * 1.5 * 2048.0;
        let expected = 8.0 * per_layer + 6.0 * h * 8192.0;
        assert_eq!(small().training_flops_per_token(1024), expected);
    }

    #[test]
    fn bad_dims_name_the_numbers() {
        let mut m = small();
        m.query_groups = 3;
        assert!(m.validate().unwrap_err().to_string().contains("8 heads"));
        let mut m = small();
        m.moe_layers.pop();
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("7 entries for 8 layers"));
        let mut m = small();
        m.topk = 17;
        assert!(m.validate().unwrap_err().to_string().contains("top-k 17"));
        let mut m = small();
        m.hidden = 0;
        assert!(m.validate().unwrap_err().to_string().contains("hidden"));
        small().validate().unwrap();
    }
}
