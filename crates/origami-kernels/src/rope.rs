//! Rotary position embedding, "rotate half" convention (as HuggingFace Llama/Mixtral/Qwen2):
//! for a head of dim `d` and pair index `i < d/2`, with `θ_i = base^(−2i/d)` and angle `p·θ_i`,
//! `y[i] = x[i]·cos − x[i+d/2]·sin`, `y[i+d/2] = x[i+d/2]·cos + x[i]·sin`.
//!
//! The rotation is orthogonal, so the backward is the rotation by the opposite angle.
//! Both work in place on strided head layouts (e.g. the q or k part of a fused qkv buffer).

use rayon::prelude::*;

/// Precomputed `cos` and `sin` of every (position, pair) for one head dim.
#[derive(Clone, Debug)]
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Angles for positions `0..max_positions`, computed in f64 and rounded once.
    pub fn new(head_dim: usize, max_positions: usize, base: f64) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for i in 0..half {
                let inv_freq = (1.0 / base.powf(2.0 * i as f64 / head_dim as f64)) as f32;
                let angle = p as f64 * inv_freq as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Positions the table covers.
    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }
}

/// Where the heads to rotate lie in a `[rows, row_stride]` buffer.
#[derive(Clone, Copy, Debug)]
pub struct HeadLayout {
    /// Distance between consecutive rows (tokens).
    pub row_stride: usize,
    /// Column of the first head.
    pub offset: usize,
    /// Number of consecutive heads to rotate.
    pub heads: usize,
    /// Dim of one head.
    pub head_dim: usize,
}

/// Rotates the heads of every row by its position, forward (`inverse = false`) or backward.
pub fn rope_apply(
    buf: &mut [f32],
    layout: HeadLayout,
    positions: &[usize],
    table: &RopeTable,
    inverse: bool,
) {
    let half = layout.head_dim / 2;
    assert_eq!(half, table.half, "rope table head dim differs");
    buf.par_chunks_mut(layout.row_stride)
        .zip(positions.par_iter())
        .for_each(|(row, &p)| {
            assert!(p < table.max_positions(), "position {p} beyond rope table");
            let cos = &table.cos[p * half..(p + 1) * half];
            let sin = &table.sin[p * half..(p + 1) * half];
            for h in 0..layout.heads {
                let head = &mut row[layout.offset + h * layout.head_dim..][..layout.head_dim];
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    let s = if inverse { -sin[i] } else { sin[i] };
                    lo[i] = a * cos[i] - b * s;
                    hi[i] = b * cos[i] + a * s;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_gradient, probe_loss, random_vec};

    #[test]
    fn matches_definition_and_inverts() {
        let (rows, hd) = (3, 4);
        let table = RopeTable::new(hd, 8, 10000.0);
        let x = random_vec(rows * 2 * hd, 1);
        let mut y = x.clone();
        let layout = HeadLayout {
            row_stride: 2 * hd,
            offset: hd,
            heads: 1,
            head_dim: hd,
        };
        let positions = [5, 0, 7];
        rope_apply(&mut y, layout, &positions, &table, false);
        for (r, &p) in positions.iter().enumerate() {
            let head = &x[r * 2 * hd + hd..][..hd];
            for i in 0..2 {
                let angle = p as f64 / 10000f64.powf(2.0 * i as f64 / hd as f64);
                let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                let got = &y[r * 2 * hd + hd..][..hd];
                assert!((got[i] - (head[i] * c - head[i + 2] * s)).abs() < 1e-5);
                assert!((got[i + 2] - (head[i + 2] * c + head[i] * s)).abs() < 1e-5);
            }
            assert_eq!(
                &y[r * 2 * hd..][..hd],
                &x[r * 2 * hd..][..hd],
                "untouched head changed"
            );
        }
        rope_apply(&mut y, layout, &positions, &table, true);
        assert_close(&y, &x, 1e-5, "rope inverse");
    }

    #[test]
    fn backward_is_inverse_rotation() {
        let hd = 6;
        let table = RopeTable::new(hd, 4, 100.0);
        let layout = HeadLayout {
            row_stride: 2 * hd,
            offset: 0,
            heads: 2,
            head_dim: hd,
        };
        let positions = [1, 3];
        let x = random_vec(2 * 2 * hd, 2);
        let probe = random_vec(x.len(), 3);
        let mut dx = probe.clone();
        rope_apply(&mut dx, layout, &positions, &table, true);
        check_gradient(
            &x,
            &dx,
            |x| {
                let mut y = x.to_vec();
                rope_apply(&mut y, layout, &positions, &table, false);
                probe_loss(&y, &probe)
            },
            "rope",
        );
    }
}
