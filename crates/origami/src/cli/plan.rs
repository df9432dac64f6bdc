//! `origami plan`: memory and step time of every folded layout of a model on a cluster, the
//! fastest that fit, or one layout explained term by term; `--calibrate` measures this machine
//! into the `local` hardware description.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use origami::compute::{Compute, PrecisionSetting};
use origami::plan::calibrate::{local_path, write_local};
use origami::plan::shape::resolve_model;
use origami::toml_override::apply_override;
use origami_plan::report::{assumptions, explain, table};
use origami_plan::{
    search, Evaluation, Hardware, Layout, PlanInputs, Planner, Precision, Recompute,
};
use serde::Serialize;

/// Arguments of `origami plan`.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Model: a preset (tiny, small, medium), a paper model (mixtral-8x22b, qwen2-57b-a14b,
    /// mixtral-8x22b-g8t8), a HuggingFace config.json or a run TOML.
    #[arg(long)]
    pub model: Option<String>,
    /// Devices (ranks).
    #[arg(long)]
    pub gpus: Option<usize>,
    /// Sequences per optimizer step.
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq: Option<usize>,
    /// Precision: bf16 or f32.
    #[arg(long, default_value = "bf16")]
    pub precision: String,
    /// Hardware: h100-dgx, local (written by --calibrate) or a TOML file.
    #[arg(long, default_value = "h100-dgx")]
    pub hardware: String,
    /// Override one key of the hardware description, e.g. `--set
    /// engine.overlap_tensor_parallel=false` for a run without Megatron's --tp-comm-overlap
    /// (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Layouts to show.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Also find the best layout without folding (etp = tp, ep groups inside dp groups); with
    /// --layout, refuse a folded layout.
    #[arg(long)]
    pub no_folding: bool,
    /// Evaluate one layout, e.g. "tp=2 cp=1 pp=8 vpp=1 ep=8 etp=1 mbs=1" (keys left out are 1).
    #[arg(long)]
    pub layout: Option<String>,
    /// One JSON object per layout.
    #[arg(long)]
    pub json: bool,
    /// Keep the whole optimizer state on every data-parallel rank (default: distributed).
    #[arg(long)]
    pub no_distributed_optimizer: bool,
    /// Context parallelism by all-to-all over heads instead of the key/value ring.
    #[arg(long)]
    pub cp_all_to_all: bool,
    /// Expert rows of the busiest rank over the uniform share (dropless imbalance margin).
    #[arg(long, default_value_t = 1.0)]
    pub expert_imbalance: f64,
    /// What each transformer layer's backward recomputes instead of keeping, as
    /// `train.recompute`: none, selective (attention core, SwiGLU and norm outputs) or full
    /// (each layer from its input).
    #[arg(long, default_value = "none")]
    pub recompute: String,
    /// Also search pipelines whose first or last stage holds its own number of layers (within
    /// two of the even share, as `first=… last=…` in a layout); needed where the layers do not
    /// divide by pp.
    #[arg(long)]
    pub uneven_stages: bool,
    /// Measure this machine and write the `local` hardware description.
    #[arg(long)]
    pub calibrate: bool,
}

/// One layout in the JSON output.
#[derive(Serialize)]
struct JsonRow<'a> {
    #[serde(flatten)]
    evaluation: &'a Evaluation,
    /// Whether the layout obeys the no-folding rule.
    unfolded: bool,
    /// `best` (the search's fastest), `best_unfolded`, `ranked` or `explained`.
    role: &'static str,
}

