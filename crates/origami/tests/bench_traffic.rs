//! The benchmark's traffic theory against the bytes the ranks actually send: a folded layout's
//! measured per-rank traffic must be what the layout requires, not more (e.g. no gathered
//! logits, no duplicated reductions), in f32 and in bf16.

use origami::bench::{run, BenchLayout, BenchSettings};
use origami::compute::Compute;
use origami::layers::context_parallel::CpCommType;
use origami::layers::recompute::Recompute;
use origami_kernels::matmul_bf16::Bf16Kernel;

/// Bytes a rank sends in one step of `tiny` on `layout`, measured and in theory.
fn measured_and_theory(layout: BenchLayout, micro_batches: usize, compute: Compute) -> (f64, f64) {
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
        report.bytes_sent_per_rank_mean,
        report.theory_bytes_per_rank_total,
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
    let sent = |layout: &BenchLayout, micro_batches, compute| {
        let (measured, theory) = measured_and_theory(layout.clone(), micro_batches, compute);
        // Routing is not exactly uniform and small statistics all-reduces are not in the theory.
        let ratio = measured / theory;
        assert!(
            (0.97..1.05).contains(&ratio),
            "{layout:?} {compute:?}: measured / theory = {ratio}"
        );
        (measured, theory)
    };
    sent(&interleaved, 4, Compute::F32);
    // In bf16 the GEMM and attention inputs that travel (sequence-parallel gathers, the
    // dispatch, the context-parallel ring's key/value blocks, the all-to-all's q, k, v, output
    // and output gradient) are bf16: each layout saves what the theory says it saves.
    for (layout, micro_batches) in [(tensor, 1), (pipeline, 4), (context, 1), (all_to_all, 1)] {
        let (f32_measured, f32_theory) = sent(&layout, micro_batches, Compute::F32);
        let (bf16_measured, bf16_theory) = sent(&layout, micro_batches, bf16);
        let saved = (f32_measured - bf16_measured) / (f32_theory - bf16_theory);
        assert!(
            (0.9..1.1).contains(&saved),
            "{layout:?}: bf16 saves {} bytes, the theory {}",
            f32_measured - bf16_measured,
            f32_theory - bf16_theory
        );
    }
}
