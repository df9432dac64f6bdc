//! The compute entry points the layers call: linear and grouped-linear forward and backward,
//! and the attention core, in the precision of their [`Weights`].
//!
//! - f32: the f32 kernels on the master weights, exactly as without this interface.
//! - bf16: the bf16 GEMMs on the weights' bf16 copies; inputs arrive as bf16 [`Activation`]s
//!   or are rounded here, the backward rounds the output gradient `dy` once for both of its
//!   products (`dx = dy·W`, `dW += dyᵀ·x`), sums stay in f32 and every output and gradient is
//!   f32. The bias gradient is summed from the f32 `dy`, as in f32.
//!
//! The attention core in bf16 rounds q/k/v (and the output gradient) once and runs its tile
//! products on the bf16 GEMM; softmax, running max and sum stay f32.
//!
//! Memory rule as the kernels': parameter gradients accumulate, `dx` is written unless asked
//! to add.

use std::borrow::Cow;

use super::activation::{round_to_bf16, Input};
use super::precision::Compute;
use super::weights::Weights;
use crate::params::ParamId;
use crate::profile::{scope, Phase};
use origami_kernels::attention::{
    attention_backward, attention_forward, AttentionShape, QkvLayout,
};
use origami_kernels::attention_bf16::{attention_backward_bf16, attention_forward_bf16};
use origami_kernels::bf16::{to_f32_vec, Bf16};
use origami_kernels::grouped_matmul::{grouped_linear_backward, grouped_linear_forward};
use origami_kernels::grouped_matmul_bf16::{
    grouped_linear_backward_bf16, grouped_linear_forward_bf16,
};
use origami_kernels::matmul::{
    column_sums_into, linear_backward, linear_forward, LinearGrads, Par,
};
use origami_kernels::matmul_bf16::{linear_backward_bf16, linear_forward_bf16};

/// The shape of a linear layer's product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    /// Rows of the input.
    pub rows: usize,
    /// Input features.
    pub input: usize,
    /// Output features.
    pub output: usize,
}

impl LinearShape {
    /// `rows × input → rows × output`.
    pub fn new(rows: usize, input: usize, output: usize) -> Self {
        LinearShape {
            rows,
            input,
            output,
        }
    }
}

/// One row (incremental decoding) stays on the calling thread; anything larger uses the pool.
fn par_for(rows: usize) -> Par {
    if rows == 1 {
        Par::Seq
    } else {
        Par::All
    }
}

