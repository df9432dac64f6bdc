//! Context parallelism (cp): causal attention over sequences split across the ranks of the cp
//! group.
//!
//! Each sequence of `seq` tokens is cut into `2·cp` chunks of `c = seq / (2·cp)` tokens; cp rank
//! `r` holds chunks `r` and `2·cp − 1 − r`, so every rank does the same causal work. A rank's
//! local rows of a micro-batch are `[sequence][local index]`, local index `0..c` being chunk `r`
//! and `c..2c` chunk `2·cp − 1 − r` ([`local_positions`]).
//!
//! Two ways to exchange data ([`CpCommType`]):
//! - `p2p` (ring attention): the key/value blocks travel around the ring with `send_recv`; each
//!   rank attends its queries to every block and merges the partial results (online softmax).
//!   Backward: each block travels once more with its gradient accumulator, which ends at its
//!   owner after `cp` steps; `dq` stays local.
//! - `a2a` (Ulysses): an all-to-all trades the sequence split for a head split (every rank gets
//!   all tokens of `heads / cp` query and `kv_heads / cp` kv heads), one attention call, and the
//!   inverse all-to-all. Backward mirrors it.
//!
//! The kernel masks by global token position, so neither needs the tokens in sequence order.
//! In bf16 the blocks run the bf16 masked kernel on rounded q, k, v and output gradient, so
//! whatever reaches the kernel only rounded travels rounded, in half the bytes: the ring's
//! key/value blocks, and the all-to-all's q, k, v and output gradient. So does the all-to-all's
//! output on its way back, which only enters the output projection (and is rounded there). The
//! gradients that travel (the ring's accumulators, the all-to-all's dq and dkv) stay f32. Every
//! value a kernel sees is the one it would see with f32 exchanges.

use crate::layers::stored::Stored;
use std::sync::Arc;

use origami_comm::Communicator;
use origami_kernels::bf16::Bf16;
use origami_kernels::masked_attention::{
    attention_row_dots, masked_attention_backward, masked_attention_forward,
    merge_partial_attention, MaskedAttentionShape,
};
use origami_kernels::masked_attention_bf16::{
    masked_attention_backward_bf16, masked_attention_forward_bf16,
};
use origami_kernels::matmul_bf16::Bf16Kernel;

use crate::compute::{bf16_words, round_to_bf16, round_to_words, widen, words_as_bf16, Compute};

use crate::layers::comm_ok;
use crate::profile::{scope, timed, Phase};

/// Tag of the ring steps of the forward.
const RING_FORWARD_TAG: u32 = 0xC0_0001;
/// Tag of the ring steps of the backward.
const RING_BACKWARD_TAG: u32 = 0xC0_0002;

/// How context-parallel attention exchanges data (config value `"p2p"` or `"a2a"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpCommType {
    /// Ring attention: key/value blocks pass from rank to rank with send/recv.
    #[default]
    P2p,
    /// Ulysses: all-to-all from a sequence split to a head split and back.
    A2a,
}

/// Global positions (within a sequence) of the local tokens of cp rank `rank`: chunk `rank`,
/// then chunk `2·cp − 1 − rank`. Panics unless `seq` is divisible by `2·cp`.
pub fn local_positions(seq: usize, cp: usize, rank: usize) -> Vec<usize> {
    assert!(
        cp > 0 && seq.is_multiple_of(2 * cp),
        "context parallelism needs the sequence length {seq} divisible by 2·cp = {} (cp = {cp})",
        2 * cp
    );
    assert!(rank < cp, "cp rank {rank} outside a group of {cp}");
    let chunk = seq / (2 * cp);
    let first = rank * chunk..(rank + 1) * chunk;
    let mirrored = (2 * cp - 1 - rank) * chunk..(2 * cp - rank) * chunk;
    first.chain(mirrored).collect()
}

/// What the backward needs from the forward.
pub struct ContextAttentionSaved {
    /// Final attention output, in the layout the kernel ran on.
    out: Vec<f32>,
    /// Final log-sum-exp of the scores, same layout.
    lse: Vec<f32>,
    /// a2a only: the head-split queries and keys/values the kernel ran on.
    gathered: Option<GatheredInputs>,
}

