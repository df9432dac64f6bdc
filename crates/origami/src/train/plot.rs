//! The picture of a run (SVG): loss curves (train cross-entropy per step, validation when
//! evaluated) above a heat map of expert load over time, one row per (MoE layer, expert),
//! coloured by the expert's share of tokens relative to a perfectly balanced share.

use super::metrics::StepRecord;
use plotters::prelude::*;
use std::path::Path;

/// Columns of the heat map (steps are averaged into this many bins).
const HEATMAP_BINS: usize = 100;

/// Writes the run's plot to `path`.
pub fn plot_run(path: &Path, records: &[StepRecord]) -> anyhow::Result<()> {
    anyhow::ensure!(!records.is_empty(), "no steps to plot");
    let root = SVGBackend::new(path, (1000, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(420);
    draw_losses(&upper, records)?;
    draw_expert_load(&lower, records)?;
    root.present()?;
    Ok(())
}

fn draw_losses(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    records: &[StepRecord],
) -> anyhow::Result<()> {
    let last = records.last().map_or(1, |r| r.step).max(1) as f64;
    let values = records
        .iter()
        .map(|r| r.cross_entropy)
        .chain(records.iter().filter_map(|r| r.val_loss));
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let pad = ((high - low) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption("Loss (nats per token)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..last, (low - pad)..(high + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("cross-entropy")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            records.iter().map(|r| (r.step as f64, r.cross_entropy)),
            &BLUE,
        ))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE));
    let validation: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.val_loss.map(|v| (r.step as f64, v)))
        .collect();
    chart
        .draw_series(LineSeries::new(
            validation.iter().copied(),
            RED.stroke_width(2),
        ))?
        .label("validation")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
    chart.draw_series(validation.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn draw_expert_load(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    records: &[StepRecord],
) -> anyhow::Result<()> {
    let layers = records[0].tokens_per_expert.len();
    let experts = records[0].tokens_per_expert.first().map_or(0, Vec::len);
    if layers == 0 || experts == 0 {
        return Ok(());
    }
    let rows = layers * experts;
    let bins = HEATMAP_BINS.min(records.len());
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Expert load (share / balanced share; white 0, blue 1, red ≥ 2)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(
            0f64..records[records.len() - 1].step as f64,
            0f64..rows as f64,
        )?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("layer × expert")
        .y_label_formatter(&|y| format!("L{}", (*y as usize) / experts))
        .y_labels(layers.min(16))
        .draw()?;
    let mut cells = Vec::with_capacity(bins * rows);
    for bin in 0..bins {
        let span = &records[bin * records.len() / bins
            ..((bin + 1) * records.len() / bins).max(bin * records.len() / bins + 1)];
        for layer in 0..layers {
            let totals: Vec<usize> = (0..experts)
                .map(|e| span.iter().map(|r| r.tokens_per_expert[layer][e]).sum())
                .collect();
            let mean = totals.iter().sum::<usize>() as f64 / experts as f64;
            for (e, &count) in totals.iter().enumerate() {
                let ratio = if mean > 0.0 { count as f64 / mean } else { 0.0 };
                let row = (layer * experts + e) as f64;
                let (from, to) = (span[0].step as f64 - 1.0, span[span.len() - 1].step as f64);
                cells.push(Rectangle::new(
                    [(from, row), (to, row + 1.0)],
                    load_colour(ratio).filled(),
                ));
            }
        }
    }
    chart.draw_series(cells)?;
    Ok(())
}

/// White at 0, blue at a balanced share (1), red at twice the balanced share or more.
fn load_colour(ratio: f64) -> RGBColor {
    let mix = |a: u8, b: u8, t: f64| (a as f64 + (b as f64 - a as f64) * t.clamp(0.0, 1.0)) as u8;
    if ratio <= 1.0 {
        RGBColor(
            mix(255, 40, ratio),
            mix(255, 90, ratio),
            mix(255, 200, ratio),
        )
    } else {
        let t = ratio - 1.0;
        RGBColor(mix(40, 220, t), mix(90, 30, t), mix(200, 30, t))
    }
}
