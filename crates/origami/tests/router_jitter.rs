//! Router input jitter (`model.moe.input_jitter_eps`): with it on, folded layouts and pipelines
//! still train the single-rank run (the noise is keyed by seed, step, token and layer, never by
//! rank); it changes the training losses; evaluation and generation do not jitter.
//! The finite-difference checks of its backward are in `gradient_checks.rs`.

use std::sync::Arc;

use origami::equivalence::training::{training, Reference, TrainingCase};
use origami::layers::moe::config::DispatcherKind;
use origami::model::gpt::{DecodeState, GptModel, MicroBatch, SequenceKeys};
use origami_comm::local::LocalWorld;
use origami_comm::Communicator;

const TOLERANCE: f64 = 1e-4;
const EPS: f32 = 0.3;

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

#[test]
fn folded_layouts_match_one_rank_with_jitter_on() {
    // TP2·CP2 | EP2·ETP2: each rank's MoE rows are a sequence-parallel slice of its two
    // context-parallel chunks, so a token's row differs from the single rank's.
    check(4, TrainingCase::new(2, 2, 2, 2).input_jitter(EPS));
    // TP2·CP2·DP2 | EP8 with the all-gather dispatcher: data parallelism moves whole
    // micro-batches (the sequence keys) to other ranks as well.
    check(
        8,
        TrainingCase::new(2, 2, 8, 1)
            .dispatcher(DispatcherKind::Allgather)
            .input_jitter(EPS),
    );
}

#[test]
fn pipelines_match_one_rank_with_jitter_on() {
    // TP2·PP2 | EP2·PP2 and DP2·PP2·VPP2 | EP2·PP2 (interleaved): the layers keyed by their
    // global number, wherever their stage and chunk.
    check(
        4,
        TrainingCase::new(2, 1, 2, 1)
            .pipeline(2, 1, 4)
            .input_jitter(EPS),
    );
    check(
        4,
        TrainingCase::new(1, 1, 2, 1)
            .pipeline(2, 2, 4)
            .input_jitter(EPS),
    );
}

#[test]
fn jitter_changes_the_training_run() {
    let plain = TrainingCase::new(1, 1, 1, 1);
    let plain_run = Reference::compute(&plain, 1).unwrap();
    let jittered_run = Reference::compute(&plain.clone().input_jitter(EPS), 1).unwrap();
    for step in 0..plain.steps {
        let (a, b) = (plain_run.losses[step], jittered_run.losses[step]);
        assert!(
            (a - b).abs() > 1e-5 * a.abs(),
            "step {step}: the loss with jitter ({b}) equals the loss without ({a})"
        );
    }
    // The noise is drawn again every step and for every token: the same micro-batch trained
    // at another step is jittered otherwise, so its loss differs too.
    let model = GptModel::new(plain.clone().input_jitter(EPS).model).unwrap();
    let params = model.init_params(plain.seed);
    let losses: Vec<f64> = [(0, 0), (1, 0), (0, 2)]
        .into_iter()
        .map(|(step, first)| {
            let mut grads = model.registry().zeros();
            model
                .forward_backward(&params, &mut grads, &batch(step, first), 1.0)
                .total()
        })
        .collect();
    assert!(
        losses[0] != losses[1] && losses[0] != losses[2],
        "{losses:?}"
    );
}

/// Two sequences of 8 fixed tokens, keyed as step `step`'s sequences `first, first + 1`.
fn batch(step: u64, first: u64) -> MicroBatch {
    let tokens: Vec<u32> = (0..16).map(|i| (i * 37 + 11) % 64).collect();
    MicroBatch {
        targets: tokens.iter().map(|t| (t * 5 + 1) % 64).collect(),
        tokens,
        batch: 2,
        seq: 8,
        keys: SequenceKeys::consecutive(5, step, first, 2),
    }
}

#[test]
fn evaluation_and_generation_do_not_jitter() {
    let case = TrainingCase::new(1, 1, 1, 1);
    let plain = GptModel::new(case.model.clone()).unwrap();
    let jittered = GptModel::new(case.clone().input_jitter(EPS).model).unwrap();
    let params = plain.init_params(case.seed);
    assert_eq!(
        jittered.init_params(case.seed),
        params,
        "jitter adds no parameters"
    );
    let b = batch(0, 0);
    let losses = |model: &GptModel| {
        let report = model.loss(&params, &b);
        let loads: Vec<Vec<usize>> = report
            .moe
            .iter()
            .map(|s| s.tokens_per_expert.clone())
            .collect();
        (report.cross_entropy, report.load_balancing, report.z, loads)
    };
    assert_eq!(losses(&jittered), losses(&plain));
    assert_eq!(jittered.logits(&params, &b), plain.logits(&params, &b));
    let (mut plain_state, mut jittered_state) = (DecodeState::default(), DecodeState::default());
    for &token in &b.tokens[..8] {
        assert_eq!(
            jittered.decode_step(&params, &mut jittered_state, token),
            plain.decode_step(&params, &mut plain_state, token)
        );
    }
    // Training does jitter, and the forward it runs is evaluation's but for the jitter.
    let train = |model: &GptModel| {
        let mut grads = model.registry().zeros();
        model.forward_backward(&params, &mut grads, &b, 1.0).total()
    };
    let evaluated = plain.loss(&params, &b).total();
    assert!((train(&plain) - evaluated).abs() < 1e-6 * evaluated);
    assert!((train(&jittered) - evaluated).abs() > 1e-5 * evaluated);
}