/// The head-split inputs of the a2a exchange, as the kernel of the step's precision takes them.
enum GatheredInputs {
    /// Queries and keys/values in f32.
    F32 { q: Vec<f32>, kv: Vec<f32> },
    /// Queries and keys/values rounded to bf16, for the bf16 kernel.
    Bf16 {
        q: Vec<Bf16>,
        kv: Vec<Bf16>,
        kernel: Bf16Kernel,
    },
}

impl Stored for GatheredInputs {
    fn stored_bytes(&self) -> usize {
        match self {
            GatheredInputs::F32 { q, kv } => q.stored_bytes() + kv.stored_bytes(),
            GatheredInputs::Bf16 { q, kv, .. } => q.stored_bytes() + kv.stored_bytes(),
        }
    }
}

/// Context-parallel attention over the cp group.
#[derive(Clone)]
pub struct ContextAttention {
    cp: Arc<dyn Communicator>,
    comm_type: CpCommType,
}

impl std::fmt::Debug for ContextAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextAttention")
            .field("cp", &self.cp.size())
            .field("cp_rank", &self.cp.rank())
            .field("comm_type", &self.comm_type)
            .finish()
    }
}

impl ContextAttention {
    /// Attention over the ranks of `cp`, exchanging data as `comm_type` says.
    pub fn new(cp: Arc<dyn Communicator>, comm_type: CpCommType) -> Self {
        ContextAttention { cp, comm_type }
    }

    /// Attention of this rank's queries to all keys of their sequences. `q` is
    /// `[batch·local_len, heads·head_dim]`, `kv` `[batch·local_len, 2·kv_heads·head_dim]` (key
    /// heads, then value heads); `positions` are this rank's [`local_positions`] and
    /// `shape.q_len = shape.kv_len = local_len`. Returns the output in the layout of `q` and
    /// what the backward needs.
    pub fn forward(
        &self,
        compute: Compute,
        q: &[f32],
        kv: &[f32],
        positions: &[usize],
        shape: MaskedAttentionShape,
        scale: f32,
    ) -> (Vec<f32>, ContextAttentionSaved) {
        let _phase = scope(Phase::Attention);
        self.check_positions(positions, shape);
        if self.uses_all_to_all() {
            self.all_to_all_forward(compute, q, kv, shape, scale)
        } else {
            self.ring_forward(compute, q, kv, positions, shape, scale)
        }
    }

