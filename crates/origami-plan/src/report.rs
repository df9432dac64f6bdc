//! Text output: the ranked table, one layout explained term by term, and the assumptions the
//! numbers rest on.

use std::fmt::Write;

use crate::{Evaluation, Hardware, Recompute, StagePace};

/// The assumptions behind every figure, from the hardware's engine settings and the run's
/// recomputation.
pub fn assumptions(hardware: &Hardware, recompute: Recompute) -> Vec<String> {
    let e = &hardware.engine;
    let overlap = |on: bool, what: &str, under: &str| {
        if on {
            format!("{what} overlaps {under}; only what exceeds it is exposed")
        } else {
            format!("{what} is exposed (not overlapped)")
        }
    };
    vec![
        "routing is uniform: every expert gets its share of tokens, times the expert-imbalance margin".into(),
        "every GEMM runs at the device's (grouped) GEMM efficiency or at its operands' memory traffic, whichever is slower; backward = 2 × forward".into(),
        overlap(e.overlap_tensor_parallel, "sequence-parallel (tp) communication", "the layer's dense GEMMs"),
        overlap(e.overlap_context_parallel, "the context-parallel exchange", "the attention core"),
        format!(
            "expert dispatch/combine (ep) and expert-tensor-parallel gathers (etp) are exposed; the dispatcher adds {:.1} ps per routed byte",
            e.dispatch_overhead_per_byte * 1e12
        ),
        overlap(e.overlap_interleaved_pipeline, "an interleaved schedule's pipeline transfers (pp)", "the next chunk's compute (1F1B's are exposed)"),
        overlap(e.overlap_gradient_reduce, "gradient reduction", "one micro-batch's backward"),
        overlap(e.overlap_param_gather, "the distributed optimizer's parameter all-gather", "one micro-batch's forward"),
        "the pipeline is simulated with the slowest stage's forward and backward times for every stage".into(),
        if hardware.device.shared_by_ranks {
            "the ranks of a node share its cores: a rank's kernels take as long as all of the node's ranks' kernels, and a pipeline inside one node has no bubble (a waiting stage leaves the cores to the others)".into()
        } else {
            "each rank has its own device".into()
        },
        if e.serial_glue {
            "element-wise glue between kernels (residual adds, router scores, permutation) runs on each rank's own thread at one core's bandwidth".into()
        } else {
            "element-wise glue between kernels runs as kernels at the memory bandwidth".into()
        },
        match recompute {
            Recompute::None => "no recomputation: every layer keeps what its backward reads".into(),
            Recompute::Selective => "selective recomputation: each layer's backward runs the attention core (with its context-parallel exchange), the SwiGLUs and the norms again, gathering the norm outputs over tp again; the recomputed tensors live only during that layer's backward".into(),
            Recompute::Full => "full recomputation: each layer keeps its input; its backward runs the whole forward again, communication included; the recomputed tensors live only during that layer's backward".into(),
        },
    ]
}

/// One row per evaluation: layout, memory, the step split into compute, exposed communication
/// by kind and bubble, tokens/s and MFU.
pub fn table(evaluations: &[&Evaluation]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:>3} {:>3} {:>4} {:>11} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>10} {:>6}",
        "layout", "dp", "edp", "M", "schedule", "mem GiB", "step s", "compute", "tp", "cp", "ep", "etp",
        "dp", "pp", "bubble", "tokens/s", "MFU"
    );
    for e in evaluations {
        let c = &e.time.communication;
        let _ = writeln!(
            out,
            "{:<40} {:>3} {:>3} {:>4} {:>11} {:>8.1} {:>8.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>10.0} {:>5.1}%",
            e.layout.to_string(),
            e.dp,
            e.edp,
            e.micro_batches,
            e.pipeline.schedule,
            e.memory_per_rank_gib,
            e.step_time_s,
            e.time.compute.total(),
            c.tp,
            c.cp,
            c.ep,
            c.etp,
            c.dp_grad + c.dp_param,
            c.pp,
            e.time.bubble,
            e.tokens_per_s,
            e.mfu * 100.0,
        );
    }
    out
}

