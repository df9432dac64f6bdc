//! Position-masked attention with bf16 inputs to its products, the bf16 twin of
//! [`crate::masked_attention`] (same layouts, tiles, tasks, saved state and merge), as
//! [`crate::attention_bf16`] is the twin of the causal kernel: q, k, v and the output gradient
//! arrive rounded to bf16; every tile product runs on the bf16 GEMM with f32 accumulation; the
//! softmax, its running max and sum, `lse`, `D` and `dS` are f32; the probabilities `P` and
//! `dS` are rounded to bf16 as the inputs of the products that follow, and the forward's running
//! sum adds the rounded `P`. On contiguous positions it computes what the causal bf16 kernel
//! computes.
//!
//! The tasks and loops are the f32 kernel's (`masked_attention::masked_forward`,
//! `masked_attention::masked_backward`, over the bf16 GEMM kernel); the rounding of `P` and
//! `dS` is the bf16 kernel's `tile_softmax::TileSoftmax`.

use crate::bf16::Bf16;
use crate::masked_attention::{masked_backward, masked_forward, MaskedAttentionShape};
use crate::matmul_bf16::Bf16Kernel;

/// Masked attention forward of one block on bf16 `q` and `kv`. Writes `out[batch·q_len,
/// heads·head_dim]` (f32), returns `lse[batch, heads, q_len]` (`−∞`, with output 0, for a
/// query that sees no key).
#[allow(clippy::too_many_arguments)]
pub fn masked_attention_forward_bf16(
    out: &mut [f32],
    q: &[Bf16],
    kv: &[Bf16],
    q_positions: &[usize],
    kv_positions: &[usize],
    shape: MaskedAttentionShape,
    scale: f32,
    kernel: Bf16Kernel,
) -> Vec<f32> {
    let positions = (q_positions, kv_positions);
    masked_forward(out, q, kv, positions, shape, scale, kernel)
}

/// Masked attention backward of one block on bf16 `q`, `kv` and output gradient `dout`. Adds
/// into `dq` (layout of `q`) and `dkv` (layout of `kv`), both f32; `lse` is the final one over
/// all key blocks and `row_dots` its [`crate::masked_attention::attention_row_dots`] (of the
/// rounded `dout`).
#[allow(clippy::too_many_arguments)]
pub fn masked_attention_backward_bf16(
    dq: &mut [f32],
    dkv: &mut [f32],
    dout: &[Bf16],
    q: &[Bf16],
    kv: &[Bf16],
    lse: &[f32],
    row_dots: &[f32],
    q_positions: &[usize],
    kv_positions: &[usize],
    shape: MaskedAttentionShape,
    scale: f32,
    kernel: Bf16Kernel,
) {
    let positions = (q_positions, kv_positions);
    let (inputs, saved) = ((q, kv), (lse, row_dots));
    masked_backward(
        dq, dkv, dout, inputs, saved, positions, shape, scale, kernel,
    );
}

#[cfg(test)]
mod tests {
    //! The bf16 kernels against (1) the causal bf16 kernel on contiguous positions — the same
    //! roundings, so only f32 summation order differs — and (2) the f32 masked kernel of the
    //! same (already bf16) inputs on scattered positions, where the only difference is the
    //! rounding of `P` (and `dS`) to bf16: each weight moves by at most `u₁₆ = 2⁻⁸` relative
    //! (and the running sum with it), so an output moves by at most `2·u₁₆·max|v|` plus f32
    //! sums; the gradients, products of two rounded factors, by `4·u₁₆` of their magnitude.

    use super::*;
    use crate::attention::{AttentionShape, QkvLayout};
    use crate::attention_bf16::{attention_backward_bf16, attention_forward_bf16};
    use crate::bf16::{to_bf16_vec, to_f32_vec};
    use crate::masked_attention::cases::{
        fused, inputs, scattered_positions, shape, split_fused, SCALE,
    };
    use crate::masked_attention::{
        attention_row_dots, masked_attention_backward, masked_attention_forward,
        merge_partial_attention,
    };
    use crate::testing::{assert_close, random_vec};

