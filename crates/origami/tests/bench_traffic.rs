//! The benchmark's traffic theory against the bytes the ranks actually send: a folded layout's
//! measured per-rank traffic must be what the layout requires, not more (e.g. no gathered
//! logits, no duplicated reductions), in f32 and in bf16.

use origami::bench::{run, BenchLayout, BenchSettings};
use origami::compute::Compute;
use origami::layers::context_parallel::CpCommType;
use origami::layers::recompute::Recompute;
use origami_kernels::matmul_bf16::Bf16Kernel;

fn measured_over_theory(layout: BenchLayout, micro_batches: usize, compute: Compute) -> (f64, f64) {
    let report = run(&BenchSettings {
        preset: "tiny".into(),
        steps: 1,
        micro_batch: Some(4),
        micro_batches,
        seq: Some(32),
        layout,
        compute,
        profile: false,
        recompute: Recompute::None,
    })
    .unwrap();
    assert!(report.theory_bytes_per_rank_total > 0.0);
    (
        report.bytes_sent_per_rank_mean / report.theory_bytes_per_rank_total,
        report.bytes_sent_per_rank_mean,
    )
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
    let bf16 = Compute::Bf16(Bf16Kernel::detect());
    let mut sent = Vec::new();
    for (layout, micro_batches, compute) in [
        (tensor.clone(), 1, Compute::F32),
        (context.clone(), 1, Compute::F32),
        (all_to_all, 1, Compute::F32),
        (pipeline.clone(), 4, Compute::F32),
        (interleaved, 4, Compute::F32),
        // In bf16 the GEMM inputs that travel (sequence-parallel gathers, the dispatch, the
        // context-parallel ring's key/value blocks) are bf16.
        (tensor, 1, bf16),
        (pipeline, 4, bf16),
        (context, 1, bf16),
    ] {
        let (ratio, bytes) = measured_over_theory(layout.clone(), micro_batches, compute);
        // Routing is not exactly uniform and small statistics all-reduces are not in the theory.
        assert!(
            (0.97..1.05).contains(&ratio),
            "{layout:?} {compute:?}: measured / theory = {ratio}"
        );
        sent.push(bytes);
    }
    assert!(
        sent[5] < 0.95 * sent[0],
        "bf16 {} against f32 {} bytes",
        sent[5],
        sent[0]
    );
    assert!(
        sent[6] < 0.95 * sent[3],
        "bf16 {} against f32 {} bytes",
        sent[6],
        sent[3]
    );
}
