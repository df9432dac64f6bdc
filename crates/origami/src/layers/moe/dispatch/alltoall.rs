//! The all-to-all token dispatcher (DESIGN.md §1).
//!
//! Rows leave a rank grouped by expert (so grouped by the ep rank owning the expert), cross the
//! ep group in one all-to-all-v, are all-gathered over the etp group when experts are split
//! over it, and are re-sorted so each local expert's rows are contiguous. The way back undoes
//! each step: inverse sort, reduce-scatter-v over etp (summing the partial outputs of the
//! row-parallel second projection), all-to-all-v with the splits swapped.
//!
//! Both directions are linear maps and each is the other's transpose, so the backward of
//! [`AllToAllPlan::to_experts`] is [`AllToAllPlan::from_experts`] and vice versa: the layer runs
//! `to` then `from` in its forward and again `to` then `from` in its backward.

use crate::compute::{bf16_words, round_to_bf16, widen, words_as_bf16};
use crate::layers::stored::Stored;
use origami_comm::ReduceOp;
use origami_kernels::bf16::Bf16;

use super::super::comm_ok;
use super::super::parallel::MoeParallel;
use crate::profile::{scope, timed, Phase};

/// One contiguous run of rows as received (source etp rank, source ep rank, local expert) and
/// where it sits in the expert-major layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chunk {
    received_at: usize,
    sorted_at: usize,
    rows: usize,
}

/// The splits of one micro-batch's dispatch, decided once in the forward and reused in the
/// backward.
#[derive(Clone, Debug, PartialEq)]
pub struct AllToAllPlan {
    hidden: usize,
    send_counts: Vec<usize>,
    recv_counts: Vec<usize>,
    gather_counts: Vec<usize>,
    chunks: Vec<Chunk>,
    /// `expert_offsets[e]..expert_offsets[e+1]` are local expert e's rows after dispatch.
    pub expert_offsets: Vec<usize>,
}

impl AllToAllPlan {
    /// Plans the dispatch of rows grouped by all `experts` with `rows_per_expert` rows each
    /// on this rank. With `fixed_rows` (padding to capacity) every rank sends every expert
    /// exactly that many rows and no counts are exchanged.
    pub fn new(
        parallel: &MoeParallel,
        experts: usize,
        rows_per_expert: &[usize],
        fixed_rows: Option<usize>,
        hidden: usize,
    ) -> Self {
        let (ep, etp) = (parallel.ep.size(), parallel.etp.size());
        let local = experts / ep;
        let first = parallel.ep.rank() * local;
        // counts[q][j][e]: rows that (etp rank q, ep rank j) sends to local expert e.
        let counts: Vec<u64> = match fixed_rows {
            Some(rows) => vec![rows as u64; etp * ep * local],
            None => {
                let mut from_ep = vec![0u64; ep * experts];
                let mine = &mut from_ep[parallel.ep.rank() * experts..][..experts];
                for (c, &r) in mine.iter_mut().zip(rows_per_expert) {
                    *c = r as u64;
                }
                timed(Phase::CommDispatch, || {
                    comm_ok(parallel.ep.all_reduce_u64(&mut from_ep, ReduceOp::Sum))
                });
                let mut all = vec![0u64; etp * ep * local];
                let mine = &mut all[parallel.etp.rank() * ep * local..][..ep * local];
                for (j, row) in mine.chunks_mut(local).enumerate() {
                    row.copy_from_slice(&from_ep[j * experts + first..][..local]);
                }
                timed(Phase::CommDispatch, || {
                    comm_ok(parallel.etp.all_reduce_u64(&mut all, ReduceOp::Sum))
                });
                all
            }
        };
        let at = |q: usize, j: usize, e: usize| counts[(q * ep + j) * local + e] as usize;
        let send_counts = (0..ep)
            .map(|j| {
                rows_per_expert[j * local..(j + 1) * local]
                    .iter()
                    .sum::<usize>()
                    * hidden
            })
            .collect();
        let me = parallel.etp.rank();
        let recv_counts = (0..ep)
            .map(|j| (0..local).map(|e| at(me, j, e)).sum::<usize>() * hidden)
            .collect();
        let gather_counts = (0..etp)
            .map(|q| {
                (0..ep)
                    .flat_map(|j| (0..local).map(move |e| (j, e)))
                    .map(|(j, e)| at(q, j, e))
                    .sum::<usize>()
                    * hidden
            })
            .collect();
        let mut expert_offsets = vec![0; local + 1];
        for e in 0..local {
            let rows: usize = (0..etp)
                .flat_map(|q| (0..ep).map(move |j| (q, j)))
                .map(|(q, j)| at(q, j, e))
                .sum();
            expert_offsets[e + 1] = expert_offsets[e] + rows;
        }
        let mut next = expert_offsets.clone();
        let mut chunks = Vec::with_capacity(etp * ep * local);
        let mut received_at = 0;
        for q in 0..etp {
            for j in 0..ep {
                for (e, next) in next.iter_mut().enumerate().take(local) {
                    let rows = at(q, j, e);
                    chunks.push(Chunk {
                        received_at,
                        sorted_at: *next,
                        rows,
                    });
                    received_at += rows;
                    *next += rows;
                }
            }
        }
        AllToAllPlan {
            hidden,
            send_counts,
            recv_counts,
            gather_counts,
            chunks,
            expert_offsets,
        }
    }

