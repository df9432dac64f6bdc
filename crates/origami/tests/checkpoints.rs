//! Checkpoints: a run stopped at step k and resumed matches an uninterrupted run bit for bit;
//! corrupt or truncated checkpoint files are reported; a process killed while saving leaves
//! the previous checkpoint loadable; a fresh run refuses an existing metrics file, which a
//! resumed run appends to.

use origami::equivalence::relative_error;
use origami::layers::moe::config::MoeConfig;
use origami::model::config::ModelConfig;
use origami::model::gpt::GptModel;
use origami::optim::adamw::AdamWConfig;
use origami::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use origami::params::{Buffers, ParamGroup};
use origami::train::checkpoint::shards::{Contribution, MomentShards, OwnedMoments, Ownership};
use origami::train::checkpoint::{self, TrainingState};
use origami::train::config::RunConfig;
use origami::train::trainer::{train, SampleSource, TrainOptions};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Deterministic pseudo-text: sample `i` is a window of a fixed token stream.
struct Synthetic {
    seq: usize,
}

impl SampleSource for Synthetic {
    fn len(&self) -> u64 {
        1000
    }
    fn sample_into(&self, index: u64, out: &mut [u32]) -> anyhow::Result<()> {
        let start = (index % self.len()) * 7;
        for (j, o) in out.iter_mut().enumerate() {
            let x = start + j as u64;
            *o = ((x * x + 3 * x) % 251) as u32;
        }
        assert_eq!(out.len(), self.seq + 1);
        Ok(())
    }
}

fn small_run(dir: &Path, steps: u64) -> RunConfig {
    let mut config = RunConfig::default();
    config.model = ModelConfig {
        vocab_size: 256,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        ffn_hidden_size: 48,
        max_seq_len: 16,
        moe: MoeConfig {
            num_experts: 4,
            ffn_hidden_size: 24,
            ..config.model.moe
        },
        ..config.model
    };
    config.train.steps = steps;
    config.train.seq_len = 16;
    config.train.micro_batch = 2;
    config.train.global_batch = 4;
    config.train.eval_interval = 0;
    config.train.lr.decay_steps = steps;
    config.train.lr.warmup_steps = 2;
    config.checkpoint.dir = dir.to_path_buf();
    config.checkpoint.interval = 0;
    config.checkpoint.keep = 3;
    config
}

#[test]
fn stopped_and_resumed_run_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Synthetic { seq: 16 };
    let straight = train(
        &small_run(&tmp.path().join("a"), 6),
        &data,
        None,
        &TrainOptions::default(),
    )
    .unwrap();
    assert_eq!(straight.records.len(), 6);

    let resumed_dir = tmp.path().join("b");
    let config = small_run(&resumed_dir, 6);
    let first = train(
        &config,
        &data,
        None,
        &TrainOptions {
            stop_after: Some(3),
            ..TrainOptions::default()
        },
    )
    .unwrap();
    assert!(first.interrupted);
    assert_eq!(first.records.len(), 3);
    let second = train(
        &config,
        &data,
        None,
        &TrainOptions {
            resume: Some(resumed_dir.clone()),
            ..TrainOptions::default()
        },
    )
    .unwrap();
    assert_eq!(second.records.first().map(|r| r.step), Some(4));

    let losses = |records: &[origami::train::metrics::StepRecord]| {
        records.iter().map(|r| r.loss.to_bits()).collect::<Vec<_>>()
    };
    let mut joined = losses(&first.records);
    joined.extend(losses(&second.records));
    assert_eq!(
        joined,
        losses(&straight.records),
        "losses differ after resuming"
    );
    assert!(
        straight.params == second.params,
        "weights differ after resuming"
    );
}

#[test]
fn a_fresh_run_refuses_an_existing_metrics_file_and_a_resumed_run_appends_to_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Synthetic { seq: 16 };
    let run_dir = tmp.path().join("run");
    let config = small_run(&run_dir, 4);
    assert!(
        config.parallel.world > 1,
        "every rank must refuse, not only rank 0"
    );
    let existing = tmp.path().join("old-metrics.jsonl");
    let old_text = "{\"step\": 1, \"loss\": 5.0}\n";
    std::fs::write(&existing, old_text).unwrap();
    let refused = train(
        &config,
        &data,
        None,
        &TrainOptions {
            metrics_out: Some(existing.clone()),
            ..TrainOptions::default()
        },
    );
    let message = match refused {
        Ok(_) => panic!("a fresh run appended to an existing metrics file"),
        Err(error) => format!("{error:#}"),
    };
    for part in [
        existing.display().to_string(),
        "already exists".into(),
        "delete it".into(),
        "--metrics-out".into(),
        "--resume".into(),
    ] {
        assert!(message.contains(&part), "{part:?} missing from: {message}");
    }
    assert_eq!(
        std::fs::read_to_string(&existing).unwrap(),
        old_text,
        "the file is untouched"
    );
    assert!(
        !checkpoint::has_checkpoints(&run_dir),
        "nothing was trained before the refusal"
    );

    let metrics = tmp.path().join("metrics.jsonl");
    let with_metrics = |resume: Option<std::path::PathBuf>, stop_after: Option<u64>| {
        train(
            &config,
            &data,
            None,
            &TrainOptions {
                resume,
                stop_after,
                metrics_out: Some(metrics.clone()),
                ..TrainOptions::default()
            },
        )
        .unwrap()
    };
    with_metrics(None, Some(2));
    with_metrics(Some(run_dir.clone()), None);
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4], "the resumed run appends its steps");
}

