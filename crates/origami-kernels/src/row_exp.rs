//! Row passes of exponentials, for the softmaxes of the attention kernels and the
//! cross-entropy. Forward: a row's largest scaled value, and its exponentials shifted by a
//! (running) max, written as probabilities (f32 in place, or rounded to bf16) and summed — the
//! online softmax of FlashAttention, or one row of logits. Backward of attention: a row's
//! probabilities recomputed from the saved `lse`, `P = e^(S·scale − lse)`, and the scores'
//! gradient `dS = P∘(dP − D)·scale` (f32 in place, or both rounded to bf16).
//!
//! Each pass has an AVX-512 path, used when the CPU has AVX-512 F and BW, and a portable path;
//! both give the same bits. Element `i` belongs to lane `i mod 16`; each lane adds its elements
//! in order, and the 16 lane sums meet in a fixed tree (lane `i` takes lane `i + 8`, then
//! `i + 4`, `i + 2`, `i + 1`). The exponential is
//! [`crate::math::fast_exp`], step for step, without FMA.

use crate::bf16::Bf16;

/// Lanes of the row passes: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;

/// Whether the AVX-512 paths run on this CPU.
fn vector_path() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The largest of `row`'s values times `scale`.
pub(crate) fn scaled_max(row: &[f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vector_path() {
        // SAFETY: the CPU has the features (checked just above).
        return unsafe { avx512::scaled_max(row, scale) };
    }
    portable::scaled_max(row, scale)
}

/// `row[c] = e^(row[c]·scale − shift)` for the `valid` columns (0 after them); returns their
/// sum.
pub(crate) fn exp_in_place(row: &mut [f32], valid: usize, scale: f32, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vector_path() {
        // SAFETY: the CPU has the features (checked just above).
        return unsafe { avx512::exp_in_place(row, valid, scale, shift) };
    }
    portable::exp_in_place(row, valid, scale, shift)
}

/// `p[c] = bf16(e^(s[c]·scale − shift))` for the `valid` columns (0 after them); returns the
/// sum of the rounded values.
pub(crate) fn exp_rounded(p: &mut [Bf16], s: &[f32], valid: usize, scale: f32, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vector_path() {
        // SAFETY: the CPU has the features (checked just above).
        return unsafe { avx512::exp_rounded(p, s, valid, scale, shift) };
    }
    portable::exp_rounded(p, s, valid, scale, shift)
}

/// The backward's row: `s[c] ← P = e^(s[c]·scale − lse)` and `dp[c] ← P·(dp[c] − d)·scale`
/// for the `valid` columns (both 0 after them).
pub(crate) fn probabilities_and_grad(
    s: &mut [f32],
    dp: &mut [f32],
    valid: usize,
    scale: f32,
    lse: f32,
    d: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if vector_path() {
        // SAFETY: the CPU has the features (checked just above).
        return unsafe { avx512::probabilities_and_grad(s, dp, valid, scale, lse, d) };
    }
    portable::probabilities_and_grad(s, dp, valid, scale, lse, d)
}

/// The backward's row in bf16: `p[c] = bf16(P)`, `ds[c] = bf16(P·(dp[c] − d)·scale)` with
/// `P = e^(s[c]·scale − lse)` (unrounded in `dS`) for the `valid` columns (0 after them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn probabilities_and_grad_rounded(
    p: &mut [Bf16],
    ds: &mut [Bf16],
    s: &[f32],
    dp: &[f32],
    valid: usize,
    scale: f32,
    lse: f32,
    d: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if vector_path() {
        // SAFETY: the CPU has the features (checked just above).
        return unsafe {
            avx512::probabilities_and_grad_rounded(p, ds, s, dp, valid, scale, lse, d)
        };
    }
    portable::probabilities_and_grad_rounded(p, ds, s, dp, valid, scale, lse, d)
}

mod portable {
    //! The passes one element at a time, in the lanes' order.

    use super::{tree_sum, LANES};
    use crate::bf16::Bf16;
    use crate::math::fast_exp;

