//! The bf16 GEMM on AVX512_BF16: `C (+)= A·B` with bf16 `A[m×k]`, `B[k×n]` and f32 `C`, every
//! product exact in f32 and every sum an f32 addition (no intermediate rounding to bf16).
//!
//! `vdpbf16ps acc, a, b` treats each 512-bit register as 16 pairs of bf16 and computes, per f32
//! lane `l`, `acc[l] += a[2l]·b[2l] + a[2l+1]·b[2l+1]`: one instruction is 16 lanes × 2 k-steps.
//! So the lanes run along `n` (16 columns of C), and each lane consumes two consecutive
//! k-elements. Both operands are packed into that pair-interleaved layout, one `u32` per pair
//! (low half the even k, high half the odd k; an odd `k` is padded with a zero):
//!
//! - B panel (`KC × NR`): `[k/2][NR]` pairs, `NR = 48` columns, 3 registers per k-pair;
//! - A panel (`MR × KC`): `[k/2][MR]` pairs, `MR = 8` rows, each pair broadcast to all lanes.
//!
//! The microkernel keeps an `MR × NR` tile of C in 24 zmm accumulators (8 rows × 3 registers),
//! and per k-pair issues 3 loads of B, 8 broadcasts of A and 24 `vdpbf16ps`, which two FMA pipes
//! retire in 12 cycles; tiles at the edges of C run a microkernel sized to them (fewer rows or
//! registers). Blocking (Goto/BLIS order): columns in blocks of `NC = 3072`, k in blocks of
//! `KC = 512` (every k of the presets' forward GEMMs is one pass over C), rows in blocks of at
//! most `MC = 384` (a packed A block, ≤ 384 KiB, stays in L2); each packed B panel (48 KiB, in
//! L1 and L2) is used by every 8 KiB A panel of the block before the next one is read. Packing transposes 8 × 16 pairs in
//! registers when k is contiguous (`x`, `W` read as `Wᵀ`) and interleaves two k-rows when it is
//! not (`W` in `dy·W`, `dyᵀ` and `x` in `dyᵀ·x`). Work is split over rayon tasks by row blocks of
//! whole tiles, a multiple of the thread count (and column panels when there are fewer row
//! blocks than threads); each task writes only its own tiles of C. A call runs inside one
//! `rayon::scope`, so its parallel regions start from a pool thread, and a call smaller than
//! `PARALLEL_MIN_MACS` stays on the calling thread.
//!
//! Memory rule: C is written (`=`) on the first k-block unless `accumulate`, added to (`+=`)
//! otherwise; A and B are only read.

use crate::bf16::Bf16;
use crate::matmul::{RawMatrix, View};
use crate::tiles::SharedOut;
use core::arch::x86_64::*;
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of the register tile.
const MR: usize = 8;
/// Columns of the register tile (3 zmm of 16 lanes).
const NV: usize = 3;
const NR: usize = 16 * NV;
/// Depth of one k-block (even, so only the last block can have an odd tail).
const KC: usize = 512;
/// Most rows of one packed A block.
const MC: usize = 384;
/// Most columns of one packed B block.
const NC: usize = 64 * NR;
/// Below this many multiply-adds (≈ 34 µs on one core) a call stays on the calling thread:
/// handing work to a second thread costs 10–20 µs on this machine.
const PARALLEL_MIN_MACS: usize = 1 << 23;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bf16")
}

/// A cache line of packed pairs, so packed panels start 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// Reusable packing buffers, one per thread; taken out while in use, so a nested call on the
/// same thread (rayon work stealing) allocates its own instead of aliasing.
#[derive(Default)]
struct Buffers {
    a: Vec<Line>,
    b: Vec<Line>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::default();
}

fn take_buffer(pick: fn(&mut Buffers) -> &mut Vec<Line>, pairs: usize) -> Vec<Line> {
    let mut v = BUFFERS.with(|b| std::mem::take(pick(&mut b.borrow_mut())));
    v.resize(pairs.div_ceil(16), Line([0; 16]));
    v
}

fn give_buffer(pick: fn(&mut Buffers) -> &mut Vec<Line>, v: Vec<Line>) {
    BUFFERS.with(|b| *pick(&mut b.borrow_mut()) = v);
}

fn as_pairs(lines: &mut [Line]) -> &mut [u32] {
    // SAFETY: `Line` is `repr(C)` over `[u32; 16]` with no padding.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u32, lines.len() * 16) }
}

