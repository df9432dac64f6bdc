//! Pieces of global gradient-norm clipping: the sum of squares of a buffer (combined over
//! buffers and ranks by the caller, each parameter counted once) and the rescale.

use rayon::prelude::*;

/// `Σ x²` in f64.
pub fn sum_of_squares(x: &[f32]) -> f64 {
    x.par_chunks(1 << 14)
        .map(|c| c.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>())
        .sum()
}

/// Multiplies every element by `factor`.
pub fn scale_in_place(x: &mut [f32], factor: f32) {
    x.par_chunks_mut(1 << 14)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
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
        scale_in_place(&mut g, clip_factor(norm, 1.0));
        assert!((sum_of_squares(&g).sqrt() - 1.0).abs() < 1e-6);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
    }
}
