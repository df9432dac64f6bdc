//! AdamW with decoupled weight decay and bias correction (Loshchilov & Hutter), as PyTorch's
//! `torch.optim.AdamW`: `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p − lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps)`, with `t` counted from 1.

use rayon::prelude::*;

/// Hyper-parameters of one AdamW update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator floor.
    pub eps: f32,
    /// Decoupled weight decay for these parameters (0 for norms and biases).
    pub weight_decay: f32,
    /// 1-based step count, for the bias correction.
    pub step: u64,
    /// Factor each gradient is multiplied by before it is used: the global-norm clipping
    /// factor, fused here so the gradients are not rewritten (1 when not clipping).
    pub grad_scale: f32,
}

/// Updates `params` and the moments `m`, `v` in place from `grads` times `s.grad_scale`
/// (`grads` is only read).
pub fn adamw_update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
    assert!(s.step >= 1, "AdamW steps count from 1");
    let bias1 = 1.0 - (s.beta1 as f64).powi(s.step as i32);
    let bias2_sqrt = (1.0 - (s.beta2 as f64).powi(s.step as i32)).sqrt();
    let step_size = (s.lr as f64 / bias1) as f32;
    let decay = 1.0 - s.lr * s.weight_decay;
    const CHUNK: usize = 1 << 14;
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let g = g[i] * s.grad_scale;
                m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * g;
                v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g * g;
                let denom = (v[i].sqrt() / bias2_sqrt as f32) + s.eps;
                p[i] = p[i] * decay - step_size * m[i] / denom;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_steps_match_hand_computation() {
        let s = |step| AdamWStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.5,
            step,
            grad_scale: 1.0,
        };
        let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        adamw_update(&mut p, &[0.2], &mut m, &mut v, s(1));
        // Step 1: m̂ = g, v̂ = g², so the update is lr·sign(g): 1·(1 − 0.05) − 0.1 = 0.85.
        assert!((p[0] - 0.85).abs() < 1e-6, "{}", p[0]);
        adamw_update(&mut p, &[-0.4], &mut m, &mut v, s(2));
        let (m2, v2) = (0.9 * 0.02 - 0.1 * 0.4, 0.99 * 0.0004 + 0.01 * 0.16);
        let m_hat = m2 / (1.0 - 0.81);
        let v_hat = v2 / (1.0 - 0.9801);
        let expected = 0.85 * 0.95 - 0.1 * m_hat / (f64::sqrt(v_hat) + 1e-8);
        assert!(
            (p[0] as f64 - expected).abs() < 1e-6,
            "{} vs {expected}",
            p[0]
        );
    }

    #[test]
    fn gradient_scale_equals_scaling_the_gradients_first() {
        let hyper = |grad_scale| AdamWStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
            grad_scale,
        };
        let grads = [0.3f32, -1.7, 2.5e-3, 0.0, 41.0];
        let start = [0.5f32, -0.25, 1.0, 0.0, 3.0];
        let factor = 0.173_f32;
        let (mut fused, mut mf, mut vf) = (start, [0.01f32; 5], [0.02f32; 5]);
        adamw_update(&mut fused, &grads, &mut mf, &mut vf, hyper(factor));
        let scaled = grads.map(|g| g * factor);
        let (mut plain, mut mp, mut vp) = (start, [0.01f32; 5], [0.02f32; 5]);
        adamw_update(&mut plain, &scaled, &mut mp, &mut vp, hyper(1.0));
        assert_eq!((fused, mf, vf), (plain, mp, vp));
        assert_ne!(fused, start);
    }
}
