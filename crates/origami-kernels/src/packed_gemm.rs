//! The packed, blocked GEMM that both AVX-512 microkernels run in (`fma512.rs` for f32,
//! `dpbf16.rs` for bf16): `C (+)= A·B` with `A[m×k]`, `B[k×n]` strided views of one element type
//! and `C` a strided f32 view.
//!
//! `C[i,j] (+)= Σ_p A[i,p]·B[p,j]`, summed in a fixed order: k-blocks of `KC` in turn, each
//! accumulated by the microkernel in registers from its first k to its last, then added to C
//! (or written, on the first block without `accumulate`). Every element of C is computed by one
//! task in that order whatever the thread count, so the result does not depend on it.
//!
//! Packed layout. Both operands are copied into panels of 32-bit *units*, the microkernel's
//! step along k: one f32, or one pair of bf16 (two consecutive k, as `vdpbf16ps` consumes
//! them). A panel of width `W` is `[units][W]`: for each unit, `W` consecutive rows (of A) or
//! columns (of B), zero-padded past the edge of the matrix, so the microkernel never masks its
//! loads:
//!
//! - B panel `[kc units][NR]`, `NR = 48` columns, 3 zmm loads per unit;
//! - A panel `[kc units][MR]`, `MR = 8` rows, each unit broadcast to all lanes.
//!
//! The microkernel keeps an `MR × NR` tile of C in 24 zmm accumulators; tiles at the edges of C
//! run a microkernel sized to them (fewer rows or registers). Blocking (Goto/BLIS order):
//! columns in blocks of `NC = 3072`, k in blocks of the kernel's `KC`, rows in blocks of at most
//! `MC = 384` (a packed A block stays in L2, 1 MiB per core); each packed B panel is used by
//! every A panel of the block before the next one is read. Work is split over rayon tasks by
//! row blocks of whole tiles, a multiple of the thread count (and column panels when there are
//! fewer row blocks than threads); each task writes only its own tiles of C. A call runs inside
//! one `rayon::scope`, so its parallel regions start from a pool thread, and a call smaller than
//! `PARALLEL_MIN_MACS` stays on the calling thread. Packing buffers are per thread and reused,
//! so a warm call does not allocate.
//!
//! Memory rule: C is written (`=`) on the first k-block unless `accumulate`, added to (`+=`)
//! otherwise; A and B are only read.

use crate::matmul::{RawMatrix, View};
use crate::tiles::{Line, SharedOut, TileOperand};
use core::arch::x86_64::*;
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of the register tile.
pub(crate) const MR: usize = 8;
/// Zmm registers across the register tile.
pub(crate) const NV: usize = 3;
/// Columns of the register tile.
pub(crate) const NR: usize = 16 * NV;
/// Most rows of one packed A block.
const MC: usize = 384;
/// Most columns of one packed B block.
const NC: usize = 64 * NR;
/// Below this many multiply-adds (≈ 34 µs in bf16, ≈ 70 µs in f32 on one core) a call stays
/// on the calling thread: handing work to a second thread costs 10–20 µs on this machine.
const PARALLEL_MIN_MACS: usize = 1 << 23;

/// What a microkernel brings to the blocked loops: its element type, its packing and its
/// register tile.
pub(crate) trait Microkernel {
    /// The element type of A and B.
    type Elem: Copy + Sync;
    /// Consecutive k-elements in one packed unit.
    const K_PER_UNIT: usize;
    /// Depth of one k-block, in k-elements (a multiple of `K_PER_UNIT`, so only the last block
    /// can end in a partial unit).
    const KC: usize;

    /// Packs rows `r0..r0+rn` (`rn ≤ W`) and k-elements `k0..k0+kc` of `src` into
    /// `dst[units][W]`, zero-padding missing rows and a partial last unit.
    ///
    /// # Safety
    /// The CPU has the kernel's features; every addressed element lies in the source slice;
    /// `dst` holds `kc.div_ceil(K_PER_UNIT)·W` units.
    unsafe fn pack<const W: usize>(
        dst: &mut [u32],
        src: Source<Self::Elem>,
        r0: usize,
        rn: usize,
        k0: usize,
        kc: usize,
    );

    /// `tile (+)= Apanel·Bpanel` over `units` packed units.
    ///
    /// # Safety
    /// The CPU has the kernel's features; `a` holds `units·MR` units, `b` holds `units·NR`
    /// units (64-byte aligned), and the tile's elements are valid for reads and writes by this
    /// thread alone.
    unsafe fn run_tile(units: usize, a: *const u32, b: *const u32, tile: Tile);
}

