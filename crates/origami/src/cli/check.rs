//! `origami check`: trains K steps of a run config at its layout and on one rank, on the same
//! data and seed, and says whether they train the same model (exit 0 on PASS, 1 on FAIL, 2 when
//! the config cannot be read, is invalid, or names data that cannot be opened).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use origami::equivalence::check::{check_locally, CheckPlan, CheckReport};
use origami::equivalence::training::{Fault, TrainingData};
use origami::train::config::RunConfig;
use origami::train::data::open_run_data;
#[cfg(feature = "mpi")]
use origami_comm::Communicator;

use super::{launched_by_mpirun, ConfigError};

/// Arguments of `origami check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// TOML run config; keys it leaves out keep the embedded default's values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one config key, e.g. `--set train.seq_len=64` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Training steps compared.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Largest relative error that passes (losses, gradient norms, expert loads, first-step
    /// gradients, final weights beyond AdamW's allowance).
    #[arg(long, default_value_t = 1e-4, value_parser = positive_number)]
    pub tolerance: f64,
    /// Self-test of the check: rank RANK of the layout initialises its parameters from
    /// another seed, so the check must FAIL and name the parameters that differ.
    #[arg(long, value_name = "RANK")]
    pub break_rank: Option<usize>,
}

/// A finite number above zero.
fn positive_number(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        Ok(v) => Err(format!("{v} is not a positive number")),
        Err(e) => Err(e.to_string()),
    }
}

/// The run config of `args`, every failure a [`ConfigError`].
fn read_config(args: &CheckArgs) -> Result<RunConfig, ConfigError> {
    let text = match &args.config {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))
            .map_err(ConfigError)?,
        None => String::new(),
    };
    let config = RunConfig::from_toml(&text, &args.overrides).map_err(ConfigError)?;
    if let Some(rank) = args.break_rank {
        if rank >= config.parallel.world {
            return Err(ConfigError(anyhow::anyhow!(
                "--break-rank {rank} is not a rank of parallel.world = {}",
                config.parallel.world
            )));
        }
    }
    Ok(config)
}

/// The plan of the check on the config's training split (prepared from `data.source` first if
/// needed, as `origami train` does).
fn plan(config: &RunConfig, args: &CheckArgs, verbose: bool) -> Result<CheckPlan, ConfigError> {
    let data = open_run_data(config, verbose)
        .with_context(|| {
            format!(
                "opening the data of the config ({})",
                config.data.prefix.display()
            )
        })
        .map_err(ConfigError)?;
    if data.train.is_empty() {
        return Err(ConfigError(anyhow::anyhow!(
            "the training split of {} has no samples of {} tokens",
            config.data.prefix.display(),
            config.train.seq_len + 1
        )));
    }
    if verbose {
        println!(
            "data: {} (training split, {} samples of {} tokens), seed {}",
            config.data.prefix.display(),
            data.train.len(),
            config.train.seq_len + 1,
            config.train.seed
        );
    }
    // The broken rank initialises from the next seed.
    let fault = args.break_rank.map(|rank| Fault::SeedOnRank {
        rank,
        seed: config.train.seed.wrapping_add(1),
    });
    Ok(CheckPlan::new(
        config,
        TrainingData::Samples(Arc::new(data.train)),
        args.steps as usize,
        args.tolerance,
        fault,
    ))
}

/// Prints `report` (on the leading rank) and turns its verdict into the exit code.
fn verdict(report: &CheckReport, leader: bool) -> ExitCode {
    if leader {
        print!("{}", report.render());
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Runs the check as this rank of `world` (one process of `mpirun`): rank 0 prepares the data
/// while the others wait, rank 0 trains the reference first, every rank runs its part.
#[cfg(feature = "mpi")]
fn check_under_mpi(
    world: Arc<dyn Communicator>,
    config: &RunConfig,
    args: &CheckArgs,
) -> anyhow::Result<ExitCode> {
    let leader = world.rank() == 0;
    if !leader {
        world.barrier()?;
    }
    let plan = plan(config, args, leader);
    if leader {
        world.barrier()?;
    }
    let report =
        origami::equivalence::check::check_on(&world, plan?).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(verdict(&report, leader))
}

/// Runs `origami check`.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let config = read_config(&args)?;
    let threads = match config.train.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    if launched_by_mpirun() {
        #[cfg(feature = "mpi")]
        {
            return pool.install(|| {
                origami_comm::mpi::run(|world: Arc<dyn Communicator>| {
                    check_under_mpi(world, &config, &args).map_err(|e| format!("{e:#}"))
                })
                .map_err(anyhow::Error::from)
            });
        }
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "started by mpirun, but this origami was built without MPI: rebuild with `--features mpi` (or run without mpirun: the ranks then run as threads)"
        );
    }
    let plan = plan(&config, &args, true)?;
    let report = pool
        .install(|| check_locally(plan))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(verdict(&report, true))
}
