//! The planner's memory model against what a training step really makes this process hold, on
//! the `tiny` preset in bf16 (origami's mixed precision: f32 master weights beside their bf16
//! copies, bf16 GEMM inputs, f32 everything else), on the bf16 kernel this CPU runs. Alone in
//! its test binary, so that the peak resident set (`VmHWM`) is this step's.

mod plan_step;

use origami::compute::{Compute, PrecisionSetting};
use origami_plan::{Precision, Recompute};

#[test]
fn tiny_bf16_step_peak_memory_is_what_the_planner_predicts() {
    let bf16 = Compute::resolve(PrecisionSetting::Bf16, false);
    let ((measured, predicted), _) =
        plan_step::tiny_step_and_prediction(bf16, Precision::Bf16, Recompute::None);
    assert!(
        (predicted / measured - 1.0).abs() < 0.08,
        "predicted {predicted:.1} MiB, measured {measured:.1} MiB"
    );
}