/// A read-only bf16 matrix addressed as raw bits, for the packers.
#[derive(Clone, Copy)]
struct Source {
    ptr: *const u16,
    row_stride: usize,
    col_stride: usize,
}
// SAFETY: it only reads an immutably borrowed slice that outlives the call.
unsafe impl Send for Source {}
unsafe impl Sync for Source {}

impl Source {
    fn of(v: View<'_, Bf16>) -> Source {
        let (data, row_stride, col_stride) = v.raw();
        Source {
            ptr: data.as_ptr() as *const u16,
            row_stride,
            col_stride,
        }
    }

    /// The view transposed, i.e. `B` read as `Bᵀ` (rows along n, columns along k).
    fn t(self) -> Source {
        Source {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    unsafe fn at(self, r: usize, k: usize) -> u32 {
        *self.ptr.add(r * self.row_stride + k * self.col_stride) as u32
    }
}

/// Packs rows `r0..r0+rn` (`rn ≤ W`) and columns `k0..k0+kc` of `src` into `dst[k/2][W]`
/// pairs, zero-padding missing rows and an odd tail.
///
/// # Safety
/// Every addressed element must lie in the source slice; `dst` holds `kc.div_ceil(2)·W` pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack<const W: usize>(
    dst: &mut [u32],
    src: Source,
    r0: usize,
    rn: usize,
    k0: usize,
    kc: usize,
) {
    let kp = kc.div_ceil(2);
    let dst = &mut dst[..kp * W];
    if src.row_stride == 1 && W.is_multiple_of(8) {
        // Rows contiguous: each pair interleaves two k-rows, 8 rows at a time.
        for p in 0..kp {
            // Masked-off rows may lie past the slice: the pointers wrap, the loads skip them.
            let lo = src.ptr.wrapping_add((k0 + 2 * p) * src.col_stride + r0);
            let hi = src.ptr.wrapping_add((k0 + 2 * p + 1) * src.col_stride + r0);
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
    if src.col_stride == 1 && W.is_multiple_of(8) {
        pack_k_contiguous::<W>(dst, src, r0, rn, k0, kc);
        return;
    }
    if rn < W {
        dst.fill(0);
    }
    let full = kc / 2;
    for r in 0..rn {
        for p in 0..full {
            let k = k0 + 2 * p;
            dst[p * W + r] = src.at(r0 + r, k) | src.at(r0 + r, k + 1) << 16;
        }
        if kc % 2 == 1 {
            dst[full * W + r] = src.at(r0 + r, k0 + kc - 1);
        }
    }
}

/// [`pack`] when k is contiguous (a pair is one unaligned `u32`): a transpose of 8 rows × 16
/// pairs at a time in registers.
///
/// # Safety
/// As for [`pack`]; `src.col_stride == 1` and `W` is a multiple of 8.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_k_contiguous<const W: usize>(
    dst: &mut [u32],
    src: Source,
    r0: usize,
    rn: usize,
    k0: usize,
    kc: usize,
) {
    let full = kc / 2;
    let out = dst.as_mut_ptr();
    // Picks 128-bit lanes (l0 of a, l0 of b, l1 of a, l1 of b) and the same for l2, l3.
    let low_lanes = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    let high_lanes = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    for g in 0..W / 8 {
        let live_rows = rn.saturating_sub(8 * g).min(8);
        for p0 in (0..full).step_by(16) {
            let live = (full - p0).min(16);
            let mask = ((1u32 << live) - 1) as __mmask16;
            let mut r = [_mm512_setzero_si512(); 8];
            for (i, reg) in r.iter_mut().enumerate().take(live_rows) {
                let row = src.ptr.add((r0 + 8 * g + i) * src.row_stride + k0) as *const i32;
                *reg = _mm512_maskz_loadu_epi32(mask, row.add(p0));
            }
            // Per 128-bit lane l: t = pairs 4l..4l+4 of two rows interleaved; u, v = pair
            // 4l+q of rows 0..4 and 4..8.
            let t = [
                _mm512_unpacklo_epi32(r[0], r[1]),
                _mm512_unpackhi_epi32(r[0], r[1]),
                _mm512_unpacklo_epi32(r[2], r[3]),
                _mm512_unpackhi_epi32(r[2], r[3]),
                _mm512_unpacklo_epi32(r[4], r[5]),
                _mm512_unpackhi_epi32(r[4], r[5]),
                _mm512_unpacklo_epi32(r[6], r[7]),
                _mm512_unpackhi_epi32(r[6], r[7]),
            ];
            for q in 0..4 {
                let (x, y) = (q / 2, q / 2 + 2);
                let (u, v) = if q % 2 == 0 {
                    (
                        _mm512_unpacklo_epi64(t[x], t[y]),
                        _mm512_unpacklo_epi64(t[x + 4], t[y + 4]),
                    )
                } else {
                    (
                        _mm512_unpackhi_epi64(t[x], t[y]),
                        _mm512_unpackhi_epi64(t[x + 4], t[y + 4]),
                    )
                };
                let lo = _mm512_permutex2var_epi64(u, low_lanes, v);
                let hi = _mm512_permutex2var_epi64(u, high_lanes, v);
                let halves = [
                    _mm512_castsi512_si256(lo),
                    _mm512_extracti64x4_epi64::<1>(lo),
                    _mm512_castsi512_si256(hi),
                    _mm512_extracti64x4_epi64::<1>(hi),
                ];
                for (l, half) in halves.into_iter().enumerate() {
                    let p = 4 * l + q;
                    if p < live {
                        _mm256_storeu_si256(out.add((p0 + p) * W + 8 * g) as *mut __m256i, half);
                    }
                }
            }
        }
    }
    if kc % 2 == 1 {
        for r in 0..W {
            dst[full * W + r] = if r < rn {
                src.at(r0 + r, k0 + kc - 1)
            } else {
                0
            };
        }
    }
}

/// Where the microkernel puts its tile: `rows × cols` (at most `MR × NR`) of C at `ptr`.
#[derive(Clone, Copy)]
struct Tile {
    ptr: *mut f32,
    row_stride: usize,
    col_stride: usize,
    rows: usize,
    cols: usize,
    add: bool,
}

/// `tile (+)= Apanel·Bpanel` over `kp` pairs, with the microkernel sized to the tile.
///
/// # Safety
/// As for [`microkernel`].
unsafe fn run_tile(kp: usize, a: *const u32, b: *const u32, tile: Tile) {
    macro_rules! sized {
        ($($rows:literal),*) => {
            match (tile.rows, tile.cols.div_ceil(16)) {
                $(
                    ($rows, 1) => microkernel::<$rows, 1>(kp, a, b, tile),
                    ($rows, 2) => microkernel::<$rows, 2>(kp, a, b, tile),
                    ($rows, 3) => microkernel::<$rows, 3>(kp, a, b, tile),
                )*
                shape => unreachable!("tile {shape:?} exceeds {MR}x{NV} registers"),
            }
        };
    }
    sized!(1, 2, 3, 4, 5, 6, 7, 8)
}

/// `tile (+)= Apanel·Bpanel` over `kp` pairs, for the first `ROWS` rows and `16·VECS` columns
/// of the panels (the full tile, or a narrower one at the edges of C).
///
/// # Safety
/// `a` holds `kp·MR` pairs, `b` holds `kp·NR` pairs (64-byte aligned), and the tile's elements
/// are valid for reads and writes by this thread alone.
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
    if tile.col_stride == 1 {
        for (i, row) in acc.iter().enumerate().take(tile.rows) {
            let out = tile.ptr.add(i * tile.row_stride);
            for (v, reg) in row.iter().enumerate() {
                // Columns past the tile are masked off (their addresses may lie past C).
                let live = tile.cols.saturating_sub(16 * v).min(16);
                let mask = ((1u32 << live) - 1) as __mmask16;
                let at = out.wrapping_add(16 * v);
                let value = if tile.add {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), *reg)
                } else {
                    *reg
                };
                _mm512_mask_storeu_ps(at, mask, value);
            }
        }
    } else {
        let mut buf = [0.0f32; MR * NR];
        for (i, row) in acc.iter().enumerate() {
            for (v, reg) in row.iter().enumerate() {
                _mm512_storeu_ps(buf.as_mut_ptr().add(i * NR + 16 * v), *reg);
            }
        }
        for i in 0..tile.rows {
            for j in 0..tile.cols {
                let out = tile.ptr.add(i * tile.row_stride + j * tile.col_stride);
                let value = buf[i * NR + j];
                *out = if tile.add { *out + value } else { value };
            }
        }
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
    let out = SharedOut(c.ptr);
    let (c_rs, c_cs) = (c.row_stride, c.col_stride);
    let ((m, k), n) = (a.shape(), b.shape().1);
    let threads = if m * n * k < PARALLEL_MIN_MACS {
        1
    } else {
        threads
    };
    let run = || blocked(out, c_rs, c_cs, a, b, accumulate, threads);
    if threads > 1 && rayon::current_thread_index().is_none() {
        // One hop into the pool per call: the parallel regions inside then start from a worker
        // (a cheap push to its own queue) instead of each waking the caller across threads.
        rayon::scope(|_| run());
    } else {
        run();
    }
}

