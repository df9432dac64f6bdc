//! Optimizer: AdamW over the flat parameter buffers, global-norm clipping, learning-rate schedule.

pub mod adamw;
pub mod lr_schedule;
pub mod parallel;
