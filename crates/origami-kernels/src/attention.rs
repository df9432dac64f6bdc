//! Causal self-attention with grouped-query heads, computed blockwise with an online softmax:
//! no `S × S` matrix is ever held for a head, only `BLOCK × BLOCK` tiles.
//!
//! Layout: q, k and v live in one fused buffer `[batch·seq, row_stride]` (the output of the qkv
//! projection) at column offsets, heads contiguous inside each part. Query head `h` reads
//! key/value head `h / (heads / kv_heads)`. The output is `[batch·seq, heads·head_dim]`.
//!
//! Forward, per query tile: for each key tile at or before it, `S = scale·Q·Kᵀ`, running row max
//! `m`, running sum `l`, and `O ← O·e^(m_old − m) + e^(S − m)·V`; finally `O /= l`.
//! Saved state: the output and `lse = m + ln l` per (batch, head, position).
//!
//! Backward (recomputation, no stored probabilities): `D = Σ dO∘O` per row; per tile pair
//! `P = e^(S − lse)`, `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP − D)`, `dQ += scale·dS·K`,
//! `dK += scale·dSᵀ·Q`. Tasks own one (batch, kv head), so the query heads of its group write
//! `dQ` and accumulate `dK`, `dV` without races. All three gradients are written (not added).

use crate::math::fast_exp;
use crate::matmul::{matmul, matmul_raw, Par, View, ViewMut};
use crate::tiles::{tile, SharedOut};
use rayon::prelude::*;

/// Tile edge for queries and keys.
pub(crate) const BLOCK: usize = 64;

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (query groups); divides `heads`.
    pub kv_heads: usize,
    /// Dim of one head.
    pub head_dim: usize,
}

impl AttentionShape {
    pub(crate) fn queries_per_kv_head(&self) -> usize {
        self.heads / self.kv_heads
    }

    pub(crate) fn blocks(&self) -> usize {
        self.seq.div_ceil(BLOCK)
    }

    pub(crate) fn block_rows(&self, block: usize) -> (usize, usize) {
        let start = block * BLOCK;
        (start, BLOCK.min(self.seq - start))
    }

    pub(crate) fn lse_index(&self, b: usize, h: usize, s: usize) -> usize {
        (b * self.heads + h) * self.seq + s
    }
}

/// Where q, k and v lie in the fused input buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvLayout {
    /// Distance between consecutive tokens.
    pub row_stride: usize,
    /// Column of query head 0.
    pub q_offset: usize,
    /// Column of key head 0.
    pub k_offset: usize,
    /// Column of value head 0.
    pub v_offset: usize,
}

pub(crate) fn check_shapes<T>(qkv: &[T], layout: QkvLayout, shape: AttentionShape) {
    assert!(
        shape.kv_heads > 0 && shape.heads.is_multiple_of(shape.kv_heads),
        "heads must be a multiple of kv heads"
    );
    let width = shape.head_dim;
    assert!(
        layout.q_offset + shape.heads * width <= layout.row_stride,
        "q part exceeds row"
    );
    assert!(
        layout.k_offset + shape.kv_heads * width <= layout.row_stride,
        "k part exceeds row"
    );
    assert!(
        layout.v_offset + shape.kv_heads * width <= layout.row_stride,
        "v part exceeds row"
    );
    assert_eq!(
        qkv.len(),
        shape.batch * shape.seq * layout.row_stride,
        "qkv buffer size"
    );
}

