//! `origami generate`: sample text from a checkpoint, with a key/value cache.

use clap::Args;
use origami::generate::{generate, SamplingSettings};
use origami::model::gpt::GptModel;
use origami::train::checkpoint;
use origami::train::config::RunConfig;
use origami::train::data::run_tokenizer;
use std::path::PathBuf;

/// Arguments of `origami generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint or run directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Prints the prompt and its continuation.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let dir = checkpoint::resolve(&args.checkpoint)?;
    let state = checkpoint::read_state(&dir)?;
    let config = RunConfig::from_toml(&state.config_toml, &[])?;
    let model = GptModel::new(config.model.clone())?;
    let params = checkpoint::load_params(&dir, model.registry())?.params;
    let tokenizer = run_tokenizer(&config)?;
    let prompt = tokenizer.encode(&args.prompt)?;
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    let settings = SamplingSettings {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    let tokens = generate(
        &model,
        &params,
        &prompt,
        &settings,
        Some(tokenizer.eod_id()),
    );
    println!("{}{}", args.prompt, tokenizer.decode(&tokens));
    Ok(())
}
