//! The planner's stored activations under each recomputation mode against what a `tiny`
//! training step stores for its backward (the engine counts every kept tensor), in f32 on one
//! rank.

mod plan_step;

use origami::compute::Compute;
use origami_plan::{Precision, Recompute};

#[test]
fn the_planner_predicts_what_each_recomputation_mode_stores() {
    let mut stored = Vec::new();
    for recompute in Recompute::ALL {
        let (_, (measured, predicted)) =
            plan_step::tiny_step_and_prediction(Compute::F32, Precision::F32, recompute);
        assert!(
            (predicted / measured - 1.0).abs() < 0.1,
            "recompute {recompute}: predicted {predicted:.2} MiB, measured {measured:.2} MiB"
        );
        stored.push(measured);
    }
    assert!(
        stored[0] > stored[1] && stored[1] > stored[2],
        "none, selective, full store {stored:?} MiB"
    );
}
