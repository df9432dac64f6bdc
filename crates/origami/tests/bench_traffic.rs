//! The benchmark's traffic theory against the bytes the ranks actually send: a folded layout's
//! measured per-rank traffic must be what the layout requires, not more (e.g. no gathered
//! logits, no duplicated reductions).

use origami::bench::{run, BenchLayout, BenchSettings};
use origami::compute::Compute;
use origami::layers::context_parallel::CpCommType;
use origami::layers::recompute::Recompute;

fn measured_over_theory(layout: BenchLayout, micro_batches: usize) -> f64 {
    let report = run(&BenchSettings {
        preset: "tiny".into(),
        steps: 1,
        micro_batch: Some(4),
        micro_batches,
        seq: Some(32),
        layout,
        compute: Compute::F32,
        profile: false,
        recompute: Recompute::None,
    })
    .unwrap();
    assert!(report.theory_bytes_per_rank_total > 0.0);
    report.bytes_sent_per_rank_mean / report.theory_bytes_per_rank_total
}

#[test]
fn folded_layouts_send_what_the_theory_says() {
    let tensor = BenchLayout {
        world: 4,
        tp: 2,
        ep: 4,
        ..BenchLayout::default()
    };
    let context = BenchLayout {
        world: 4,
        cp: 2,
        ep: 4,
        ..BenchLayout::default()
    };
    let all_to_all = BenchLayout {
        cp_comm_type: CpCommType::A2a,
        distributed_optimizer: true,
        ..context.clone()
    };
    let pipeline = BenchLayout {
        world: 4,
        tp: 2,
        ep: 2,
        pp: 2,
        ..BenchLayout::default()
    };
    let interleaved = BenchLayout {
        world: 4,
        ep: 2,
        pp: 2,
        vpp: 2,
        ..BenchLayout::default()
    };
    for (layout, micro_batches) in [
        (tensor, 1),
        (context, 1),
        (all_to_all, 1),
        (pipeline, 4),
        (interleaved, 4),
    ] {
        let ratio = measured_over_theory(layout.clone(), micro_batches);
        // Routing is not exactly uniform and small statistics all-reduces are not in the theory.
        assert!(
            (0.97..1.05).contains(&ratio),
            "{layout:?}: measured / theory = {ratio}"
        );
    }
}
