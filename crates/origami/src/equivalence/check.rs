//! `origami check` as a library call: does a run config's layout train the same model as one
//! rank (DESIGN.md §2)? The config's model, data, seed, batch sizes, optimizer and learning-rate
//! schedule are trained K steps at its layout and at world 1 through [`super::training`], and
//! the report gives each step's loss and gradient-norm errors, the worst final weights and a
//! verdict.
//!
//! Two settings make a layout legitimately train another model than one rank, and the check
//! says so and compares what can be compared:
//!
//! - token dropping (`capacity_factor`) decides on each rank's local tokens; when tensor or
//!   context parallelism splits a micro-batch's tokens (or the reference merges micro-batches,
//!   below), the verdict is on the same config made dropless, and the dropping run's
//!   difference is shown for information;
//! - the global-batch load-balancing scope with dp > 1 counts the data-parallel replicas'
//!   j-th micro-batches together; the single-rank run that equals it takes them as one
//!   micro-batch, and that is the reference.

use std::sync::Arc;
use std::time::{Duration, Instant};

use origami_comm::local::LocalWorld;
use origami_comm::Communicator;

use super::training::{
    compare, Fault, Reference, StepComparison, TrainingCase, TrainingComparison, TrainingData,
};
use super::HarnessResult;
use crate::compute::Compute;
use crate::train::config::RunConfig;
use crate::train::trainer::RANK_TIMEOUT;

/// Parameters listed by name in the report.
const LISTED_PARAMS: usize = 5;

/// What is compared, decided from a run config.
#[derive(Clone, Debug)]
pub struct CheckPlan {
    /// The world of the config's layout.
    pub world: usize,
    /// The layout in one line.
    pub layout: String,
    /// The case the verdict is on.
    pub judged: TrainingCase,
    /// The config itself, run for information when it cannot be judged exactly.
    pub informational: Option<TrainingCase>,
    /// What the reader must know about the comparison.
    pub notes: Vec<String>,
    /// How the judged case differs from the config, when it does (e.g. "with dropless
    /// routing").
    pub judged_as: Option<String>,
    /// Largest relative error that passes.
    pub tolerance: f64,
}

impl CheckPlan {
    /// The comparison of `config`'s layout with one rank over `steps` steps on `data`, passing
    /// at `tolerance`; `fault` breaks the parallel run on purpose (a self-test of the check).
    pub fn new(
        config: &RunConfig,
        data: TrainingData,
        steps: usize,
        tolerance: f64,
        fault: Option<Fault>,
    ) -> Self {
        let p = &config.parallel;
        let t = &config.train;
        let case = TrainingCase {
            parallel: p.config(),
            cp_comm_type: p.cp_comm_type,
            distributed_optimizer: p.distributed_optimizer,
            model: config.model.clone(),
            adamw: t.adamw,
            lr: t.lr,
            global_batch: t.global_batch,
            micro_batch: t.micro_batch,
            seq: t.seq_len,
            steps,
            bucket_elements: p.bucket_elements,
            seed: t.seed,
            first_stage_layers: p.pp_first_stage_layers,
            last_stage_layers: p.pp_last_stage_layers,
            group_size: p.microbatch_group_size,
            data,
            fault,
            tolerance,
            compute: Compute::F32,
        };
        let world = p.world;
        let mut notes = Vec::new();
        if world == 1 {
            notes.push("the layout is a single rank: the check compares it with itself".into());
        }
        if t.compute().is_bf16() {
            notes.push("the run trains in bf16 (train.precision); the check compares in f32, where every layout computes the same run up to reassociation".into());
        }
        let merges = case.reference_merges(world);
        if merges > 1 {
            notes.push(format!(
                "model.moe.aux_loss_scope = \"global_batch\" with {merges} data-parallel replicas counts the expert loads of the replicas' j-th micro-batches together (docs/moe.md); the single-rank run that equals it takes those {merges} micro-batches as one micro-batch of {} sequences, and is the reference",
                merges * t.micro_batch
            ));
        }
        let mut informational = None;
        let mut judged_as = None;
        let mut judged = case.clone();
        if let Some(factor) = config.model.moe.capacity_factor {
            let splitters = p.tp * p.cp;
            if splitters > 1 || merges > 1 {
                let why = if splitters > 1 {
                    format!("tensor × context parallelism (TP{} · CP{}) splits each micro-batch's tokens over {splitters} ranks", p.tp, p.cp)
                } else {
                    format!("the reference merges {merges} micro-batches")
                };
                notes.push(format!(
                    "model.moe.capacity_factor = {factor} drops tokens by a capacity computed from each rank's own tokens (sub-sequence dropping), and {why}, so this layout legitimately drops other tokens than one rank does. The verdict is on the same config made dropless (capacity_factor removed); the dropping run's difference is shown for information"
                ));
                judged.model.moe.capacity_factor = None;
                judged.model.moe.pad_to_capacity = false;
                judged_as = Some("with dropless routing".to_string());
                informational = Some(case);
            } else {
                notes.push(format!(
                    "model.moe.capacity_factor = {factor}: every rank holds whole micro-batches (TP1 · CP1), so it drops exactly the tokens one rank drops, and the dropping run is compared as it is"
                ));
            }
        }
        if config.model.moe.input_jitter_eps.is_some() {
            notes.push(
                "router input jitter is on: its noise is keyed by (seed, step, token, layer), so both runs draw the same".into(),
            );
        }
        CheckPlan {
            world,
            layout: p.describe(),
            judged,
            informational,
            notes,
            judged_as,
            tolerance,
        }
    }
}

