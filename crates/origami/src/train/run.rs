//! `origami train` as a library call: data, the training loop, the plot, a closing evaluation
//! summary and a sample, with the log a user reads.

use super::config::RunConfig;
use super::data::open_run_data;
use super::plot::plot_run;
use super::trainer::{train, train_on, TrainOptions, TrainOutcome};
use crate::generate::{generate, SamplingSettings};
use origami_comm::Communicator;
use std::path::PathBuf;
use std::sync::Arc;

/// What a finished quick-start run reports.
pub struct RunSummary {
    /// The training outcome.
    pub outcome: TrainOutcome,
    /// The SVG plot written.
    pub plot: PathBuf,
    /// Text sampled from the final model.
    pub sample: String,
}

/// Prompt of the closing sample.
const SAMPLE_PROMPT: &str = "ROMEO:\n";

/// Runs a whole training job as configured (its ranks as threads of this process), printing
/// progress when `options.verbose`.
pub fn run(config: &RunConfig, options: &TrainOptions) -> anyhow::Result<RunSummary> {
    run_with(None, config, options)
}

/// Runs the job as one process of `world` (one process per rank, e.g. under `mpirun`): rank 0
/// prepares the data, logs, plots and samples; every rank trains.
pub fn run_on(
    world: Arc<dyn Communicator>,
    config: &RunConfig,
    options: &TrainOptions,
) -> anyhow::Result<RunSummary> {
    run_with(Some(world), config, options)
}

fn run_with(
    world: Option<Arc<dyn Communicator>>,
    config: &RunConfig,
    options: &TrainOptions,
) -> anyhow::Result<RunSummary> {
    let leader = world.as_ref().is_none_or(|w| w.rank() == 0);
    let options = &TrainOptions {
        verbose: options.verbose && leader,
        ..options.clone()
    };
    if options.verbose {
        println!("layout: {}", config.parallel.describe());
        println!(
            "{}",
            config.train.compute().describe(config.train.precision)
        );
    }
    // One process prepares the data; the others open it once it exists.
    if let (Some(world), false) = (&world, leader) {
        world.barrier()?;
    }
    let data = open_run_data(config, options.verbose)?;
    if let (Some(world), true) = (&world, leader) {
        world.barrier()?;
    }
    let model = crate::model::gpt::GptModel::new(config.model.clone())?;
    if options.verbose {
        println!(
            "model: {} parameters ({} layers, hidden {}, {} experts top-{}), {} train samples of {} tokens{}",
            model.registry().total_len(),
            config.model.num_layers,
            config.model.hidden_size,
            config.model.moe.num_experts,
            config.model.moe.topk,
            data.train.len(),
            config.train.seq_len + 1,
            data.valid.as_ref().map_or(String::new(), |v| format!(", {} validation samples", v.len()))
        );
    }
    let valid = data.valid.as_ref().map(|v| v as _);
    let outcome = match world {
        Some(world) => train_on(world, config, &data.train, valid, options)?,
        None => train(config, &data.train, valid, options)?,
    };
    let plot = config.checkpoint.dir.join("plot.svg");
    if !leader {
        return Ok(RunSummary {
            outcome,
            plot,
            sample: String::new(),
        });
    }
    if !outcome.records.is_empty() {
        plot_run(&plot, &read_all_records(config, options, &outcome)?)?;
    }
    let prompt = data.tokenizer.encode(SAMPLE_PROMPT)?;
    let settings = SamplingSettings {
        max_tokens: 400,
        temperature: 0.8,
        top_k: 40,
        seed: config.train.seed,
    };
    let tokens = generate(
        &outcome.model,
        &outcome.params,
        &prompt,
        &settings,
        Some(data.tokenizer.eod_id()),
    );
    let sample = format!("{SAMPLE_PROMPT}{}", data.tokenizer.decode(&tokens));
    if options.verbose {
        match (outcome.val_loss, outcome.records.is_empty(), data.valid.is_some()) {
            (Some(v), _, _) => println!("validation loss {v:.4} nats per token (held-out documents)"),
            (None, true, _) => println!(
                "nothing to train: the run is complete at train.steps = {} (raise it with --set train.steps=N to continue)",
                config.train.steps
            ),
            (None, false, false) => println!("no validation split configured (data.split gives it no documents)"),
            (None, false, true) => println!("no evaluation in this invocation (train.eval_interval = {})", config.train.eval_interval),
        }
        println!("checkpoint {}", outcome.checkpoint.display());
        println!("plot {}", plot.display());
        println!("--- sample ---\n{sample}\n--------------");
    }
    Ok(RunSummary {
        outcome,
        plot,
        sample,
    })
}

/// Every step record of the run so far (earlier invocations included, when resumed), read back
/// from the metrics file so the plot covers the whole run.
fn read_all_records(
    config: &RunConfig,
    options: &TrainOptions,
    outcome: &TrainOutcome,
) -> anyhow::Result<Vec<super::metrics::StepRecord>> {
    let path = super::trainer::metrics_path(config, options);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(outcome.records.clone());
    };
    let mut records: Vec<super::metrics::StepRecord> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    records.sort_by_key(|r| r.step);
    records.dedup_by_key(|r| r.step);
    Ok(if records.is_empty() {
        outcome.records.clone()
    } else {
        records
    })
}
