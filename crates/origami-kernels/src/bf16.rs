//! The bf16 storage type and its conversions to and from `f32`.
//!
//! bf16 is the upper half of an IEEE `f32`: sign, the same 8-bit exponent, 7 stored mantissa
//! bits (8 bits of precision). Widening is exact (`bits << 16`). Narrowing rounds to nearest,
//! ties to even, on the bit pattern: `(bits + 0x7FFF + lsb) >> 16` where `lsb` is bit 16, which
//! carries correctly into the exponent (the largest finite values round to ±∞ as IEEE says);
//! NaN stays NaN (quieted, sign kept). Subnormals are rounded like any other value, not
//! flushed, so the relative error of a normal result is at most `2⁻⁸` (half a unit in the 8th
//! bit) and the absolute error below the normal range at most `2⁻¹³⁴`.
//!
//! The bulk conversions use AVX-512 (F and BW) integer operations when the CPU has them and a
//! scalar loop otherwise; both compute the same bit patterns.
//!
//! Memory rule: the conversions write every element of their output (`=`).

/// A bfloat16 value, stored as its 16 bits. Arithmetic happens in `f32`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// Zero.
    pub const ZERO: Bf16 = Bf16(0);

    /// Rounds `x` to the nearest bf16, ties to even.
    #[inline]
    pub fn from_f32(x: f32) -> Bf16 {
        let bits = x.to_bits();
        if x.is_nan() {
            return Bf16((bits >> 16) as u16 | 0x0040);
        }
        let lsb = (bits >> 16) & 1;
        Bf16((bits.wrapping_add(0x7FFF + lsb) >> 16) as u16)
    }

    /// The exact `f32` value.
    #[inline]
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }

    /// The raw bits.
    #[inline]
    pub fn to_bits(self) -> u16 {
        self.0
    }
}

impl From<f32> for Bf16 {
    fn from(x: f32) -> Self {
        Bf16::from_f32(x)
    }
}

impl From<Bf16> for f32 {
    fn from(x: Bf16) -> Self {
        x.to_f32()
    }
}

/// `out[i] = round_bf16(x[i])`; lengths must agree.
pub fn to_bf16_slice(out: &mut [Bf16], x: &[f32]) {
    assert_eq!(out.len(), x.len(), "to_bf16_slice lengths differ");
    let done = vector_to_bf16(out, x);
    for (o, v) in out[done..].iter_mut().zip(&x[done..]) {
        *o = Bf16::from_f32(*v);
    }
}

/// `out[i] = f32(x[i])` (exact); lengths must agree.
pub fn to_f32_slice(out: &mut [f32], x: &[Bf16]) {
    assert_eq!(out.len(), x.len(), "to_f32_slice lengths differ");
    let done = vector_to_f32(out, x);
    for (o, v) in out[done..].iter_mut().zip(&x[done..]) {
        *o = v.to_f32();
    }
}

/// Converts a prefix with AVX-512 where the CPU has it; returns its length (0 without).
#[cfg(target_arch = "x86_64")]
fn vector_to_bf16(out: &mut [Bf16], x: &[f32]) -> usize {
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { avx512::to_bf16(out, x) }
    } else {
        0
    }
}

/// Converts a prefix with AVX-512 where the CPU has it; returns its length (0 without).
#[cfg(target_arch = "x86_64")]
fn vector_to_f32(out: &mut [f32], x: &[Bf16]) -> usize {
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { avx512::to_f32(out, x) }
    } else {
        0
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn vector_to_bf16(_: &mut [Bf16], _: &[f32]) -> usize {
    0
}

#[cfg(not(target_arch = "x86_64"))]
fn vector_to_f32(_: &mut [f32], _: &[Bf16]) -> usize {
    0
}

/// A new bf16 vector holding `x` rounded.
pub fn to_bf16_vec(x: &[f32]) -> Vec<Bf16> {
    let mut out = vec![Bf16::ZERO; x.len()];
    to_bf16_slice(&mut out, x);
    out
}

/// A new f32 vector holding `x` widened.
pub fn to_f32_vec(x: &[Bf16]) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    to_f32_slice(&mut out, x);
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Bf16;
    use core::arch::x86_64::*;

    /// Converts the largest multiple of 16 elements; returns how many it converted.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn to_bf16(out: &mut [Bf16], x: &[f32]) -> usize {
        let n = x.len() / 16 * 16;
        let bias = _mm512_set1_epi32(0x7FFF);
        let one = _mm512_set1_epi32(1);
        let quiet = _mm512_set1_epi32(0x0040);
        for i in (0..n).step_by(16) {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), one);
            let rounded =
                _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, _mm512_add_epi32(bias, lsb)));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let nan_bits = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), quiet);
            let r = _mm512_mask_blend_epi32(nan, rounded, nan_bits);
            _mm256_storeu_si256(
                out.as_mut_ptr().add(i) as *mut __m256i,
                _mm512_cvtepi32_epi16(r),
            );
        }
        n
    }

    /// Converts the largest multiple of 16 elements; returns how many it converted.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn to_f32(out: &mut [f32], x: &[Bf16]) -> usize {
        let n = x.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            let h = _mm256_loadu_si256(x.as_ptr().add(i) as *const __m256i);
            let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_castsi512_ps(w));
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1).
        assert_eq!(Bf16::from_f32(1.0 + 2f32.powi(-8)).to_f32(), 1.0);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: ties go to 1 + 2⁻⁶.
        assert_eq!(
            Bf16::from_f32(1.0 + 3.0 * 2f32.powi(-8)).to_f32(),
            1.0 + 2f32.powi(-6)
        );
        // Just above halfway rounds up.
        assert_eq!(
            Bf16::from_f32(1.0 + 2f32.powi(-8) + 2f32.powi(-20)).to_f32(),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(Bf16::from_f32(-2.5).to_f32(), -2.5);
        assert_eq!(Bf16::from_f32(f32::MAX).to_f32(), f32::INFINITY);
        assert_eq!(
            Bf16::from_f32(f32::NEG_INFINITY).to_f32(),
            f32::NEG_INFINITY
        );
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
        let sub = f32::from_bits(0x0001_8000);
        assert_eq!(Bf16::from_f32(sub).to_bits(), 0x0002);
    }

    #[test]
    fn relative_error_is_at_most_two_to_minus_eight() {
        for (i, x) in random_vec(10_000, 11).into_iter().enumerate() {
            let x = x * (1.0 + i as f32);
            let r = Bf16::from_f32(x).to_f32();
            assert!((r - x).abs() <= x.abs() * 2f32.powi(-8), "{x} -> {r}");
        }
    }

    #[test]
    fn bulk_conversions_match_scalar() {
        let mut x = random_vec(1003, 12);
        x.extend([
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            -0.0,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
        ]);
        x.extend(random_vec(40, 13).iter().map(|v| v * 1e30));
        let bulk = to_bf16_vec(&x);
        let scalar: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
        assert_eq!(bulk, scalar);
        let back = to_f32_vec(&bulk);
        for (b, s) in back.iter().zip(&scalar) {
            assert_eq!(b.to_bits(), s.to_f32().to_bits());
        }
    }
}
