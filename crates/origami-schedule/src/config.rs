//! The shape of a pipeline and the constraints each schedule puts on it.

use serde::{Deserialize, Serialize};

/// Which schedule a pipeline shape runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScheduleKind {
    /// One stage: forward and backward of each micro-batch in turn.
    NoPipelining,
    /// Several stages, one chunk each: warm-up, one-forward-one-backward, cool-down.
    OneForwardOneBackward,
    /// Several stages with several chunks each (virtual stages), in Megatron-Core's order.
    Interleaved,
}

impl ScheduleKind {
    /// A short name for logs: `none`, `1F1B`, `interleaved`.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::NoPipelining => "none",
            ScheduleKind::OneForwardOneBackward => "1F1B",
            ScheduleKind::Interleaved => "interleaved",
        }
    }
}

/// A pipeline's shape: what a schedule is a function of (with the rank).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// Pipeline stages (`parallel.pp`).
    pub stages: usize,
    /// Model chunks per stage (`parallel.vpp`).
    pub chunks: usize,
    /// Micro-batches per optimizer step on each pipeline.
    pub micro_batches: usize,
    /// Interleaved schedule: micro-batches run on one chunk before moving to the next
    /// (`parallel.microbatch_group_size`); `None` means `stages`.
    pub group_size: Option<usize>,
}

/// A pipeline shape a schedule cannot run, with the numbers at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A size of zero.
    #[error("{what} must be at least 1, got 0")]
    Zero {
        /// `parallel.pp`, `parallel.vpp` or the micro-batch count.
        what: &'static str,
    },
    /// Virtual stages need a pipeline.
    #[error("parallel.vpp = {vpp} needs parallel.pp > 1 (got pp = 1): virtual stages interleave a pipeline's stages")]
    ChunksWithoutPipeline {
        /// Chunks per stage.
        vpp: usize,
    },
    /// The interleaved schedule's group size outside `pp ..= micro-batches`.
    #[error("the interleaved schedule runs groups of parallel.microbatch_group_size = {group} micro-batches, which must lie in pp ..= micro-batches = {pp} ..= {micro_batches} (micro-batches = global_batch / (micro_batch · dp))")]
    GroupSize {
        /// Micro-batches per group.
        group: usize,
        /// Pipeline stages.
        pp: usize,
        /// Micro-batches per step.
        micro_batches: usize,
    },
    /// A last group too small to keep the interleaved pipeline's dependencies apart.
    #[error("the interleaved schedule needs micro-batches mod parallel.microbatch_group_size to be 0 or at least pp = {pp}: {micro_batches} mod {group} = {remainder} (a smaller last group stalls the pipeline)")]
    LastGroup {
        /// Micro-batches per step.
        micro_batches: usize,
        /// Micro-batches per group.
        group: usize,
        /// `micro_batches mod group`.
        remainder: usize,
        /// Pipeline stages.
        pp: usize,
    },
}

impl PipelineConfig {
    /// A shape with the default group size.
    pub fn new(stages: usize, chunks: usize, micro_batches: usize) -> Self {
        PipelineConfig {
            stages,
            chunks,
            micro_batches,
            group_size: None,
        }
    }

    /// The schedule this shape runs.
    pub fn kind(&self) -> ScheduleKind {
        match (self.stages, self.chunks) {
            (1, _) => ScheduleKind::NoPipelining,
            (_, 1) => ScheduleKind::OneForwardOneBackward,
            _ => ScheduleKind::Interleaved,
        }
    }

    /// Micro-batches per group of the interleaved schedule.
    pub fn group(&self) -> usize {
        self.group_size.unwrap_or(self.stages)
    }

    /// Virtual stages along the model: `stages · chunks`.
    pub fn virtual_stages(&self) -> usize {
        self.stages * self.chunks
    }

    /// Checks the shape against its schedule's constraints.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        for (what, size) in [
            ("parallel.pp", self.stages),
            ("parallel.vpp", self.chunks),
            ("the number of micro-batches", self.micro_batches),
        ] {
            if size == 0 {
                return Err(ScheduleError::Zero { what });
            }
        }
        if self.stages == 1 && self.chunks > 1 {
            return Err(ScheduleError::ChunksWithoutPipeline { vpp: self.chunks });
        }
        if self.kind() != ScheduleKind::Interleaved {
            return Ok(());
        }
        let (group, pp, micro_batches) = (self.group(), self.stages, self.micro_batches);
        if group < pp || group > micro_batches {
            return Err(ScheduleError::GroupSize {
                group,
                pp,
                micro_batches,
            });
        }
        let remainder = micro_batches % group;
        if remainder > 0 && remainder < pp {
            return Err(ScheduleError::LastGroup {
                micro_batches,
                group,
                remainder,
                pp,
            });
        }
        Ok(())
    }
}
