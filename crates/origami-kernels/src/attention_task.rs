//! What a blockwise attention task holds and does between its tile products, shared by the
//! causal kernel (`attention.rs`) and the position-masked one (`masked_attention.rs`) in both
//! precisions: the buffers of a forward and of a backward task, the online-softmax fold of a
//! row, and the products of a (query tile, key tile) pair.

use crate::matmul::{RawMatrix, View};
use crate::tile_softmax::{BackwardTiles, TileSoftmax};
use crate::tiles::{TileKernel, TileOperand};

/// Rows and columns of the largest tile (queries × keys).
pub(crate) const TILE: usize = 64;

/// A task's own `rows × cols` row-major buffer as a product's output.
pub(crate) fn own(buffer: &mut [f32], rows: usize, cols: usize) -> RawMatrix {
    RawMatrix {
        ptr: buffer.as_mut_ptr(),
        rows,
        cols,
        row_stride: cols,
        col_stride: 1,
    }
}

/// A forward task's buffers: a tile of scores, the kernel's own tile of probabilities (bf16),
/// the output accumulator of a query tile, and the query and probability operands.
pub(crate) struct ForwardScratch<E> {
    pub(crate) scores: Vec<f32>,
    pub(crate) probs: Vec<E>,
    pub(crate) acc: Vec<f32>,
    pub(crate) q_op: TileOperand,
    pub(crate) p_op: TileOperand,
}

impl<E: Copy> ForwardScratch<E> {
    /// Empty operands and zeroed tiles for heads of `head_dim`.
    pub(crate) fn new<K: TileSoftmax<Elem = E>>(head_dim: usize) -> Self {
        ForwardScratch {
            scores: vec![0.0; TILE * TILE],
            probs: K::own_buffer(TILE * TILE),
            acc: vec![0.0; TILE * head_dim],
            q_op: TileOperand::default(),
            p_op: TileOperand::default(),
        }
    }
}

/// Folds one row's tile into the row's running softmax: its probabilities, shifted by
/// `new_max` (the running max over this tile too), sum to `tile_sum`; the running sum and the
/// output accumulator `acc` are rescaled from the old max to `new_max`.
pub(crate) fn fold_row(max: &mut f32, sum: &mut f32, acc: &mut [f32], new_max: f32, tile_sum: f32) {
    let correction = crate::math::fast_exp(*max - new_max);
    *sum = *sum * correction + tile_sum;
    *max = new_max;
    if correction != 1.0 {
        acc.iter_mut().for_each(|a| *a *= correction);
    }
}

/// `acc += P·V` for a tile of probabilities `probs` (`rows × cols`, as the kernel multiplies
/// them) and a prepared value tile.
///
/// # Safety
/// The CPU runs the kernel; `acc` holds `rows` rows of the value tile's width (`rows` > 0).
pub(crate) unsafe fn add_weighted_values<K: TileKernel>(
    kernel: K,
    p_op: &mut TileOperand,
    probs: &[K::Elem],
    (rows, cols): (usize, usize),
    values: &TileOperand,
    acc: &mut [f32],
) {
    let width = acc.len() / rows;
    let probs = View::new(probs, rows, cols);
    kernel.multiply_once(own(acc, rows, width), p_op, probs, values, true);
}

/// One query block of one head prepared for the backward's products: `Q` and `dO` as left
/// operands (`S = Q·Kᵀ`, `dP = dO·Vᵀ`) and as right operands (`dK += dSᵀ·Q`, `dV += Pᵀ·dO`).
#[derive(Default)]
pub(crate) struct QueryBlock {
    pub(crate) q_lhs: TileOperand,
    pub(crate) dout_lhs: TileOperand,
    pub(crate) q_rhs: TileOperand,
    pub(crate) dout_rhs: TileOperand,
}

impl QueryBlock {
    /// Packs the four operands from the block's queries `q` and output gradient `d_out`.
    ///
    /// # Safety
    /// The CPU runs the kernel.
    pub(crate) unsafe fn pack<K: TileKernel>(
        &mut self,
        kernel: K,
        q: View<'_, K::Elem>,
        d_out: View<'_, K::Elem>,
    ) {
        kernel.pack_lhs(&mut self.q_lhs, q);
        kernel.pack_lhs(&mut self.dout_lhs, d_out);
        kernel.pack_rhs(&mut self.q_rhs, q);
        kernel.pack_rhs(&mut self.dout_rhs, d_out);
    }
}

