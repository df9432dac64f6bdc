//! SwiGLU activation on a fused `[rows, 2F]` input laid out `(gate | up)` per row:
//! `h = silu(gate) ∘ up`, `silu(g) = g·σ(g)`.
//!
//! Backward (written, nothing saved beyond the input): `dgate = dh ∘ up ∘ σ(g)(1 + g(1 − σ(g)))`,
//! `dup = dh ∘ silu(g)`.

use crate::bf16::Bf16;
use crate::math::fast_sigmoid;
use rayon::prelude::*;

const ROWS_PER_TASK: usize = 16;

/// `h[rows, F] = silu(gate) ∘ up` from `gate_up[rows, 2F]`.
pub fn swiglu_forward(h: &mut [f32], gate_up: &[f32], ffn: usize) {
    h.par_chunks_mut(ffn * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * ffn * ROWS_PER_TASK))
        .for_each(|(h, gu)| {
            for (h, gu) in h.chunks_mut(ffn).zip(gu.chunks(2 * ffn)) {
                let (gate, up) = gu.split_at(ffn);
                for i in 0..ffn {
                    let g = gate[i];
                    h[i] = g * fast_sigmoid(g) * up[i];
                }
            }
        });
}

/// [`swiglu_forward`] with its output rounded to bf16 in the same pass (the next GEMM's
/// input in bf16 training): `h[i] = bf16(silu(gate[i]) · up[i])`, the f32 value rounded.
pub fn swiglu_forward_bf16(h: &mut [Bf16], gate_up: &[f32], ffn: usize) {
    h.par_chunks_mut(ffn * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * ffn * ROWS_PER_TASK))
        .for_each(|(h, gu)| {
            for (h, gu) in h.chunks_mut(ffn).zip(gu.chunks(2 * ffn)) {
                let (gate, up) = gu.split_at(ffn);
                for i in 0..ffn {
                    let g = gate[i];
                    h[i] = Bf16::from_f32(g * fast_sigmoid(g) * up[i]);
                }
            }
        });
}

/// Writes `dgate_up[rows, 2F]` from `dh[rows, F]` and the forward input.
pub fn swiglu_backward(dgate_up: &mut [f32], dh: &[f32], gate_up: &[f32], ffn: usize) {
    dgate_up
        .par_chunks_mut(2 * ffn * ROWS_PER_TASK)
        .zip(dh.par_chunks(ffn * ROWS_PER_TASK))
        .zip(gate_up.par_chunks(2 * ffn * ROWS_PER_TASK))
        .for_each(|((dgu, dh), gu)| {
            for ((dgu, dh), gu) in dgu
                .chunks_mut(2 * ffn)
                .zip(dh.chunks(ffn))
                .zip(gu.chunks(2 * ffn))
            {
                let (gate, up) = gu.split_at(ffn);
                let (dgate, dup) = dgu.split_at_mut(ffn);
                for i in 0..ffn {
                    let g = gate[i];
                    let sig = fast_sigmoid(g);
                    dgate[i] = dh[i] * up[i] * sig * (1.0 + g * (1.0 - sig));
                    dup[i] = dh[i] * g * sig;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bf16_output_is_the_f32_output_rounded() {
        let (rows, ffn) = (37, 20);
        let gate_up = random_vec(rows * 2 * ffn, 4);
        let mut h = vec![0.0; rows * ffn];
        swiglu_forward(&mut h, &gate_up, ffn);
        let mut h16 = vec![Bf16::ZERO; rows * ffn];
        swiglu_forward_bf16(&mut h16, &gate_up, ffn);
        let rounded: Vec<Bf16> = h.iter().map(|&v| Bf16::from_f32(v)).collect();
        assert_eq!(h16, rounded);
    }
    use crate::testing::{check_gradient, probe_loss, random_vec};

    #[test]
    fn gradients_match_finite_differences() {
        let (rows, ffn) = (5, 6);
        let x: Vec<f32> = random_vec(rows * 2 * ffn, 1)
            .iter()
            .map(|v| v * 3.0)
            .collect();
        let probe = random_vec(rows * ffn, 2);
        let mut dx = vec![0.0; x.len()];
        swiglu_backward(&mut dx, &probe, &x, ffn);
        check_gradient(
            &x,
            &dx,
            |x| {
                let mut h = vec![0.0; rows * ffn];
                swiglu_forward(&mut h, x, ffn);
                probe_loss(&h, &probe)
            },
            "swiglu",
        );
    }
}
