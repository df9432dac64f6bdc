//! The test suite every backend must pass, run by the local tests on 1..8 threads and by the MPI
//! tests on 1..8 processes. Each check derives the expected result on every rank from the
//! operation's definition and exact small-integer data (so sums are exact in f32), with uneven
//! and zero-length contributions.

use crate::{CommError, Communicator, ReduceOp};

/// A check that failed on this rank.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// A call returned an error.
    #[error("check {check}: {source}")]
    Comm {
        /// The check that was running.
        check: &'static str,
        /// The call's error.
        source: CommError,
    },
    /// A call returned wrong data.
    #[error("check {check} on rank {rank}: {detail}")]
    Wrong {
        /// The check that was running.
        check: &'static str,
        /// World rank that saw it.
        rank: usize,
        /// Expected and actual values.
        detail: String,
    },
}

type Outcome = Result<(), ConformanceError>;

/// Runs every check on `comm`; returns how many ran.
pub fn run_all(comm: &dyn Communicator) -> Result<usize, ConformanceError> {
    let checks: [fn(&dyn Communicator) -> Outcome; 11] = [
        all_reduce,
        all_reduce_u64,
        all_gather_v,
        reduce_scatter_v,
        all_to_all_v,
        broadcast,
        ring_send_recv,
        ordered_send_then_recv,
        exchange_both_ways,
        barrier,
        split,
    ];
    for check in checks {
        check(comm)?;
    }
    Ok(checks.len())
}

/// Attaches the check name to a communicator error.
fn call(check: &'static str, result: Result<(), CommError>) -> Outcome {
    result.map_err(|source| ConformanceError::Comm { check, source })
}

/// Fails unless `actual == expected`.
fn expect<T: PartialEq + std::fmt::Debug>(
    check: &'static str,
    comm: &dyn Communicator,
    what: &str,
    actual: &[T],
    expected: &[T],
) -> Outcome {
    if actual == expected {
        return Ok(());
    }
    Err(ConformanceError::Wrong {
        check,
        rank: comm.world_rank(),
        detail: format!("{what}: expected {expected:?}, got {actual:?}"),
    })
}

/// Small signed integers, different for every rank and index.
fn value(rank: usize, index: usize) -> f32 {
    ((rank * 7 + index * 3) % 11) as f32 - 5.0
}

/// Uneven counts with zeros: the number of elements for a (from, to) pair under `pattern`.
fn count(pattern: usize, from: usize, to: usize) -> usize {
    match pattern {
        0 => (from * 3 + to * 5 + 1) % 4,
        1 => 0,
        2 => usize::from(from == 0) * 5,
        _ => from + 2 * to,
    }
}

const PATTERNS: std::ops::Range<usize> = 0..4;

fn all_reduce(comm: &dyn Communicator) -> Outcome {
    let (rank, size) = (comm.rank(), comm.size());
    for len in [0, 1, size + 3, 1031] {
        let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
        call("all_reduce", comm.all_reduce(&mut buf, ReduceOp::Sum))?;
        let sums: Vec<f32> = (0..len)
            .map(|i| (0..size).map(|r| value(r, i)).sum())
            .collect();
        expect("all_reduce", comm, &format!("sum of {len}"), &buf, &sums)?;
        let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
        call("all_reduce", comm.all_reduce(&mut buf, ReduceOp::Max))?;
        let maxima: Vec<f32> = (0..len)
            .map(|i| (0..size).map(|r| value(r, i)).fold(f32::MIN, f32::max))
            .collect();
        expect("all_reduce", comm, &format!("max of {len}"), &buf, &maxima)?;
    }
    Ok(())
}

fn all_reduce_u64(comm: &dyn Communicator) -> Outcome {
    let (rank, size) = (comm.rank(), comm.size());
    let big = 1u64 << 40;
    let mut buf = vec![big + rank as u64, 0, rank as u64 * 3];
    call(
        "all_reduce_u64",
        comm.all_reduce_u64(&mut buf, ReduceOp::Sum),
    )?;
    let total = (0..size as u64).sum::<u64>();
    let expected = [big * size as u64 + total, 0, 3 * total];
    expect("all_reduce_u64", comm, "sum", &buf, &expected)?;
    let mut buf = vec![rank as u64, big - rank as u64];
    call(
        "all_reduce_u64",
        comm.all_reduce_u64(&mut buf, ReduceOp::Max),
    )?;
    expect("all_reduce_u64", comm, "max", &buf, &[size as u64 - 1, big])
}

