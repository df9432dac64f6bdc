//! RMSNorm over the last dim: `y = x · rstd · w` with `rstd = 1 / sqrt(mean(x²) + eps)`.
//!
//! Saved state: `rstd` per row. Backward, with `g = dy ∘ w`:
//! `dx = rstd·g − x·rstd³·(Σ g∘x)/H` (written), `dw += Σ_rows dy ∘ x · rstd` (accumulated).

use rayon::prelude::*;

const ROWS_PER_TASK: usize = 32;

/// Normalises each row of `x[rows, width]` into `y`; returns `rstd` per row for the backward.
pub fn rmsnorm_forward(
    y: &mut [f32],
    x: &[f32],
    weight: &[f32],
    width: usize,
    eps: f32,
) -> Vec<f32> {
    let rows = x.len() / width;
    let mut rstd = vec![0.0f32; rows];
    y.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .for_each(|((y, x), rstd)| {
            for ((y, x), r) in y
                .chunks_mut(width)
                .zip(x.chunks(width))
                .zip(rstd.iter_mut())
            {
                let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
                *r = 1.0 / (mean_sq + eps).sqrt();
                for ((o, v), w) in y.iter_mut().zip(x).zip(weight) {
                    *o = v * *r * w;
                }
            }
        });
    rstd
}

/// Backward of [`rmsnorm_forward`]: writes `dx`, accumulates `dweight`.
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dweight: &mut [f32],
    dy: &[f32],
    x: &[f32],
    weight: &[f32],
    rstd: &[f32],
    width: usize,
) {
    // Partial weight gradients per fixed chunk of rows, summed in chunk order: deterministic.
    let partial_dweights: Vec<Vec<f32>> = dx
        .par_chunks_mut(width * ROWS_PER_TASK)
        .zip(dy.par_chunks(width * ROWS_PER_TASK))
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .map(|(((dx, dy), x), rstd)| {
            let mut dw = vec![0.0f32; width];
            for (((dx, dy), x), &r) in dx
                .chunks_mut(width)
                .zip(dy.chunks(width))
                .zip(x.chunks(width))
                .zip(rstd)
            {
                let dot: f32 = dy
                    .iter()
                    .zip(weight)
                    .zip(x)
                    .map(|((d, w), v)| d * w * v)
                    .sum();
                let coeff = r * r * r * dot / width as f32;
                for i in 0..width {
                    dx[i] = r * dy[i] * weight[i] - x[i] * coeff;
                    dw[i] += dy[i] * x[i] * r;
                }
            }
            dw
        })
        .collect();
    for partial in partial_dweights {
        for (d, p) in dweight.iter_mut().zip(partial) {
            *d += p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradient, probe_loss, random_vec};

    #[test]
    fn gradients_match_finite_differences() {
        let (rows, width) = (6, 8);
        let x = random_vec(rows * width, 1);
        let w = random_vec(width, 2);
        let probe = random_vec(rows * width, 3);
        let loss = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; x.len()];
            rmsnorm_forward(&mut y, x, w, width, 1e-5);
            probe_loss(&y, &probe)
        };
        let mut y = vec![0.0; x.len()];
        let rstd = rmsnorm_forward(&mut y, &x, &w, width, 1e-5);
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; width]);
        rmsnorm_backward(&mut dx, &mut dw, &probe, &x, &w, &rstd, width);
        check_gradient(&x, &dx, |x| loss(x, &w), "rmsnorm dx");
        check_gradient(&w, &dw, |w| loss(&x, w), "rmsnorm dw");
    }

    #[test]
    fn unit_weight_output_has_unit_rms() {
        let x = random_vec(16, 9);
        let mut y = vec![0.0; 16];
        rmsnorm_forward(&mut y, &x, &[1.0; 16], 16, 0.0);
        let rms = (y.iter().map(|v| v * v).sum::<f32>() / 16.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-5, "rms {rms}");
    }
}
