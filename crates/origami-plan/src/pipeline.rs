//! The pipeline's bubble and each stage's in-flight micro-batches, from `origami-schedule`'s
//! simulation of the layout's schedule with its stage times, cached by shape.

use std::collections::HashMap;

use origami_schedule::{schedule, simulate, PipelineConfig, Schedule, StageTimes};
use serde::Serialize;

use crate::PlanError;

/// One simulated step of the pipeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PipelineRun {
    /// Schedule name: `none`, `1F1B` or `interleaved`.
    pub schedule: &'static str,
    /// Time from the first forward to the last backward, seconds.
    pub makespan: f64,
    /// Idle time of the busiest stage: `makespan − M·(forward + backward)`.
    pub bubble: f64,
    /// Most (micro-batch, chunk) forwards each stage holds before their backward.
    pub peak_in_flight: Vec<usize>,
}

/// The backward/forward ratio is rounded to `1 / RATIO_STEPS` for the cache; the cached bubble,
/// in units of `F + B`, barely moves over one step (exactly not at all under 1F1B).
const RATIO_STEPS: f64 = 20.0;

/// Simulations already run, keyed by shape and the backward/forward ratio (makespans scale
/// with the forward time at a fixed ratio).
#[derive(Debug, Default)]
pub struct PipelineCache {
    runs: HashMap<ShapeKey, UnitRun>,
}

/// pp, vpp, micro-batches and the rounded backward/forward ratio.
type ShapeKey = (usize, usize, usize, u64);

/// Bubble in units of one micro-batch's `F + B`, and each stage's peak in-flight chunk forwards.
type UnitRun = (f64, Vec<usize>);

impl PipelineCache {
    /// Simulates `pp` stages of `vpp` chunks over `micro_batches`, each stage taking `times`
    /// per micro-batch.
    pub fn run(
        &mut self,
        pp: usize,
        vpp: usize,
        micro_batches: usize,
        times: StageTimes,
    ) -> Result<PipelineRun, PlanError> {
        let config = PipelineConfig::new(pp, vpp, micro_batches);
        config.validate()?;
        let ratio = times.backward / times.forward;
        let key = (pp, vpp, micro_batches, (ratio * RATIO_STEPS).round() as u64);
        let (unit_bubble, peak_in_flight) = match self.runs.get(&key) {
            Some(run) => run.clone(),
            None => {
                let unit = StageTimes {
                    forward: 1.0,
                    backward: key.3 as f64 / RATIO_STEPS,
                };
                let schedules = (0..pp)
                    .map(|stage| schedule(&config, stage))
                    .collect::<Result<Vec<Schedule>, _>>()?;
                let simulation = simulate(&schedules, unit)?;
                let per_micro_batch = unit.forward + unit.backward;
                let busy = micro_batches as f64 * per_micro_batch;
                let run = (
                    (simulation.makespan - busy).max(0.0) / per_micro_batch,
                    simulation
                        .stages
                        .iter()
                        .map(|s| s.peak_in_flight)
                        .collect::<Vec<_>>(),
                );
                self.runs.insert(key, run.clone());
                run
            }
        };
        let per_micro_batch = times.forward + times.backward;
        let bubble = unit_bubble * per_micro_batch;
        let busy = micro_batches as f64 * per_micro_batch;
        Ok(PipelineRun {
            schedule: config.kind().name(),
            makespan: busy + bubble,
            bubble,
            peak_in_flight,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_forward_one_backward_bubble_is_p_minus_one_stage_times() {
        // 1F1B with equal stages: makespan M·(F+B) + (p−1)·(F+B); stage r holds p − r.
        let mut cache = PipelineCache::default();
        let times = StageTimes {
            forward: 0.5,
            backward: 1.0,
        };
        let run = cache.run(4, 1, 8, times).unwrap();
        assert!((run.makespan - (8.0 + 3.0) * 1.5).abs() < 1e-9);
        assert!((run.bubble - 3.0 * 1.5).abs() < 1e-9);
        assert_eq!(run.peak_in_flight, vec![4, 3, 2, 1]);
        assert_eq!(run.schedule, "1F1B");
        // Cached: the same shape at twice the times takes twice as long.
        let doubled = cache
            .run(
                4,
                1,
                8,
                StageTimes {
                    forward: 1.0,
                    backward: 2.0,
                },
            )
            .unwrap();
        assert!((doubled.makespan - 2.0 * run.makespan).abs() < 1e-9);
    }

    #[test]
    fn interleaving_shrinks_the_bubble_and_no_pipeline_has_none() {
        let mut cache = PipelineCache::default();
        let times = StageTimes::default();
        let plain = cache.run(4, 1, 8, times).unwrap().bubble;
        let interleaved = cache.run(4, 2, 8, times).unwrap();
        assert!(
            interleaved.bubble < 0.75 * plain,
            "{interleaved:?} vs {plain}"
        );
        assert_eq!(interleaved.schedule, "interleaved");
        // First stage of the interleaved schedule: 2(p−1) + (v−1)·p + 1 = 11 chunk forwards.
        assert_eq!(interleaved.peak_in_flight[0], 11);
        let none = cache.run(1, 1, 4, times).unwrap();
        assert_eq!((none.bubble, none.peak_in_flight[0]), (0.0, 1));
        assert!(cache.run(4, 2, 5, times).is_err());
    }
}
