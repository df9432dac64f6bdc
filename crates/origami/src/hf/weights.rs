//! Loads HuggingFace safetensors weights into origami's parameter buffers.
//!
//! Names map as follows (`L.` = `model.layers.{l}.`): `model.embed_tokens` → embedding;
//! `L.input_layernorm` / `L.post_attention_layernorm` → the block norms; `L.self_attn.{q,k,v}_proj`
//! → the fused qkv weight (and bias), rows q then k then v; `L.self_attn.o_proj` → out;
//! the router `L.mlp.gate` (or `L.block_sparse_moe.gate`); experts either fused
//! (`…experts.gate_up_proj [E, 2F, H]` with gate rows first, `…experts.down_proj [E, H, F]`, the
//! layout of origami's fc1/fc2) or per expert (`…experts.{e}.w1/w3/w2` for Mixtral,
//! `…experts.{e}.gate_proj/up_proj/down_proj` for Qwen2-MoE); Qwen2-MoE's shared expert
//! `L.mlp.shared_expert.*` and `L.mlp.shared_expert_gate`; dense layers `L.mlp.{gate,up,down}_proj`;
//! `model.norm` → final norm; `lm_head` → output (absent when tied).

use super::HfError;
use crate::model::gpt::GptModel;
use crate::params::Buffers;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// All tensors of a checkpoint (one or more safetensors files), converted to f32 on demand.
pub struct HfTensors {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn to_f32(view: &TensorView<'_>, name: &str) -> Result<Vec<f32>, HfError> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(HfError::Weights(format!(
                "tensor {name} has unsupported dtype {other:?}"
            )))
        }
    })
}

