//! The GPT-MoE model: its configuration, its parallel groups, and the assembled forward/backward.

pub mod chunk;
pub mod config;
pub mod flops;
pub mod gpt;
pub mod parallel;
