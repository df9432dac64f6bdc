//! The local backend's collectives for `origami plan --calibrate`: all-reduce, all-gather,
//! all-to-all and point-to-point on [`COMM_RANKS`] ranks, each as the bytes a rank sends over
//! the time of a [`COMM_BYTES`] call (bandwidth) and the time of a [`LATENCY_BYTES`] call
//! (latency), the slowest rank's median.

use std::time::Instant;

use origami_comm::local::LocalWorld;
use origami_comm::{Communicator, ReduceOp};
use origami_plan::hardware::{LinkRates, Rate};

/// Ranks of the collective measurements.
pub const COMM_RANKS: usize = 4;
/// Bytes each rank sends per collective for the bandwidth.
const COMM_BYTES: usize = 16 << 20;
/// Bytes per collective for the latency.
const LATENCY_BYTES: usize = 4 << 10;
/// Timed calls of each collective (after one untimed call); the median counts.
const REPEATS: usize = 5;

/// The median of `REPEATS` timings of `run`, after one untimed call.
fn median_seconds(mut run: impl FnMut()) -> f64 {
    run();
    let mut times: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[REPEATS / 2]
}

/// The local backend's collectives on [`COMM_RANKS`] ranks: bandwidth and latency of each.
pub fn collective_rates() -> anyhow::Result<LinkRates> {
    let rates = LocalWorld::new(COMM_RANKS)
        .run(|comm| measure_collectives(comm.as_ref()))
        .map_err(|e| anyhow::anyhow!("measuring the local backend: {e}"))?;
    Ok(rates[0])
}

/// Seconds per call of `op` on `bytes` per rank, the slowest rank's median.
fn collective_seconds(
    comm: &dyn Communicator,
    bytes: usize,
    op: &dyn Fn(&dyn Communicator, usize) -> origami_comm::Result<()>,
) -> origami_comm::Result<f64> {
    let mut failure = None;
    let mut seconds = median_seconds(|| {
        if let Err(e) = comm.barrier().and_then(|_| op(comm, bytes)) {
            failure = Some(e);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let mut slowest = [seconds as f32];
    comm.all_reduce(&mut slowest, ReduceOp::Max)?;
    seconds = f64::from(slowest[0]);
    Ok(seconds)
}

/// One collective's [`Rate`]: `sent(bytes)` is what the planner counts a rank as sending.
fn rate(
    comm: &dyn Communicator,
    op: &dyn Fn(&dyn Communicator, usize) -> origami_comm::Result<()>,
    sent: &dyn Fn(usize) -> f64,
) -> origami_comm::Result<Rate> {
    let large = collective_seconds(comm, COMM_BYTES, op)?;
    let small = collective_seconds(comm, LATENCY_BYTES, op)?;
    let bandwidth = (sent(COMM_BYTES) - sent(LATENCY_BYTES)) / (large - small).max(1e-9);
    Ok(Rate {
        bandwidth,
        latency: (small - sent(LATENCY_BYTES) / bandwidth).max(0.0),
    })
}

fn measure_collectives(comm: &dyn Communicator) -> origami_comm::Result<LinkRates> {
    let n = comm.size();
    let share = (n - 1) as f64 / n as f64;
    let elements = |bytes: usize| bytes / std::mem::size_of::<f32>();
    let all_reduce = rate(
        comm,
        &|c, bytes| c.all_reduce(&mut vec![1.0; elements(bytes)], ReduceOp::Sum),
        &|bytes| 2.0 * share * bytes as f64,
    )?;
    let all_gather = rate(
        comm,
        &|c, bytes| {
            let each = elements(bytes) / n;
            let mut recv = vec![0.0; each * n];
            c.all_gather_v(&vec![1.0; each], &vec![each; n], &mut recv)
        },
        &|bytes| share * bytes as f64,
    )?;
    let all_to_all = rate(
        comm,
        &|c, bytes| {
            let each = elements(bytes) / n;
            let mut recv = vec![0.0; each * n];
            c.all_to_all_v(
                &vec![1.0; each * n],
                &vec![each; n],
                &mut recv,
                &vec![each; n],
            )
        },
        &|bytes| share * bytes as f64,
    )?;
    let p2p = rate(
        comm,
        &|c, bytes| {
            let peer = c.rank() ^ 1;
            let mut recv = vec![0.0; elements(bytes)];
            c.send_recv(&vec![1.0; elements(bytes)], peer, &mut recv, peer, 7)
        },
        &|bytes| bytes as f64,
    )?;
    Ok(LinkRates {
        all_reduce,
        all_gather,
        all_to_all,
        p2p,
    })
}