/// One layout term by term: memory, time, hidden communication, pipeline.
pub fn explain(e: &Evaluation, hardware: &Hardware) -> String {
    let mut out = String::new();
    let m = &e.memory;
    let _ = writeln!(out, "layout {}", e.layout);
    let _ = writeln!(
        out,
        "  dp {} · edp {} · {} micro-batches per step · schedule {} · recompute {}",
        e.dp, e.edp, e.micro_batches, e.pipeline.schedule, e.recompute
    );
    let _ = writeln!(
        out,
        "memory of the busiest rank (stage {}): {:.2} GiB{}",
        m.stage,
        e.memory_per_rank_gib,
        if e.fits { "" } else { " — does not fit" }
    );
    for (name, gib) in [
        ("weights", m.weights),
        ("gradients", m.gradients),
        ("optimizer states", m.optimizer_states),
        ("activations", m.activations),
        ("largest transient", m.largest_transient),
        ("allocator", m.allocator),
        ("runtime", m.runtime),
    ] {
        let _ = writeln!(out, "  {name:<18} {gib:>9.3} GiB");
    }
    let _ = writeln!(
        out,
        "  ({:.0} parameters; activations of {} in-flight chunk micro-batches)",
        m.parameters, m.in_flight_chunks
    );
    if hardware.device.shared_by_ranks {
        let _ = writeln!(
            out,
            "  the node's ranks together (one process): {:.2} GiB of {:.1} GiB",
            e.memory_per_node_gib, e.capacity_gib
        );
    }
    let t = &e.time;
    let _ = writeln!(
        out,
        "step {:.4} s: {:.0} tokens/s, MFU {:.1} %",
        e.step_time_s,
        e.tokens_per_s,
        e.mfu * 100.0
    );
    let c = &t.compute;
    for (name, seconds) in [
        ("dense GEMMs", c.dense_gemm),
        ("expert GEMMs", c.expert_gemm),
        ("attention core", c.attention),
        ("memory-bound", c.memory_bound),
        ("optimizer", c.optimizer),
        ("dispatch overhead", c.dispatch_overhead),
    ] {
        let _ = writeln!(out, "  compute {name:<15} {seconds:>9.4} s");
    }
    let (x, h) = (&t.communication, &t.hidden_communication);
    for (name, exposed, hidden) in [
        ("tp", x.tp, h.tp),
        ("cp", x.cp, h.cp),
        ("ep", x.ep, h.ep),
        ("etp", x.etp, h.etp),
        ("dp gradients", x.dp_grad, h.dp_grad),
        ("dp params", x.dp_param, h.dp_param),
        ("pp", x.pp, h.pp),
    ] {
        let _ = writeln!(
            out,
            "  comm    {name:<15} {exposed:>9.4} s exposed, {hidden:>9.4} s hidden"
        );
    }
    let _ = writeln!(out, "  bubble                  {:>9.4} s", t.bubble);
    if e.stages.len() > 1 {
        out.push_str(&stage_paces(e));
    }
    let _ = writeln!(out, "assumptions:");
    for line in assumptions(hardware, e.recompute) {
        let _ = writeln!(out, "  - {line}");
    }
    out
}

/// The pipeline's stages, one micro-batch's forward + backward each, runs of alike stages on one
/// line, the pacing stage marked with how much slower it is than the fastest.
fn stage_paces(e: &Evaluation) -> String {
    let mut out = String::from(
        "pipeline stages, one micro-batch's forward + backward (every stage keeps the slowest's pace):\n",
    );
    let fastest = e
        .stages
        .iter()
        .map(|s| s.passes.total())
        .fold(f64::INFINITY, f64::min);
    let alike = |a: &StagePace, b: &StagePace| {
        (a.layers, a.embedding, a.output_layer) == (b.layers, b.embedding, b.output_layer)
            && a.passes == b.passes
    };
    let mut start = 0;
    while start < e.stages.len() {
        let stage = &e.stages[start];
        let end = (start..e.stages.len())
            .take_while(|&i| alike(&e.stages[i], stage))
            .last()
            .expect("the run holds its first stage");
        let which = if end == start {
            format!("stage {start}")
        } else {
            format!("stages {start}–{end}")
        };
        let mut holds = format!("{} layers", stage.layers);
        if stage.embedding {
            holds.push_str(" + embedding");
        }
        if stage.output_layer {
            holds.push_str(" + output layer");
        }
        let seconds = stage.passes.total();
        let pace = if (start..=end).contains(&e.pacing_stage) && seconds > fastest {
            format!("  slowest: {:.2} × the fastest", seconds / fastest)
        } else {
            String::new()
        };
        let _ = writeln!(out, "  {which:<12} {holds:<32} {seconds:>9.4} s{pace}");
        start = end + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::paper_planner;

    fn explained(layout: &str) -> String {
        let hardware = Hardware::h100_dgx();
        let evaluation = paper_planner("mixtral-8x22b", hardware.clone(), 128, 256)
            .evaluate(&layout.parse().unwrap())
            .unwrap();
        explain(&evaluation, &hardware)
    }

    #[test]
    fn explain_lists_the_stages_alike_ones_on_one_line_and_marks_the_pacing_one() {
        let text = explained("tp=2 pp=8 vpp=7 ep=8 etp=1 mbs=1");
        let lines: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("pipeline stages"))
            .skip(1)
            .take_while(|l| !l.starts_with("assumptions"))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("  stage 0 ") && lines[0].contains("7 layers + embedding"));
        assert!(lines[1].starts_with("  stages 1–6 ") && lines[1].ends_with(" s"));
        assert!(lines[2].starts_with("  stage 7 ") && lines[2].contains("7 layers + output layer"));
        assert!(lines[2].contains("slowest: 1.0"), "{}", lines[2]);
        assert!(!lines[0].contains("slowest") && !lines[1].contains("slowest"));
    }

    #[test]
    fn explain_has_no_stage_lines_without_a_pipeline() {
        let text = explained("tp=8 pp=1 ep=8 etp=1 mbs=1");
        assert!(!text.contains("pipeline stages"), "{text}");
    }
}
