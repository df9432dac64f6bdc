//! `origami bench --profile`: the median step's time by phase ([`crate::profile`]), averaged
//! over the ranks, as a table and in the JSON report.

use std::sync::Arc;

use origami_comm::{Communicator, ReduceOp};
use serde::Serialize;

use crate::profile::{Phase, Profile};

/// One phase's share of the step.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseShare {
    /// The phase's name.
    pub phase: &'static str,
    /// Seconds per step (mean over ranks).
    pub seconds: f64,
    /// Share of the step time.
    pub fraction: f64,
}

/// The median step's profile.
#[derive(Clone, Debug, Serialize)]
pub struct StepProfile {
    /// The step time, seconds.
    pub step_s: f64,
    /// Every phase, in [`Phase::ALL`] order.
    pub phases: Vec<PhaseShare>,
    /// What no phase accounts for (waiting at the step's end for the slowest rank,
    /// bookkeeping), seconds.
    pub other_s: f64,
    /// Bytes asked of the allocator per step by the ranks' threads (mean over ranks).
    pub allocated_bytes: f64,
    /// Minor page faults of the process in the step (fresh pages the kernel zeroed).
    pub minor_faults: u64,
}

impl StepProfile {
    /// The ranks' profiles of the median step of `step_s` seconds, averaged (collective).
    pub fn gather(
        world: &Arc<dyn Communicator>,
        mine: &Profile,
        step_s: f64,
        minor_faults: u64,
    ) -> anyhow::Result<Self> {
        let mut values: Vec<f32> = Phase::ALL
            .iter()
            .map(|&p| mine.seconds_in(p) as f32)
            .collect();
        values.push(mine.allocated_bytes as f32);
        world.all_reduce(&mut values, ReduceOp::Sum)?;
        let ranks = world.size() as f64;
        let mean = |v: f32| v as f64 / ranks;
        let phases: Vec<PhaseShare> = Phase::ALL
            .iter()
            .zip(&values)
            .map(|(p, &s)| PhaseShare {
                phase: p.name(),
                seconds: mean(s),
                fraction: mean(s) / step_s,
            })
            .collect();
        let accounted: f64 = phases.iter().map(|p| p.seconds).sum();
        Ok(StepProfile {
            step_s,
            other_s: (step_s - accounted).max(0.0),
            phases,
            allocated_bytes: mean(values[Phase::ALL.len()]),
            minor_faults,
        })
    }

    /// The profile as a text table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<26} {:>10} {:>7}\n",
            "phase (mean over ranks)", "ms/step", "share"
        );
        let row = |name: &str, seconds: f64| {
            format!(
                "{name:<26} {:>10.1} {:>6.1}%\n",
                seconds * 1e3,
                100.0 * seconds / self.step_s
            )
        };
        for p in self.phases.iter().filter(|p| p.seconds > 0.0) {
            out += &row(p.phase, p.seconds);
        }
        out += &row("other", self.other_s);
        out += &row("step", self.step_s);
        out += &format!(
            "allocated {:.1} MiB per rank, {} minor page faults in the step\n",
            self.allocated_bytes / (1024.0 * 1024.0),
            self.minor_faults
        );
        out
    }
}
