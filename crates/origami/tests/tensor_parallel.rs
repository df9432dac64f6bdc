//! Tensor and sequence parallelism against unsharded computation, values and gradients:
//! vocabulary-parallel cross-entropy and embedding, RMSNorm on sequence-parallel slices with
//! the all-gather / reduce-scatter around the parallel regions, and the bf16 gather of a
//! region's GEMM input.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use origami::compute::{round_to_bf16, Activation, Compute, WeightCopies};
use origami::equivalence::relative_error;
use origami::layers::tensor_parallel::TensorParallel;
use origami::layers::vocab_parallel::VocabParallel;
use origami::params::Buffers;
use origami_comm::local::LocalWorld;
use origami_comm::{Communicator, CountedComm, ReduceOp};
use origami_kernels::cross_entropy::{cross_entropy_forward_backward, IGNORE_TARGET};
use origami_kernels::embedding::{embedding_backward, embedding_forward};
use origami_kernels::matmul_bf16::Bf16Kernel;
use origami_kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use origami_kernels::testing::random_vec;

const TOLERANCE: f64 = 1e-5;

/// Runs `body` on `ranks` local ranks and returns each rank's largest error.
fn on_ranks(ranks: usize, body: impl Fn(Arc<dyn Communicator>) -> f64 + Sync) -> Vec<f64> {
    LocalWorld::new(ranks)
        .run(|world| Ok::<_, String>(body(world)))
        .unwrap()
}

/// Columns `range` of every row of `matrix[rows, width]`.
fn columns(matrix: &[f32], width: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    matrix
        .chunks(width)
        .flat_map(|row| row[range.clone()].iter().copied())
        .collect()
}

#[test]
fn vocab_parallel_cross_entropy_matches_the_whole_vocabulary() {
    let (rows, vocab, scale) = (7, 12, 0.3);
    let logits: Vec<f32> = random_vec(rows * vocab, 1)
        .iter()
        .map(|v| v * 4.0)
        .collect();
    let targets = [3, 11, IGNORE_TARGET, 0, 6, 7, 5];
    let mut expected_grad = logits.clone();
    let expected = cross_entropy_forward_backward(&mut expected_grad, &targets, vocab, 0.0, scale);
    for tp in [1, 2, 3, 4] {
        let errors = on_ranks(tp, |world| {
            let vocab_parallel = VocabParallel::new(TensorParallel::new(world), vocab);
            let range = vocab_parallel.range();
            let mut local = columns(&logits, vocab, range.clone());
            let rows_loss = vocab_parallel.cross_entropy_rows(&local, &targets);
            let sums = vocab_parallel.cross_entropy_forward_backward(&mut local, &targets, scale);
            assert_eq!(sums.rows, expected.rows);
            let loss_error = ((sums.cross_entropy - expected.cross_entropy)
                / expected.cross_entropy)
                .abs()
                .max(((sums.z_squared - expected.z_squared) / expected.z_squared).abs());
            let rows_error =
                (rows_loss.iter().map(|&l| l as f64).sum::<f64>() - expected.cross_entropy).abs()
                    / expected.cross_entropy;
            loss_error.max(rows_error).max(relative_error(
                &local,
                &columns(&expected_grad, vocab, range),
            ))
        });
        assert!(
            errors.iter().all(|&e| e <= TOLERANCE),
            "tp {tp}: {errors:?}"
        );
    }
}

#[test]
fn vocab_parallel_embedding_sums_to_the_lookup_and_scatters_gradients() {
    let (vocab, width) = (12, 5);
    let table = random_vec(vocab * width, 2);
    let tokens = [0u32, 11, 5, 5, 6, 1, 11];
    let dout = random_vec(tokens.len() * width, 3);
    let mut expected = vec![0.0; tokens.len() * width];
    embedding_forward(&mut expected, &table, &tokens, width);
    let mut expected_grad = vec![0.0; table.len()];
    embedding_backward(&mut expected_grad, &dout, &tokens, width);
    for tp in [2, 3, 4] {
        let errors = on_ranks(tp, |world| {
            let vocab_parallel = VocabParallel::new(TensorParallel::new(world.clone()), vocab);
            let range = vocab_parallel.range();
            let rows = range.start * width..range.end * width;
            let mut out = vocab_parallel.embed(&table[rows.clone()], &tokens, width);
            world.all_reduce(&mut out, ReduceOp::Sum).unwrap();
            let mut grad = vec![0.0; rows.len()];
            vocab_parallel.embed_backward(&mut grad, &dout, &tokens, width);
            relative_error(&out, &expected).max(relative_error(&grad, &expected_grad[rows]))
        });
        assert!(
            errors.iter().all(|&e| e <= TOLERANCE),
            "tp {tp}: {errors:?}"
        );
    }
}

/// This rank's sequence-parallel rows of `all[batch][seq][width]`.
fn slice_rows(all: &[f32], batch: usize, width: usize, tp: &TensorParallel) -> Vec<f32> {
    let seq = all.len() / batch / width;
    let part = tp.part(seq);
    (0..batch)
        .flat_map(|b| {
            let start = (b * seq + part.start) * width;
            all[start..start + part.len() * width].iter().copied()
        })
        .collect()
}

