//! The f32 GEMM on AVX-512 F: `C (+)= A·B` with f32 `A[m×k]`, `B[k×n]` and `C`, every product
//! and sum rounded as f32 fused multiply-adds.
//!
//! `vfmadd231ps acc, a, b` computes, per f32 lane `l` of a 512-bit register,
//! `acc[l] = a[l]·b[l] + acc[l]` with one rounding: one instruction is 16 lanes × 1 k-step. So
//! the lanes run along `n` (16 columns of C), and the packed unit of the blocked GEMM
//! (`packed_gemm.rs`, which holds the loops, the threads and the tile store) is one f32:
//!
//! - B panel: `[k][NR]`, `NR = 48` columns, 3 registers per k;
//! - A panel: `[k][MR]`, `MR = 8` rows, each value broadcast to all lanes.
//!
//! The microkernel keeps an `MR × NR` tile of C in 24 zmm accumulators (8 rows × 3 registers),
//! and per k issues 3 loads of B, 8 broadcasts of A and 24 FMAs, which two FMA pipes retire in
//! 12 cycles; 24 independent chains cover the FMA latency (4 cycles × 2 pipes). k is blocked by
//! `KC = 512`, as in bf16, so every k of the presets' forward GEMMs is one pass over C: an A
//! panel (16 KiB) stays in L1 and a B panel (96 KiB) in L2, which feeds the 19 bytes a cycle
//! the loop reads (one thread ran large products 10–15 % faster than with `KC = 256`, whose B
//! panel fits L1 but which passes over C twice as often). Packing copies 8 contiguous rows per
//! k when the rows are contiguous (`W` in `dy·W`, `dyᵀ` and `x` in `dyᵀ·x`) and transposes
//! 8 rows × 16 k in registers when k is (`x` and `dy` as the left operand, `W` read as `Wᵀ`).
//!
//! Each element of C is `((c₀ + S₁) + S₂) + …` (`c₀` only with `accumulate`), `S_b` the FMA
//! chain of k-block `b` from its first k to its last: a reassociation of the plain sum, the
//! same whatever the thread count.
//!
//! Memory rule: C is written (`=`) on the first k-block unless `accumulate`, added to (`+=`)
//! otherwise; A and B are only read.

use crate::matmul::{RawMatrix, View};
use crate::packed_gemm::{
    sized_tile, store_tile, transpose_units, Microkernel, Source, Tile, MR, NR,
};
use core::arch::x86_64::*;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
}

/// The f32 FMA microkernel and its packing, for [`crate::packed_gemm`].
pub(crate) struct Fma512;

impl Microkernel for Fma512 {
    type Elem = f32;
    const K_PER_UNIT: usize = 1;
    const KC: usize = 512;

    unsafe fn pack<const W: usize>(
        dst: &mut [u32],
        src: Source<f32>,
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
    a: View<'_, f32>,
    b: View<'_, f32>,
    accumulate: bool,
    threads: usize,
) {
    crate::packed_gemm::gemm::<Fma512>(c, a, b, accumulate, threads)
}

/// [`Microkernel::pack`] for f32: rows `r0..r0+rn` (`rn ≤ W`) and columns `k0..k0+kc` of `src`
/// into `dst[k][W]` (as bits), zero-padding missing rows.
///
/// # Safety
/// As for [`Microkernel::pack`].
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn pack<const W: usize>(
    dst: &mut [u32],
    src: Source<f32>,
    r0: usize,
    rn: usize,
    k0: usize,
    kc: usize,
) {
    let dst = &mut dst[..kc * W];
    if src.row_stride == 1 && W.is_multiple_of(8) {
        // Rows contiguous: each k is a copy of 8 rows at a time.
        for p in 0..kc {
            // Masked-off rows may lie past the slice: the pointer wraps, the loads skip them.
            let from = src.ptr.wrapping_add((k0 + p) * src.col_stride + r0);
            for c in 0..W / 8 {
                let live = rn.saturating_sub(8 * c).min(8);
                let mask = ((1u32 << live) - 1) as __mmask8;
                let v = _mm256_maskz_loadu_ps(mask, from.wrapping_add(8 * c));
                _mm256_storeu_ps(dst.as_mut_ptr().add(p * W + 8 * c) as *mut f32, v);
            }
        }
        return;
    }
    if src.col_stride == 1 && W.is_multiple_of(8) {
        let first = src.ptr.add(r0 * src.row_stride + k0) as *const u8;
        transpose_units::<W>(dst, first, 4 * src.row_stride, rn, kc);
        return;
    }
    if rn < W {
        dst.fill(0);
    }
    for r in 0..rn {
        for p in 0..kc {
            dst[p * W + r] = src.at(r0 + r, k0 + p).to_bits();
        }
    }
}

/// `tile (+)= Apanel·Bpanel` over `kc` values of k, for the first `ROWS` rows and `16·VECS`
/// columns of the panels (the full tile, or a narrower one at the edges of C).
///
/// # Safety
/// As for [`Microkernel::run_tile`].
#[target_feature(enable = "avx512f")]
unsafe fn microkernel<const ROWS: usize, const VECS: usize>(
    kc: usize,
    a: *const u32,
    b: *const u32,
    tile: Tile,
) {
    let (a, b) = (a as *const f32, b as *const f32);
    let mut acc = [[_mm512_setzero_ps(); VECS]; ROWS];
    for p in 0..kc {
        let bp = b.add(p * NR);
        let mut bv = [_mm512_setzero_ps(); VECS];
        for (v, reg) in bv.iter_mut().enumerate() {
            *reg = _mm512_load_ps(bp.add(16 * v));
        }
        let ap = a.add(p * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(i));
            for (v, reg) in row.iter_mut().enumerate() {
                *reg = _mm512_fmadd_ps(av, bv[v], *reg);
            }
        }
    }
    store_tile(&acc, tile)
}
