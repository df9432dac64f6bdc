//! Context-parallel attention against the causal kernel on whole sequences: every rank's output
//! rows and its dq, dk, dv rows must equal the reference rows of its tokens, for both exchanges
//! (ring `p2p`, Ulysses `a2a`), several cp sizes, GQA and chunk sizes that cross tile edges;
//! in f32 against the f32 kernel, and in bf16 against the causal bf16 kernel of the same
//! (bf16-valued) inputs.

use origami::compute::Compute;
use origami::layers::context_parallel::{local_positions, ContextAttention, CpCommType};
use origami_comm::local::LocalWorld;
use origami_kernels::attention::{
    attention_backward, attention_forward, AttentionShape, QkvLayout,
};
use origami_kernels::attention_bf16::{attention_backward_bf16, attention_forward_bf16};
use origami_kernels::bf16::{to_bf16_vec, to_f32_vec};
use origami_kernels::masked_attention::MaskedAttentionShape;
use origami_kernels::matmul_bf16::Bf16Kernel;
use origami_kernels::testing::random_vec;

const TOLERANCE: f32 = 1e-5;
/// bf16: the ring and the one-call reference round each probability against their own running
/// maxima, so a weight may differ by `u₁₆ = 2⁻⁸` relative on each side, and `dS` once more.
const BF16_TOLERANCE: f32 = 4.0 / 256.0;
const BATCH: usize = 2;
const HEAD_DIM: usize = 8;

#[derive(Clone, Copy, Debug)]
struct Case {
    cp: usize,
    comm_type: CpCommType,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    compute: Compute,
}

/// Whole-sequence tensors and the causal kernel's results on them, in compact layouts.
struct Reference {
    q: Vec<f32>,
    kv: Vec<f32>,
    dout: Vec<f32>,
    out: Vec<f32>,
    dq: Vec<f32>,
    dkv: Vec<f32>,
}

impl Case {
    fn q_width(&self) -> usize {
        self.heads * HEAD_DIM
    }

    fn kv_width(&self) -> usize {
        2 * self.kv_heads * HEAD_DIM
    }

    fn scale(&self) -> f32 {
        1.0 / (HEAD_DIM as f32).sqrt()
    }

    fn reference(&self) -> Reference {
        let rows = BATCH * self.seq;
        let (qw, kw) = (self.q_width(), self.kv_width());
        let representable = |x: Vec<f32>| match self.compute {
            Compute::F32 => x,
            Compute::Bf16(_) => to_f32_vec(&to_bf16_vec(&x)),
        };
        let q = representable(random_vec(rows * qw, 1).iter().map(|v| v * 2.0).collect());
        let kv = representable(random_vec(rows * kw, 2).iter().map(|v| v * 2.0).collect());
        let dout = representable(random_vec(rows * qw, 3));
        let qkv: Vec<f32> = (0..rows)
            .flat_map(|r| {
                q[r * qw..(r + 1) * qw]
                    .iter()
                    .chain(&kv[r * kw..(r + 1) * kw])
            })
            .copied()
            .collect();
        let layout = QkvLayout {
            row_stride: qw + kw,
            q_offset: 0,
            k_offset: qw,
            v_offset: qw + kw / 2,
        };
        let shape = AttentionShape {
            batch: BATCH,
            seq: self.seq,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: HEAD_DIM,
        };
        let mut out = vec![0.0; rows * qw];
        let mut dqkv = vec![0.0; qkv.len()];
        match self.compute {
            Compute::F32 => {
                let lse = attention_forward(&mut out, &qkv, layout, shape, self.scale());
                attention_backward(
                    &mut dqkv,
                    &dout,
                    &out,
                    &qkv,
                    &lse,
                    layout,
                    shape,
                    self.scale(),
                );
            }
            Compute::Bf16(kernel) => {
                let qkv = to_bf16_vec(&qkv);
                let lse =
                    attention_forward_bf16(&mut out, &qkv, layout, shape, self.scale(), kernel);
                attention_backward_bf16(
                    &mut dqkv,
                    &to_bf16_vec(&dout),
                    &out,
                    &qkv,
                    &lse,
                    layout,
                    shape,
                    self.scale(),
                    kernel,
                );
            }
        }
        let dq = dqkv
            .chunks(qw + kw)
            .flat_map(|r| &r[..qw])
            .copied()
            .collect();
        let dkv = dqkv
            .chunks(qw + kw)
            .flat_map(|r| &r[qw..])
            .copied()
            .collect();
        Reference {
            q,
            kv,
            dout,
            out,
            dq,
            dkv,
        }
    }

    /// The rows of `rank`'s tokens of a whole-sequence tensor with `width` columns.
    fn local_rows(&self, x: &[f32], width: usize, rank: usize) -> Vec<f32> {
        let positions = local_positions(self.seq, self.cp, rank);
        (0..BATCH)
            .flat_map(|b| positions.iter().map(move |&p| b * self.seq + p))
            .flat_map(|row| &x[row * width..(row + 1) * width])
            .copied()
            .collect()
    }
}