    /// [`super::scaled_max`].
    pub(super) fn scaled_max(row: &[f32], scale: f32) -> f32 {
        row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale))
    }

    /// [`super::exp_in_place`].
    pub(super) fn exp_in_place(row: &mut [f32], valid: usize, scale: f32, shift: f32) -> f32 {
        let mut lanes = [0.0f32; LANES];
        for chunk in row[..valid].chunks_mut(LANES) {
            for (v, l) in chunk.iter_mut().zip(lanes.iter_mut()) {
                *v = fast_exp(*v * scale - shift);
                *l += *v;
            }
        }
        row[valid..].fill(0.0);
        tree_sum(lanes)
    }

    /// [`super::exp_rounded`].
    pub(super) fn exp_rounded(
        p: &mut [Bf16],
        s: &[f32],
        valid: usize,
        scale: f32,
        shift: f32,
    ) -> f32 {
        let mut lanes = [0.0f32; LANES];
        for (p, s) in p[..valid].chunks_mut(LANES).zip(s[..valid].chunks(LANES)) {
            for ((p, &s), l) in p.iter_mut().zip(s).zip(lanes.iter_mut()) {
                *p = Bf16::from_f32(fast_exp(s * scale - shift));
                *l += p.to_f32();
            }
        }
        p[valid..].fill(Bf16::ZERO);
        tree_sum(lanes)
    }

    /// [`super::probabilities_and_grad`].
    pub(super) fn probabilities_and_grad(
        s: &mut [f32],
        dp: &mut [f32],
        valid: usize,
        scale: f32,
        lse: f32,
        d: f32,
    ) {
        for (p, dp) in s[..valid].iter_mut().zip(&mut dp[..valid]) {
            *p = fast_exp(*p * scale - lse);
            *dp = *p * (*dp - d) * scale;
        }
        s[valid..].fill(0.0);
        dp[valid..].fill(0.0);
    }

    /// [`super::probabilities_and_grad_rounded`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn probabilities_and_grad_rounded(
        p: &mut [Bf16],
        ds: &mut [Bf16],
        s: &[f32],
        dp: &[f32],
        valid: usize,
        scale: f32,
        lse: f32,
        d: f32,
    ) {
        let live = p[..valid].iter_mut().zip(&mut ds[..valid]);
        for ((p, ds), (&s, &dp)) in live.zip(s[..valid].iter().zip(&dp[..valid])) {
            let probability = fast_exp(s * scale - lse);
            *p = Bf16::from_f32(probability);
            *ds = Bf16::from_f32(probability * (dp - d) * scale);
        }
        p[valid..].fill(Bf16::ZERO);
        ds[valid..].fill(Bf16::ZERO);
    }
}

