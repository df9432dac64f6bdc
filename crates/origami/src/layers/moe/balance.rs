//! Scopes of the load-balancing loss (DESIGN.md §1, "Router") across ranks.
//!
//! The loss is `coeff · E/k · Σ_i f_i · P_i / T`, with `f_i` the fraction of routed tokens that
//! went to expert i, `P_i` the summed balancing score of expert i and `T` the tokens counted.
//! A rank holds only some of the tokens, so it adds the part of the sum over its own tokens,
//! `Σ_i w_i · P_i^local` with `w_i = coeff · E/k · f_i / T`, where `f_i` and `T` are counted over
//! every rank of the scope. The parts of the ranks that share a micro-batch add up to the loss
//! one rank holding the whole micro-batch would compute, and so do their gradients.
//!
//! - micro-batch: counts summed over the sequence group (tp-cp);
//! - sequence: the same per sequence, each sequence's loss divided by the number of sequences;
//! - global batch: `f_i` from counts summed over the batch group (tp-dp-cp) and over the step's
//!   micro-batches so far, `T` the micro-batch's tokens over the sequence group.

use crate::layers::stored::Stored;
use std::ops::Range;

use origami_comm::{Communicator, ReduceOp};

use super::comm_ok;
use crate::layers::moe::config::AuxLossScope;

/// The load-balancing loss of one rank's tokens: `Σ_segments Σ_i weight[i] · P_i(segment)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BalanceWeights {
    /// Each run of local tokens with the weight of each expert's summed score.
    pub segments: Vec<(Range<usize>, Vec<f64>)>,
}

/// Expert loads summed over the micro-batches of the current global batch (global-batch scope).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunningLoad {
    /// Tokens routed to each expert.
    pub tokens_per_expert: Vec<u64>,
    /// Tokens.
    pub tokens: u64,
}

/// What the loss weights depend on besides the counts.
pub struct BalanceSettings<'a> {
    /// Which tokens the loads are counted over.
    pub scope: AuxLossScope,
    /// `coeff · E / k`.
    pub factor: f64,
    /// The ranks sharing this micro-batch's sequences.
    pub sequence_group: &'a dyn Communicator,
}

/// Local tokens per expert of `experts` (slot `t·k + j` chose `chosen[t·k + j]`), for the tokens
/// `range`.
fn loads(chosen: &[u32], topk: usize, experts: usize, range: Range<usize>) -> Vec<u64> {
    let mut counts = vec![0u64; experts];
    for &e in &chosen[range.start * topk..range.end * topk] {
        counts[e as usize] += 1;
    }
    counts
}

/// The micro-batch or per-sequence weights: `sequences` runs of equal length over the local
/// tokens (one run for the micro-batch scope), loads summed over the sequence group.
pub fn local_scope_weights(
    settings: &BalanceSettings,
    chosen: &[u32],
    topk: usize,
    experts: usize,
    tokens: usize,
    sequences: usize,
) -> BalanceWeights {
    let runs = match settings.scope {
        AuxLossScope::Sequence => sequences.max(1),
        _ => 1,
    };
    let per_run = tokens / runs;
    let mut counts = Vec::with_capacity(runs * (experts + 1));
    for run in 0..runs {
        counts.extend(loads(
            chosen,
            topk,
            experts,
            run * per_run..(run + 1) * per_run,
        ));
        counts.push(per_run as u64);
    }
    comm_ok(
        settings
            .sequence_group
            .all_reduce_u64(&mut counts, ReduceOp::Sum),
    );
    let segments = (0..runs)
        .map(|run| {
            let row = &counts[run * (experts + 1)..(run + 1) * (experts + 1)];
            let total = row[experts].max(1) as f64;
            let weights = row[..experts]
                .iter()
                .map(|&n| settings.factor * n as f64 / (total * total) / runs as f64)
                .collect();
            (run * per_run..(run + 1) * per_run, weights)
        })
        .collect();
    BalanceWeights { segments }
}

/// The global-batch weights from the running loads and `micro_batch_tokens`, the micro-batch's
/// tokens over the sequence group.
pub fn global_scope_weights(
    settings: &BalanceSettings,
    running: &RunningLoad,
    tokens: usize,
    micro_batch_tokens: usize,
) -> BalanceWeights {
    let denominator = running.tokens.max(1) as f64 * micro_batch_tokens.max(1) as f64;
    let weights = running
        .tokens_per_expert
        .iter()
        .map(|&n| settings.factor * n as f64 / denominator)
        .collect();
    BalanceWeights {
        segments: vec![(0..tokens, weights)],
    }
}

impl Stored for BalanceWeights {
    fn stored_bytes(&self) -> usize {
        self.segments.iter().map(|(_, w)| w.stored_bytes()).sum()
    }
}
