//! Attention of a block of queries against a block of keys, masked by global token positions:
//! query `i` sees key `j` iff `kv_positions[j] <= q_positions[i]`. Context parallelism runs it
//! once per key block that a rank holds or receives and merges the partial results.
//!
//! Layouts (compact): queries `q[batch·q_len, heads·head_dim]`; keys and values fused in
//! `kv[batch·kv_len, 2·kv_heads·head_dim]`, key heads first, then value heads. Query head `h`
//! reads key/value head `h / (heads / kv_heads)`. Positions are the same for every sequence.
//!
//! Forward (tiles of `BLOCK × BLOCK`, tiles with no visible pair skipped): online softmax as in
//! [`crate::attention`]. Saved state: the output and `lse[batch, heads, q_len] = ln Σ e^S` over
//! the visible keys; a query that sees no key gets output 0 and `lse = −∞`.
//!
//! Merge of two partial results of the same queries: `lse = ln(e^lse + e^lse_part)`,
//! `O = O·e^(lse_old − lse) + O_part·e^(lse_part − lse)`.
//!
//! Backward of one block, given the final output and lse over all blocks and
//! `D = Σ dO∘O` per row: `P = e^(S − lse)`, `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP − D)`,
//! `dQ += scale·dS·K`, `dK += scale·dSᵀ·Q`. Gradients are added (each block contributes).
//! Tasks own one (batch, kv head), so their dq, dk and dv writes never overlap.
//!
//! As in the causal kernel, products run on operands prepared once (each key tile before the
//! forward's tasks start, a backward task's query tiles up front and each key tile once), and
//! the kernels are written once over the GEMM kernel (`masked_forward`, `masked_backward`),
//! the f32 one here and the bf16 one in `masked_attention_bf16.rs`. A (query, key) tile pair
//! with every key visible runs the causal kernel's vectorised row passes.

use crate::attention_task::{
    add_pair_gradients, add_weighted_values, fold_row, own, pair_scores, BackwardScratch,
    ForwardScratch, QueryBlock, TILE,
};
use crate::math::fast_exp;
use crate::matmul::F32Kernel;
use crate::row_exp::scaled_max;
use crate::tile_softmax::TileSoftmax;
use crate::tiles::{tile, SharedOut, TileKernel, TileOperand};
use rayon::prelude::*;

/// Tile edge for queries and keys.
pub(crate) const BLOCK: usize = TILE;

/// Sizes of one masked attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskedAttentionShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Queries per sequence.
    pub q_len: usize,
    /// Keys (and values) per sequence.
    pub kv_len: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (query groups); divides `heads`.
    pub kv_heads: usize,
    /// Dim of one head.
    pub head_dim: usize,
}

impl MaskedAttentionShape {
    pub(crate) fn queries_per_kv_head(&self) -> usize {
        self.heads / self.kv_heads
    }

    pub(crate) fn q_stride(&self) -> usize {
        self.heads * self.head_dim
    }

    pub(crate) fn kv_stride(&self) -> usize {
        2 * self.kv_heads * self.head_dim
    }

    pub(crate) fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.heads + h) * self.q_len + i
    }

    /// Elements of `q` (and of the output).
    pub fn q_elements(&self) -> usize {
        self.batch * self.q_len * self.q_stride()
    }

    /// Elements of `kv`.
    pub fn kv_elements(&self) -> usize {
        self.batch * self.kv_len * self.kv_stride()
    }

    /// Elements of `lse` (one per batch, head and query).
    pub fn lse_elements(&self) -> usize {
        self.batch * self.heads * self.q_len
    }
}

/// One tile of positions: where it starts, how many rows, and the range of positions in it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tile {
    pub(crate) start: usize,
    pub(crate) rows: usize,
    min: usize,
    max: usize,
}

/// Splits `positions` into tiles of `BLOCK` rows with their position ranges.
pub(crate) fn tiles(positions: &[usize]) -> Vec<Tile> {
    positions
        .chunks(BLOCK)
        .enumerate()
        .map(|(t, chunk)| Tile {
            start: t * BLOCK,
            rows: chunk.len(),
            min: chunk.iter().copied().min().unwrap_or(0),
            max: chunk.iter().copied().max().unwrap_or(0),
        })
        .collect()
}

impl Tile {
    /// Whether no query of `self` sees any key of `keys`.
    pub(crate) fn blind_to(&self, keys: &Tile) -> bool {
        keys.min > self.max
    }

