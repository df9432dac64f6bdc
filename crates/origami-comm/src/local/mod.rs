//! The local backend: a job of `size` ranks, one OS thread each, in this process.
//!
//! ```
//! use origami_comm::local::LocalWorld;
//! use origami_comm::{Communicator, ReduceOp};
//!
//! let sums = LocalWorld::new(4)
//!     .run(|world| {
//!         let mut value = [world.rank() as f32];
//!         world.all_reduce(&mut value, ReduceOp::Sum)?;
//!         Ok::<_, origami_comm::CommError>(value[0])
//!     })
//!     .unwrap();
//! assert_eq!(sums, vec![6.0; 4]);
//! ```

mod collectives;
mod comm;
mod group;
mod job;
mod mailbox;
mod p2p;
mod rendezvous;

use std::error::Error;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

pub use comm::LocalComm;
use job::Job;

use crate::{Communicator, Failure};

/// How long a rank waits in one call before it declares the job stuck, unless set otherwise.
/// Generous, because a pipeline stage may legitimately wait a whole forward pass for its input.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// A local job: how many ranks, and how long any rank may wait in one call.
#[derive(Clone, Copy, Debug)]
pub struct LocalWorld {
    size: usize,
    timeout: Duration,
}

/// Why one rank of a local job did not return a value.
#[derive(Debug)]
pub enum RankError {
    /// The rank's code panicked with this message.
    Panicked(String),
    /// The rank's code returned this error.
    Failed(Box<dyn Error + Send + Sync>),
}

/// A local job in which some ranks failed: every failing rank with its error, by rank.
#[derive(Debug)]
pub struct JobError {
    /// Each failing rank and why, in rank order.
    pub failures: Vec<(usize, RankError)>,
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "local job failed on {} rank(s)", self.failures.len())?;
        for (rank, error) in &self.failures {
            match error {
                RankError::Panicked(message) => write!(f, "\n  rank {rank} panicked: {message}")?,
                RankError::Failed(error) => write!(f, "\n  rank {rank}: {error}")?,
            }
        }
        Ok(())
    }
}

impl Error for JobError {}

impl LocalWorld {
    /// A job of `size` ranks with [`DEFAULT_TIMEOUT`].
    pub fn new(size: usize) -> Self {
        LocalWorld {
            size,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets how long a rank may wait in one call before the job fails.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        LocalWorld { timeout, ..self }
    }

    /// Runs `rank_main` on every rank, each on its own thread with the world communicator, and
    /// returns the ranks' values in rank order. The first rank to panic or return an error stops
    /// the job: every other rank's pending and later calls fail with an error naming it.
    pub fn run<T, E, F>(&self, rank_main: F) -> Result<Vec<T>, JobError>
    where
        T: Send,
        E: Into<Box<dyn Error + Send + Sync>>,
        F: Fn(Arc<dyn Communicator>) -> Result<T, E> + Sync,
    {
        let job = Arc::new(Job::new(self.timeout));
        let members: Vec<usize> = (0..self.size).collect();
        let world = job.group((u64::MAX, 0, 0), &members);
        let outcomes: Vec<Result<T, RankError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..self.size)
                .map(|rank| {
                    let comm = Arc::new(LocalComm::new(job.clone(), world.clone(), rank));
                    let job = &job;
                    let rank_main = &rank_main;
                    std::thread::Builder::new()
                        .name(format!("rank-{rank}"))
                        .spawn_scoped(scope, move || run_rank(job, rank, || rank_main(comm)))
                        .expect("spawning a rank thread")
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("rank threads catch their panics"))
                .collect()
        });
        let mut values = Vec::with_capacity(self.size);
        let mut failures = Vec::new();
        for (rank, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Ok(value) => values.push(value),
                Err(error) => failures.push((rank, error)),
            }
        }
        if failures.is_empty() {
            Ok(values)
        } else {
            Err(JobError { failures })
        }
    }
}

/// Runs one rank's code, turning a panic or an error into a job failure.
fn run_rank<T, E>(
    job: &Job,
    rank: usize,
    body: impl FnOnce() -> Result<T, E>,
) -> Result<T, RankError>
where
    E: Into<Box<dyn Error + Send + Sync>>,
{
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => {
            let error = error.into();
            job.fail(Failure::Failed {
                rank,
                message: error.to_string(),
            });
            Err(RankError::Failed(error))
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_string());
            job.fail(Failure::Panicked {
                rank,
                message: message.clone(),
            });
            Err(RankError::Panicked(message))
        }
    }
}