    /// Gradients of the forward's inputs from the output gradient `dout` (layout of `q`);
    /// returns `(dq, dkv)` in the layouts of `q` and `kv`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        compute: Compute,
        saved: ContextAttentionSaved,
        q: &[f32],
        kv: &[f32],
        dout: &[f32],
        positions: &[usize],
        shape: MaskedAttentionShape,
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let _phase = scope(Phase::Attention);
        self.check_positions(positions, shape);
        match saved.gathered {
            Some(ref gathered) => self.all_to_all_backward(&saved, gathered, dout, shape, scale),
            None => self.ring_backward(compute, &saved, q, kv, dout, positions, shape, scale),
        }
    }

    fn uses_all_to_all(&self) -> bool {
        self.comm_type == CpCommType::A2a && self.cp.size() > 1
    }

    /// The other ranks' positions are derived from their ranks, so this rank's must match.
    fn check_positions(&self, positions: &[usize], shape: MaskedAttentionShape) {
        assert_eq!(
            shape.q_len, shape.kv_len,
            "cp attention: q_len differs from kv_len"
        );
        assert!(
            positions == self.positions(shape, self.cp.rank()),
            "cp attention: positions are not local_positions(seq = {}, cp = {}, rank = {})",
            shape.q_len * self.cp.size(),
            self.cp.size(),
            self.cp.rank()
        );
    }

    /// Positions of the tokens that cp rank `rank` holds.
    fn positions(&self, shape: MaskedAttentionShape, rank: usize) -> Vec<usize> {
        let cp = self.cp.size();
        local_positions(shape.q_len * cp, cp, rank)
    }

    /// The rank that sends to this one on the ring, and the one it sends to.
    fn ring_neighbours(&self) -> (usize, usize) {
        let (rank, cp) = (self.cp.rank(), self.cp.size());
        ((rank + cp - 1) % cp, (rank + 1) % cp)
    }

    /// The rank whose key/value block this rank holds after `step` ring steps.
    fn ring_owner(&self, step: usize) -> usize {
        let (rank, cp) = (self.cp.rank(), self.cp.size());
        (rank + cp - step % cp) % cp
    }

    fn ring_forward(
        &self,
        compute: Compute,
        q: &[f32],
        kv: &[f32],
        positions: &[usize],
        shape: MaskedAttentionShape,
        scale: f32,
    ) -> (Vec<f32>, ContextAttentionSaved) {
        let (previous, next) = self.ring_neighbours();
        let blocks = BlockKernels::new(compute, q, None);
        let mut out = vec![0.0; shape.q_elements()];
        let mut current = blocks.pack(kv);
        let mut lse = blocks.forward(&mut out, q, &current, positions, positions, shape, scale);
        let mut incoming = vec![0.0; current.len()];
        let mut part = vec![0.0; out.len()];
        for step in 1..self.cp.size() {
            timed(Phase::CommContext, || {
                comm_ok(self.cp.send_recv(
                    &current,
                    next,
                    &mut incoming,
                    previous,
                    RING_FORWARD_TAG,
                ))
            });
            std::mem::swap(&mut current, &mut incoming);
            let kv_positions = self.positions(shape, self.ring_owner(step));
            if !sees_any(positions, &kv_positions) {
                continue;
            }
            let part_lse = blocks.forward(
                &mut part,
                q,
                &current,
                positions,
                &kv_positions,
                shape,
                scale,
            );
            merge_partial_attention(&mut out, &mut lse, &part, &part_lse, shape);
        }
        let saved = ContextAttentionSaved {
            out: out.clone(),
            lse,
            gathered: None,
        };
        (out, saved)
    }

    #[allow(clippy::too_many_arguments)]
    fn ring_backward(
        &self,
        compute: Compute,
        saved: &ContextAttentionSaved,
        q: &[f32],
        kv: &[f32],
        dout: &[f32],
        positions: &[usize],
        shape: MaskedAttentionShape,
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let (previous, next) = self.ring_neighbours();
        let blocks = BlockKernels::new(compute, q, Some(dout));
        let row_dots = blocks.row_dots(dout, &saved.out, shape);
        let mut dq = vec![0.0; q.len()];
        // The travelling block: keys/values followed by their gradient accumulator.
        let packed = blocks.pack(kv);
        let packed_len = packed.len();
        let mut travelling = [packed.as_slice(), &vec![0.0; kv.len()]].concat();
        let mut incoming = vec![0.0; travelling.len()];
        for step in 0..self.cp.size() {
            if step > 0 {
                timed(Phase::CommContext, || {
                    comm_ok(self.cp.send_recv(
                        &travelling,
                        next,
                        &mut incoming,
                        previous,
                        RING_BACKWARD_TAG,
                    ))
                });
                std::mem::swap(&mut travelling, &mut incoming);
            }
            let kv_positions = self.positions(shape, self.ring_owner(step));
            if !sees_any(positions, &kv_positions) {
                continue;
            }
            let (block_kv, block_dkv) = travelling.split_at_mut(packed_len);
            blocks.backward(
                &mut dq,
                block_dkv,
                dout,
                q,
                block_kv,
                &saved.lse,
                &row_dots,
                positions,
                &kv_positions,
                shape,
                scale,
            );
        }
        // The last block came from the next rank: one more step returns its gradient.
        let accumulated = travelling.split_off(packed_len);
        if self.cp.size() == 1 {
            return (dq, accumulated);
        }
        let mut dkv = vec![0.0; kv.len()];
        timed(Phase::CommContext, || {
            comm_ok(
                self.cp
                    .send_recv(&accumulated, next, &mut dkv, previous, RING_BACKWARD_TAG),
            )
        });
        (dq, dkv)
    }

    /// How q and kv split into head slices over cp; panics unless the heads divide.
    fn head_splits(&self, shape: MaskedAttentionShape) -> (HeadSplit, HeadSplit) {
        let cp = self.cp.size();
        assert!(
            shape.heads.is_multiple_of(cp) && shape.kv_heads.is_multiple_of(cp),
            "cp_comm_type a2a needs heads ({}) and kv heads ({}) divisible by cp = {cp}",
            shape.heads,
            shape.kv_heads
        );
        let split = |segments, heads: usize| HeadSplit {
            batch: shape.batch,
            local_len: shape.q_len,
            segments,
            width: heads / cp * shape.head_dim,
            cp,
        };
        (split(1, shape.heads), split(2, shape.kv_heads))
    }

    /// The kernel shape after the a2a exchange: every token, this rank's head slice.
    fn head_split_shape(&self, shape: MaskedAttentionShape) -> MaskedAttentionShape {
        let cp = self.cp.size();
        MaskedAttentionShape {
            q_len: shape.q_len * cp,
            kv_len: shape.kv_len * cp,
            heads: shape.heads / cp,
            kv_heads: shape.kv_heads / cp,
            ..shape
        }
    }

    /// Positions of every token after the a2a exchange: the ranks' local tokens in rank order.
    fn all_positions(&self, shape: MaskedAttentionShape) -> Vec<usize> {
        (0..self.cp.size())
            .flat_map(|rank| self.positions(shape, rank))
            .collect()
    }

    fn all_to_all_forward(
        &self,
        compute: Compute,
        q: &[f32],
        kv: &[f32],
        shape: MaskedAttentionShape,
        scale: f32,
    ) -> (Vec<f32>, ContextAttentionSaved) {
        let (q_split, kv_split) = self.head_splits(shape);
        let full = self.head_split_shape(shape);
        let positions = self.all_positions(shape);
        let cp = &*self.cp;
        let mut out_full = vec![0.0; full.q_elements()];
        let (lse, out, gathered) = match compute {
            Compute::F32 => {
                let q = sequence_to_heads(cp, q, q_split);
                let kv = sequence_to_heads(cp, kv, kv_split);
                let lse = masked_attention_forward(
                    &mut out_full,
                    &q,
                    &kv,
                    &positions,
                    &positions,
                    full,
                    scale,
                );
                let out = heads_to_sequence(cp, &out_full, q_split);
                (lse, out, GatheredInputs::F32 { q, kv })
            }
            Compute::Bf16(kernel) => {
                let q = sequence_to_heads(cp, &round_to_bf16(q), q_split);
                let kv = sequence_to_heads(cp, &round_to_bf16(kv), kv_split);
                let lse = masked_attention_forward_bf16(
                    &mut out_full,
                    &q,
                    &kv,
                    &positions,
                    &positions,
                    full,
                    scale,
                    kernel,
                );
                let out = widen(&heads_to_sequence(cp, &round_to_bf16(&out_full), q_split));
                (lse, out, GatheredInputs::Bf16 { q, kv, kernel })
            }
        };
        let saved = ContextAttentionSaved {
            out: out_full,
            lse,
            gathered: Some(gathered),
        };
        (out, saved)
    }

    fn all_to_all_backward(
        &self,
        saved: &ContextAttentionSaved,
        gathered: &GatheredInputs,
        dout: &[f32],
        shape: MaskedAttentionShape,
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let (q_split, kv_split) = self.head_splits(shape);
        let full = self.head_split_shape(shape);
        let positions = self.all_positions(shape);
        let cp = &*self.cp;
        let mut dq_full = vec![0.0; full.q_elements()];
        let mut dkv_full = vec![0.0; full.kv_elements()];
        match gathered {
            GatheredInputs::F32 { q, kv } => {
                let dout = sequence_to_heads(cp, dout, q_split);
                let row_dots = attention_row_dots(&dout, &saved.out, full);
                masked_attention_backward(
                    &mut dq_full,
                    &mut dkv_full,
                    &dout,
                    q,
                    kv,
                    &saved.lse,
                    &row_dots,
                    &positions,
                    &positions,
                    full,
                    scale,
                );
            }
            GatheredInputs::Bf16 { q, kv, kernel } => {
                let dout = sequence_to_heads(cp, &round_to_bf16(dout), q_split);
                let row_dots = attention_row_dots(&widen(&dout), &saved.out, full);
                masked_attention_backward_bf16(
                    &mut dq_full,
                    &mut dkv_full,
                    &dout,
                    q,
                    kv,
                    &saved.lse,
                    &row_dots,
                    &positions,
                    &positions,
                    full,
                    scale,
                    *kernel,
                );
            }
        }
        (
            heads_to_sequence(cp, &dq_full, q_split),
            heads_to_sequence(cp, &dkv_full, kv_split),
        )
    }
}

