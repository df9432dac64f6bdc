//! Helpers the blockwise attention kernels share: an output pointer that parallel tasks writing
//! disjoint elements share, and strided tiles of row-major buffers.

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
