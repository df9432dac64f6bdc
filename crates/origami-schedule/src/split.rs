//! Which layers each stage and chunk holds.
//!
//! Evenly by default: `L / (pp · vpp)` layers per chunk. `first` and `last` (the settings
//! `parallel.pp_first_stage_layers` and `pp_last_stage_layers`) give the first and last stage
//! their own counts; the stages without one share the rest evenly. With `vpp` chunks a stage's
//! count must divide by `vpp`. Chunk `v` of stage `r` holds the layers that follow every chunk
//! before it along the model (virtual stages `0 .. v·pp + r`): with an even split, from
//! `v·L/vpp + r·L/(pp·vpp)` on, as Megatron-Core assigns them.

use std::ops::Range;

use serde::Serialize;

/// A split of `L` layers over `pp` stages of `vpp` chunks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StageLayers {
    chunks: usize,
    per_stage: Vec<usize>,
}

/// Layers that do not split as asked, with the numbers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// An even split that does not divide.
    #[error("model.num_layers = {layers} is not divisible by parallel.pp × parallel.vpp = {pp} × {vpp} = {}", pp * vpp)]
    NotDivisible {
        /// Layers.
        layers: usize,
        /// Stages.
        pp: usize,
        /// Chunks per stage.
        vpp: usize,
    },
    /// Uneven settings without a pipeline.
    #[error(
        "parallel.pp_first_stage_layers and pp_last_stage_layers need parallel.pp > 1 (got pp = 1)"
    )]
    UnevenWithoutPipeline,
    /// Explicit counts that use more layers than the model has, or leave some to no stage.
    #[error("the first and last stage take {given} of model.num_layers = {layers} layers (pp_first_stage_layers = {first:?}, pp_last_stage_layers = {last:?}) and no other stage takes the rest")]
    Unassigned {
        /// Layers.
        layers: usize,
        /// Layers the explicit counts take.
        given: usize,
        /// `pp_first_stage_layers`.
        first: Option<usize>,
        /// `pp_last_stage_layers`.
        last: Option<usize>,
    },
    /// Explicit counts that ask for more layers than the model has.
    #[error("pp_first_stage_layers = {first:?} and pp_last_stage_layers = {last:?} ask for more than model.num_layers = {layers} layers")]
    TooMany {
        /// Layers.
        layers: usize,
        /// `pp_first_stage_layers`.
        first: Option<usize>,
        /// `pp_last_stage_layers`.
        last: Option<usize>,
    },
    /// The stages without an explicit count cannot share the rest evenly.
    #[error("the {rest} layers left after pp_first_stage_layers = {first:?} and pp_last_stage_layers = {last:?} do not split evenly over the other {stages} stages")]
    UnevenMiddle {
        /// Layers left.
        rest: usize,
        /// Stages sharing them.
        stages: usize,
        /// `pp_first_stage_layers`.
        first: Option<usize>,
        /// `pp_last_stage_layers`.
        last: Option<usize>,
    },
    /// A stage's count that its chunks cannot share.
    #[error("stage {stage} holds {layers} layers, which parallel.vpp = {vpp} chunks cannot share evenly")]
    ChunksUneven {
        /// Stage.
        stage: usize,
        /// Its layers.
        layers: usize,
        /// Chunks per stage.
        vpp: usize,
    },
}