/// The masked attention kernels of the compute precision for one call's blocks: f32, or bf16
/// with the queries (and the output gradient) rounded once and the key/value blocks rounded
/// before they travel, two values to a communicator word ([`BlockKernels::pack`]).
pub struct BlockKernels {
    kernel: Option<Bf16Kernel>,
    q: Vec<Bf16>,
    dout: Vec<Bf16>,
}

impl BlockKernels {
    /// The kernels of `compute` for the queries `q` (and, for a backward, the output gradient
    /// `dout`), rounded once in bf16.
    pub fn new(compute: Compute, q: &[f32], dout: Option<&[f32]>) -> Self {
        match compute {
            Compute::F32 => BlockKernels {
                kernel: None,
                q: Vec::new(),
                dout: Vec::new(),
            },
            Compute::Bf16(kernel) => BlockKernels {
                kernel: Some(kernel),
                q: round_to_bf16(q),
                dout: dout.map(round_to_bf16).unwrap_or_default(),
            },
        }
    }

    /// A key/value block as it travels and as `forward` and `backward` take it: f32, or its
    /// bf16 rounding packed two to a word (every kv block has an even length: keys and values).
    pub fn pack(&self, kv: &[f32]) -> Vec<f32> {
        match self.kernel {
            None => kv.to_vec(),
            Some(_) => round_to_words(kv),
        }
    }