/// Causal attention forward. Writes `out[batch·seq, heads·head_dim]`, returns `lse[batch, heads, seq]`.
pub fn attention_forward(
    out: &mut [f32],
    qkv: &[f32],
    layout: QkvLayout,
    shape: AttentionShape,
    scale: f32,
) -> Vec<f32> {
    check_shapes(qkv, layout, shape);
    let (hd, rs) = (shape.head_dim, layout.row_stride);
    let out_stride = shape.heads * hd;
    assert_eq!(
        out.len(),
        shape.batch * shape.seq * out_stride,
        "attention output size"
    );
    let mut lse = vec![0.0f32; shape.batch * shape.heads * shape.seq];
    let out_ptr = SharedOut(out.as_mut_ptr());
    let lse_ptr = SharedOut(lse.as_mut_ptr());
    let tasks: Vec<(usize, usize, usize)> = (0..shape.batch)
        .flat_map(|b| {
            (0..shape.heads).flat_map(move |h| (0..shape.blocks()).rev().map(move |i| (b, h, i)))
        })
        .collect();
    tasks.into_par_iter().for_each_init(
        || (vec![0.0f32; BLOCK * BLOCK], vec![0.0f32; BLOCK * hd]),
        |(scores, acc), (b, h, qi)| {
            let g = h / shape.queries_per_kv_head();
            let (q0, q_rows) = shape.block_rows(qi);
            let row = |s: usize| (b * shape.seq + s) * rs;
            let q = tile(qkv, row(q0) + layout.q_offset + h * hd, q_rows, hd, rs);
            let acc = &mut acc[..q_rows * hd];
            acc.fill(0.0);
            let mut max = [f32::NEG_INFINITY; BLOCK];
            let mut sum = [0.0f32; BLOCK];
            for kj in 0..=qi {
                let (k0, k_rows) = shape.block_rows(kj);
                let k = tile(qkv, row(k0) + layout.k_offset + g * hd, k_rows, hd, rs);
                let v = tile(qkv, row(k0) + layout.v_offset + g * hd, k_rows, hd, rs);
                let tile = &mut scores[..q_rows * k_rows];
                matmul(
                    ViewMut::new(tile, q_rows, k_rows),
                    q,
                    k.t(),
                    false,
                    Par::Seq,
                );
                for r in 0..q_rows {
                    let valid = if kj == qi { r + 1 } else { k_rows };
                    let p = &mut tile[r * k_rows..(r + 1) * k_rows];
                    let tile_max = p[..valid]
                        .iter()
                        .fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
                    let new_max = max[r].max(tile_max);
                    let correction = fast_exp(max[r] - new_max);
                    let mut tile_sum = 0.0;
                    for v in &mut p[..valid] {
                        *v = fast_exp(*v * scale - new_max);
                        tile_sum += *v;
                    }
                    p[valid..].fill(0.0);
                    sum[r] = sum[r] * correction + tile_sum;
                    max[r] = new_max;
                    if correction != 1.0 {
                        acc[r * hd..(r + 1) * hd]
                            .iter_mut()
                            .for_each(|a| *a *= correction);
                    }
                }
                matmul(
                    ViewMut::new(acc, q_rows, hd),
                    View::new(tile, q_rows, k_rows),
                    v,
                    true,
                    Par::Seq,
                );
            }
            for r in 0..q_rows {
                let s = q0 + r;
                // SAFETY: task (b, h, qi) alone writes rows q0.. of head h and their lse entries.
                unsafe {
                    let dst = out_ptr.get().add((b * shape.seq + s) * out_stride + h * hd);
                    for d in 0..hd {
                        *dst.add(d) = acc[r * hd + d] / sum[r];
                    }
                    *lse_ptr.get().add(shape.lse_index(b, h, s)) = max[r] + sum[r].ln();
                }
            }
        },
    );
    lse
}

/// Zeroes, in every row of sequence `b` of the gradient buffer behind `grad`, the columns a
/// backward task (b, g) owns: the q columns of kv group g's heads and the k and v columns of kv
/// head g (the buffer has `qkv`'s layout).
///
/// # Safety
/// `grad` must point to `shape.batch · shape.seq` rows of `layout.row_stride` values, and no
/// other thread may access these columns meanwhile.
pub(crate) unsafe fn zero_group_gradients(
    grad: SharedOut,
    layout: QkvLayout,
    shape: AttentionShape,
    b: usize,
    g: usize,
) {
    let hd = shape.head_dim;
    let heads = g * shape.queries_per_kv_head()..(g + 1) * shape.queries_per_kv_head();
    for s in 0..shape.seq {
        // SAFETY: the caller guarantees the rows exist and that only this task touches these
        // columns of them.
        unsafe {
            let base = grad.get().add((b * shape.seq + s) * layout.row_stride);
            std::ptr::write_bytes(
                base.add(layout.q_offset + heads.start * hd),
                0,
                heads.len() * hd,
            );
            std::ptr::write_bytes(base.add(layout.k_offset + g * hd), 0, hd);
            std::ptr::write_bytes(base.add(layout.v_offset + g * hd), 0, hd);
        }
    }
}

