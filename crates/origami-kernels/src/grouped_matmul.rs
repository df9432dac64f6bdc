//! Grouped linear layer over experts: rows of `x` are grouped contiguously by expert
//! (`offsets[e]..offsets[e+1]`, any count including zero, no padding), and group `e` is
//! multiplied by its own weight `W[e]` of shape `[out, in]`: `y_e = x_e·W[e]ᵀ`.
//!
//! Backward: `dx_e = dy_e·W[e]` (written), `dW[e] += dy_eᵀ·x_e` (accumulated).
//! Groups run in parallel, each GEMM on one thread and each group its own task (so that
//! experts of unequal size balance over the threads), unless there are too few groups to keep
//! every thread busy, in which case each GEMM uses all threads.

use crate::matmul::{matmul, Par, View, ViewMut};
use rayon::prelude::*;

/// Splits `data` into the per-group row blocks given by `offsets` (width elements per row).
pub(crate) fn split_groups<'a>(
    mut data: &'a mut [f32],
    offsets: &[usize],
    width: usize,
) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(offsets.len() - 1);
    for w in offsets.windows(2) {
        let (head, tail) = data.split_at_mut((w[1] - w[0]) * width);
        parts.push(head);
        data = tail;
    }
    parts
}

pub(crate) fn inner_par(groups: usize) -> Par {
    if groups >= 2 * rayon::current_num_threads() {
        Par::Seq
    } else {
        Par::All
    }
}

/// Runs `run` on every group's `(index, work)`: each group its own task when the GEMMs run on
/// one thread (`par` from [`inner_par`]), so unequal groups balance over the threads; else one
/// after another, each GEMM on all threads.
pub(crate) fn for_each_group<W: Send>(
    work: Vec<W>,
    par: Par,
    run: impl Fn((usize, W)) + Sync + Send,
) {
    if par == Par::Seq {
        work.into_par_iter()
            .enumerate()
            .with_max_len(1)
            .for_each(run);
    } else {
        work.into_iter().enumerate().for_each(run);
    }
}

/// `y[rows, out]` from `x[rows, in]` and `weights[groups, out, in]`.
pub fn grouped_linear_forward(
    y: &mut [f32],
    x: &[f32],
    weights: &[f32],
    offsets: &[usize],
    in_features: usize,
    out_features: usize,
) {
    let groups = offsets.len() - 1;
    assert_eq!(
        weights.len(),
        groups * out_features * in_features,
        "grouped weights size"
    );
    let par = inner_par(groups);
    let run = |(e, y_e): (usize, &mut [f32])| {
        let rows = offsets[e + 1] - offsets[e];
        let x_e = &x[offsets[e] * in_features..offsets[e + 1] * in_features];
        let w_e = &weights[e * out_features * in_features..(e + 1) * out_features * in_features];
        matmul(
            ViewMut::new(y_e, rows, out_features),
            View::new(x_e, rows, in_features),
            View::new(w_e, out_features, in_features).t(),
            false,
            par,
        );
    };
    for_each_group(split_groups(y, offsets, out_features), par, run);
}

/// Backward of [`grouped_linear_forward`]: writes `dx` (if given), accumulates `dweights`.
pub fn grouped_linear_backward(
    dx: Option<&mut [f32]>,
    dweights: &mut [f32],
    dy: &[f32],
    x: &[f32],
    weights: &[f32],
    offsets: &[usize],
    in_features: usize,
    out_features: usize,
) {
    let groups = offsets.len() - 1;
    let par = inner_par(groups);
    let weight_size = out_features * in_features;
    let dx_parts: Vec<Option<&mut [f32]>> = match dx {
        Some(dx) => split_groups(dx, offsets, in_features)
            .into_iter()
            .map(Some)
            .collect(),
        None => (0..groups).map(|_| None).collect(),
    };
    let run = |(e, (dw_e, dx_e)): (usize, (&mut [f32], Option<&mut [f32]>))| {
        let rows = offsets[e + 1] - offsets[e];
        let x_e = View::new(
            &x[offsets[e] * in_features..offsets[e + 1] * in_features],
            rows,
            in_features,
        );
        let dy_e = View::new(
            &dy[offsets[e] * out_features..offsets[e + 1] * out_features],
            rows,
            out_features,
        );
        let w_e = View::new(
            &weights[e * weight_size..(e + 1) * weight_size],
            out_features,
            in_features,
        );
        if let Some(dx_e) = dx_e {
            matmul(ViewMut::new(dx_e, rows, in_features), dy_e, w_e, false, par);
        }
        matmul(
            ViewMut::new(dw_e, out_features, in_features),
            dy_e.t(),
            x_e,
            true,
            par,
        );
    };
    let work: Vec<_> = dweights.chunks_mut(weight_size).zip(dx_parts).collect();
    for_each_group(work, par, run);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_gradient, probe_loss, random_vec};

    #[test]
    fn forward_and_backward_with_empty_groups() {
        let (inf, outf) = (3, 4);
        let offsets = [0, 2, 2, 5, 5];
        let rows = 5;
        let x = random_vec(rows * inf, 1);
        let w = random_vec(4 * outf * inf, 2);
        let mut y = vec![0.0; rows * outf];
        grouped_linear_forward(&mut y, &x, &w, &offsets, inf, outf);
        let group_of = |r: usize| {
            offsets
                .windows(2)
                .position(|g| r >= g[0] && r < g[1])
                .unwrap()
        };
        let expected: Vec<f32> = (0..rows * outf)
            .map(|i| {
                let (r, o) = (i / outf, i % outf);
                let e = group_of(r);
                (0..inf)
                    .map(|j| x[r * inf + j] * w[(e * outf + o) * inf + j])
                    .sum()
            })
            .collect();
        assert_close(&y, &expected, 1e-5, "grouped forward");

        let probe = random_vec(rows * outf, 3);
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        grouped_linear_backward(Some(&mut dx), &mut dw, &probe, &x, &w, &offsets, inf, outf);
        let loss = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; rows * outf];
            grouped_linear_forward(&mut y, x, w, &offsets, inf, outf);
            probe_loss(&y, &probe)
        };
        check_gradient(&x, &dx, |x| loss(x, &w), "grouped dx");
        check_gradient(&w, &dw, |w| loss(&x, w), "grouped dw");
        assert!(
            dw[outf * inf..2 * outf * inf].iter().all(|&g| g == 0.0),
            "empty group got a gradient"
        );
    }
}