fn as_f32(x: Input<'_>) -> Cow<'_, [f32]> {
    match x {
        Input::F32(v) => Cow::Borrowed(v),
        Input::Bf16(v) => Cow::Owned(to_f32_vec(v)),
    }
}

fn as_bf16(x: Input<'_>) -> Cow<'_, [Bf16]> {
    match x {
        Input::F32(v) => Cow::Owned(round_to_bf16(v)),
        Input::Bf16(v) => Cow::Borrowed(v),
    }
}

impl Weights<'_> {
    /// `y[rows, out] = x[rows, in]·Wᵀ (+ b)` with `W = weight` stored `[out, in]`.
    pub fn linear_forward<'x>(
        &self,
        y: &mut [f32],
        x: impl Into<Input<'x>>,
        weight: ParamId,
        bias: Option<ParamId>,
        shape: LinearShape,
    ) {
        let _phase = scope(Phase::Gemm);
        let (x, bias) = (x.into(), bias.map(|b| self.get(b)));
        let LinearShape {
            rows,
            input,
            output,
        } = shape;
        let par = par_for(rows);
        match self.compute() {
            Compute::F32 => {
                let x = as_f32(x);
                linear_forward(y, &x, self.get(weight), bias, rows, input, output, par);
            }
            Compute::Bf16(kernel) => {
                let x = as_bf16(x);
                let w = self.copy(weight);
                linear_forward_bf16(y, &x, w, bias, rows, input, output, kernel, par);
            }
        }
    }

    /// Backward of [`Weights::linear_forward`] for the output gradient `dy`: `dx = dy·W`,
    /// `dW += dyᵀ·x`, `db += Σ dy`.
    pub fn linear_backward<'x>(
        &self,
        grads: LinearGrads<'_>,
        dy: &[f32],
        x: impl Into<Input<'x>>,
        weight: ParamId,
        shape: LinearShape,
    ) {
        let _phase = scope(Phase::Gemm);
        let x = x.into();
        let LinearShape {
            rows,
            input,
            output,
        } = shape;
        let par = par_for(rows);
        match self.compute() {
            Compute::F32 => {
                let x = as_f32(x);
                linear_backward(grads, dy, &x, self.get(weight), rows, input, output, par);
            }
            Compute::Bf16(kernel) => {
                let dy16 = round_to_bf16(dy);
                let x = if grads.weight.is_some() {
                    as_bf16(x)
                } else {
                    Cow::Borrowed(&[][..])
                };
                if let Some(db) = grads.bias {
                    column_sums_into(db, dy, output);
                }
                let grads = LinearGrads {
                    input: grads.input,
                    accumulate_input: grads.accumulate_input,
                    weight: grads.weight,
                    bias: None,
                };
                let w = self.copy(weight);
                linear_backward_bf16(grads, &dy16, &x, w, rows, input, output, kernel, par);
            }
        }
    }

    /// Grouped `y_e = x_e·W[e]ᵀ` over experts, rows `offsets[e]..offsets[e+1]` of `x` for
    /// expert `e`, `weight` stored `[experts, out, in]`.
    pub fn grouped_linear_forward<'x>(
        &self,
        y: &mut [f32],
        x: impl Into<Input<'x>>,
        weight: ParamId,
        offsets: &[usize],
        (input, output): (usize, usize),
    ) {
        let _phase = scope(Phase::Gemm);
        let x = x.into();
        match self.compute() {
            Compute::F32 => {
                let x = as_f32(x);
                grouped_linear_forward(y, &x, self.get(weight), offsets, input, output);
            }
            Compute::Bf16(kernel) => {
                let x = as_bf16(x);
                let w = self.copy(weight);
                grouped_linear_forward_bf16(y, &x, w, offsets, input, output, kernel);
            }
        }
    }

    /// Backward of [`Weights::grouped_linear_forward`]: writes `dx` (if given), accumulates
    /// `dweight`.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_linear_backward<'x>(
        &self,
        dx: Option<&mut [f32]>,
        dweight: &mut [f32],
        dy: &[f32],
        x: impl Into<Input<'x>>,
        weight: ParamId,
        offsets: &[usize],
        (input, output): (usize, usize),
    ) {
        let _phase = scope(Phase::Gemm);
        let x = x.into();
        match self.compute() {
            Compute::F32 => {
                let x = as_f32(x);
                let w = self.get(weight);
                grouped_linear_backward(dx, dweight, dy, &x, w, offsets, input, output);
            }
            Compute::Bf16(kernel) => {
                let (dy16, x) = (round_to_bf16(dy), as_bf16(x));
                let w = self.copy(weight);
                grouped_linear_backward_bf16(
                    dx, dweight, &dy16, &x, w, offsets, input, output, kernel,
                );
            }
        }
    }

    /// The causal attention core: writes `out`, returns the log-sum-exp per (row, head) for
    /// the backward. In bf16 the tile products take bf16 `q`, `k`, `v` and probabilities, the
    /// softmax stays f32 (`origami_kernels::attention_bf16`).
    pub fn attention_forward(
        &self,
        out: &mut [f32],
        qkv: &[f32],
        (layout, shape): (QkvLayout, AttentionShape),
        scale: f32,
    ) -> Vec<f32> {
        let _phase = scope(Phase::Attention);
        match self.compute() {
            Compute::F32 => attention_forward(out, qkv, layout, shape, scale),
            Compute::Bf16(kernel) => {
                let qkv = round_to_bf16(qkv);
                attention_forward_bf16(out, &qkv, layout, shape, scale, kernel)
            }
        }
    }

    /// Backward of [`Weights::attention_forward`]: writes `dqkv`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        dqkv: &mut [f32],
        dout: &[f32],
        out: &[f32],
        qkv: &[f32],
        lse: &[f32],
        (layout, shape): (QkvLayout, AttentionShape),
        scale: f32,
    ) {
        let _phase = scope(Phase::Attention);
        match self.compute() {
            Compute::F32 => attention_backward(dqkv, dout, out, qkv, lse, layout, shape, scale),
            Compute::Bf16(kernel) => {
                let (qkv, dout) = (round_to_bf16(qkv), round_to_bf16(dout));
                attention_backward_bf16(dqkv, &dout, out, &qkv, lse, layout, shape, scale, kernel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every bf16 entry point against the exact product of its unrounded f32 inputs, within
    //! the bound bf16 rounding gives (`docs/kernels.md`, "Accuracy and the test bounds"): each
    //! input moves by at most `u₁₆ = 2⁻⁸` of itself, so a product by at most
    //! `(2u₁₆ + u₁₆²)·|a·b|`; the f32 sum of `n` terms adds `γ_n·Σ|terms|`. Element by
    //! element: `|got − exact| ≤ (2⁻⁷ + 2⁻¹⁶)·Σ|a·b| + γ_n·(|c₀| + (1 + 2⁻⁸)²·Σ|a·b|)`, with
    //! `n` the products plus the terms added to them (old value, bias). The f32 path is held
    //! to the same exact products with `u₁₆ = 0`, and bias gradients (summed from the f32
    //! `dy`) must equal the f32 path's bit for bit.

    use super::*;
    use crate::compute::WeightCopies;
    use crate::params::{Buffers, Init, ParamGroup, ParamRegistry};
    use origami_kernels::matmul_bf16::Bf16Kernel;
    use origami_kernels::testing::random_vec;

    const U32: f64 = 1.0 / (1u64 << 24) as f64;
    const U16: f64 = 1.0 / 256.0;

    fn gamma(n: usize) -> f64 {
        n as f64 * U32 / (1.0 - n as f64 * U32)
    }

    /// The precisions to check: f32, and bf16 with every kernel this CPU runs.
    fn computes() -> Vec<Compute> {
        let mut all = vec![Compute::F32, Compute::Bf16(Bf16Kernel::Portable)];
        if Bf16Kernel::Dpbf16.is_available() {
            all.push(Compute::Bf16(Bf16Kernel::Dpbf16));
        }
        all
    }

    /// Checks `got[i][j]` against `c0[i][j] + Σ_p a(i,p)·b(p,j)` (computed in f64) with the
    /// bound above; `extra` terms besides the products were summed in f32.
    #[allow(clippy::too_many_arguments)]
    fn check(
        compute: Compute,
        got: &[f32],
        c0: &[f32],
        (m, k, n): (usize, usize, usize),
        extra: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
        what: &str,
    ) {
        let u16 = if compute.is_bf16() { U16 } else { 0.0 };
        let g = gamma(k + extra);
        for i in 0..m {
            for j in 0..n {
                let c = c0[i * n + j] as f64;
                let (mut exact, mut abs) = (c, 0.0);
                for p in 0..k {
                    let t = a(i, p) as f64 * b(p, j) as f64;
                    exact += t;
                    abs += t.abs();
                }
                let bound = (2.0 * u16 + u16 * u16) * abs
                    + g * (c.abs() + (1.0 + u16) * (1.0 + u16) * abs)
                    + (k + 1) as f64 * 2f64.powi(-40);
                let v = got[i * n + j] as f64;
                assert!(
                    (v - exact).abs() <= bound,
                    "{compute:?} {what}[{i},{j}]: {v} vs {exact} (bound {bound:e})"
                );
            }
        }
    }

    /// One weight `[out, in]`, one bias `[out]` and a grouped weight `[groups, out, in]`.
    fn parameters(
        out: usize,
        input: usize,
        groups: usize,
    ) -> (ParamRegistry, Buffers, [ParamId; 3]) {
        let mut registry = ParamRegistry::default();
        let w = registry.register(
            "w".into(),
            &[out, input],
            ParamGroup::Dense,
            Init::Normal(0.5),
        );
        let b = registry.register("b".into(), &[out], ParamGroup::Dense, Init::Normal(0.5));
        let g = registry.register(
            "g".into(),
            &[groups, out, input],
            ParamGroup::Expert,
            Init::Normal(0.5),
        );
        let params = crate::params::init::initialise(&registry, 9);
        (registry, params, [w, b, g])
    }

    #[test]
    fn linear_forward_and_backward_in_every_precision_are_within_the_rounding_bound() {
        let (rows, input, out) = (37, 70, 53);
        let (registry, params, [w, b, _]) = parameters(out, input, 1);
        let x = random_vec(rows * input, 1);
        let dy = random_vec(rows * out, 2);
        let mut f32_bias_grad = None;
        for compute in computes() {
            let copies = WeightCopies::new(compute, &params);
            let weights = copies.weights(&params);
            let (wv, bv) = (params.get(w), params.get(b));
            let shape = LinearShape::new(rows, input, out);
            let mut y = vec![0.0; rows * out];
            weights.linear_forward(&mut y, &x, w, Some(b), shape);
            let bias_rows: Vec<f32> = (0..rows).flat_map(|_| bv.iter().copied()).collect();
            check(
                compute,
                &y,
                &bias_rows,
                (rows, input, out),
                1,
                |i, p| x[i * input + p],
                |p, j| wv[j * input + p],
                "y",
            );
            let mut grads = registry.zeros();
            let dw0 = random_vec(out * input, 3);
            grads.get_mut(w).copy_from_slice(&dw0);
            let dx0 = random_vec(rows * input, 4);
            let mut dx = dx0.clone();
            let (dw, db) = {
                let Buffers { dense, .. } = &mut grads;
                let (dw, rest) = dense[w.offset()..].split_at_mut(w.len());
                (
                    dw,
                    &mut rest[b.offset() - w.offset() - w.len()..][..b.len()],
                )
            };
            weights.linear_backward(
                LinearGrads {
                    input: Some(&mut dx),
                    accumulate_input: true,
                    weight: Some(dw),
                    bias: Some(db),
                },
                &dy,
                &x,
                w,
                shape,
            );
            check(
                compute,
                &dx,
                &dx0,
                (rows, out, input),
                1,
                |i, p| dy[i * out + p],
                |p, j| wv[p * input + j],
                "dx",
            );
            check(
                compute,
                grads.get(w),
                &dw0,
                (out, rows, input),
                1,
                |i, p| dy[p * out + i],
                |p, j| x[p * input + j],
                "dW",
            );
            let bias_grad = grads.get(b).to_vec();
            assert_eq!(
                *f32_bias_grad.get_or_insert_with(|| bias_grad.clone()),
                bias_grad,
                "{compute:?}: the bias gradient is the f32 sum of dy"
            );
        }
    }

    #[test]
    fn grouped_linear_in_every_precision_is_within_the_rounding_bound() {
        let (input, out) = (45, 38);
        let offsets = [0, 5, 5, 22, 31];
        let rows = offsets[4];
        let (registry, params, [_, _, g]) = parameters(out, input, 4);
        let x = random_vec(rows * input, 5);
        let dy = random_vec(rows * out, 6);
        for compute in computes() {
            let copies = WeightCopies::new(compute, &params);
            let weights = copies.weights(&params);
            let gv = params.get(g);
            let w_at = |e: usize, o: usize, i: usize| gv[(e * out + o) * input + i];
            let mut y = vec![0.0; rows * out];
            weights.grouped_linear_forward(&mut y, &x, g, &offsets, (input, out));
            let mut grads = registry.zeros();
            let mut dx = vec![f32::NAN; rows * input];
            weights.grouped_linear_backward(
                Some(&mut dx),
                grads.get_mut(g),
                &dy,
                &x,
                g,
                &offsets,
                (input, out),
            );
            for (e, w) in offsets.windows(2).enumerate() {
                let (first, n) = (w[0], w[1] - w[0]);
                let xe = |i: usize, p: usize| x[(first + i) * input + p];
                let dye = |i: usize, p: usize| dy[(first + i) * out + p];
                let zeros = vec![0.0; (n * out).max(out * input)];
                check(
                    compute,
                    &y[first * out..][..n * out],
                    &zeros,
                    (n, input, out),
                    0,
                    xe,
                    |p, j| w_at(e, j, p),
                    &format!("y of group {e}"),
                );
                check(
                    compute,
                    &dx[first * input..][..n * input],
                    &zeros,
                    (n, out, input),
                    0,
                    dye,
                    |p, j| w_at(e, p, j),
                    &format!("dx of group {e}"),
                );
                check(
                    compute,
                    &grads.get(g)[e * out * input..][..out * input],
                    &zeros,
                    (out, n, input),
                    0,
                    |i, p| dye(p, i),
                    xe,
                    &format!("dW of group {e}"),
                );
            }
        }
    }
}
