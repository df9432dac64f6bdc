//! Causal grouped-query attention with bf16 inputs to its products, the bf16 twin of
//! [`crate::attention`] (same layout, tiles, tasks and saved state), as FlashAttention runs
//! in bf16: q, k, v and the output gradient arrive rounded to bf16; every tile product
//! (`S = Q·Kᵀ`, `O += P·V`, and in the backward `dP = dO·Vᵀ`, `dV += Pᵀ·dO`, `dQ += dS·K`,
//! `dK += dSᵀ·Q`) runs on the bf16 GEMM with f32 accumulation; the softmax, its running max and
//! sum, `lse`, `D = Σ dO∘O` and `dS = P∘(dP − D)` are f32. The probabilities `P` and `dS` are
//! rounded to bf16 as the inputs of the products that follow; the forward's running sum adds
//! the rounded `P`, so the output is exactly (up to f32 sums) the average of the values with
//! the rounded weights.
//!
//! Every operand is packed into the bf16 microkernel's panels once, not per product
//! (`tiles::TileOperand`): the forward packs each key block's `Kᵀ` and `V` before its tasks
//! start, and each query block once per task; the backward task of a (batch, kv head) packs
//! its heads' `Q` and `dO` blocks (both operand forms) up front and each key block once, so
//! per tile pair only the fresh `P`, `Pᵀ`, `dS` and `dSᵀ` are packed. Products and sums are
//! those of the blocked GEMM (one k-block), so results are unchanged.
//!
//! Saved state: the output (f32) and `lse` per (batch, head, position). Gradients are written.
//!
//! The tasks and loops are the f32 kernel's (`attention::causal_forward`,
//! `attention::causal_backward`, over the bf16 GEMM kernel); the rounding of `P` and `dS` is
//! the bf16 kernel's `tile_softmax::TileSoftmax`.

use crate::attention::{causal_backward, causal_forward, AttentionShape, QkvLayout};
use crate::bf16::Bf16;
use crate::matmul_bf16::Bf16Kernel;

/// Causal attention forward on bf16 `qkv`. Writes `out[batch·seq, heads·head_dim]` (f32),
/// returns `lse[batch, heads, seq]`.
pub fn attention_forward_bf16(
    out: &mut [f32],
    qkv: &[Bf16],
    layout: QkvLayout,
    shape: AttentionShape,
    scale: f32,
    kernel: Bf16Kernel,
) -> Vec<f32> {
    causal_forward(out, qkv, layout, shape, scale, kernel)
}

/// Causal attention backward on bf16 `qkv` and output gradient `dout`, with the forward's f32
/// `out` and `lse`. Writes the q, k and v parts of `dqkv` (f32, same layout as `qkv`).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_bf16(
    dqkv: &mut [f32],
    dout: &[Bf16],
    out: &[f32],
    qkv: &[Bf16],
    lse: &[f32],
    layout: QkvLayout,
    shape: AttentionShape,
    scale: f32,
    kernel: Bf16Kernel,
) {
    causal_backward(dqkv, dout, out, qkv, lse, layout, shape, scale, kernel);
}

