//! `prepare`: turns a `.jsonl` file (one document per line, text under a key) or a `.txt` file
//! (one document) into an indexed dataset, one sequence per document, optionally ending each
//! document with the end-of-document token.

use crate::dtype::TokenDtype;
use crate::error::DataError;
use crate::indexed::{IndexedWriter, WriteSummary};
use crate::tokenizer::Tokenizer;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// What to prepare.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// `.jsonl` or `.txt` input.
    pub input: PathBuf,
    /// Output prefix (`PREFIX.bin`, `PREFIX.idx`).
    pub output_prefix: PathBuf,
    /// JSON key holding the text in `.jsonl` input.
    pub json_key: String,
    /// End every document with the end-of-document token.
    pub append_eod: bool,
    /// Show a progress bar.
    pub progress: bool,
}

fn encode_document(
    tokenizer: &dyn Tokenizer,
    text: &str,
    append_eod: bool,
) -> Result<Vec<u32>, DataError> {
    let mut ids = tokenizer.encode(text)?;
    if append_eod {
        ids.push(tokenizer.eod_id());
    }
    Ok(ids)
}

/// Tokenizes `options.input` and writes the dataset.
pub fn prepare(
    options: &PrepareOptions,
    tokenizer: &dyn Tokenizer,
) -> Result<WriteSummary, DataError> {
    let input = &options.input;
    let extension = input.extension().and_then(|e| e.to_str()).unwrap_or("");
    let file = std::fs::File::open(input).map_err(|e| DataError::io(input, e))?;
    let size = file.metadata().map_err(|e| DataError::io(input, e))?.len();
    let bar = if options.progress {
        indicatif::ProgressBar::new(size)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("preparing {bar:40} {bytes}/{total_bytes} [{eta}]")
            .expect("valid template"),
    );
    let mut writer = IndexedWriter::create(
        &options.output_prefix,
        TokenDtype::for_vocab(tokenizer.vocab_size()),
    )?;
    match extension {
        "jsonl" | "json" => {
            for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| DataError::io(input, e))?;
                bar.inc(line.len() as u64 + 1);
                if line.trim().is_empty() {
                    continue;
                }
                let text = document_text(&line, &options.json_key).map_err(|problem| {
                    DataError::BadInput {
                        path: input.clone(),
                        line: n + 1,
                        problem,
                    }
                })?;
                writer.add_document(&encode_document(tokenizer, &text, options.append_eod)?)?;
            }
        }
        "txt" | "text" => {
            let text = std::fs::read_to_string(input).map_err(|e| DataError::io(input, e))?;
            bar.inc(size);
            writer.add_document(&encode_document(tokenizer, &text, options.append_eod)?)?;
        }
        other => {
            return Err(DataError::Invalid(format!(
                "{}: unknown input type {other:?} (expected .jsonl or .txt)",
                input.display()
            )))
        }
    }
    bar.finish_and_clear();
    writer.finish()
}

fn document_text(line: &str, key: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    match value.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("key {key:?} does not hold a string")),
        None => Err(format!("no key {key:?}")),
    }
}

/// Whether the dataset `prefix` already exists (both files).
pub fn is_prepared(prefix: &Path) -> bool {
    let (bin, idx) = crate::indexed::paths(prefix);
    bin.exists() && idx.exists()
}
