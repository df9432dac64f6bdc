//! Non-blocking communication: a `CommStream` runs calls on its own thread, in submission order,
//! so a rank can compute while its data moves (like a CUDA stream). Buffers move into the call
//! and come back through [`Pending::wait`], so nothing borrowed can be freed mid-transfer.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::{Communicator, Result};

type Job = Box<dyn FnOnce(&dyn Communicator) + Send>;

/// A background thread that runs calls on one communicator in order. Give a stream its own
/// communicator (e.g. a `split` of the group into itself): calls on one rank's communicator must
/// not overlap, and a backend reports overlapping calls as [`crate::CommError::Busy`].
pub struct CommStream {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
}

/// The result of a call submitted to a [`CommStream`], available once the call finishes.
pub struct Pending<T> {
    result: mpsc::Receiver<Result<T>>,
}

impl CommStream {
    /// Starts the stream's thread for `comm`.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let worker = std::thread::Builder::new()
            .name(format!("comm-stream-{}", comm.world_rank()))
            .spawn(move || {
                for job in queue {
                    job(comm.as_ref());
                }
            })
            .expect("spawning a communication stream thread");
        CommStream {
            jobs: Some(jobs),
            worker: Some(worker),
        }
    }

    /// Queues `call` (e.g. `move |comm| { comm.all_reduce(&mut buf, ReduceOp::Sum)?; Ok(buf) }`)
    /// and returns at once.
    pub fn submit<T, F>(&self, call: F) -> Pending<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Communicator) -> Result<T> + Send + 'static,
    {
        let (done, result) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |comm| {
            // The receiver may have been dropped by a caller that no longer wants the result.
            let _ = done.send(call(comm));
        });
        self.jobs
            .as_ref()
            .expect("the queue lives until drop")
            .send(job)
            .expect("the stream thread runs until the queue closes");
        Pending { result }
    }
}

impl Drop for CommStream {
    /// Finishes every queued call, then stops the thread.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take() {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl<T> Pending<T> {
    /// Waits for the call and returns its result.
    pub fn wait(self) -> Result<T> {
        self.result
            .recv()
            .expect("a stream runs every call it accepted before it stops")
    }

    /// The result if the call already finished, or the handle back to wait on later.
    pub fn try_wait(self) -> std::result::Result<Result<T>, Pending<T>> {
        match self.result.try_recv() {
            Ok(result) => Ok(result),
            Err(_) => Err(self),
        }
    }
}