    /// Whether every query of `self` sees every key of `keys` (no mask inside the pair).
    pub(crate) fn sees_all_of(&self, keys: &Tile) -> bool {
        keys.max <= self.min
    }
}

pub(crate) fn check_inputs<T>(
    q: &[T],
    kv: &[T],
    q_positions: &[usize],
    kv_positions: &[usize],
    shape: MaskedAttentionShape,
) {
    assert!(
        shape.kv_heads > 0 && shape.heads.is_multiple_of(shape.kv_heads),
        "heads ({}) must be a multiple of kv heads ({})",
        shape.heads,
        shape.kv_heads
    );
    assert_eq!(q.len(), shape.q_elements(), "q buffer size");
    assert_eq!(kv.len(), shape.kv_elements(), "kv buffer size");
    assert_eq!(q_positions.len(), shape.q_len, "q positions length");
    assert_eq!(kv_positions.len(), shape.kv_len, "kv positions length");
}

/// Writes a query tile's finished rows: output `acc / sum` (0 for a query that saw no key) and
/// `lse = max + ln sum` (`−∞` for it).
///
/// # Safety
/// `out` and `lse` must point to buffers of `shape.q_elements()` and `shape.lse_elements()`
/// values, and no other thread may access the tile's rows of head `h` meanwhile.
pub(crate) unsafe fn store_tile(
    out: SharedOut,
    lse: SharedOut,
    shape: MaskedAttentionShape,
    (b, h, qt): (usize, usize, Tile),
    acc: &[f32],
    max: &[f32],
    sum: &[f32],
) {
    let (hd, qs) = (shape.head_dim, shape.q_stride());
    for r in 0..qt.rows {
        let i = qt.start + r;
        let seen = sum[r] > 0.0;
        // SAFETY: the caller guarantees the buffers' sizes and that only this task touches
        // these rows.
        unsafe {
            let dst = out.get().add((b * shape.q_len + i) * qs + h * hd);
            for d in 0..hd {
                *dst.add(d) = if seen { acc[r * hd + d] / sum[r] } else { 0.0 };
            }
            *lse.get().add(shape.lse_index(b, h, i)) = if seen {
                max[r] + sum[r].ln()
            } else {
                f32::NEG_INFINITY
            };
        }
    }
}

/// Masked attention forward of one block. Writes `out[batch·q_len, heads·head_dim]`, returns
/// `lse[batch, heads, q_len]` (`−∞`, with output 0, for a query that sees no key).
pub fn masked_attention_forward(
    out: &mut [f32],
    q: &[f32],
    kv: &[f32],
    q_positions: &[usize],
    kv_positions: &[usize],
    shape: MaskedAttentionShape,
    scale: f32,
) -> Vec<f32> {
    let positions = (q_positions, kv_positions);
    masked_forward(out, q, kv, positions, shape, scale, F32Kernel::current())
}

/// Every key tile of every (sequence, kv head), prepared as the right operands of the tile
/// products (`Kᵀ` and `V`), indexed by `(b·kv_heads + g)·tiles + j`: packed once, they serve
/// every query tile and every head of the group.
fn packed_key_tiles<K: TileKernel>(
    kv: &[K::Elem],
    kv_tiles: &[Tile],
    shape: MaskedAttentionShape,
    kernel: K,
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
            // SAFETY: the callers run the kernel on a CPU that has it.
            unsafe {
                kernel.pack_rhs(&mut k_op, k.t());
                kernel.pack_rhs(&mut v_op, v);
            }
            (k_op, v_op)
        })
        .collect()
}