#[test]
fn a_folded_run_resumes_on_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Synthetic { seq: 16 };
    let folded = small_run(&tmp.path().join("a"), 6);
    assert_eq!(
        (
            folded.parallel.world,
            folded.parallel.tp,
            folded.parallel.ep
        ),
        (4, 2, 4),
        "the default layout is folded"
    );
    let straight = train(&folded, &data, None, &TrainOptions::default()).unwrap();

    let dir = tmp.path().join("b");
    let config = small_run(&dir, 6);
    let first = train(
        &config,
        &data,
        None,
        &TrainOptions {
            stop_after: Some(3),
            ..TrainOptions::default()
        },
    )
    .unwrap();
    let mut single = config.clone();
    single.parallel.world = 1;
    single.parallel.tp = 1;
    single.parallel.ep = 1;
    single.parallel.etp = Some(1);
    let second = train(
        &single,
        &data,
        None,
        &TrainOptions {
            resume: Some(dir),
            ..TrainOptions::default()
        },
    )
    .unwrap();
    let losses: Vec<f32> = first
        .records
        .iter()
        .chain(&second.records)
        .map(|r| r.loss as f32)
        .collect();
    let expected: Vec<f32> = straight.records.iter().map(|r| r.loss as f32).collect();
    let loss_error = relative_error(&losses, &expected);
    assert!(loss_error <= 1e-4, "losses differ by {loss_error}");
    for info in straight.model.registry().params() {
        let error = relative_error(second.params.get(info.id), straight.params.get(info.id));
        assert!(error <= 1e-4, "{} differs by {error}", info.name);
    }
}

/// A run that moves between layouts at its checkpoints — PP2 (tied embeddings, their copy on
/// the last stage) → one rank → PP2·VPP2 with TP2·EP2 folded in — matches an uninterrupted
/// one-rank run: losses, validation losses and final weights.
#[test]
fn a_pipeline_run_resumes_on_one_rank_and_one_rank_on_a_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Synthetic { seq: 16 };
    let pipelined_model = |config: &mut RunConfig| {
        config.model.num_layers = 4;
        config.model.tie_embeddings = true;
        config.train.eval_interval = 2;
        config.train.eval_batches = 2;
    };
    let layout = |config: &mut RunConfig,
                  (world, tp, pp, vpp, ep): (usize, usize, usize, usize, usize)| {
        let p = &mut config.parallel;
        (p.world, p.tp, p.pp, p.vpp, p.ep, p.etp) = (world, tp, pp, vpp, ep, Some(1));
    };
    let mut straight = small_run(&tmp.path().join("straight"), 6);
    pipelined_model(&mut straight);
    layout(&mut straight, (1, 1, 1, 1, 1));
    let straight = train(&straight, &data, Some(&data), &TrainOptions::default()).unwrap();

    let dir = tmp.path().join("moving");
    let mut records = Vec::new();
    let mut last = None;
    for (stop, sizes) in [
        (2, (2, 1, 2, 1, 1)),
        (4, (1, 1, 1, 1, 1)),
        (6, (4, 2, 2, 2, 2)),
    ] {
        let mut config = small_run(&dir, 6);
        pipelined_model(&mut config);
        layout(&mut config, sizes);
        let outcome = train(
            &config,
            &data,
            Some(&data),
            &TrainOptions {
                resume: (stop > 2).then(|| dir.clone()),
                stop_after: Some(stop),
                ..TrainOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("{:?}: {e:#}", sizes));
        records.extend(outcome.records.clone());
        last = Some(outcome);
    }
    let last = last.unwrap();
    let losses: Vec<f32> = records.iter().map(|r| r.loss as f32).collect();
    let expected: Vec<f32> = straight.records.iter().map(|r| r.loss as f32).collect();
    let loss_error = relative_error(&losses, &expected);
    assert!(loss_error <= 1e-4, "losses differ by {loss_error}");
    let validation = |records: &[origami::train::metrics::StepRecord]| -> Vec<f32> {
        records
            .iter()
            .filter_map(|r| r.val_loss)
            .map(|v| v as f32)
            .collect()
    };
    let (val, val_expected) = (validation(&records), validation(&straight.records));
    assert_eq!(val.len(), 3);
    assert!(
        relative_error(&val, &val_expected) <= 1e-4,
        "{val:?} against {val_expected:?}"
    );
    for info in straight.model.registry().params() {
        let error = relative_error(last.params.get(info.id), straight.params.get(info.id));
        assert!(error <= 1e-4, "{} differs by {error}", info.name);
    }
}

