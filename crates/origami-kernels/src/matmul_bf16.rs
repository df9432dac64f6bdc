//! Dense bf16 matrix multiplication with f32 accumulation and f32 output, and the linear layer
//! built on it: the bf16 compute path beside [`crate::matmul`].
//!
//! `C = A·B` (or `C += A·B`) with `A`, `B` bf16 strided views (a transpose is a stride swap) and
//! `C` an f32 view. A product of two bf16 values is exact in f32 (8 × 8 significant bits), so the
//! only rounding after the inputs' own is that of the f32 sums: the result is the f32 GEMM of the
//! bf16 inputs up to the order of summation.
//!
//! Two kernels compute it ([`Bf16Kernel`]): the `vdpbf16ps` microkernel (AVX512_BF16, chosen on
//! measurements, see `docs/kernels.md`) and a portable one that widens the inputs to f32 and
//! calls [`crate::matmul::matmul`]. [`Bf16Kernel::detect`] picks the first where the CPU has
//! it; passing [`Bf16Kernel::Portable`] forces the fallback.
//!
//! Linear layer, PyTorch weight layout `W[out, in]` (bf16 copies of the f32 master weights):
//! forward `y = x·Wᵀ (+ b)`; backward `dx = dy·W` (written, or added), `dW += dyᵀ·x`,
//! `db += Σ_rows dy` (parameters accumulate, activations are written). Outputs and gradients are
//! f32.

use crate::bf16::{to_f32_slice, Bf16};
use crate::matmul::{add_bias, matmul, matmul_raw, LinearGrads, Par, RawMatrix, View, ViewMut};
use crate::tiles::{TileKernel, TileOperand};

/// The implementation behind the bf16 GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// The register-blocked `vdpbf16ps` microkernel; needs AVX-512 F, BW, VL and BF16.
    Dpbf16,
    /// Widen both operands to f32 and run the f32 GEMM; runs everywhere.
    Portable,
}

impl Bf16Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        Self::select(false)
    }

    /// [`Bf16Kernel::Portable`] when `force_portable`, else [`Bf16Kernel::detect`]'s choice.
    pub fn select(force_portable: bool) -> Self {
        if !force_portable && Bf16Kernel::Dpbf16.is_available() {
            Bf16Kernel::Dpbf16
        } else {
            Bf16Kernel::Portable
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Bf16Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Dpbf16 => crate::dpbf16::available(),
            #[cfg(not(target_arch = "x86_64"))]
            Bf16Kernel::Dpbf16 => false,
        }
    }
}

/// `c = a·b`, or `c += a·b` when `accumulate`, with the kernel [`Bf16Kernel::detect`] picks.
/// Shapes must agree (`a: m×k`, `b: k×n`, `c: m×n`).
pub fn matmul_bf16(
    c: ViewMut<'_>,
    a: View<'_, Bf16>,
    b: View<'_, Bf16>,
    accumulate: bool,
    par: Par,
) {
    matmul_bf16_with(Bf16Kernel::detect(), c, a, b, accumulate, par)
}

