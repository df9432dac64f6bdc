//! Per-step metrics: the record kept for the JSONL file and the plot, and the one-line log.

use crate::layers::moe::MoeStats;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Everything logged about one optimizer step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// Step number (1-based: the number of updates done).
    pub step: u64,
    /// Training objective `CE + aux + z`, averaged over the step's micro-batches.
    pub loss: f64,
    /// Cross-entropy part (nats per token).
    pub cross_entropy: f64,
    /// Load-balancing loss.
    pub aux_loss: f64,
    /// Router z-loss.
    pub z_loss: f64,
    /// Learning rate used.
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Trained tokens per second over this step.
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation against the best GEMM rate measured so far in the run
    /// (at start-up and at every evaluation).
    pub mfu: f64,
    /// Largest over MoE layers of (max tokens per expert / mean tokens per expert).
    pub expert_load_imbalance: f64,
    /// Share of routed (token, expert) slots dropped for capacity, over all MoE layers.
    pub dropped_fraction: f64,
    /// Tokens per expert, per MoE layer, summed over the step's micro-batches.
    pub tokens_per_expert: Vec<Vec<usize>>,
    /// Validation cross-entropy, on steps that evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// Adds one micro-batch's per-layer expert counts into the step's totals.
pub fn accumulate_expert_counts(totals: &mut Vec<Vec<usize>>, stats: &[MoeStats]) {
    if totals.is_empty() {
        *totals = stats
            .iter()
            .map(|s| vec![0; s.tokens_per_expert.len()])
            .collect();
    }
    for (total, layer) in totals.iter_mut().zip(stats) {
        total
            .iter_mut()
            .zip(&layer.tokens_per_expert)
            .for_each(|(t, c)| *t += c);
    }
}

/// Largest over layers of max/mean tokens per expert (1 = perfectly balanced).
pub fn load_imbalance(counts: &[Vec<usize>]) -> f64 {
    counts
        .iter()
        .filter(|layer| !layer.is_empty())
        .map(|layer| {
            let mean = layer.iter().sum::<usize>() as f64 / layer.len() as f64;
            let max = *layer.iter().max().unwrap_or(&0) as f64;
            if mean > 0.0 {
                max / mean
            } else {
                1.0
            }
        })
        .fold(1.0, f64::max)
}

impl StepRecord {
    /// The human-readable log line of this step.
    pub fn log_line(&self, total_steps: u64) -> String {
        let mut line = format!(
            "step {:>5}/{total_steps} | loss {:.4} | ce {:.4} | aux {:.4} | z {:.5} | lr {:.2e} | grad {:.3} | {:>7.0} tok/s | MFU {:4.1}% | load max/mean {:.2}",
            self.step,
            self.loss,
            self.cross_entropy,
            self.aux_loss,
            self.z_loss,
            self.lr,
            self.grad_norm,
            self.tokens_per_s,
            100.0 * self.mfu,
            self.expert_load_imbalance,
        );
        if let Some(v) = self.val_loss {
            line.push_str(&format!(" | val {v:.4}"));
        }
        line
    }
}

/// A fresh run was pointed at a metrics file that already exists (it is left untouched).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("the metrics file {} already exists, and a fresh run does not append to another run's metrics: delete it, choose another file with `--metrics-out FILE`, or continue the run it belongs to with `--resume`", path.display())]
pub struct MetricsFileExists {
    /// The metrics file.
    pub path: PathBuf,
}

/// Whether something (a file, a directory, even a dangling link) is at `path`, so that a fresh
/// run must not write its metrics there.
pub fn metrics_file_exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Writes step records to a JSONL file, one object per line.
pub struct MetricsWriter {
    file: std::fs::File,
}

impl MetricsWriter {
    /// Creates `path` for a fresh run, refusing with [`MetricsFileExists`] if it already exists.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        create_parent(path)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|error| match error.kind() {
                std::io::ErrorKind::AlreadyExists => anyhow::Error::new(MetricsFileExists {
                    path: path.to_path_buf(),
                }),
                _ => anyhow::Error::new(error)
                    .context(format!("creating the metrics file {}", path.display())),
            })?;
        Ok(MetricsWriter { file })
    }

    /// Opens `path` for appending, creating it if needed (a resumed run continues its file).
    pub fn append(path: &Path) -> anyhow::Result<Self> {
        create_parent(path)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the metrics file {}", path.display()))?;
        Ok(MetricsWriter { file })
    }

    /// Writes one record.
    pub fn write(&mut self, record: &StepRecord) -> anyhow::Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(record)?)?;
        Ok(())
    }
}

fn create_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the directory {}", parent.display()))?;
    }
    Ok(())
}