    /// This rank's queries against one key/value block (as [`BlockKernels::pack`] made it),
    /// masked by positions: writes `out`, returns the log-sum-exp per (row, head).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        out: &mut [f32],
        q: &[f32],
        kv: &[f32],
        q_positions: &[usize],
        kv_positions: &[usize],
        shape: MaskedAttentionShape,
        scale: f32,
    ) -> Vec<f32> {
        match self.kernel {
            None => masked_attention_forward(out, q, kv, q_positions, kv_positions, shape, scale),
            Some(kernel) => masked_attention_forward_bf16(
                out,
                &self.q,
                words_as_bf16(kv),
                q_positions,
                kv_positions,
                shape,
                scale,
                kernel,
            ),
        }
    }

    /// `D = Σ dO∘O` of the output gradient the kernels see (rounded in bf16).
    pub fn row_dots(&self, dout: &[f32], out: &[f32], shape: MaskedAttentionShape) -> Vec<f32> {
        match self.kernel {
            None => attention_row_dots(dout, out, shape),
            Some(_) => attention_row_dots(&widen(&self.dout), out, shape),
        }
    }

    /// Backward of [`BlockKernels::forward`] for one block: adds into `dq` and the block's
    /// `dkv` from the merged output's `lse` and `row_dots`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dq: &mut [f32],
        dkv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        kv: &[f32],
        lse: &[f32],
        row_dots: &[f32],
        q_positions: &[usize],
        kv_positions: &[usize],
        shape: MaskedAttentionShape,
        scale: f32,
    ) {
        match self.kernel {
            None => masked_attention_backward(
                dq,
                dkv,
                dout,
                q,
                kv,
                lse,
                row_dots,
                q_positions,
                kv_positions,
                shape,
                scale,
            ),
            Some(kernel) => masked_attention_backward_bf16(
                dq,
                dkv,
                &self.dout,
                &self.q,
                words_as_bf16(kv),
                lse,
                row_dots,
                q_positions,
                kv_positions,
                shape,
                scale,
                kernel,
            ),
        }
    }
}

/// Whether any query at `q_positions` sees any key at `kv_positions`.
fn sees_any(q_positions: &[usize], kv_positions: &[usize]) -> bool {
    let last_query = q_positions.iter().max();
    kv_positions
        .iter()
        .min()
        .zip(last_query)
        .is_some_and(|(k, q)| k <= q)
}

/// How the rows of a sequence-split tensor cut into per-rank head slices: each row is
/// `segments` parts (q: 1; kv: keys, values), each part `cp` slices of `width` columns.
#[derive(Clone, Copy, Debug)]
struct HeadSplit {
    batch: usize,
    local_len: usize,
    segments: usize,
    width: usize,
    cp: usize,
}

impl HeadSplit {
    /// Columns of a row after the exchange (one head slice of every segment).
    fn sliced_row(&self) -> usize {
        self.segments * self.width
    }

    /// Columns of a row before the exchange (every head slice).
    fn full_row(&self) -> usize {
        self.sliced_row() * self.cp
    }

    /// Where slice `rank` of `segment` starts in a full row.
    fn slice_offset(&self, segment: usize, rank: usize) -> usize {
        (segment * self.cp + rank) * self.width
    }
}