/// Reusable packing buffers of each thread, a stack of each kind: a call takes one out while it
/// runs, so a nested call on the same thread (rayon work stealing while it waits) takes the
/// next instead of aliasing, and both are kept for the next calls. Buffers only grow, and a
/// call uses a prefix of the one it takes: a warm call neither allocates nor clears memory.
#[derive(Default)]
struct Buffers {
    a: Vec<Vec<Line>>,
    b: Vec<Vec<Line>>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::default();
}

fn take_buffer(pick: fn(&mut Buffers) -> &mut Vec<Vec<Line>>, units: usize) -> Vec<Line> {
    let mut v = BUFFERS.with(|b| pick(&mut b.borrow_mut()).pop().unwrap_or_default());
    let lines = units.div_ceil(16);
    if v.len() < lines {
        v.resize(lines, Line([0; 16]));
    }
    v
}

fn give_buffer(pick: fn(&mut Buffers) -> &mut Vec<Vec<Line>>, v: Vec<Line>) {
    BUFFERS.with(|b| pick(&mut b.borrow_mut()).push(v));
}

fn as_units(lines: &mut [Line]) -> &mut [u32] {
    // SAFETY: `Line` is `repr(C)` over `[u32; 16]` with no padding.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u32, lines.len() * 16) }
}

/// A read-only matrix addressed by raw pointer, for the packers: element `(r, k)` at
/// `ptr + r·row_stride + k·col_stride`.
pub(crate) struct Source<T> {
    pub(crate) ptr: *const T,
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}

impl<T> Clone for Source<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Source<T> {}
// SAFETY: it only reads an immutably borrowed slice that outlives the call.
unsafe impl<T: Sync> Send for Source<T> {}
unsafe impl<T: Sync> Sync for Source<T> {}

impl<T: Copy> Source<T> {
    fn of(v: View<'_, T>) -> Source<T> {
        let (data, row_stride, col_stride) = v.raw();
        Source {
            ptr: data.as_ptr(),
            row_stride,
            col_stride,
        }
    }

    /// The view transposed, i.e. `B` read as `Bᵀ` (rows along n, columns along k).
    fn t(self) -> Source<T> {
        Source {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Element `(r, k)`.
    ///
    /// # Safety
    /// It lies in the source slice.
    pub(crate) unsafe fn at(self, r: usize, k: usize) -> T {
        *self.ptr.add(r * self.row_stride + k * self.col_stride)
    }
}

/// Where the microkernel puts its tile: `rows × cols` (at most `MR × NR`) of C at `ptr`.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    ptr: *mut f32,
    row_stride: usize,
    col_stride: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    add: bool,
}

/// Calls `$kernel::<ROWS, VECS>(units, a, b, tile)`, the microkernel instantiated for the
/// tile's rows (1–8) and registers (1–3).
macro_rules! sized_tile {
    ($kernel:ident, $units:expr, $a:expr, $b:expr, $tile:expr) => {
        sized_tile!(@rows $kernel, $units, $a, $b, $tile; 1, 2, 3, 4, 5, 6, 7, 8)
    };
    (@rows $kernel:ident, $units:expr, $a:expr, $b:expr, $tile:expr; $($rows:literal),*) => {{
        let (units, a, b, tile) = ($units, $a, $b, $tile);
        match (tile.rows, tile.cols.div_ceil(16)) {
            $(
                ($rows, 1) => $kernel::<$rows, 1>(units, a, b, tile),
                ($rows, 2) => $kernel::<$rows, 2>(units, a, b, tile),
                ($rows, 3) => $kernel::<$rows, 3>(units, a, b, tile),
            )*
            shape => unreachable!("tile {shape:?} exceeds 8x3 registers"),
        }
    }};
}
pub(crate) use sized_tile;

/// Writes (or adds) the accumulators of a microkernel to its tile of C; `acc[i][v]` holds
/// columns `16v..16v+16` of row `i`, and the tile has exactly `ROWS` rows and `VECS` registers
/// of columns (the last one possibly partial), as [`sized_tile`] instantiates it. The loops
/// have constant bounds, so the accumulators stay in registers.
///
/// # Safety
/// The CPU has AVX-512 F; the tile's elements are valid for reads and writes by this thread.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn store_tile<const ROWS: usize, const VECS: usize>(
    acc: &[[__m512; VECS]; ROWS],
    tile: Tile,
) {
    debug_assert!(tile.rows == ROWS && tile.cols.div_ceil(16) == VECS);
    if tile.col_stride != 1 {
        store_tile_strided(acc, tile);
        return;
    }
    // Columns past the tile are masked off (their addresses may lie past C).
    let tail = tile.cols - 16 * (VECS - 1);
    let last = ((1u32 << tail) - 1) as __mmask16;
    for (i, row) in acc.iter().enumerate() {
        let out = tile.ptr.add(i * tile.row_stride);
        for (v, reg) in row.iter().enumerate() {
            let mask = if v + 1 == VECS { last } else { !0 };
            let at = out.wrapping_add(16 * v);
            let value = if tile.add {
                _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), *reg)
            } else {
                *reg
            };
            _mm512_mask_storeu_ps(at, mask, value);
        }
    }
}

