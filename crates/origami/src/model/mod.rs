//! The GPT-MoE model: configuration, parameter registry and initialisation, and the assembled
//! forward/backward.

pub mod config;
pub mod flops;
pub mod gpt;
pub mod init;
pub mod parallel;
pub mod params;