    /// Rows after dispatch (all local experts).
    pub fn expert_rows(&self) -> usize {
        self.expert_offsets.last().copied().unwrap_or(0)
    }

    /// Moves this rank's expert-grouped rows to the ranks owning their experts; returns the
    /// local experts' rows, expert-major (on one rank with every expert, `rows` themselves).
    pub fn to_experts(&self, parallel: &MoeParallel, rows: Vec<f32>) -> Vec<f32> {
        if parallel.is_local() {
            return rows;
        }
        self.sort_received(&self.exchange(parallel, &rows, 1), self.hidden)
    }

    /// [`AllToAllPlan::to_experts`] of bf16 rows (the experts' input in bf16): two values
    /// travel in each word, half the bytes of f32.
    pub fn to_experts_bf16(&self, parallel: &MoeParallel, rows: Vec<Bf16>) -> Vec<Bf16> {
        if parallel.is_local() {
            rows
        } else if self.hidden.is_multiple_of(2) {
            let words = self.exchange(parallel, &bf16_words(&rows), 2);
            self.sort_received(words_as_bf16(&words), self.hidden)
        } else {
            round_to_bf16(&self.to_experts(parallel, widen(&rows)))
        }
    }

    /// The all-to-all over ep (and all-gather over etp) of `words`, rows of
    /// `hidden / values_per_word` words each; returns what arrived, in arrival order.
    fn exchange(&self, parallel: &MoeParallel, words: &[f32], values_per_word: usize) -> Vec<f32> {
        let in_words = |counts: &[usize]| -> Vec<usize> {
            counts.iter().map(|c| c / values_per_word).collect()
        };
        let (send_counts, recv_counts) = (in_words(&self.send_counts), in_words(&self.recv_counts));
        let mut from_ep = vec![0.0; recv_counts.iter().sum()];
        timed(Phase::CommDispatch, || {
            comm_ok(
                parallel
                    .ep
                    .all_to_all_v(words, &send_counts, &mut from_ep, &recv_counts),
            )
        });
        if parallel.etp.size() == 1 {
            return from_ep;
        }
        let gather_counts = in_words(&self.gather_counts);
        let mut all = vec![0.0; gather_counts.iter().sum()];
        timed(Phase::CommDispatch, || {
            comm_ok(
                parallel
                    .etp
                    .all_gather_v(&from_ep, &gather_counts, &mut all),
            )
        });
        all
    }

    /// The arrived rows (`h` values each) re-sorted expert-major.
    fn sort_received<T: Copy + Default>(&self, gathered: &[T], h: usize) -> Vec<T> {
        let _phase = scope(Phase::Permutation);
        let mut sorted = vec![T::default(); self.expert_rows() * h];
        for chunk in &self.chunks {
            sorted[chunk.sorted_at * h..][..chunk.rows * h]
                .copy_from_slice(&gathered[chunk.received_at * h..][..chunk.rows * h]);
        }
        sorted
    }

    /// The transpose of [`AllToAllPlan::to_experts`]: returns rows computed at the experts to
    /// the ranks they came from, summing the etp ranks' partial rows (on one rank with every
    /// expert, `sorted` itself).
    pub fn from_experts(&self, parallel: &MoeParallel, sorted: Vec<f32>) -> Vec<f32> {
        if parallel.is_local() {
            return sorted;
        }
        let h = self.hidden;
        let mut gathered = vec![0.0; self.expert_rows() * h];
        timed(Phase::Permutation, || {
            for chunk in &self.chunks {
                gathered[chunk.received_at * h..][..chunk.rows * h]
                    .copy_from_slice(&sorted[chunk.sorted_at * h..][..chunk.rows * h]);
            }
        });
        let from_ep = if parallel.etp.size() > 1 {
            let mut mine = vec![0.0; self.recv_counts.iter().sum()];
            timed(Phase::CommDispatch, || {
                comm_ok(
                    parallel
                        .etp
                        .reduce_scatter_v(&gathered, &self.gather_counts, &mut mine),
                )
            });
            mine
        } else {
            gathered
        };
        let mut rows = vec![0.0; self.send_counts.iter().sum()];
        timed(Phase::CommDispatch, || {
            comm_ok(parallel.ep.all_to_all_v(
                &from_ep,
                &self.recv_counts,
                &mut rows,
                &self.send_counts,
            ))
        });
        rows
    }
}

impl Stored for AllToAllPlan {
    fn stored_bytes(&self) -> usize {
        self.send_counts.stored_bytes()
            + self.recv_counts.stored_bytes()
            + self.gather_counts.stored_bytes()
            + self.chunks.len() * std::mem::size_of::<Chunk>()
            + self.expert_offsets.stored_bytes()
    }
}
