//! Dense matrix multiplication on strided views, and the linear layer built on it.
//!
//! `C = A·B` (or `C += A·B`) where each operand is a view with its own row and column strides,
//! so transposes cost nothing: `view.t()` swaps the strides. Two kernels compute it
//! ([`F32Kernel`]): origami's AVX-512 FMA microkernel (`fma512.rs`, chosen on measurements on
//! this CPU, see `docs/kernels.md`) and the `gemm` crate, the portable fallback (this is the
//! only place that depends on it). They differ only in the order of the f32 sums.
//! [`F32Kernel::detect`] picks the first the CPU runs; [`matmul`] uses the process-wide
//! [`F32Kernel::current`] (detected, unless [`F32Kernel::set_current`] chose), and
//! [`matmul_with`] an explicit one.
//!
//! Linear layer, PyTorch weight layout `W[out, in]`:
//! forward `y = x·Wᵀ (+ b)`; backward `dx = dy·W` (written, or added), `dW += dyᵀ·x`,
//! `db += Σ_rows dy` (parameters accumulate, activations are written).

use crate::tiles::{TileKernel, TileOperand};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// How many threads a kernel call may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// Run on the calling thread (used inside an outer parallel loop).
    Seq,
    /// Use every thread of the current rayon pool.
    All,
}

impl Par {
    /// Threads a call may use.
    fn threads(self) -> usize {
        match self {
            Par::Seq => 1,
            Par::All => rayon::current_num_threads().max(1),
        }
    }

    fn to_gemm(self) -> gemm::Parallelism {
        match self {
            Par::Seq => gemm::Parallelism::None,
            Par::All => match rayon::current_num_threads() {
                0 | 1 => gemm::Parallelism::None,
                n => gemm::Parallelism::Rayon(n),
            },
        }
    }
}

/// The implementation behind the f32 GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Kernel {
    /// origami's register-blocked FMA microkernel; needs AVX-512 F and VL.
    Fma512,
    /// The `gemm` crate; runs everywhere.
    Portable,
}

/// [`F32Kernel::current`]: 0 until first read or set, then 1 + the kernel's index.
static CURRENT: AtomicU8 = AtomicU8::new(0);

impl F32Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        Self::select(false)
    }

    /// [`F32Kernel::Portable`] when `force_portable`, else [`F32Kernel::detect`]'s choice.
    pub fn select(force_portable: bool) -> Self {
        if !force_portable && F32Kernel::Fma512.is_available() {
            F32Kernel::Fma512
        } else {
            F32Kernel::Portable
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            F32Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Fma512 => crate::fma512::available(),
            #[cfg(not(target_arch = "x86_64"))]
            F32Kernel::Fma512 => false,
        }
    }

    /// Whether each row of `C` comes out the same whatever the other rows of `A`: every element
    /// summed in one fixed order (`Fma512`). The `gemm` crate's order for a transposed `B`
    /// depends on the number of rows (the router's logits of 6 tokens and of 48 differ in the
    /// last bit), so a layout that splits the rows over ranks agrees with one rank only to f32
    /// rounding, and a bf16 rounding after it may land on the neighbouring bf16 value.
    pub fn rows_independent(self) -> bool {
        match self {
            F32Kernel::Fma512 => true,
            F32Kernel::Portable => false,
        }
    }

    /// The kernel [`matmul`] runs (and every layer and kernel built on it): the one
    /// [`F32Kernel::set_current`] chose, else [`F32Kernel::detect`]'s.
    pub fn current() -> Self {
        match CURRENT.load(Ordering::Relaxed) {
            1 => F32Kernel::Fma512,
            2 => F32Kernel::Portable,
            _ => {
                let detected = Self::detect();
                CURRENT.store(detected.code(), Ordering::Relaxed);
                detected
            }
        }
    }

    /// Makes `kernel` the one [`matmul`] runs from now on, process-wide (e.g.
    /// `F32Kernel::select(true)` to force the fallback); panics if this CPU cannot run it.
    pub fn set_current(kernel: Self) {
        assert!(
            kernel.is_available(),
            "f32 kernel {kernel:?} does not run on this CPU"
        );
        CURRENT.store(kernel.code(), Ordering::Relaxed);
    }

    fn code(self) -> u8 {
        match self {
            F32Kernel::Fma512 => 1,
            F32Kernel::Portable => 2,
        }
    }
}