#[test]
fn sequence_parallel_norm_matches_the_whole_sequence() {
    let (batch, width, eps) = (2, 8, 1e-5);
    // Parts of 1 and 3 tokens per rank, and sequences of 12 over 2, 3 and 4 ranks.
    for (tp, seq) in [(2, 2), (4, 4), (2, 6), (3, 9), (4, 12)] {
        let x = random_vec(batch * seq * width, 4);
        let weight: Vec<f32> = random_vec(width, 5).iter().map(|v| 1.0 + v).collect();
        let dy = random_vec(x.len(), 6);
        let mut y = vec![0.0; x.len()];
        let rstd = rmsnorm_forward(&mut y, &x, &weight, width, eps);
        let (mut dx, mut dweight) = (vec![0.0; x.len()], vec![0.0; width]);
        rmsnorm_backward(&mut dx, &mut dweight, &dy, &x, &weight, &rstd, width);
        let errors = on_ranks(tp, |world| {
            let tp = TensorParallel::new(world);
            let x_local = slice_rows(&x, batch, width, &tp);
            let mut y_local = vec![0.0; x_local.len()];
            let rstd_local = rmsnorm_forward(&mut y_local, &x_local, &weight, width, eps);
            // Entering a parallel region: the normalised slices gathered are the whole output.
            let gathered = tp.gather_sequence(y_local, batch, width);
            // Leaving it: every rank holds a partial sum of the region's output gradient (here
            // dy split into tp unequal parts); the reduce-scatter gives this rank's slice of dy.
            let share = (tp.rank() + 1) as f32 / (tp.size() * (tp.size() + 1) / 2) as f32;
            let partial: Vec<f32> = dy.iter().map(|v| v * share).collect();
            let dy_local = tp.scatter_sequence(partial, batch, width);
            let (mut dx_local, mut dweight_local) = (vec![0.0; x_local.len()], vec![0.0; width]);
            rmsnorm_backward(
                &mut dx_local,
                &mut dweight_local,
                &dy_local,
                &x_local,
                &weight,
                &rstd_local,
                width,
            );
            // The norm weight is whole on every rank: its gradient is summed over tp.
            tp.all_reduce(&mut dweight_local, ReduceOp::Sum);
            relative_error(&gathered, &y)
                .max(relative_error(
                    &dy_local,
                    &slice_rows(&dy, batch, width, &tp),
                ))
                .max(relative_error(
                    &dx_local,
                    &slice_rows(&dx, batch, width, &tp),
                ))
                .max(relative_error(&dweight_local, &dweight))
        });
        assert!(
            errors.iter().all(|&e| e <= TOLERANCE),
            "tp {tp}, seq {seq}: {errors:?}"
        );
    }
}

#[test]
fn bf16_input_gather_is_the_rounded_f32_gather_in_half_the_bytes() {
    let buffers = Buffers {
        dense: Vec::new(),
        expert: Vec::new(),
    };
    let bf16 = WeightCopies::new(Compute::Bf16(Bf16Kernel::Portable), &buffers);
    let f32_copies = WeightCopies::new(Compute::F32, &buffers);
    // Parts of 1 and 3 tokens; width 3 with one token per rank is an odd slice (gathered in
    // f32 and rounded after).
    for (tp, batch, seq, width) in [(2, 2, 2, 8), (3, 1, 9, 6), (4, 3, 4, 2), (2, 1, 2, 3)] {
        let x: Vec<f32> = random_vec(batch * seq * width, 7)
            .iter()
            .map(|v| v * 3.0)
            .collect();
        let expected = round_to_bf16(&x);
        let sent = LocalWorld::new(tp)
            .run(|world| {
                let (counted, bytes) = CountedComm::wrap(world);
                let tp = TensorParallel::new(counted);
                let local = slice_rows(&x, batch, width, &tp);
                let gathered =
                    tp.gather_activation(&bf16.weights(&buffers), local.clone(), batch, width);
                let bf16_bytes = bytes.swap(0, Ordering::SeqCst);
                let f32_gathered =
                    tp.gather_activation(&f32_copies.weights(&buffers), local, batch, width);
                let f32_bytes = bytes.load(Ordering::SeqCst);
                assert_eq!(
                    gathered,
                    Activation::Bf16(expected.clone()),
                    "tp {}",
                    tp.size()
                );
                assert_eq!(f32_gathered, Activation::F32(x.clone()));
                Ok::<_, String>((bf16_bytes, f32_bytes))
            })
            .unwrap();
        for (bf16_bytes, f32_bytes) in sent {
            if width % 2 == 0 {
                assert_eq!(2 * bf16_bytes, f32_bytes, "tp {tp}, width {width}");
            } else {
                assert_eq!(bf16_bytes, f32_bytes, "tp {tp}, width {width}");
            }
            assert!(f32_bytes > 0);
        }
    }
}