/// One run of the check: the layout against the reference, with their times.
#[derive(Clone, Debug)]
pub struct CheckRun {
    /// The comparison.
    pub comparison: TrainingComparison,
    /// Wall time of the single-rank run.
    pub reference_time: Duration,
    /// Wall time of the layout's run.
    pub layout_time: Duration,
}

/// The outcome of a check.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// What was compared.
    pub plan: CheckPlan,
    /// The judged comparison.
    pub judged: CheckRun,
    /// The config as it is, when it was run for information only.
    pub informational: Option<CheckRun>,
}

impl CheckReport {
    /// Whether every judged error is within the tolerance.
    pub fn passed(&self) -> bool {
        self.judged.comparison.discrepancy().max() <= self.plan.tolerance
    }

    /// The report as the command prints it.
    pub fn render(&self) -> String {
        let plan = &self.plan;
        let case = &plan.judged;
        let mut out = format!(
            "check: {} against world 1, {} steps, tolerance {:e}\n",
            plan.layout, case.steps, plan.tolerance
        );
        for note in &plan.notes {
            out += &format!("note: {note}\n");
        }
        out += &render_run(&self.judged, case.model.moe.num_experts);
        if let Some(info) = &self.informational {
            let c = &info.comparison;
            let largest =
                |error: fn(&StepComparison) -> f64| c.steps.iter().map(error).fold(0.0, f64::max);
            out +=
                "for information, the config as it is (dropping tokens), layout against world 1:\n";
            out += &step_table(c);
            out += &format!(
                "  largest relative difference: loss {:.1e}, gradient norm {:.1e} (dropping differs legitimately; not judged)\n",
                largest(StepComparison::loss_error),
                largest(StepComparison::grad_norm_error)
            );
        }
        let judged_as = plan
            .judged_as
            .as_ref()
            .map_or(String::new(), |how| format!("{how}, "));
        let d = self.judged.comparison.discrepancy();
        if self.passed() {
            out += &format!(
                "PASS: {judged_as}the layout trains the same model as one rank (largest relative error {:.1e} ≤ {:e})\n",
                d.max(),
                plan.tolerance
            );
        } else {
            let failing = self.judged.comparison.failing_params(plan.tolerance);
            if !failing.is_empty() {
                out += &format!(
                    "parameters beyond the tolerance (first-step gradient or final weight beyond the allowance), {} of {}:\n",
                    failing.len(),
                    self.judged.comparison.params.len()
                );
                for (name, error) in &failing {
                    out += &format!("  {name:<44} {error:>9.1e}\n");
                }
            }
            out += &format!(
                "FAIL: {judged_as}the layout differs from one rank beyond {:e}: {}\n",
                plan.tolerance,
                self.failures().join("; ")
            );
        }
        out
    }