#[cfg(test)]
mod tests {
    //! Both kernels against exact (f64) attention of the unrounded f32 inputs — what the f32
    //! kernel computes — within a bound derived from the roundings, element by element.
    //!
    //! With `u = 2⁻²⁴`, `u₁₆ = 2⁻⁸`, `γ_n = n·u/(1 − n·u)`, `e = 3·10⁻⁷` (fast_exp):
    //! - a score `s = q·k` moves by `δs ≤ (2u₁₆ + u₁₆²)·Σ|q∘k| + γ_{hd+1}·(1 + u₁₆)²·Σ|q∘k|`
    //!   (rounded inputs, f32 sums); its exponent `s·scale − m` by `Δ = scale·δs + 2u·(|s·scale|
    //!   + |m|)`;
    //! - each weight (rounded to bf16, `fast_exp`, rescaled by `T` running-max corrections)
    //!   moves by a factor within `1 ± E`, `E = (1 + u₁₆)(1 + e)·e^Δ·(1 + γ_T) − 1`, the same
    //!   for the output's numerator and denominator, so the output is an average of the values
    //!   with weights `w_j(1 + ε_j)/(1 + ε̄)`: `|O − O*| ≤ 2E/(1 − E)·Σ w_j|v_j − O*| +
    //!   u₁₆·Σ w_j|v_j| + 2.1·γ_{n+T}·Σ w_j|v_j|` (rounded values, f32 sums);
    //! - backward: `lse` is off by `Λ ≤ E'/(1 − E') + u·(|ln l| + |lse|)` with `E' = (1 + E)(1 +
    //!   γ_{n+T}) − 1`; the recomputed `P` by a factor `(1 + e)·e^(Δ + Λ)`, and by `u₁₆` more once
    //!   rounded; `dP = dO·v` as a score; `D = Σ dO∘O` by `Σ|dO|·|O − O*| + u₁₆·Σ|dO∘O*| +
    //!   γ_{hd}·Σ|dO∘O|` (the kernel's own output `O`); `dS = P(dP − D)·scale` by the product
    //!   of these (three f32 roundings and one to bf16); each gradient is a sum of such terms
    //!   times rounded inputs (`u₁₆` each), with `γ_N` for its f32 sums.
    //!
    //! A slack of `10⁻³⁰` covers weights below e⁻⁸⁷, which `fast_exp` returns as ≈ 1.6·10⁻³⁸.

    use super::*;
    use crate::attention::{attention_backward, attention_forward, BLOCK};
    use crate::bf16::to_bf16_vec;
    use crate::testing::random_vec;

    const U: f64 = 1.0 / (1u64 << 24) as f64;
    const U16: f64 = 1.0 / 256.0;
    const EXP: f64 = 3e-7;
    const SLACK: f64 = 1e-30;

    /// (sequence length, head dim, positive inputs, inputs already bf16): across the tile
    /// (64) and the causal diagonal.
    const CASES: [(usize, usize, bool, bool); 7] = [
        (1, 8, false, false),
        (5, 16, false, false),
        (70, 16, false, false),
        (130, 32, false, false),
        (70, 16, true, false),
        (70, 16, false, true),
        (130, 32, true, true),
    ];

    fn gamma(n: usize) -> f64 {
        n as f64 * U / (1.0 - n as f64 * U)
    }

