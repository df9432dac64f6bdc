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
//!
//! The counts are of the router's plain top-k of the balancing scores (without expert bias or
//! group limit, as Megatron-Core), not of the experts the tokens were dispatched to.

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
    /// Experts (E).
    pub experts: usize,
    /// Choices per token (k).
    pub topk: usize,
    /// The ranks sharing this micro-batch's sequences (tp-cp).
    pub sequence_group: &'a dyn Communicator,
    /// The ranks sharing the global batch (tp-dp-cp).
    pub batch_group: &'a dyn Communicator,
}

/// Local tokens per expert among the tokens `range` (token t chose `chosen[t·k..(t+1)·k]`).
fn loads(settings: &BalanceSettings, chosen: &[u32], range: Range<usize>) -> Vec<u64> {
    let k = settings.topk;
    let mut counts = vec![0u64; settings.experts];
    for &e in &chosen[range.start * k..range.end * k] {
        counts[e as usize] += 1;
    }
    counts
}

/// The micro-batch or per-sequence weights from each local token's `chosen` experts:
/// `sequences` runs of equal length over the `tokens` local tokens (one run for the
/// micro-batch scope), loads summed over the sequence group.
pub fn local_scope_weights(
    settings: &BalanceSettings,
    chosen: &[u32],
    tokens: usize,
    sequences: usize,
) -> BalanceWeights {
    let experts = settings.experts;
    let runs = match settings.scope {
        AuxLossScope::Sequence => sequences.max(1),
        _ => 1,
    };
    let per_run = tokens / runs;
    let mut counts = Vec::with_capacity(runs * (experts + 1));
    for run in 0..runs {
        counts.extend(loads(settings, chosen, run * per_run..(run + 1) * per_run));
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

/// The global-batch weights: adds this micro-batch's loads of the local tokens' `chosen`
/// experts, summed over the batch group, to the `running` loads of the step, then weighs with
/// them; `tokens` are this rank's and the micro-batch's over the sequence group.
pub fn global_scope_weights(
    settings: &BalanceSettings,
    running: &mut RunningLoad,
    chosen: &[u32],
    (tokens, micro_batch_tokens): (usize, usize),
) -> BalanceWeights {
    let mut counts = loads(settings, chosen, 0..tokens);
    counts.push(tokens as u64);
    comm_ok(
        settings
            .batch_group
            .all_reduce_u64(&mut counts, ReduceOp::Sum),
    );
    running.tokens_per_expert.resize(settings.experts, 0);
    for (sum, &n) in running.tokens_per_expert.iter_mut().zip(&counts) {
        *sum += n;
    }
    running.tokens += counts[settings.experts];
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
