//! What a layer keeps between its forward and its backward, in bytes: the activations a
//! pipeline stage holds for each micro-batch in flight, which the pipeline schedules bound.

/// A saved state that can say how many bytes it holds.
pub trait Stored {
    /// Bytes held (the elements of every buffer; not the small fixed-size fields).
    fn stored_bytes(&self) -> usize;
}

impl<T: Copy> Stored for Vec<T> {
    fn stored_bytes(&self) -> usize {
        self.len() * std::mem::size_of::<T>()
    }
}

impl<T: Stored> Stored for Option<T> {
    fn stored_bytes(&self) -> usize {
        self.as_ref().map_or(0, Stored::stored_bytes)
    }
}

impl<T: Stored + ?Sized> Stored for Box<T> {
    fn stored_bytes(&self) -> usize {
        (**self).stored_bytes()
    }
}

impl Stored for crate::compute::Activation {
    fn stored_bytes(&self) -> usize {
        match self {
            crate::compute::Activation::F32(v) => v.stored_bytes(),
            crate::compute::Activation::Bf16(v) => v.stored_bytes(),
        }
    }
}