    fn kernels() -> Vec<Bf16Kernel> {
        [Bf16Kernel::Dpbf16, Bf16Kernel::Portable]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// Exact attention of `qkv` and, for output gradient `dout`, its gradients, with the
    /// magnitudes the bounds need.
    struct Exact {
        out: Vec<f64>,
        dqkv: Vec<f64>,
        /// Per output element: `Σ w_j|v_j − O|` and `Σ w_j|v_j|`.
        spread: Vec<f64>,
        magnitude: Vec<f64>,
    }

    struct Case {
        qkv: Vec<f32>,
        dout: Vec<f32>,
        layout: QkvLayout,
        shape: AttentionShape,
        scale: f32,
        /// The inputs' own rounding to bf16: `u₁₆`, or 0 when they are bf16 values already
        /// (then only the kernel's internal roundings remain and the bound is tight enough to
        /// catch a wrong weight of a fraction of a percent).
        u_in: f64,
    }

    impl Case {
        /// Random inputs; `positive` makes every input positive, so that errors of one sign
        /// add up instead of cancelling in the sums (what lets a wrong weight show).
        fn new(seq: usize, head_dim: usize, seed: u64, positive: bool, rounded: bool) -> Self {
            let shape = AttentionShape {
                batch: 2,
                seq,
                heads: 4,
                kv_heads: 2,
                head_dim,
            };
            let row_stride = (shape.heads + 2 * shape.kv_heads) * head_dim;
            let layout = QkvLayout {
                row_stride,
                q_offset: 0,
                k_offset: shape.heads * head_dim,
                v_offset: (shape.heads + shape.kv_heads) * head_dim,
            };
            let prepare = |v: f32| {
                let v = if positive { v.abs() + 0.05 } else { v };
                if rounded {
                    Bf16::from_f32(v).to_f32()
                } else {
                    v
                }
            };
            let qkv = random_vec(2 * seq * row_stride, seed)
                .iter()
                .map(|&v| prepare(v * 2.0))
                .collect();
            let dout = random_vec(2 * seq * shape.heads * head_dim, seed + 1)
                .into_iter()
                .map(prepare)
                .collect();
            Case {
                qkv,
                dout,
                layout,
                shape,
                scale: 1.0 / (head_dim as f32).sqrt(),
                u_in: if rounded { 0.0 } else { U16 },
            }
        }

        fn q(&self, b: usize, h: usize, i: usize) -> &[f32] {
            let (hd, rs) = (self.shape.head_dim, self.layout.row_stride);
            &self.qkv[(b * self.shape.seq + i) * rs + self.layout.q_offset + h * hd..][..hd]
        }

        fn kv(&self, b: usize, g: usize, j: usize, offset: usize) -> &[f32] {
            let (hd, rs) = (self.shape.head_dim, self.layout.row_stride);
            &self.qkv[(b * self.shape.seq + j) * rs + offset + g * hd..][..hd]
        }

        fn out_at(&self, b: usize, h: usize, i: usize) -> usize {
            (b * self.shape.seq + i) * self.shape.heads * self.shape.head_dim
                + h * self.shape.head_dim
        }

        fn group(&self, h: usize) -> usize {
            h / (self.shape.heads / self.shape.kv_heads)
        }

        /// Softmax weights of row `i` of head `h` (f64, exact scores).
        fn weights(&self, b: usize, h: usize, i: usize) -> Vec<f64> {
            let g = self.group(h);
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    dot(self.q(b, h, i), self.kv(b, g, j, self.layout.k_offset)) * self.scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = e.iter().sum();
            e.iter().map(|v| v / total).collect()
        }

        // Indexed loops: the reference follows the formulas' subscripts.
        #[allow(clippy::needless_range_loop)]
        fn exact(&self) -> Exact {
            let (sh, hd, lay) = (self.shape, self.shape.head_dim, self.layout);
            let mut ex = Exact {
                out: vec![0.0; self.dout.len()],
                dqkv: vec![0.0; self.qkv.len()],
                spread: vec![0.0; self.dout.len()],
                magnitude: vec![0.0; self.dout.len()],
            };
            for b in 0..sh.batch {
                for h in 0..sh.heads {
                    let g = self.group(h);
                    for i in 0..sh.seq {
                        let w = self.weights(b, h, i);
                        let at = self.out_at(b, h, i);
                        for d in 0..hd {
                            let v = |j: usize| self.kv(b, g, j, lay.v_offset)[d] as f64;
                            let o: f64 = (0..=i).map(|j| w[j] * v(j)).sum();
                            ex.out[at + d] = o;
                            ex.spread[at + d] = (0..=i).map(|j| w[j] * (v(j) - o).abs()).sum();
                            ex.magnitude[at + d] = (0..=i).map(|j| w[j] * v(j).abs()).sum();
                        }
                        let dout = &self.dout[at..at + hd];
                        let big_d: f64 = (0..hd).map(|d| dout[d] as f64 * ex.out[at + d]).sum();
                        for j in 0..=i {
                            let dp = dot(dout, self.kv(b, g, j, lay.v_offset));
                            let ds = w[j] * (dp - big_d) * self.scale as f64;
                            let row = |s: usize| (b * sh.seq + s) * lay.row_stride;
                            for d in 0..hd {
                                ex.dqkv[row(j) + lay.v_offset + g * hd + d] +=
                                    w[j] * dout[d] as f64;
                                ex.dqkv[row(i) + lay.q_offset + h * hd + d] +=
                                    ds * self.kv(b, g, j, lay.k_offset)[d] as f64;
                                ex.dqkv[row(j) + lay.k_offset + g * hd + d] +=
                                    ds * self.q(b, h, i)[d] as f64;
                            }
                        }
                    }
                }
            }
            ex
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    fn abs_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 * y as f64).abs())
            .sum()
    }

    /// The error bound of one score's exponent (`Δ`) and the weight factor bound (`E`).
    fn score_error(c: &Case, abs_qk: f64, s: f64, m: f64) -> f64 {
        let hd = c.shape.head_dim;
        let u = c.u_in;
        let ds = (2.0 * u + u * u) * abs_qk + gamma(hd + 1) * (1.0 + u).powi(2) * abs_qk;
        c.scale as f64 * ds + 2.0 * U * ((s * c.scale as f64).abs() + m.abs())
    }