/// The lane sums added in the passes' fixed tree.
fn tree_sum(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The passes in AVX-512 registers: 16 columns at a time, the last group masked.

    use super::LANES;
    use crate::bf16::Bf16;
    use core::arch::x86_64::*;

    /// The mask of the columns `start..valid` within the group of 16 starting at `start`.
    fn group_mask(start: usize, valid: usize) -> __mmask16 {
        let live = (valid - start).min(LANES);
        ((1u32 << live) - 1) as __mmask16
    }

    /// [`crate::math::fast_exp`] on 16 lanes, the same operations in the same order.
    #[target_feature(enable = "avx512f")]
    unsafe fn fast_exp(x: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        // `clamp` keeps a NaN; max/min return their second operand when one is NaN.
        let x = _mm512_min_ps(set(88.0), _mm512_max_ps(set(-87.0), x));
        let rounder = set(12_582_912.0);
        let n = _mm512_sub_ps(
            _mm512_add_ps(_mm512_mul_ps(x, set(std::f32::consts::LOG2_E)), rounder),
            rounder,
        );
        let r = _mm512_add_ps(
            _mm512_sub_ps(x, _mm512_mul_ps(n, set(355.0 / 512.0))),
            _mm512_mul_ps(n, set(2.121_944_4e-4)),
        );
        let mut p = set(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_add_ps(set(c), _mm512_mul_ps(r, p));
        }
        let exponent = _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127));
        _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(exponent)))
    }

    /// The lane sums of `v` added in [`super::tree_sum`]'s order.
    #[target_feature(enable = "avx512f")]
    unsafe fn tree_sum(v: __m512) -> f32 {
        let mut lanes = [0.0f32; LANES];
        _mm512_storeu_ps(lanes.as_mut_ptr(), v);
        super::tree_sum(lanes)
    }

    /// [`super::scaled_max`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scaled_max(row: &[f32], scale: f32) -> f32 {
        let scale = _mm512_set1_ps(scale);
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for start in (0..row.len()).step_by(LANES) {
            let mask = group_mask(start, row.len());
            let v = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(start));
            // Operands as `f32::max`'s: a NaN score is passed over.
            max = _mm512_mask_max_ps(max, mask, _mm512_mul_ps(v, scale), max);
        }
        _mm512_reduce_max_ps(max)
    }

    /// [`super::exp_in_place`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_in_place(
        row: &mut [f32],
        valid: usize,
        scale: f32,
        shift: f32,
    ) -> f32 {
        let (scale, shift) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        let mut sum = _mm512_setzero_ps();
        for start in (0..valid).step_by(LANES) {
            let mask = group_mask(start, valid);
            let at = row.as_mut_ptr().add(start);
            let s = _mm512_maskz_loadu_ps(mask, at);
            let p = _mm512_maskz_mov_ps(
                mask,
                fast_exp(_mm512_sub_ps(_mm512_mul_ps(s, scale), shift)),
            );
            _mm512_mask_storeu_ps(at, mask, p);
            sum = _mm512_add_ps(sum, p);
        }
        row[valid..].fill(0.0);
        tree_sum(sum)
    }

    /// [`Bf16::from_f32`] on 16 lanes (to nearest even, a NaN kept quiet): the bf16 bits in
    /// the low half of each 32-bit lane.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn round_to_bf16(x: __m512) -> __m512i {
        let bits = _mm512_castps_si512(x);
        let high = _mm512_srli_epi32::<16>(bits);
        let lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
        let nearest = _mm512_srli_epi32::<16>(_mm512_add_epi32(
            bits,
            _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb),
        ));
        let quiet_nan = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
        let is_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_mask_mov_epi32(nearest, is_nan, quiet_nan)
    }

    /// [`super::exp_rounded`], rounding as [`round_to_bf16`].
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn exp_rounded(
        p: &mut [Bf16],
        s: &[f32],
        valid: usize,
        scale: f32,
        shift: f32,
    ) -> f32 {
        assert!(p.len() >= valid && s.len() >= valid, "row lengths");
        let (scale, shift) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        let mut sum = _mm512_setzero_ps();
        for start in (0..valid).step_by(LANES) {
            let mask = group_mask(start, valid);
            let v = _mm512_maskz_loadu_ps(mask, s.as_ptr().add(start));
            let e = fast_exp(_mm512_sub_ps(_mm512_mul_ps(v, scale), shift));
            let rounded = _mm512_maskz_mov_epi32(mask, round_to_bf16(e));
            _mm256_mask_storeu_epi16(
                p.as_mut_ptr().add(start) as *mut i16,
                mask,
                _mm512_cvtepi32_epi16(rounded),
            );
            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(rounded)));
        }
        p[valid..].fill(Bf16::ZERO);
        tree_sum(sum)
    }
    /// [`super::probabilities_and_grad`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn probabilities_and_grad(
        s: &mut [f32],
        dp: &mut [f32],
        valid: usize,
        scale: f32,
        lse: f32,
        d: f32,
    ) {
        assert!(s.len() >= valid && dp.len() >= valid, "row lengths");
        let (scale, lse, d) = (
            _mm512_set1_ps(scale),
            _mm512_set1_ps(lse),
            _mm512_set1_ps(d),
        );
        for start in (0..valid).step_by(LANES) {
            let mask = group_mask(start, valid);
            let (s_at, dp_at) = (s.as_mut_ptr().add(start), dp.as_mut_ptr().add(start));
            let p = fast_exp(_mm512_sub_ps(
                _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s_at), scale),
                lse,
            ));
            let grad = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, dp_at), d);
            _mm512_mask_storeu_ps(s_at, mask, p);
            _mm512_mask_storeu_ps(dp_at, mask, _mm512_mul_ps(_mm512_mul_ps(p, grad), scale));
        }
        s[valid..].fill(0.0);
        dp[valid..].fill(0.0);
    }

    /// [`super::probabilities_and_grad_rounded`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn probabilities_and_grad_rounded(
        p: &mut [Bf16],
        ds: &mut [Bf16],
        s: &[f32],
        dp: &[f32],
        valid: usize,
        scale: f32,
        lse: f32,
        d: f32,
    ) {
        assert!(
            p.len() >= valid && ds.len() >= valid && s.len() >= valid && dp.len() >= valid,
            "row lengths"
        );
        let (scale, lse, d) = (
            _mm512_set1_ps(scale),
            _mm512_set1_ps(lse),
            _mm512_set1_ps(d),
        );
        for start in (0..valid).step_by(LANES) {
            let mask = group_mask(start, valid);
            let probability = fast_exp(_mm512_sub_ps(
                _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s.as_ptr().add(start)), scale),
                lse,
            ));
            let grad = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, dp.as_ptr().add(start)), d);
            let grad = _mm512_mul_ps(_mm512_mul_ps(probability, grad), scale);
            for (row, value) in [(&mut *p, probability), (&mut *ds, grad)] {
                _mm256_mask_storeu_epi16(
                    row.as_mut_ptr().add(start) as *mut i16,
                    mask,
                    _mm512_cvtepi32_epi16(round_to_bf16(value)),
                );
            }
        }
        p[valid..].fill(Bf16::ZERO);
        ds[valid..].fill(Bf16::ZERO);
    }
}

