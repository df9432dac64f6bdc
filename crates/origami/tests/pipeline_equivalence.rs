//! K = 3 training steps along pipelines — 1F1B and interleaved, even and uneven stages, tied
//! embeddings across stages — folded with TP, CP, DP and EP, against one rank (DESIGN.md §2):
//! losses and gradient norms every step, first-step gradients and every parameter at the end
//! within 1e-4, dropless routing with aux and z losses, both dispatchers where EP > 1.

use std::sync::Arc;

use origami::equivalence::training::{training, TrainingCase};
use origami::layers::moe::config::{AuxLossScope, DispatcherKind, ScoreFunction};
use origami_comm::local::LocalWorld;
use origami_comm::Communicator;

const TOLERANCE: f64 = 1e-4;

/// Runs `case` on `world` local ranks and checks every rank.
fn check(world: usize, case: TrainingCase) {
    let name = case.describe(world);
    let results = LocalWorld::new(world)
        .run(|comm: Arc<dyn Communicator>| training(&comm, &case))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: {:?}", results[0]);
    for (rank, d) in results.iter().enumerate() {
        assert!(
            d.max() <= TOLERANCE,
            "{name}: rank {rank} differs from one rank: {d:?}"
        );
    }
}

/// `case` with each dispatcher (both when EP > 1).
fn check_dispatchers(world: usize, case: TrainingCase) {
    let dispatchers: &[DispatcherKind] = if case.parallel.ep > 1 {
        &[DispatcherKind::Alltoall, DispatcherKind::Allgather]
    } else {
        &[DispatcherKind::Alltoall]
    };
    for &dispatcher in dispatchers {
        check(world, case.clone().dispatcher(dispatcher));
    }
}

#[test]
fn world_2_pipelines() {
    // PP2, 1F1B over 4 micro-batches.
    check_dispatchers(2, TrainingCase::new(1, 1, 1, 1).pipeline(2, 1, 4));
    // PP2 uneven: the first stage 1 layer of 4, the last 3.
    check_dispatchers(
        2,
        TrainingCase::new(1, 1, 1, 1)
            .pipeline(2, 1, 4)
            .stage_layers(Some(1), Some(3)),
    );
}

#[test]
fn world_4_pipelines() {
    // PP4: each stage one layer, stage 2 without MoE.
    check_dispatchers(4, TrainingCase::new(1, 1, 1, 1).pipeline(4, 1, 4));
    // PP2·VPP2·DP2 | PP2·EP2: interleaved.
    check_dispatchers(4, TrainingCase::new(1, 1, 2, 1).pipeline(2, 2, 4));
    // TP2·PP2 | EP2·PP2 and CP2·PP2 | EP2·PP2.
    check_dispatchers(4, TrainingCase::new(2, 1, 2, 1).pipeline(2, 1, 4));
    check_dispatchers(4, TrainingCase::new(1, 2, 2, 1).pipeline(2, 1, 4));
}

#[test]
fn world_8_pipelines() {
    // TP2·CP2·PP2 | EP4·PP2.
    check_dispatchers(8, TrainingCase::new(2, 2, 4, 1).pipeline(2, 1, 4));
    // TP2·DP2·PP2 | EP2·ETP2·PP2 with the distributed optimizer.
    check_dispatchers(
        8,
        TrainingCase::new(2, 1, 2, 2)
            .pipeline(2, 1, 4)
            .distributed_optimizer(true),
    );
    // DP2·PP4·VPP2 | EP2·PP4 with tied embeddings: the table on stages 0 and 3, 4 micro-batches
    // per pipeline (8 of one sequence each over the two pipelines).
    check_dispatchers(
        8,
        TrainingCase::new(1, 1, 2, 1)
            .pipeline(4, 2, 8)
            .tied_embeddings()
            .sequences_per_micro_batch(1),
    );
}

#[test]
fn world_16_all_five_dimensions() {
    // TP2·CP2·DP2·PP2 | EP8·PP2: every dimension above 1, EP folded over TP×CP×DP.
    check_dispatchers(16, TrainingCase::new(2, 2, 8, 1).pipeline(2, 1, 4));
}

#[test]
fn global_batch_balancing_and_expert_bias_along_a_pipeline() {
    // Loads counted over the step's micro-batches on each stage, gathered over the pipeline for
    // the expert-bias update of every stage's routers: TP2·PP2 (one data-parallel replica) and
    // DP2·PP2, whose replicas count their j-th micro-batches together (the reference takes them
    // as one, see docs/moe.md).
    for tp in [2, 1] {
        let mut case = TrainingCase::new(tp, 1, 2, 1).pipeline(2, 1, 4);
        case.model.moe.aux_loss_scope = AuxLossScope::GlobalBatch;
        case.model.moe.score_function = ScoreFunction::Sigmoid;
        case.model.moe.expert_bias_update_rate = Some(0.05);
        check_dispatchers(4, case);
    }
}
