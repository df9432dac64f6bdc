//! Row softmax and its backward, `dx = y ∘ (dy − Σ dy∘y)`, for small widths (router scores).

/// Softmax of each row of `x[rows, width]`, in place, computed stably (max subtracted).
pub fn softmax_rows(x: &mut [f32], width: usize) {
    for row in x.chunks_mut(width) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
}

/// Backward of [`softmax_rows`] given its output `y`: writes `dx`.
pub fn softmax_rows_backward(dx: &mut [f32], dy: &[f32], y: &[f32], width: usize) {
    for ((dx, dy), y) in dx
        .chunks_mut(width)
        .zip(dy.chunks(width))
        .zip(y.chunks(width))
    {
        let dot: f32 = dy.iter().zip(y).map(|(a, b)| a * b).sum();
        for i in 0..width {
            dx[i] = y[i] * (dy[i] - dot);
        }
    }
}

/// `log Σ exp(row)` of one row, computed stably.
pub fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradient, probe_loss, random_vec};

    #[test]
    fn gradient_matches_finite_differences() {
        let width = 5;
        let x = random_vec(3 * width, 1);
        let probe = random_vec(x.len(), 2);
        let mut y = x.clone();
        softmax_rows(&mut y, width);
        let mut dx = vec![0.0; x.len()];
        softmax_rows_backward(&mut dx, &probe, &y, width);
        check_gradient(
            &x,
            &dx,
            |x| {
                let mut y = x.to_vec();
                softmax_rows(&mut y, width);
                probe_loss(&y, &probe)
            },
            "softmax",
        );
    }

    #[test]
    fn logsumexp_is_stable_for_large_values() {
        assert!((logsumexp(&[1000.0, 1000.0]) - (1000.0 + 2f32.ln())).abs() < 1e-3);
    }
}
