//! origami reproduces HuggingFace transformers on tiny random Mixtral and Qwen2-MoE models
//! (fixtures made by scripts/make_hf_fixtures.py): the same logits and the same loss
//! (relative error ≤ 1e-4), with fused and per-expert weight layouts, through the library and
//! through `origami eval`.

use origami::hf::{load_checkpoint, next_token_batch};
use std::path::{Path, PathBuf};
use std::process::Command;

const FIXTURES: [&str; 4] = [
    "mixtral_tiny",
    "mixtral_tiny_per_expert",
    "qwen2_moe_tiny",
    "qwen2_moe_tiny_per_expert",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn read_json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn input_ids(dir: &Path) -> Vec<Vec<u32>> {
    read_json(dir.join("input_ids.json"))["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

#[test]
fn logits_and_loss_match_transformers() {
    for name in FIXTURES {
        let dir = fixture(name);
        let expected = read_json(dir.join("expected.json"));
        let (model, params) = load_checkpoint(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let batch = next_token_batch(&input_ids(&dir));
        let logits = model.logits(&params, &batch);
        let reference: Vec<f32> = expected["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(logits.len(), reference.len(), "{name}: logits shape");
        let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = logits
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
            / scale;
        assert!(
            worst <= 1e-4,
            "{name}: logits differ by {worst:e} relative to their largest magnitude"
        );
        let loss = model.loss(&params, &batch).cross_entropy;
        let reference_loss = expected["loss"].as_f64().unwrap();
        let rel = ((loss - reference_loss) / reference_loss).abs();
        assert!(
            rel <= 1e-4,
            "{name}: loss {loss} vs transformers {reference_loss} (relative error {rel:e})"
        );
        eprintln!("{name}: loss {loss:.6} (transformers {reference_loss:.6}, relative error {rel:.1e}), logits max error {worst:.1e}");
    }
}

#[test]
fn eval_command_prints_the_transformers_loss() {
    for name in ["mixtral_tiny", "qwen2_moe_tiny_per_expert"] {
        let dir = fixture(name);
        let output = Command::new(env!("CARGO_BIN_EXE_origami"))
            .args(["eval", "--hf-checkpoint"])
            .arg(&dir)
            .arg("--input-ids")
            .arg(dir.join("input_ids.json"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let loss = line["loss"].as_f64().unwrap();
        let reference = read_json(dir.join("expected.json"))["loss"]
            .as_f64()
            .unwrap();
        assert!(
            ((loss - reference) / reference).abs() <= 1e-4,
            "{name}: {loss} vs {reference}"
        );
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = fixture("mixtral_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.json");
    std::fs::write(&ids, r#"{"input_ids": [[1, 2, 500]]}"#).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_origami"))
        .args(["eval", "--hf-checkpoint"])
        .arg(&dir)
        .arg("--input-ids")
        .arg(&ids)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("outside the model's vocabulary of 96")
    );
    let err = load_checkpoint(tmp.path()).err().unwrap().to_string();
    assert!(err.contains("config.json"), "{err}");
}
