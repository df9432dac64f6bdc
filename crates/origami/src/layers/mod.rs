//! Model layers, each with an explicit forward (returning what it saves) and backward
//! (accumulating parameter gradients, returning the input gradient).

pub mod attention;
pub mod block;
pub mod context_parallel;
pub mod mlp;
pub mod moe;
pub mod recompute;
pub mod stored;
pub mod tensor_parallel;
pub mod vocab_parallel;

/// Unwraps a communicator call of a layer. A failure means another rank crashed or the job
/// timed out; this rank then stops with the communicator's error, and the job runner (local
/// backend) or MPI reports it on every rank.
pub(crate) fn comm_ok<T>(result: origami_comm::Result<T>) -> T {
    result.unwrap_or_else(|error| panic!("layer communication failed: {error}"))
}
