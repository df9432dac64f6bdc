//! The planner's memory model against what a training step really makes this process hold, on
//! the `tiny` preset in f32. Alone in its test binary, so that the peak resident set (`VmHWM`,
//! what `origami bench` reports) is this step's.

mod plan_step;

use origami::compute::Compute;
use origami_plan::{Precision, Recompute};

#[test]
fn tiny_step_peak_memory_is_what_the_planner_predicts() {
    let ((measured, predicted), _) =
        plan_step::tiny_step_and_prediction(Compute::F32, Precision::F32, Recompute::None);
    assert!(
        (predicted / measured - 1.0).abs() < 0.08,
        "predicted {predicted:.1} MiB, measured {measured:.1} MiB"
    );
}
