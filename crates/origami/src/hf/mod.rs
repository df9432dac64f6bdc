//! HuggingFace interoperability: Mixtral and Qwen2-MoE `config.json` and safetensors weights,
//! and the next-token loss exactly as transformers computes it for `labels = input_ids`.

pub mod config;
pub mod names;
pub mod weights;

use crate::model::gpt::{GptModel, MicroBatch, SequenceKeys};
use crate::params::Buffers;
use origami_kernels::cross_entropy::IGNORE_TARGET;
use std::path::Path;

/// Why a HuggingFace checkpoint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// `config.json` is not usable.
    #[error("config.json: {0}")]
    Config(String),
    /// The architecture is not one origami reads.
    #[error("unsupported model_type {0}")]
    UnsupportedModel(String),
    /// A tensor origami needs is not in the checkpoint.
    #[error("checkpoint lacks tensor {0}")]
    MissingTensor(String),
    /// A tensor is present but unusable.
    #[error("{0}")]
    Weights(String),
    /// A safetensors file is damaged, or a tensor in it has another shape than the config
    /// implies.
    #[error(transparent)]
    File(#[from] crate::tensor_files::TensorFileError),
}

/// Loads `config.json` and the safetensors weights of `dir` into a model and its parameters.
pub fn load_checkpoint(dir: &Path) -> Result<(GptModel, Buffers), HfError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| HfError::Io(config_path.display().to_string(), e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| HfError::Config(e.to_string()))?;
    let config = config::model_config_from_hf(&json)?;
    let model = GptModel::new(config).map_err(|e| HfError::Config(e.to_string()))?;
    let tensors = weights::HfTensors::open(dir)?;
    let params = weights::load_parameters(&model, &tensors)?;
    Ok((model, params))
}

/// A micro-batch whose targets are the next tokens, the last position of each row ignored:
/// the loss transformers computes for `labels = input_ids` (mean over `batch·(seq−1)` positions).
pub fn next_token_batch(input_ids: &[Vec<u32>]) -> MicroBatch {
    let batch = input_ids.len();
    let seq = input_ids.first().map_or(0, Vec::len);
    let mut tokens = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for row in input_ids {
        tokens.extend_from_slice(row);
        targets.extend(row.iter().skip(1).copied());
        targets.push(IGNORE_TARGET);
    }
    MicroBatch {
        tokens,
        targets,
        batch,
        seq,
        keys: SequenceKeys::default(),
    }
}
