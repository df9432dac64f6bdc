//! A text drawing of a simulated step: one row per stage, one cell per `1 / vpp` of the forward
//! time, `F3` for a forward of micro-batch 3 (`F3b` on chunk 1 when interleaved), `B3` for the
//! first cell of its backward and `-` for the rest of a computation, `.` for idle time.

use std::fmt::Write;

use crate::action::Pass;
use crate::config::PipelineConfig;
use crate::simulate::Simulation;

/// Draws `simulation` of a pipeline of shape `config`, each stage's bubble at the end of its row.
pub fn timeline(config: &PipelineConfig, simulation: &Simulation) -> String {
    let slot = simulation
        .stages
        .iter()
        .flat_map(|s| s.spans.iter().map(|span| span.end - span.start))
        .fold(f64::INFINITY, f64::min);
    if !slot.is_finite() {
        return String::new();
    }
    let chunk_letter = config.chunks > 1;
    let digits = config.micro_batches.saturating_sub(1).to_string().len();
    let width = 1 + digits + usize::from(chunk_letter);
    let cells = (simulation.makespan / slot).round() as usize;
    let mut out = String::new();
    for (stage, run) in simulation.stages.iter().enumerate() {
        let mut row = vec![format!("{:>width$}", ".")];
        row.resize(cells, row[0].clone());
        for span in &run.spans {
            let first = (span.start / slot).round() as usize;
            let last = ((span.end / slot).round() as usize).max(first + 1);
            let pass = match span.pass {
                Pass::Forward => 'F',
                Pass::Backward => 'B',
            };
            let mut label = format!("{pass}{}", span.work.micro_batch);
            if chunk_letter {
                label.push((b'a' + span.work.chunk as u8) as char);
            }
            row[first] = format!("{label:<width$}");
            for cell in &mut row[first + 1..last] {
                *cell = "-".repeat(width);
            }
        }
        let _ = writeln!(
            out,
            "stage {stage:>2} | {} | bubble {:.3}",
            row.join(" "),
            simulation.bubble_of(stage)
        );
    }
    out
}
