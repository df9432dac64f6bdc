//! Times f32 `C = op(A)·op(B)` with each candidate GEMM on this machine: origami's own AVX-512
//! FMA microkernel (`origami_kernels::matmul` with `F32Kernel::Fma512`), the `gemm` crate
//! (origami's portable fallback), faer, matrixmultiply, OpenBLAS and oneDNN, on the shapes the
//! presets run, on every core, and the per-thread products (attention tiles, one expert's GEMM
//! inside the grouped layer) on one thread for those whose thread count can be set per call.
//!
//! Run in this folder: `cargo run --release [-- ROUNDS [FILTER]]` (default 7 rounds, every
//! shape whose name contains FILTER, all by default; needs
//! `libopenblas-dev` and `libdnnl-dev`). Each round first measures the f32 FMA instruction peak
//! (the roof), then times every (shape, candidate) once, candidates interleaved, so a slow
//! spell of the shared machine hits all of them; the table gives the median over rounds and
//! the spread (min–max), GFLOP/s. On a CPU without AVX-512 origami's kernel is left out and the
//! roof is AVX2's. Every candidate's result is checked against the `gemm`
//! crate's before it is timed.

use origami_kernels::matmul::{matmul_with, F32Kernel, Par, View, ViewMut};
use rayon::prelude::*;
use std::ffi::{c_char, c_int};
use std::time::{Duration, Instant};

