//! `origami prepare`: text or JSONL into a Megatron indexed dataset.

use anyhow::Context;
use clap::Args;
use origami_data::prepare::{prepare, PrepareOptions};
use origami_data::tokenizer::load_tokenizer;
use std::path::PathBuf;

/// Arguments of `origami prepare`.
#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Input: `.jsonl` (one document per line) or `.txt` (one document).
    #[arg(long)]
    pub input: PathBuf,
    /// Output prefix: writes PREFIX.bin and PREFIX.idx.
    #[arg(long)]
    pub output_prefix: PathBuf,
    /// `byte`, or the path of a HuggingFace tokenizer.json.
    #[arg(long, default_value = "byte")]
    pub tokenizer: String,
    /// JSON key holding each document's text.
    #[arg(long, default_value = "text")]
    pub json_key: String,
    /// End every document with the end-of-document token.
    #[arg(long)]
    pub append_eod: bool,
}

/// Prepares the dataset and prints a summary.
pub fn run(args: PrepareArgs) -> anyhow::Result<()> {
    let tokenizer = load_tokenizer(&args.tokenizer)?;
    let options = PrepareOptions {
        input: args.input.clone(),
        output_prefix: args.output_prefix.clone(),
        json_key: args.json_key,
        append_eod: args.append_eod,
        progress: true,
    };
    let summary = prepare(&options, tokenizer.as_ref())
        .with_context(|| format!("preparing {}", args.input.display()))?;
    println!(
        "{} documents, {} tokens ({} bytes) -> {}.bin / .idx",
        summary.documents,
        summary.tokens,
        summary.bytes,
        args.output_prefix.display()
    );
    Ok(())
}
