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

/// Elements per block of [`adamw_update`]'s staged walk: three blocks of this many f32
/// (12 KiB) stay in the level-1 cache.
const BLOCK: usize = 1024;

/// Elements per parallel task.
const CHUNK: usize = 16 * BLOCK;

/// Updates `params` and the moments `m`, `v` in place from `grads` times `s.grad_scale`
/// (`grads` is only read).
///
/// The four buffers are large heap blocks, often allocated back to back with sizes that are
/// multiples of a large power of two (`small`'s expert buffer is 3 · 2²⁸ bytes), so that
/// element `i` of each lies at nearly the same address modulo 2²⁸. AMD's Zen cores predict the
/// level-1 way of a load from a tag hashed out of linear address bits 12–27 (Lipp et al., "Take
/// A Way", AsiaCCS 2020); lines of one set whose tags agree keep evicting each other from the
/// prediction. A loop over all four buffers at once then ran 3–5× slower than over unrelated
/// addresses on a Zen 3 (`small`'s expert update 0.38–0.54 s against 0.13 s; 50 M elements with
/// the buffers 2²⁸ + 16 bytes apart 150–160 ms, 2²⁸ + 4096 apart 30–35 ms). When two buffers
/// lie that close ([`buffers_collide`]) the update is staged: each block of `grads`, `m` and
/// `v` is copied into a scratch block one buffer at a time, updated there beside `params`, and
/// the moments copied back, so no loop streams two of the large buffers. Both walks compute
/// every element with the same operations, so the results are the same bits.
pub fn adamw_update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
    let staged = buffers_collide([params.as_ptr(), grads.as_ptr(), m.as_ptr(), v.as_ptr()]);
    update_walk(params, grads, m, v, s, staged);
}

/// [`adamw_update`], staged or not as asked.
fn update_walk(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: AdamWStep,
    staged: bool,
) {
    assert!(s.step >= 1, "AdamW steps count from 1");
    let len = params.len();
    assert!(
        grads.len() == len && m.len() == len && v.len() == len,
        "AdamW buffers of different lengths: params {len}, grads {}, m {}, v {}",
        grads.len(),
        m.len(),
        v.len()
    );
    let bias1 = 1.0 - (s.beta1 as f64).powi(s.step as i32);
    let bias2_sqrt = (1.0 - (s.beta2 as f64).powi(s.step as i32)).sqrt() as f32;
    let step_size = (s.lr as f64 / bias1) as f32;
    let decay = 1.0 - s.lr * s.weight_decay;
    let update = |p: &mut f32, g: f32, m: &mut f32, v: &mut f32| {
        let g = g * s.grad_scale;
        *m = s.beta1 * *m + (1.0 - s.beta1) * g;
        *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
        let denom = (v.sqrt() / bias2_sqrt) + s.eps;
        *p = *p * decay - step_size * *m / denom;
    };
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            if !staged {
                let elements = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
                elements.for_each(|(((p, &g), m), v)| update(p, g, m, v));
                return;
            }
            let mut scratch = [[0.0f32; BLOCK]; 3];
            let blocks = p
                .chunks_mut(BLOCK)
                .zip(g.chunks(BLOCK))
                .zip(m.chunks_mut(BLOCK))
                .zip(v.chunks_mut(BLOCK));
            for (((p, g), m), v) in blocks {
                let n = p.len();
                let [sg, sm, sv] = &mut scratch;
                let (sg, sm, sv) = (&mut sg[..n], &mut sm[..n], &mut sv[..n]);
                sg.copy_from_slice(g);
                sm.copy_from_slice(m);
                sv.copy_from_slice(v);
                let elements = p
                    .iter_mut()
                    .zip(sg.iter())
                    .zip(sm.iter_mut())
                    .zip(sv.iter_mut());
                elements.for_each(|(((p, &g), m), v)| update(p, g, m, v));
                m.copy_from_slice(sm);
                v.copy_from_slice(sv);
            }
        });
}

/// Whether two of the buffers starting at `starts` lie within a page of each other modulo
/// 2²⁸, where their elements of nearby indices share level-1 sets and way-prediction tags (see
/// [`adamw_update`]).
fn buffers_collide(starts: [*const f32; 4]) -> bool {
    const SPAN: usize = 1 << 28;
    const PAGE: usize = 4096;
    let starts = starts.map(|p| p as usize % SPAN);
    (0..4).any(|i| {
        (i + 1..4).any(|j| {
            let apart = starts[i].abs_diff(starts[j]);
            apart.min(SPAN - apart) < PAGE
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staged_walk_gives_the_same_bits_as_the_plain_one() {
        // Lengths that leave a partial block and a partial task.
        let len = 2 * CHUNK + 3 * BLOCK + 517;
        let value = |i: usize, salt: u64| {
            let x = (i as u64 ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2
        };
        let grads: Vec<f32> = (0..len).map(|i| value(i, 1)).collect();
        let start = |salt| -> Vec<f32> { (0..len).map(|i| value(i, salt)).collect() };
        let mut plain = (
            start(2),
            start(3),
            start(4).iter().map(|x| x * x).collect::<Vec<_>>(),
        );
        let mut staged = plain.clone();
        for step in 1..=3 {
            let s = AdamWStep {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
                grad_scale: 0.7,
            };
            let (p, m, v) = &mut plain;
            update_walk(p, &grads, m, v, s, false);
            let (p, m, v) = &mut staged;
            update_walk(p, &grads, m, v, s, true);
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(&plain.0) == bits(&staged.0), "parameters differ");
        assert!(bits(&plain.1) == bits(&staged.1), "first moments differ");
        assert!(bits(&plain.2) == bits(&staged.2), "second moments differ");
        assert!(plain.0.iter().zip(&start(2)).any(|(a, b)| a != b));
    }

    #[test]
    fn buffers_collide_within_a_page_modulo_two_to_the_28() {
        let at = |offsets: [usize; 4]| {
            buffers_collide(offsets.map(|o| (0x7000_0000_0000usize + o) as *const f32))
        };
        let span = 1usize << 28;
        // small's expert buffers, allocated back to back: 3 · 2²⁸ bytes and a 16-byte header.
        let next = 3 * span + 16;
        assert!(at([0, next, 2 * next, 3 * next]));
        // One pair is enough, also across the 2²⁸ boundary.
        assert!(at([0, 100 << 20, 200 << 20, span - 64]));
        // A page apart or more, or unrelated: no staging.
        assert!(!at([0, span + 4096, 2 * (span + 4096), 3 * (span + 4096)]));
        assert!(!at([0, 100 << 20, 200 << 20, 300 << 20]));
    }

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
