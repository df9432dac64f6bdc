//! The one table between HuggingFace tensor names and origami's parameters, used by loading,
//! import and export alike: each HF tensor is a block of one origami parameter.
//!
//! `L.` = `model.layers.{l}.`; the MoE block is `L.block_sparse_moe` (Mixtral) or `L.mlp`
//! (Qwen2-MoE):
//!
//! | HuggingFace | origami |
//! |---|---|
//! | `model.embed_tokens.weight` | `embedding.weight` |
//! | `L.input_layernorm.weight`, `L.post_attention_layernorm.weight` | `layers.l.attention_norm.weight`, `layers.l.ffn_norm.weight` |
//! | `L.self_attn.{q,k,v}_proj.{weight,bias}` | rows q, k, v of `layers.l.attention.qkv.{weight,bias}` |
//! | `L.self_attn.o_proj.weight` | `layers.l.attention.out.weight` |
//! | `MOE.gate.weight` | `layers.l.moe.router.weight` |
//! | `MOE.experts.e.{w1,w3}` / `{gate,up}_proj` | expert e's gate and up rows of `layers.l.moe.experts.fc1.weight` |
//! | `MOE.experts.e.w2` / `down_proj` | expert e of `layers.l.moe.experts.fc2.weight` |
//! | `MOE.experts.gate_up_proj`, `MOE.experts.down_proj` (fused) | `fc1`, `fc2` whole |
//! | `L.mlp.shared_expert.{gate,up,down}_proj`, `L.mlp.shared_expert_gate` | `layers.l.moe.shared_expert.{gate_up,down,gate}.weight` |
//! | `L.mlp.{gate,up,down}_proj` (dense layer) | `layers.l.mlp.{gate_up,down}.weight` |
//! | `model.norm.weight`, `lm_head.weight` | `final_norm.weight`, `output.weight` (absent when tied) |

use crate::model::config::ModelConfig;
use crate::params::Shard;

/// The HuggingFace architectures origami reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfFamily {
    /// `MixtralForCausalLM`: every layer MoE, `block_sparse_moe`, experts `w1 w3 w2`.
    Mixtral,
    /// `Qwen2MoeForCausalLM`: `mlp`, experts `gate_proj up_proj down_proj`, a gated shared
    /// expert, dense layers allowed.
    Qwen2Moe,
}

impl HfFamily {
    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            HfFamily::Mixtral => "mixtral",
            HfFamily::Qwen2Moe => "qwen2_moe",
        }
    }

    fn moe_block(self) -> &'static str {
        match self {
            HfFamily::Mixtral => "block_sparse_moe",
            HfFamily::Qwen2Moe => "mlp",
        }
    }

    /// The per-expert projections: gate, up, down.
    fn expert_names(self) -> [&'static str; 3] {
        match self {
            HfFamily::Mixtral => ["w1", "w3", "w2"],
            HfFamily::Qwen2Moe => ["gate_proj", "up_proj", "down_proj"],
        }
    }
}

/// How the experts of an MoE layer are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertLayout {
    /// One tensor per expert and projection.
    PerExpert,
    /// `experts.gate_up_proj [E, 2F, H]` (gate rows first) and `experts.down_proj [E, H, F]`.
    Fused,
}

/// One HuggingFace tensor: its name and shape, and the block of an origami parameter it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapped {
    /// HuggingFace name.
    pub hf: String,
    /// HuggingFace shape.
    pub shape: Vec<usize>,
    /// The origami parameter.
    pub origami: String,
    /// Global shape of the origami parameter.
    pub origami_shape: Vec<usize>,
    /// The block of it (its elements in row-major order are the HF tensor's).
    pub region: Shard,
}