    const U16: f32 = 1.0 / 256.0;

    fn kernels() -> Vec<Bf16Kernel> {
        [Bf16Kernel::Dpbf16, Bf16Kernel::Portable]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// Inputs that are bf16 values already, in both forms.
    fn rounded_inputs(shape: MaskedAttentionShape, seed: u64) -> (Vec<Bf16>, Vec<Bf16>) {
        let (q, kv) = inputs(shape, seed);
        (to_bf16_vec(&q), to_bf16_vec(&kv))
    }

    fn largest(x: &[f32]) -> f32 {
        x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
    }

    /// `actual` within `bound` of `expected`, element by element.
    fn assert_within(actual: &[f32], expected: &[f32], bound: f32, what: &str) {
        assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= bound,
                "{what}[{i}]: got {a}, expected {e} (bound {bound})"
            );
        }
    }

    #[test]
    fn contiguous_positions_match_the_causal_bf16_kernel() {
        for kernel in kernels() {
            for seq in [1, 5, 64, 70, 129] {
                let shape = shape(2, seq, seq);
                let (q, kv) = rounded_inputs(shape, 3);
                let positions: Vec<usize> = (0..seq).collect();
                let mut out = vec![f32::NAN; shape.q_elements()];
                let lse = masked_attention_forward_bf16(
                    &mut out, &q, &kv, &positions, &positions, shape, SCALE, kernel,
                );
                let (qkv, layout): (Vec<f32>, QkvLayout) =
                    fused(&to_f32_vec(&q), &to_f32_vec(&kv), shape);
                let qkv = to_bf16_vec(&qkv);
                let causal = AttentionShape {
                    batch: shape.batch,
                    seq,
                    heads: shape.heads,
                    kv_heads: shape.kv_heads,
                    head_dim: shape.head_dim,
                };
                let mut expected = vec![0.0; shape.q_elements()];
                let expected_lse =
                    attention_forward_bf16(&mut expected, &qkv, layout, causal, SCALE, kernel);
                assert_close(&out, &expected, 1e-5, "output");
                assert_close(&lse, &expected_lse, 1e-5, "lse");

                let dout = to_bf16_vec(&random_vec(shape.q_elements(), 5));
                let dots = attention_row_dots(&to_f32_vec(&dout), &out, shape);
                let (mut dq, mut dkv) = (vec![0.0; q.len()], vec![0.0; kv.len()]);
                masked_attention_backward_bf16(
                    &mut dq, &mut dkv, &dout, &q, &kv, &lse, &dots, &positions, &positions, shape,
                    SCALE, kernel,
                );
                let mut dqkv = vec![0.0; qkv.len()];
                attention_backward_bf16(
                    &mut dqkv,
                    &dout,
                    &expected,
                    &qkv,
                    &expected_lse,
                    layout,
                    causal,
                    SCALE,
                    kernel,
                );
                let (expected_dq, expected_dkv) = split_fused(&dqkv, shape);
                // A probability on a bf16 rounding boundary may round the other way when its
                // lse differs in the last f32 bit: one weight off by u₁₆ in a few places.
                let bound = 2.0 * U16 * largest(&expected_dq).max(largest(&expected_dkv));
                assert_within(&dq, &expected_dq, bound, "dq");
                assert_within(&dkv, &expected_dkv, bound, "dkv");
            }
        }
    }

    #[test]
    fn scattered_positions_track_the_f32_kernel_within_the_rounding_of_p() {
        for kernel in kernels() {
            let shape = shape(2, 70, 130);
            let (q, kv) = rounded_inputs(shape, 9);
            let (q32, kv32) = (to_f32_vec(&q), to_f32_vec(&kv));
            let mut q_positions = scattered_positions(shape.q_len, 3);
            q_positions[2] = 1;
            let mut kv_positions = scattered_positions(shape.kv_len, 4);
            kv_positions[5] = 2;
            let mut out = vec![f32::NAN; shape.q_elements()];
            let lse = masked_attention_forward_bf16(
                &mut out,
                &q,
                &kv,
                &q_positions,
                &kv_positions,
                shape,
                SCALE,
                kernel,
            );
            let mut expected = vec![f32::NAN; shape.q_elements()];
            let expected_lse = masked_attention_forward(
                &mut expected,
                &q32,
                &kv32,
                &q_positions,
                &kv_positions,
                shape,
                SCALE,
            );
            // Query 2 (position 1) sees no key in either.
            for b in 0..shape.batch {
                for h in 0..shape.heads {
                    assert_eq!(lse[shape.lse_index(b, h, 2)], f32::NEG_INFINITY);
                }
            }
            let values = largest(&kv32);
            assert_within(&out, &expected, 2.5 * U16 * values, "output");
            let finite = |x: &[f32]| {
                x.iter()
                    .map(|v| if v.is_finite() { *v } else { 0.0 })
                    .collect::<Vec<_>>()
            };
            assert_within(&finite(&lse), &finite(&expected_lse), 2.5 * U16, "lse");

            let dout = to_bf16_vec(&random_vec(shape.q_elements(), 10));
            let dout32 = to_f32_vec(&dout);
            let (mut dq, mut dkv) = (vec![0.0; q.len()], vec![0.0; kv.len()]);
            let dots = attention_row_dots(&dout32, &out, shape);
            masked_attention_backward_bf16(
                &mut dq,
                &mut dkv,
                &dout,
                &q,
                &kv,
                &lse,
                &dots,
                &q_positions,
                &kv_positions,
                shape,
                SCALE,
                kernel,
            );
            let (mut edq, mut edkv) = (vec![0.0; q.len()], vec![0.0; kv.len()]);
            let edots = attention_row_dots(&dout32, &expected, shape);
            masked_attention_backward(
                &mut edq,
                &mut edkv,
                &dout32,
                &q32,
                &kv32,
                &expected_lse,
                &edots,
                &q_positions,
                &kv_positions,
                shape,
                SCALE,
            );
            assert_within(&dq, &edq, 4.0 * U16 * largest(&edq), "dq");
            assert_within(&dkv, &edkv, 4.0 * U16 * largest(&edkv), "dkv");
        }
    }

    #[test]
    fn split_keys_merged_track_one_call() {
        for kernel in kernels() {
            let (q_len, kv_len, split) = (70, 130, 64);
            let shape = shape(2, q_len, kv_len);
            let (q, kv) = rounded_inputs(shape, 7);
            let q_positions = scattered_positions(q_len, 1);
            let mut kv_positions = scattered_positions(kv_len, 2);
            kv_positions[0] = 0;
            let run = |kv: &[Bf16], kv_positions: &[usize], kv_len| {
                let part = MaskedAttentionShape { kv_len, ..shape };
                let mut out = vec![f32::NAN; part.q_elements()];
                let lse = masked_attention_forward_bf16(
                    &mut out,
                    &q,
                    kv,
                    &q_positions,
                    kv_positions,
                    part,
                    SCALE,
                    kernel,
                );
                (out, lse)
            };
            let (expected, _) = run(&kv, &kv_positions, kv_len);
            let ks = shape.kv_stride();
            let rows_of = |lo: usize, hi: usize| -> Vec<Bf16> {
                (0..shape.batch)
                    .flat_map(|b| &kv[(b * kv_len + lo) * ks..(b * kv_len + hi) * ks])
                    .copied()
                    .collect()
            };
            let (mut out, mut lse) = run(&rows_of(0, split), &kv_positions[..split], split);
            let (out_part, lse_part) = run(
                &rows_of(split, kv_len),
                &kv_positions[split..],
                kv_len - split,
            );
            merge_partial_attention(&mut out, &mut lse, &out_part, &lse_part, shape);
            // The two calls round each weight against their own running maxima.
            assert_within(
                &out,
                &expected,
                2.5 * U16 * largest(&to_f32_vec(&kv)),
                "merged",
            );
        }
    }
}