    /// What exceeds the tolerance, each with its error: losses, loads, parameters by name.
    fn failures(&self) -> Vec<String> {
        let tolerance = self.plan.tolerance;
        let comparison = &self.judged.comparison;
        let d = comparison.discrepancy();
        let mut what = Vec::new();
        if d.losses > tolerance {
            what.push(format!("step losses or gradient norms ({:.1e})", d.losses));
        }
        if d.loads > tolerance {
            what.push(format!("expert loads ({:.1e})", d.loads));
        }
        let failing = comparison.failing_params(tolerance);
        if !failing.is_empty() {
            let names: Vec<String> = failing
                .iter()
                .take(LISTED_PARAMS)
                .map(|(name, e)| format!("{name} ({e:.1e})"))
                .collect();
            let more = failing.len().saturating_sub(LISTED_PARAMS);
            what.push(format!(
                "parameters {}{}",
                names.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
        what
    }
}

/// A judged run: timings, steps, loads, first-step gradients and the worst final weights.
fn render_run(run: &CheckRun, experts: usize) -> String {
    let c = &run.comparison;
    let mut out = format!(
        "time: world 1 {:.1} s, layout {:.1} s\n",
        run.reference_time.as_secs_f64(),
        run.layout_time.as_secs_f64()
    );
    out += &step_table(c);
    if c.load_mismatches.is_empty() {
        out += &format!("expert loads: equal at every step ({experts} experts per MoE layer)\n");
    } else {
        let places: Vec<String> = c
            .load_mismatches
            .iter()
            .map(|(step, layer)| format!("step {} MoE layer {layer}", step + 1))
            .collect();
        out += &format!(
            "expert loads: differ (largest difference {:.1e} of the largest count) at {}\n",
            c.loads,
            places.join(", ")
        );
    }
    match c
        .grads
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
    {
        None => out += "first-step gradients: not compared (the distributed optimizer keeps only its part of them)\n",
        Some((name, error)) => {
            out += &format!("first-step gradients: largest relative error {error:.1e} ({name})\n")
        }
    }
    out += &format!(
        "final weights, the {LISTED_PARAMS} largest errors of {} parameters (error: max |w − w1| / max |w1|; beyond allowance: the part that AdamW's division by each element's gradient RMS does not explain):\n",
        c.params.len()
    );
    out += &format!(
        "  {:<44} {:>9} {:>17}\n",
        "parameter", "error", "beyond allowance"
    );
    for p in c.worst_params(LISTED_PARAMS) {
        out += &format!(
            "  {:<44} {:>9.1e} {:>17.1e}\n",
            p.name, p.error, p.beyond_allowance
        );
    }
    out
}

/// Each step's losses and gradient norms beside the reference's, with their relative errors.
fn step_table(c: &TrainingComparison) -> String {
    let mut out = format!(
        "{:>5} {:>13} {:>13} {:>10} {:>13} {:>13} {:>10}\n",
        "step",
        "layout loss",
        "world-1 loss",
        "rel. error",
        "layout norm",
        "world-1 norm",
        "rel. error"
    );
    for (i, s) in c.steps.iter().enumerate() {
        out += &format!(
            "{:>5} {:>13.6} {:>13.6} {:>10.1e} {:>13.6} {:>13.6} {:>10.1e}\n",
            i + 1,
            s.loss,
            s.reference_loss,
            s.loss_error(),
            s.grad_norm,
            s.reference_grad_norm,
            s.grad_norm_error()
        );
    }
    out
}

/// Runs `case` at its layout as `world` threads of this process, after the reference on this
/// thread.
fn run_locally(case: &TrainingCase, world: usize) -> HarnessResult<CheckRun> {
    let started = Instant::now();
    let reference = Reference::compute(case, world)?;
    let reference_time = started.elapsed();
    let started = Instant::now();
    let mut comparisons = LocalWorld::new(world)
        .with_timeout(RANK_TIMEOUT)
        .run(|comm: Arc<dyn Communicator>| compare(&comm, case, &reference))?;
    Ok(CheckRun {
        comparison: comparisons.swap_remove(0),
        reference_time,
        layout_time: started.elapsed(),
    })
}

/// Runs `case` as this rank of `world` (e.g. one process of `mpirun`): rank 0 trains the
/// reference first and sends it to the others, then every rank runs its part.
fn run_on(world: &Arc<dyn Communicator>, case: &TrainingCase) -> HarnessResult<CheckRun> {
    let started = Instant::now();
    let reference = Reference::on_root(world, case)?;
    let reference_time = started.elapsed();
    let started = Instant::now();
    let comparison = compare(world, case, &reference)?;
    Ok(CheckRun {
        comparison,
        reference_time,
        layout_time: started.elapsed(),
    })
}

/// Runs `plan` with its ranks as threads of this process.
pub fn check_locally(plan: CheckPlan) -> HarnessResult<CheckReport> {
    let judged = run_locally(&plan.judged, plan.world)?;
    let informational = plan
        .informational
        .as_ref()
        .map(|case| run_locally(case, plan.world))
        .transpose()?;
    Ok(CheckReport {
        plan,
        judged,
        informational,
    })
}

/// Runs `plan` as this rank of `world` (every rank gets the same report).
pub fn check_on(world: &Arc<dyn Communicator>, plan: CheckPlan) -> HarnessResult<CheckReport> {
    if world.size() != plan.world {
        return Err(format!(
            "parallel.world = {} but the job has {} ranks (run `mpirun -np {}`, or set parallel.world)",
            plan.world,
            world.size(),
            plan.world
        )
        .into());
    }
    let judged = run_on(world, &plan.judged)?;
    let informational = plan
        .informational
        .as_ref()
        .map(|case| run_on(world, case))
        .transpose()?;
    Ok(CheckReport {
        plan,
        judged,
        informational,
    })
}