/// Every HuggingFace tensor of `config` written as `family` with `experts` stored so.
pub fn mapped_tensors(
    config: &ModelConfig,
    family: HfFamily,
    experts: ExpertLayout,
) -> Vec<Mapped> {
    let c = config;
    let (h, hd) = (c.hidden_size, c.head_dim());
    let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
    let mut out = Vec::new();
    let mut whole = |hf: String, origami: String, shape: Vec<usize>| {
        out.push(Mapped {
            hf,
            region: Shard::full(&shape),
            origami_shape: shape.clone(),
            shape,
            origami,
        });
    };
    whole(
        "model.embed_tokens.weight".into(),
        "embedding.weight".into(),
        vec![c.vocab_size, h],
    );
    for l in 0..c.num_layers {
        let (hf, ours) = (format!("model.layers.{l}"), format!("layers.{l}"));
        whole(
            format!("{hf}.input_layernorm.weight"),
            format!("{ours}.attention_norm.weight"),
            vec![h],
        );
        whole(
            format!("{hf}.post_attention_layernorm.weight"),
            format!("{ours}.ffn_norm.weight"),
            vec![h],
        );
        whole(
            format!("{hf}.self_attn.o_proj.weight"),
            format!("{ours}.attention.out.weight"),
            vec![h, q],
        );
    }
    whole(
        "model.norm.weight".into(),
        "final_norm.weight".into(),
        vec![h],
    );
    if !c.tie_embeddings {
        whole(
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![c.vocab_size, h],
        );
    }
    for l in 0..c.num_layers {
        layer_blocks(c, family, experts, l, (q, kv), &mut out);
    }
    out
}

