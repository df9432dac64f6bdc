//! origami-data: tokenizers, Megatron-compatible indexed datasets (`.bin` + `.idx`), and GPT
//! training samples whose order depends only on (seed, global sample index).

pub mod dtype;
pub mod error;
pub mod gpt_dataset;
pub mod indexed;
pub mod permutation;
pub mod prepare;
pub mod tokenizer;

pub use error::DataError;
