//! Pipelines beyond equivalence: the activations each 1F1B stage holds against the schedule's
//! bound and with an uneven first stage, a failing stage ending every rank with an error, and
//! the settings a pipeline refuses.

use origami::compute::{Compute, Weights};
use origami::layers::recompute::Recompute;
use std::sync::Arc;
use std::time::{Duration, Instant};

use origami::bench::{run, BenchLayout, BenchSettings};
use origami::model::config::ModelConfig;
use origami::model::gpt::{GptModel, MicroBatch, SequenceKeys};
use origami::model::parallel::ModelParallel;
use origami::train::config::{RunConfig, DEFAULT_CONFIG};
use origami::train::pipeline::{run_schedule, stage_schedule};
use origami_comm::local::LocalWorld;
use origami_comm::Communicator;
use origami_parallel::{ParallelConfig, ParallelState};

#[test]
fn one_f_one_b_stages_hold_at_most_pp_minus_rank_micro_batches() {
    let (pp, micro_batches) = (4, 8);
    let report = run(&BenchSettings {
        preset: "tiny".into(),
        steps: 1,
        micro_batch: Some(2),
        micro_batches,
        seq: Some(32),
        layout: BenchLayout {
            world: pp,
            pp,
            ..BenchLayout::default()
        },
        compute: Compute::F32,
        profile: false,
        recompute: Recompute::None,
    })
    .unwrap();
    assert_eq!(report.schedule, "1F1B");
    for stage in &report.stages {
        let bound = pp - stage.stage;
        assert_eq!(stage.peak_in_flight, bound, "stage {}", stage.stage);
        let worth = stage.peak_stored_mib / stage.micro_batch_stored_mib;
        // Dropless routing on one expert rank: every micro-batch keeps the same bytes.
        assert!(
            (worth - bound as f64).abs() < 1e-6,
            "stage {} holds {worth} micro-batches' worth, the schedule allows {bound}",
            stage.stage
        );
    }
    assert_eq!(report.stages[0].peak_in_flight, pp);
    assert_eq!(report.stages[pp - 1].peak_in_flight, 1);
}

#[test]
fn an_uneven_first_stage_holds_its_own_layers() {
    // tiny's 4 layers over 2 stages: 2 + 2, or 1 + 3 with the first stage's own count.
    let stages = |first_stage_layers| {
        run(&BenchSettings {
            preset: "tiny".into(),
            steps: 1,
            micro_batch: Some(1),
            micro_batches: 2,
            seq: Some(32),
            layout: BenchLayout {
                world: 2,
                pp: 2,
                first_stage_layers,
                ..BenchLayout::default()
            },
            compute: Compute::F32,
            profile: false,
            recompute: Recompute::None,
        })
        .unwrap()
        .stages
    };
    let (even, uneven) = (stages(None), stages(Some(1)));
    let per_micro_batch = |s: &[origami::bench::StageReport], i: usize| s[i].micro_batch_stored_mib;
    // The first stage keeps one layer's activations instead of two (it holds no other tensor).
    let ratio = per_micro_batch(&uneven, 0) / per_micro_batch(&even, 0);
    assert!((ratio - 0.5).abs() < 1e-9, "{ratio}");
    assert!(per_micro_batch(&uneven, 1) > per_micro_batch(&even, 1));
}

#[test]
fn a_failing_stage_ends_every_rank_with_an_error() {
    let mut model = ModelConfig::preset("tiny").unwrap();
    model.max_seq_len = 16;
    let started = Instant::now();
    let result = LocalWorld::new(2)
        .with_timeout(Duration::from_secs(60))
        .run(|world: Arc<dyn Communicator>| -> Result<(), String> {
            let layout = ParallelConfig {
                pp: 2,
                ..ParallelConfig::default()
            }
            .layout(2)
            .map_err(|e| e.to_string())?;
            let state = ParallelState::new(&layout, world.as_ref()).map_err(|e| e.to_string())?;
            let gpt = GptModel::new_parallel(
                model.clone(),
                ModelParallel::from_state(&state, Default::default()),
            )
            .map_err(|e| e.to_string())?;
            let params = gpt.init_params(0);
            let mut grads = gpt.registry().zeros();
            // The last stage is handed a token outside the vocabulary and panics; the first
            // stage is then waiting to send it an activation.
            let token = if world.rank() == 1 { 100_000 } else { 1 };
            let batch = MicroBatch {
                tokens: vec![token; 16],
                targets: vec![1; 16],
                batch: 1,
                seq: 16,
                keys: SequenceKeys::consecutive(0, 0, 0, 1),
            };
            let schedule = stage_schedule(&gpt, 1, None).map_err(|e| e.to_string())?;
            run_schedule(
                &gpt,
                &Weights::f32(&params),
                &mut grads,
                &schedule,
                &[batch],
                1.0,
                state.pp().comm(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        });
    let error = result.expect_err("the job must fail");
    assert_eq!(error.failures.len(), 2, "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "a rank hung");
}

fn refusal(overrides: &[&str]) -> String {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    format!(
        "{:#}",
        RunConfig::from_toml(DEFAULT_CONFIG, &overrides).unwrap_err()
    )
}

#[test]
fn settings_a_pipeline_refuses_name_the_numbers() {
    // Virtual stages without a pipeline.
    let message = refusal(&["parallel.vpp=2"]);
    assert!(
        message.contains("vpp = 2") && message.contains("pp = 1"),
        "{message}"
    );
    // Layers that do not split over pp · vpp (the default model has 4 layers).
    let message = refusal(&["parallel.world=8", "parallel.pp=2", "parallel.vpp=4"]);
    assert!(
        message.contains("num_layers = 4") && message.contains("2 × 4"),
        "{message}"
    );
    // Micro-batch counts the interleaved schedule refuses: 16 / (2 · 2) = 4 per pipeline,
    // with groups of 3 leaving a last group of 1 < pp.
    let message = refusal(&[
        "parallel.world=8",
        "parallel.pp=2",
        "parallel.vpp=2",
        "parallel.microbatch_group_size=3",
        "train.global_batch=16",
        "train.micro_batch=2",
    ]);
    assert!(message.contains("4 mod 3 = 1"), "{message}");
    // Uneven stages that leave an uneven middle: 8 layers, first 1, over 3 other stages.
    let message = refusal(&[
        "parallel.world=4",
        "parallel.tp=1",
        "parallel.pp=4",
        "parallel.ep=1",
        "model.num_layers=8",
        "parallel.pp_first_stage_layers=1",
    ]);
    assert!(
        message.contains("7 layers left") && message.contains("3 stages"),
        "{message}"
    );
    // Uneven settings without a pipeline.
    let message = refusal(&["parallel.pp_last_stage_layers=2"]);
    assert!(message.contains("pp > 1"), "{message}");
}
