//! Helpers the blockwise attention kernels share: an output pointer that parallel tasks writing
//! disjoint elements share, strided tiles of row-major buffers, and tile operands prepared once
//! for many products.

use crate::matmul::{RawMatrix, View};

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: tasks only write elements no other task touches (see each use).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }

    /// A `rows × cols` matrix starting at `offset` with the given row stride.
    pub(crate) fn matrix(
        self,
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> RawMatrix {
        RawMatrix {
            ptr: unsafe { self.0.add(offset) },
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }
}

/// The `rows × width` tile starting at element `start` of a row-major buffer with `row_stride`.
pub(crate) fn tile<T>(
    buffer: &[T],
    start: usize,
    rows: usize,
    width: usize,
    row_stride: usize,
) -> View<'_, T> {
    View::strided(&buffer[start..], rows, width, row_stride, 1)
}

/// A cache line of packed GEMM units (an f32 or a bf16 pair), so packed panels start 64-byte
/// aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [u32; 16]);

/// One operand of the attention's tile products, prepared once and multiplied many times: a
/// key or value block meets every query block after it, a query block every key block before
/// it. For an AVX-512 microkernel it holds the operand packed into the microkernel's panels
/// (`packed_gemm::pack_lhs`, `packed_gemm::pack_rhs`), so a product only runs the register
/// tiles; for a portable kernel, an f32 copy read through strides. Buffers only grow: a warm operand
/// re-prepared for the next block does not allocate.
#[derive(Default)]
pub(crate) struct TileOperand {
    /// The packed panels (microkernel form).
    pub(crate) panels: Vec<Line>,
    /// The copy (portable form), row-major or, see `plain_transposed`, column-major.
    pub(crate) plain: Vec<f32>,
    /// Whether `plain` holds the operand's columns one after the other.
    pub(crate) plain_transposed: bool,
    /// Rows of the operand as multiplied (`m` of a left operand, `k` of a right one).
    pub(crate) rows: usize,
    /// Columns of the operand as multiplied (`k` of a left operand, `n` of a right one).
    pub(crate) cols: usize,
}

impl TileOperand {
    /// Prepares the portable form: `v`'s elements widened to f32, copied along the stored
    /// rows. A transposed view (the stored rows are its columns) is kept as stored and read
    /// transposed by the product, so no copy strides through memory (a column of a tile whose
    /// rows lie 4 KiB apart falls into one cache set).
    pub(crate) fn set_plain<T: Copy>(&mut self, v: View<'_, T>, widen: impl Fn(T) -> f32) {
        let (rows, cols) = v.shape();
        let (data, row_stride, col_stride) = v.raw();
        self.plain.clear();
        self.plain_transposed = col_stride != 1 && row_stride == 1;
        let (lines, line_len, line_stride, step) = if self.plain_transposed {
            (cols, rows, col_stride, row_stride)
        } else {
            (rows, cols, row_stride, col_stride)
        };
        for i in 0..lines {
            let line = &data[i * line_stride..];
            if step == 1 {
                self.plain
                    .extend(line[..line_len].iter().map(|&x| widen(x)));
            } else {
                self.plain
                    .extend((0..line_len).map(|j| widen(line[j * step])));
            }
        }
        (self.rows, self.cols) = (rows, cols);
    }

    /// The portable form as a view.
    pub(crate) fn plain_view(&self) -> View<'_> {
        if self.plain_transposed {
            View::new(&self.plain, self.cols, self.rows).t()
        } else {
            View::new(&self.plain, self.rows, self.cols)
        }
    }
}

/// A GEMM kernel that multiplies prepared [`TileOperand`]s on the calling thread: the f32 and
/// the bf16 kernels, so that the attention kernels prepare their blocks the same way in both
/// precisions.
pub(crate) trait TileKernel: Copy + Send + Sync + std::fmt::Debug {
    /// The element type of the operands.
    type Elem: Copy + Sync;

    /// Whether this CPU runs the kernel.
    fn runs_here(self) -> bool;

    /// Prepares `a` (`m × k`) as the left operand of [`TileKernel::multiply_tiles`].
    ///
    /// # Safety
    /// The CPU runs the kernel.
    unsafe fn pack_lhs(self, op: &mut TileOperand, a: View<'_, Self::Elem>);

    /// Prepares `b` (`k × n`) as the right operand of [`TileKernel::multiply_tiles`].
    ///
    /// # Safety
    /// The CPU runs the kernel.
    unsafe fn pack_rhs(self, op: &mut TileOperand, b: View<'_, Self::Elem>);

    /// `c = a·b` or `c += a·b`, both operands prepared by this kernel.
    ///
    /// # Safety
    /// The CPU runs the kernel; every element `c` addresses is valid for reads and writes by
    /// this thread alone and overlaps neither operand; the shapes agree; the depth is not zero.
    unsafe fn multiply_tiles(
        self,
        c: RawMatrix,
        a: &TileOperand,
        b: &TileOperand,
        accumulate: bool,
    );

    /// `c = a·b` or `c += a·b` for a left operand multiplied only once (a task's own tile of
    /// probabilities or score gradients): the kernel prepares it in `scratch`, unless it can
    /// read `a` where it lies.
    ///
    /// # Safety
    /// As [`TileKernel::multiply_tiles`].
    unsafe fn multiply_once(
        self,
        c: RawMatrix,
        scratch: &mut TileOperand,
        a: View<'_, Self::Elem>,
        b: &TileOperand,
        accumulate: bool,
    ) {
        self.pack_lhs(scratch, a);
        self.multiply_tiles(c, scratch, b, accumulate);
    }
}
