//! Tokenizers: byte-level (the default; no files needed) and HuggingFace `tokenizer.json`
//! (through the `tokenizers` crate, built without C dependencies).
//!
//! Byte-level ids: 0–255 are the bytes, 256 is the end-of-document token `<|endoftext|>`,
//! 257 the padding token; vocabulary size 258. Decoding replaces invalid UTF-8 with U+FFFD.

use crate::error::DataError;
use std::path::Path;

/// Text ↔ token ids.
pub trait Tokenizer: Send + Sync {
    /// Token ids of `text` (no special tokens added).
    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError>;
    /// Text of `ids`; special tokens are dropped.
    fn decode(&self, ids: &[u32]) -> String;
    /// Number of ids the tokenizer can produce.
    fn vocab_size(&self) -> usize;
    /// The end-of-document token.
    fn eod_id(&self) -> u32;
}

/// Byte-level tokenizer.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// End-of-document id.
    pub const EOD: u32 = 256;
    /// Padding id.
    pub const PAD: u32 = 257;
}

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn vocab_size(&self) -> usize {
        258
    }

    fn eod_id(&self) -> u32 {
        Self::EOD
    }
}

/// A HuggingFace `tokenizer.json`.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    eod: u32,
}

/// Special tokens tried, in order, as the end-of-document token.
const EOD_CANDIDATES: [&str; 5] = [
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
    "<eos>",
    "<|im_end|>",
];

impl HfTokenizer {
    /// Loads `path`; its end-of-document token is the first of `<|endoftext|>`, `</s>`,
    /// `<|end_of_text|>`, `<eos>`, `<|im_end|>` that it knows.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer(format!("{}: {e}", path.display())))?;
        let eod = EOD_CANDIDATES
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .ok_or_else(|| {
                DataError::Tokenizer(format!(
                    "{} has none of the end-of-document tokens {EOD_CANDIDATES:?}",
                    path.display()
                ))
            })?;
        Ok(HfTokenizer { inner, eod })
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn eod_id(&self) -> u32 {
        self.eod
    }
}

/// The tokenizer named by a config value: `byte`, or a path to a `tokenizer.json`.
pub fn load_tokenizer(spec: &str) -> Result<Box<dyn Tokenizer>, DataError> {
    if spec == "byte" {
        Ok(Box::new(ByteTokenizer))
    } else {
        Ok(Box::new(HfTokenizer::open(Path::new(spec))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips_utf8() {
        let text = "Wherefore art thou, Roméo?";
        let ids = ByteTokenizer.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        let mut with_eod = ids.clone();
        with_eod.push(ByteTokenizer::EOD);
        assert_eq!(ByteTokenizer.decode(&with_eod), text);
    }

    #[test]
    fn hf_tokenizer_json_loads_and_encodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let json = r#"{"version":"1.0","truncation":null,"padding":null,
          "added_tokens":[{"id":3,"content":"<|endoftext|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
          "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
          "model":{"type":"WordLevel","vocab":{"to":0,"be":1,"[UNK]":2,"<|endoftext|>":3},"unk_token":"[UNK]"}}"#;
        std::fs::write(&path, json).unwrap();
        let tok = HfTokenizer::open(&path).unwrap();
        assert_eq!(tok.encode("to be or").unwrap(), vec![0, 1, 2]);
        assert_eq!(tok.eod_id(), 3);
        assert_eq!(tok.vocab_size(), 4);
        assert!(HfTokenizer::open(&dir.path().join("missing.json")).is_err());
    }
}
