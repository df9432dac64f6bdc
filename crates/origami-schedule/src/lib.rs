//! Pipeline schedules as data (DESIGN.md §3, "schedule").
//!
//! A schedule is a pure function of the pipeline's shape — `pp` stages, `vpp` model chunks per
//! stage, `M` micro-batches — and a stage's rank: the list of [`Action`]s that rank runs, in
//! order. Computation ([`Action::Forward`], [`Action::Backward`] of one micro-batch on one model
//! chunk) alternates with [`Action::Exchange`]s, each a batch of point-to-point transfers that the
//! communicator posts at once (like `batch_isend_irecv`): the outputs of the computation just
//! done go to their consumers, and the inputs of the next computation arrive.
//!
//! Three schedules ([`ScheduleKind`]): no pipelining (one stage: forward and backward of each
//! micro-batch in turn), 1F1B (warm-up forwards, then one forward and one backward in turn, then
//! cool-down backwards) and Megatron-Core's interleaved schedule over virtual stages.
//!
//! Because a schedule is data, it can be checked without a model: [`simulate`] runs every
//! rank's list against the others with rendezvous semantics (a batch completes only once every
//! transfer in it has met its partner), so a deadlock, a transfer without its partner or a
//! payload that is not the one expected is an error, and with unit forward time it gives the
//! idle time (the bubble) and the activations each stage holds at its peak. [`timeline`] draws
//! it. [`StageLayers`] splits a model's layers over the stages and chunks.
//!
//! Vocabulary: a *stage* is a pipeline rank; a *chunk* is one of a stage's `vpp` model pieces;
//! the *virtual stage* of chunk `c` on stage `r` is `c·pp + r`, its place along the model.

mod action;
mod config;
mod order;
mod simulate;
mod split;
mod timeline;

pub use action::{Action, Direction, Pass, Payload, Transfer, Work};
pub use config::{PipelineConfig, ScheduleError, ScheduleKind};
pub use order::{schedule, Schedule};
pub use simulate::{simulate, Simulation, SimulationError, Span, StageRun, StageTimes};
pub use split::{SplitError, StageLayers};
pub use timeline::timeline;