/// Masked attention forward of one block on `kernel` (f32, or bf16 with the probabilities
/// rounded, see `masked_attention_bf16.rs`), one task per (sequence, head, query tile), given
/// the (query, key) positions. Panics if the CPU does not run the kernel.
pub(crate) fn masked_forward<K: TileSoftmax>(
    out: &mut [f32],
    q: &[K::Elem],
    kv: &[K::Elem],
    (q_positions, kv_positions): (&[usize], &[usize]),
    shape: MaskedAttentionShape,
    scale: f32,
    kernel: K,
) -> Vec<f32> {
    assert!(kernel.runs_here(), "{kernel:?} does not run on this CPU");
    check_inputs(q, kv, q_positions, kv_positions, shape);
    assert_eq!(out.len(), shape.q_elements(), "attention output size");
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
        || ForwardScratch::new::<K>(hd),
        |task, (b, h, qt)| {
            let ForwardScratch {
                scores,
                probs,
                acc,
                q_op,
                p_op,
            } = task;
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
                let p = K::own_tile(probs, qt.rows * kt.rows);
                let key_positions = &kv_positions[kt.start..kt.start + kt.rows];
                // SAFETY: as above; `s` is this task's own.
                unsafe { kernel.multiply_tiles(own(s, qt.rows, kt.rows), q_op, k_op, false) };
                // Where every key is visible the causal kernel's vectorised row passes serve.
                let unmasked = qt.sees_all_of(kt);
                for r in 0..qt.rows {
                    let position = q_positions[qt.start + r];
                    let row = r * kt.rows..(r + 1) * kt.rows;
                    let tile_max = if unmasked {
                        scaled_max(&s[row.clone()], scale)
                    } else {
                        s[row.clone()]
                            .iter()
                            .zip(key_positions)
                            .filter(|(_, &kp)| kp <= position)
                            .fold(f32::NEG_INFINITY, |m, (&s, _)| m.max(s * scale))
                    };
                    if tile_max == f32::NEG_INFINITY {
                        row.for_each(|at| {
                            K::set_probability(s, p, at, 0.0);
                        });
                        continue;
                    }
                    let new_max = max[r].max(tile_max);
                    let tile_sum = if unmasked {
                        K::exp_row(s, p, row, kt.rows, scale, new_max)
                    } else {
                        let mut tile_sum = 0.0;
                        for (at, &kp) in row.zip(key_positions) {
                            let value = if kp <= position {
                                fast_exp(s[at] * scale - new_max)
                            } else {
                                0.0
                            };
                            tile_sum += K::set_probability(s, p, at, value);
                        }
                        tile_sum
                    };
                    let acc_row = &mut acc[r * hd..(r + 1) * hd];
                    fold_row(&mut max[r], &mut sum[r], acc_row, new_max, tile_sum);
                }
                let (probabilities, pair) = (K::product_input(s, p), (qt.rows, kt.rows));
                // SAFETY: as above; `acc` is this task's own.
                unsafe { add_weighted_values(kernel, p_op, probabilities, pair, v_op, acc) };
            }
            // SAFETY: task (b, h, tile) alone writes rows of the tile in head h and their lse.
            unsafe { store_tile(out_ptr, lse_ptr, shape, (b, h, qt), acc, &max, &sum) };
        },
    );
    lse
}

/// Merges the partial result `(out_part, lse_part)` of the same queries against other keys into
/// the running `(out, lse)` (online softmax); parts with `lse = −∞` contribute nothing.
pub fn merge_partial_attention(
    out: &mut [f32],
    lse: &mut [f32],
    out_part: &[f32],
    lse_part: &[f32],
    shape: MaskedAttentionShape,
) {
    assert_eq!(out.len(), shape.q_elements(), "attention output size");
    assert_eq!(out_part.len(), shape.q_elements(), "partial output size");
    assert_eq!(lse.len(), shape.lse_elements(), "lse size");
    assert_eq!(lse_part.len(), shape.lse_elements(), "partial lse size");
    let hd = shape.head_dim;
    let per_sequence = shape.q_len * shape.q_stride();
    let lse_per_sequence = shape.heads * shape.q_len;
    out.par_chunks_mut(per_sequence)
        .zip(lse.par_chunks_mut(lse_per_sequence))
        .zip(out_part.par_chunks(per_sequence))
        .zip(lse_part.par_chunks(lse_per_sequence))
        .for_each(|(((out, lse), out_part), lse_part)| {
            for h in 0..shape.heads {
                for i in 0..shape.q_len {
                    let (old, part) = (lse[h * shape.q_len + i], lse_part[h * shape.q_len + i]);
                    if part == f32::NEG_INFINITY {
                        continue;
                    }
                    let at = i * shape.q_stride() + h * hd;
                    let (o, p) = (&mut out[at..at + hd], &out_part[at..at + hd]);
                    if old == f32::NEG_INFINITY {
                        o.copy_from_slice(p);
                        lse[h * shape.q_len + i] = part;
                        continue;
                    }
                    let max = old.max(part);
                    let merged = max + ((old - max).exp() + (part - max).exp()).ln();
                    let (keep, add) = ((old - merged).exp(), (part - merged).exp());
                    o.iter_mut()
                        .zip(p)
                        .for_each(|(o, p)| *o = *o * keep + p * add);
                    lse[h * shape.q_len + i] = merged;
                }
            }
        });
}