/// Saves `params` of a one-rank `model` (fresh moments) as the checkpoint of `state` in `dir`.
fn save_one_rank(
    dir: &Path,
    model: &GptModel,
    params: &Buffers,
    state: &TrainingState,
) -> anyhow::Result<std::path::PathBuf> {
    let optimizer = ParallelOptimizer::new(
        model.registry(),
        AdamWConfig::default(),
        OptimizerGroups::single(),
        false,
        1 << 20,
    );
    let owned = |group| {
        let (range, m, v) = optimizer.owned_moments(group);
        OwnedMoments { range, m, v }
    };
    let contribution = Contribution {
        registry: model.registry(),
        params,
        moments: MomentShards {
            dense: owned(ParamGroup::Dense),
            expert: owned(ParamGroup::Expert),
            distributed: false,
        },
        ownership: Ownership::single(),
    };
    checkpoint::save(
        &origami_comm::SoloComm::shared(0),
        dir,
        &contribution,
        model.registry(),
        state,
        2,
    )
}

fn saved_checkpoint(dir: &Path) -> std::path::PathBuf {
    let config = small_run(dir, 1);
    let model = GptModel::new(config.model.clone()).unwrap();
    let params = model.init_params(1);
    let state = TrainingState {
        step: 1,
        consumed_samples: 4,
        config_toml: config.to_toml(),
    };
    save_one_rank(dir, &model, &params, &state).unwrap()
}

#[test]
fn corrupt_or_truncated_files_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let model = GptModel::new(small_run(tmp.path(), 1).model).unwrap();
    let dir = saved_checkpoint(tmp.path());
    checkpoint::load_params(&dir, model.registry()).expect("a fresh checkpoint loads");

    let file = dir.join("rank-00000.safetensors");
    let original = std::fs::read(&file).unwrap();
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    std::fs::write(&file, &flipped).unwrap();
    let err = format!(
        "{:#}",
        checkpoint::load_params(&dir, model.registry())
            .err()
            .expect("a flipped byte is detected")
    );
    assert!(err.contains("corrupt or truncated"), "{err}");

    std::fs::write(&file, &original[..original.len() - 100]).unwrap();
    let err = format!(
        "{:#}",
        checkpoint::load_params(&dir, model.registry())
            .err()
            .expect("truncation is detected")
    );
    assert!(err.contains("corrupt or truncated"), "{err}");

    std::fs::write(&file, &original).unwrap();
    std::fs::write(dir.join("state.json"), "{\"format\": 2, \"sta").unwrap();
    let err = format!(
        "{:#}",
        checkpoint::load_params(&dir, model.registry())
            .err()
            .expect("a broken state file is detected")
    );
    assert!(err.contains("state.json is corrupt"), "{err}");
}

/// Not a test on its own: the child process of `killed_save_leaves_previous_checkpoint`, which
/// saves checkpoints in a loop until it is killed.
#[test]
#[ignore = "run as a child process by killed_save_leaves_previous_checkpoint"]
fn checkpoint_writer_child() {
    let dir = std::path::PathBuf::from(
        std::env::var("ORIGAMI_CHECKPOINT_CHILD_DIR").expect("set by the parent test"),
    );
    let config = small_run(&dir, 1);
    let model = GptModel::new(config.model.clone()).unwrap();
    let last = checkpoint::read_state(&checkpoint::resolve(&dir).unwrap())
        .unwrap()
        .step;
    for step in last + 1.. {
        let params = model.init_params(step);
        let state = TrainingState {
            step,
            consumed_samples: 4 * step,
            config_toml: config.to_toml(),
        };
        save_one_rank(&dir, &model, &params, &state).unwrap();
    }
}

#[test]
fn killed_save_leaves_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = GptModel::new(small_run(tmp.path(), 1).model).unwrap();
    saved_checkpoint(tmp.path());
    let mut killed_mid_save = 0;
    for delay_ms in [15, 40, 75, 120, 190, 260] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "checkpoint_writer_child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("ORIGAMI_CHECKPOINT_CHILD_DIR", tmp.path())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        let leftovers = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp-")
            })
            .count();
        killed_mid_save += usize::from(leftovers > 0);
        let dir = checkpoint::resolve(tmp.path()).expect("latest names a checkpoint");
        let loaded = checkpoint::load_params(&dir, model.registry())
            .expect("the latest checkpoint loads after a kill");
        assert!(loaded.state.step >= 1);
    }
    eprintln!("kills that interrupted a save: {killed_mid_save} of 6");
}