impl HfTensors {
    /// Reads `model.safetensors`, or every `*.safetensors` shard in `dir`.
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| HfError::Io(dir.display().to_string(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(HfError::Weights(format!(
                "no .safetensors file in {}",
                dir.display()
            )));
        }
        let mut tensors = HashMap::new();
        for file in files {
            let handle = std::fs::File::open(&file)
                .map_err(|e| HfError::Io(file.display().to_string(), e))?;
            // SAFETY: the file is opened read-only and not modified while mapped by this process.
            let map = unsafe { memmap2::Mmap::map(&handle) }
                .map_err(|e| HfError::Io(file.display().to_string(), e))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| {
                HfError::Weights(format!(
                    "{} is not a valid safetensors file: {e}",
                    file.display()
                ))
            })?;
            for (name, view) in st.tensors() {
                let values = to_f32(&view, &name)?;
                tensors.insert(name, (view.shape().to_vec(), values));
            }
        }
        Ok(HfTensors { tensors })
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<&[f32], HfError> {
        let (found, values) = self
            .tensors
            .get(name)
            .ok_or_else(|| HfError::MissingTensor(name.to_string()))?;
        if found != shape {
            return Err(HfError::Weights(format!(
                "tensor {name} has shape {found:?}, expected {shape:?}"
            )));
        }
        Ok(values)
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Copies every parameter of `model` from the HF tensors; `moe_prefix` is `mlp` or `block_sparse_moe`.
pub fn load_parameters(model: &GptModel, tensors: &HfTensors) -> Result<Buffers, HfError> {
    let c = model.config();
    let (h, hd) = (c.hidden_size, c.head_dim());
    let (q_rows, kv_rows) = (c.num_heads * hd, c.num_kv_heads * hd);
    let mut params = model.registry().zeros();
    let mut put = |name: &str, values: Vec<f32>| -> Result<(), HfError> {
        let info = model
            .registry()
            .find(name)
            .ok_or_else(|| HfError::Weights(format!("origami has no parameter {name}")))?;
        if info.id.len() != values.len() {
            return Err(HfError::Weights(format!(
                "{name}: {} values for {} elements",
                values.len(),
                info.id.len()
            )));
        }
        params.get_mut(info.id).copy_from_slice(&values);
        Ok(())
    };
    put(
        "embedding.weight",
        tensors
            .get("model.embed_tokens.weight", &[c.vocab_size, h])?
            .to_vec(),
    )?;
    for l in 0..c.num_layers {
        let hf = format!("model.layers.{l}");
        let ours = format!("layers.{l}");
        put(
            &format!("{ours}.attention_norm.weight"),
            tensors
                .get(&format!("{hf}.input_layernorm.weight"), &[h])?
                .to_vec(),
        )?;
        put(
            &format!("{ours}.ffn_norm.weight"),
            tensors
                .get(&format!("{hf}.post_attention_layernorm.weight"), &[h])?
                .to_vec(),
        )?;
        let mut qkv = Vec::with_capacity((q_rows + 2 * kv_rows) * h);
        for (proj, rows) in [("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)] {
            qkv.extend_from_slice(
                tensors.get(&format!("{hf}.self_attn.{proj}.weight"), &[rows, h])?,
            );
        }
        put(&format!("{ours}.attention.qkv.weight"), qkv)?;
        if c.qkv_bias {
            let mut bias = Vec::with_capacity(q_rows + 2 * kv_rows);
            for (proj, rows) in [("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)] {
                bias.extend_from_slice(
                    tensors.get(&format!("{hf}.self_attn.{proj}.bias"), &[rows])?,
                );
            }
            put(&format!("{ours}.attention.qkv.bias"), bias)?;
        }
        put(
            &format!("{ours}.attention.out.weight"),
            tensors
                .get(&format!("{hf}.self_attn.o_proj.weight"), &[h, q_rows])?
                .to_vec(),
        )?;
        if c.is_moe_layer(l) {
            load_moe_layer(c, tensors, &hf, &ours, &mut put)?;
        } else {
            let f = c.ffn_hidden_size;
            let mut gate_up = tensors
                .get(&format!("{hf}.mlp.gate_proj.weight"), &[f, h])?
                .to_vec();
            gate_up.extend_from_slice(tensors.get(&format!("{hf}.mlp.up_proj.weight"), &[f, h])?);
            put(&format!("{ours}.mlp.gate_up.weight"), gate_up)?;
            put(
                &format!("{ours}.mlp.down.weight"),
                tensors
                    .get(&format!("{hf}.mlp.down_proj.weight"), &[h, f])?
                    .to_vec(),
            )?;
        }
    }
    put(
        "final_norm.weight",
        tensors.get("model.norm.weight", &[h])?.to_vec(),
    )?;
    if !c.tie_embeddings {
        put(
            "output.weight",
            tensors.get("lm_head.weight", &[c.vocab_size, h])?.to_vec(),
        )?;
    }
    Ok(params)
}

/// Stores the values of the named origami parameter, checking its size.
type PutParameter<'a> = dyn FnMut(&str, Vec<f32>) -> Result<(), HfError> + 'a;

fn load_moe_layer(
    c: &crate::model::config::ModelConfig,
    tensors: &HfTensors,
    hf: &str,
    ours: &str,
    put: &mut PutParameter,
) -> Result<(), HfError> {
    let (h, e, f) = (c.hidden_size, c.moe.num_experts, c.moe.ffn_hidden_size);
    let block = if tensors.has(&format!("{hf}.block_sparse_moe.gate.weight")) {
        "block_sparse_moe"
    } else {
        "mlp"
    };
    let moe = format!("{hf}.{block}");
    put(
        &format!("{ours}.moe.router.weight"),
        tensors
            .get(&format!("{moe}.gate.weight"), &[e, h])?
            .to_vec(),
    )?;
    let (fc1, fc2) = if tensors.has(&format!("{moe}.experts.gate_up_proj")) {
        (
            tensors
                .get(&format!("{moe}.experts.gate_up_proj"), &[e, 2 * f, h])?
                .to_vec(),
            tensors
                .get(&format!("{moe}.experts.down_proj"), &[e, h, f])?
                .to_vec(),
        )
    } else {
        let names = if tensors.has(&format!("{moe}.experts.0.w1.weight")) {
            ["w1", "w3", "w2"]
        } else {
            ["gate_proj", "up_proj", "down_proj"]
        };
        let mut fc1 = Vec::with_capacity(e * 2 * f * h);
        let mut fc2 = Vec::with_capacity(e * h * f);
        for x in 0..e {
            fc1.extend_from_slice(
                tensors.get(&format!("{moe}.experts.{x}.{}.weight", names[0]), &[f, h])?,
            );
            fc1.extend_from_slice(
                tensors.get(&format!("{moe}.experts.{x}.{}.weight", names[1]), &[f, h])?,
            );
            fc2.extend_from_slice(
                tensors.get(&format!("{moe}.experts.{x}.{}.weight", names[2]), &[h, f])?,
            );
        }
        (fc1, fc2)
    };
    put(&format!("{ours}.moe.experts.fc1.weight"), fc1)?;
    put(&format!("{ours}.moe.experts.fc2.weight"), fc2)?;
    let shared = c.moe.shared_expert_ffn_hidden_size;
    if shared > 0 {
        let prefix = format!("{moe}.shared_expert");
        let mut gate_up = tensors
            .get(&format!("{prefix}.gate_proj.weight"), &[shared, h])?
            .to_vec();
        gate_up.extend_from_slice(tensors.get(&format!("{prefix}.up_proj.weight"), &[shared, h])?);
        put(&format!("{ours}.moe.shared_expert.gate_up.weight"), gate_up)?;
        put(
            &format!("{ours}.moe.shared_expert.down.weight"),
            tensors
                .get(&format!("{prefix}.down_proj.weight"), &[h, shared])?
                .to_vec(),
        )?;
        if c.moe.shared_expert_gate {
            put(
                &format!("{ours}.moe.shared_expert.gate.weight"),
                tensors
                    .get(&format!("{moe}.shared_expert_gate.weight"), &[1, h])?
                    .to_vec(),
            )?;
        }
    }
    Ok(())
}
