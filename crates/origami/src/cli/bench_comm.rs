//! `origami bench comm`: bandwidth of all-reduce and all-to-all-v on the local backend (threads)
//! or, built with `--features mpi` and run under `mpirun`, on MPI — beside a plain memcpy of the
//! same bytes measured in the same run.
//!
//! Sizes are bytes per rank. all-reduce reduces a buffer of that size; all-to-all-v sends that
//! many bytes from each rank, split evenly over the ranks. `algbw` = bytes / time; `busbw`
//! scales it by the fraction of the data that must cross between ranks (all-reduce
//! `2(n-1)/n`, all-to-all `(n-1)/n`), as nccl-tests do, so it compares with memcpy bandwidth.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, ValueEnum};
use origami_comm::local::LocalWorld;
use origami_comm::{CommError, Communicator, ReduceOp};

/// Which communicator backend to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Threads in this process.
    Local,
    /// Processes under mpirun (needs a build with `--features mpi`).
    Mpi,
}

/// Arguments of `origami bench comm`.
#[derive(Args, Debug)]
pub struct CommBenchArgs {
    /// Backend to measure.
    #[arg(long, value_enum, default_value_t = Backend::Local)]
    pub backend: Backend,
    /// Rank counts to measure on the local backend (under MPI: the mpirun size).
    #[arg(long, value_delimiter = ',', default_values_t = [2, 4])]
    pub ranks: Vec<usize>,
    /// Message sizes in KiB per rank.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 1024, 16384])]
    pub sizes_kib: Vec<usize>,
    /// Timed repetitions per measurement (after one warm-up).
    #[arg(long, default_value_t = 10)]
    pub iterations: usize,
}

/// One measured operation.
#[derive(Clone, Copy, Debug)]
enum Collective {
    AllReduce,
    AllToAllV,
}

impl Collective {
    fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::AllToAllV => "all_to_all_v",
        }
    }

    /// Fraction of the bytes that cross between ranks on `ranks` ranks.
    fn bus_factor(self, ranks: usize) -> f64 {
        let n = ranks as f64;
        match self {
            Collective::AllReduce => 2.0 * (n - 1.0) / n,
            Collective::AllToAllV => (n - 1.0) / n,
        }
    }
}

/// Runs the benchmark and prints a table.
pub fn run(args: CommBenchArgs) -> anyhow::Result<()> {
    if args.iterations == 0 || args.sizes_kib.is_empty() {
        bail!("need at least one iteration and one size");
    }
    match args.backend {
        Backend::Local => {
            println!("backend local (one thread per rank), {} cores", cores());
            print_header();
            for &ranks in &args.ranks {
                if ranks == 0 {
                    bail!("--ranks entries must be at least 1");
                }
                let rows = LocalWorld::new(ranks)
                    .run(|world| measure_all(world, &args))
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
                print_rows(ranks, &rows[0], args.iterations);
            }
            Ok(())
        }
        Backend::Mpi => run_mpi(&args),
    }
}

#[cfg(feature = "mpi")]
fn run_mpi(args: &CommBenchArgs) -> anyhow::Result<()> {
    let (ranks, rows) = origami_comm::mpi::run(|world| {
        let ranks = world.size();
        let rank = world.rank();
        measure_all(world, args).map(|rows| (rank, ranks, rows))
    })
    .map(|(rank, ranks, rows)| (if rank == 0 { Some(ranks) } else { None }, rows))?;
    if let Some(ranks) = ranks {
        println!(
            "backend mpi (one process per rank), {} cores on this node",
            cores()
        );
        print_header();
        print_rows(ranks, &rows, args.iterations);
    }
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_: &CommBenchArgs) -> anyhow::Result<()> {
    bail!("this origami was built without MPI; rebuild with `cargo build --release --features mpi`")
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// One table row: operation, bytes per rank, seconds per operation, memcpy seconds.
type Row = (Collective, usize, f64, f64);

/// Measures both collectives at every size on this rank; every rank returns the same rows
/// (the slowest rank's time, agreed by an all-reduce max).
fn measure_all(world: Arc<dyn Communicator>, args: &CommBenchArgs) -> Result<Vec<Row>, CommError> {
    let mut rows = Vec::new();
    for &kib in &args.sizes_kib {
        let bytes = kib * 1024;
        let memcpy = time_memcpy(bytes, args.iterations);
        for collective in [Collective::AllReduce, Collective::AllToAllV] {
            let seconds = time_collective(world.as_ref(), collective, bytes, args.iterations)?;
            rows.push((collective, bytes, seconds, memcpy));
        }
    }
    Ok(rows)
}

/// Seconds per operation, the maximum over ranks.
fn time_collective(
    comm: &dyn Communicator,
    collective: Collective,
    bytes: usize,
    iterations: usize,
) -> Result<f64, CommError> {
    let ranks = comm.size();
    let elements = bytes / std::mem::size_of::<f32>();
    let mut buf = vec![1.0f32; elements];
    let per_peer = elements / ranks;
    let counts = vec![per_peer; ranks];
    let send = vec![1.0f32; per_peer * ranks];
    let mut recv = vec![0.0f32; per_peer * ranks];
    let mut once = |comm: &dyn Communicator| match collective {
        Collective::AllReduce => comm.all_reduce(&mut buf, ReduceOp::Sum),
        Collective::AllToAllV => comm.all_to_all_v(&send, &counts, &mut recv, &counts),
    };
    once(comm)?;
    comm.barrier()?;
    let started = Instant::now();
    for _ in 0..iterations {
        once(comm)?;
    }
    let mut seconds = [started.elapsed().as_secs_f32() / iterations as f32];
    comm.all_reduce(&mut seconds, ReduceOp::Max)?;
    Ok(f64::from(seconds[0]))
}

/// Seconds per copy of `bytes` with `copy_from_slice` (memcpy), the best of `iterations`.
fn time_memcpy(bytes: usize, iterations: usize) -> f64 {
    let source = vec![1u8; bytes];
    let mut target = vec![0u8; bytes];
    target.copy_from_slice(&source);
    (0..iterations)
        .map(|_| {
            let started = Instant::now();
            target.copy_from_slice(std::hint::black_box(&source));
            std::hint::black_box(&mut target);
            started.elapsed()
        })
        .min()
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

fn print_header() {
    println!(
        "{:>5}  {:<13} {:>10}  {:>11}  {:>11}  {:>11}  {:>11}",
        "ranks", "op", "size", "time/op", "algbw GB/s", "busbw GB/s", "memcpy GB/s"
    );
}

fn print_rows(ranks: usize, rows: &[Row], iterations: usize) {
    for &(collective, bytes, seconds, memcpy) in rows {
        let gigabytes = bytes as f64 / 1e9;
        println!(
            "{ranks:>5}  {:<13} {:>10}  {:>9.1}µs  {:>11.2}  {:>11.2}  {:>11.2}",
            collective.name(),
            format!("{} KiB", bytes / 1024),
            seconds * 1e6,
            gigabytes / seconds,
            gigabytes / seconds * collective.bus_factor(ranks),
            gigabytes / memcpy
        );
    }
    println!("       ({iterations} timed iterations each; time is the slowest rank's mean)");
}