/// [`matmul_bf16`] with an explicit kernel; panics if this CPU cannot run it.
pub fn matmul_bf16_with(
    kernel: Bf16Kernel,
    c: ViewMut<'_>,
    a: View<'_, Bf16>,
    b: View<'_, Bf16>,
    accumulate: bool,
    par: Par,
) {
    let ((m, k), (kb, n)) = (a.shape(), b.shape());
    assert_eq!(k, kb, "matmul_bf16 inner dimensions differ");
    assert_eq!(c.shape(), (m, n), "matmul_bf16 output shape differs");
    assert!(
        kernel.is_available(),
        "bf16 kernel {kernel:?} does not run on this CPU"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: the f32 GEMM writes the zeros (or leaves C when accumulating).
        matmul(
            c,
            View::new(&[], m, 0),
            View::new(&[], 0, n),
            accumulate,
            par,
        );
        return;
    }
    match kernel {
        Bf16Kernel::Portable => {
            let (a32, b32) = (Widened::of(a), Widened::of(b));
            matmul(c, a32.view(), b32.view(), accumulate, par);
        }
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Dpbf16 => {
            let threads = match par {
                Par::Seq => 1,
                Par::All => rayon::current_num_threads().max(1),
            };
            // SAFETY: the CPU runs the kernel (asserted above), the shapes agree and are
            // non-empty, and `c` is borrowed mutably, so no other thread touches it and it
            // cannot overlap the immutably borrowed inputs.
            unsafe { crate::dpbf16::gemm(c.into_raw(), a, b, accumulate, threads) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Bf16Kernel::Dpbf16 => unreachable!("Dpbf16 is never available off x86_64"),
    }
}

impl TileKernel for Bf16Kernel {
    type Elem = Bf16;

    fn runs_here(self) -> bool {
        self.is_available()
    }

    unsafe fn pack_lhs(self, op: &mut TileOperand, a: View<'_, Bf16>) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Dpbf16 => crate::packed_gemm::pack_lhs::<crate::dpbf16::Dpbf16>(op, a),
            _ => op.set_plain(a, Bf16::to_f32),
        }
    }

    unsafe fn pack_rhs(self, op: &mut TileOperand, b: View<'_, Bf16>) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Dpbf16 => crate::packed_gemm::pack_rhs::<crate::dpbf16::Dpbf16>(op, b),
            _ => op.set_plain(b, Bf16::to_f32),
        }
    }

    /// `c = a·b` or `c += a·b` on the calling thread, both operands prepared by this kernel
    /// (the products of the blockwise attention's tiles; the portable kernel multiplies the
    /// widened copies with the f32 GEMM).
    unsafe fn multiply_tiles(
        self,
        c: RawMatrix,
        a: &TileOperand,
        b: &TileOperand,
        accumulate: bool,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Dpbf16 => {
                crate::packed_gemm::multiply_tiles::<crate::dpbf16::Dpbf16>(c, a, b, accumulate)
            }
            _ => matmul_raw(c, a.plain_view(), b.plain_view(), accumulate),
        }
    }
}

