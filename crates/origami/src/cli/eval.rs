//! `origami eval`: the next-token loss of a HuggingFace or origami checkpoint on given token
//! ids (as transformers computes it for `labels = input_ids`), or the validation loss of an
//! origami checkpoint on an indexed dataset.

use anyhow::{ensure, Context};
use clap::Args;
use origami::compute::Weights;
use origami::model::gpt::GptModel;
use origami::params::Buffers;
use origami::train::checkpoint;
use origami::train::config::RunConfig;
use origami::train::step::StepGroups;
use origami::train::trainer::evaluate;
use origami_data::gpt_dataset::{GptDataset, Split};
use serde::Deserialize;
use std::path::PathBuf;

/// Arguments of `origami eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Directory with a HuggingFace Mixtral or Qwen2-MoE `config.json` and `*.safetensors`.
    #[arg(
        long,
        requires = "input_ids",
        conflicts_with = "checkpoint",
        required_unless_present = "checkpoint"
    )]
    pub hf_checkpoint: Option<PathBuf>,
    /// JSON file `{"input_ids": [[...], ...]}`, rows of equal length.
    #[arg(long, conflicts_with = "data")]
    pub input_ids: Option<PathBuf>,
    /// origami checkpoint or run directory.
    #[arg(long, required_unless_present = "hf_checkpoint")]
    pub checkpoint: Option<PathBuf>,
    /// Indexed dataset prefix whose validation split to evaluate on (with --checkpoint).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Micro-batches of the validation split to evaluate (0: the whole split).
    #[arg(long, default_value_t = 0)]
    pub batches: usize,
}

#[derive(Deserialize)]
struct InputIds {
    input_ids: Vec<Vec<u32>>,
}

/// Prints one JSON line with `"loss"`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    match (
        args.hf_checkpoint,
        args.input_ids,
        args.checkpoint,
        args.data,
    ) {
        (Some(hf), Some(ids), None, None) => {
            let (model, params) = origami::hf::load_checkpoint(&hf)
                .with_context(|| format!("loading HuggingFace checkpoint {}", hf.display()))?;
            eval_input_ids(&model, &params, ids)
        }
        (None, Some(ids), Some(path), None) => {
            let dir = checkpoint::resolve(&path)?;
            let config = RunConfig::from_toml(&checkpoint::read_state(&dir)?.config_toml, &[])?;
            let model = GptModel::new(config.model)?;
            let params = checkpoint::load_params(&dir, model.registry())?.params;
            eval_input_ids(&model, &params, ids)
        }
        (None, None, Some(checkpoint), Some(data)) => {
            eval_checkpoint(checkpoint, data, args.batches)
        }
        _ => anyhow::bail!(
            "give --input-ids FILE with --hf-checkpoint DIR or --checkpoint DIR, or --checkpoint DIR --data PREFIX"
        ),
    }
}

/// Mean next-token cross-entropy over all positions, as transformers returns for `labels = input_ids`.
fn eval_input_ids(model: &GptModel, params: &Buffers, input_ids: PathBuf) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&input_ids)
        .with_context(|| format!("reading {}", input_ids.display()))?;
    let ids: InputIds =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", input_ids.display()))?;
    let seq = ids.input_ids.first().map_or(0, Vec::len);
    ensure!(
        !ids.input_ids.is_empty() && seq >= 2,
        "input_ids needs at least one row of at least 2 tokens"
    );
    ensure!(
        ids.input_ids.iter().all(|r| r.len() == seq),
        "every input_ids row must have {seq} tokens, as the first"
    );
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
    let report = model.loss(params, &origami::hf::next_token_batch(&ids.input_ids));
    println!(
        "{}",
        serde_json::json!({ "loss": report.cross_entropy, "tokens": report.tokens })
    );
    Ok(())
}

/// Validation loss of an origami checkpoint on the validation split of `data`.
fn eval_checkpoint(path: PathBuf, data: PathBuf, batches: usize) -> anyhow::Result<()> {
    let dir = checkpoint::resolve(&path)?;
    let config = RunConfig::from_toml(&checkpoint::read_state(&dir)?.config_toml, &[])?;
    let model = GptModel::new(config.model.clone())?;
    let params = checkpoint::load_params(&dir, model.registry())?.params;
    let tokenizer = origami::train::data::run_tokenizer(&config)?;
    let t = &config.train;
    let valid = GptDataset::open(
        &data,
        Split::Valid,
        &config.data.split,
        t.seq_len,
        t.seed,
        tokenizer.eod_id(),
    )?;
    let batches = if batches == 0 {
        (valid.len() as usize).div_ceil(t.micro_batch)
    } else {
        batches
    };
    let loss = evaluate(
        &model,
        &Weights::f32(&params),
        &valid,
        (batches, t.micro_batch, t.seq_len),
        &StepGroups::single(),
    )?;
    println!(
        "{}",
        serde_json::json!({ "loss": loss, "split": "valid", "samples": batches * t.micro_batch })
    );
    Ok(())
}
