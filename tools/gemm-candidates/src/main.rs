//! Times f32 `C = A·B` (and `C = Aᵀ·B`, the weight-gradient form) with each candidate GEMM
//! library on this machine, using every core. Run: `cargo run --release` in this folder
//! (needs `libopenblas-dev`). Prints one line per (library, shape) with GFLOP/s.

use std::time::Instant;

extern "C" {
    fn cblas_sgemm(
        layout: i32, trans_a: i32, trans_b: i32, m: i32, n: i32, k: i32, alpha: f32,
        a: *const f32, lda: i32, b: *const f32, ldb: i32, beta: f32, c: *mut f32, ldc: i32,
    );
}

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// One GEMM problem: C[m,n] = op(A)·B with B stored [k,n]; `a_transposed` stores A as [k,m].
struct Shape {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    a_transposed: bool,
}

fn run_gemm_crate(s: &Shape, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    let (a_cs, a_rs) = if s.a_transposed { (s.m as isize, 1) } else { (1, s.k as isize) };
    unsafe {
        gemm::gemm(
            s.m, s.n, s.k, c.as_mut_ptr(), 1, s.n as isize, false, a.as_ptr(), a_cs, a_rs,
            b.as_ptr(), 1, s.n as isize, 0.0, 1.0, false, false, false,
            gemm::Parallelism::Rayon(threads),
        )
    }
}

fn run_faer(s: &Shape, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    use faer::{MatMut, MatRef};
    let lhs = if s.a_transposed {
        MatRef::from_row_major_slice(a, s.k, s.m).transpose()
    } else {
        MatRef::from_row_major_slice(a, s.m, s.k)
    };
    let rhs = MatRef::from_row_major_slice(b, s.k, s.n);
    let dst = MatMut::from_row_major_slice_mut(c, s.m, s.n);
    faer::linalg::matmul::matmul(dst, faer::Accum::Replace, lhs, rhs, 1.0f32, faer::Par::rayon(threads));
}

fn run_matrixmultiply(s: &Shape, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (rsa, csa) = if s.a_transposed { (1, s.m as isize) } else { (s.k as isize, 1) };
    unsafe {
        matrixmultiply::sgemm(
            s.m, s.k, s.n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), s.n as isize, 1, 0.0,
            c.as_mut_ptr(), s.n as isize, 1,
        )
    }
}

fn run_openblas(s: &Shape, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (trans_a, lda) = if s.a_transposed { (TRANS, s.m) } else { (NO_TRANS, s.k) };
    unsafe {
        cblas_sgemm(
            ROW_MAJOR, trans_a, NO_TRANS, s.m as i32, s.n as i32, s.k as i32, 1.0, a.as_ptr(),
            lda as i32, b.as_ptr(), s.n as i32, 0.0, c.as_mut_ptr(), s.n as i32,
        )
    }
}

/// Best-of-repeats GFLOP/s of `f`, after one warm-up call.
fn gflops(s: &Shape, mut f: impl FnMut()) -> f64 {
    f();
    let flops = 2.0 * (s.m * s.k * s.n) as f64;
    let repeats = ((2e10 / flops) as usize).clamp(3, 200);
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    flops / best / 1e9
}

fn main() {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let shapes = [
        Shape { name: "square 512", m: 512, k: 512, n: 512, a_transposed: false },
        Shape { name: "square 1024", m: 1024, k: 1024, n: 1024, a_transposed: false },
        Shape { name: "square 2048", m: 2048, k: 2048, n: 2048, a_transposed: false },
        Shape { name: "tiny qkv 2048x128x256", m: 2048, k: 128, n: 256, a_transposed: false },
        Shape { name: "tiny expert 512x128x512", m: 512, k: 128, n: 512, a_transposed: false },
        Shape { name: "small qkv 4096x512x1024", m: 4096, k: 512, n: 1024, a_transposed: false },
        Shape { name: "small expert 512x512x2048", m: 512, k: 512, n: 2048, a_transposed: false },
        Shape { name: "small logits 4096x512x8192", m: 4096, k: 512, n: 8192, a_transposed: false },
        Shape { name: "small wgrad 512x4096x1024 (Aᵀ)", m: 512, k: 4096, n: 1024, a_transposed: true },
    ];
    println!("threads: {threads}");
    for s in &shapes {
        let a: Vec<f32> = (0..s.m * s.k).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let b: Vec<f32> = (0..s.k * s.n).map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5).collect();
        let mut c = vec![0.0f32; s.m * s.n];
        let g = gflops(s, || run_gemm_crate(s, &a, &b, &mut c, threads));
        let f = gflops(s, || run_faer(s, &a, &b, &mut c, threads));
        let mm = gflops(s, || run_matrixmultiply(s, &a, &b, &mut c));
        let ob = gflops(s, || run_openblas(s, &a, &b, &mut c));
        println!("{:32} gemm {g:6.1}  faer {f:6.1}  matrixmultiply {mm:6.1}  openblas {ob:6.1}  GFLOP/s", s.name);
    }
}