/// A value the a2a exchange moves: f32 as it is, bf16 two to a communicator word.
trait Exchanged: Copy + Default {
    /// Values in one communicator word.
    const PER_WORD: usize;
    /// `values` as the communicator's words.
    fn into_words(values: Vec<Self>) -> Vec<f32>;
    /// The values that `words` carry.
    fn from_words(words: &[f32]) -> &[Self];
}

impl Exchanged for f32 {
    const PER_WORD: usize = 1;

    fn into_words(values: Vec<f32>) -> Vec<f32> {
        values
    }

    fn from_words(words: &[f32]) -> &[f32] {
        words
    }
}

impl Exchanged for Bf16 {
    const PER_WORD: usize = 2;

    fn into_words(values: Vec<Bf16>) -> Vec<f32> {
        bf16_words(&values)
    }

    fn from_words(words: &[f32]) -> &[Bf16] {
        words_as_bf16(words)
    }
}

/// The all-to-all of `send`, `count` values to every rank; the words received, in rank order.
fn exchange<T: Exchanged>(comm: &dyn Communicator, send: Vec<T>, count: usize) -> Vec<f32> {
    // A rank's part is whole rows of head slices, and head_dim is even (RoPE's pairs).
    assert!(
        count.is_multiple_of(T::PER_WORD),
        "{count} values per rank do not fill whole words"
    );
    let words = T::into_words(send);
    let counts = vec![count / T::PER_WORD; comm.size()];
    let mut received = vec![0.0; words.len()];
    timed(Phase::CommContext, || {
        comm_ok(comm.all_to_all_v(&words, &counts, &mut received, &counts))
    });
    received
}

/// a2a forward: from `x[batch·local_len, full row]` (this rank's tokens, all heads) to
/// `[batch][source rank][local index][sliced row]` (every token, this rank's head slice).
fn sequence_to_heads<T: Exchanged>(comm: &dyn Communicator, x: &[T], split: HeadSplit) -> Vec<T> {
    let rows = split.batch * split.local_len;
    assert_eq!(
        x.len(),
        rows * split.full_row(),
        "context-parallel input size"
    );
    let mut send = Vec::with_capacity(x.len());
    for rank in 0..split.cp {
        for row in x.chunks(split.full_row()) {
            for segment in 0..split.segments {
                let at = split.slice_offset(segment, rank);
                send.extend_from_slice(&row[at..at + split.width]);
            }
        }
    }
    let received = exchange(comm, send, rows * split.sliced_row());
    let received = T::from_words(&received);
    // Received as [source rank][batch][local index]; sequences first.
    let sequence_part = split.local_len * split.sliced_row();
    let mut gathered = Vec::with_capacity(x.len());
    for b in 0..split.batch {
        for source in 0..split.cp {
            let at = (source * split.batch + b) * sequence_part;
            gathered.extend_from_slice(&received[at..at + sequence_part]);
        }
    }
    gathered
}

/// a2a backward (and the output's way back): the inverse of [`sequence_to_heads`].
fn heads_to_sequence<T: Exchanged>(comm: &dyn Communicator, x: &[T], split: HeadSplit) -> Vec<T> {
    let rows = split.batch * split.local_len;
    assert_eq!(
        x.len(),
        rows * split.full_row(),
        "context-parallel output size"
    );
    let sequence_part = split.local_len * split.sliced_row();
    let mut send = Vec::with_capacity(x.len());
    for rank in 0..split.cp {
        for b in 0..split.batch {
            let at = (b * split.cp + rank) * sequence_part;
            send.extend_from_slice(&x[at..at + sequence_part]);
        }
    }
    let received = exchange(comm, send, rows * split.sliced_row());
    let received = T::from_words(&received);
    // Received as [source rank = head slice][row][segment]; put each slice in its columns.
    let mut local = vec![T::default(); x.len()];
    let slices = received.chunks(split.width);
    for (index, slice) in slices.enumerate() {
        let segment = index % split.segments;
        let row = index / split.segments % rows;
        let rank = index / split.segments / rows;
        let at = row * split.full_row() + split.slice_offset(segment, rank);
        local[at..at + split.width].copy_from_slice(slice);
    }
    local
}

impl Stored for ContextAttentionSaved {
    fn stored_bytes(&self) -> usize {
        self.out.stored_bytes() + self.lse.stored_bytes() + self.gathered.stored_bytes()
    }
}
