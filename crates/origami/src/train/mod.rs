//! Training: the run configuration, the loop, checkpoints, metrics and the run's plot.

pub mod checkpoint;
pub mod config;
pub mod consolidate;
pub mod data;
pub mod metrics;
pub mod pipeline;
pub mod plot;
pub mod run;
pub mod step;
pub mod trainer;
