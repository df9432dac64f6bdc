//! `origami eval`: the next-token loss of a HuggingFace checkpoint on given token ids.

use anyhow::{ensure, Context};
use clap::Args;
use serde::Deserialize;
use std::path::PathBuf;

/// Arguments of `origami eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Directory with a HuggingFace Mixtral or Qwen2-MoE `config.json` and `*.safetensors`.
    #[arg(long)]
    pub hf_checkpoint: PathBuf,
    /// JSON file `{"input_ids": [[...], ...]}`, rows of equal length.
    #[arg(long)]
    pub input_ids: PathBuf,
}

#[derive(Deserialize)]
struct InputIds {
    input_ids: Vec<Vec<u32>>,
}

/// Prints one JSON line: the mean next-token cross-entropy over all positions, as transformers
/// returns for `labels = input_ids`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.input_ids)
        .with_context(|| format!("reading {}", args.input_ids.display()))?;
    let ids: InputIds = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", args.input_ids.display()))?;
    let seq = ids.input_ids.first().map_or(0, Vec::len);
    ensure!(
        !ids.input_ids.is_empty() && seq >= 2,
        "input_ids needs at least one row of at least 2 tokens"
    );
    ensure!(
        ids.input_ids.iter().all(|r| r.len() == seq),
        "every input_ids row must have {seq} tokens, as the first"
    );
    let (model, params) = origami::hf::load_checkpoint(&args.hf_checkpoint).with_context(|| {
        format!(
            "loading HuggingFace checkpoint {}",
            args.hf_checkpoint.display()
        )
    })?;
    let vocab = model.config().vocab_size;
    ensure!(
        ids.input_ids
            .iter()
            .flatten()
            .all(|&t| (t as usize) < vocab),
        "input_ids holds a token id outside the model's vocabulary of {vocab}"
    );
    ensure!(
        seq <= model.config().max_seq_len,
        "rows of {seq} tokens exceed max_position_embeddings {}",
        model.config().max_seq_len
    );
    let batch = origami::hf::next_token_batch(&ids.input_ids);
    let report = model.loss(&params, &batch);
    println!(
        "{}",
        serde_json::json!({ "loss": report.cross_entropy, "tokens": report.tokens })
    );
    Ok(())
}