fn all_gather_v(comm: &dyn Communicator) -> Outcome {
    let (rank, size) = (comm.rank(), comm.size());
    for pattern in PATTERNS {
        let counts: Vec<usize> = (0..size).map(|r| count(pattern, r, 0)).collect();
        let send: Vec<f32> = (0..counts[rank]).map(|i| value(rank, i)).collect();
        let mut recv = vec![f32::NAN; counts.iter().sum()];
        call("all_gather_v", comm.all_gather_v(&send, &counts, &mut recv))?;
        let expected: Vec<f32> = (0..size)
            .flat_map(|r| (0..counts[r]).map(move |i| value(r, i)))
            .collect();
        expect(
            "all_gather_v",
            comm,
            &format!("counts {counts:?}"),
            &recv,
            &expected,
        )?;
    }
    Ok(())
}

fn reduce_scatter_v(comm: &dyn Communicator) -> Outcome {
    let (rank, size) = (comm.rank(), comm.size());
    for pattern in PATTERNS {
        let counts: Vec<usize> = (0..size).map(|r| count(pattern, r, 1)).collect();
        let total: usize = counts.iter().sum();
        let send: Vec<f32> = (0..total).map(|i| value(rank, i)).collect();
        let mut recv = vec![f32::NAN; counts[rank]];
        call(
            "reduce_scatter_v",
            comm.reduce_scatter_v(&send, &counts, &mut recv),
        )?;
        let start: usize = counts[..rank].iter().sum();
        let expected: Vec<f32> = (start..start + counts[rank])
            .map(|i| (0..size).map(|r| value(r, i)).sum())
            .collect();
        expect(
            "reduce_scatter_v",
            comm,
            &format!("counts {counts:?}"),
            &recv,
            &expected,
        )?;
    }
    Ok(())
}

/// The element rank `from` sends as item `index` to rank `to`.
fn message(from: usize, to: usize, index: usize) -> f32 {
    (from * 10_000 + to * 100 + index) as f32
}

fn all_to_all_v(comm: &dyn Communicator) -> Outcome {
    let (rank, size) = (comm.rank(), comm.size());
    for pattern in PATTERNS {
        let send_counts: Vec<usize> = (0..size).map(|to| count(pattern, rank, to)).collect();
        let recv_counts: Vec<usize> = (0..size).map(|from| count(pattern, from, rank)).collect();
        let send: Vec<f32> = (0..size)
            .flat_map(|to| (0..send_counts[to]).map(move |i| message(rank, to, i)))
            .collect();
        let mut recv = vec![f32::NAN; recv_counts.iter().sum()];
        call(
            "all_to_all_v",
            comm.all_to_all_v(&send, &send_counts, &mut recv, &recv_counts),
        )?;
        let expected: Vec<f32> = (0..size)
            .flat_map(|from| (0..recv_counts[from]).map(move |i| message(from, rank, i)))
            .collect();
        expect(
            "all_to_all_v",
            comm,
            &format!("pattern {pattern}"),
            &recv,
            &expected,
        )?;
    }
    Ok(())
}

fn broadcast(comm: &dyn Communicator) -> Outcome {
    let (rank, size) = (comm.rank(), comm.size());
    for root in 0..size {
        for len in [0, 5] {
            let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
            call("broadcast", comm.broadcast(&mut buf, root))?;
            let expected: Vec<f32> = (0..len).map(|i| value(root, i)).collect();
            expect(
                "broadcast",
                comm,
                &format!("root {root}, {len}"),
                &buf,
                &expected,
            )?;
        }
    }
    Ok(())
}

/// Every rank passes a message to the next around a ring; rank r's message has r % 3 elements.
fn ring_send_recv(comm: &dyn Communicator) -> Outcome {
    let (rank, size) = (comm.rank(), comm.size());
    let (next, previous) = ((rank + 1) % size, (rank + size - 1) % size);
    let send: Vec<f32> = (0..rank % 3).map(|i| message(rank, next, i)).collect();
    let mut recv = vec![f32::NAN; previous % 3];
    call(
        "send_recv",
        comm.send_recv(&send, next, &mut recv, previous, 7),
    )?;
    let expected: Vec<f32> = (0..previous % 3)
        .map(|i| message(previous, rank, i))
        .collect();
    expect("send_recv", comm, "ring", &recv, &expected)
}

