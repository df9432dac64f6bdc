//! origami's model config as the planner's [`ModelShape`], and where `--model` finds it: a
//! preset, a HuggingFace `config.json`, a run TOML, or one of the paper's models.

use std::path::Path;

use anyhow::Context;
use origami_plan::{paper_model, ModelShape, PAPER_MODELS};

use crate::hf::config::model_config_from_hf;
use crate::model::config::ModelConfig;
use crate::train::config::RunConfig;

/// The dims of `config` that the planner uses.
pub fn model_shape(name: &str, config: &ModelConfig) -> ModelShape {
    let moe = &config.moe;
    ModelShape {
        name: name.to_string(),
        vocab: config.vocab_size,
        hidden: config.hidden_size,
        layers: config.num_layers,
        heads: config.num_heads,
        query_groups: config.num_kv_heads,
        head_dim: config.head_dim(),
        dense_ffn: config.ffn_hidden_size,
        moe_layers: (0..config.num_layers)
            .map(|l| config.is_moe_layer(l))
            .collect(),
        experts: moe.num_experts,
        topk: moe.topk,
        expert_ffn: moe.ffn_hidden_size,
        shared_expert_ffn: moe.shared_expert_ffn_hidden_size,
        shared_expert_gate: moe.shared_expert_gate,
        qkv_bias: config.qkv_bias,
        tied_embeddings: config.tie_embeddings,
    }
}

/// `--model`: a preset (`tiny`, `small`, `medium`), a paper model (`mixtral-8x22b`,
/// `qwen2-57b-a14b`, `mixtral-8x22b-g8t8`), a `.json` HuggingFace config or a `.toml` run
/// config (its `[model]`).
pub fn resolve_model(model: &str) -> anyhow::Result<ModelShape> {
    if let Some(shape) = paper_model(model) {
        return Ok(shape);
    }
    let path = Path::new(model);
    let extension = path.extension().and_then(|e| e.to_str());
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(model)
        .to_string();
    let config = match extension {
        Some("json") => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let json = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            model_config_from_hf(&json).with_context(|| format!("reading {}", path.display()))?
        }
        Some("toml") => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            RunConfig::from_toml(&text, &[])
                .with_context(|| format!("reading the run config {}", path.display()))?
                .model
        }
        _ => ModelConfig::preset(model).with_context(|| {
            format!(
                "--model {model:?} is not a preset, a paper model ({}), a .json or a .toml file",
                PAPER_MODELS.join(", ")
            )
        })?,
    };
    config.validate()?;
    Ok(model_shape(&name, &config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_small_preset_has_the_planners_parameter_count() {
        let shape = resolve_model("small").unwrap();
        let model =
            crate::model::gpt::GptModel::new(ModelConfig::preset("small").unwrap()).unwrap();
        assert_eq!(shape.total_params(), model.registry().total_len() as f64);
        assert!(resolve_model("mixtral-8x22b").is_ok());
        let message = format!("{:#}", resolve_model("huge").unwrap_err());
        assert!(message.contains("not a preset"), "{message}");
    }
}