/// The tensors of layer `l` that are blocks of larger origami parameters (and the MoE ones).
fn layer_blocks(
    c: &ModelConfig,
    family: HfFamily,
    experts: ExpertLayout,
    l: usize,
    (q, kv): (usize, usize),
    out: &mut Vec<Mapped>,
) {
    let h = c.hidden_size;
    let (hf, ours) = (format!("model.layers.{l}"), format!("layers.{l}"));
    let rows = |origami: String, origami_shape: Vec<usize>, dim: usize, range, hf: String| {
        let region = Shard::full(&origami_shape).and(dim, std::iter::once(range).collect());
        Mapped {
            shape: region.local_shape(),
            hf,
            origami,
            origami_shape,
            region,
        }
    };
    let qkv = [
        ("q_proj", 0..q),
        ("k_proj", q..q + kv),
        ("v_proj", q + kv..q + 2 * kv),
    ];
    for (proj, range) in qkv.clone() {
        out.push(rows(
            format!("{ours}.attention.qkv.weight"),
            vec![q + 2 * kv, h],
            0,
            range,
            format!("{hf}.self_attn.{proj}.weight"),
        ));
    }
    if c.qkv_bias {
        for (proj, range) in qkv {
            out.push(rows(
                format!("{ours}.attention.qkv.bias"),
                vec![q + 2 * kv],
                0,
                range,
                format!("{hf}.self_attn.{proj}.bias"),
            ));
        }
    }
    let mut mlp = |hf_prefix: String, ours_prefix: String, f: usize| {
        let gate_up = vec![2 * f, h];
        for (proj, range) in [("gate_proj", 0..f), ("up_proj", f..2 * f)] {
            out.push(rows(
                format!("{ours_prefix}.gate_up.weight"),
                gate_up.clone(),
                0,
                range,
                format!("{hf_prefix}.{proj}.weight"),
            ));
        }
        out.push(Mapped {
            hf: format!("{hf_prefix}.down_proj.weight"),
            shape: vec![h, f],
            origami: format!("{ours_prefix}.down.weight"),
            origami_shape: vec![h, f],
            region: Shard::full(&[h, f]),
        });
    };
    if !c.is_moe_layer(l) {
        mlp(
            format!("{hf}.mlp"),
            format!("{ours}.mlp"),
            c.ffn_hidden_size,
        );
        return;
    }
    let m = &c.moe;
    let moe = format!("{hf}.{}", family.moe_block());
    let shared = m.shared_expert_ffn_hidden_size;
    if shared > 0 {
        mlp(
            format!("{moe}.shared_expert"),
            format!("{ours}.moe.shared_expert"),
            shared,
        );
        if m.shared_expert_gate {
            out.push(Mapped {
                hf: format!("{moe}.shared_expert_gate.weight"),
                shape: vec![1, h],
                origami: format!("{ours}.moe.shared_expert.gate.weight"),
                origami_shape: vec![1, h],
                region: Shard::full(&[1, h]),
            });
        }
    }
    let (e, f) = (m.num_experts, m.ffn_hidden_size);
    out.push(Mapped {
        hf: format!("{moe}.gate.weight"),
        shape: vec![e, h],
        origami: format!("{ours}.moe.router.weight"),
        origami_shape: vec![e, h],
        region: Shard::full(&[e, h]),
    });
    let (fc1, fc2) = (
        format!("{ours}.moe.experts.fc1.weight"),
        format!("{ours}.moe.experts.fc2.weight"),
    );
    let (fc1_shape, fc2_shape) = (vec![e, 2 * f, h], vec![e, h, f]);
    if experts == ExpertLayout::Fused {
        for (hf_name, origami, shape) in [
            (format!("{moe}.experts.gate_up_proj"), fc1, fc1_shape),
            (format!("{moe}.experts.down_proj"), fc2, fc2_shape),
        ] {
            out.push(Mapped {
                hf: hf_name,
                region: Shard::full(&shape),
                shape: shape.clone(),
                origami,
                origami_shape: shape,
            });
        }
        return;
    }
    let [gate, up, down] = family.expert_names();
    for x in 0..e {
        let expert = || Shard::full(&fc1_shape).and(0, std::iter::once(x..x + 1).collect());
        for (name, range) in [(gate, 0..f), (up, f..2 * f)] {
            out.push(Mapped {
                hf: format!("{moe}.experts.{x}.{name}.weight"),
                shape: vec![f, h],
                origami: fc1.clone(),
                origami_shape: fc1_shape.clone(),
                region: expert().and(1, std::iter::once(range).collect()),
            });
        }
        out.push(Mapped {
            hf: format!("{moe}.experts.{x}.{down}.weight"),
            shape: vec![h, f],
            origami: fc2.clone(),
            origami_shape: fc2_shape.clone(),
            region: Shard::full(&fc2_shape).and(0, std::iter::once(x..x + 1).collect()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::GptModel;

    /// The table covers every trained origami parameter exactly once, element by element, for
    /// both families and both expert layouts.
    #[test]
    fn the_table_covers_every_parameter_once() {
        let mut qwen = ModelConfig::preset("tiny").unwrap();
        qwen.qkv_bias = true;
        qwen.moe.layer_pattern = Some(vec![0, 1, 1, 1]);
        qwen.moe.shared_expert_ffn_hidden_size = 64;
        qwen.moe.shared_expert_gate = true;
        qwen.tie_embeddings = true;
        let mixtral = ModelConfig::preset("tiny").unwrap();
        for (config, family) in [(mixtral, HfFamily::Mixtral), (qwen, HfFamily::Qwen2Moe)] {
            let model = GptModel::new(config.clone()).unwrap();
            for layout in [ExpertLayout::PerExpert, ExpertLayout::Fused] {
                let table = mapped_tensors(&config, family, layout);
                for info in model.registry().params().iter().filter(|p| p.trainable) {
                    let mut seen = vec![0u8; info.id.len()];
                    for m in table.iter().filter(|m| m.origami == info.name) {
                        assert_eq!(m.origami_shape, info.shape, "{}", m.hf);
                        assert_eq!(
                            m.shape.iter().product::<usize>(),
                            m.region.local_shape().iter().product::<usize>()
                        );
                        for i in m.region.global_indices(&info.shape) {
                            seen[i] += 1;
                        }
                    }
                    assert!(seen.iter().all(|&n| n == 1), "{family:?} {}", info.name);
                }
            }
        }
    }
}
