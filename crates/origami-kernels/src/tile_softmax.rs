//! The row passes between an attention kernel's tile products, in the precision of its GEMM
//! kernel. The f32 kernel exponentiates a tile of scores in place and multiplies it as it is;
//! the bf16 kernel writes the probabilities (and in the backward the scores' gradient) rounded
//! to bf16 into tiles of their own, the inputs of the products that follow, and sums what it
//! rounded. With this trait each attention kernel (causal and position-masked, forward and
//! backward) is written once for both precisions.
//!
//! Every method takes the whole tiles: the f32 scores (and their gradient), and the tiles of
//! the kernel's element type that the bf16 kernel fills (empty for the f32 kernel, which
//! ignores them).

use crate::bf16::Bf16;
use crate::matmul::F32Kernel;
use crate::matmul_bf16::Bf16Kernel;
use crate::row_exp::{
    exp_in_place, exp_rounded, probabilities_and_grad, probabilities_and_grad_rounded,
};
use crate::tiles::TileKernel;
use std::ops::Range;

/// A tile kernel's softmax rows: where probabilities go and in which precision.
pub(crate) trait TileSoftmax: TileKernel {
    /// Whether the probabilities get tiles of their own (bf16) rather than replacing the
    /// scores (f32).
    const OWN_TILES: bool;

    /// `x` as an operand of the kernel's products.
    fn round(x: f32) -> Self::Elem;

    /// The value an operand element stands for.
    fn widen(x: Self::Elem) -> f32;

    /// The forward's row `row` of the tile: probabilities `e^(s·scale − shift)` of its first
    /// `valid` scores, 0 after them; returns their sum as the next product multiplies them.
    fn exp_row(
        scores: &mut [f32],
        probs: &mut [Self::Elem],
        row: Range<usize>,
        valid: usize,
        scale: f32,
        shift: f32,
    ) -> f32;

    /// Stores probability `value` at element `at` of the tile; returns it as the next product
    /// multiplies it.
    fn set_probability(scores: &mut [f32], probs: &mut [Self::Elem], at: usize, value: f32) -> f32;

    /// The backward's row `row`: `P = e^(s·scale − lse)` and `dS = P·(dP − d)·scale` (from the
    /// unrounded `P`) for the first `valid` columns, both 0 after them.
    #[allow(clippy::too_many_arguments)]
    fn probabilities_and_grad_row(
        tiles: BackwardTiles<'_, Self::Elem>,
        row: Range<usize>,
        valid: usize,
        scale: f32,
        lse: f32,
        d: f32,
    );

    /// Stores `P = p` and `dS = ds` at element `at` of the backward's tiles.
    fn set_probability_and_grad(tiles: BackwardTiles<'_, Self::Elem>, at: usize, p: f32, ds: f32);

    /// The tile of probabilities (or of their gradient) as the next product takes it: the
    /// scores themselves, or the kernel's own tile.
    fn product_input<'a>(scores: &'a [f32], probs: &'a [Self::Elem]) -> &'a [Self::Elem];

    /// The first `len` elements of an own tile, or none where the scores serve.
    fn own_tile(tile: &mut [Self::Elem], len: usize) -> &mut [Self::Elem] {
        &mut tile[..if Self::OWN_TILES { len } else { 0 }]
    }

    /// A buffer for own tiles of up to `len` elements (empty where the scores serve).
    fn own_buffer(len: usize) -> Vec<Self::Elem> {
        vec![Self::round(0.0); if Self::OWN_TILES { len } else { 0 }]
    }
}

/// The backward's four tiles of one (query tile, key tile) pair: the scores and their
/// gradient `dP` (f32, what the products wrote), and the kernel's own tiles for `P` and `dS`.
pub(crate) struct BackwardTiles<'a, E> {
    /// `S`, then (f32) `P`.
    pub(crate) scores: &'a mut [f32],
    /// `dP`, then (f32) `dS`.
    pub(crate) dscores: &'a mut [f32],
    /// `P` as the kernel's element (bf16); empty for f32.
    pub(crate) probs: &'a mut [E],
    /// `dS` as the kernel's element (bf16); empty for f32.
    pub(crate) dprobs: &'a mut [E],
}

impl<E> BackwardTiles<'_, E> {
    /// The same tiles, borrowed again for one call.
    pub(crate) fn reborrow(&mut self) -> BackwardTiles<'_, E> {
        BackwardTiles {
            scores: self.scores,
            dscores: self.dscores,
            probs: self.probs,
            dprobs: self.dprobs,
        }
    }
}

impl TileSoftmax for F32Kernel {
    const OWN_TILES: bool = false;

    fn round(x: f32) -> f32 {
        x
    }

    fn widen(x: f32) -> f32 {
        x
    }

    fn exp_row(
        scores: &mut [f32],
        _: &mut [f32],
        row: Range<usize>,
        valid: usize,
        scale: f32,
        shift: f32,
    ) -> f32 {
        exp_in_place(&mut scores[row], valid, scale, shift)
    }

    fn set_probability(scores: &mut [f32], _: &mut [f32], at: usize, value: f32) -> f32 {
        scores[at] = value;
        value
    }

    fn probabilities_and_grad_row(
        tiles: BackwardTiles<'_, f32>,
        row: Range<usize>,
        valid: usize,
        scale: f32,
        lse: f32,
        d: f32,
    ) {
        let (s, dp) = (&mut tiles.scores[row.clone()], &mut tiles.dscores[row]);
        probabilities_and_grad(s, dp, valid, scale, lse, d);
    }

    fn set_probability_and_grad(tiles: BackwardTiles<'_, f32>, at: usize, p: f32, ds: f32) {
        tiles.scores[at] = p;
        tiles.dscores[at] = ds;
    }

    fn product_input<'a>(scores: &'a [f32], _: &'a [f32]) -> &'a [f32] {
        scores
    }
}

impl TileSoftmax for Bf16Kernel {
    const OWN_TILES: bool = true;

    fn round(x: f32) -> Bf16 {
        Bf16::from_f32(x)
    }

    fn widen(x: Bf16) -> f32 {
        x.to_f32()
    }

    fn exp_row(
        scores: &mut [f32],
        probs: &mut [Bf16],
        row: Range<usize>,
        valid: usize,
        scale: f32,
        shift: f32,
    ) -> f32 {
        exp_rounded(&mut probs[row.clone()], &scores[row], valid, scale, shift)
    }

    fn set_probability(_: &mut [f32], probs: &mut [Bf16], at: usize, value: f32) -> f32 {
        probs[at] = Bf16::from_f32(value);
        probs[at].to_f32()
    }

    fn probabilities_and_grad_row(
        tiles: BackwardTiles<'_, Bf16>,
        row: Range<usize>,
        valid: usize,
        scale: f32,
        lse: f32,
        d: f32,
    ) {
        probabilities_and_grad_rounded(
            &mut tiles.probs[row.clone()],
            &mut tiles.dprobs[row.clone()],
            &tiles.scores[row.clone()],
            &tiles.dscores[row],
            valid,
            scale,
            lse,
            d,
        );
    }

    fn set_probability_and_grad(tiles: BackwardTiles<'_, Bf16>, at: usize, p: f32, ds: f32) {
        tiles.probs[at] = Bf16::from_f32(p);
        tiles.dprobs[at] = Bf16::from_f32(ds);
    }

    fn product_input<'a>(_: &'a [f32], probs: &'a [Bf16]) -> &'a [Bf16] {
        probs
    }
}
