//! `origami train`: the training job (the embedded quick-start config by default).

use anyhow::Context;
use clap::Args;
use origami::model::config::ModelConfig;
use origami::train::checkpoint;
use origami::train::config::RunConfig;
use origami::train::trainer::TrainOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::launched_by_mpirun;

/// Arguments of `origami train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML run config; keys it leaves out keep the embedded default's values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one config key, e.g. `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Take the `[model]` section from a preset: tiny, small or medium (`--set` still applies).
    #[arg(long, conflicts_with = "hf_config")]
    pub model_preset: Option<String>,
    /// Take the `[model]` section from a HuggingFace Mixtral or Qwen2-MoE `config.json`.
    #[arg(long)]
    pub hf_config: Option<PathBuf>,
    /// Continue from a checkpoint or run directory (its config is used unless --config is given).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Metrics JSONL file (default: checkpoint.dir/metrics.jsonl); a fresh run refuses one that
    /// exists, a resumed run appends to it.
    #[arg(long)]
    pub metrics_out: Option<PathBuf>,
}

/// The config text with its `[model]` replaced by `--model-preset` or `--hf-config`, if given.
fn with_model(text: &str, args: &TrainArgs) -> anyhow::Result<String> {
    let model = match (&args.model_preset, &args.hf_config) {
        (Some(preset), _) => ModelConfig::preset(preset)?,
        (None, Some(path)) => {
            let json = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let json = serde_json::from_str(&json)
                .with_context(|| format!("parsing {}", path.display()))?;
            origami::hf::config::model_config_from_hf(&json)?
        }
        (None, None) => return Ok(text.to_string()),
    };
    let mut config = RunConfig::from_toml(text, &[])?;
    config.model = model;
    Ok(config.to_toml())
}

/// Trains with one process per rank when started by `mpirun` (MPI builds), otherwise with the
/// ranks as threads of this process.
fn run_job(
    config: &RunConfig,
    options: &TrainOptions,
) -> anyhow::Result<origami::train::run::RunSummary> {
    if launched_by_mpirun() {
        #[cfg(feature = "mpi")]
        {
            return origami_comm::mpi::run(|world| {
                origami::train::run::run_on(world, config, options).map_err(|e| format!("{e:#}"))
            })
            .map_err(anyhow::Error::from);
        }
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "started by mpirun, but this origami was built without MPI: rebuild with `--features mpi` (or run without mpirun: the ranks then run as threads)"
        );
    }
    origami::train::run::run(config, options)
}

/// Runs the training job.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let text = match (&args.config, &args.resume) {
        (Some(path), _) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, Some(resume)) => checkpoint::read_state(&checkpoint::resolve(resume)?)?.config_toml,
        (None, None) => String::new(),
    };
    let config = RunConfig::from_toml(&with_model(&text, &args)?, &args.overrides)?;
    let threads = match config.train.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let handler_stop = stop.clone();
    ctrlc::set_handler(move || {
        if handler_stop.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: saving a checkpoint after this step (press Ctrl-C again to quit at once)"
        );
    })?;
    let options = TrainOptions {
        resume: args.resume,
        metrics_out: args.metrics_out,
        verbose: true,
        stop: Some(stop),
        ..TrainOptions::default()
    };
    let summary = pool.install(|| run_job(&config, &options))?;
    if summary.outcome.interrupted {
        println!(
            "stopped early; continue with: origami train --resume {}",
            config.checkpoint.dir.display()
        );
    }
    Ok(())
}
