//! GEMM inputs as the compute precision holds them: f32, or rounded to bf16 once and kept so
//! (the forward's GEMM input is also the weight gradient's, so a saved bf16 input is both
//! half the bytes and one conversion fewer).

use crate::profile::{scope, Phase};
use origami_kernels::bf16::{to_bf16_slice, Bf16};
use rayon::prelude::*;

/// Elements converted per task when a conversion runs over the thread pool.
const CONVERT_CHUNK: usize = 1 << 16;

/// An owned GEMM input: `[rows, width]` row-major in f32 or bf16.
#[derive(Clone, Debug, PartialEq)]
pub enum Activation {
    /// Full precision.
    F32(Vec<f32>),
    /// Rounded to nearest even bf16.
    Bf16(Vec<Bf16>),
}

/// A borrowed GEMM input (a whole [`Activation`], a slice of one, or f32 values the compute
/// rounds itself when it computes in bf16).
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [Bf16]),
}

impl Activation {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            Activation::F32(v) => v.len(),
            Activation::Bf16(v) => v.len(),
        }
    }

    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole input.
    pub fn input(&self) -> Input<'_> {
        match self {
            Activation::F32(v) => Input::F32(v),
            Activation::Bf16(v) => Input::Bf16(v),
        }
    }

    /// Elements `range` (e.g. a block of rows).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Input<'_> {
        match self {
            Activation::F32(v) => Input::F32(&v[range]),
            Activation::Bf16(v) => Input::Bf16(&v[range]),
        }
    }

    /// The f32 values; panics on a bf16 activation (for inputs the precision keeps in f32, such
    /// as the router's).
    pub fn as_f32(&self) -> &[f32] {
        match self {
            Activation::F32(v) => v,
            Activation::Bf16(_) => panic!("an f32 activation was expected, not bf16"),
        }
    }
}

impl<'a> Input<'a> {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            Input::F32(v) => v.len(),
            Input::Bf16(v) => v.len(),
        }
    }

    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> From<&'a [f32]> for Input<'a> {
    fn from(x: &'a [f32]) -> Self {
        Input::F32(x)
    }
}

impl<'a> From<&'a Vec<f32>> for Input<'a> {
    fn from(x: &'a Vec<f32>) -> Self {
        Input::F32(x)
    }
}

impl<'a> From<&'a Activation> for Input<'a> {
    fn from(x: &'a Activation) -> Self {
        x.input()
    }
}

/// `x` rounded to bf16, over the thread pool for large inputs.
pub fn round_to_bf16(x: &[f32]) -> Vec<Bf16> {
    let mut out = vec![Bf16::ZERO; x.len()];
    round_into(&mut out, x);
    out
}

/// `out[i] = bf16(x[i])`, over the thread pool for large inputs.
pub fn round_into(out: &mut [Bf16], x: &[f32]) {
    let _phase = scope(Phase::Convert);
    if x.len() <= CONVERT_CHUNK {
        to_bf16_slice(out, x);
    } else {
        out.par_chunks_mut(CONVERT_CHUNK)
            .zip(x.par_chunks(CONVERT_CHUNK))
            .for_each(|(o, v)| to_bf16_slice(o, v));
    }
}

/// bf16 values packed two to an f32 word, as a communicator (which moves f32 words) carries
/// them; `values` must have an even length.
pub fn bf16_words(values: &[Bf16]) -> Vec<f32> {
    assert!(
        values.len().is_multiple_of(2),
        "{} bf16 values do not fill whole words",
        values.len()
    );
    let mut words = vec![0.0f32; values.len() / 2];
    words_as_bf16_mut(&mut words).copy_from_slice(values);
    words
}

/// `x` rounded to bf16 straight into words as [`bf16_words`] packs them (no bf16 copy in
/// between); `x` must have an even length.
pub fn round_to_words(x: &[f32]) -> Vec<f32> {
    assert!(
        x.len().is_multiple_of(2),
        "{} values do not fill whole words",
        x.len()
    );
    let mut words = vec![0.0f32; x.len() / 2];
    round_into(words_as_bf16_mut(&mut words), x);
    words
}

/// The bf16 values packed in `words` (two to a word, as [`bf16_words`] packs them).
pub fn words_as_bf16(words: &[f32]) -> &[Bf16] {
    // SAFETY: `Bf16` is `repr(transparent)` over `u16`, every bit pattern is a valid value, an
    // f32 buffer is aligned for it, and the view covers exactly the buffer's bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<Bf16>(), words.len() * 2) }
}

/// [`words_as_bf16`], writable.
pub fn words_as_bf16_mut(words: &mut [f32]) -> &mut [Bf16] {
    // SAFETY: as in `words_as_bf16`; the view borrows `words` mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<Bf16>(), words.len() * 2) }
}

/// `x` widened to f32 (exact).
pub fn widen(x: &[Bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}
