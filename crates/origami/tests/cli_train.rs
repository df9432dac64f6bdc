//! `origami train`, `generate` and `eval --checkpoint` end to end on the shipped Shakespeare
//! slice with a very short run, and Ctrl-C: the run saves a checkpoint, says how to resume, and
//! `--resume` continues it. A fresh run refuses a `--metrics-out` file that exists.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn origami() -> Command {
    Command::new(env!("CARGO_BIN_EXE_origami"))
}

/// Runs `command`, asserts it succeeded (showing its output otherwise), and returns its stdout.
fn run_ok(command: &mut Command) -> String {
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare/shakespeare.jsonl")
}

/// `--set` overrides for a seconds-long run of a small model writing into `dir`.
fn short_run(dir: &Path, steps: u64) -> Vec<String> {
    let mut args = run_settings(dir, steps);
    for model in [
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.moe.ffn_hidden_size=32",
    ] {
        args.extend(["--set".to_string(), model.to_string()]);
    }
    args
}

/// `--set` overrides of the run itself (no model settings), writing into `dir`.
fn run_settings(dir: &Path, steps: u64) -> Vec<String> {
    [
        format!("train.steps={steps}"),
        "train.seq_len=64".into(),
        "train.micro_batch=2".into(),
        "train.global_batch=4".into(),
        "train.eval_interval=2".into(),
        "train.eval_batches=2".into(),
        format!("train.lr.decay_steps={steps}"),
        "train.lr.warmup_steps=1".into(),
        "checkpoint.interval=0".into(),
        format!("checkpoint.dir={}", dir.join("run").display()),
        format!("data.prefix={}", dir.join("data/shakespeare").display()),
        format!("data.source={}", corpus().display()),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

#[test]
fn short_run_writes_outputs_and_its_checkpoint_generates_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let stdout = run_ok(origami().arg("train").args(short_run(tmp.path(), 4)));
    assert!(
        stdout.contains("layout: world 4 | attention TP2 CP1 DP2 | MoE ETP1 EP4 EDP1"),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("step ")).count(),
        4,
        "one log line per step:\n{stdout}"
    );
    assert!(stdout.contains("--- sample ---"));
    let run = tmp.path().join("run");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
    for key in [
        "\"step\"",
        "\"loss\"",
        "\"lr\"",
        "\"grad_norm\"",
        "\"tokens_per_s\"",
        "\"val_loss\"",
    ] {
        assert!(metrics.contains(key), "metrics lack {key}");
    }
    assert!(std::fs::read_to_string(run.join("plot.svg"))
        .unwrap()
        .contains("<svg"));

    let generated = origami()
        .args(["generate", "--checkpoint"])
        .arg(&run)
        .args(["--prompt", "KING:", "--max-tokens", "20"])
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    assert!(String::from_utf8_lossy(&generated.stdout).starts_with("KING:"));

    let evaluated = origami()
        .args(["eval", "--checkpoint"])
        .arg(&run)
        .arg("--data")
        .arg(tmp.path().join("data/shakespeare"))
        .args(["--batches", "2"])
        .output()
        .unwrap();
    assert!(
        evaluated.status.success(),
        "{}",
        String::from_utf8_lossy(&evaluated.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&evaluated.stdout).unwrap();
    let loss = line["loss"].as_f64().unwrap();
    assert!(loss > 0.5 && loss < 6.0, "validation loss {loss}");

    let again = origami()
        .arg("train")
        .args(short_run(tmp.path(), 4))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a run"));
}

#[test]
fn a_fresh_run_refuses_an_existing_metrics_out_file() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = tmp.path().join("metrics.jsonl");
    std::fs::write(&metrics, "earlier run\n").unwrap();
    let out = origami()
        .arg("train")
        .args(short_run(tmp.path(), 2))
        .arg("--metrics-out")
        .arg(&metrics)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the metrics file {} already exists",
            metrics.display()
        )) && stderr.contains("--resume"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("step "),
        "no step ran"
    );
    assert_eq!(std::fs::read_to_string(&metrics).unwrap(), "earlier run\n");
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let child = origami()
        .arg("train")
        .args(short_run(tmp.path(), 100_000))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = tmp.path().join("run/metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("continue with: origami train --resume"),
        "{stdout}"
    );
    let latest = std::fs::read_to_string(tmp.path().join("run/latest")).unwrap();
    let stopped_at: u64 = latest.trim().trim_start_matches("step-").parse().unwrap();
    assert!(stopped_at >= 2);

    let stdout = run_ok(
        origami()
            .args(["train", "--resume"])
            .arg(tmp.path().join("run"))
            .args(["--set", &format!("train.steps={}", stopped_at + 2)]),
    );
    let first_step = stdout.lines().find(|l| l.starts_with("step ")).unwrap();
    assert!(
        first_step.starts_with(&format!("step {:>5}/", stopped_at + 1)),
        "{first_step}"
    );
}

#[test]
fn model_from_a_preset_or_a_hugging_face_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out = origami()
        .args(["train", "--model-preset", "tiny"])
        .args(short_run(tmp.path(), 1))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "tiny's vocabulary of 256 cannot hold the byte tokenizer's 258 ids"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.vocab_size = 256"));

    let hf_config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen2_moe_tiny/config.json");
    let mut args = run_settings(&tmp.path().join("hf"), 2);
    args.extend(["--set".into(), "model.vocab_size=264".into()]);
    let stdout = run_ok(
        origami()
            .arg("train")
            .arg("--hf-config")
            .arg(&hf_config)
            .args(&args),
    );
    assert!(
        stdout.contains("(3 layers, hidden 32, 4 experts top-2)"),
        "{stdout}"
    );
}

#[test]
fn resuming_a_finished_run_says_it_is_complete() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(origami()
        .arg("train")
        .args(short_run(tmp.path(), 2))
        .output()
        .unwrap()
        .status
        .success());
    let stdout = run_ok(
        origami()
            .args(["train", "--resume"])
            .arg(tmp.path().join("run")),
    );
    assert!(
        stdout.contains("the run is complete at train.steps = 2"),
        "{stdout}"
    );
    assert!(!stdout.lines().any(|l| l.starts_with("step ")), "{stdout}");
}
