//! The CPU's peak for MFU: the best sustained GEMM rate measured on this machine in this run
//! (DESIGN.md §5), in f32 and in bf16 (bf16 inputs, f32 accumulation and output).

use crate::compute::Compute;
use origami_kernels::bf16::Bf16;
use origami_kernels::matmul::{matmul_with, F32Kernel, Par, View, ViewMut};
use origami_kernels::matmul_bf16::{matmul_bf16_with, Bf16Kernel};
use std::time::Instant;

/// Square sizes measured, and timed calls of each.
const SIZES: [usize; 2] = [1024, 2048];
const REPEATS: usize = 4;

/// Best f32 GEMM rate over a few large square products, in GFLOP/s, with the fastest f32 kernel
/// this CPU runs ([`F32Kernel::detect`], whichever kernel the layers were set to), so the peak
/// MFU is measured against rises with the kernel.
pub fn peak_gemm_gflops() -> f64 {
    let kernel = F32Kernel::detect();
    best_rate(|n| {
        let a = vec![0.5f32; n * n];
        let b = vec![0.25f32; n * n];
        let mut c = vec![0.0f32; n * n];
        move || {
            matmul_with(
                kernel,
                ViewMut::new(&mut c, n, n),
                View::new(&a, n, n),
                View::new(&b, n, n),
                false,
                Par::All,
            )
        }
    })
}

/// Best bf16 GEMM rate (the fastest bf16 kernel this CPU runs) over the same products.
pub fn peak_gemm_gflops_bf16() -> f64 {
    let kernel = Bf16Kernel::detect();
    best_rate(|n| {
        let a = vec![Bf16::from_f32(0.5); n * n];
        let b = vec![Bf16::from_f32(0.25); n * n];
        let mut c = vec![0.0f32; n * n];
        move || {
            matmul_bf16_with(
                kernel,
                ViewMut::new(&mut c, n, n),
                View::new(&a, n, n),
                View::new(&b, n, n),
                false,
                Par::All,
            )
        }
    })
}

/// The peak of the precision `compute` trains in.
pub fn peak_gemm_gflops_for(compute: Compute) -> f64 {
    match compute {
        Compute::F32 => peak_gemm_gflops(),
        Compute::Bf16(_) => peak_gemm_gflops_bf16(),
    }
}

/// The best rate of `REPEATS` timed calls of each size's product, made by `product(n)`.
fn best_rate<F: FnMut()>(mut product: impl FnMut(usize) -> F) -> f64 {
    let mut best = 0.0f64;
    for n in SIZES {
        let mut run = product(n);
        for _ in 0..REPEATS {
            let start = Instant::now();
            run();
            let rate = 2.0 * (n * n * n) as f64 / start.elapsed().as_secs_f64() / 1e9;
            best = best.max(rate);
        }
    }
    best
}
