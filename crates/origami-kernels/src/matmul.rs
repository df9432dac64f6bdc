//! Dense matrix multiplication on strided views, and the linear layer built on it.
//!
//! `C = A·B` (or `C += A·B`) where each operand is a view with its own row and column strides,
//! so transposes cost nothing: `view.t()` swaps the strides. The backend is the `gemm` crate
//! (chosen on measurements on this CPU, see `docs/kernels.md`); it is the only place that
//! depends on it.
//!
//! Linear layer, PyTorch weight layout `W[out, in]`:
//! forward `y = x·Wᵀ (+ b)`; backward `dx = dy·W` (written, or added), `dW += dyᵀ·x`,
//! `db += Σ_rows dy` (parameters accumulate, activations are written).

use rayon::prelude::*;

/// How many threads a kernel call may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// Run on the calling thread (used inside an outer parallel loop).
    Seq,
    /// Use every thread of the current rayon pool.
    All,
}

impl Par {
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

/// `c = a·b`, or `c += a·b` when `accumulate`. Shapes must agree (`a: m×k`, `b: k×n`, `c: m×n`).
pub fn matmul(c: ViewMut<'_>, a: View<'_>, b: View<'_>, accumulate: bool, par: Par) {
    assert_eq!(a.cols, b.rows, "matmul inner dimensions differ");
    assert_eq!(
        (c.rows, c.cols),
        (a.rows, b.cols),
        "matmul output shape differs"
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
    // output is borrowed mutably, and the inputs immutably, so they cannot overlap it.
    unsafe { gemm_into(out, a, b, accumulate, par.to_gemm()) }
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

/// `c = a·b` or `c += a·b` into a raw output.
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
    gemm_into(c, a, b, accumulate, gemm::Parallelism::None)
}

/// The one call into the GEMM backend: `c = a·b` (or `c += a·b`), shapes already checked.
///
/// # Safety
/// As for [`matmul_raw`].
unsafe fn gemm_into(
    c: RawMatrix,
    a: View<'_>,
    b: View<'_>,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
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
        parallelism,
    )
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
    use crate::testing::{assert_close, check_gradient, random_vec};

    #[test]
    fn matmul_matches_reference_for_all_transposes() {
        let (m, k, n) = (7, 5, 9);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = random_vec(m * k, 1);
            let b = random_vec(k * n, 2);
            let a_view = if ta {
                View::new(&a, k, m).t()
            } else {
                View::new(&a, m, k)
            };
            let b_view = if tb {
                View::new(&b, n, k).t()
            } else {
                View::new(&b, k, n)
            };
            let mut c = random_vec(m * n, 3);
            let c0 = c.clone();
            matmul(ViewMut::new(&mut c, m, n), a_view, b_view, true, Par::All);
            let at = |i: usize, j: usize| if ta { a[j * m + i] } else { a[i * k + j] };
            let bt = |i: usize, j: usize| if tb { b[j * k + i] } else { b[i * n + j] };
            let expected: Vec<f32> = (0..m * n)
                .map(|idx| {
                    let (i, j) = (idx / n, idx % n);
                    c0[idx] + (0..k).map(|p| at(i, p) * bt(p, j)).sum::<f32>()
                })
                .collect();
            assert_close(&c, &expected, 1e-5, "matmul");
        }
    }

    #[test]
    fn zero_inner_dimension_writes_zeros() {
        let mut c = vec![1.0; 6];
        matmul(
            ViewMut::new(&mut c, 2, 3),
            View::new(&[], 2, 0),
            View::new(&[], 0, 3),
            false,
            Par::Seq,
        );
        assert_eq!(c, vec![0.0; 6]);
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
