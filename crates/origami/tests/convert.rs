//! `origami convert`: HuggingFace → origami → HuggingFace gives back every tensor bit for bit
//! (f32) for the Mixtral and Qwen2-MoE fixtures; a checkpoint of a folded multi-rank run
//! exported to HuggingFace gives the same loss through `origami eval --hf-checkpoint` as the
//! checkpoint through `origami eval --checkpoint`; bad input is named and nothing is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use origami::tensor_files::{Precision, TensorFile};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn origami(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_origami"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every tensor of the safetensors files in `dir`: name → (shape, raw little-endian f32 bits).
fn tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u32>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let file = TensorFile::open(&path).unwrap();
            for (name, shape) in file.keys() {
                let values = file.read(&name, &shape).unwrap();
                out.insert(name, (shape, values.iter().map(|v| v.to_bits()).collect()));
            }
        }
    }
    out
}

#[test]
fn huggingface_to_origami_to_huggingface_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "mixtral_tiny",
        "mixtral_tiny_per_expert",
        "qwen2_moe_tiny",
        "qwen2_moe_tiny_per_expert",
    ] {
        let (checkpoint, back) = (tmp.path().join(format!("{name}-ck")), tmp.path().join(name));
        let src = fixture(name);
        for args in [
            vec![
                "convert",
                "--hf",
                src.to_str().unwrap(),
                "--to-checkpoint",
                checkpoint.to_str().unwrap(),
            ],
            vec![
                "convert",
                "--checkpoint",
                checkpoint.to_str().unwrap(),
                "--to-hf",
                back.to_str().unwrap(),
                "--dtype",
                "f32",
            ],
        ] {
            let (ok, _, err) = origami(&args);
            assert!(ok, "{name}: {err}");
        }
        let (original, exported) = (tensors(&src), tensors(&back));
        assert_eq!(
            original.keys().collect::<Vec<_>>(),
            exported.keys().collect::<Vec<_>>(),
            "{name}: tensor names"
        );
        assert!(original == exported, "{name}: tensors differ");
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(back.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            index["weight_map"].as_object().unwrap().len(),
            original.len()
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap())
                .unwrap();
        let source: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], source["model_type"], "{name}");
        // The exported config reads back as the same model.
        assert_eq!(
            origami::hf::config::model_config_from_hf(&config).unwrap(),
            origami::hf::config::model_config_from_hf(&source).unwrap(),
            "{name}"
        );
    }
}

fn loss(output: &str) -> f64 {
    let line: serde_json::Value = serde_json::from_str(output.trim()).unwrap();
    line["loss"].as_f64().unwrap()
}

#[test]
fn an_exported_folded_run_evaluates_as_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // The quick-start model on its folded default layout (TP2·DP2 | EP4), a few steps.
    let (ok, _, err) = origami(&[
        "train",
        "--set",
        "train.steps=3",
        "--set",
        "train.eval_interval=0",
        "--set",
        &format!("checkpoint.dir={}", run.display()),
        "--set",
        &format!(
            "data.prefix={}",
            tmp.path().join("data/shakespeare").display()
        ),
    ]);
    assert!(ok, "{err}");
    let ids = tmp.path().join("ids.json");
    std::fs::write(
        &ids,
        r#"{"input_ids": [[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [84, 111, 32, 98, 101, 32, 111, 114, 32, 110, 111, 116]]}"#,
    )
    .unwrap();
    let hf = tmp.path().join("hf");
    let (ok, _, err) = origami(&[
        "convert",
        "--checkpoint",
        run.to_str().unwrap(),
        "--to-hf",
        hf.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(ok, "{err}");
    let (ok, from_checkpoint, err) = origami(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--input-ids",
        ids.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, from_hf, err) = origami(&[
        "eval",
        "--hf-checkpoint",
        hf.to_str().unwrap(),
        "--input-ids",
        ids.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(loss(&from_checkpoint), loss(&from_hf));
    // bf16 export: half the bytes, a loss within bf16 rounding.
    let half = tmp.path().join("hf-bf16");
    let converted = origami::convert::to_hf(
        &origami::train::checkpoint::resolve(&run).unwrap(),
        &half,
        Precision::Bf16,
        1 << 20,
    )
    .unwrap();
    assert!(
        converted.files > 1,
        "a 1 MiB shard limit splits the 3.4 M-parameter model"
    );
    let (ok, from_bf16, err) = origami(&[
        "eval",
        "--hf-checkpoint",
        half.to_str().unwrap(),
        "--input-ids",
        ids.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (a, b) = (loss(&from_checkpoint), loss(&from_bf16));
    assert!((a - b).abs() < 0.02 * a, "{a} against {b}");
}

#[test]
fn bad_input_is_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory whose config disagrees with its tensors: one more expert in config.json.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let src = fixture("mixtral_tiny");
    std::fs::copy(
        src.join("model.safetensors"),
        broken.join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["hidden_size"] = (config["hidden_size"].as_u64().unwrap() * 2).into();
    config["head_dim"] = 8.into();
    std::fs::write(broken.join("config.json"), config.to_string()).unwrap();
    let out = tmp.path().join("out");
    let (ok, _, err) = origami(&[
        "convert",
        "--hf",
        broken.to_str().unwrap(),
        "--to-checkpoint",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("model.safetensors") && err.contains("config.json implies"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
    // An existing output is never overwritten.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), "mine").unwrap();
    let (ok, _, err) = origami(&[
        "convert",
        "--hf",
        src.to_str().unwrap(),
        "--to-checkpoint",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("keep")).unwrap(), "mine");
    // A model HuggingFace cannot express is refused with the reason.
    let sigmoid = origami::model::config::ModelConfig {
        moe: origami::layers::moe::config::MoeConfig {
            score_function: origami::layers::moe::config::ScoreFunction::Sigmoid,
            ..origami::model::config::ModelConfig::preset("tiny")
                .unwrap()
                .moe
        },
        ..origami::model::config::ModelConfig::preset("tiny").unwrap()
    };
    let error = origami::convert::family_for(&sigmoid)
        .unwrap_err()
        .to_string();
    assert!(error.contains("sigmoid"), "{error}");
}
