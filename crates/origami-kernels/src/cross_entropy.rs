//! Softmax cross-entropy over the vocabulary, with optional z-loss, fused with its backward.
//!
//! For a row of logits `x` and target `y`: `lse = log Σ e^x`, `ce = lse − x_y`,
//! `z = lse²`. With the total loss `L = scale · Σ_rows (ce + z_coeff · z)`, the gradient is
//! `dL/dx_j = scale · (p_j · (1 + 2·z_coeff·lse) − [j = y])` with `p = softmax(x)`; it is
//! written over the logits so that no second `[rows, vocab]` buffer is needed.
//! Rows whose target is [`IGNORE_TARGET`] contribute nothing and get a zero gradient.
//! Sums are taken in row order, so results do not depend on thread scheduling.

use crate::row_exp::{exp_in_place, scaled_max};
use rayon::prelude::*;

/// Target value that excludes a row from the loss (padding).
pub const IGNORE_TARGET: u32 = u32::MAX;

/// Loss sums over the rows of one call (not yet averaged).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrossEntropySums {
    /// `Σ ce` over counted rows.
    pub cross_entropy: f64,
    /// `Σ lse²` over counted rows (multiply by the z-loss coefficient for the loss).
    pub z_squared: f64,
    /// Rows counted.
    pub rows: usize,
}

impl std::ops::AddAssign for CrossEntropySums {
    fn add_assign(&mut self, other: Self) {
        self.cross_entropy += other.cross_entropy;
        self.z_squared += other.z_squared;
        self.rows += other.rows;
    }
}

/// `row ← e^(row − max)`; returns `(lse, Σ e^(row − max))`. The passes are [`crate::row_exp`]'s
/// (16 lanes, summed in a fixed tree), so training and evaluation get the same `lse`.
fn exponentials_in_place(row: &mut [f32]) -> (f32, f32) {
    let max = scaled_max(row, 1.0);
    let sum = exp_in_place(row, row.len(), 1.0, max);
    (max + sum.ln(), sum)
}

/// Per-row cross-entropy of `logits[rows, vocab]` (forward only, e.g. for evaluation);
/// ignored rows give 0.
pub fn cross_entropy_rows(logits: &[f32], targets: &[u32], vocab: usize) -> Vec<f32> {
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map_init(Vec::new, |scratch, (row, &t)| {
            if t == IGNORE_TARGET {
                return 0.0;
            }
            scratch.clear();
            scratch.extend_from_slice(row);
            exponentials_in_place(scratch).0 - row[t as usize]
        })
        .collect()
}

/// Computes the loss sums and overwrites `logits` with `dL/dlogits` (see the module doc).
pub fn cross_entropy_forward_backward(
    logits: &mut [f32],
    targets: &[u32],
    vocab: usize,
    z_loss_coeff: f32,
    scale: f32,
) -> CrossEntropySums {
    assert_eq!(
        logits.len(),
        targets.len() * vocab,
        "logits and targets disagree"
    );
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            if t == IGNORE_TARGET {
                row.fill(0.0);
                return CrossEntropySums::default();
            }
            let t = t as usize;
            assert!(t < vocab, "target {t} outside vocabulary of {vocab}");
            let target_logit = row[t];
            let (lse, sum) = exponentials_in_place(row);
            let ce = lse - target_logit;
            let factor = scale * (1.0 + 2.0 * z_loss_coeff * lse) / sum;
            row.iter_mut().for_each(|v| *v *= factor);
            row[t] -= scale;
            CrossEntropySums {
                cross_entropy: ce as f64,
                z_squared: (lse * lse) as f64,
                rows: 1,
            }
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(CrossEntropySums::default(), |mut a, b| {
            a += b;
            a
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradient_with, random_vec};

    #[test]
    fn loss_matches_definition() {
        let logits = [1.0f32, 2.0, 3.0, 0.5, 0.5, 0.5];
        let rows = cross_entropy_rows(&logits, &[2, 0], 3);
        let lse0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((rows[0] as f64 - (lse0 - 3.0)).abs() < 1e-5);
        assert!((rows[1] as f64 - 3f64.ln()).abs() < 1e-5);
    }

    #[test]
    fn gradient_with_z_loss_matches_finite_differences_and_skips_ignored_rows() {
        let vocab = 7;
        let logits: Vec<f32> = random_vec(4 * vocab, 3).iter().map(|v| v * 3.0).collect();
        let targets = [3, IGNORE_TARGET, 0, 6];
        let (z, scale) = (0.1, 0.25);
        let total = |x: &[f32]| {
            let mut x = x.to_vec();
            let s = cross_entropy_forward_backward(&mut x, &targets, vocab, z, scale);
            scale as f64 * (s.cross_entropy + z as f64 * s.z_squared)
        };
        let mut grad = logits.clone();
        let sums = cross_entropy_forward_backward(&mut grad, &targets, vocab, z, scale);
        assert_eq!(sums.rows, 3);
        assert!(grad[vocab..2 * vocab].iter().all(|&g| g == 0.0));
        check_gradient_with(&logits, &grad, &mut { total }, 1e-2, 1e-2, "cross entropy");
    }
}
