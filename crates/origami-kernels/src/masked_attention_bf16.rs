//! Position-masked attention with bf16 inputs to its products, the bf16 twin of
//! [`crate::masked_attention`] (same layouts, tiles, tasks, saved state and merge), as
//! [`crate::attention_bf16`] is the twin of the causal kernel: q, k, v and the output gradient
//! arrive rounded to bf16; every tile product runs on the bf16 GEMM with f32 accumulation; the
//! softmax, its running max and sum, `lse`, `D` and `dS` are f32; the probabilities `P` and
//! `dS` are rounded to bf16 as the inputs of the products that follow, and the forward's running
//! sum adds the rounded `P`. On contiguous positions it computes what the causal bf16 kernel
//! computes.

use crate::attention::{backward_operands, own, QueryBlock};
use crate::bf16::Bf16;
use crate::masked_attention::{check_inputs, store_tile, tiles, MaskedAttentionShape, Tile, BLOCK};
use crate::math::fast_exp;
use crate::matmul::View;
use crate::matmul_bf16::Bf16Kernel;
use crate::row_exp::{exp_rounded, scaled_max};
use crate::tiles::{tile, SharedOut, TileKernel, TileOperand};
use rayon::prelude::*;

/// Every key tile of every (sequence, kv head), prepared as the right operands of the tile
/// products (`Kᵀ` and `V`), indexed by `(b·kv_heads + g)·tiles + j`: packed once, they serve
/// every query tile and every head of the group.
fn packed_key_tiles(
    kv: &[Bf16],
    kv_tiles: &[Tile],
    shape: MaskedAttentionShape,
    kernel: Bf16Kernel,
) -> Vec<(TileOperand, TileOperand)> {
    let (hd, ks) = (shape.head_dim, shape.kv_stride());
    let v_offset = shape.kv_heads * hd;
    (0..shape.batch * shape.kv_heads * kv_tiles.len())
        .into_par_iter()
        .map(|idx| {
            let (bg, kt) = (idx / kv_tiles.len(), kv_tiles[idx % kv_tiles.len()]);
            let (b, g) = (bg / shape.kv_heads, bg % shape.kv_heads);
            let kv_row = (b * shape.kv_len + kt.start) * ks;
            let k = tile(kv, kv_row + g * hd, kt.rows, hd, ks);
            let v = tile(kv, kv_row + v_offset + g * hd, kt.rows, hd, ks);
            let (mut k_op, mut v_op) = (TileOperand::default(), TileOperand::default());
            // SAFETY: the callers assert that the CPU runs the kernel.
            unsafe {
                kernel.pack_rhs(&mut k_op, k.t());
                kernel.pack_rhs(&mut v_op, v);
            }
            (k_op, v_op)
        })
        .collect()
}

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
    check_inputs(q, kv, q_positions, kv_positions, shape);
    assert_eq!(out.len(), shape.q_elements(), "attention output size");
    assert!(
        kernel.is_available(),
        "bf16 kernel {kernel:?} does not run on this CPU"
    );
    let (hd, qs) = (shape.head_dim, shape.q_stride());
    let (q_tiles, kv_tiles) = (tiles(q_positions), tiles(kv_positions));
    let mut lse = vec![0.0f32; shape.lse_elements()];
    let out_ptr = SharedOut(out.as_mut_ptr());
    let lse_ptr = SharedOut(lse.as_mut_ptr());
    let key_tiles = packed_key_tiles(kv, &kv_tiles, shape, kernel);
    let q_tiles = &q_tiles;
    let tasks: Vec<(usize, usize, Tile)> = (0..shape.batch)
        .flat_map(|b| (0..shape.heads).flat_map(move |h| q_tiles.iter().map(move |&t| (b, h, t))))
        .collect();
    tasks.into_par_iter().for_each_init(
        || {
            (
                vec![0.0f32; BLOCK * BLOCK],
                vec![Bf16::ZERO; BLOCK * BLOCK],
                vec![0.0f32; BLOCK * hd],
                TileOperand::default(),
                TileOperand::default(),
            )
        },
        |(scores, probs, acc, q_op, p_op), (b, h, qt)| {
            let g = h / shape.queries_per_kv_head();
            let q_row = (b * shape.q_len + qt.start) * qs + h * hd;
            // SAFETY: the kernel runs on this CPU (asserted above).
            unsafe { kernel.pack_lhs(q_op, tile(q, q_row, qt.rows, hd, qs)) };
            let acc = &mut acc[..qt.rows * hd];
            acc.fill(0.0);
            let mut max = [f32::NEG_INFINITY; BLOCK];
            let mut sum = [0.0f32; BLOCK];
            let first_key_tile = (b * shape.kv_heads + g) * kv_tiles.len();
            for (j, kt) in kv_tiles.iter().enumerate() {
                if qt.blind_to(kt) {
                    continue;
                }
                let (k_op, v_op) = &key_tiles[first_key_tile + j];
                let s = &mut scores[..qt.rows * kt.rows];
                let p = &mut probs[..qt.rows * kt.rows];
                let key_positions = &kv_positions[kt.start..kt.start + kt.rows];
                // SAFETY: the kernel runs on this CPU; `s` is this task's own.
                unsafe { kernel.multiply_tiles(own(s, qt.rows, kt.rows), q_op, k_op, false) };
                // Where every key is visible the causal kernel's vectorised row passes serve.
                let unmasked = qt.sees_all_of(kt);
                for r in 0..qt.rows {
                    let position = q_positions[qt.start + r];
                    let s_row = &s[r * kt.rows..(r + 1) * kt.rows];
                    let p_row = &mut p[r * kt.rows..(r + 1) * kt.rows];
                    let tile_max = if unmasked {
                        scaled_max(s_row, scale)
                    } else {
                        s_row
                            .iter()
                            .zip(key_positions)
                            .filter(|(_, &kp)| kp <= position)
                            .fold(f32::NEG_INFINITY, |m, (&s, _)| m.max(s * scale))
                    };
                    if tile_max == f32::NEG_INFINITY {
                        p_row.fill(Bf16::ZERO);
                        continue;
                    }
                    let new_max = max[r].max(tile_max);
                    let correction = fast_exp(max[r] - new_max);
                    let tile_sum = if unmasked {
                        exp_rounded(p_row, s_row, kt.rows, scale, new_max)
                    } else {
                        let mut tile_sum = 0.0;
                        for ((p, &s), &kp) in p_row.iter_mut().zip(s_row).zip(key_positions) {
                            *p = if kp <= position {
                                Bf16::from_f32(fast_exp(s * scale - new_max))
                            } else {
                                Bf16::ZERO
                            };
                            tile_sum += p.to_f32();
                        }
                        tile_sum
                    };
                    sum[r] = sum[r] * correction + tile_sum;
                    max[r] = new_max;
                    if correction != 1.0 {
                        acc[r * hd..(r + 1) * hd]
                            .iter_mut()
                            .for_each(|a| *a *= correction);
                    }
                }
                // SAFETY: as above; `acc` is this task's own.
                unsafe {
                    kernel.pack_lhs(p_op, View::new(p, qt.rows, kt.rows));
                    kernel.multiply_tiles(own(acc, qt.rows, hd), p_op, v_op, true);
                }
            }
            // SAFETY: task (b, h, tile) alone writes rows of the tile in head h and their lse.
            unsafe { store_tile(out_ptr, lse_ptr, shape, (b, h, qt), acc, &max, &sum) };
        },
    );
    lse
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
    check_inputs(q, kv, q_positions, kv_positions, shape);
    assert_eq!(dq.len(), q.len(), "dq buffer size");
    assert_eq!(dkv.len(), kv.len(), "dkv buffer size");
    assert_eq!(dout.len(), shape.q_elements(), "output gradient size");
    assert_eq!(lse.len(), shape.lse_elements(), "lse size");
    assert_eq!(row_dots.len(), shape.lse_elements(), "row dots size");
    assert!(
        kernel.is_available(),
        "bf16 kernel {kernel:?} does not run on this CPU"
    );
    let (hd, qs, ks) = (shape.head_dim, shape.q_stride(), shape.kv_stride());
    let v_offset = shape.kv_heads * hd;
    let (q_tiles, kv_tiles) = (tiles(q_positions), tiles(kv_positions));
    let dq_ptr = SharedOut(dq.as_mut_ptr());
    let dkv_ptr = SharedOut(dkv.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..shape.batch)
        .flat_map(|b| (0..shape.kv_heads).map(move |g| (b, g)))
        .collect();
    let group = shape.queries_per_kv_head();
    tasks.into_par_iter().for_each_init(
        || {
            (
                vec![0.0f32; BLOCK * BLOCK],
                vec![0.0f32; BLOCK * BLOCK],
                vec![Bf16::ZERO; BLOCK * BLOCK],
                vec![Bf16::ZERO; BLOCK * BLOCK],
                backward_operands(group),
            )
        },
        |(scores, dscores, probs, dprobs, (queries, ops)), (b, g)| {
            for (slot, blocks) in queries.iter_mut().enumerate() {
                let h = g * group + slot;
                blocks.resize_with(q_tiles.len(), QueryBlock::default);
                for (block, qt) in blocks.iter_mut().zip(&q_tiles) {
                    let q_row = (b * shape.q_len + qt.start) * qs + h * hd;
                    let q_tile = tile(q, q_row, qt.rows, hd, qs);
                    let d_out = tile(dout, q_row, qt.rows, hd, qs);
                    // SAFETY: the kernel runs on this CPU (asserted above).
                    unsafe { block.pack(kernel, q_tile, d_out) };
                }
            }
            let [k_op, v_op, k_rhs, pt, ds_op, dst] = ops;
            for kt in &kv_tiles {
                let kv_row = (b * shape.kv_len + kt.start) * ks;
                let k = tile(kv, kv_row + g * hd, kt.rows, hd, ks);
                let v = tile(kv, kv_row + v_offset + g * hd, kt.rows, hd, ks);
                // SAFETY: as above.
                unsafe {
                    kernel.pack_rhs(k_op, k.t());
                    kernel.pack_rhs(v_op, v.t());
                    kernel.pack_rhs(k_rhs, k);
                }
                let dk = dkv_ptr.matrix(kv_row + g * hd, kt.rows, hd, ks);
                let dv = dkv_ptr.matrix(kv_row + v_offset + g * hd, kt.rows, hd, ks);
                let key_positions = &kv_positions[kt.start..kt.start + kt.rows];
                for (slot, blocks) in queries.iter().enumerate() {
                    let h = g * group + slot;
                    for (block, qt) in blocks.iter().zip(&q_tiles) {
                        if qt.blind_to(kt) {
                            continue;
                        }
                        let q_row = (b * shape.q_len + qt.start) * qs + h * hd;
                        let s = &mut scores[..qt.rows * kt.rows];
                        let dp = &mut dscores[..qt.rows * kt.rows];
                        // SAFETY: as above; `s` and `dp` are this task's own.
                        unsafe {
                            kernel.multiply_tiles(
                                own(s, qt.rows, kt.rows),
                                &block.q_lhs,
                                k_op,
                                false,
                            );
                            kernel.multiply_tiles(
                                own(dp, qt.rows, kt.rows),
                                &block.dout_lhs,
                                v_op,
                                false,
                            );
                        }
                        let p16 = &mut probs[..qt.rows * kt.rows];
                        let ds16 = &mut dprobs[..qt.rows * kt.rows];
                        for r in 0..qt.rows {
                            let i = qt.start + r;
                            let (position, lse_r) = (q_positions[i], lse[shape.lse_index(b, h, i)]);
                            let d_r = row_dots[shape.lse_index(b, h, i)];
                            let at = r * kt.rows..(r + 1) * kt.rows;
                            let (s_row, dp_row) = (&s[at.clone()], &dp[at.clone()]);
                            let (p_row, ds_row) = (&mut p16[at.clone()], &mut ds16[at]);
                            for c in 0..kt.rows {
                                if key_positions[c] <= position && lse_r != f32::NEG_INFINITY {
                                    let p = fast_exp(s_row[c] * scale - lse_r);
                                    p_row[c] = Bf16::from_f32(p);
                                    ds_row[c] = Bf16::from_f32(p * (dp_row[c] - d_r) * scale);
                                } else {
                                    p_row[c] = Bf16::ZERO;
                                    ds_row[c] = Bf16::ZERO;
                                }
                            }
                        }
                        let dq_tile = dq_ptr.matrix(q_row, qt.rows, hd, qs);
                        let (p_view, ds_view) = (
                            View::new(p16, qt.rows, kt.rows),
                            View::new(ds16, qt.rows, kt.rows),
                        );
                        // SAFETY: task (b, g) alone touches, in sequence b, the dq columns of
                        // the heads of group g and the dk, dv columns of kv head g; the
                        // gradient buffers do not overlap the inputs, and the kernel runs here.
                        unsafe {
                            kernel.pack_lhs(pt, p_view.t());
                            kernel.pack_lhs(ds_op, ds_view);
                            kernel.pack_lhs(dst, ds_view.t());
                            kernel.multiply_tiles(dv, pt, &block.dout_rhs, true);
                            kernel.multiply_tiles(dq_tile, ds_op, k_rhs, true);
                            kernel.multiply_tiles(dk, dst, &block.q_rhs, true);
                        }
                    }
                }
            }
        },
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