impl StageLayers {
    /// Splits `layers` over `pp` stages of `vpp` chunks, with optional first/last stage counts.
    pub fn new(
        layers: usize,
        pp: usize,
        vpp: usize,
        first: Option<usize>,
        last: Option<usize>,
    ) -> Result<Self, SplitError> {
        assert!(
            pp > 0 && vpp > 0,
            "pipeline sizes are checked before the split"
        );
        if first.is_none() && last.is_none() {
            if !layers.is_multiple_of(pp * vpp) {
                return Err(SplitError::NotDivisible { layers, pp, vpp });
            }
            return Ok(StageLayers {
                chunks: vpp,
                per_stage: vec![layers / pp; pp],
            });
        }
        if pp == 1 {
            return Err(SplitError::UnevenWithoutPipeline);
        }
        let given = first.unwrap_or(0) + last.unwrap_or(0);
        if given > layers {
            return Err(SplitError::TooMany {
                layers,
                first,
                last,
            });
        }
        let rest_stages = pp - usize::from(first.is_some()) - usize::from(last.is_some());
        let rest = layers - given;
        let each = match rest_stages {
            0 if rest > 0 => {
                return Err(SplitError::Unassigned {
                    layers,
                    given,
                    first,
                    last,
                })
            }
            0 => 0,
            n if !rest.is_multiple_of(n) => {
                return Err(SplitError::UnevenMiddle {
                    rest,
                    stages: n,
                    first,
                    last,
                })
            }
            n => rest / n,
        };
        let mut per_stage = vec![each; pp];
        if let Some(f) = first {
            per_stage[0] = f;
        }
        if let Some(l) = last {
            per_stage[pp - 1] = l;
        }
        if let Some((stage, &count)) = per_stage
            .iter()
            .enumerate()
            .find(|(_, &n)| !n.is_multiple_of(vpp))
        {
            return Err(SplitError::ChunksUneven {
                stage,
                layers: count,
                vpp,
            });
        }
        Ok(StageLayers {
            chunks: vpp,
            per_stage,
        })
    }

    /// Stages.
    pub fn stages(&self) -> usize {
        self.per_stage.len()
    }

    /// Chunks per stage.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Layers of each stage (all its chunks).
    pub fn per_stage(&self) -> &[usize] {
        &self.per_stage
    }

    /// The global layer indices chunk `chunk` of stage `stage` holds.
    pub fn layers(&self, stage: usize, chunk: usize) -> Range<usize> {
        let per_round: usize = self.per_stage.iter().sum::<usize>() / self.chunks;
        let before: usize = self.per_stage[..stage].iter().sum::<usize>() / self.chunks;
        let start = chunk * per_round + before;
        start..start + self.per_stage[stage] / self.chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_even_interleaved_split_matches_megatrons_example() {
        // 16 layers, pp 4, vpp 2: stage 0 holds [0, 1] and [8, 9] (0-based).
        let split = StageLayers::new(16, 4, 2, None, None).unwrap();
        assert_eq!(split.layers(0, 0), 0..2);
        assert_eq!(split.layers(0, 1), 8..10);
        assert_eq!(split.layers(3, 1), 14..16);
    }

    #[test]
    fn uneven_stages_take_their_counts_and_the_rest_splits_evenly() {
        let split = StageLayers::new(4, 2, 1, Some(1), Some(3)).unwrap();
        assert_eq!((split.layers(0, 0), split.layers(1, 0)), (0..1, 1..4));
        let split = StageLayers::new(10, 4, 1, Some(1), None).unwrap();
        assert_eq!(split.per_stage(), [1, 3, 3, 3]);
        let split = StageLayers::new(12, 3, 2, Some(2), Some(2)).unwrap();
        assert_eq!(split.per_stage(), [2, 8, 2]);
        assert_eq!(split.layers(1, 0), 1..5);
        assert_eq!(split.layers(0, 1), 6..7);
        assert_eq!(split.layers(2, 1), 11..12);
    }

    #[test]
    fn splits_that_do_not_work_name_the_numbers() {
        let message = |r: Result<StageLayers, SplitError>| r.unwrap_err().to_string();
        assert!(message(StageLayers::new(6, 4, 1, None, None)).contains("num_layers = 6"));
        assert!(message(StageLayers::new(8, 3, 1, Some(1), None)).contains("7 layers left"));
        assert!(message(StageLayers::new(8, 4, 2, Some(1), Some(1))).contains("stage 0 holds 1"));
        assert!(message(StageLayers::new(4, 2, 1, Some(1), Some(2))).contains("take 3"));
        assert!(message(StageLayers::new(4, 2, 1, Some(3), Some(3))).contains("more than"));
        assert!(message(StageLayers::new(4, 1, 1, Some(1), None)).contains("pp > 1"));
    }
}
