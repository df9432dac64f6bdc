//! The compute entry points the layers call: linear and grouped-linear forward and backward,
//! and the attention core, in the precision of their [`Weights`].
//!
//! - f32: the f32 kernels on the master weights, exactly as without this interface.
//! - bf16: the bf16 GEMMs on the weights' bf16 copies; inputs arrive as bf16 [`Activation`]s
//!   or are rounded here, the backward rounds the output gradient `dy` once for both of its
//!   products (`dx = dy·W`, `dW += dyᵀ·x`), sums stay in f32 and every output and gradient is
//!   f32. The bias gradient is summed from the f32 `dy`, as in f32.
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

    /// The causal attention core (f32 in every precision): writes `out`, returns the
    /// log-sum-exp per (row, head) for the backward.
    pub fn attention_forward(
        &self,
        out: &mut [f32],
        qkv: &[f32],
        (layout, shape): (QkvLayout, AttentionShape),
        scale: f32,
    ) -> Vec<f32> {
        let _phase = scope(Phase::Attention);
        attention_forward(out, qkv, layout, shape, scale)
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
        attention_backward(dqkv, dout, out, qkv, lse, layout, shape, scale);
    }
}