impl TileKernel for F32Kernel {
    type Elem = f32;

    fn runs_here(self) -> bool {
        self.is_available()
    }

    unsafe fn pack_lhs(self, op: &mut TileOperand, a: View<'_>) {
        match self {
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Fma512 => crate::packed_gemm::pack_lhs::<crate::fma512::Fma512>(op, a),
            _ => op.set_plain(a, |x| x),
        }
    }

    unsafe fn pack_rhs(self, op: &mut TileOperand, b: View<'_>) {
        match self {
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Fma512 => crate::packed_gemm::pack_rhs::<crate::fma512::Fma512>(op, b),
            _ => op.set_plain(b, |x| x),
        }
    }

    /// `c = a·b` or `c += a·b` on the calling thread, both operands prepared by this kernel
    /// (the products of the blockwise attention's tiles; the portable kernel multiplies the
    /// copies).
    unsafe fn multiply_tiles(
        self,
        c: RawMatrix,
        a: &TileOperand,
        b: &TileOperand,
        accumulate: bool,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Fma512 => {
                crate::packed_gemm::multiply_tiles::<crate::fma512::Fma512>(c, a, b, accumulate)
            }
            _ => product_into(
                self,
                c,
                a.plain_view(),
                b.plain_view(),
                accumulate,
                Par::Seq,
            ),
        }
    }

    /// The portable kernel reads the left operand where it lies (its GEMM takes any strides);
    /// the microkernel packs it first.
    unsafe fn multiply_once(
        self,
        c: RawMatrix,
        scratch: &mut TileOperand,
        a: View<'_>,
        b: &TileOperand,
        accumulate: bool,
    ) {
        match self {
            F32Kernel::Portable => product_into(self, c, a, b.plain_view(), accumulate, Par::Seq),
            F32Kernel::Fma512 => {
                self.pack_lhs(scratch, a);
                self.multiply_tiles(c, scratch, b, accumulate);
            }
        }
    }
}

