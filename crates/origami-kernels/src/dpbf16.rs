//! The bf16 GEMM on AVX512_BF16: `C (+)= A·B` with bf16 `A[m×k]`, `B[k×n]` and f32 `C`, every
//! product exact in f32 and every sum an f32 addition (no intermediate rounding to bf16).
//!
//! `vdpbf16ps acc, a, b` treats each 512-bit register as 16 pairs of bf16 and computes, per f32
//! lane `l`, `acc[l] += a[2l]·b[2l] + a[2l+1]·b[2l+1]`: one instruction is 16 lanes × 2 k-steps.
//! So the lanes run along `n` (16 columns of C), and each lane consumes two consecutive
//! k-elements. The packed unit of the blocked GEMM (`packed_gemm.rs`, which holds the loops,
//! the threads and the tile store) is therefore a pair, one `u32` (low half the even k, high
//! half the odd k; an odd `k` is padded with a zero):
//!
//! - B panel: `[k/2][NR]` pairs, `NR = 48` columns, 3 registers per k-pair;
//! - A panel: `[k/2][MR]` pairs, `MR = 8` rows, each pair broadcast to all lanes.
//!
//! The microkernel keeps an `MR × NR` tile of C in 24 zmm accumulators (8 rows × 3 registers),
//! and per k-pair issues 3 loads of B, 8 broadcasts of A and 24 `vdpbf16ps`, which two FMA pipes
//! retire in 12 cycles. k is blocked by `KC = 512` (every k of the presets' forward GEMMs is one
//! pass over C); a B panel is then 48 KiB, an A panel 8 KiB. Packing transposes 8 × 16 pairs in
//! registers when k is contiguous (`x`, `W` read as `Wᵀ`) and interleaves two k-rows when it is
//! not (`W` in `dy·W`, `dyᵀ` and `x` in `dyᵀ·x`).
//!
//! Memory rule: C is written (`=`) on the first k-block unless `accumulate`, added to (`+=`)
//! otherwise; A and B are only read.

use crate::bf16::Bf16;
use crate::matmul::{RawMatrix, View};
use crate::packed_gemm::{
    sized_tile, store_tile, transpose_units, Microkernel, Source, Tile, MR, NR,
};
use core::arch::x86_64::*;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bf16")
}

/// The `vdpbf16ps` microkernel and its pair packing, for [`crate::packed_gemm`].
pub(crate) struct Dpbf16;

impl Microkernel for Dpbf16 {
    type Elem = Bf16;
    const K_PER_UNIT: usize = 2;
    const KC: usize = 512;

    unsafe fn pack<const W: usize>(
        dst: &mut [u32],
        src: Source<Bf16>,
        r0: usize,
        rn: usize,
        k0: usize,
        kc: usize,
    ) {
        pack::<W>(dst, src, r0, rn, k0, kc)
    }

    unsafe fn run_tile(units: usize, a: *const u32, b: *const u32, tile: Tile) {
        sized_tile!(microkernel, units, a, b, tile)
    }
}

/// `c = a·b` or `c += a·b` with the microkernel, on `threads` threads (1: the calling thread).
///
/// # Safety
/// [`available`] must hold; `c` must be valid for writes, touched by no other thread during
/// the call and must not overlap `a` or `b`; shapes must agree and be non-empty.
pub(crate) unsafe fn gemm(
    c: RawMatrix,
    a: View<'_, Bf16>,
    b: View<'_, Bf16>,
    accumulate: bool,
    threads: usize,
) {
    crate::packed_gemm::gemm::<Dpbf16>(c, a, b, accumulate, threads)
}

/// Element `(r, k)` of a bf16 source as its raw bits.
///
/// # Safety
/// It lies in the source slice.
unsafe fn bits(src: Source<Bf16>, r: usize, k: usize) -> u32 {
    src.at(r, k).to_bits() as u32
}

/// [`Microkernel::pack`] for bf16 pairs: rows `r0..r0+rn` (`rn ≤ W`) and columns `k0..k0+kc`
/// of `src` into `dst[k/2][W]` pairs, zero-padding missing rows and an odd tail.
///
/// # Safety
/// As for [`Microkernel::pack`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack<const W: usize>(
    dst: &mut [u32],
    src: Source<Bf16>,
    r0: usize,
    rn: usize,
    k0: usize,
    kc: usize,
) {
    let kp = kc.div_ceil(2);
    let dst = &mut dst[..kp * W];
    let ptr = src.ptr as *const u16;
    if src.row_stride == 1 && W.is_multiple_of(8) {
        // Rows contiguous: each pair interleaves two k-rows, 8 rows at a time.
        for p in 0..kp {
            // Masked-off rows may lie past the slice: the pointers wrap, the loads skip them.
            let lo = ptr.wrapping_add((k0 + 2 * p) * src.col_stride + r0);
            let hi = ptr.wrapping_add((k0 + 2 * p + 1) * src.col_stride + r0);
            let has_hi = 2 * p + 1 < kc;
            for c in 0..W / 8 {
                let live = rn.saturating_sub(8 * c).min(8);
                let mask = ((1u32 << live) - 1) as __mmask8;
                let l =
                    _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(mask, lo.wrapping_add(8 * c) as _));
                let h = if has_hi {
                    _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(mask, hi.wrapping_add(8 * c) as _))
                } else {
                    _mm256_setzero_si256()
                };
                let pair = _mm256_or_si256(l, _mm256_slli_epi32::<16>(h));
                _mm256_storeu_si256(dst.as_mut_ptr().add(p * W + 8 * c) as _, pair);
            }
        }
        return;
    }
    let full = kc / 2;
    if src.col_stride == 1 && W.is_multiple_of(8) {
        // k contiguous: a pair is one unaligned `u32`, and whole pairs transpose in registers.
        let first = ptr.add(r0 * src.row_stride + k0) as *const u8;
        transpose_units::<W>(dst, first, 2 * src.row_stride, rn, full);
        if kc % 2 == 1 {
            for r in 0..W {
                dst[full * W + r] = if r < rn {
                    bits(src, r0 + r, k0 + kc - 1)
                } else {
                    0
                };
            }
        }
        return;
    }
    if rn < W {
        dst.fill(0);
    }
    for r in 0..rn {
        for p in 0..full {
            let k = k0 + 2 * p;
            dst[p * W + r] = bits(src, r0 + r, k) | bits(src, r0 + r, k + 1) << 16;
        }
        if kc % 2 == 1 {
            dst[full * W + r] = bits(src, r0 + r, k0 + kc - 1);
        }
    }
}

/// `tile (+)= Apanel·Bpanel` over `kp` pairs, for the first `ROWS` rows and `16·VECS` columns
/// of the panels (the full tile, or a narrower one at the edges of C).
///
/// # Safety
/// As for [`Microkernel::run_tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn microkernel<const ROWS: usize, const VECS: usize>(
    kp: usize,
    a: *const u32,
    b: *const u32,
    tile: Tile,
) {
    let mut acc = [[_mm512_setzero_ps(); VECS]; ROWS];
    for p in 0..kp {
        let bp = b.add(p * NR);
        let mut bv = [_mm512_setzero_si512(); VECS];
        for (v, reg) in bv.iter_mut().enumerate() {
            *reg = _mm512_load_si512(bp.add(16 * v) as *const __m512i);
        }
        let ap = a.add(p * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
            for (v, reg) in row.iter_mut().enumerate() {
                *reg = _mm512_dpbf16_ps(*reg, av, std::mem::transmute::<__m512i, __m512bh>(bv[v]));
            }
        }
    }
    store_tile(&acc, tile)
}