/// `D = Σ_d dout∘out` per query and head, layout `[batch, heads, q_len]`, for
/// [`masked_attention_backward`] (computed once from the final output over all blocks).
pub fn attention_row_dots(dout: &[f32], out: &[f32], shape: MaskedAttentionShape) -> Vec<f32> {
    assert_eq!(dout.len(), shape.q_elements(), "output gradient size");
    assert_eq!(out.len(), shape.q_elements(), "attention output size");
    let hd = shape.head_dim;
    (0..shape.lse_elements())
        .into_par_iter()
        .map(|idx| {
            let (bh, i) = (idx / shape.q_len, idx % shape.q_len);
            let (b, h) = (bh / shape.heads, bh % shape.heads);
            let at = (b * shape.q_len + i) * shape.q_stride() + h * hd;
            dout[at..at + hd]
                .iter()
                .zip(&out[at..at + hd])
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

/// Masked attention backward of one block. Adds into `dq` (layout of `q`) and `dkv` (layout of
/// `kv`); `lse` is the final one over all key blocks and `row_dots` its
/// [`attention_row_dots`].
#[allow(clippy::too_many_arguments)]
pub fn masked_attention_backward(
    dq: &mut [f32],
    dkv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    kv: &[f32],
    lse: &[f32],
    row_dots: &[f32],
    q_positions: &[usize],
    kv_positions: &[usize],
    shape: MaskedAttentionShape,
    scale: f32,
) {
    let positions = (q_positions, kv_positions);
    let kernel = F32Kernel::current();
    let (inputs, saved) = ((q, kv), (lse, row_dots));
    masked_backward(
        dq, dkv, dout, inputs, saved, positions, shape, scale, kernel,
    );
}

/// Masked attention backward of one block on `kernel`, one task per (sequence, kv head), from
/// the output gradient, q and kv as the kernel takes them, the final `lse` with its row dots,
/// and the (query, key) positions; adds into `dq` and `dkv` (f32). Panics if the CPU does not
/// run the kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn masked_backward<K: TileSoftmax>(
    dq: &mut [f32],
    dkv: &mut [f32],
    dout: &[K::Elem],
    (q, kv): (&[K::Elem], &[K::Elem]),
    (lse, row_dots): (&[f32], &[f32]),
    (q_positions, kv_positions): (&[usize], &[usize]),
    shape: MaskedAttentionShape,
    scale: f32,
    kernel: K,
) {
    assert!(kernel.runs_here(), "{kernel:?} does not run on this CPU");
    check_inputs(q, kv, q_positions, kv_positions, shape);
    assert_eq!(dq.len(), q.len(), "dq buffer size");
    assert_eq!(dkv.len(), kv.len(), "dkv buffer size");
    assert_eq!(dout.len(), shape.q_elements(), "output gradient size");
    assert_eq!(lse.len(), shape.lse_elements(), "lse size");
    assert_eq!(row_dots.len(), shape.lse_elements(), "row dots size");
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
        || BackwardScratch::new::<K>(group),
        |task, (b, g)| {
            let BackwardScratch {
                queries,
                keys,
                pair_ops,
                tiles,
            } = task;
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
            for kt in &kv_tiles {
                let kv_row = (b * shape.kv_len + kt.start) * ks;
                let k = tile(kv, kv_row + g * hd, kt.rows, hd, ks);
                let v = tile(kv, kv_row + v_offset + g * hd, kt.rows, hd, ks);
                // SAFETY: as above.
                unsafe {
                    let [k_op, v_op, k_rhs] = &mut *keys;
                    kernel.pack_rhs(k_op, k.t());
                    kernel.pack_rhs(v_op, v.t());
                    kernel.pack_rhs(k_rhs, k);
                }
                let [k_op, v_op, k_rhs] = &*keys;
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
                        let pair = (qt.rows, kt.rows);
                        let mut tiles = tiles.pair::<K>(qt.rows * kt.rows);
                        // SAFETY: as above; the pair's tiles are this task's own.
                        unsafe { pair_scores(kernel, &mut tiles, pair, block, [k_op, v_op]) };
                        for r in 0..qt.rows {
                            let i = qt.start + r;
                            let (position, lse_r) = (q_positions[i], lse[shape.lse_index(b, h, i)]);
                            let d_r = row_dots[shape.lse_index(b, h, i)];
                            for (c, &kp) in key_positions.iter().enumerate() {
                                let at = r * kt.rows + c;
                                let (p, ds) = if kp <= position && lse_r != f32::NEG_INFINITY {
                                    let p = fast_exp(tiles.scores[at] * scale - lse_r);
                                    (p, p * (tiles.dscores[at] - d_r) * scale)
                                } else {
                                    (0.0, 0.0)
                                };
                                K::set_probability_and_grad(tiles.reborrow(), at, p, ds);
                            }
                        }
                        let dq_tile = dq_ptr.matrix(q_row, qt.rows, hd, qs);
                        // SAFETY: task (b, g) alone touches, in sequence b, the dq columns of
                        // the heads of group g and the dk, dv columns of kv head g; the
                        // gradient buffers do not overlap the inputs.
                        unsafe {
                            let grads = [dq_tile, dk, dv];
                            add_pair_gradients(kernel, tiles, pair, pair_ops, block, k_rhs, grads);
                        }
                    }
                }
            }
        },
    );
}

