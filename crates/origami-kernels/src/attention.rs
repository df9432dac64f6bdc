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
//!
//! Tile products run on prepared operands (`tiles::TileOperand`): each key block is packed once
//! for every query block after it, each query block once per task; see `attention_bf16.rs`.
//! The kernels are written once over the GEMM kernel (`causal_forward`, `causal_backward`):
//! its `tile_softmax::TileSoftmax` says where the probabilities go, in place in f32 or rounded
//! into tiles of their own in bf16.

use crate::attention_task::{
    add_pair_gradients, add_weighted_values, fold_row, own, pair_scores, BackwardScratch,
    ForwardScratch, QueryBlock, TILE,
};
use crate::matmul::{F32Kernel, RawMatrix, View};
use crate::row_exp::scaled_max;
use crate::tile_softmax::TileSoftmax;
use crate::tiles::{tile, SharedOut, TileKernel, TileOperand};
use rayon::prelude::*;

/// Tile edge for queries and keys.
pub(crate) const BLOCK: usize = TILE;

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

fn check_shapes<T>(qkv: &[T], layout: QkvLayout, shape: AttentionShape) {
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

/// Every key block of every (sequence, kv head), prepared as the right operands of the tile
/// products: `Kᵀ` (for `S = Q·Kᵀ`) and `V` (for `O += P·V`), indexed by
/// `(b·kv_heads + g)·blocks + j`. Packed once, they serve every query block and every head of
/// the group.
fn packed_key_blocks<K: TileKernel>(
    qkv: &[K::Elem],
    layout: QkvLayout,
    shape: AttentionShape,
    kernel: K,
) -> Vec<(TileOperand, TileOperand)> {
    let (hd, rs) = (shape.head_dim, layout.row_stride);
    (0..shape.batch * shape.kv_heads * shape.blocks())
        .into_par_iter()
        .map(|idx| {
            let (bg, j) = (idx / shape.blocks(), idx % shape.blocks());
            let (b, g) = (bg / shape.kv_heads, bg % shape.kv_heads);
            let (k0, k_rows) = shape.block_rows(j);
            let at = (b * shape.seq + k0) * rs + g * hd;
            let k = tile(qkv, at + layout.k_offset, k_rows, hd, rs);
            let v = tile(qkv, at + layout.v_offset, k_rows, hd, rs);
            let (mut kt, mut vs) = (TileOperand::default(), TileOperand::default());
            // SAFETY: the callers check that the CPU runs the kernel.
            unsafe {
                kernel.pack_rhs(&mut kt, k.t());
                kernel.pack_rhs(&mut vs, v);
            }
            (kt, vs)
        })
        .collect()
}

/// Prepares every query block of head `h` in sequence `b` (`dout` is `[batch·seq, heads·hd]`),
/// reusing the operands' buffers.
#[allow(clippy::too_many_arguments)]
fn prepare_query_blocks<K: TileKernel>(
    blocks: &mut Vec<QueryBlock>,
    qkv: &[K::Elem],
    dout: &[K::Elem],
    layout: QkvLayout,
    shape: AttentionShape,
    b: usize,
    h: usize,
    kernel: K,
) {
    let hd = shape.head_dim;
    let out_stride = shape.heads * hd;
    blocks.resize_with(shape.blocks(), QueryBlock::default);
    for (qi, block) in blocks.iter_mut().enumerate() {
        let (q0, q_rows) = shape.block_rows(qi);
        let q = query_tile(qkv, layout, shape, b, h, qi);
        let d_out = tile(
            dout,
            (b * shape.seq + q0) * out_stride + h * hd,
            q_rows,
            hd,
            out_stride,
        );
        // SAFETY: the callers check that the CPU runs the kernel.
        unsafe { block.pack(kernel, q, d_out) };
    }
}

/// Query block `qi` of head `h` in sequence `b`, as a tile of `qkv`.
fn query_tile<T>(
    qkv: &[T],
    layout: QkvLayout,
    shape: AttentionShape,
    b: usize,
    h: usize,
    qi: usize,
) -> View<'_, T> {
    let (q0, q_rows) = shape.block_rows(qi);
    let (hd, rs) = (shape.head_dim, layout.row_stride);
    tile(
        qkv,
        (b * shape.seq + q0) * rs + layout.q_offset + h * hd,
        q_rows,
        hd,
        rs,
    )
}

