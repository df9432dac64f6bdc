//! Pieces of global gradient-norm clipping: the sum of squares of a buffer (combined over
//! buffers and ranks by the caller, each parameter counted once) and the clipping factor, which
//! the AdamW update applies (`AdamWStep::grad_scale`).

use rayon::prelude::*;

/// Partial sums per chunk: independent f64 accumulators, so the adds pipeline and vectorise
/// instead of waiting on one another.
const LANES: usize = 16;

/// `Σ x²` in f64.
pub fn sum_of_squares(x: &[f32]) -> f64 {
    x.par_chunks(1 << 14)
        .map(|c| {
            let mut lanes = [0.0f64; LANES];
            for group in c.chunks(LANES) {
                for (l, &v) in lanes.iter_mut().zip(group) {
                    *l += v as f64 * v as f64;
                }
            }
            lanes.iter().sum::<f64>()
        })
        .sum()
}

/// Factor that brings a gradient of norm `total_norm` to at most `max_norm` (1 if already below).
pub fn clip_factor(total_norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 && total_norm > max_norm {
        (max_norm / (total_norm + 1e-6)) as f32
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_brings_norm_to_the_limit() {
        let mut g = vec![3.0f32, 4.0];
        let norm = sum_of_squares(&g).sqrt();
        assert_eq!(norm, 5.0);
        let factor = clip_factor(norm, 1.0);
        g.iter_mut().for_each(|v| *v *= factor);
        assert!((sum_of_squares(&g).sqrt() - 1.0).abs() < 1e-6);
        let many: Vec<f32> = (0..100_003).map(|i| (i % 97) as f32 * 0.01 - 0.3).collect();
        let exact: f64 = many.iter().map(|&v| v as f64 * v as f64).sum();
        assert!((sum_of_squares(&many) - exact).abs() < 1e-9 * exact);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
    }
}
