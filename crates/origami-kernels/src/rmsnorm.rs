//! RMSNorm over the last dim: `y = x · rstd · w` with `rstd = 1 / sqrt(mean(x²) + eps)`.
//!
//! Saved state: `rstd` per row. Backward, with `g = dy ∘ w`:
//! `dx = rstd·g − x·rstd³·(Σ g∘x)/H` (written), `dw += Σ_rows dy ∘ x · rstd` (accumulated).
//!
//! Fused with the residual stream of a pre-norm block (one pass instead of two, the same
//! arithmetic): [`add_rmsnorm_forward`] adds a branch's output into the residual and
//! normalises the sum; [`rmsnorm_backward_add`] adds the residual's gradient into `dx`.

use rayon::prelude::*;

const ROWS_PER_TASK: usize = 32;

/// Normalises one row into `y`; returns its `rstd`.
#[inline]
fn normalise_row(y: &mut [f32], x: &[f32], weight: &[f32], eps: f32) -> f32 {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (mean_sq + eps).sqrt();
    for ((o, v), w) in y.iter_mut().zip(x).zip(weight) {
        *o = v * r * w;
    }
    r
}

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
                *r = normalise_row(y, x, weight, eps);
            }
        });
    rstd
}

/// `residual += add`, then normalises each row of the sum into `y`; returns `rstd` per row.
pub fn add_rmsnorm_forward(
    y: &mut [f32],
    residual: &mut [f32],
    add: &[f32],
    weight: &[f32],
    width: usize,
    eps: f32,
) -> Vec<f32> {
    assert_eq!(
        residual.len(),
        add.len(),
        "add_rmsnorm_forward lengths differ"
    );
    let rows = residual.len() / width;
    let mut rstd = vec![0.0f32; rows];
    y.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(residual.par_chunks_mut(width * ROWS_PER_TASK))
        .zip(add.par_chunks(width * ROWS_PER_TASK))
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .for_each(|(((y, residual), add), rstd)| {
            for (((y, x), a), r) in y
                .chunks_mut(width)
                .zip(residual.chunks_mut(width))
                .zip(add.chunks(width))
                .zip(rstd.iter_mut())
            {
                x.iter_mut().zip(a).for_each(|(x, a)| *x += a);
                *r = normalise_row(y, x, weight, eps);
            }
        });
    rstd
}

/// Backward of one row: writes `dx` (plus `residual` when given), accumulates `dw`.
#[inline]
#[allow(clippy::too_many_arguments)]
fn backward_row(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    weight: &[f32],
    r: f32,
    residual: Option<&[f32]>,
) {
    let width = x.len();
    let dot: f32 = dy
        .iter()
        .zip(weight)
        .zip(x)
        .map(|((d, w), v)| d * w * v)
        .sum();
    let coeff = r * r * r * dot / width as f32;
    match residual {
        None => {
            for i in 0..width {
                dx[i] = r * dy[i] * weight[i] - x[i] * coeff;
                dw[i] += dy[i] * x[i] * r;
            }
        }
        Some(g) => {
            for i in 0..width {
                dx[i] = (r * dy[i] * weight[i] - x[i] * coeff) + g[i];
                dw[i] += dy[i] * x[i] * r;
            }
        }
    }
}

/// The backward over rows, `residual` (if any) added into `dx`.
#[allow(clippy::too_many_arguments)]
fn backward_rows(
    dx: &mut [f32],
    dweight: &mut [f32],
    dy: &[f32],
    x: &[f32],
    weight: &[f32],
    rstd: &[f32],
    width: usize,
    residual: Option<&[f32]>,
) {
    let chunk = width * ROWS_PER_TASK;
    // Partial weight gradients per fixed chunk of rows, summed in chunk order: deterministic.
    let partial_dweights: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(dy.par_chunks(chunk))
        .zip(x.par_chunks(chunk))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .enumerate()
        .map(|(c, (((dx, dy), x), rstd))| {
            let mut dw = vec![0.0f32; width];
            let g = residual.map(|g| &g[c * chunk..(c * chunk + dx.len())]);
            for (row, (((dx, dy), x), &r)) in dx
                .chunks_mut(width)
                .zip(dy.chunks(width))
                .zip(x.chunks(width))
                .zip(rstd)
                .enumerate()
            {
                let g = g.map(|g| &g[row * width..(row + 1) * width]);
                backward_row(dx, &mut dw, dy, x, weight, r, g);
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
    backward_rows(dx, dweight, dy, x, weight, rstd, width, None);
}

/// [`rmsnorm_backward`] with the residual stream's gradient `residual` added into `dx`
/// (`dx = normᵀ(dy) + residual`), in the same pass.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_add(
    dx: &mut [f32],
    dweight: &mut [f32],
    dy: &[f32],
    x: &[f32],
    weight: &[f32],
    rstd: &[f32],
    width: usize,
    residual: &[f32],
) {
    assert_eq!(
        residual.len(),
        dx.len(),
        "rmsnorm_backward_add lengths differ"
    );
    backward_rows(dx, dweight, dy, x, weight, rstd, width, Some(residual));
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
    fn fused_residual_passes_match_the_separate_ones_bit_for_bit() {
        let (rows, width) = (70, 24);
        let (x, add, w) = (
            random_vec(rows * width, 4),
            random_vec(rows * width, 5),
            random_vec(width, 6),
        );
        let (dy, g) = (random_vec(rows * width, 7), random_vec(rows * width, 8));
        let sum: Vec<f32> = x.iter().zip(&add).map(|(a, b)| a + b).collect();
        let mut y = vec![0.0; x.len()];
        let rstd = rmsnorm_forward(&mut y, &sum, &w, width, 1e-5);
        let (mut fused_y, mut residual) = (vec![0.0; x.len()], x.clone());
        let fused_rstd = add_rmsnorm_forward(&mut fused_y, &mut residual, &add, &w, width, 1e-5);
        assert_eq!((&residual, &fused_y, &fused_rstd), (&sum, &y, &rstd));
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; width]);
        rmsnorm_backward(&mut dx, &mut dw, &dy, &sum, &w, &rstd, width);
        dx.iter_mut().zip(&g).for_each(|(d, g)| *d += g);
        let (mut fused_dx, mut fused_dw) = (vec![0.0; x.len()], vec![0.0; width]);
        rmsnorm_backward_add(
            &mut fused_dx,
            &mut fused_dw,
            &dy,
            &sum,
            &w,
            &rstd,
            width,
            &g,
        );
        assert_eq!((&fused_dx, &fused_dw), (&dx, &dw));
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