/// Prepares key block `kj` of kv head `g` in sequence `b` as the backward's three right
/// operands — `Kᵀ` (`S = Q·Kᵀ`), `Vᵀ` (`dP = dO·Vᵀ`) and `K` (`dQ += dS·K`) — and returns the
/// block's `dK` and `dV` tiles of the gradient buffer behind `grad` (`qkv`'s layout).
///
/// # Safety
/// The CPU runs the kernel; `grad` points to a buffer of `qkv`'s size.
#[allow(clippy::too_many_arguments)]
unsafe fn prepare_key_block<K: TileKernel>(
    [kt, vt, ks]: &mut [TileOperand; 3],
    kernel: K,
    qkv: &[K::Elem],
    grad: SharedOut,
    layout: QkvLayout,
    shape: AttentionShape,
    (b, g, kj): (usize, usize, usize),
) -> (RawMatrix, RawMatrix) {
    let (hd, rs) = (shape.head_dim, layout.row_stride);
    let (k0, k_rows) = shape.block_rows(kj);
    let at = (b * shape.seq + k0) * rs + g * hd;
    let k = tile(qkv, at + layout.k_offset, k_rows, hd, rs);
    let v = tile(qkv, at + layout.v_offset, k_rows, hd, rs);
    kernel.pack_rhs(kt, k.t());
    kernel.pack_rhs(vt, v.t());
    kernel.pack_rhs(ks, k);
    (
        grad.matrix(at + layout.k_offset, k_rows, hd, rs),
        grad.matrix(at + layout.v_offset, k_rows, hd, rs),
    )
}

/// Causal attention forward. Writes `out[batch·seq, heads·head_dim]`, returns `lse[batch, heads, seq]`.
pub fn attention_forward(
    out: &mut [f32],
    qkv: &[f32],
    layout: QkvLayout,
    shape: AttentionShape,
    scale: f32,
) -> Vec<f32> {
    causal_forward(out, qkv, layout, shape, scale, F32Kernel::current())
}