/// [`store_tile`] for a C whose columns are not contiguous (e.g. written through `t()`).
///
/// # Safety
/// As for [`store_tile`].
#[cold]
#[target_feature(enable = "avx512f")]
unsafe fn store_tile_strided<const ROWS: usize, const VECS: usize>(
    acc: &[[__m512; VECS]; ROWS],
    tile: Tile,
) {
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

/// Packs `units` 32-bit units of `rn ≤ W` rows whose units are contiguous (row `i` starts
/// `i·row_bytes` bytes after `first`) into `dst[units][W]`, zero-padding rows `rn..W`: a
/// transpose of 8 rows × 16 units at a time in registers.
///
/// # Safety
/// The CPU has AVX-512 F; `units` units from each row `i < rn` are readable; `dst` holds
/// `units·W` units; `W` is a multiple of 8.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose_units<const W: usize>(
    dst: &mut [u32],
    first: *const u8,
    row_bytes: usize,
    rn: usize,
    units: usize,
) {
    let dst = &mut dst[..units * W];
    let out = dst.as_mut_ptr();
    // Picks 128-bit lanes (l0 of a, l0 of b, l1 of a, l1 of b) and the same for l2, l3.
    let low_lanes = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    let high_lanes = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    for g in 0..W / 8 {
        let live_rows = rn.saturating_sub(8 * g).min(8);
        if live_rows == 0 {
            // Rows past the matrix: the padding only.
            for p in 0..units {
                _mm256_storeu_si256(
                    out.add(p * W + 8 * g) as *mut __m256i,
                    _mm256_setzero_si256(),
                );
            }
            continue;
        }
        // Rows past the matrix read nothing: their pointers wrap, their loads are masked off.
        let rows: [*const i32; 8] =
            std::array::from_fn(|i| first.wrapping_add((8 * g + i) * row_bytes) as *const i32);
        for p0 in (0..units).step_by(16) {
            let live = (units - p0).min(16);
            let mask = ((1u32 << live) - 1) as __mmask16;
            let r: [__m512i; 8] = std::array::from_fn(|i| {
                let row_mask = if i < live_rows { mask } else { 0 };
                _mm512_maskz_loadu_epi32(row_mask, rows[i].wrapping_add(p0))
            });
            // Per 128-bit lane l: t = units 4l..4l+4 of two rows interleaved; u, v = unit
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
}

/// `c = a·b` or `c += a·b` with microkernel `K`, on `threads` threads (1: the calling thread).
///
/// # Safety
/// The CPU has `K`'s features; `c` must be valid for writes, touched by no other thread during
/// the call and must not overlap `a` or `b`; shapes must agree and be non-empty.
pub(crate) unsafe fn gemm<K: Microkernel>(
    c: RawMatrix,
    a: View<'_, K::Elem>,
    b: View<'_, K::Elem>,
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
    let run = || blocked::<K>(out, c_rs, c_cs, a, b, accumulate, threads);
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
unsafe fn blocked<K: Microkernel>(
    out: SharedOut,
    c_rs: usize,
    c_cs: usize,
    a: View<'_, K::Elem>,
    b: View<'_, K::Elem>,
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
    let kc_units = K::KC.min(k).div_ceil(K::K_PER_UNIT);
    let mut bbuf = take_buffer(|b| &mut b.b, NC.min(n.div_ceil(NR) * NR) * kc_units);
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let panels = nc.div_ceil(NR);
        let col_groups = if row_blocks >= threads {
            1
        } else {
            panels.min(threads.div_ceil(row_blocks))
        };
        for pc in (0..k).step_by(K::KC) {
            let kc = K::KC.min(k - pc);
            let units = kc.div_ceil(K::K_PER_UNIT);
            let bpack = &mut as_units(&mut bbuf)[..panels * units * NR];
            let pack_b = |(q, dst): (usize, &mut [u32])| {
                let j = q * NR;
                K::pack::<NR>(dst, bsrc, jc + j, NR.min(nc - j), pc, kc)
            };
            if threads > 1 {
                bpack
                    .par_chunks_mut(units * NR)
                    .enumerate()
                    .for_each(pack_b);
            } else {
                bpack.chunks_mut(units * NR).enumerate().for_each(pack_b);
            }
            let bpack = &*bpack;
            let add = accumulate || pc > 0;
            let task = |t: usize| {
                let (rb, g) = (t / col_groups, t % col_groups);
                let (i0, rows) = block_rows(rb);
                let row_panels = rows.div_ceil(MR);
                let mut abuf = take_buffer(|b| &mut b.a, row_panels * units * MR);
                let apack = as_units(&mut abuf);
                for r in 0..row_panels {
                    let i = r * MR;
                    let dst = &mut apack[r * units * MR..(r + 1) * units * MR];
                    K::pack::<MR>(dst, asrc, i0 + i, MR.min(rows - i), pc, kc);
                }
                let per_group = panels.div_ceil(col_groups);
                for q in g * per_group..panels.min((g + 1) * per_group) {
                    let j = q * NR;
                    let bp = bpack.as_ptr().add(q * units * NR);
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
                        K::run_tile(units, apack.as_ptr().add(r * units * MR), bp, tile);
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

/// Packs `a` (`m × k`) into `op` as the left operand of [`multiply_tiles`]: row panels of `MR`
/// rows, each `[units][MR]`, over the whole depth.
///
/// # Safety
/// The CPU has `K`'s features.
pub(crate) unsafe fn pack_lhs<K: Microkernel>(op: &mut TileOperand, a: View<'_, K::Elem>) {
    let (m, k) = a.shape();
    let units = k.div_ceil(K::K_PER_UNIT);
    let panel = units * MR;
    let dst = operand_units(op, m.div_ceil(MR) * panel);
    let src = Source::of(a);
    for (r, dst) in dst.chunks_mut(panel.max(1)).enumerate() {
        K::pack::<MR>(dst, src, r * MR, MR.min(m - r * MR), 0, k);
    }
    (op.rows, op.cols) = (m, k);
}

/// Packs `b` (`k × n`) into `op` as the right operand of [`multiply_tiles`]: column panels of
/// `NR` columns, each `[units][NR]` and 64-byte aligned, over the whole depth.
///
/// # Safety
/// The CPU has `K`'s features.
pub(crate) unsafe fn pack_rhs<K: Microkernel>(op: &mut TileOperand, b: View<'_, K::Elem>) {
    let (k, n) = b.shape();
    let units = k.div_ceil(K::K_PER_UNIT);
    let panel = units * NR;
    let dst = operand_units(op, n.div_ceil(NR) * panel);
    let src = Source::of(b).t();
    for (q, dst) in dst.chunks_mut(panel.max(1)).enumerate() {
        K::pack::<NR>(dst, src, q * NR, NR.min(n - q * NR), 0, k);
    }
    (op.rows, op.cols) = (k, n);
}

/// The first `units` units of `op`'s panels, grown if needed.
fn operand_units(op: &mut TileOperand, units: usize) -> &mut [u32] {
    let lines = units.div_ceil(16);
    if op.panels.len() < lines {
        op.panels.resize(lines, Line([0; 16]));
    }
    &mut as_units(&mut op.panels)[..units]
}

/// `c = a·b` or `c += a·b` on the calling thread, `a` and `b` packed by [`pack_lhs`] and
/// [`pack_rhs`] with the same microkernel: every register tile in one pass over the depth (the
/// blocked GEMM's order when the depth is within one k-block, as the attention tiles' are).
///
/// # Safety
/// The CPU has `K`'s features; every element `c` addresses is valid for reads and writes by
/// this thread alone and overlaps neither operand; the shapes agree.
pub(crate) unsafe fn multiply_tiles<K: Microkernel>(
    c: RawMatrix,
    a: &TileOperand,
    b: &TileOperand,
    accumulate: bool,
) {
    let ((m, k), n) = ((a.rows, a.cols), b.cols);
    debug_assert_eq!((k, c.rows, c.cols), (b.rows, m, n), "tile product shapes");
    let units = k.div_ceil(K::K_PER_UNIT);
    let (a_units, b_units) = (
        a.panels.as_ptr() as *const u32,
        b.panels.as_ptr() as *const u32,
    );
    for q in 0..n.div_ceil(NR) {
        let bp = b_units.add(q * units * NR);
        for r in 0..m.div_ceil(MR) {
            let tile = Tile {
                ptr: c.ptr.add(r * MR * c.row_stride + q * NR * c.col_stride),
                row_stride: c.row_stride,
                col_stride: c.col_stride,
                rows: MR.min(m - r * MR),
                cols: NR.min(n - q * NR),
                add: accumulate,
            };
            K::run_tile(units, a_units.add(r * units * MR), bp, tile);
        }
    }
}
