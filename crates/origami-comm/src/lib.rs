//! Communicators of origami: collectives over a group of ranks (DESIGN.md §3, "comm").
//!
//! [`Communicator`] is the one interface the layers above use; it knows nothing about models.
//! Two backends implement it:
//!
//! - [`local`]: one OS thread per rank inside one process, data moved through shared memory
//!   (each element copied once from the sender's buffer into the receiver's). A rank that panics,
//!   fails, or waits past the job's timeout makes every rank's pending and later calls return an
//!   error naming the rank and the operation.
//! - `mpi` (cargo feature `mpi`): processes under `mpirun`, over rsmpi and the system's MPI.
//!
//! [`SoloComm`] is the trivial group of one rank.
//!
//! [`CommStream`] runs calls on a background thread so communication can overlap compute, and
//! [`conformance`] is the test suite every backend must pass.

mod communicator;
pub mod conformance;
mod counted;

mod error;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
mod reduce;
mod solo;
mod stream;

pub use communicator::{Communicator, Incoming, Outgoing, ReduceOp};
pub use counted::CountedComm;
pub use error::{CommError, Failure, Op, Result};
pub use solo::SoloComm;
pub use stream::{CommStream, Pending};