/// Causal attention backward. Writes the q, k and v parts of `dqkv` (same layout as `qkv`).
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    qkv: &[f32],
    lse: &[f32],
    layout: QkvLayout,
    shape: AttentionShape,
    scale: f32,
) {
    check_shapes(qkv, layout, shape);
    assert_eq!(dqkv.len(), qkv.len(), "dqkv buffer size");
    let (hd, rs) = (shape.head_dim, layout.row_stride);
    let out_stride = shape.heads * hd;
    let row_dots: Vec<f32> = (0..shape.batch * shape.heads * shape.seq)
        .into_par_iter()
        .map(|idx| {
            let (bh, s) = (idx / shape.seq, idx % shape.seq);
            let (b, h) = (bh / shape.heads, bh % shape.heads);
            let at = (b * shape.seq + s) * out_stride + h * hd;
            dout[at..at + hd]
                .iter()
                .zip(&out[at..at + hd])
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect();
    let grad_ptr = SharedOut(dqkv.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..shape.batch)
        .flat_map(|b| (0..shape.kv_heads).map(move |g| (b, g)))
        .collect();
    tasks.into_par_iter().for_each_init(
        || (vec![0.0f32; BLOCK * BLOCK], vec![0.0f32; BLOCK * BLOCK]),
        |(probs, dprobs), (b, g)| {
            let row = |s: usize| (b * shape.seq + s) * rs;
            let heads = g * shape.queries_per_kv_head()..(g + 1) * shape.queries_per_kv_head();
            // SAFETY: task (b, g) alone touches, in sequence b, the dq columns of the heads of
            // group g and the dk, dv columns of kv head g; they are zeroed here before use.
            unsafe { zero_group_gradients(grad_ptr, layout, shape, b, g) };
            for h in heads {
                for kj in 0..shape.blocks() {
                    let (k0, k_rows) = shape.block_rows(kj);
                    let k = tile(qkv, row(k0) + layout.k_offset + g * hd, k_rows, hd, rs);
                    let v = tile(qkv, row(k0) + layout.v_offset + g * hd, k_rows, hd, rs);
                    let dk = grad_ptr.matrix(row(k0) + layout.k_offset + g * hd, k_rows, hd, rs);
                    let dv = grad_ptr.matrix(row(k0) + layout.v_offset + g * hd, k_rows, hd, rs);
                    for qi in kj..shape.blocks() {
                        let (q0, q_rows) = shape.block_rows(qi);
                        let q = tile(qkv, row(q0) + layout.q_offset + h * hd, q_rows, hd, rs);
                        let do_start = (b * shape.seq + q0) * out_stride + h * hd;
                        let d_out = tile(dout, do_start, q_rows, hd, out_stride);
                        let p = &mut probs[..q_rows * k_rows];
                        let dp = &mut dprobs[..q_rows * k_rows];
                        matmul(ViewMut::new(p, q_rows, k_rows), q, k.t(), false, Par::Seq);
                        matmul(
                            ViewMut::new(dp, q_rows, k_rows),
                            d_out,
                            v.t(),
                            false,
                            Par::Seq,
                        );
                        for r in 0..q_rows {
                            let valid = if kj == qi { r + 1 } else { k_rows };
                            let lse_r = lse[shape.lse_index(b, h, q0 + r)];
                            let d_r = row_dots[shape.lse_index(b, h, q0 + r)];
                            let p_row = &mut p[r * k_rows..(r + 1) * k_rows];
                            let dp_row = &mut dp[r * k_rows..(r + 1) * k_rows];
                            for c in 0..valid {
                                p_row[c] = fast_exp(p_row[c] * scale - lse_r);
                                dp_row[c] = p_row[c] * (dp_row[c] - d_r) * scale;
                            }
                            p_row[valid..].fill(0.0);
                            dp_row[valid..].fill(0.0);
                        }
                        let dq =
                            grad_ptr.matrix(row(q0) + layout.q_offset + h * hd, q_rows, hd, rs);
                        // SAFETY: see the zeroing above; dq, dk, dv do not overlap the inputs.
                        unsafe {
                            matmul_raw(dv, View::new(p, q_rows, k_rows).t(), d_out, true);
                            matmul_raw(dq, View::new(dp, q_rows, k_rows), k, true);
                            matmul_raw(dk, View::new(dp, q_rows, k_rows).t(), q, true);
                        }
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_gradient_with, probe_loss, random_vec};

    /// Straightforward f64 attention with a full score matrix, the independent reference.
    fn reference(qkv: &[f32], layout: QkvLayout, shape: AttentionShape, scale: f32) -> Vec<f32> {
        let hd = shape.head_dim;
        let mut out = vec![0.0f32; shape.batch * shape.seq * shape.heads * hd];
        for b in 0..shape.batch {
            for h in 0..shape.heads {
                let g = h / (shape.heads / shape.kv_heads);
                for i in 0..shape.seq {
                    let q = &qkv
                        [(b * shape.seq + i) * layout.row_stride + layout.q_offset + h * hd..]
                        [..hd];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            let k = &qkv[(b * shape.seq + j) * layout.row_stride
                                + layout.k_offset
                                + g * hd..][..hd];
                            q.iter()
                                .zip(k)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for d in 0..hd {
                        let value: f64 = (0..=i)
                            .map(|j| {
                                weights[j]
                                    * qkv[(b * shape.seq + j) * layout.row_stride
                                        + layout.v_offset
                                        + g * hd
                                        + d] as f64
                            })
                            .sum();
                        out[(b * shape.seq + i) * shape.heads * hd + h * hd + d] =
                            (value / total) as f32;
                    }
                }
            }
        }
        out
    }

    fn setup(seq: usize) -> (Vec<f32>, QkvLayout, AttentionShape) {
        let shape = AttentionShape {
            batch: 2,
            seq,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let row_stride = (shape.heads + 2 * shape.kv_heads) * shape.head_dim;
        let layout = QkvLayout {
            row_stride,
            q_offset: 0,
            k_offset: 32,
            v_offset: 48,
        };
        let qkv: Vec<f32> = random_vec(shape.batch * seq * row_stride, 11)
            .iter()
            .map(|v| v * 2.0)
            .collect();
        (qkv, layout, shape)
    }

    #[test]
    fn forward_matches_full_softmax_across_tile_boundaries() {
        for seq in [1, 5, 64, 70, 129] {
            let (qkv, layout, shape) = setup(seq);
            let mut out = vec![0.0; shape.batch * seq * shape.heads * shape.head_dim];
            attention_forward(&mut out, &qkv, layout, shape, 0.35);
            assert_close(
                &out,
                &reference(&qkv, layout, shape, 0.35),
                1e-5,
                "attention",
            );
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for seq in [3, 70] {
            let (qkv, layout, shape) = setup(seq);
            let out_len = shape.batch * seq * shape.heads * shape.head_dim;
            let probe = random_vec(out_len, 12);
            let mut out = vec![0.0; out_len];
            let lse = attention_forward(&mut out, &qkv, layout, shape, 0.35);
            let mut dqkv = vec![f32::NAN; qkv.len()];
            attention_backward(&mut dqkv, &probe, &out, &qkv, &lse, layout, shape, 0.35);
            assert!(
                dqkv.iter().all(|v| v.is_finite()),
                "some gradient was not written"
            );
            let mut loss = |x: &[f32]| {
                let mut y = vec![0.0; out_len];
                attention_forward(&mut y, x, layout, shape, 0.35);
                probe_loss(&y, &probe)
            };
            check_gradient_with(&qkv, &dqkv, &mut loss, 3e-3, 1e-2, "attention dqkv");
        }
    }
}