/// A read-only matrix view over a slice, with element `(i, j)` at `i·row_stride + j·col_stride`.
/// The element type is `f32` unless named (the bf16 GEMM reads `View<'_, Bf16>`).
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T = f32> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> View<'a, T> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit strides; panics if the last element lies outside `data`.
    pub fn strided(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        assert_fits(data.len(), rows, cols, row_stride, col_stride);
        View {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// The transposed view (no data moves).
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows and columns.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The underlying slice and the row and column strides.
    pub(crate) fn raw(&self) -> (&'a [T], usize, usize) {
        (self.data, self.row_stride, self.col_stride)
    }
}

/// A mutable matrix view, laid out like [`View`].
#[derive(Debug)]
pub struct ViewMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> ViewMut<'a> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit strides; panics if the last element lies outside `data`.
    pub fn strided(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        assert_fits(data.len(), rows, cols, row_stride, col_stride);
        ViewMut {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// The transposed view (no data moves).
    pub fn t(self) -> Self {
        ViewMut {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows and columns.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The output as a raw matrix, for kernels that split it over threads.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn into_raw(self) -> RawMatrix {
        RawMatrix {
            ptr: self.data.as_mut_ptr(),
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

fn assert_fits(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) {
    if rows > 0 && cols > 0 {
        let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
        assert!(
            last < len,
            "matrix view {rows}x{cols} (strides {row_stride},{col_stride}) exceeds slice of {len}"
        );
    }
}

/// `c = a·b`, or `c += a·b` when `accumulate`, with [`F32Kernel::current`]. Shapes must agree
/// (`a: m×k`, `b: k×n`, `c: m×n`).
pub fn matmul(c: ViewMut<'_>, a: View<'_>, b: View<'_>, accumulate: bool, par: Par) {
    matmul_with(F32Kernel::current(), c, a, b, accumulate, par)
}

/// [`matmul`] with an explicit kernel; panics if this CPU cannot run it.
pub fn matmul_with(
    kernel: F32Kernel,
    c: ViewMut<'_>,
    a: View<'_>,
    b: View<'_>,
    accumulate: bool,
    par: Par,
) {
    assert_eq!(a.cols, b.rows, "matmul inner dimensions differ");
    assert_eq!(
        (c.rows, c.cols),
        (a.rows, b.cols),
        "matmul output shape differs"
    );
    assert!(
        kernel.is_available(),
        "f32 kernel {kernel:?} does not run on this CPU"
    );
    let (m, n, k) = (c.rows, c.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c.data[i * c.row_stride + j * c.col_stride] = 0.0;
                }
            }
        }
        return;
    }
    let out = RawMatrix {
        ptr: c.data.as_mut_ptr(),
        rows: m,
        cols: n,
        row_stride: c.row_stride,
        col_stride: c.col_stride,
    };
    // SAFETY: the views were checked at construction to hold every element they address, the
    // output is borrowed mutably, and the inputs immutably, so they cannot overlap it; the CPU
    // runs the kernel (asserted above); the shapes agree and are non-empty.
    unsafe { product_into(kernel, out, a, b, accumulate, par) }
}

/// A matrix addressed by raw pointer, for kernels whose parallel tasks write interleaved but
/// disjoint elements of one buffer (e.g. attention heads inside a fused qkv gradient).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawMatrix {
    pub ptr: *mut f32,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `c = a·b` or `c += a·b` into a raw output, on the calling thread, with
/// [`F32Kernel::current`].
///
/// # Safety
/// Every element `c` addresses must be valid for writes and touched by no other thread during
/// the call, and must not overlap `a` or `b`.
pub(crate) unsafe fn matmul_raw(c: RawMatrix, a: View<'_>, b: View<'_>, accumulate: bool) {
    assert_eq!(a.cols, b.rows, "matmul inner dimensions differ");
    assert_eq!(
        (c.rows, c.cols),
        (a.rows, b.cols),
        "matmul output shape differs"
    );
    if c.rows == 0 || c.cols == 0 || a.cols == 0 {
        assert!(
            accumulate || c.rows == 0 || c.cols == 0,
            "matmul_raw needs k > 0 to overwrite"
        );
        return;
    }
    product_into(F32Kernel::current(), c, a, b, accumulate, Par::Seq)
}

/// The one call into a GEMM kernel: `c = a·b` (or `c += a·b`), shapes already checked and
/// non-empty.
///
/// # Safety
/// As for [`matmul_raw`]; the CPU runs `kernel`.
unsafe fn product_into(
    kernel: F32Kernel,
    c: RawMatrix,
    a: View<'_>,
    b: View<'_>,
    accumulate: bool,
    par: Par,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        F32Kernel::Fma512 => crate::fma512::gemm(c, a, b, accumulate, par.threads()),
        #[cfg(not(target_arch = "x86_64"))]
        F32Kernel::Fma512 => unreachable!("Fma512 is never available off x86_64"),
        F32Kernel::Portable => gemm::gemm(
            c.rows,
            c.cols,
            a.cols,
            c.ptr,
            c.col_stride as isize,
            c.row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par.to_gemm(),
        ),
    }
}

/// Linear forward `y[rows, out] = x[rows, in]·Wᵀ (+ bias)`, with `W` stored `[out, in]`.
pub fn linear_forward(
    y: &mut [f32],
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    in_features: usize,
    out_features: usize,
    par: Par,
) {
    matmul(
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

pub(crate) fn add_bias(y: &mut [f32], bias: &[f32], width: usize) {
    y.par_chunks_mut(width * 64).for_each(|rows| {
        for row in rows.chunks_mut(width) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// Gradients a linear backward produces; `None` skips that gradient.
pub struct LinearGrads<'a> {
    /// Input gradient `dx[rows, in]`.
    pub input: Option<&'a mut [f32]>,
    /// Whether `dx` is added to (`true`, e.g. on a residual path) or overwritten.
    pub accumulate_input: bool,
    /// Weight gradient `dW[out, in]`, always accumulated.
    pub weight: Option<&'a mut [f32]>,
    /// Bias gradient `db[out]`, always accumulated.
    pub bias: Option<&'a mut [f32]>,
}

/// Linear backward for [`linear_forward`]: `dx = dy·W`, `dW += dyᵀ·x`, `db += Σ dy`.
pub fn linear_backward(
    grads: LinearGrads<'_>,
    dy: &[f32],
    x: &[f32],
    weight: &[f32],
    rows: usize,
    in_features: usize,
    out_features: usize,
    par: Par,
) {
    if let Some(dx) = grads.input {
        matmul(
            ViewMut::new(dx, rows, in_features),
            View::new(dy, rows, out_features),
            View::new(weight, out_features, in_features),
            grads.accumulate_input,
            par,
        );
    }
    if let Some(dw) = grads.weight {
        matmul(
            ViewMut::new(dw, out_features, in_features),
            View::new(dy, rows, out_features).t(),
            View::new(x, rows, in_features),
            true,
            par,
        );
    }
    if let Some(db) = grads.bias {
        column_sums_into(db, dy, out_features);
    }
}

/// `out[j] += Σ_i m[i, j]` for a row-major matrix of width `width`.
pub fn column_sums_into(out: &mut [f32], m: &[f32], width: usize) {
    for row in m.chunks(width) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradient, gamma, random_vec};

    /// Every kernel this CPU runs.
    fn kernels() -> Vec<F32Kernel> {
        [F32Kernel::Fma512, F32Kernel::Portable]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// Checks `got = c0 (+) a·b` for `a: m×k`, `b: k×n` given as element functions, element by
    /// element, against the exact product (in f64, where a product of two f32 is exact): the
    /// kernel sums `k` products and `c0` in f32, some order of FMAs and additions, each term
    /// rounded at most `k + 1` times, so `|got − Σ a·b − c0| ≤ γ_{k+1}·(|c0| + Σ|a·b|)`. A
    /// slack of `2⁻⁴⁰` per term covers the f64 reference itself.
    fn check_product(
        got: &[f32],
        c0: Option<&[f32]>,
        (m, k, n): (usize, usize, usize),
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
        what: &str,
    ) {
        let g = gamma(k + 1);
        for i in 0..m {
            for j in 0..n {
                let c0 = c0.map_or(0.0, |c| c[i * n + j] as f64);
                let (mut exact, mut magnitude) = (c0, c0.abs());
                for p in 0..k {
                    let product = a(i, p) as f64 * b(p, j) as f64;
                    exact += product;
                    magnitude += product.abs();
                }
                let v = got[i * n + j] as f64;
                let bound = g * magnitude + (k + 1) as f64 * 2f64.powi(-40);
                assert!(
                    (v - exact).abs() <= bound,
                    "{what}[{i},{j}] (m {m} k {k} n {n}): {v} vs exact {exact} (bound {bound:e})"
                );
            }
        }
    }

    /// A matrix stored row-major, or transposed (stored as its transpose, read through `t()`).
    struct Operand {
        data: Vec<f32>,
        rows: usize,
        cols: usize,
        transposed: bool,
    }

    impl Operand {
        fn random(rows: usize, cols: usize, transposed: bool, seed: u64) -> Self {
            Operand {
                data: random_vec(rows * cols, seed),
                rows,
                cols,
                transposed,
            }
        }

        fn view(&self) -> View<'_> {
            if self.transposed {
                View::new(&self.data, self.cols, self.rows).t()
            } else {
                View::new(&self.data, self.rows, self.cols)
            }
        }

        fn at(&self, i: usize, j: usize) -> f32 {
            if self.transposed {
                self.data[j * self.rows + i]
            } else {
                self.data[i * self.cols + j]
            }
        }
    }

    /// Shapes around the tile (8 × 48, every edge of 1–7 rows and 1–47 columns), the 16-wide
    /// transpose of the packer, the k-block (512 in f32: k = 511, 512, 513, 1025), the row
    /// (384) and column (3072) blocks, and the last three above the size from which a call
    /// uses every thread (split by rows, by rows with a ragged last block, and by columns when
    /// there is one row block).
    const SHAPES: [(usize, usize, usize); 15] = [
        (1, 1, 1),
        (7, 5, 9),
        (8, 2, 48),
        (9, 3, 49),
        (16, 64, 96),
        (13, 97, 47),
        (6, 511, 20),
        (10, 512, 50),
        (15, 513, 95),
        (31, 1025, 100),
        (200, 33, 17),
        (389, 12, 33),
        (3, 7, 3100),
        (100, 701, 130),
        (5, 1100, 1601),
    ];

    #[test]
    fn matches_f64_reference_for_all_transposes_and_odd_sizes() {
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
                        matmul_with(kernel, cv, a.view(), b.view(), accumulate, par);
                        let what = format!("{kernel:?} ta {ta} tb {tb} acc {accumulate}");
                        let c0 = accumulate.then_some(&c0[..]);
                        let (at, bt) = (|i, p| a.at(i, p), |p, j| b.at(p, j));
                        check_product(&c, c0, (m, k, n), at, bt, &what);
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
            for accumulate in [false, true] {
                let mut ct = vec![5.0; n * (m + 3)];
                let cv = ViewMut::strided(&mut ct, n, m, m + 3, 1).t();
                matmul_with(kernel, cv, a.view(), b.view(), accumulate, Par::All);
                let c: Vec<f32> = (0..m * n)
                    .map(|idx| ct[(idx % n) * (m + 3) + idx / n])
                    .collect();
                let c0 = vec![5.0; m * n];
                let c0 = accumulate.then_some(&c0[..]);
                let (at, bt) = (|i, p| a.at(i, p), |p, j| b.at(p, j));
                check_product(&c, c0, (m, k, n), at, bt, &format!("{kernel:?} strided"));
                assert!((0..n).all(|j| ct[j * (m + 3) + m..(j + 1) * (m + 3)] == [5.0; 3]));
            }

            // k = 0 writes zeros (or leaves C), m = 0 and n = 0 do nothing.
            let mut c = vec![1.0; 6];
            let (a0, b0) = (View::new(&[], 2, 0), View::new(&[], 0, 3));
            matmul_with(kernel, ViewMut::new(&mut c, 2, 3), a0, b0, true, Par::All);
            assert_eq!(c, vec![1.0; 6]);
            matmul_with(kernel, ViewMut::new(&mut c, 2, 3), a0, b0, false, Par::All);
            assert_eq!(c, vec![0.0; 6]);
            let b = random_vec(12, 3);
            let (a0, bv) = (View::new(&[], 0, 4), View::new(&b, 4, 3));
            matmul_with(kernel, ViewMut::new(&mut [], 0, 3), a0, bv, false, Par::All);
            let a = random_vec(8, 4);
            let (av, b0) = (View::new(&a, 2, 4), View::new(&[], 4, 0));
            matmul_with(kernel, ViewMut::new(&mut [], 2, 0), av, b0, false, Par::All);
        }
    }

    #[test]
    fn one_and_two_threads_give_identical_results() {
        // Each element of C is summed by one task in a fixed order, whatever the thread count;
        // the shapes are above the size from which a call splits, by rows and by columns.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for (m, k, n) in [(389, 600, 70), (9, 1100, 1700)] {
            let a = Operand::random(m, k, false, 7);
            let b = Operand::random(k, n, true, 8);
            let run = |par: Par| {
                let mut c = random_vec(m * n, 9);
                let cv = ViewMut::new(&mut c, m, n);
                pool.install(|| matmul_with(F32Kernel::Fma512, cv, a.view(), b.view(), true, par));
                c
            };
            if F32Kernel::Fma512.is_available() {
                assert!(run(Par::Seq) == run(Par::All), "{m}x{k}x{n}");
            }
        }
    }

    #[test]
    fn kernels_with_independent_rows_compute_a_row_block_as_the_whole() {
        // The claim of `rows_independent`: the rows of a product of 6, 12 or 24 rows are bit for
        // bit those rows of the 48-row product, for both layouts of B and across the k-block.
        for kernel in kernels().into_iter().filter(|k| k.rows_independent()) {
            for (k, n, transposed) in [(16, 8, true), (16, 8, false), (700, 50, true)] {
                let a = random_vec(48 * k, 11);
                let b = Operand::random(k, n, transposed, 12);
                let product = |rows: &[f32], m: usize| {
                    let mut c = vec![0.0; m * n];
                    let (cv, av) = (ViewMut::new(&mut c, m, n), View::new(rows, m, k));
                    matmul_with(kernel, cv, av, b.view(), false, Par::All);
                    c
                };
                let whole = product(&a, 48);
                for m in [6, 12, 24] {
                    for start in (0..48).step_by(m) {
                        let part = product(&a[start * k..(start + m) * k], m);
                        assert!(
                            part[..] == whole[start * n..(start + m) * n],
                            "{kernel:?} k {k} n {n} Bᵀ {transposed}: rows {start}.. of {m}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kernels_agree_within_twice_the_summation_bound() {
        let kernels = kernels();
        let (m, k, n) = (67, 700, 131);
        let a = Operand::random(m, k, false, 4);
        let b = Operand::random(k, n, true, 5);
        let results: Vec<Vec<f32>> = kernels
            .iter()
            .map(|&kernel| {
                let mut c = vec![0.0; m * n];
                let cv = ViewMut::new(&mut c, m, n);
                matmul_with(kernel, cv, a.view(), b.view(), false, Par::All);
                c
            })
            .collect();
        // Both are within γ_{k+1}·Σ|a·b| of the same exact value, so within twice that of each
        // other; Σ|a·b| ≤ k here (|inputs| ≤ 1).
        let bound = 2.0 * gamma(k + 1) * k as f64;
        for r in &results[1..] {
            for (x, y) in r.iter().zip(&results[0]) {
                assert!(((x - y) as f64).abs() <= bound, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn selection_prefers_the_microkernel_and_can_be_forced_portable() {
        assert_eq!(F32Kernel::select(true), F32Kernel::Portable);
        let detected = F32Kernel::detect();
        assert!(detected.is_available());
        assert_eq!(
            detected == F32Kernel::Fma512,
            F32Kernel::Fma512.is_available()
        );
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        let (rows, inf, outf) = (5, 4, 3);
        let x = random_vec(rows * inf, 4);
        let w = random_vec(outf * inf, 5);
        let b = random_vec(outf, 6);
        let probe = random_vec(rows * outf, 7);
        let loss = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0.0; rows * outf];
            linear_forward(&mut y, x, w, Some(b), rows, inf, outf, Par::Seq);
            y.iter()
                .zip(&probe)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
        };
        let (mut dx, mut dw, mut db) = (
            vec![0.0; rows * inf],
            vec![0.0; outf * inf],
            vec![0.0; outf],
        );
        linear_backward(
            LinearGrads {
                input: Some(&mut dx),
                accumulate_input: false,
                weight: Some(&mut dw),
                bias: Some(&mut db),
            },
            &probe,
            &x,
            &w,
            rows,
            inf,
            outf,
            Par::Seq,
        );
        check_gradient(&x, &dx, |x| loss(x, &w, &b), "linear dx");
        check_gradient(&w, &dw, |w| loss(&x, w, &b), "linear dw");
        check_gradient(&b, &db, |b| loss(&x, &w, b), "linear db");
    }
}