/// The blocked loops of [`gemm`], C given as its pointer and strides.
///
/// # Safety
/// As for [`gemm`].
unsafe fn blocked(
    out: SharedOut,
    c_rs: usize,
    c_cs: usize,
    a: View<'_, Bf16>,
    b: View<'_, Bf16>,
    accumulate: bool,
    threads: usize,
) {
    let (m, k) = a.shape();
    let n = b.shape().1;
    let (asrc, bsrc) = (Source::of(a), Source::of(b).t());
    // Row blocks of whole panels, as even as possible, a multiple of the thread count.
    let m_panels = m.div_ceil(MR);
    let row_blocks = m_panels
        .div_ceil(MC / MR)
        .div_ceil(threads)
        .saturating_mul(threads)
        .min(m_panels);
    let block_rows = |rb: usize| {
        let (p0, p1) = (rb * m_panels / row_blocks, (rb + 1) * m_panels / row_blocks);
        (p0 * MR, (p1 * MR).min(m) - p0 * MR)
    };
    let mut bbuf = take_buffer(|b| &mut b.b, NC.min(n.div_ceil(NR) * NR) * KC.div_ceil(2));
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let panels = nc.div_ceil(NR);
        let col_groups = if row_blocks >= threads {
            1
        } else {
            panels.min(threads.div_ceil(row_blocks))
        };
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let kp = kc.div_ceil(2);
            let bpack = &mut as_pairs(&mut bbuf)[..panels * kp * NR];
            let pack_b = |(q, dst): (usize, &mut [u32])| {
                let j = q * NR;
                pack::<NR>(dst, bsrc, jc + j, NR.min(nc - j), pc, kc)
            };
            if threads > 1 {
                bpack.par_chunks_mut(kp * NR).enumerate().for_each(pack_b);
            } else {
                bpack.chunks_mut(kp * NR).enumerate().for_each(pack_b);
            }
            let bpack = &*bpack;
            let add = accumulate || pc > 0;
            let task = |t: usize| {
                let (rb, g) = (t / col_groups, t % col_groups);
                let (i0, rows) = block_rows(rb);
                let row_panels = rows.div_ceil(MR);
                let mut abuf = take_buffer(|b| &mut b.a, row_panels * kp * MR);
                let apack = as_pairs(&mut abuf);
                for r in 0..row_panels {
                    let i = r * MR;
                    let dst = &mut apack[r * kp * MR..(r + 1) * kp * MR];
                    pack::<MR>(dst, asrc, i0 + i, MR.min(rows - i), pc, kc);
                }
                let per_group = panels.div_ceil(col_groups);
                for q in g * per_group..panels.min((g + 1) * per_group) {
                    let j = q * NR;
                    let bp = bpack.as_ptr().add(q * kp * NR);
                    for r in 0..row_panels {
                        let i = r * MR;
                        let tile = Tile {
                            ptr: out.get().add((i0 + i) * c_rs + (jc + j) * c_cs),
                            row_stride: c_rs,
                            col_stride: c_cs,
                            rows: MR.min(rows - i),
                            cols: NR.min(nc - j),
                            add,
                        };
                        run_tile(kp, apack.as_ptr().add(r * kp * MR), bp, tile);
                    }
                }
                give_buffer(|b| &mut b.a, abuf);
            };
            let tasks = row_blocks * col_groups;
            if threads > 1 && tasks > 1 {
                (0..tasks).into_par_iter().for_each(task);
            } else {
                (0..tasks).for_each(task);
            }
        }
    }
    give_buffer(|b| &mut b.b, bbuf);
}
