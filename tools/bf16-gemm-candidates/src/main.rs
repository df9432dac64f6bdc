//! Times `C = op(A)·op(B)` with bf16 inputs, f32 accumulation and f32 output for each candidate
//! bf16 GEMM on this machine, with every core, beside the f32 `gemm` crate (origami's f32 path)
//! and oneDNN's f32 `sgemm` on the same shapes.
//!
//! Run in this folder: `cargo run --release [-- ROUNDS]` (default 7 rounds; needs
//! `libdnnl-dev`; OpenBLAS's `cblas_sbgemm` is measured when the installed `libopenblas0` has
//! it). Each round times every (shape, candidate) once, candidates interleaved, so a slow spell
//! of the shared machine hits all of them; the table gives the median over rounds and the
//! spread (min–max), in GFLOP/s. Every candidate's result is checked against the f32 GEMM of the
//! same (bf16-rounded) inputs before it is timed. First it prints the instruction peak of
//! `vdpbf16ps` and of the f32 FMA on all threads, the roof the GEMMs are measured against.

use origami_kernels::bf16::{to_bf16_vec, to_f32_vec, Bf16};
use origami_kernels::matmul::{matmul, Par, View, ViewMut};
use origami_kernels::matmul_bf16::{matmul_bf16_with, Bf16Kernel};
use rayon::prelude::*;
use std::ffi::{c_char, c_int, c_void};
use std::time::{Duration, Instant};

extern "C" {
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
    // Exported by libdnnl 2.6 (same convention as `dnnl_sgemm`, row-major, bf16 = u16), though
    // Debian 12's `dnnl.h` does not declare it.
    fn dnnl_gemm_bf16bf16f32(
        transa: c_char,
        transb: c_char,
        m: i64,
        n: i64,
        k: i64,
        alpha: f32,
        a: *const u16,
        lda: i64,
        b: *const u16,
        ldb: i64,
        beta: f32,
        c: *mut f32,
        ldc: i64,
    ) -> c_int;
    fn dnnl_get_effective_cpu_isa() -> c_int;
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

/// `cblas_sbgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type Sbgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const u16,
    c_int,
    *const u16,
    c_int,
    f32,
    *mut f32,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;
const RTLD_NOW: c_int = 2;

/// OpenBLAS's `cblas_sbgemm`, if the installed library was built with bf16 support.
fn openblas_sbgemm() -> Result<Sbgemm, &'static str> {
    let lib = c"libopenblas.so.0";
    let handle = unsafe { dlopen(lib.as_ptr(), RTLD_NOW) };
    if handle.is_null() {
        return Err("libopenblas.so.0 not found");
    }
    let f = unsafe { dlsym(handle, c"cblas_sbgemm".as_ptr()) };
    if f.is_null() {
        return Err("libopenblas.so.0 has no cblas_sbgemm (built without BUILD_BFLOAT16)");
    }
    Ok(unsafe { std::mem::transmute::<*mut c_void, Sbgemm>(f) })
}

/// One problem: `C[m,n] = op(A)·op(B)`; `a_t` stores A as `[k,m]`, `b_t` stores B as `[n,k]`.
struct Shape {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
}

impl Shape {
    fn a_view<'a, T>(&self, a: &'a [T]) -> View<'a, T> {
        if self.a_t {
            View::new(a, self.k, self.m).t()
        } else {
            View::new(a, self.m, self.k)
        }
    }
    fn b_view<'a, T>(&self, b: &'a [T]) -> View<'a, T> {
        if self.b_t {
            View::new(b, self.n, self.k).t()
        } else {
            View::new(b, self.k, self.n)
        }
    }
    /// Transpose flags and leading dimensions for the row-major BLAS-style APIs.
    fn blas(&self) -> (bool, i64, bool, i64) {
        let lda = if self.a_t { self.m } else { self.k };
        let ldb = if self.b_t { self.k } else { self.n };
        (self.a_t, lda as i64, self.b_t, ldb as i64)
    }
    fn flops(&self) -> f64 {
        2.0 * (self.m * self.k * self.n) as f64
    }
}

/// The operands in both precisions (the f32 ones are the bf16 values widened, so every
/// candidate multiplies the same numbers).
struct Data {
    a16: Vec<Bf16>,
    b16: Vec<Bf16>,
    a32: Vec<f32>,
    b32: Vec<f32>,
}

#[derive(Clone, Copy, PartialEq)]
enum Candidate {
    GemmF32,
    OneDnnF32,
    OneDnnBf16,
    OpenBlasBf16,
    OrigamiBf16,
}

impl Candidate {
    fn name(self) -> &'static str {
        match self {
            Candidate::GemmF32 => "gemm f32",
            Candidate::OneDnnF32 => "oneDNN f32",
            Candidate::OneDnnBf16 => "oneDNN bf16",
            Candidate::OpenBlasBf16 => "OpenBLAS sbgemm",
            Candidate::OrigamiBf16 => "origami bf16",
        }
    }
}

