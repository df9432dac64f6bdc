//! Model layers, each with an explicit forward (returning what it saves) and backward
//! (accumulating parameter gradients, returning the input gradient).

pub mod attention;
pub mod block;
pub mod context_parallel;
pub mod mlp;
pub mod moe;