#[cfg(test)]
mod tests {
    //! The AVX-512 paths against the portable ones, bit for bit, over row lengths across the
    //! 16-column groups and inputs that reach the exponential's clamps; the values against
    //! the exact exponentials.

    use super::*;
    use crate::testing::random_vec;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_paths_match_portable_bit_for_bit() {
        if !vector_path() {
            return;
        }
        for (len, seed) in [(1, 1), (15, 2), (16, 3), (17, 4), (48, 5), (64, 6), (70, 7)] {
            // Scores spread to ±300, so that some fall below −87 once scaled and shifted.
            let s: Vec<f32> = random_vec(len, seed).iter().map(|v| v * 300.0).collect();
            let scale = 0.37;
            let max = portable::scaled_max(&s, scale);
            // SAFETY: the CPU has the features (checked above).
            unsafe {
                assert_eq!(avx512::scaled_max(&s, scale).to_bits(), max.to_bits());
                for valid in [0, 1, len / 2, len] {
                    let (mut fast, mut slow) = (s.clone(), s.clone());
                    let a = avx512::exp_in_place(&mut fast, valid, scale, max);
                    let b = portable::exp_in_place(&mut slow, valid, scale, max);
                    assert_eq!(a.to_bits(), b.to_bits(), "f32 sum, len {len} valid {valid}");
                    assert!(fast
                        .iter()
                        .zip(&slow)
                        .all(|(x, y)| x.to_bits() == y.to_bits()));
                    let (mut fast, mut slow) = (
                        vec![Bf16::from_f32(1.0); len],
                        vec![Bf16::from_f32(1.0); len],
                    );
                    let a = avx512::exp_rounded(&mut fast, &s, valid, scale, max);
                    let b = portable::exp_rounded(&mut slow, &s, valid, scale, max);
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "bf16 sum, len {len} valid {valid}"
                    );
                    assert_eq!(fast, slow, "bf16 probabilities, len {len} valid {valid}");
                    let dp: Vec<f32> = random_vec(len, seed + 50);
                    let (lse, d) = (max + 1.3, 0.2);
                    let (mut fast, mut slow) = ((s.clone(), dp.clone()), (s.clone(), dp.clone()));
                    avx512::probabilities_and_grad(&mut fast.0, &mut fast.1, valid, scale, lse, d);
                    portable::probabilities_and_grad(
                        &mut slow.0,
                        &mut slow.1,
                        valid,
                        scale,
                        lse,
                        d,
                    );
                    for (x, y) in fast
                        .0
                        .iter()
                        .chain(&fast.1)
                        .zip(slow.0.iter().chain(&slow.1))
                    {
                        assert_eq!(
                            x.to_bits(),
                            y.to_bits(),
                            "f32 backward, len {len} valid {valid}"
                        );
                    }
                    let zeros = || {
                        (
                            vec![Bf16::from_f32(1.0); len],
                            vec![Bf16::from_f32(1.0); len],
                        )
                    };
                    let (mut fast, mut slow) = (zeros(), zeros());
                    let args = (&s[..], &dp[..], valid, scale, lse, d);
                    avx512::probabilities_and_grad_rounded(
                        &mut fast.0,
                        &mut fast.1,
                        args.0,
                        args.1,
                        args.2,
                        args.3,
                        args.4,
                        args.5,
                    );
                    portable::probabilities_and_grad_rounded(
                        &mut slow.0,
                        &mut slow.1,
                        args.0,
                        args.1,
                        args.2,
                        args.3,
                        args.4,
                        args.5,
                    );
                    assert_eq!(fast, slow, "bf16 backward, len {len} valid {valid}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_rounding_is_bf16_rounding() {
        if !vector_path() {
            return;
        }
        // Ties below and above an even and an odd bf16, their neighbours, a NaN, infinities,
        // the largest finite value, a subnormal and a negative tie.
        let bits: [u32; 16] = [
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_7FFF,
            0x3F81_8001,
            0x7FC0_0001,
            0xFF80_0001,
            0x7F80_0000,
            0xFF80_0000,
            0x7F7F_FFFF,
            0x0000_8000,
            0x8000_8000,
            0xBF81_8000,
            0x4049_0FDB,
            0x3EAA_AAAB,
            0x0000_0000,
            0x8000_0000,
        ];
        let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut out = [0u32; 16];
        // SAFETY: the CPU has the features (checked above).
        unsafe {
            use core::arch::x86_64::*;
            let rounded = avx512::round_to_bf16(_mm512_loadu_ps(x.as_ptr()));
            _mm512_storeu_si512(out.as_mut_ptr() as *mut _, rounded);
        }
        for (&x, &got) in x.iter().zip(&out) {
            let want = Bf16::from_f32(x).to_bits() as u32;
            assert_eq!(got, want, "{:#010x}", x.to_bits());
        }
    }

    #[test]
    fn probabilities_are_the_shifted_exponentials() {
        let s = [0.0f32, 1.0, -2.0, 3.0, 0.5];
        assert_eq!(scaled_max(&s, 0.5), 1.5);
        let expected: Vec<f64> = s[..4]
            .iter()
            .map(|&v| (v as f64 * 0.5 - 1.5).exp())
            .collect();
        let mut p = s;
        let sum = exp_in_place(&mut p, 4, 0.5, 1.5);
        for (got, want) in p.iter().zip(&expected) {
            assert!((*got as f64 - want).abs() < 1e-6 * want, "{got} vs {want}");
        }
        assert_eq!(p[4], 0.0);
        assert!((sum as f64 - expected.iter().sum::<f64>()).abs() < 1e-6);
        let mut rounded = [Bf16::from_f32(1.0); 5];
        let sum = exp_rounded(&mut rounded, &s, 4, 0.5, 1.5);
        for (got, want) in rounded.iter().zip(&expected) {
            let got = got.to_f32() as f64;
            assert!((got - want).abs() <= want / 256.0, "{got} vs {want}");
        }
        assert_eq!(rounded[4], Bf16::ZERO);
        let rounded_sum: f32 = rounded.iter().map(|p| p.to_f32()).sum();
        assert!((sum - rounded_sum).abs() < 1e-6);
    }
}
