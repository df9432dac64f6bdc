//! `origami schedule`: a pipeline schedule drawn without a model — each stage's timeline in a
//! simulation with unit forward time and backward twice as long, its bubble against the
//! schedule's formula, warm-up counts and activations held, and optionally every action.

use clap::Args;
use origami_schedule::{schedule, simulate, timeline, PipelineConfig, ScheduleKind, StageTimes};

/// Arguments of `origami schedule`.
#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// Pipeline stages.
    #[arg(long)]
    pub pp: usize,
    /// Model chunks per stage (> 1: interleaved).
    #[arg(long, default_value_t = 1)]
    pub vpp: usize,
    /// Micro-batches per step on each pipeline.
    #[arg(long)]
    pub micro_batches: usize,
    /// Interleaved schedule: micro-batches run on one chunk before the next (default pp).
    #[arg(long)]
    pub microbatch_group_size: Option<usize>,
    /// Also list every stage's actions (computations and transfers), in order.
    #[arg(long)]
    pub actions: bool,
}

/// Prints the schedule's timeline, bubble and, if asked, actions.
pub fn run(args: ScheduleArgs) -> anyhow::Result<()> {
    print!("{}", render(&args)?);
    Ok(())
}

/// The text `origami schedule` prints.
fn render(args: &ScheduleArgs) -> anyhow::Result<String> {
    let config = PipelineConfig {
        stages: args.pp,
        chunks: args.vpp,
        micro_batches: args.micro_batches,
        group_size: args.microbatch_group_size,
    };
    let schedules = (0..config.stages)
        .map(|stage| schedule(&config, stage))
        .collect::<Result<Vec<_>, _>>()?;
    let simulation = simulate(&schedules, StageTimes::default())?;
    let (p, v, m) = (args.pp as f64, args.vpp as f64, args.micro_batches as f64);
    let (name, formula, expression) = match config.kind() {
        ScheduleKind::NoPipelining => ("no pipelining", 0.0, "0".to_string()),
        ScheduleKind::OneForwardOneBackward => (
            "1F1B",
            (p - 1.0) / (m + p - 1.0),
            "(pp−1)/(M+pp−1)".to_string(),
        ),
        ScheduleKind::Interleaved => (
            "interleaved",
            (p - 1.0) / (v * m + p - 1.0),
            format!("(pp−1)/(vpp·M+pp−1), groups of {}", config.group()),
        ),
    };
    let mut out = format!(
        "{name}: pp {} · vpp {} · {} micro-batches (forward 1, backward 2 per stage)\n",
        args.pp, args.vpp, args.micro_batches
    );
    out += &timeline(&config, &simulation);
    out += &format!(
        "step {:.2} time units; bubble {:.4} (formula {expression} = {formula:.4})\n",
        simulation.makespan,
        simulation.bubble_fraction()
    );
    for (s, run) in schedules.iter().zip(&simulation.stages) {
        out += &format!(
            "stage {}: warm-up {} forwards, at most {} micro-batch chunks held ({:.2} stages' worth)\n",
            s.stage,
            s.warmup,
            run.peak_in_flight,
            run.peak_in_flight as f64 / config.chunks as f64
        );
    }
    if args.actions {
        for s in &schedules {
            out += &format!("--- stage {} ---\n", s.stage);
            for action in &s.actions {
                out += &format!("  {action}\n");
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pp: usize, vpp: usize, micro_batches: usize) -> ScheduleArgs {
        ScheduleArgs {
            pp,
            vpp,
            micro_batches,
            microbatch_group_size: None,
            actions: true,
        }
    }

    #[test]
    fn one_f_one_b_draws_its_bubble() {
        let text = render(&args(2, 1, 4)).unwrap();
        assert!(text.contains("stage  0 | F0 F1 "), "{text}");
        assert!(
            text.contains("bubble 0.2000 (formula (pp−1)/(M+pp−1) = 0.2000)"),
            "{text}"
        );
        assert!(
            text.contains("stage 0: warm-up 1 forwards, at most 2"),
            "{text}"
        );
        assert!(
            text.contains("send to stage 1: activation of micro-batch 0"),
            "{text}"
        );
    }

    #[test]
    fn refused_shapes_name_the_numbers() {
        let message = render(&args(4, 2, 6)).unwrap_err().to_string();
        assert!(message.contains("6 mod 4 = 2"), "{message}");
        let message = render(&args(1, 2, 4)).unwrap_err().to_string();
        assert!(
            message.contains("parallel.vpp = 2 needs parallel.pp > 1"),
            "{message}"
        );
    }
}