/// A backward task's buffers: the query blocks of each head of its group (filled by
/// [`QueryBlock::pack`]), a key block's three operands (`Kᵀ`, `Vᵀ`, `K`), a tile pair's three
/// (`Pᵀ`, `dS`, `dSᵀ`), and the pair's tiles (see [`BackwardScratch::pair`]).
pub(crate) struct BackwardScratch<E> {
    pub(crate) queries: Vec<Vec<QueryBlock>>,
    pub(crate) keys: [TileOperand; 3],
    pub(crate) pair_ops: [TileOperand; 3],
    pub(crate) tiles: PairTiles<E>,
}

/// The buffers behind a tile pair's [`BackwardTiles`].
pub(crate) struct PairTiles<E> {
    scores: Vec<f32>,
    dscores: Vec<f32>,
    probs: Vec<E>,
    dprobs: Vec<E>,
}

impl<E: Copy> BackwardScratch<E> {
    /// Empty operands and zeroed tiles for a group of `group` query heads.
    pub(crate) fn new<K: TileSoftmax<Elem = E>>(group: usize) -> Self {
        BackwardScratch {
            queries: (0..group).map(|_| Vec::new()).collect(),
            keys: Default::default(),
            pair_ops: Default::default(),
            tiles: PairTiles {
                scores: vec![0.0; TILE * TILE],
                dscores: vec![0.0; TILE * TILE],
                probs: K::own_buffer(TILE * TILE),
                dprobs: K::own_buffer(TILE * TILE),
            },
        }
    }
}

impl<E> PairTiles<E> {
    /// The tiles of a pair of `len` elements.
    pub(crate) fn pair<K: TileSoftmax<Elem = E>>(&mut self, len: usize) -> BackwardTiles<'_, E> {
        BackwardTiles {
            scores: &mut self.scores[..len],
            dscores: &mut self.dscores[..len],
            probs: K::own_tile(&mut self.probs, len),
            dprobs: K::own_tile(&mut self.dprobs, len),
        }
    }
}

/// A tile pair's scores `S = Q·Kᵀ` and their gradient's first factor `dP = dO·Vᵀ`, written into
/// `tiles` (`rows × cols`).
///
/// # Safety
/// The CPU runs the kernel.
pub(crate) unsafe fn pair_scores<K: TileKernel>(
    kernel: K,
    tiles: &mut BackwardTiles<'_, K::Elem>,
    (rows, cols): (usize, usize),
    block: &QueryBlock,
    [keys_t, values_t]: [&TileOperand; 2],
) {
    kernel.multiply_tiles(own(tiles.scores, rows, cols), &block.q_lhs, keys_t, false);
    kernel.multiply_tiles(
        own(tiles.dscores, rows, cols),
        &block.dout_lhs,
        values_t,
        false,
    );
}

/// Adds a tile pair's gradients from its finished `P` and `dS` (`rows × cols`): `dV += Pᵀ·dO`,
/// `dQ += dS·K`, `dK += dSᵀ·Q`, into `[dq, dk, dv]`.
///
/// # Safety
/// The CPU runs the kernel; the three outputs are valid for this thread alone and overlap
/// neither operand.
pub(crate) unsafe fn add_pair_gradients<K: TileSoftmax>(
    kernel: K,
    tiles: BackwardTiles<'_, K::Elem>,
    (rows, cols): (usize, usize),
    [pt, ds_op, dst]: &mut [TileOperand; 3],
    block: &QueryBlock,
    keys: &TileOperand,
    [dq, dk, dv]: [RawMatrix; 3],
) {
    let p = View::new(K::product_input(tiles.scores, tiles.probs), rows, cols);
    let ds = View::new(K::product_input(tiles.dscores, tiles.dprobs), rows, cols);
    kernel.multiply_once(dv, pt, p.t(), &block.dout_rhs, true);
    kernel.multiply_once(dq, ds_op, ds, keys, true);
    kernel.multiply_once(dk, dst, ds.t(), &block.q_rhs, true);
}