/// A bf16 view widened to f32 with the same strides (the slice it spans, converted).
struct Widened {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl Widened {
    fn of(v: View<'_, Bf16>) -> Self {
        let (rows, cols) = v.shape();
        let (src, row_stride, col_stride) = v.raw();
        let span = (rows - 1) * row_stride + (cols - 1) * col_stride + 1;
        let mut data = vec![0.0; span];
        to_f32_slice(&mut data, &src[..span]);
        Widened {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    fn view(&self) -> View<'_> {
        View::strided(
            &self.data,
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
        )
    }
}

/// Linear forward `y[rows, out] = x[rows, in]·Wᵀ (+ bias)`, with `W` stored `[out, in]`.
pub fn linear_forward_bf16(
    y: &mut [f32],
    x: &[Bf16],
    weight: &[Bf16],
    bias: Option<&[f32]>,
    rows: usize,
    in_features: usize,
    out_features: usize,
    kernel: Bf16Kernel,
    par: Par,
) {
    matmul_bf16_with(
        kernel,
        ViewMut::new(y, rows, out_features),
        View::new(x, rows, in_features),
        View::new(weight, out_features, in_features).t(),
        false,
        par,
    );
    if let Some(bias) = bias {
        add_bias(y, bias, out_features);
    }
}

/// Linear backward for [`linear_forward_bf16`]: `dx = dy·W`, `dW += dyᵀ·x`, `db += Σ dy`
/// (the bf16 `dy` summed in f32; pass no bias gradient to sum an f32 `dy` yourself).
pub fn linear_backward_bf16(
    grads: LinearGrads<'_>,
    dy: &[Bf16],
    x: &[Bf16],
    weight: &[Bf16],
    rows: usize,
    in_features: usize,
    out_features: usize,
    kernel: Bf16Kernel,
    par: Par,
) {
    if let Some(dx) = grads.input {
        matmul_bf16_with(
            kernel,
            ViewMut::new(dx, rows, in_features),
            View::new(dy, rows, out_features),
            View::new(weight, out_features, in_features),
            grads.accumulate_input,
            par,
        );
    }
    if let Some(dw) = grads.weight {
        matmul_bf16_with(
            kernel,
            ViewMut::new(dw, out_features, in_features),
            View::new(dy, rows, out_features).t(),
            View::new(x, rows, in_features),
            true,
            par,
        );
    }
    if let Some(db) = grads.bias {
        for row in dy.chunks(out_features) {
            for (o, v) in db.iter_mut().zip(row) {
                *o += v.to_f32();
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bf16::{to_bf16_vec, to_f32_vec};
    use crate::matmul::{linear_backward, linear_forward};
    use crate::testing::{gamma, random_vec};

    /// Unit roundoff of bf16 (round to nearest).
    const U16: f64 = 1.0 / 256.0;

    /// Every kernel this CPU runs.
    pub(crate) fn kernels() -> Vec<Bf16Kernel> {
        [Bf16Kernel::Dpbf16, Bf16Kernel::Portable]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// Checks `got = c0 (+) a·b` for `a: m×k`, `b: k×n` given as element functions of the
    /// unrounded f32 inputs, element by element, against two bounds:
    ///
    /// 1. the exact product of the bf16-rounded inputs (`ar`, `br`, computed in f64): a bf16
    ///    product is exact in f32, so only the f32 sum of `k` products and `c0` rounds:
    ///    `|got − Σ ar·br − c0| ≤ γ_{k+1}·(|c0| + Σ|ar·br|)`;
    /// 2. the exact product of the unrounded inputs: each input moves by at most `2⁻⁸` of
    ///    itself, so `|ar·br − a·b| ≤ (2·2⁻⁸ + 2⁻¹⁶)·|a·b|`, and with 1. `|got − Σ a·b − c0| ≤
    ///    (2⁻⁷ + 2⁻¹⁶)·Σ|a·b| + γ_{k+1}·(|c0| + (1 + 2⁻⁸)²·Σ|a·b|)`.
    ///
    /// A slack of `2⁻⁴⁰` per term covers the f64 reference itself.
    pub(crate) fn check_product(
        got: &[f32],
        c0: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
        what: &str,
    ) {
        let round = |x: f32| Bf16::from_f32(x).to_f32() as f64;
        let g = gamma(k + 1);
        for i in 0..m {
            for j in 0..n {
                let c0 = c0.map_or(0.0, |c| c[i * n + j] as f64);
                let (mut rounded, mut rounded_abs, mut exact, mut exact_abs) = (c0, 0.0, c0, 0.0);
                for p in 0..k {
                    let (x, y) = (a(i, p), b(p, j));
                    rounded += round(x) * round(y);
                    rounded_abs += (round(x) * round(y)).abs();
                    exact += x as f64 * y as f64;
                    exact_abs += (x as f64 * y as f64).abs();
                }
                let v = got[i * n + j] as f64;
                let slack = (k + 1) as f64 * 2f64.powi(-40);
                let bound1 = g * (c0.abs() + rounded_abs) + slack;
                assert!(
                    (v - rounded).abs() <= bound1,
                    "{what}[{i},{j}] (m {m} k {k} n {n}): {v} vs rounded-input product \
                     {rounded} (bound {bound1:e})"
                );
                let input = 2.0 * U16 + U16 * U16;
                let bound2 = input * exact_abs
                    + g * (c0.abs() + (1.0 + U16) * (1.0 + U16) * exact_abs)
                    + slack;
                assert!(
                    (v - exact).abs() <= bound2,
                    "{what}[{i},{j}]: {v} vs unrounded product {exact} (bound {bound2:e})"
                );
            }
        }
    }

    /// A matrix stored row-major, or transposed (stored as its transpose, read through `t()`).
    struct Operand {
        f32s: Vec<f32>,
        bf16s: Vec<Bf16>,
        rows: usize,
        cols: usize,
        transposed: bool,
    }

    impl Operand {
        fn random(rows: usize, cols: usize, transposed: bool, seed: u64) -> Self {
            let f32s = random_vec(rows * cols, seed);
            let bf16s = to_bf16_vec(&f32s);
            Operand {
                f32s,
                bf16s,
                rows,
                cols,
                transposed,
            }
        }

        fn view(&self) -> View<'_, Bf16> {
            if self.transposed {
                View::new(&self.bf16s, self.cols, self.rows).t()
            } else {
                View::new(&self.bf16s, self.rows, self.cols)
            }
        }

        fn at(&self, i: usize, j: usize) -> f32 {
            if self.transposed {
                self.f32s[j * self.rows + i]
            } else {
                self.f32s[i * self.cols + j]
            }
        }
    }

    /// Shapes around the tile (8 × 48), the k-block (512), the 16-pair transpose of the packer,
    /// the row (384) and column (3072) blocks, and the last two above the size from which a
    /// call uses every thread (split by rows, and by columns when there is one row block).
    const SHAPES: [(usize, usize, usize); 12] = [
        (1, 1, 1),
        (7, 5, 9),
        (8, 2, 48),
        (9, 3, 49),
        (16, 64, 96),
        (13, 97, 47),
        (31, 1025, 100),
        (200, 33, 17),
        (389, 12, 33),
        (3, 7, 3100),
        (100, 701, 130),
        (5, 1100, 1601),
    ];

    #[test]
    fn matches_f32_for_all_transposes_and_odd_sizes() {
        for kernel in kernels() {
            for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
                for (t, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)]
                    .into_iter()
                    .enumerate()
                {
                    let seed = 10 * (s * 4 + t) as u64;
                    let a = Operand::random(m, k, ta, seed);
                    let b = Operand::random(k, n, tb, seed + 1);
                    for (accumulate, par) in [(false, Par::All), (true, Par::Seq)] {
                        let c0 = random_vec(m * n, seed + 2);
                        let mut c = c0.clone();
                        let cv = ViewMut::new(&mut c, m, n);
                        matmul_bf16_with(kernel, cv, a.view(), b.view(), accumulate, par);
                        let what = format!("{kernel:?} ta {ta} tb {tb} acc {accumulate}");
                        let c0 = accumulate.then_some(&c0[..]);
                        check_product(&c, c0, m, k, n, |i, p| a.at(i, p), |p, j| b.at(p, j), &what);
                    }
                }
            }
        }
    }

    #[test]
    fn strided_output_and_empty_shapes() {
        for kernel in kernels() {
            // C written through its transpose (column stride ≠ 1), inside a wider buffer.
            let (m, k, n) = (11, 21, 53);
            let a = Operand::random(m, k, false, 1);
            let b = Operand::random(k, n, true, 2);
            let mut ct = vec![5.0; n * (m + 3)];
            let cv = ViewMut::strided(&mut ct, n, m, m + 3, 1).t();
            matmul_bf16_with(kernel, cv, a.view(), b.view(), false, Par::All);
            let c: Vec<f32> = (0..m * n)
                .map(|idx| ct[(idx % n) * (m + 3) + idx / n])
                .collect();
            check_product(
                &c,
                None,
                m,
                k,
                n,
                |i, p| a.at(i, p),
                |p, j| b.at(p, j),
                "strided",
            );
            assert!((0..n).all(|j| ct[j * (m + 3) + m..(j + 1) * (m + 3)] == [5.0; 3]));

            // k = 0 writes zeros (or leaves C), m = 0 and n = 0 do nothing.
            let mut c = vec![1.0; 6];
            let (a0, b0) = (View::<Bf16>::new(&[], 2, 0), View::<Bf16>::new(&[], 0, 3));
            matmul_bf16_with(kernel, ViewMut::new(&mut c, 2, 3), a0, b0, true, Par::All);
            assert_eq!(c, vec![1.0; 6]);
            matmul_bf16_with(kernel, ViewMut::new(&mut c, 2, 3), a0, b0, false, Par::All);
            assert_eq!(c, vec![0.0; 6]);
            let b = to_bf16_vec(&random_vec(12, 3));
            let (a0, bv) = (View::<Bf16>::new(&[], 0, 4), View::new(&b, 4, 3));
            matmul_bf16_with(kernel, ViewMut::new(&mut [], 0, 3), a0, bv, false, Par::All);
        }
    }

    #[test]
    fn kernels_agree_within_twice_the_summation_bound() {
        let kernels = kernels();
        let (m, k, n) = (67, 300, 131);
        let a = Operand::random(m, k, false, 4);
        let b = Operand::random(k, n, true, 5);
        let results: Vec<Vec<f32>> = kernels
            .iter()
            .map(|&kernel| {
                let mut c = vec![0.0; m * n];
                let cv = ViewMut::new(&mut c, m, n);
                matmul_bf16_with(kernel, cv, a.view(), b.view(), false, Par::All);
                c
            })
            .collect();
        // Both are within γ_{k+1}·Σ|ar·br| of the same exact value, so within twice that of
        // each other; Σ|ar·br| ≤ k here (|inputs| ≤ 1).
        let bound = 2.0 * gamma(k + 1) * k as f64;
        for r in &results[1..] {
            for (x, y) in r.iter().zip(&results[0]) {
                assert!(((x - y) as f64).abs() <= bound, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn linear_matches_f32_linear_of_rounded_inputs() {
        let (rows, inf, outf) = (37, 70, 53);
        let x = to_bf16_vec(&random_vec(rows * inf, 6));
        let w = to_bf16_vec(&random_vec(outf * inf, 7));
        let dy = to_bf16_vec(&random_vec(rows * outf, 8));
        let bias = random_vec(outf, 9);
        let (x32, w32, dy32) = (to_f32_vec(&x), to_f32_vec(&w), to_f32_vec(&dy));
        for kernel in kernels() {
            let mut y = vec![0.0; rows * outf];
            linear_forward_bf16(
                &mut y,
                &x,
                &w,
                Some(&bias),
                rows,
                inf,
                outf,
                kernel,
                Par::All,
            );
            let mut y32 = vec![0.0; rows * outf];
            linear_forward(&mut y32, &x32, &w32, Some(&bias), rows, inf, outf, Par::All);
            // Both sum the same exact products in f32: within 2·γ of Σ|products| + |bias|.
            let close = |got: &[f32], want: &[f32], terms: usize, what: &str| {
                let bound = 2.0 * gamma(terms + 1) * (terms + 2) as f64;
                for (i, (g, e)) in got.iter().zip(want).enumerate() {
                    assert!(((g - e) as f64).abs() <= bound, "{what}[{i}]: {g} vs {e}");
                }
            };
            close(&y, &y32, inf, "linear y");

            let (mut dx, mut dw, mut db) =
                (vec![0.0; rows * inf], vec![0.5; outf * inf], bias.clone());
            let (mut dx32, mut dw32, mut db32) = (dx.clone(), dw.clone(), db.clone());
            let grads = LinearGrads {
                input: Some(&mut dx),
                accumulate_input: false,
                weight: Some(&mut dw),
                bias: Some(&mut db),
            };
            linear_backward_bf16(grads, &dy, &x, &w, rows, inf, outf, kernel, Par::All);
            let grads32 = LinearGrads {
                input: Some(&mut dx32),
                accumulate_input: false,
                weight: Some(&mut dw32),
                bias: Some(&mut db32),
            };
            linear_backward(grads32, &dy32, &x32, &w32, rows, inf, outf, Par::All);
            close(&dx, &dx32, outf, "linear dx");
            close(&dw, &dw32, rows, "linear dw");
            assert_eq!(db, db32, "linear db");
        }
    }
}
