//! Grouped bf16 linear layer over experts, the bf16 twin of [`crate::grouped_matmul`]: rows of
//! `x` are grouped contiguously by expert (`offsets[e]..offsets[e+1]`, any count including zero,
//! no padding), and group `e` is multiplied by its own bf16 weight `W[e]` of shape `[out, in]`:
//! `y_e = x_e·W[e]ᵀ`, f32 accumulation and f32 output.
//!
//! Backward: `dx_e = dy_e·W[e]` (written), `dW[e] += dy_eᵀ·x_e` (accumulated, f32).
//! Groups run in parallel, each GEMM on one thread and each group its own task (so that
//! experts of unequal size balance over the threads), unless there are too few groups to keep
//! every thread busy, in which case each GEMM uses all threads (as the f32 version).

use crate::bf16::Bf16;
use crate::grouped_matmul::{for_each_group, inner_par, split_groups};
use crate::matmul::{View, ViewMut};
use crate::matmul_bf16::{matmul_bf16_with, Bf16Kernel};

/// `y[rows, out]` from `x[rows, in]` and `weights[groups, out, in]`.
pub fn grouped_linear_forward_bf16(
    y: &mut [f32],
    x: &[Bf16],
    weights: &[Bf16],
    offsets: &[usize],
    in_features: usize,
    out_features: usize,
    kernel: Bf16Kernel,
) {
    let groups = offsets.len() - 1;
    let weight_size = out_features * in_features;
    assert_eq!(weights.len(), groups * weight_size, "grouped weights size");
    let par = inner_par(groups);
    let run = |(e, y_e): (usize, &mut [f32])| {
        let rows = offsets[e + 1] - offsets[e];
        let x_e = &x[offsets[e] * in_features..offsets[e + 1] * in_features];
        let w_e = &weights[e * weight_size..(e + 1) * weight_size];
        matmul_bf16_with(
            kernel,
            ViewMut::new(y_e, rows, out_features),
            View::new(x_e, rows, in_features),
            View::new(w_e, out_features, in_features).t(),
            false,
            par,
        );
    };
    for_each_group(split_groups(y, offsets, out_features), par, run);
}

/// Backward of [`grouped_linear_forward_bf16`]: writes `dx` (if given), accumulates `dweights`.
pub fn grouped_linear_backward_bf16(
    dx: Option<&mut [f32]>,
    dweights: &mut [f32],
    dy: &[Bf16],
    x: &[Bf16],
    weights: &[Bf16],
    offsets: &[usize],
    in_features: usize,
    out_features: usize,
    kernel: Bf16Kernel,
) {
    let groups = offsets.len() - 1;
    let par = inner_par(groups);
    let weight_size = out_features * in_features;
    assert_eq!(weights.len(), groups * weight_size, "grouped weights size");
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
            let out = ViewMut::new(dx_e, rows, in_features);
            matmul_bf16_with(kernel, out, dy_e, w_e, false, par);
        }
        let out = ViewMut::new(dw_e, out_features, in_features);
        matmul_bf16_with(kernel, out, dy_e.t(), x_e, true, par);
    };
    let work: Vec<_> = dweights.chunks_mut(weight_size).zip(dx_parts).collect();
    for_each_group(work, par, run);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::to_bf16_vec;
    use crate::matmul_bf16::tests::{check_product, kernels};
    use crate::testing::random_vec;

    /// Checks every group's forward and backward products with the bf16 bounds of
    /// [`check_product`], for group counts that run groups in parallel and sequentially.
    #[test]
    fn forward_and_backward_with_empty_and_odd_groups() {
        let (inf, outf) = (19, 53);
        for offsets in [
            vec![0, 9, 9, 26, 26, 27],
            vec![0, 0, 70],
            vec![0, 3, 3, 3, 5, 64],
        ] {
            let groups = offsets.len() - 1;
            let rows = offsets[groups];
            let x32 = random_vec(rows * inf, 1);
            let w32 = random_vec(groups * outf * inf, 2);
            let dy32 = random_vec(rows * outf, 3);
            let (x, w, dy) = (to_bf16_vec(&x32), to_bf16_vec(&w32), to_bf16_vec(&dy32));
            let dw0 = random_vec(w.len(), 4);
            for kernel in kernels() {
                let mut y = vec![0.0; rows * outf];
                grouped_linear_forward_bf16(&mut y, &x, &w, &offsets, inf, outf, kernel);
                let (mut dx, mut dw) = (vec![7.0; rows * inf], dw0.clone());
                grouped_linear_backward_bf16(
                    Some(&mut dx),
                    &mut dw,
                    &dy,
                    &x,
                    &w,
                    &offsets,
                    inf,
                    outf,
                    kernel,
                );
                for e in 0..groups {
                    let (r0, n) = (offsets[e], offsets[e + 1] - offsets[e]);
                    let wo = e * outf * inf;
                    let what = format!("{kernel:?} {offsets:?} group {e}");
                    let xe = |i: usize, p: usize| x32[(r0 + i) * inf + p];
                    let dye = |i: usize, p: usize| dy32[(r0 + i) * outf + p];
                    let we = |o: usize, p: usize| w32[wo + o * inf + p];
                    check_product(
                        &y[r0 * outf..(r0 + n) * outf],
                        None,
                        n,
                        inf,
                        outf,
                        xe,
                        |p, o| we(o, p),
                        &format!("{what} y"),
                    );
                    check_product(
                        &dx[r0 * inf..(r0 + n) * inf],
                        None,
                        n,
                        outf,
                        inf,
                        dye,
                        we,
                        &format!("{what} dx"),
                    );
                    check_product(
                        &dw[wo..wo + outf * inf],
                        Some(&dw0[wo..wo + outf * inf]),
                        outf,
                        n,
                        inf,
                        |o, r| dye(r, o),
                        xe,
                        &format!("{what} dw"),
                    );
                }
            }
        }
    }
}