/// Causal attention forward on `kernel` (f32, or bf16 with the probabilities rounded, see
/// `attention_bf16.rs`), one task per (sequence, head, query block). Panics if the CPU does
/// not run the kernel.
pub(crate) fn causal_forward<K: TileSoftmax>(
    out: &mut [f32],
    qkv: &[K::Elem],
    layout: QkvLayout,
    shape: AttentionShape,
    scale: f32,
    kernel: K,
) -> Vec<f32> {
    assert!(kernel.runs_here(), "{kernel:?} does not run on this CPU");
    check_shapes(qkv, layout, shape);
    let hd = shape.head_dim;
    let out_stride = shape.heads * hd;
    assert_eq!(
        out.len(),
        shape.batch * shape.seq * out_stride,
        "attention output size"
    );
    let mut lse = vec![0.0f32; shape.batch * shape.heads * shape.seq];
    let key_blocks = packed_key_blocks(qkv, layout, shape, kernel);
    let out_ptr = SharedOut(out.as_mut_ptr());
    let lse_ptr = SharedOut(lse.as_mut_ptr());
    let tasks: Vec<(usize, usize, usize)> = (0..shape.batch)
        .flat_map(|b| {
            (0..shape.heads).flat_map(move |h| (0..shape.blocks()).rev().map(move |i| (b, h, i)))
        })
        .collect();
    tasks.into_par_iter().for_each_init(
        || ForwardScratch::new::<K>(hd),
        |task, (b, h, qi)| {
            let ForwardScratch {
                scores,
                probs,
                acc,
                q_op,
                p_op,
            } = task;
            let g = h / shape.queries_per_kv_head();
            let (q0, q_rows) = shape.block_rows(qi);
            // SAFETY: the kernel runs on this CPU (asserted above).
            unsafe { kernel.pack_lhs(q_op, query_tile(qkv, layout, shape, b, h, qi)) };
            let acc = &mut acc[..q_rows * hd];
            acc.fill(0.0);
            let mut max = [f32::NEG_INFINITY; TILE];
            let mut sum = [0.0f32; TILE];
            for kj in 0..=qi {
                let k_rows = shape.block_rows(kj).1;
                let (kt, vs) = &key_blocks[(b * shape.kv_heads + g) * shape.blocks() + kj];
                let s = &mut scores[..q_rows * k_rows];
                let p = K::own_tile(probs, q_rows * k_rows);
                // SAFETY: as above; `s` and `acc` are this task's own.
                unsafe { kernel.multiply_tiles(own(s, q_rows, k_rows), q_op, kt, false) };
                for r in 0..q_rows {
                    let valid = if kj == qi { r + 1 } else { k_rows };
                    let row = r * k_rows..(r + 1) * k_rows;
                    let new_max = max[r].max(scaled_max(&s[row.start..][..valid], scale));
                    let tile_sum = K::exp_row(s, p, row, valid, scale, new_max);
                    let acc_row = &mut acc[r * hd..(r + 1) * hd];
                    fold_row(&mut max[r], &mut sum[r], acc_row, new_max, tile_sum);
                }
                let probabilities = K::product_input(s, p);
                // SAFETY: as above.
                unsafe {
                    add_weighted_values(kernel, p_op, probabilities, (q_rows, k_rows), vs, acc)
                };
            }
            for r in 0..q_rows {
                let s = q0 + r;
                // SAFETY: task (b, h, qi) alone writes rows q0.. of head h and their lse entries.
                let dst = unsafe {
                    let at = out_ptr.get().add((b * shape.seq + s) * out_stride + h * hd);
                    *lse_ptr.get().add(shape.lse_index(b, h, s)) = max[r] + sum[r].ln();
                    std::slice::from_raw_parts_mut(at, hd)
                };
                for (o, &a) in dst.iter_mut().zip(&acc[r * hd..(r + 1) * hd]) {
                    *o = a / sum[r];
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
unsafe fn zero_group_gradients(
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
    let kernel = F32Kernel::current();
    causal_backward(dqkv, dout, out, qkv, lse, layout, shape, scale, kernel);
}

/// Causal attention backward on `kernel`, one task per (sequence, kv head): the forward's `out`
/// and `lse`, the output gradient `dout` and `qkv` as the kernel takes them; writes the q, k
/// and v parts of `dqkv` (f32). Panics if the CPU does not run the kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_backward<K: TileSoftmax>(
    dqkv: &mut [f32],
    dout: &[K::Elem],
    out: &[f32],
    qkv: &[K::Elem],
    lse: &[f32],
    layout: QkvLayout,
    shape: AttentionShape,
    scale: f32,
    kernel: K,
) {
    assert!(kernel.runs_here(), "{kernel:?} does not run on this CPU");
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
                .map(|(&a, b)| K::widen(a) * b)
                .sum()
        })
        .collect();
    let grad_ptr = SharedOut(dqkv.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..shape.batch)
        .flat_map(|b| (0..shape.kv_heads).map(move |g| (b, g)))
        .collect();
    let group = shape.queries_per_kv_head();
    tasks.into_par_iter().for_each_init(
        || BackwardScratch::new::<K>(group),
        |task, (b, g)| {
            let BackwardScratch {
                queries,
                keys,
                pair_ops,
                tiles,
            } = task;
            let row = |s: usize| (b * shape.seq + s) * rs;
            // SAFETY: task (b, g) alone touches, in sequence b, the dq columns of the heads of
            // group g and the dk, dv columns of kv head g; they are zeroed here before use.
            unsafe { zero_group_gradients(grad_ptr, layout, shape, b, g) };
            for (slot, blocks) in queries.iter_mut().enumerate() {
                let h = g * group + slot;
                prepare_query_blocks(blocks, qkv, dout, layout, shape, b, h, kernel);
            }
            for kj in 0..shape.blocks() {
                let k_rows = shape.block_rows(kj).1;
                // SAFETY: the kernel runs on this CPU (asserted above); `grad_ptr` is `dqkv`.
                let (dk, dv) = unsafe {
                    prepare_key_block(keys, kernel, qkv, grad_ptr, layout, shape, (b, g, kj))
                };
                let [kt, vt, ks] = &*keys;
                for (slot, blocks) in queries.iter().enumerate() {
                    let h = g * group + slot;
                    for (qi, block) in blocks.iter().enumerate().skip(kj) {
                        let (q0, q_rows) = shape.block_rows(qi);
                        let pair = (q_rows, k_rows);
                        let mut tiles = tiles.pair::<K>(q_rows * k_rows);
                        // SAFETY: as above; the pair's tiles are this task's own.
                        unsafe { pair_scores(kernel, &mut tiles, pair, block, [kt, vt]) };
                        for r in 0..q_rows {
                            let valid = if kj == qi { r + 1 } else { k_rows };
                            let lse_r = lse[shape.lse_index(b, h, q0 + r)];
                            let d_r = row_dots[shape.lse_index(b, h, q0 + r)];
                            let at = r * k_rows..(r + 1) * k_rows;
                            K::probabilities_and_grad_row(
                                tiles.reborrow(),
                                at,
                                valid,
                                scale,
                                lse_r,
                                d_r,
                            );
                        }
                        let dq =
                            grad_ptr.matrix(row(q0) + layout.q_offset + h * hd, q_rows, hd, rs);
                        // SAFETY: see the zeroing above; dq, dk, dv do not overlap the inputs.
                        unsafe {
                            let grads = [dq, dk, dv];
                            add_pair_gradients(kernel, tiles, pair, pair_ops, block, ks, grads);
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