extern "C" {
    fn cblas_sgemm(
        layout: c_int,
        trans_a: c_int,
        trans_b: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
    fn openblas_set_num_threads(n: c_int);
    fn openblas_get_config() -> *const c_char;
    fn dnnl_sgemm(
        transa: c_char,
        transb: c_char,
        m: i64,
        n: i64,
        k: i64,
        alpha: f32,
        a: *const f32,
        lda: i64,
        b: *const f32,
        ldb: i64,
        beta: f32,
        c: *mut f32,
        ldc: i64,
    ) -> c_int;
}

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// One problem: `C[m,n] = op(A)·op(B)`; `a_t` stores A as `[k,m]`, `b_t` stores B as `[n,k]`;
/// `one_thread` runs it on the calling thread (as inside origami's parallel loops).
struct Shape {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
    one_thread: bool,
}

impl Shape {
    fn a_view<'a>(&self, a: &'a [f32]) -> View<'a> {
        if self.a_t {
            View::new(a, self.k, self.m).t()
        } else {
            View::new(a, self.m, self.k)
        }
    }
    fn b_view<'a>(&self, b: &'a [f32]) -> View<'a> {
        if self.b_t {
            View::new(b, self.n, self.k).t()
        } else {
            View::new(b, self.k, self.n)
        }
    }
    /// Transpose flags and leading dimensions for the row-major BLAS-style APIs.
    fn blas(&self) -> (bool, usize, bool, usize) {
        let lda = if self.a_t { self.m } else { self.k };
        let ldb = if self.b_t { self.k } else { self.n };
        (self.a_t, lda, self.b_t, ldb)
    }
    fn flops(&self) -> f64 {
        2.0 * (self.m * self.k * self.n) as f64
    }
    fn par(&self) -> Par {
        if self.one_thread {
            Par::Seq
        } else {
            Par::All
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Candidate {
    Origami,
    Gemm,
    Faer,
    MatrixMultiply,
    OpenBlas,
    OneDnn,
}

impl Candidate {
    const ALL: [Candidate; 6] = [
        Candidate::Origami,
        Candidate::Gemm,
        Candidate::Faer,
        Candidate::MatrixMultiply,
        Candidate::OpenBlas,
        Candidate::OneDnn,
    ];

    fn name(self) -> &'static str {
        match self {
            Candidate::Origami => "origami fma512",
            Candidate::Gemm => "gemm",
            Candidate::Faer => "faer",
            Candidate::MatrixMultiply => "matrixmultiply",
            Candidate::OpenBlas => "OpenBLAS",
            Candidate::OneDnn => "oneDNN",
        }
    }

    /// Whether it is measured on `s` (on one thread, those whose thread count can be set per
    /// call).
    fn runs(self, s: &Shape) -> bool {
        if self == Candidate::Origami && !F32Kernel::Fma512.is_available() {
            return false;
        }
        !s.one_thread
            || matches!(
                self,
                Candidate::Origami | Candidate::Gemm | Candidate::Faer | Candidate::OpenBlas
            )
    }
}

fn run(cand: Candidate, s: &Shape, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    let (ta, lda, tb, ldb) = s.blas();
    let (m, n, k) = (s.m, s.n, s.k);
    match cand {
        Candidate::Origami | Candidate::Gemm => {
            let kernel = if cand == Candidate::Origami {
                F32Kernel::Fma512
            } else {
                F32Kernel::Portable
            };
            let (av, bv) = (s.a_view(a), s.b_view(b));
            matmul_with(kernel, ViewMut::new(c, m, n), av, bv, false, s.par());
        }
        Candidate::Faer => {
            use faer::{MatMut, MatRef};
            let lhs = if s.a_t {
                MatRef::from_row_major_slice(a, k, m).transpose()
            } else {
                MatRef::from_row_major_slice(a, m, k)
            };
            let rhs = if s.b_t {
                MatRef::from_row_major_slice(b, n, k).transpose()
            } else {
                MatRef::from_row_major_slice(b, k, n)
            };
            let dst = MatMut::from_row_major_slice_mut(c, m, n);
            let par = if s.one_thread {
                faer::Par::Seq
            } else {
                faer::Par::rayon(threads)
            };
            faer::linalg::matmul::matmul(dst, faer::Accum::Replace, lhs, rhs, 1.0f32, par);
        }
        Candidate::MatrixMultiply => {
            let (rsa, csa) = if s.a_t { (1, m) } else { (k, 1) };
            let (rsb, csb) = if s.b_t { (1, k) } else { (n, 1) };
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    rsa as isize,
                    csa as isize,
                    b.as_ptr(),
                    rsb as isize,
                    csb as isize,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        }
        Candidate::OpenBlas => {
            let t = |t: bool| if t { TRANS } else { NO_TRANS };
            unsafe {
                cblas_sgemm(
                    ROW_MAJOR,
                    t(ta),
                    t(tb),
                    m as c_int,
                    n as c_int,
                    k as c_int,
                    1.0,
                    a.as_ptr(),
                    lda as c_int,
                    b.as_ptr(),
                    ldb as c_int,
                    0.0,
                    c.as_mut_ptr(),
                    n as c_int,
                )
            }
        }
        Candidate::OneDnn => {
            let flag = |t: bool| if t { b'T' as c_char } else { b'N' as c_char };
            let st = unsafe {
                dnnl_sgemm(
                    flag(ta),
                    flag(tb),
                    m as i64,
                    n as i64,
                    k as i64,
                    1.0,
                    a.as_ptr(),
                    lda as i64,
                    b.as_ptr(),
                    ldb as i64,
                    0.0,
                    c.as_mut_ptr(),
                    n as i64,
                )
            };
            assert_eq!(st, 0, "dnnl_sgemm failed");
        }
    }
}

/// GFLOP/s of one timed batch: one warm-up call, then calls until 0.15 s have passed.
fn time(s: &Shape, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut calls = 0;
    while calls < 2 || start.elapsed() < Duration::from_millis(150) {
        f();
        calls += 1;
    }
    s.flops() * calls as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// The f32 FMA instruction peak: `vfmadd231ps` on independent accumulators, 16 zmm (32 flops
/// each) where the CPU has AVX-512 F, else 12 ymm (16 flops each, AVX2 + FMA: its 16 registers
/// hold 12 accumulators and the operand without spilling), on `threads` rayon threads (1: the
/// calling thread); GFLOP/s of those threads together.
fn fma_peak(threads: usize) -> f64 {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f")]
    unsafe fn spin512(iters: usize, seed: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 16];
        let x = _mm512_set1_ps(1e-3 + seed as f32 * 1e-9);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(x, x, *a);
            }
        }
        let mut sum = _mm512_setzero_ps();
        for a in acc {
            sum = _mm512_add_ps(sum, a);
        }
        _mm512_reduce_add_ps(sum)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn spin256(iters: usize, seed: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 12];
        let x = _mm256_set1_ps(1e-3 + seed as f32 * 1e-9);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(x, x, *a);
            }
        }
        let sum = acc
            .into_iter()
            .fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, a));
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        lanes.iter().sum()
    }
    let wide = is_x86_feature_detected!("avx512f");
    assert!(
        wide || (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")),
        "this CPU has neither AVX-512 F nor AVX2 with FMA"
    );
    // Many small chunks, so that work stealing gives a busy core less (as for the GEMMs).
    let (chunks, iters) = (32 * threads, 400_000);
    let (lanes, accumulators) = if wide { (16.0, 16.0) } else { (8.0, 12.0) };
    let flops_per = 2.0 * lanes * accumulators * iters as f64;
    // black_box: every call must run (identical pure calls could be merged).
    let one = |i: usize| unsafe {
        let (iters, i) = std::hint::black_box((iters, i));
        if wide {
            spin512(iters, i)
        } else {
            spin256(iters, i)
        }
    };
    let start = Instant::now();
    let sink: f32 = if threads == 1 {
        (0..chunks).map(one).sum()
    } else {
        (0..chunks).into_par_iter().map(one).sum()
    };
    std::hint::black_box(sink);
    flops_per * chunks as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(|_| "?".into(), |s| s.trim().to_string())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let h = v.len() / 2;
    if v.len() % 2 == 1 {
        v[h]
    } else {
        0.5 * (v[h - 1] + v[h])
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(7, |r| r.parse().expect("ROUNDS"));
    let filter = std::env::args().nth(2).unwrap_or_default();
    let threads = rayon::current_num_threads();
    if !F32Kernel::Fma512.is_available() {
        println!("no AVX-512 F and VL here: origami's fma512 is not measured, the roof is AVX2's");
    }
    let config = unsafe { std::ffi::CStr::from_ptr(openblas_get_config()) };
    println!(
        "threads: {threads} (rayon); OpenBLAS {}",
        config.to_string_lossy()
    );
    let sh = |name, m, k, n, a_t, b_t, one_thread| Shape {
        name,
        m,
        k,
        n,
        a_t,
        b_t,
        one_thread,
    };
    #[rustfmt::skip]
    let shapes = [
        sh("square 512", 512, 512, 512, false, false, false),
        sh("square 1024", 1024, 1024, 1024, false, false, false),
        sh("square 2048", 2048, 2048, 2048, false, false, false),
        sh("tiny qkv 2048x128x256", 2048, 128, 256, false, false, false),
        sh("tiny expert 512x128x512", 512, 128, 512, false, false, false),
        sh("small qkv 4096x512x1024", 4096, 512, 1024, false, false, false),
        sh("small expert 512x512x2048", 512, 512, 2048, false, false, false),
        sh("small logits 4096x512x8192", 4096, 512, 8192, false, false, false),
        sh("small wgrad 512x4096x1024 (Aᵀ)", 512, 4096, 1024, true, false, false),
        sh("tiny qkv x·Wᵀ 2048x128x256 (Bᵀ)", 2048, 128, 256, false, true, false),
        sh("tiny expert x·Wᵀ 512x128x512 (Bᵀ)", 512, 128, 512, false, true, false),
        sh("small qkv x·Wᵀ 4096x512x1024 (Bᵀ)", 4096, 512, 1024, false, true, false),
        sh("small expert x·Wᵀ 512x512x2048 (Bᵀ)", 512, 512, 2048, false, true, false),
        sh("small logits x·Wᵀ 4096x512x8192 (Bᵀ)", 4096, 512, 8192, false, true, false),
        sh("1 thread: small expert x·Wᵀ 512x512x2048 (Bᵀ)", 512, 512, 2048, false, true, true),
        sh("1 thread: small expert wgrad 2048x512x512 (Aᵀ)", 2048, 512, 512, true, false, true),
        sh("1 thread: tiny expert x·Wᵀ 128x128x512 (Bᵀ)", 128, 128, 512, false, true, true),
        sh("1 thread: attention q·kᵀ 64x64x64 (Bᵀ)", 64, 64, 64, false, true, true),
        sh("1 thread: attention p·v 64x64x64", 64, 64, 64, false, false, true),
        sh("1 thread: attention pᵀ·dO 64x64x64 (Aᵀ)", 64, 64, 64, true, false, true),
        sh("1 thread: attention q·kᵀ 64x32x64 (Bᵀ)", 64, 32, 64, false, true, true),
    ];
    let shapes: Vec<Shape> = shapes
        .into_iter()
        .filter(|s| s.name.contains(&filter))
        .collect();
    let data: Vec<(Vec<f32>, Vec<f32>)> = shapes
        .iter()
        .map(|s| {
            let a = (0..s.m * s.k)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let b = (0..s.k * s.n)
                .map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            (a, b)
        })
        .collect();

    // Every candidate must compute the same product (up to f32 summation order).
    for (s, (a, b)) in shapes.iter().zip(&data) {
        let mut reference = vec![0.0; s.m * s.n];
        run(Candidate::Gemm, s, a, b, &mut reference, threads);
        let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for cand in Candidate::ALL.into_iter().filter(|c| c.runs(s)) {
            let mut c = vec![f32::NAN; s.m * s.n];
            run(cand, s, a, b, &mut c, threads);
            let err = c
                .iter()
                .zip(&reference)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                err <= 1e-4 * scale,
                "{} on {}: max error {err} (scale {scale})",
                cand.name(),
                s.name
            );
        }
    }

    println!("load average before: {}", load_average());
    let mut results = vec![vec![Vec::new(); Candidate::ALL.len()]; shapes.len()];
    let (mut peak_all, mut peak_one) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // The roof of this round: a busy machine lowers it and every candidate alike.
        peak_all.push(fma_peak(threads));
        peak_one.push(fma_peak(1));
        for (si, (s, (a, b))) in shapes.iter().zip(&data).enumerate() {
            let mut c = vec![0.0; s.m * s.n];
            let blas_threads = if s.one_thread { 1 } else { threads };
            unsafe { openblas_set_num_threads(blas_threads as c_int) };
            for (ci, cand) in Candidate::ALL.into_iter().enumerate() {
                if !cand.runs(s) {
                    continue;
                }
                // Let the previous candidate's threads (rayon, OpenMP or OpenBLAS's) go idle.
                std::thread::sleep(Duration::from_millis(20));
                results[si][ci].push(time(s, || run(cand, s, a, b, &mut c, threads)));
            }
        }
        eprintln!("round {}/{rounds} done, load {}", round + 1, load_average());
    }

    println!("load average after: {}", load_average());
    let spread = |v: &mut Vec<f64>| {
        if v.is_empty() {
            return "—".to_string();
        }
        let (lo, hi) = (
            v.iter().cloned().fold(f64::INFINITY, f64::min),
            v.iter().cloned().fold(0.0, f64::max),
        );
        format!("{:.0} ({lo:.0}–{hi:.0})", median(v))
    };
    println!(
        "f32 FMA instruction peak per round: all threads {} GFLOP/s, one thread {} GFLOP/s",
        spread(&mut peak_all),
        spread(&mut peak_one)
    );
    println!("\nGFLOP/s, median of {rounds} interleaved rounds (min–max)\n");
    let header: Vec<&str> = Candidate::ALL.iter().map(|c| c.name()).collect();
    println!("| shape (m×k×n) | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(Candidate::ALL.len()));
    for (s, per) in shapes.iter().zip(&mut results) {
        let cells: Vec<String> = per.iter_mut().map(spread).collect();
        println!("| {} | {} |", s.name, cells.join(" | "));
    }
}
