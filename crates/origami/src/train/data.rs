//! The data of a run: the tokenizer, preparation of the source text on first use, and the
//! training and validation splits.

use super::config::RunConfig;
use anyhow::{ensure, Context};
use origami_data::gpt_dataset::{split_documents, GptDataset, Split};
use origami_data::indexed::IndexedDataset;
use origami_data::prepare::{is_prepared, prepare, PrepareOptions};
use origami_data::tokenizer::{load_tokenizer, Tokenizer};
use std::sync::Arc;

/// The tokenizer and the sample streams of a run.
pub struct RunData {
    /// The run's tokenizer.
    pub tokenizer: Box<dyn Tokenizer>,
    /// Training samples.
    pub train: GptDataset,
    /// Validation samples, when the split gives validation documents.
    pub valid: Option<GptDataset>,
}

/// Loads the tokenizer named in the config and checks it fits the model's vocabulary.
pub fn run_tokenizer(config: &RunConfig) -> anyhow::Result<Box<dyn Tokenizer>> {
    let tokenizer = load_tokenizer(&config.data.tokenizer)?;
    ensure!(
        tokenizer.vocab_size() <= config.model.vocab_size,
        "data.tokenizer {:?} has {} tokens but model.vocab_size = {}",
        config.data.tokenizer,
        tokenizer.vocab_size(),
        config.model.vocab_size
    );
    Ok(tokenizer)
}

/// Prepares `data.source` into `data.prefix` if that dataset does not exist, then opens the splits.
pub fn open_run_data(config: &RunConfig, progress: bool) -> anyhow::Result<RunData> {
    let tokenizer = run_tokenizer(config)?;
    let d = &config.data;
    if !is_prepared(&d.prefix) {
        let source = d.source.as_ref().with_context(|| {
            format!(
                "no dataset at {} (.bin/.idx) and no data.source to prepare it from",
                d.prefix.display()
            )
        })?;
        let summary = prepare(
            &PrepareOptions {
                input: source.clone(),
                output_prefix: d.prefix.clone(),
                json_key: d.json_key.clone(),
                append_eod: true,
                progress,
            },
            tokenizer.as_ref(),
        )
        .with_context(|| format!("preparing {}", source.display()))?;
        if progress {
            println!(
                "prepared {}: {} documents, {} tokens -> {}.bin/.idx",
                source.display(),
                summary.documents,
                summary.tokens,
                d.prefix.display()
            );
        }
    }
    let indexed = Arc::new(IndexedDataset::open(&d.prefix)?);
    let splits = split_documents(indexed.num_documents(), &d.split)?;
    let (seq, seed, eod) = (config.train.seq_len, config.train.seed, tokenizer.eod_id());
    let train = GptDataset::new(indexed.clone(), Split::Train, &d.split, seq, seed, eod)?;
    let valid = if splits[1].is_empty() {
        None
    } else {
        Some(GptDataset::new(
            indexed,
            Split::Valid,
            &d.split,
            seq,
            seed,
            eod,
        )?)
    };
    Ok(RunData {
        tokenizer,
        train,
        valid,
    })
}