#[cfg(test)]
pub(crate) mod cases {
    //! Shapes, inputs and layouts shared by the tests of the f32 and bf16 kernels.

    use super::MaskedAttentionShape;
    use crate::attention::QkvLayout;
    use crate::testing::random_vec;

    pub(crate) const SCALE: f32 = 0.35;

    pub(crate) fn shape(batch: usize, q_len: usize, kv_len: usize) -> MaskedAttentionShape {
        MaskedAttentionShape {
            batch,
            q_len,
            kv_len,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        }
    }

    /// Random q and kv for `shape`, scaled so the softmax is far from uniform.
    pub(crate) fn inputs(shape: MaskedAttentionShape, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let scaled = |len, seed| random_vec(len, seed).iter().map(|v| v * 2.0).collect();
        (
            scaled(shape.q_elements(), seed),
            scaled(shape.kv_elements(), seed + 1),
        )
    }

    /// The fused `[q | k | v]` buffer of the causal kernel and its layout.
    pub(crate) fn fused(
        q: &[f32],
        kv: &[f32],
        shape: MaskedAttentionShape,
    ) -> (Vec<f32>, QkvLayout) {
        let (qs, ks) = (shape.q_stride(), shape.kv_stride());
        let rows = shape.batch * shape.q_len;
        let qkv = (0..rows)
            .flat_map(|r| {
                q[r * qs..(r + 1) * qs]
                    .iter()
                    .chain(&kv[r * ks..(r + 1) * ks])
            })
            .copied()
            .collect();
        let layout = QkvLayout {
            row_stride: qs + ks,
            q_offset: 0,
            k_offset: qs,
            v_offset: qs + ks / 2,
        };
        (qkv, layout)
    }

    /// Splits a fused `[q | k | v]` gradient into the compact q and kv layouts.
    pub(crate) fn split_fused(dqkv: &[f32], shape: MaskedAttentionShape) -> (Vec<f32>, Vec<f32>) {
        let (qs, ks) = (shape.q_stride(), shape.kv_stride());
        let rows = dqkv.chunks(qs + ks);
        let dq = rows.clone().flat_map(|r| &r[..qs]).copied().collect();
        let dkv = rows.flat_map(|r| &r[qs..]).copied().collect();
        (dq, dkv)
    }

    /// Shuffled, non-contiguous positions: query 0 (position 1) sees no key.
    pub(crate) fn scattered_positions(len: usize, seed: usize) -> Vec<usize> {
        (0..len)
            .map(|i| 2 + (i * 37 + seed * 11) % (3 * len))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::cases::{fused, inputs, scattered_positions, shape, split_fused, SCALE};
    use super::*;
    use crate::attention::{attention_backward, attention_forward, AttentionShape};
    use crate::testing::{assert_close, check_gradient_with, probe_loss, random_vec};

    fn forward(
        q: &[f32],
        kv: &[f32],
        q_positions: &[usize],
        kv_positions: &[usize],
        shape: MaskedAttentionShape,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; shape.q_elements()];
        let lse =
            masked_attention_forward(&mut out, q, kv, q_positions, kv_positions, shape, SCALE);
        (out, lse)
    }