fn run(cand: Candidate, s: &Shape, d: &Data, c: &mut [f32], sbgemm: Option<Sbgemm>) {
    let (ta, lda, tb, ldb) = s.blas();
    let flag = |t: bool| if t { b'T' as c_char } else { b'N' as c_char };
    let (m, n, k) = (s.m as i64, s.n as i64, s.k as i64);
    match cand {
        Candidate::GemmF32 => matmul(
            ViewMut::new(c, s.m, s.n),
            s.a_view(&d.a32),
            s.b_view(&d.b32),
            false,
            Par::All,
        ),
        Candidate::OrigamiBf16 => matmul_bf16_with(
            Bf16Kernel::Dpbf16,
            ViewMut::new(c, s.m, s.n),
            s.a_view(&d.a16),
            s.b_view(&d.b16),
            false,
            Par::All,
        ),
        Candidate::OneDnnF32 => {
            let st = unsafe {
                dnnl_sgemm(
                    flag(ta),
                    flag(tb),
                    m,
                    n,
                    k,
                    1.0,
                    d.a32.as_ptr(),
                    lda,
                    d.b32.as_ptr(),
                    ldb,
                    0.0,
                    c.as_mut_ptr(),
                    n,
                )
            };
            assert_eq!(st, 0, "dnnl_sgemm failed");
        }
        Candidate::OneDnnBf16 => {
            let st = unsafe {
                dnnl_gemm_bf16bf16f32(
                    flag(ta),
                    flag(tb),
                    m,
                    n,
                    k,
                    1.0,
                    d.a16.as_ptr() as *const u16,
                    lda,
                    d.b16.as_ptr() as *const u16,
                    ldb,
                    0.0,
                    c.as_mut_ptr(),
                    n,
                )
            };
            assert_eq!(st, 0, "dnnl_gemm_bf16bf16f32 failed");
        }
        Candidate::OpenBlasBf16 => {
            let f = sbgemm.expect("sbgemm present");
            let t = |t: bool| if t { TRANS } else { NO_TRANS };
            unsafe {
                f(
                    ROW_MAJOR,
                    t(ta),
                    t(tb),
                    m as c_int,
                    n as c_int,
                    k as c_int,
                    1.0,
                    d.a16.as_ptr() as *const u16,
                    lda as c_int,
                    d.b16.as_ptr() as *const u16,
                    ldb as c_int,
                    0.0,
                    c.as_mut_ptr(),
                    n as c_int,
                )
            }
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

/// The instruction peak: `vdpbf16ps` (64 flops) or `vfmadd231ps` (32 flops) on zmm, 16
/// independent accumulators, on all rayon threads; GFLOP/s of all threads together.
fn peak(bf16: bool) -> f64 {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn spin<const BF16: bool>(iters: usize, seed: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 16];
        let x = _mm512_set1_ps(1e-3 + seed as f32 * 1e-9);
        let xb: __m512bh = std::mem::transmute(x);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = if BF16 {
                    _mm512_dpbf16_ps(*a, xb, xb)
                } else {
                    _mm512_fmadd_ps(x, x, *a)
                };
            }
        }
        let mut sum = _mm512_setzero_ps();
        for a in acc {
            sum = _mm512_add_ps(sum, a);
        }
        _mm512_reduce_add_ps(sum)
    }
    // Many small chunks, so that work stealing gives a busy core less (as for the GEMMs).
    let (chunks, iters) = (32 * rayon::current_num_threads(), 400_000);
    let flops_per = if bf16 { 64.0 } else { 32.0 } * 16.0 * iters as f64;
    let start = Instant::now();
    let sink: f32 = (0..chunks)
        .into_par_iter()
        // black_box: every call must run (identical pure calls could be merged).
        .map(|i| unsafe {
            let (iters, i) = std::hint::black_box((iters, i));
            if bf16 {
                spin::<true>(iters, i)
            } else {
                spin::<false>(iters, i)
            }
        })
        .sum();
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
    let threads = rayon::current_num_threads();
    let isa = unsafe { dnnl_get_effective_cpu_isa() };
    println!(
        "threads: {threads} (rayon), oneDNN effective ISA 0x{isa:x} (0xe7 = avx512_core_bf16)"
    );
    assert!(
        Bf16Kernel::Dpbf16.is_available(),
        "this CPU has no AVX512_BF16"
    );
    let sbgemm = match openblas_sbgemm() {
        Ok(f) => Some(f),
        Err(why) => {
            println!("OpenBLAS sbgemm: not measured: {why}");
            None
        }
    };
    let sh = |name, m, k, n, a_t, b_t| Shape {
        name,
        m,
        k,
        n,
        a_t,
        b_t,
    };
    let shapes = [
        sh("square 512", 512, 512, 512, false, false),
        sh("square 1024", 1024, 1024, 1024, false, false),
        sh("square 2048", 2048, 2048, 2048, false, false),
        sh("tiny qkv 2048x128x256", 2048, 128, 256, false, false),
        sh("tiny expert 512x128x512", 512, 128, 512, false, false),
        sh("small qkv 4096x512x1024", 4096, 512, 1024, false, false),
        sh("small expert 512x512x2048", 512, 512, 2048, false, false),
        sh("small logits 4096x512x8192", 4096, 512, 8192, false, false),
        sh(
            "small wgrad 512x4096x1024 (Aᵀ)",
            512,
            4096,
            1024,
            true,
            false,
        ),
        sh(
            "tiny qkv x·Wᵀ 2048x128x256 (Bᵀ)",
            2048,
            128,
            256,
            false,
            true,
        ),
        sh(
            "tiny expert x·Wᵀ 512x128x512 (Bᵀ)",
            512,
            128,
            512,
            false,
            true,
        ),
        sh(
            "small qkv x·Wᵀ 4096x512x1024 (Bᵀ)",
            4096,
            512,
            1024,
            false,
            true,
        ),
        sh(
            "small expert x·Wᵀ 512x512x2048 (Bᵀ)",
            512,
            512,
            2048,
            false,
            true,
        ),
        sh(
            "small logits x·Wᵀ 4096x512x8192 (Bᵀ)",
            4096,
            512,
            8192,
            false,
            true,
        ),
    ];
    let mut cands = vec![
        Candidate::GemmF32,
        Candidate::OneDnnF32,
        Candidate::OneDnnBf16,
    ];
    if sbgemm.is_some() {
        cands.push(Candidate::OpenBlasBf16);
    }
    cands.push(Candidate::OrigamiBf16);

    let data: Vec<Data> = shapes
        .iter()
        .map(|s| {
            let a: Vec<f32> = (0..s.m * s.k)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let b: Vec<f32> = (0..s.k * s.n)
                .map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let (a16, b16) = (to_bf16_vec(&a), to_bf16_vec(&b));
            let (a32, b32) = (to_f32_vec(&a16), to_f32_vec(&b16));
            Data { a16, b16, a32, b32 }
        })
        .collect();

    // Every candidate must compute the same product (up to f32 summation order).
    for (s, d) in shapes.iter().zip(&data) {
        let mut reference = vec![0.0; s.m * s.n];
        run(Candidate::GemmF32, s, d, &mut reference, sbgemm);
        let scale = reference.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        for &cand in &cands {
            let mut c = vec![f32::NAN; s.m * s.n];
            run(cand, s, d, &mut c, sbgemm);
            let err = c
                .iter()
                .zip(&reference)
                .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                err <= 1e-4 * scale,
                "{} on {}: max error {err} (scale {scale})",
                cand.name(),
                s.name
            );
        }
    }

    println!("load average before: {}", load_average());
    let mut results = vec![vec![Vec::new(); cands.len()]; shapes.len()];
    let (mut bf16_peak, mut f32_peak) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // The roof of this round: a busy machine lowers it and every candidate alike.
        bf16_peak.push(peak(true));
        f32_peak.push(peak(false));
        for (si, (s, d)) in shapes.iter().zip(&data).enumerate() {
            let mut c = vec![0.0; s.m * s.n];
            for (ci, &cand) in cands.iter().enumerate() {
                // Let the previous candidate's threads (rayon or OpenMP) go idle.
                std::thread::sleep(Duration::from_millis(20));
                results[si][ci].push(time(s, || run(cand, s, d, &mut c, sbgemm)));
            }
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }

    println!("load average after: {}", load_average());
    let spread = |v: &mut Vec<f64>| {
        let (lo, hi) = (
            v.iter().cloned().fold(f64::INFINITY, f64::min),
            v.iter().cloned().fold(0.0, f64::max),
        );
        format!("{:.0} ({lo:.0}–{hi:.0})", median(v))
    };
    println!(
        "instruction peak, all threads, per round: vdpbf16ps {} GFLOP/s, f32 FMA {} GFLOP/s",
        spread(&mut bf16_peak),
        spread(&mut f32_peak)
    );
    println!("\nGFLOP/s, median of {rounds} interleaved rounds (min–max)\n");
    let header: Vec<&str> = cands.iter().map(|c| c.name()).collect();
    println!("| shape (m×k×n) | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(cands.len()));
    for (s, per) in shapes.iter().zip(&mut results) {
        let cells: Vec<String> = per.iter_mut().map(spread).collect();
        println!("| {} | {} |", s.name, cells.join(" | "));
    }
}