/// Largest difference relative to the largest reference value.
fn relative_error(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len());
    let diff = actual
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    diff / expected.iter().map(|v| v.abs()).fold(0.0, f32::max)
}

/// Runs the case on `cp` ranks; per rank the relative errors of out, dq, dkv.
fn run(case: Case) -> Vec<[f32; 3]> {
    let reference = case.reference();
    LocalWorld::new(case.cp)
        .run(|world| {
            let rank = world.rank();
            let attention = ContextAttention::new(world, case.comm_type);
            let positions = local_positions(case.seq, case.cp, rank);
            let shape = MaskedAttentionShape {
                batch: BATCH,
                q_len: positions.len(),
                kv_len: positions.len(),
                heads: case.heads,
                kv_heads: case.kv_heads,
                head_dim: HEAD_DIM,
            };
            let q = case.local_rows(&reference.q, case.q_width(), rank);
            let kv = case.local_rows(&reference.kv, case.kv_width(), rank);
            let dout = case.local_rows(&reference.dout, case.q_width(), rank);
            let (out, saved) =
                attention.forward(case.compute, &q, &kv, &positions, shape, case.scale());
            let (dq, dkv) = attention.backward(
                case.compute,
                saved,
                &q,
                &kv,
                &dout,
                &positions,
                shape,
                case.scale(),
            );
            let expected = |x: &[f32], width| case.local_rows(x, width, rank);
            Ok::<_, origami_comm::CommError>([
                relative_error(&out, &expected(&reference.out, case.q_width())),
                relative_error(&dq, &expected(&reference.dq, case.q_width())),
                relative_error(&dkv, &expected(&reference.dkv, case.kv_width())),
            ])
        })
        .unwrap_or_else(|error| panic!("{case:?}: {error}"))
}

fn assert_matches_reference(case: Case) {
    let tolerance = match case.compute {
        Compute::F32 => TOLERANCE,
        Compute::Bf16(_) => BF16_TOLERANCE,
    };
    for (rank, errors) in run(case).iter().enumerate() {
        assert!(
            errors.iter().all(|&e| e <= tolerance),
            "{case:?} rank {rank}: relative errors of out, dq, dkv {errors:?}"
        );
    }
}

/// Chunk sizes 1, 3 and 70 (the last spans several 64-row tiles).
fn sequence_lengths(cp: usize) -> [usize; 3] {
    [2 * cp, 2 * cp * 3, 2 * cp * 70]
}

#[test]
fn ring_attention_matches_whole_sequence_attention() {
    for cp in [1, 2, 3, 4] {
        for seq in sequence_lengths(cp) {
            assert_matches_reference(Case {
                cp,
                comm_type: CpCommType::P2p,
                seq,
                heads: 4,
                kv_heads: 2,
                compute: Compute::F32,
            });
        }
    }
}

#[test]
fn bf16_context_attention_tracks_the_causal_bf16_kernel() {
    let compute = Compute::Bf16(Bf16Kernel::detect());
    for (cp, comm_type) in [
        (1, CpCommType::P2p),
        (2, CpCommType::P2p),
        (4, CpCommType::P2p),
        (2, CpCommType::A2a),
    ] {
        for seq in sequence_lengths(cp) {
            assert_matches_reference(Case {
                cp,
                comm_type,
                seq,
                heads: 4,
                kv_heads: 2,
                compute,
            });
        }
    }
}

#[test]
fn all_to_all_attention_matches_whole_sequence_attention() {
    for (cp, heads, kv_heads) in [(1, 4, 2), (2, 4, 2), (3, 6, 3), (4, 8, 4)] {
        for seq in sequence_lengths(cp) {
            assert_matches_reference(Case {
                cp,
                comm_type: CpCommType::A2a,
                seq,
                heads,
                kv_heads,
                compute: Compute::F32,
            });
        }
    }
}

#[test]
fn all_to_all_rejects_heads_that_cp_does_not_divide() {
    let case = Case {
        cp: 4,
        comm_type: CpCommType::A2a,
        seq: 8,
        heads: 8,
        kv_heads: 2,
        compute: Compute::F32,
    };
    let failure = std::panic::catch_unwind(|| run(case)).unwrap_err();
    let message = failure
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("heads (8) and kv heads (2) divisible by cp = 4"),
        "{message}"
    );
}

#[test]
fn local_positions_partition_the_sequence() {
    for cp in 1..=4 {
        let seq = 2 * cp * 3;
        let mut all: Vec<usize> = (0..cp)
            .flat_map(|rank| local_positions(seq, cp, rank))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..seq).collect::<Vec<_>>(), "cp {cp}");
    }
    assert_eq!(local_positions(8, 2, 0), vec![0, 1, 6, 7]);
    assert_eq!(local_positions(8, 2, 1), vec![2, 3, 4, 5]);
}

#[test]
#[should_panic(expected = "sequence length 10 divisible by 2·cp = 6")]
fn indivisible_sequence_is_rejected() {
    local_positions(10, 3, 0);
}