    /// Per row `(b, h, i)`: the weight factor bound `E` and the lse error `Λ`.
    fn row_bounds(c: &Case, b: usize, h: usize, i: usize) -> (f64, f64, Vec<f64>) {
        let g = c.group(h);
        let scores: Vec<f64> = (0..=i)
            .map(|j| dot(c.q(b, h, i), c.kv(b, g, j, c.layout.k_offset)))
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max) * c.scale as f64;
        let deltas: Vec<f64> = (0..=i)
            .map(|j| {
                let abs_qk = abs_dot(c.q(b, h, i), c.kv(b, g, j, c.layout.k_offset));
                score_error(c, abs_qk, scores[j], m)
            })
            .collect();
        let delta = deltas.iter().cloned().fold(0.0, f64::max);
        let tiles = i / BLOCK + 1;
        let e = (1.0 + U16) * (1.0 + EXP) * delta.exp() * (1.0 + gamma(tiles)) - 1.0;
        let n = i + 1 + tiles;
        let e_sum = (1.0 + e) * (1.0 + gamma(n)) - 1.0;
        let total: f64 = scores.iter().map(|s| (s * c.scale as f64 - m).exp()).sum();
        let lse = m + total.ln();
        let lambda = e_sum / (1.0 - e_sum) + U * (total.ln().abs() + lse.abs());
        (e, lambda, deltas)
    }

    fn run(c: &Case, kernel: Bf16Kernel) -> (Vec<f32>, Vec<f32>) {
        let (qkv, dout) = (to_bf16_vec(&c.qkv), to_bf16_vec(&c.dout));
        let mut out = vec![0.0; c.dout.len()];
        let lse = attention_forward_bf16(&mut out, &qkv, c.layout, c.shape, c.scale, kernel);
        let mut dqkv = vec![f32::NAN; c.qkv.len()];
        attention_backward_bf16(
            &mut dqkv, &dout, &out, &qkv, &lse, c.layout, c.shape, c.scale, kernel,
        );
        (out, dqkv)
    }

    #[test]
    fn forward_is_within_the_rounding_bound_of_exact_attention() {
        for (seq, hd, positive, rounded) in CASES {
            let c = Case::new(seq, hd, 21, positive, rounded);
            let ex = c.exact();
            for kernel in kernels() {
                let (out, _) = run(&c, kernel);
                for b in 0..c.shape.batch {
                    for h in 0..c.shape.heads {
                        for i in 0..seq {
                            let (e, _, _) = row_bounds(&c, b, h, i);
                            let n = i + 1 + i / BLOCK + 1;
                            let at = c.out_at(b, h, i);
                            for d in 0..hd {
                                let bound = 2.0 * e / (1.0 - e) * ex.spread[at + d]
                                    + (c.u_in + 2.1 * gamma(n)) * ex.magnitude[at + d]
                                    + SLACK;
                                let err = (out[at + d] as f64 - ex.out[at + d]).abs();
                                assert!(
                                    err <= bound,
                                    "{kernel:?} seq {seq} out[{b},{h},{i},{d}]: {} vs {} (bound {bound:e})",
                                    out[at + d],
                                    ex.out[at + d]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn backward_is_within_the_rounding_bound_of_exact_gradients() {
        for (seq, hd, positive, rounded) in CASES {
            let c = Case::new(seq, hd, 31, positive, rounded);
            let ex = c.exact();
            let (sh, lay) = (c.shape, c.layout);
            for kernel in kernels() {
                let (out, dqkv) = run(&c, kernel);
                let mut bound = vec![SLACK; c.qkv.len()];
                let n_sum = (sh.heads / sh.kv_heads) * (seq + sh.blocks()) + 1;
                let g_n = gamma(n_sum);
                for b in 0..sh.batch {
                    for h in 0..sh.heads {
                        let g = c.group(h);
                        for i in 0..seq {
                            let (_, lambda, deltas) = row_bounds(&c, b, h, i);
                            let w = c.weights(b, h, i);
                            let at = c.out_at(b, h, i);
                            let dout = &c.dout[at..at + hd];
                            let d_err: f64 = (0..hd)
                                .map(|d| {
                                    (dout[d] as f64).abs()
                                        * ((out[at + d] as f64 - ex.out[at + d]).abs()
                                            + c.u_in * ex.out[at + d].abs()
                                            + gamma(hd) * (out[at + d] as f64).abs())
                                })
                                .sum();
                            let big_d: f64 = (0..hd).map(|d| dout[d] as f64 * ex.out[at + d]).sum();
                            for j in 0..=i {
                                let v = c.kv(b, g, j, lay.v_offset);
                                let k = c.kv(b, g, j, lay.k_offset);
                                let eta = (1.0 + EXP) * (deltas[j] + lambda).exp() - 1.0;
                                let p_err = w[j] * ((1.0 + eta) * (1.0 + U16) - 1.0);
                                let p16 = w[j] + p_err;
                                let dp = dot(dout, v);
                                let abs_dv = abs_dot(dout, v);
                                let u = c.u_in;
                                let dp_err = (2.0 * u + u * u) * abs_dv
                                    + gamma(hd + 1) * (1.0 + u).powi(2) * abs_dv;
                                let ds = w[j] * (dp - big_d) * c.scale as f64;
                                let grow = (1.0 + eta) * (1.0 + U16) * (1.0 + 3.0 * U);
                                let ds_err = ds.abs() * (grow - 1.0)
                                    + w[j] * grow * c.scale as f64 * (dp_err + d_err);
                                let ds16 = ds.abs() + ds_err;
                                let row = |s: usize| (b * seq + s) * lay.row_stride;
                                for d in 0..hd {
                                    let (dod, kd, qd) =
                                        (dout[d] as f64, k[d] as f64, c.q(b, h, i)[d] as f64);
                                    bound[row(j) + lay.v_offset + g * hd + d] +=
                                        p_err * dod.abs() + p16 * dod.abs() * (c.u_in + g_n);
                                    bound[row(i) + lay.q_offset + h * hd + d] +=
                                        ds_err * kd.abs() + ds16 * kd.abs() * (c.u_in + g_n);
                                    bound[row(j) + lay.k_offset + g * hd + d] +=
                                        ds_err * qd.abs() + ds16 * qd.abs() * (c.u_in + g_n);
                                }
                            }
                        }
                    }
                }
                for (idx, ((&got, &want), &limit)) in
                    dqkv.iter().zip(&ex.dqkv).zip(&bound).enumerate()
                {
                    let err = (got as f64 - want).abs();
                    assert!(
                        err <= limit,
                        "{kernel:?} seq {seq} hd {hd} dqkv[{idx}]: {got} vs {want} (bound {limit:e})"
                    );
                }
            }
        }
    }

    #[test]
    fn the_bounds_are_tight_enough_to_tell_bf16_from_f32() {
        // The f32 kernel is far inside the bf16 bound; an f32 bound (no bf16 rounding) would
        // fail the bf16 kernel: the tests above check the rounding, not just the algebra.
        let c = Case::new(70, 16, 41, false, false);
        let ex = c.exact();
        let mut f32_out = vec![0.0; c.dout.len()];
        attention_forward(&mut f32_out, &c.qkv, c.layout, c.shape, c.scale);
        let (bf16_out, _) = run(&c, Bf16Kernel::detect());
        let worst = |o: &[f32]| {
            o.iter()
                .zip(&ex.out)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max)
        };
        let (f32_err, bf16_err) = (worst(&f32_out), worst(&bf16_out));
        assert!(
            bf16_err > 20.0 * f32_err && bf16_err > 1e-4,
            "bf16 error {bf16_err:e} vs f32 error {f32_err:e}"
        );
        let mut dqkv = vec![0.0; c.qkv.len()];
        let lse = attention_forward(&mut f32_out, &c.qkv, c.layout, c.shape, c.scale);
        attention_backward(
            &mut dqkv, &c.dout, &f32_out, &c.qkv, &lse, c.layout, c.shape, c.scale,
        );
        let f32_grad_err = dqkv
            .iter()
            .zip(&ex.dqkv)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(f32_grad_err < 1e-4, "f32 gradients {f32_grad_err:e}");
    }
}