/// Runs the planner.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    if args.calibrate {
        let (path, _) = write_local(&mut |line| eprintln!("{line}"))?;
        let precision = Compute::resolve(PrecisionSetting::Auto, false).name();
        println!(
            "wrote {} (use it with --hardware local; `origami train` computes in {precision} on this CPU: --precision {precision})",
            path.display()
        );
        return Ok(());
    }
    let required = |value: Option<usize>, flag: &str| {
        value.with_context(|| format!("{flag} is required (or use --calibrate)"))
    };
    let model = resolve_model(args.model.as_deref().context("--model is required")?)?;
    let hardware = with_overrides(load_hardware(&args.hardware)?, &args.set)?;
    let precision: Precision = args.precision.parse()?;
    let inputs = PlanInputs {
        model,
        hardware: hardware.clone(),
        gpus: required(args.gpus, "--gpus")?,
        global_batch: required(args.global_batch, "--global-batch")?,
        seq: required(args.seq, "--seq")?,
        precision,
        distributed_optimizer: !args.no_distributed_optimizer,
        cp_all_to_all: args.cp_all_to_all,
        expert_imbalance: args.expert_imbalance,
        recompute: args.recompute.parse()?,
        uneven_stages: args.uneven_stages,
    };
    let gpus = inputs.gpus;
    let mut planner = Planner::new(inputs)?;
    if let Some(text) = &args.layout {
        let layout: Layout = text.parse()?;
        if args.no_folding {
            layout.check_unfolded(gpus)?;
        }
        let evaluation = planner
            .evaluate(&layout)
            .with_context(|| format!("evaluating {layout}"))?;
        if args.json {
            print_json(&evaluation, gpus, "explained")?;
        } else {
            print!("{}", explain(&evaluation, &hardware));
        }
        return Ok(());
    }
    let started = Instant::now();
    let result = search(&mut planner, false)?;
    let seconds = started.elapsed().as_secs_f64();
    let top: Vec<&Evaluation> = result.fitting.iter().take(args.top.max(1)).collect();
    let unfolded = args
        .no_folding
        .then(|| result.best_unfolded(gpus))
        .flatten();
    if args.json {
        for (i, e) in top.iter().enumerate() {
            print_json(e, gpus, if i == 0 { "best" } else { "ranked" })?;
        }
        if let Some(e) = unfolded {
            print_json(e, gpus, "best_unfolded")?;
        }
        return Ok(());
    }
    let i = planner.inputs();
    let run = match i.recompute {
        Recompute::None => i.precision.to_string(),
        recompute => format!("{}, recompute {recompute}", i.precision),
    };
    println!(
        "{} on {} × {} ({}), global batch {} × {} tokens: {} layouts in {:.2} s — {} fit, {} do not, {} invalid",
        i.model.name,
        gpus,
        hardware.name,
        run,
        i.global_batch,
        i.seq,
        result.candidates,
        seconds,
        result.fitting.len(),
        result.not_fitting.len(),
        result.invalid
    );
    println!("\nfastest layouts that fit (seconds per step; communication is what stays exposed):");
    print!("{}", table(&top));
    if let Some(e) = unfolded {
        println!("\nbest without folding:");
        print!("{}", table(&[e]));
        println!(
            "folding gains {:.1} % tokens/s over it",
            (top[0].tokens_per_s / e.tokens_per_s - 1.0) * 100.0
        );
    } else if args.no_folding {
        println!("\nno layout without folding fits");
    }
    if let Some(smallest) = result.not_fitting.first() {
        let need = if hardware.device.shared_by_ranks {
            smallest.memory_per_node_gib
        } else {
            smallest.memory_per_rank_gib
        };
        println!(
            "\n{} layouts do not fit in {:.1} GiB; the least memory among them is {:.1} GiB ({:.1} over) at {}",
            result.not_fitting.len(),
            smallest.capacity_gib,
            need,
            need - smallest.capacity_gib,
            smallest.layout
        );
    }
    println!("\nassumptions:");
    for line in assumptions(&hardware, planner.inputs().recompute) {
        println!("  - {line}");
    }
    Ok(())
}

fn print_json(evaluation: &Evaluation, gpus: usize, role: &'static str) -> anyhow::Result<()> {
    let row = JsonRow {
        evaluation,
        unfolded: evaluation.layout.is_unfolded(gpus),
        role,
    };
    println!("{}", serde_json::to_string(&row)?);
    Ok(())
}

/// `hardware` with each `section.key=value` of `--set` applied, checked as a description is;
/// its name says what was set.
fn with_overrides(hardware: Hardware, items: &[String]) -> anyhow::Result<Hardware> {
    if items.is_empty() {
        return Ok(hardware);
    }
    let mut tree: toml::Table =
        toml::from_str(&hardware.to_toml()).context("re-reading the hardware description")?;
    for item in items {
        apply_override(&mut tree, item, "engine.overlap_tensor_parallel=false")?;
    }
    let name = format!("{} (--set {})", hardware.name, items.join(", "));
    let mut hardware = Hardware::from_toml(&toml::to_string(&tree)?, &name)?;
    hardware.name = name;
    Ok(hardware)
}

/// `h100-dgx` (embedded), `local` (the calibrated file) or a path.
fn load_hardware(name: &str) -> anyhow::Result<Hardware> {
    match name {
        "h100-dgx" => Ok(Hardware::h100_dgx()),
        "local" => {
            let path = local_path()?;
            if !path.exists() {
                bail!(
                    "no local hardware description at {}: run `origami plan --calibrate` first",
                    path.display()
                );
            }
            Ok(Hardware::from_file(&path)?)
        }
        file => {
            let path = Path::new(file);
            if !path.exists() {
                bail!("--hardware {file:?} is neither h100-dgx, local nor an existing file");
            }
            Ok(Hardware::from_file(path)?)
        }
    }
}