/// Even ranks send three messages (one empty) to the next odd rank, which receives them in order.
fn ordered_send_then_recv(comm: &dyn Communicator) -> Outcome {
    let (rank, size) = (comm.rank(), comm.size());
    let lengths = [4, 0, 2];
    if rank % 2 == 0 && rank + 1 < size {
        for (index, &len) in lengths.iter().enumerate() {
            let send: Vec<f32> = (0..len).map(|i| message(rank, index, i)).collect();
            call("send", comm.send(&send, rank + 1, 3))?;
        }
    } else if rank % 2 == 1 {
        for (index, &len) in lengths.iter().enumerate() {
            let mut recv = vec![f32::NAN; len];
            call("recv", comm.recv(&mut recv, rank - 1, 3))?;
            let expected: Vec<f32> = (0..len).map(|i| message(rank - 1, index, i)).collect();
            expect("recv", comm, &format!("message {index}"), &recv, &expected)?;
        }
    }
    Ok(())
}

/// Every rank sends one message to each neighbour of a ring on tag 0 (forward) and one on tag 1
/// (backward), all in one exchange, and receives both of its neighbours' — two ranks are each
/// other's both neighbours, one rank its own. Lengths differ per direction and rank, some zero.
fn exchange_both_ways(comm: &dyn Communicator) -> Outcome {
    let (rank, size) = (comm.rank(), comm.size());
    let (next, previous) = ((rank + 1) % size, (rank + size - 1) % size);
    let length = |from: usize, tag: usize| (from + 2 * tag) % 4;
    let data = |from: usize, tag: usize| -> Vec<f32> {
        (0..length(from, tag))
            .map(|i| message(from, tag, i))
            .collect()
    };
    let (forward, backward) = (data(rank, 0), data(rank, 1));
    let sends = [
        crate::Outgoing {
            data: &forward,
            peer: next,
            tag: 0,
        },
        crate::Outgoing {
            data: &backward,
            peer: previous,
            tag: 1,
        },
    ];
    let mut from_previous = vec![f32::NAN; length(previous, 0)];
    let mut from_next = vec![f32::NAN; length(next, 1)];
    let mut receives = [
        crate::Incoming {
            data: &mut from_previous,
            peer: previous,
            tag: 0,
        },
        crate::Incoming {
            data: &mut from_next,
            peer: next,
            tag: 1,
        },
    ];
    call("exchange", comm.exchange(&sends, &mut receives))?;
    expect(
        "exchange",
        comm,
        "forward",
        &from_previous,
        &data(previous, 0),
    )?;
    expect("exchange", comm, "backward", &from_next, &data(next, 1))
}

fn barrier(comm: &dyn Communicator) -> Outcome {
    call("barrier", comm.barrier())?;
    call("barrier", comm.barrier())
}

/// Splits into even and odd ranks (odd listed in reverse), then into a group of rank 0 alone
/// that leaves everyone else out; checks numbering and a sum inside each part.
fn split(comm: &dyn Communicator) -> Outcome {
    let (rank, size) = (comm.rank(), comm.size());
    let evens: Vec<usize> = (0..size).step_by(2).collect();
    let odds: Vec<usize> = (1..size).step_by(2).rev().collect();
    let part = comm
        .split(&[evens.clone(), odds.clone()])
        .map_err(|source| ConformanceError::Comm {
            check: "split",
            source,
        })?;
    let Some(part) = part else {
        return Err(ConformanceError::Wrong {
            check: "split",
            rank: comm.world_rank(),
            detail: "a rank listed in the split got no communicator".to_string(),
        });
    };
    let members = if rank % 2 == 0 { &evens } else { &odds };
    let position = members
        .iter()
        .position(|&r| r == rank)
        .unwrap_or(usize::MAX);
    expect(
        "split",
        comm,
        "rank and size in the part",
        &[part.rank(), part.size(), part.world_rank()],
        &[position, members.len(), comm.world_rank()],
    )?;
    let mut buf = [rank as f32];
    call("split", part.all_reduce(&mut buf, ReduceOp::Sum))?;
    let expected = members.iter().sum::<usize>() as f32;
    expect("split", comm, "sum in the part", &buf, &[expected])?;
    let alone = comm
        .split(&[vec![0]])
        .map_err(|source| ConformanceError::Comm {
            check: "split",
            source,
        })?;
    expect(
        "split",
        comm,
        "membership of the group of rank 0",
        &[alone.map(|group| group.size())],
        &[(rank == 0).then_some(1)],
    )
}
