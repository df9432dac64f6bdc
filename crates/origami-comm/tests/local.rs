//! The local backend: the conformance suite on 1..8 ranks, failure handling (panic, timeout,
//! disagreeing arguments) and the non-blocking stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use origami_comm::local::{JobError, LocalWorld, RankError};
use origami_comm::{conformance, CommError, CommStream, Communicator, Failure, Op, ReduceOp};
use proptest::prelude::*;

#[test]
fn conformance_suite_passes_on_one_to_eight_ranks() {
    for size in 1..=8 {
        let checks = LocalWorld::new(size)
            .with_timeout(Duration::from_secs(30))
            .run(|world| conformance::run_all(world.as_ref()))
            .unwrap_or_else(|error| panic!("{size} ranks: {error}"));
        assert_eq!(checks, vec![11; size]);
    }
}

/// The communicator error a failed rank returned.
fn comm_error(error: &RankError) -> &CommError {
    match error {
        RankError::Failed(error) => error.downcast_ref::<CommError>().expect("a CommError"),
        RankError::Panicked(message) => panic!("unexpected panic: {message}"),
    }
}

fn failures(result: Result<Vec<()>, JobError>) -> JobError {
    result.expect_err("the job must fail")
}

#[test]
fn a_rank_panicking_mid_all_to_all_fails_every_rank_quickly() {
    let started = Instant::now();
    let error = failures(
        LocalWorld::new(8)
            .with_timeout(Duration::from_secs(120))
            .run(|world| {
                let size = world.size();
                let counts = vec![2; size];
                let send = vec![1.0; 2 * size];
                let mut recv = vec![0.0; 2 * size];
                world.all_to_all_v(&send, &counts, &mut recv, &counts)?;
                if world.rank() == 3 {
                    panic!("injected failure on rank 3");
                }
                world.all_to_all_v(&send, &counts, &mut recv, &counts)?;
                Ok::<_, CommError>(())
            }),
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(error.failures.len(), 8, "{error}");
    for (rank, failure) in &error.failures {
        if *rank == 3 {
            assert!(
                matches!(failure, RankError::Panicked(message) if message.contains("injected"))
            );
            continue;
        }
        match comm_error(failure) {
            CommError::Aborted {
                rank: reporter,
                op,
                cause,
            } => {
                assert_eq!((*reporter, *op), (*rank, Op::AllToAllV));
                assert!(
                    matches!(cause, Failure::Panicked { rank: 3, .. }),
                    "{cause}"
                );
            }
            other => panic!("rank {rank}: unexpected {other}"),
        }
        let text = comm_error(failure).to_string();
        assert!(
            text.contains("all_to_all_v") && text.contains("rank 3 panicked"),
            "{text}"
        );
    }
}

#[test]
fn a_rank_that_never_arrives_times_out_everyone_naming_it() {
    let started = Instant::now();
    let error = failures(
        LocalWorld::new(4)
            .with_timeout(Duration::from_millis(300))
            .run(|world| {
                if world.rank() != 1 {
                    world.all_reduce(&mut [1.0], ReduceOp::Sum)?;
                }
                Ok::<_, CommError>(())
            }),
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let ranks: Vec<usize> = error.failures.iter().map(|(rank, _)| *rank).collect();
    assert_eq!(ranks, vec![0, 2, 3]);
    for (_, failure) in &error.failures {
        let timed_out = match comm_error(failure) {
            CommError::TimedOut(failure) => failure.clone(),
            CommError::Aborted {
                op: Op::AllReduce,
                cause,
                ..
            } => cause.clone(),
            other => panic!("unexpected {other}"),
        };
        assert!(
            matches!(&timed_out, Failure::TimedOut { op: Op::AllReduce, missing, .. } if missing == &vec![1]),
            "{timed_out}"
        );
    }
}

#[test]
fn an_unreceived_send_times_out_and_is_withdrawn() {
    let error = failures(
        LocalWorld::new(2)
            .with_timeout(Duration::from_millis(200))
            .run(|world| {
                if world.rank() == 0 {
                    world.send(&[1.0, 2.0], 1, 5)?;
                }
                Ok::<_, CommError>(())
            }),
    );
    assert_eq!(error.failures.len(), 1);
    assert!(matches!(
        comm_error(&error.failures[0].1),
        CommError::TimedOut(Failure::TimedOut { rank: 0, op: Op::Send, missing, .. }) if missing == &vec![1]
    ));
}

#[test]
fn disagreeing_all_to_all_counts_fail_on_every_rank_with_the_numbers() {
    let error = failures(LocalWorld::new(3).run(|world| {
        let send_counts = if world.rank() == 2 {
            vec![1, 2, 1]
        } else {
            vec![1, 1, 1]
        };
        let send = vec![0.0; send_counts.iter().sum()];
        let recv_counts = vec![1, 1, 1];
        let mut recv = vec![0.0; 3];
        world.all_to_all_v(&send, &send_counts, &mut recv, &recv_counts)?;
        Ok::<_, CommError>(())
    }));
    assert_eq!(error.failures.len(), 3);
    for (_, failure) in &error.failures {
        let text = comm_error(failure).to_string();
        assert!(
            text.contains("rank 2 sends 2 elements to rank 1, which expects 1"),
            "{text}"
        );
    }
}

#[test]
fn ranks_calling_different_collectives_fail_instead_of_mixing_data() {
    let error = failures(LocalWorld::new(2).run(|world| {
        if world.rank() == 0 {
            world.all_reduce(&mut [1.0], ReduceOp::Sum)?;
        } else {
            world.broadcast(&mut [1.0], 0)?;
        }
        Ok::<_, CommError>(())
    }));
    assert_eq!(error.failures.len(), 2);
    let text = comm_error(&error.failures[1].1).to_string();
    assert!(
        text.contains("rank 0 called all_reduce (Sum) while rank 1 called broadcast"),
        "{text}"
    );
}

#[test]
fn wrong_buffer_lengths_are_reported_with_the_numbers() {
    let results = LocalWorld::new(1)
        .run(|world| {
            let gather = world.all_gather_v(&[1.0; 3], &[2], &mut [0.0; 2]);
            let counts = world.reduce_scatter_v(&[1.0; 2], &[1, 1], &mut [0.0; 1]);
            let root = world.broadcast(&mut [0.0], 4);
            Ok::<_, CommError>([gather, counts, root].map(|result| result.unwrap_err().to_string()))
        })
        .unwrap();
    assert_eq!(
        results[0],
        [
            "rank 0: all_gather_v: send holds 3 elements, expected 2",
            "rank 0: reduce_scatter_v: counts has 2 entries for a group of 1 ranks",
            "rank 0: broadcast: peer 4 is outside the group of 1 ranks",
        ]
    );
}

#[test]
fn a_receive_of_the_wrong_length_fails_both_sides() {
    let error = failures(LocalWorld::new(2).run(|world| {
        if world.rank() == 0 {
            world.send(&[1.0; 4], 1, 9)?;
        } else {
            world.recv(&mut [0.0; 3], 0, 9)?;
        }
        Ok::<_, CommError>(())
    }));
    assert_eq!(error.failures.len(), 2);
    for (_, failure) in &error.failures {
        let text = comm_error(failure).to_string();
        assert!(
            text.contains("rank 0 sent 4 elements with tag 9, rank 1 expected 3"),
            "{text}"
        );
    }
}

#[test]
fn sums_are_bitwise_equal_on_every_rank_and_added_in_rank_order() {
    let size = 5;
    let data = |rank: usize| -> Vec<f32> {
        (0..257)
            .map(|i| ((rank * 131 + i * 17) as f32).sin() * 1e3)
            .collect()
    };
    let results = LocalWorld::new(size)
        .run(|world| {
            let mut buf = data(world.rank());
            world.all_reduce(&mut buf, ReduceOp::Sum)?;
            Ok::<_, CommError>(buf)
        })
        .unwrap();
    let in_rank_order: Vec<f32> = (0..257)
        .map(|i| (1..size).fold(data(0)[i], |sum, rank| sum + data(rank)[i]))
        .collect();
    for buf in &results {
        assert_eq!(
            buf.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            in_rank_order
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_stream_overlaps_an_all_reduce_with_compute() {
    let results = LocalWorld::new(4)
        .run(|world| {
            let own = world
                .split(&[(0..world.size()).collect()])?
                .expect("every rank is listed");
            let stream = CommStream::new(own);
            let buf = vec![world.rank() as f32 + 1.0; 1000];
            let pending = stream.submit(move |comm| {
                let mut buf = buf;
                comm.all_reduce(&mut buf, ReduceOp::Sum)?;
                Ok(buf)
            });
            let busy_work: f32 = (0..10_000).map(|i| (i as f32).sqrt()).sum();
            world.barrier()?;
            let reduced = pending.wait()?;
            Ok::<_, CommError>((reduced[999], busy_work > 0.0))
        })
        .unwrap();
    assert_eq!(results, vec![(10.0, true); 4]);
}

#[test]
fn groups_from_a_split_fail_when_a_rank_elsewhere_panics() {
    let started = Instant::now();
    let error = failures(
        LocalWorld::new(4)
            .with_timeout(Duration::from_secs(120))
            .run(|world| {
                let pairs = [vec![0, 1], vec![2, 3]];
                let pair: Arc<dyn Communicator> = world.split(&pairs)?.expect("listed");
                if world.rank() == 0 {
                    panic!("rank 0 gives up");
                }
                pair.barrier()?;
                Ok::<_, CommError>(())
            }),
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // Ranks 2 and 3 may finish their barrier before the panic; rank 1 never can.
    let rank_1 = error
        .failures
        .iter()
        .find(|(rank, _)| *rank == 1)
        .expect("rank 1 fails");
    assert!(matches!(
        comm_error(&rank_1.1),
        CommError::Aborted {
            rank: 1,
            op: Op::Barrier,
            cause: Failure::Panicked { rank: 0, .. }
        }
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random count matrices (zeros included): every rank receives exactly what was addressed to it.
    #[test]
    fn all_to_all_v_delivers_random_count_matrices(
        size in 1usize..=8,
        seed in proptest::collection::vec(0usize..5, 64),
    ) {
        let counts = move |from: usize, to: usize| seed[from * 8 + to];
        let results = LocalWorld::new(size)
            .run(|world| {
                let rank = world.rank();
                let send_counts: Vec<usize> = (0..size).map(|to| counts(rank, to)).collect();
                let recv_counts: Vec<usize> = (0..size).map(|from| counts(from, rank)).collect();
                let send: Vec<f32> = (0..size)
                    .flat_map(|to| (0..counts(rank, to)).map(move |i| (rank * 1000 + to * 10 + i) as f32))
                    .collect();
                let mut recv = vec![f32::NAN; recv_counts.iter().sum()];
                world.all_to_all_v(&send, &send_counts, &mut recv, &recv_counts)?;
                Ok::<_, CommError>(recv)
            })
            .unwrap();
        for (rank, recv) in results.iter().enumerate() {
            let expected: Vec<f32> = (0..size)
                .flat_map(|from| (0..counts(from, rank)).map(move |i| (from * 1000 + rank * 10 + i) as f32))
                .collect();
            prop_assert_eq!(recv, &expected);
        }
    }
}