    #[test]
    fn contiguous_positions_match_the_causal_kernel() {
        for seq in [1, 5, 64, 70, 129] {
            let shape = shape(2, seq, seq);
            let (q, kv) = inputs(shape, 3);
            let positions: Vec<usize> = (0..seq).collect();
            let (out, lse) = forward(&q, &kv, &positions, &positions, shape);
            let (qkv, layout) = fused(&q, &kv, shape);
            let causal = AttentionShape {
                batch: shape.batch,
                seq,
                heads: shape.heads,
                kv_heads: shape.kv_heads,
                head_dim: shape.head_dim,
            };
            let mut expected = vec![0.0; shape.q_elements()];
            let expected_lse = attention_forward(&mut expected, &qkv, layout, causal, SCALE);
            assert_close(&out, &expected, 1e-5, "output");
            assert_close(&lse, &expected_lse, 1e-5, "lse");

            let dout = random_vec(shape.q_elements(), 5);
            let mut dq = vec![0.0; q.len()];
            let mut dkv = vec![0.0; kv.len()];
            let dots = attention_row_dots(&dout, &out, shape);
            masked_attention_backward(
                &mut dq, &mut dkv, &dout, &q, &kv, &lse, &dots, &positions, &positions, shape,
                SCALE,
            );
            let mut dqkv = vec![0.0; qkv.len()];
            attention_backward(
                &mut dqkv,
                &dout,
                &expected,
                &qkv,
                &expected_lse,
                layout,
                causal,
                SCALE,
            );
            let (expected_dq, expected_dkv) = split_fused(&dqkv, shape);
            assert_close(&dq, &expected_dq, 1e-5, "dq");
            assert_close(&dkv, &expected_dkv, 1e-5, "dkv");
        }
    }

    #[test]
    fn split_keys_merged_equal_one_call() {
        for (q_len, kv_len, split) in [(7, 9, 4), (70, 130, 64), (70, 130, 100)] {
            let shape = shape(2, q_len, kv_len);
            let (q, kv) = inputs(shape, 7);
            let q_positions = scattered_positions(q_len, 1);
            let mut kv_positions = scattered_positions(kv_len, 2);
            kv_positions[0] = 0;
            let (expected, expected_lse) = forward(&q, &kv, &q_positions, &kv_positions, shape);
            let part_shape = |kv_len| MaskedAttentionShape { kv_len, ..shape };
            let rows_of = |lo: usize, hi: usize| -> Vec<f32> {
                let ks = shape.kv_stride();
                (0..shape.batch)
                    .flat_map(|b| &kv[(b * kv_len + lo) * ks..(b * kv_len + hi) * ks])
                    .copied()
                    .collect()
            };
            let (first, second) = (rows_of(0, split), rows_of(split, kv_len));
            let (mut out, mut lse) = forward(
                &q,
                &first,
                &q_positions,
                &kv_positions[..split],
                part_shape(split),
            );
            let (out_part, lse_part) = forward(
                &q,
                &second,
                &q_positions,
                &kv_positions[split..],
                part_shape(kv_len - split),
            );
            merge_partial_attention(&mut out, &mut lse, &out_part, &lse_part, shape);
            assert_close(&out, &expected, 1e-5, "merged output");
            assert_close(&lse, &expected_lse, 1e-5, "merged lse");
        }
    }

    #[test]
    fn gradients_match_finite_differences_with_scattered_positions() {
        let shape = shape(2, 9, 11);
        let (q, kv) = inputs(shape, 9);
        let mut q_positions = scattered_positions(shape.q_len, 3);
        q_positions[2] = 1;
        let mut kv_positions = scattered_positions(shape.kv_len, 4);
        kv_positions[5] = 2;
        let (out, lse) = forward(&q, &kv, &q_positions, &kv_positions, shape);
        for b in 0..shape.batch {
            for h in 0..shape.heads {
                assert_eq!(lse[shape.lse_index(b, h, 2)], f32::NEG_INFINITY);
            }
        }
        assert!(out.iter().all(|v| v.is_finite()));
        let probe = random_vec(shape.q_elements(), 10);
        let dots = attention_row_dots(&probe, &out, shape);
        let mut dq = vec![0.0; q.len()];
        let mut dkv = vec![0.0; kv.len()];
        masked_attention_backward(
            &mut dq,
            &mut dkv,
            &probe,
            &q,
            &kv,
            &lse,
            &dots,
            &q_positions,
            &kv_positions,
            shape,
            SCALE,
        );
        let mut loss_of_q = |x: &[f32]| {
            probe_loss(
                &forward(x, &kv, &q_positions, &kv_positions, shape).0,
                &probe,
            )
        };
        check_gradient_with(&q, &dq, &mut loss_of_q, 3e-3, 1e-2, "masked attention dq");
        let mut loss_of_kv = |x: &[f32]| {
            probe_loss(
                &forward(&q, x, &q_positions, &kv_positions, shape).0,
                &probe,
            )
        };
        check_gradient_with(
            &kv,
            &dkv,
            &mut loss_of_kv,
            3e-3,
            1e-2,
            "masked attention dkv",
        );
    }
}
