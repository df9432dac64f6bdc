//! Where each parameter lies in a flat group buffer, and how a buffer is cut into the contiguous
//! ranges that the ranks of a distributed optimizer own.
//!
//! A group's parameters are laid out contiguously in registration order (see
//! [`ParamRegistry`]), so walking the registry and summing lengths gives every range.

use std::ops::Range;

use crate::params::{ParamGroup, ParamRegistry, Shard};

/// One parameter's elements in its group buffer, with the flags the optimizer reads.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Span {
    /// Elements of the group buffer.
    pub range: Range<usize>,
    /// Whether AdamW decays it.
    pub weight_decay: bool,
    /// Whether the optimizer updates it and counts it in the gradient norm.
    pub trainable: bool,
    /// A dense parameter every tp rank holds whole (its gradient is summed over tp).
    pub whole_over_tp: bool,
    /// Another stage's copy of a parameter (counted in the gradient norm by its owner only).
    pub duplicate: bool,
}

/// The spans of one group buffer, in order.
#[derive(Clone, Debug)]
pub(super) struct BufferLayout {
    spans: Vec<Span>,
    len: usize,
}

impl BufferLayout {
    /// The layout of `group`'s buffer in `registry`.
    pub fn of(registry: &ParamRegistry, group: ParamGroup) -> Self {
        let mut len = 0;
        let spans = registry
            .params()
            .iter()
            .filter(|p| p.id.group() == group)
            .map(|p| {
                let start = len;
                len += p.id.len();
                Span {
                    range: start..len,
                    weight_decay: p.weight_decay,
                    trainable: p.trainable,
                    whole_over_tp: group == ParamGroup::Dense && p.shard == Shard::full(&p.shape),
                    duplicate: p.duplicate,
                }
            })
            .collect();
        BufferLayout { spans, len }
    }

    /// Number of elements of the buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Every span, in buffer order.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// The parts of `range` that fall in each span, in order (empty intersections skipped).
    pub fn pieces(&self, range: Range<usize>) -> impl Iterator<Item = (&Span, Range<usize>)> {
        self.spans.iter().filter_map(move |span| {
            let piece = span.range.start.max(range.start)..span.range.end.min(range.end);
            (!piece.is_empty()).then_some((span, piece))
        })
    }

    /// Maximal runs of `range` whose spans satisfy `keep`: adjacent kept pieces are merged, so a
    /// range of only kept spans is one run.
    pub fn runs(&self, range: Range<usize>, keep: impl Fn(&Span) -> bool) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for (_, piece) in self.pieces(range).filter(|(span, _)| keep(span)) {
            match runs.last_mut() {
                Some(last) if last.end == piece.start => last.end = piece.end,
                _ => runs.push(piece),
            }
        }
        runs
    }
}

/// Element counts of `parts` contiguous, nearly equal ranges covering `len` elements (the first
/// `len % parts` ranges one element longer).
pub(super) fn partition(len: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| len / parts + usize::from(i < len % parts))
        .collect()
}

/// The range of `counts`' block `index`.
pub(super) fn block(counts: &[usize], index: usize) -> Range<usize> {
    let start: usize = counts[..index].iter().sum();
    start..start + counts[index]
}
